"""Planning a batch: which subjects need training, and which class priors they can share.

A subject's fingerprint covers what shapes its result: its photos (names and bytes), its resolved
settings and the base model. A subject whose fingerprint matches a finished training is up to date
and is not trained again (a nightly schedule trains only what is new). Subjects whose class images
would be drawn identically (same base model and revision, class prompt and prior sampler) form one
prior group, generated once for all of them, and cached where tomorrow's batch finds it.

The plan is plain data: the plan task writes it as JSON, and the later tasks read it; `read_plan`
reads it back from the batch run (every shard's subjects, for a sharded batch).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional

from dreambooth.config import RunConfig
from dreambooth.priors import prior_key
from dreambooth.catalogue.subjects import SubjectEntry, subject_config
from dreambooth.tracking import TAG_SHARDS, client, shard_runs

PLAN_ARTIFACT = "batch_plan.json"  # the plan, on the batch's MLflow run
RUN_OPENINGS = 8  # subject runs opened at once while planning (each a few tracking-server requests)


@dataclass(frozen=True)
class PlannedSubject:
    subject_id: str
    class_noun: str
    photos: str
    config_json: str  # the subject's resolved settings
    fingerprint: str
    prior_key: str  # "" when it trains without prior preservation
    subject_run_id: str = ""  # the MLflow run its stages log under
    up_to_date_run_id: str = ""  # set when a finished run already trained it
    experiment: dict = field(default_factory=dict)  # an experiment's: subject, variant and what it tests (roles)
    refused: str = ""  # why the subject may not train (its consent is required and absent); its stages do nothing

    @property
    def up_to_date(self) -> bool:
        return bool(self.up_to_date_run_id)


@dataclass(frozen=True)
class PriorGroup:
    prior_key: str
    class_noun: str
    config_json: str  # a member's settings, with the largest class-image count of the group
    subjects: list[str]


@dataclass
class BatchPlan:
    batch_run_id: str
    subjects: list[PlannedSubject]
    prior_groups: list[PriorGroup] = field(default_factory=list)

    @property
    def to_train(self) -> list[PlannedSubject]:
        return [subject for subject in self.subjects if not subject.up_to_date]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    def without(self, subject_id: str) -> "BatchPlan":
        """The plan with one subject left out, its place in its prior group too (`forget`)."""
        return BatchPlan(self.batch_run_id, [subject for subject in self.subjects if subject.subject_id != subject_id],
                         [replace(group, subjects=[s for s in group.subjects if s != subject_id]) for group in self.prior_groups])

    @classmethod
    def from_json(cls, text: str) -> "BatchPlan":
        raw = json.loads(text)
        return cls(
            batch_run_id=raw["batch_run_id"],
            subjects=[PlannedSubject(**subject) for subject in raw["subjects"]],
            prior_groups=[PriorGroup(**group) for group in raw["prior_groups"]],
        )


def subject_fingerprint(config: RunConfig, photo_digests: dict[str, str]) -> str:
    """Same photos, same settings, same base model -> same fingerprint."""
    shaping = {"settings": config.result_settings(), "photos": photo_digests}
    return hashlib.sha256(json.dumps(shaping, sort_keys=True, default=str).encode()).hexdigest()[:20]


def group_priors(subjects: list[PlannedSubject]) -> list[PriorGroup]:
    """One group per prior key among the subjects to train, holding enough images for each member."""
    members: dict[str, list[tuple[PlannedSubject, RunConfig]]] = {}
    for subject in subjects:
        if subject.prior_key and not subject.up_to_date and not subject.refused:
            members.setdefault(subject.prior_key, []).append((subject, RunConfig.from_json(subject.config_json)))
    groups = []
    for key, group in members.items():
        largest = max(config.priors.num_class_images for _, config in group)
        config = group[0][1]
        # The group's settings name no subject (its class priors run outlives any one of them: `forget`).
        anonymous = config.subject.model_copy(update={"name": f"class-{config.subject.class_noun}", "identifier": None,
                                                      "captions": {}, "consent": None})
        config = config.model_copy(update={"subject": anonymous,
                                           "priors": config.priors.model_copy(update={"num_class_images": largest})})
        groups.append(PriorGroup(key, config.subject.class_noun, config.to_json(), [subject.subject_id for subject, _ in group]))
    return groups


def plan_batch(
    entries: list[SubjectEntry],
    shared: RunConfig,
    photo_digests: Callable[[list[str]], list[dict[str, str]]],
    trained_run: Callable[[str], Optional[str]],
    open_subject_run: Callable[[RunConfig, str], str],
    force: bool = False,
    before_opening: Optional[Callable[[int], None]] = None,
) -> list[PlannedSubject]:
    """Fingerprint every subject; those a finished run trained already are up to date unless `force`;
    those whose consent is required and absent, or whose photos are not there, are refused (they get a
    run, to record why, and no class image is drawn for them).

    photo_digests(photos uris) -> [{name: digest}] in their order (storage.content_digests_of); trained_run(fingerprint) -> run id or None;
    open_subject_run(config, fingerprint) -> the run id a subject to train logs under;
    before_opening(subjects to train) may refuse the batch (raise) before any of their runs is opened.
    """
    digests = photo_digests([entry.photos for entry in entries])
    planned, configs = [], []
    for entry, photos in zip(entries, digests):
        config = subject_config(shared, entry)
        fingerprint = subject_fingerprint(config, photos)
        # The listing that fingerprints the photos also finds a missing or empty folder, before any prior is drawn.
        refused = config.consent_refusal() or ("" if photos else f"photos: nothing at {entry.photos} (a missing or empty folder)")
        existing = None if force or refused else trained_run(fingerprint)
        planned.append(PlannedSubject(
            subject_id=entry.id,
            class_noun=entry.class_noun,
            photos=entry.photos,
            config_json=config.to_json(),
            fingerprint=fingerprint,
            prior_key=prior_key(config),
            up_to_date_run_id=existing or "",
            experiment=entry.experiment,
            refused=refused,
        ))
        configs.append(config)
    if before_opening:
        before_opening(sum(1 for subject in planned if not subject.up_to_date and not subject.refused))
    # A subject run is a few requests to the tracking server: opened side by side too (a server's workers
    # serve them at once), so a shard's plan waits on the server's throughput, not on each round trip.
    def with_run(subject: PlannedSubject, config: RunConfig) -> PlannedSubject:
        return subject if subject.up_to_date else replace(subject, subject_run_id=open_subject_run(config, subject.fingerprint))

    with ThreadPoolExecutor(max_workers=RUN_OPENINGS) as pool:
        return list(pool.map(with_run, planned, configs))


@dataclass(frozen=True)
class PriorOutcome:
    """What a class-priors task reports back (a dict in KFP)."""

    prior_key: str
    class_images: str = ""  # the folder or gs:// URI holding the group's class images
    count: int = 0
    error: str = ""


def subjects_with_priors(plan: BatchPlan, outcomes: list[dict]) -> tuple[list[dict], dict[str, str]]:
    """The subject fan-out's items (each with its group's class images), and {subject: reason} for
    subjects whose group failed. Those still get an item, so the fan-out is never empty; their
    stages see the failure on the subject's run and do nothing."""
    by_key = {outcome["prior_key"]: PriorOutcome(**outcome) for outcome in outcomes}
    items, failed = [], {}
    for subject in plan.to_train:
        outcome = by_key.get(subject.prior_key, PriorOutcome(subject.prior_key))
        if subject.prior_key and outcome.error:
            failed[subject.subject_id] = f"class priors: {outcome.error}"
        items.append(
            {
                "subject_id": subject.subject_id,
                "photos": subject.photos,
                "config_json": subject.config_json,
                "subject_run_id": subject.subject_run_id,
                "class_images": outcome.class_images if subject.prior_key else "",
            }
        )
    return items, failed


def read_plan(tracking_uri: str, batch_run_id: str) -> BatchPlan:
    """The plan a batch ran with, from its run's artifacts; a sharded batch's holds every shard's subjects."""
    mlflow = client(tracking_uri)
    plan = _logged_plan(mlflow, batch_run_id)
    batch = mlflow.get_run(batch_run_id)
    if TAG_SHARDS in batch.data.tags:
        for shard in shard_runs(tracking_uri, batch):
            try:
                part = _logged_plan(mlflow, shard.info.run_id)
            except Exception:  # the shard failed before its plan was written (its error is on its run)
                continue
            plan.subjects += part.subjects
            plan.prior_groups += part.prior_groups
    return plan


def _logged_plan(mlflow, batch_run_id: str) -> BatchPlan:
    with tempfile.TemporaryDirectory() as scratch:
        return BatchPlan.from_json(Path(mlflow.download_artifacts(batch_run_id, PLAN_ARTIFACT, scratch)).read_text())
