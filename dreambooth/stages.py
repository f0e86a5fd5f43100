"""Every stage of the pipeline, once.

A stage's name is its one spelling: the KFP component and task (`fine_tune` -> `fine-tune`),
its `[progress]` lines and row in `dreambooth run`'s view, its log file under `{job}/logs/`,
its MLflow run and its key under `cluster.stages`. The DAG, the console, tracking and the logs
all read this table.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

BATCH, CLASS, SUBJECT = "batch", "class", "subject"


@dataclass(frozen=True)
class Stage:
    name: str
    scope: str  # whose stage it is: the batch's, one class's priors, or one subject's
    does: str  # one line for people
    component: bool = True  # a KFP task of its own (notify is a step of finish-tracking)

    def run_name(self, qualifier: str = "") -> str:
        """The MLflow run's name: `fine-tune`, `class-priors-dog`."""
        return f"{self.name}-{qualifier}" if qualifier else self.name

    def log_file(self, logs_dir: Path, scope: str) -> Path:
        """`{logs}/dog/fine-tune.log`, `{logs}/class-dog/class-priors.log`, `{logs}/batch/plan-batch.log`."""
        return logs_dir / scope.replace(":", "-") / f"{self.name}.log"


LAUNCH_SHARDS = Stage("launch-shards", BATCH, "plan a whole subjects file, start a pipeline run per shard with work")
PLAN_BATCH = Stage("plan-batch", BATCH, "read the subjects, skip the up-to-date ones, open the MLflow runs")
PRIOR_GROUPS = Stage("prior-groups", BATCH, "group the subjects that share class images")
CLASS_PRIORS = Stage("class-priors", CLASS, "generate (or reuse) the class images of one class")
ASSIGN_PRIORS = Stage("assign-priors", BATCH, "hand each subject its group's class images")
INGEST = Stage("ingest", SUBJECT, "validate and normalise the photos, pick the identifier")
FINE_TUNE = Stage("fine-tune", SUBJECT, "DreamBooth fine-tune with prior preservation")
SAMPLES = Stage("samples", SUBJECT, "draw the sample prompts")
EVALUATE = Stage("evaluate", SUBJECT, "DreamBench scores, the quality gate, the registry")
SUPER_RESOLUTION = Stage("super-resolution", SUBJECT, "fine-tune the upscaler on the subject")
EVALUATE_UPSCALED = Stage("evaluate-upscaled", SUBJECT, "score the upscaled images, generic vs personalised")
SUMMARIZE = Stage("summarize", BATCH, "a row per subject in MLflow and KFP")
BATCH_FAILURES = Stage("batch-failures", BATCH, "fail the run when any subject failed")
FINISH_TRACKING = Stage("finish-tracking", BATCH, "close the MLflow runs (the exit handler)")
NOTIFY = Stage("notify", BATCH, "tell the webhooks how the batch ended", component=False)

STAGES = (LAUNCH_SHARDS, PLAN_BATCH, PRIOR_GROUPS, CLASS_PRIORS, ASSIGN_PRIORS, INGEST, FINE_TUNE, SAMPLES, EVALUATE,
          SUPER_RESOLUTION, EVALUATE_UPSCALED, SUMMARIZE, BATCH_FAILURES, FINISH_TRACKING, NOTIFY)
BY_NAME = {stage.name: stage for stage in STAGES}
COMPONENT_STAGES = tuple(stage.name for stage in STAGES if stage.component)
SUBJECT_STAGES = (INGEST, FINE_TUNE, SAMPLES, EVALUATE)
SUPERRES_STAGES = (SUPER_RESOLUTION, EVALUATE_UPSCALED)
