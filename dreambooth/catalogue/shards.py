"""A catalogue as shards: one subjects file, several pipeline runs, one batch run in MLflow.

    batch run (the launch: the whole file's plan, its up-to-date and refused subjects, shards.json)
      ├── shard 1/3: a batch run of its own pipeline run (its subject runs, class priors, summary)
      ├── shard 2/3
      └── shard 3/3

One Argo workflow's status grows with its tasks and Argo refuses one past about a megabyte, so a
file of thousands of subjects cannot be one run. The launch plans the whole file (one paged search
of what is trained), and puts only the subjects with work into shards of at most
`batch.max_subjects_per_run`: an up-to-date night launches nothing. Each shard is an ordinary
pipeline run (its retries and failures are its own); the last one to end writes the batch's summary
across all shards and closes the batch run (dreambooth.tasks.launch).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

SHARDS_ARTIFACT = "shards.json"  # on the batch run: each shard's subjects and the run that trains them


@dataclass(frozen=True)
class Shard:
    batch_run_id: str  # the batch run that ties the shards together
    index: int  # 1-based
    of: int
    subjects: list[str]

    @property
    def label(self) -> str:
        return f"{self.index}/{self.of}"

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> "Shard":
        return cls(**json.loads(text))


def split_into_shards(batch_run_id: str, subject_ids: list[str], size: int) -> list[Shard]:
    """Consecutive runs of at most `size` subjects, in the file's order."""
    chunks = [subject_ids[start : start + size] for start in range(0, len(subject_ids), size)]
    return [Shard(batch_run_id, number, len(chunks), chunk) for number, chunk in enumerate(chunks, start=1)]
