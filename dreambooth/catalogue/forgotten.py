"""The records of forgotten subjects that a batch reads (`dreambooth forget` writes them): tombstones,
experiment tags keyed by a digest of the id, so a later batch skips a subject its subjects file still
lists; and the redaction of a subject from the records a batch shares with other subjects.
"""

from __future__ import annotations

import csv
import hashlib
import io
import re

import yaml

from dreambooth.tracking import client

FORGOTTEN = "[forgotten]"
TOMBSTONE_PREFIX = "dreambooth.forgotten."


def tombstone_key(subject_id: str) -> str:
    return TOMBSTONE_PREFIX + hashlib.sha256(subject_id.encode()).hexdigest()[:16]


def forgotten_ids(tracking_uri: str, experiment: str, subject_ids: list[str]) -> set[str]:
    """Which of these subjects were forgotten in the experiment (one request: its tags)."""
    found = client(tracking_uri).get_experiment_by_name(experiment)
    return {subject for subject in subject_ids if found is not None and tombstone_key(subject) in found.tags}


def redact(text: str, secrets: list[str]) -> str:
    """Each secret, where it stands as a whole name (not inside a longer id), replaced by [forgotten]."""
    for secret in sorted(secrets, key=len, reverse=True):
        text = re.sub(rf"(?<![A-Za-z0-9_-]){re.escape(secret)}(?![A-Za-z0-9_-])", FORGOTTEN, text)
    return text


def without_subject_entry(text: str, name: str, subject_id: str) -> str:
    """A subjects file (YAML or CSV) without the subject's entry."""
    if name.lower().endswith(".csv"):
        rows = list(csv.DictReader(io.StringIO(text)))
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=list(rows[0]) if rows else ["id"])
        writer.writeheader()
        writer.writerows(row for row in rows if row.get("id") != subject_id)
        return out.getvalue()
    document = yaml.safe_load(text) or {}
    document["subjects"] = [entry for entry in document.get("subjects", []) if str(entry.get("id")) != subject_id]
    return yaml.safe_dump(document, sort_keys=False)
