"""The subjects file: which subjects one batch personalises, validated before any task starts.

    subjects:
      - {id: grey-dog, photos: gs://bucket/uploads/grey-dog/, class_noun: dog}
      - {id: red-mug, photos: /data/red-mug, class_noun: mug, identifier: sks, live: false,
         overrides: {training: {max_steps: 800}}}

A CSV has the columns id,photos,class_noun,identifier,live (overrides only in YAML). A relative
`photos` is relative to the subjects file. Every problem is reported in one pass, one line each,
naming the entry and the field, so a team fixes a generated file in one go.
"""

from __future__ import annotations

import csv
import io
import json
import re
from typing import Any, Optional

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from dreambooth.config import RunConfig, merge_settings, setting_problems
from dreambooth.errors import InputError
from dreambooth.storage import is_gcs, read_text

ENTRY_FIELDS = ("id", "photos", "class_noun", "identifier", "live", "overrides")
CSV_COLUMNS = ("id", "photos", "class_noun", "identifier", "live")
# Settings that belong to the whole batch (where it runs, where it writes, which branches the DAG
# takes), not to one subject.
BATCH_WIDE_SECTIONS = ("tracking", "storage", "batch", "cluster")
BATCH_WIDE_SETTINGS = (("superres", "enabled"),)
# Set through the entry's own fields instead.
IDENTITY_SETTINGS = {("subject", "name"): "id", ("subject", "class_noun"): "class_noun",
                     ("subject", "identifier"): "identifier", ("evaluation", "live_subject"): "live"}
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
    overrides: dict[str, Any] = {}


def subject_config(shared: RunConfig, entry: SubjectEntry) -> RunConfig:
    """The shared settings, the entry's overrides on top, and the subject's identity."""
    identity: dict = {"subject": {"name": entry.id, "class_noun": entry.class_noun}}
    if entry.identifier is not None:
        identity["subject"]["identifier"] = entry.identifier
    if entry.live is not None:
        identity["evaluation"] = {"live_subject": entry.live}
    merged = merge_settings(merge_settings(shared.model_dump(), entry.overrides), identity)
    return RunConfig.model_validate(merged)


def _parse_bool(value: str) -> Optional[bool]:
    word = value.strip().lower()
    if not word:
        return None
    if word in TRUE_WORDS | FALSE_WORDS:
        return word in TRUE_WORDS
    raise ValueError(f"{value!r} is not true or false")


def _raw_entries(text: str, source: str) -> list[tuple[str, Any]]:
    """(where, raw entry) pairs; `where` is `entry N` in YAML and `line N` in CSV."""
    if source.lower().endswith(".csv"):
        reader = csv.DictReader(io.StringIO(text))
        unknown = [column for column in reader.fieldnames or [] if column not in CSV_COLUMNS]
        if reader.fieldnames is None or unknown or "id" not in reader.fieldnames:
            raise InputError(
                f"{source}: header {','.join(reader.fieldnames or [])!r} must use only the columns {','.join(CSV_COLUMNS)}"
            )
        return [(f"line {reader.line_num}", dict(row)) for row in reader]
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"{source}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict) or set(document) != {"subjects"} or not isinstance(document["subjects"], list):
        raise InputError(f"{source}: expected a mapping with one key, `subjects`, holding a list of subjects")
    return [(f"entry {index}", raw) for index, raw in enumerate(document["subjects"], start=1)]


def _entry_problems(raw: Any, shared: RunConfig) -> tuple[Optional[SubjectEntry], list[str]]:
    """The entry, or None, and its problems as `field: reason`."""
    if not isinstance(raw, dict):
        return None, [f"expected a mapping with the fields {', '.join(ENTRY_FIELDS)}"]
    problems = [f"{key}: unknown field (expected {', '.join(ENTRY_FIELDS)})" for key in raw if key not in ENTRY_FIELDS]
    values = {key: raw[key] for key in ENTRY_FIELDS if key in raw}
    for key in ("id", "photos", "class_noun", "identifier"):
        value = values.get(key)
        if value is None or (isinstance(value, str) and not value.strip()):
            values.pop(key, None)
            if key != "identifier":
                problems.append(f"{key}: missing")
        else:
            values[key] = str(value).strip()
    subject_id = values.get("id")
    if subject_id is not None and (not SAFE_ID.fullmatch(subject_id) or ".." in subject_id):
        problems.append(
            f"id: {subject_id!r} cannot be a folder or run name (letters, digits, '.', '_' and '-', "
            "at most 64, no path separators or '..')"
        )
    if isinstance(values.get("live"), str):
        try:
            values["live"] = _parse_bool(values["live"])
        except ValueError as error:
            problems.append(f"live: {error}")
    elif values.get("live") is not None and not isinstance(values["live"], bool):
        problems.append(f"live: {values['live']!r} is not true or false")
    identifier, class_noun = values.get("identifier"), values.get("class_noun")
    if identifier and class_noun and identifier.lower() in class_noun.lower().split():
        problems.append(f"identifier: {identifier!r} is the class noun; [V] must be a token the class noun does not already mean")
    problems += _override_problems(values.get("overrides", {}))
    if problems:
        return None, problems
    entry = SubjectEntry(**values)
    try:
        subject_config(shared, entry)
    except ValidationError as error:
        return None, [f"overrides.{problem}" for problem in setting_problems(error)]
    return entry, []


def _override_problems(overrides: Any) -> list[str]:
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


def _resolve_photos(photos: str, source: str) -> str:
    """A relative `photos` is relative to the subjects file's own folder (local or gs://)."""
    if is_gcs(photos) or photos.startswith("/") or "/" not in source:
        return photos
    return f"{source.rsplit('/', 1)[0]}/{photos}"


def validate_entries(raw_entries: list[tuple[str, Any]], source: str, shared: RunConfig) -> list[SubjectEntry]:
    """Check every entry; raise one InputError listing every problem, a line each."""
    if not raw_entries:
        raise InputError(f"{source}: lists no subjects")
    entries, problems, first_seen = [], [], {}
    for where, raw in raw_entries:
        label = f"{source}: {where}"
        subject_id = str(raw.get("id") or "").strip() if isinstance(raw, dict) else ""
        if subject_id:
            label += f" ({subject_id})"
            if subject_id in first_seen:
                problems.append(f"{label}: id: duplicate of {first_seen[subject_id]}")
            first_seen.setdefault(subject_id, where)
        entry, entry_problems = _entry_problems(raw, shared)
        problems += [f"{label}: {problem}" for problem in entry_problems]
        if entry is not None:
            entries.append(entry.model_copy(update={"photos": _resolve_photos(entry.photos, source)}))
    if problems:
        raise InputError("\n".join(problems))
    return entries


def parse_subjects(text: str, source: str, shared: RunConfig) -> list[SubjectEntry]:
    """A subjects file's text (YAML, or CSV when `source` ends in .csv), validated against the shared config."""
    return validate_entries(_raw_entries(text, source), source, shared)


def read_subjects(uri: str, shared: RunConfig) -> list[SubjectEntry]:
    """The subjects file at `uri` (YAML or CSV, local or gs://), validated against the shared config."""
    return parse_subjects(read_text(uri), uri, shared)


def entries_from_json(text: str, shared: RunConfig) -> list[SubjectEntry]:
    """Entries passed inline (a batch of one from --subject-dir), validated the same way."""
    return validate_entries([(f"entry {i}", raw) for i, raw in enumerate(json.loads(text), start=1)], "subjects", shared)


def entries_to_json(entries: list[SubjectEntry]) -> str:
    return json.dumps([entry.model_dump(exclude_defaults=True) for entry in entries])
