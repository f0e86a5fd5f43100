"""The subjects file: which subjects one batch personalises, validated before any task starts.

    subjects:
      - {id: grey-dog, photos: gs://bucket/uploads/grey-dog/, class_noun: dog}
      - {id: ana, photos: gs://bucket/uploads/ana/, class_noun: woman, overrides: {subject: {kind: person}},
         consent: {given_by: Ana Ruiz, given_on: 2026-11-02, record: forms/ana.pdf}}
      - {id: red-mug, photos: /data/red-mug, class_noun: mug, identifier: sks, live: false,
         captions: {mug1.jpg: "a {identifier} {class_noun} on a desk"}, overrides: {training: {max_steps: 800}}}

A CSV has the columns id,photos,class_noun,identifier,live,consent_given_by,consent_given_on,consent_record
(captions and overrides only in YAML). A relative
`photos` is relative to the subjects file. Every problem is reported in one pass, one line each,
naming the entry and the field, so a team fixes a generated file in one go.
"""

from __future__ import annotations

import csv
import io
import json
from typing import Any, Optional

import yaml
from pydantic import ValidationError

from dreambooth.config import Consent, RunConfig, setting_problems
from dreambooth.errors import InputError
from dreambooth.storage import is_gcs, read_text, unsupported_location
from dreambooth.catalogue.entries import (  # noqa: F401 (SubjectEntry and subject_config are this module's interface too)
    CONSENT_COLUMNS,
    CSV_COLUMNS,
    ENTRY_FIELDS,
    FALSE_WORDS,
    SAFE_ID,
    TRUE_WORDS,
    SubjectEntry,
    override_problems,
    subject_config,
)
from dreambooth.catalogue.experiments import expand_variants


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
        return [(f"line {reader.line_num}", _consent_from_columns(dict(row))) for row in reader]
    document = _yaml_document(text, source)
    return [(f"entry {index}", raw) for index, raw in enumerate(document["subjects"], start=1)]


def _consent_from_columns(row: dict) -> dict:
    """A CSV row's consent columns as the entry's `consent` mapping (absent when they are empty)."""
    given = {column.removeprefix("consent_"): row.pop(column) for column in CONSENT_COLUMNS if column in row}
    given = {key: value for key, value in given.items() if value and value.strip()}
    return {**row, "consent": given} if given else row


def _yaml_document(text: str, source: str) -> dict:
    """The YAML file: `subjects` (a list), and for an experiment `variants` (see dreambooth.catalogue.experiments)."""
    try:
        document = yaml.safe_load(text)
    except yaml.YAMLError as error:
        raise InputError(f"{source}: not valid YAML ({str(error).splitlines()[0]})") from None
    if not isinstance(document, dict) or not set(document) <= {"subjects", "variants"} or not isinstance(document.get("subjects"), list):
        raise InputError(f"{source}: expected a mapping with the key `subjects` holding a list of subjects "
                         "(and, for an experiment, `variants`)")
    return document


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
    if values.get("photos") and (reason := unsupported_location(values["photos"])):
        problems.append(f"photos: {values['photos']!r}: {reason}")
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
    captions = values.get("captions", {})
    if not isinstance(captions, dict) or not all(isinstance(key, str) and isinstance(value, str) for key, value in captions.items()):
        problems.append("captions: expected a mapping of photo file name to caption, e.g. {dog1.jpg: a {identifier} {class_noun} on a sofa}")
    identifier, class_noun = values.get("identifier"), values.get("class_noun")
    if identifier and class_noun and identifier.lower() in class_noun.lower().split():
        problems.append(f"identifier: {identifier!r} is the class noun; [V] must be a token the class noun does not already mean")
    if "consent" in values:
        values["consent"], consent_problems = _checked_consent(values["consent"])
        problems += consent_problems
    problems += override_problems(values.get("overrides", {}))
    if problems:
        return None, problems
    entry = SubjectEntry(**values)
    try:
        subject_config(shared, entry)
    except ValidationError as error:
        return None, [f"overrides.{problem}" for problem in setting_problems(error)]
    return entry, []




def _checked_consent(consent: Any) -> tuple[dict, list[str]]:
    """The entry's consent as plain JSON values (YAML reads the date as a date), and its problems."""
    if not isinstance(consent, dict):
        return {}, ["consent: expected a mapping {given_by: ..., given_on: YYYY-MM-DD, record: ...}"]
    try:
        return Consent.model_validate(consent).model_dump(mode="json"), []
    except ValidationError as error:
        return {}, [f"consent.{problem}" for problem in setting_problems(error)]


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
    """A subjects file's text (YAML, or CSV when `source` ends in .csv), validated against the shared
    config; an experiment's (`variants:`) one entry per subject and variant."""
    entries = validate_entries(_raw_entries(text, source), source, shared)
    if source.lower().endswith(".csv") or "variants" not in (document := _yaml_document(text, source)):
        return entries
    return expand_variants(entries, document["variants"], source, shared)


def read_subjects(uri: str, shared: RunConfig) -> list[SubjectEntry]:
    """The subjects file at `uri` (YAML or CSV, local or gs://), validated against the shared config."""
    return parse_subjects(read_text(uri), uri, shared)


def entries_from_json(text: str, shared: RunConfig) -> list[SubjectEntry]:
    """Entries passed inline (a batch of one from --subject-dir), validated the same way."""
    return validate_entries([(f"entry {i}", raw) for i, raw in enumerate(json.loads(text), start=1)], "subjects", shared)


def entries_to_json(entries: list[SubjectEntry]) -> str:
    return json.dumps([entry.model_dump(exclude_defaults=True) for entry in entries])
