"""A catalogue's summary and comparison stay readable: pages of rows, a few sample grids, plots that aggregate.

The subject runs are recorded in a real MLflow store as the pipeline leaves them (tags, evaluation metrics,
sample grids); the summary and compare read them back."""

import io
from pathlib import Path

import numpy as np
from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient
from PIL import Image

from dreambooth.catalogue.planning import BatchPlan, PlannedSubject
from dreambooth.reports.compare import RUN_COLOUR, compare_runs
from dreambooth.reports.summary import GRID_ARTIFACT, PAGE_ROWS, SUMMARY_PAGES, log_summary
from dreambooth.tracking import (
    TAG_ERROR,
    TAG_EVAL_PROTOCOL,
    TAG_FAILED_STAGE,
    TAG_MODEL_LOCATION,
    TAG_STAGE,
    TAG_SUBJECT,
    TAG_SUBJECT_STATUS,
)


def _subject_runs(tracking: str, folder: Path, count: int, failed: set[int], grids: int) -> tuple[str, list[str]]:
    """A batch run with `count` subject runs (those in `failed` failed; the first `grids` have a sample grid)."""
    mlflow = MlflowClient(tracking)
    experiment = mlflow.create_experiment("catalogue", artifact_location=(folder / "artifacts").as_uri())
    batch = mlflow.create_run(experiment, tags={TAG_STAGE: "batch"}).info.run_id
    buffer = io.BytesIO()
    Image.new("RGB", (64, 32), "white").save(buffer, format="PNG")
    (folder / GRID_ARTIFACT).write_bytes(buffer.getvalue())
    ids = []
    for index in range(count):
        tags = {TAG_STAGE: "subject", TAG_SUBJECT: f"item-{index:04d}", TAG_EVAL_PROTOCOL: "{}", TAG_MODEL_LOCATION: "/models"}
        tags.update({TAG_SUBJECT_STATUS: "failed", TAG_FAILED_STAGE: "ingest", TAG_ERROR: "no photos"} if index in failed
                    else {TAG_SUBJECT_STATUS: "trained"})
        run = mlflow.create_run(experiment, tags=tags).info.run_id
        dino = 0.3 + 0.5 * index / count
        mlflow.log_batch(run, metrics=[Metric(f"eval/{name}", dino if name == "dino" else 0.25, 0, 0) for name in ("dino", "clip_i", "clip_t", "pres", "div")],
                         params=[Param("samples.prompts", '["a {identifier} {class_noun}"]')], tags=[RunTag("mlflow.runName", f"item-{index:04d}")])
        if index < grids:
            mlflow.log_artifact(run, str(folder / GRID_ARTIFACT))
        mlflow.set_terminated(run, "FAILED" if index in failed else "FINISHED")
        ids.append(run)
    return batch, ids


def test_a_summary_of_450_subjects_is_paged_failed_first_with_at_most_24_grids(tmp_path):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    batch, runs = _subject_runs(tracking, tmp_path, 450, failed={300, 420}, grids=30)
    plan = BatchPlan(batch, [PlannedSubject(f"item-{i:04d}", "dog", "", "{}", "fp", "", subject_run_id=run) for i, run in enumerate(runs)])
    rows, markdown, page = log_summary(tracking, plan, "catalogue")

    assert len(rows) == 450
    table = [line for line in markdown.splitlines() if line.startswith("| item-")]
    assert len(table) == PAGE_ROWS and [line.split(" | ")[0] for line in table[:3]] == ["| item-0300", "| item-0420", "| item-0000"]
    assert "Page 1 of 3" in markdown and "450 subjects: 448 trained, 0 up to date, 2 failed" in markdown
    mlflow = MlflowClient(tracking)
    pages = sorted(artifact.path for artifact in mlflow.list_artifacts(batch, SUMMARY_PAGES))
    assert pages == [f"{SUMMARY_PAGES}/page-002.md", f"{SUMMARY_PAGES}/page-003.md"]
    last = Path(mlflow.download_artifacts(batch, pages[-1], str(tmp_path / "pages"))).read_text()
    assert len([line for line in last.splitlines() if line.startswith("| item-")]) == 450 - 2 * PAGE_ROWS
    assert page.count("<img ") == 24  # of the 30 subjects with a grid, on the first page


def test_compare_over_60_runs_aggregates_its_plots_and_samples_the_best_and_worst(tmp_path, capsys):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _, runs = _subject_runs(tracking, tmp_path, 60, failed=set(), grids=0)
    assert compare_runs(tracking, tmp_path / "out", experiment="catalogue") == 0
    printed = capsys.readouterr().out
    assert len([line for line in printed.splitlines() if line.startswith("| `")]) == 40 and "... 22 more rows in" in printed  # 20 runs, 2 references
    assert len((tmp_path / "out" / "comparison.csv").read_text().splitlines()) == 1 + 60 + 2
    # No labelled run markers (RUN_COLOUR): a density of where the runs lie.
    target = np.array([int(RUN_COLOUR[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(tmp_path / "out" / "dino_vs_clip_t.png").convert("RGB"), dtype=np.int32)
    assert (np.abs(pixels - target).max(axis=2) < 40).sum() == 0
    assert ((pixels[..., 2] - pixels[..., 0]) > 60).sum() > 500  # the hexbin's blue cells (and its colour bar)
    assert "sample sheet: 24 of 60 runs (the 12 best and the 12 worst by DINO)" in printed
    # The sheet holds as many rows as a comparison of 24 runs does.
    assert compare_runs(tracking, tmp_path / "24", run_ids=runs[:24]) == 0
    assert Image.open(tmp_path / "out" / "sample_sheet.png").size == Image.open(tmp_path / "24" / "sample_sheet.png").size
