"""One subject of a batch: its entry (id, photos, class, identifier, its own settings) and the
settings it runs with. Shared by the subjects file (dreambooth.catalogue.subjects) and an experiment's
variants (dreambooth.catalogue.experiments).
"""

from __future__ import annotations

import re
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict

from dreambooth.config import RunConfig
from dreambooth.config_files import merge_settings

ENTRY_FIELDS = ("id", "photos", "class_noun", "identifier", "live", "captions", "consent", "overrides")
CONSENT_COLUMNS = ("consent_given_by", "consent_given_on", "consent_record")  # a CSV's `consent`, a column per field
CSV_COLUMNS = ("id", "photos", "class_noun", "identifier", "live", *CONSENT_COLUMNS)
# Settings that belong to the whole batch (where it runs, where it writes, which branches the DAG
# takes), not to one subject.
BATCH_WIDE_SECTIONS = ("tracking", "storage", "batch", "cost", "cluster")
BATCH_WIDE_SETTINGS = (("superres", "enabled"),)
# Set through the entry's own fields instead.
IDENTITY_SETTINGS = {("subject", "name"): "id", ("subject", "class_noun"): "class_noun",
                     ("subject", "identifier"): "identifier", ("evaluation", "live_subject"): "live",
                     ("subject", "captions"): "captions", ("subject", "consent"): "consent"}
SAFE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
TRUE_WORDS, FALSE_WORDS = {"true", "yes", "1"}, {"false", "no", "0"}


class SubjectEntry(BaseModel):
    """One subject: its id (a folder and run name), its photos and class, and its own settings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    photos: str
    class_noun: str
    identifier: Optional[str] = None
    live: Optional[bool] = None
    captions: dict[str, str] = {}  # photo file name -> its caption template (subject.captions)
    consent: dict[str, Any] = {}  # subject.consent: who agreed to the photos being trained on, and when
    overrides: dict[str, Any] = {}
    # Set when an experiment's variants expand a subject: which subject, which variant, what it tests.
    experiment: dict[str, Any] = {}


def subject_config(shared: RunConfig, entry: SubjectEntry) -> RunConfig:
    """The shared settings, the entry's overrides on top, and the subject's identity."""
    identity: dict = {"subject": {"name": entry.id, "class_noun": entry.class_noun}}
    if entry.identifier is not None:
        identity["subject"]["identifier"] = entry.identifier
    if entry.live is not None:
        identity["evaluation"] = {"live_subject": entry.live}
    if entry.captions:
        identity["subject"]["captions"] = entry.captions
    if entry.consent:
        identity["subject"]["consent"] = entry.consent
    merged = merge_settings(merge_settings(shared.model_dump(), entry.overrides), identity)
    return RunConfig.model_validate(merged)


def override_problems(overrides: Any) -> list[str]:
    if not isinstance(overrides, dict):
        return ["overrides: expected a mapping of settings, e.g. {training: {max_steps: 800}}"]
    problems = [
        f"overrides.{section}: a batch-wide setting; set it in the config, not per subject"
        for section in overrides
        if section in BATCH_WIDE_SECTIONS
    ]
    for section, key in BATCH_WIDE_SETTINGS:
        if isinstance(overrides.get(section), dict) and key in overrides[section]:
            problems.append(f"overrides.{section}.{key}: a batch-wide setting; set it in the config, not per subject")
    for (section, key), field in IDENTITY_SETTINGS.items():
        if isinstance(overrides.get(section), dict) and key in overrides[section]:
            problems.append(f"overrides.{section}.{key}: set the entry's `{field}` field instead")
    return problems
