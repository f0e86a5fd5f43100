"""Whole batches through kfp.local on the tiny model, tracked in the default local MLflow store.

Three subjects of two classes (one held back by a strict quality gate); the same batch again
(nothing to train, printed verbosely); one subject's photos changed (only it trains) beside two
subjects that fail alone; a subjects file full of mistakes; and `compare` over the first batch.
"""

import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image

from conftest import SAMPLE_OBJECT, SAMPLE_SUBJECT, cli, copy_photos, quick_config, stage_states, with_notify
from dreambooth.reports.compare import RUN_COLOUR
from dreambooth.images import GRID_LABEL_HEIGHT, MIN_GRID_CELL
from dreambooth.tracking import (
    TAG_ERROR,
    TAG_FAILED_STAGE,
    TAG_GATE,
    TAG_GATE_REASON,
    TAG_JOB_NAME,
    TAG_PARENT,
    TAG_REGISTERED,
    TAG_STAGE,
    TAG_SUBJECT,
    TAG_SUBJECT_STATUS,
)
from pipeline_checks import SUBJECT_STAGES, check_kfp_outputs, check_kfp_pages, check_tracked_subject, report_lines, subject_blocks

# One worker runs the module: its tests share the first batch's runs (module fixtures).
pytestmark = [pytest.mark.slow(seconds=240), pytest.mark.xdist_group("batch-pipeline")]

SUBJECTS = {"dog-a": ("dog", ["00.jpg", "01.jpg", "02.jpg"]), "dog-b": ("dog", ["01.jpg", "02.jpg", "03.jpg"]), "backpack": ("backpack", None)}
STRICT_GATE = {"min_dino": 2.0, "min_clip_t": -1.0, "max_pres": 1.0}  # no model reaches DINO 2: rejected


def _environment():
    # The default store: ./mlflow.db in the working folder, written by parallel tasks at once.
    return {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}


def _first_batch_entries(moved: tuple[str, str] = ("", "")) -> list[dict]:
    """The three subjects, the backpack under a strict gate; `moved`: (a subject, its new photo folder)."""
    entries = [{"id": subject, "photos": f"photos/{moved[1] if subject == moved[0] else subject}", "class_noun": noun}
               for subject, (noun, _) in SUBJECTS.items()]
    entries[-1]["overrides"] = {"evaluation": {"gate": STRICT_GATE}}
    return entries


def _write_subjects(root: Path, entries: list[dict], name="subjects.yaml") -> Path:
    path = root / name
    path.write_text(yaml.safe_dump({"subjects": entries}))
    return path


def _run_batch(root: Path, config: str, subjects: Path, *extra):
    started = time.perf_counter()
    result = cli("run", "--config", config, "--subjects", str(subjects), "--output-dir", str(root / "out"), *extra,
                 cwd=root, env=_environment())
    return result, time.perf_counter() - started


def _client(root: Path) -> MlflowClient:
    return MlflowClient(f"sqlite:///{root / 'mlflow.db'}")


def _runs(client, experiment: str, filter_string: str):
    found = client.get_experiment_by_name(experiment)
    return client.search_runs([found.experiment_id], filter_string, max_results=1000)


def _batch_of(client, stdout: str, experiment="dreambooth"):
    job = next(line.split(":", 1)[1].strip() for line in stdout.splitlines() if line.startswith("job:"))
    (batch,) = _runs(client, experiment, f"tags.`{TAG_JOB_NAME}` = '{job}' and tags.`{TAG_STAGE}` = 'batch'")
    return batch


def _summary(client, batch) -> list[dict]:
    table = json.loads(Path(client.download_artifacts(batch.info.run_id, "batch_summary.json")).read_text())
    columns, rows = table["columns"], table["data"]
    return [dict(zip(columns, row)) for row in rows]


# Session scope, and one worker for the module (xdist_group): a module fixture is set up again
# whenever a worker runs another module's test in between, and these are whole batches.
@pytest.fixture(scope="session")
def batch_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("batch")
    for subject, (_, names) in SUBJECTS.items():
        if names:
            copy_photos(SAMPLE_SUBJECT, root / "photos" / subject, names)
        else:
            shutil.copytree(SAMPLE_OBJECT, root / "photos" / subject)
    subjects = _write_subjects(root, _first_batch_entries())
    config = quick_config(root, superres=False)
    return root, config, subjects


@pytest.fixture(scope="session")
def first_batch(batch_root):
    root, config, subjects = batch_root
    result, seconds = _run_batch(root, config, subjects)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result, seconds


def test_a_batch_generates_class_priors_once_per_class_and_tracks_each_subject(batch_root, first_batch):
    root, _, _ = batch_root
    result, _ = first_batch
    assert "database is locked" not in result.stdout + result.stderr  # parallel subjects share one sqlite store
    assert (root / "mlflow.db").is_file()  # no tracking URI set: a local store in the working folder
    client = _client(root)
    batch = _batch_of(client, result.stdout)
    assert report_lines(result.stdout)["mlflow run"].startswith(batch.info.run_id)

    # Two classes, so two prior groups: what the class-priors stages did, not what the config says.
    priors = _runs(client, "dreambooth", f"tags.`{TAG_PARENT}` = '{batch.info.run_id}' and tags.`{TAG_STAGE}` = 'class-priors'")
    assert sorted(run.data.tags["dreambooth.class_noun"] for run in priors) == ["backpack", "dog"]
    assert [run.data.metrics["class_images_generated"] for run in priors] == [4.0, 4.0]
    caches = sorted((root / "out" / "work" / "class-priors").iterdir())
    assert [len(list(cache.glob("*.png"))) for cache in caches] == [4, 4]  # each class's images, drawn once, in its cache

    subjects = _runs(client, "dreambooth", f"tags.`{TAG_PARENT}` = '{batch.info.run_id}' and tags.`{TAG_STAGE}` = 'subject'")
    assert sorted(run.data.tags[TAG_SUBJECT] for run in subjects) == sorted(SUBJECTS)
    printed = subject_blocks(result.stdout)
    for subject in subjects:
        name = subject.data.tags[TAG_SUBJECT]
        assert subject.info.status == "FINISHED" and subject.data.tags[TAG_SUBJECT_STATUS] == "trained"
        assert printed[name]["mlflow run"] == subject.info.run_id
        stages = _runs(client, "dreambooth", f"tags.`{TAG_PARENT}` = '{subject.info.run_id}'")
        assert sorted(run.data.tags[TAG_STAGE] for run in stages) == ["evaluate", "fine-tune", "ingest", "samples"]
        fine_tune = next(run for run in stages if run.data.tags[TAG_STAGE] == "fine-tune")
        assert [m.step for m in client.get_metric_history(fine_tune.info.run_id, "loss")] == list(range(1, 9))
        assert "eval/dino" in subject.data.metrics
    check_tracked_subject(client, printed["dog-a"]["mlflow run"])

    # The quality gate: the dogs passed and were registered; the backpack's own strict gate held it back.
    by_name = {run.data.tags[TAG_SUBJECT]: run for run in subjects}
    for name in ("dog-a", "dog-b"):
        assert by_name[name].data.tags[TAG_GATE] == "passed" and by_name[name].data.tags[TAG_REGISTERED].endswith("(version 1)")
    rejected = by_name["backpack"]
    assert rejected.data.tags[TAG_GATE] == "rejected" and rejected.data.tags[TAG_GATE_REASON].startswith("DINO")
    assert TAG_REGISTERED not in rejected.data.tags
    assert sorted(model.name for model in client.search_registered_models()) == ["dreambooth-dog-a", "dreambooth-dog-b"]
    assert printed["backpack"]["quality gate"].startswith("rejected (DINO")

    rows = _summary(client, batch)
    assert [row["subject"] for row in rows] == list(SUBJECTS)  # the subjects file's order
    assert {row["status"] for row in rows} == {"trained"} and all(row["steps"] == 8 for row in rows)
    # What it took: each subject's stages summed, and on the batch its subjects' and its class priors'
    assert all(row["accelerator_seconds"] > 0 for row in rows)
    assert batch.data.metrics["cost/accelerator_seconds"] > sum(row["accelerator_seconds"] for row in rows)
    assert batch.info.status == "FINISHED"

    # KFP: the summary as Markdown, and as HTML with every subject's sample grid inline.
    job_dir = next((root / "out" / "kfp").glob(f"{batch.data.tags[TAG_JOB_NAME]}*"))
    markdown = (job_dir / "summarize" / "summary").read_text()
    assert "3 subjects: 3 trained, 0 up to date, 0 failed" in markdown and markdown.count("**trained**") == 3
    page = (job_dir / "summarize" / "summary_page").read_text()
    assert page.count('src="data:image/jpeg;base64,') == 3
    # Each subject's evaluation and pages in its loop iteration's outputs.
    dog_a = Path(printed["dog-a"]["model"]).parent.parent
    check_kfp_outputs(dog_a)
    check_kfp_pages(dog_a, superres=False)
    backpack = Path(printed["backpack"]["model"]).parent.parent
    assert "**rejected** - DINO" in (backpack / "evaluate" / "report").read_text()


def test_the_batch_prints_one_line_per_stage_change_and_keeps_each_tasks_log(batch_root, first_batch):
    root, _, _ = batch_root
    result, _ = first_batch
    assert "upscaler" not in subject_blocks(result.stdout)["dog-a"]  # superres.enabled: false, so the DAG skipped the stage
    # Not a terminal: one line per stage state change, none of kfp.local's stream; each task's log in a file.
    states = stage_states(result.stdout)
    assert states == {
        ("batch", "plan-batch"): ["running", "done"],
        **{(f"class:{noun}", "class-priors"): ["running", "done"] for noun in ("dog", "backpack")},
        **{(subject, stage): ["running", "done"] for subject in SUBJECTS for stage in SUBJECT_STAGES},
        ("batch", "summarize"): ["running", "done"], ("batch", "finish-tracking"): ["running", "done"],
    }
    where, progress = result.stdout.split("\njob:")[0].splitlines()[:2], result.stdout.split("\njob:")[0].splitlines()[2:]
    # First where its state goes (the default store: the working folder's), then a line per stage state change.
    assert where == [f"outputs:      {root / 'out'}", f"tracking:     sqlite:///{root / 'mlflow.db'} (experiment 'dreambooth')"]
    assert [line for line in progress if not re.match(r"\d\d:\d\d:\d\d  \S+ +\S+ ", line)] == []
    assert "Executing task" not in result.stdout and "executor_input" not in result.stdout
    done = next(line for line in progress if re.search(r" dog-a +fine-tune +done ", line))
    assert re.search(r"step 8/8 · loss \d\.\d{4}", done), done

    logs = Path(report_lines(result.stdout)["task logs"])
    assert "Got executor_input" in (logs / "dog-a" / "fine-tune.log").read_text()
    assert "Executing task 'ingest'" in (logs / "dog-a" / "ingest.log").read_text()
    assert "Executing task 'fine-tune'" not in (logs / "dog-a" / "ingest.log").read_text()
    assert "[progress] dog-a evaluate done" in (logs / "dog-a" / "evaluate.log").read_text()
    assert (logs / "pipeline.log").read_text().count("Executing task") == 5 + 2 + 3 * len(SUBJECT_STAGES)  # batch, priors, subjects

    from diffusers import DiffusionPipeline

    model = subject_blocks(result.stdout)["dog-a"]["model"]
    image = DiffusionPipeline.from_pretrained(model)("a dog", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)


def test_the_same_batch_again_trains_nothing(batch_root, first_batch):
    root, config, subjects = batch_root
    _, first_seconds = first_batch
    result, seconds = _run_batch(root, config, subjects, "--verbose")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    assert "dog-a (dog): up to date" in result.stdout
    # --verbose: everything, as kfp.local prints it.
    assert "Executing task" in result.stdout and "Got executor_input" in result.stdout
    client = _client(root)
    rows = _summary(client, _batch_of(client, result.stdout))
    assert [row["status"] for row in rows] == ["up to date"] * 3
    assert len(_runs(client, "dreambooth", f"tags.`{TAG_STAGE}` = 'fine-tune'")) == 3  # still only the first batch's
    print(f"first batch {first_seconds:.0f} s, the same batch again {seconds:.0f} s")
    assert seconds < 0.5 * first_seconds


def test_changed_photos_retrain_only_that_subject_and_failing_subjects_end_alone(batch_root, first_batch, webhooks):
    root, config, _ = batch_root
    hooks, received = webhooks
    notifying = with_notify(str(shutil.copy(config, root / "notify.yaml")), {"url": f"{hooks}/batch"})
    # dog-b's photos change from 01, 02, 03 to 00, 01, 02 (a new folder: the first batch's stay as they were).
    copy_photos(SAMPLE_SUBJECT, root / "photos" / "dog-b-changed", ["00.jpg", "01.jpg", "02.jpg"])
    entries = _first_batch_entries(("dog-b", "dog-b-changed"))
    # Two new subjects that fail, each alone: a photo that is no image, and a learning rate that diverges.
    corrupt = copy_photos(SAMPLE_SUBJECT, root / "photos" / "corrupt", ["00.jpg", "01.jpg", "02.jpg"])
    (corrupt / "scan.jpg").write_bytes(b"%PDF-1.4 not an image")
    entries += [{"id": "corrupt", "photos": "photos/corrupt", "class_noun": "dog"},
                {"id": "diverging", "photos": "photos/dog-a", "class_noun": "dog", "overrides": {"training": {"learning_rate": 1.0e30}}}]
    result, _ = _run_batch(root, notifying, _write_subjects(root, entries, name="changed.yaml"))
    assert result.returncode == 1, result.stdout[-4000:] + result.stderr[-4000:]
    error = result.stderr.strip().splitlines()[-1]
    assert error.startswith("error: 2 of 5 subjects failed: corrupt at ingest:") and "diverging at fine-tune: training stopped at step" in error
    client = _client(root)
    batch = _batch_of(client, result.stdout)
    rows = {row["subject"]: row for row in _summary(client, batch)}
    assert {name: row["status"] for name, row in rows.items()} == {
        "dog-a": "up to date", "dog-b": "trained", "backpack": "up to date", "corrupt": "failed", "diverging": "failed"
    }
    # Its class priors come from yesterday's cache: nothing generated.
    (priors,) = _runs(client, "dreambooth", f"tags.`{TAG_PARENT}` = '{batch.info.run_id}' and tags.`{TAG_STAGE}` = 'class-priors'")
    assert priors.data.metrics["class_images_generated"] == 0

    # Runs on the same photos share their input's digest, across batches and names: MLflow finds them by it.
    # dog-a has 00, 01, 02; dog-b had 01, 02, 03, and now 00, 01, 02 as well; diverging trained on photos/dog-a.
    dog_a = _runs(client, "dreambooth", f"tags.`{TAG_SUBJECT}` = 'dog-a' and tags.`{TAG_STAGE}` = 'subject'")[0]
    digest = dog_a.inputs.dataset_inputs[0].dataset.digest
    same_photos = _runs(client, "dreambooth", f"dataset.digest = '{digest}' and tags.`{TAG_STAGE}` = 'subject'")
    assert sorted(run.data.tags[TAG_SUBJECT] for run in same_photos) == ["diverging", "dog-a", "dog-b"]
    dog_b = _runs(client, "dreambooth", f"tags.`{TAG_SUBJECT}` = 'dog-b' and tags.`{TAG_STAGE}` = 'subject'")
    assert sorted(run.inputs.dataset_inputs[0].dataset.digest == digest for run in dog_b) == [False, True]
    assert client.get_run(rows["dog-b"]["mlflow_run"]).inputs.dataset_inputs[0].dataset.digest == digest

    # The compact view: the failed stages, the stages after them skipped, and each failure's last log lines.
    states = stage_states(result.stdout)
    assert states[("corrupt", "ingest")] == ["running", "failed"] and states[("corrupt", "fine-tune")] == ["skipped"]
    assert states[("diverging", "fine-tune")] == ["running", "failed"] and states[("diverging", "evaluate")] == ["skipped"]
    assert states[("dog-b", "evaluate")] == ["running", "done"]
    printed = result.stdout.splitlines()
    tail = printed.index("--- corrupt ingest failed; the last lines of its log:")
    log = Path(next(line for line in printed[tail:] if line.startswith("--- full log: ")).removeprefix("--- full log: "))
    assert any("scan.jpg: not an image Pillow can read" in line for line in printed[tail:tail + 16])
    assert log.parts[-2:] == ("corrupt", "ingest.log") and "scan.jpg: not an image Pillow can read" in log.read_text()

    assert rows["corrupt"]["reason"] == f"ingest: {corrupt / 'scan.jpg'}: not an image Pillow can read"
    assert rows["diverging"]["reason"].startswith("fine-tune: training stopped at step")
    failed = client.get_run(rows["diverging"]["mlflow_run"])
    assert failed.info.status == "FAILED" and failed.data.tags[TAG_FAILED_STAGE] == "fine-tune" and "loss is" in failed.data.tags[TAG_ERROR]
    assert client.get_run(rows["dog-b"]["mlflow_run"]).info.status == "FINISHED"
    assert client.get_run(batch.info.run_id).info.status == "FAILED"

    # The webhook heard the same: two of five failed, each with its reason, the others with their figures.
    ((_, report),) = received
    assert report["succeeded"] is False and report["counts"] == {"trained": 1, "failed": 2, "up to date": 2}
    told = {subject["subject"]: subject for subject in report["subjects"]}
    assert told["corrupt"]["reason"] == rows["corrupt"]["reason"] and told["diverging"]["status"] == "failed"
    assert told["dog-b"]["gate"] == "passed" and "clip_t" in told["dog-b"]["metrics"]
    assert told["diverging"]["reason"].startswith("fine-tune: training stopped at step")
    assert report["text"].startswith(f"DreamBooth batch {report['job_name']} ended ")
    assert states[("batch", "notify")] == ["done"]


def _marker_blobs(png: Path, colour: str) -> int:
    from scipy import ndimage

    target = np.array([int(colour[i : i + 2], 16) for i in (1, 3, 5)])
    pixels = np.asarray(Image.open(png).convert("RGB"), dtype=np.int32)
    mask = np.abs(pixels - target).max(axis=2) < 40
    labels, count = ndimage.label(mask)
    sizes = ndimage.sum(mask, labels, range(1, count + 1))
    return int((np.asarray(sizes) >= 20).sum())


def test_compare_over_the_batch_renders_a_table_plots_and_an_image_sheet(batch_root, first_batch):
    root, _, _ = batch_root
    result, _ = first_batch
    client = _client(root)
    batch = _batch_of(client, result.stdout)
    compared = cli("compare", "--batch-run", batch.info.run_id, "--output-dir", str(root / "compare"), cwd=root, env=_environment(),
                   in_process=False)  # the command's smoke test
    assert compared.returncode == 0, compared.stderr[-3000:]
    out = root / "compare"
    table = (out / "comparison.csv").read_text().splitlines()
    assert len(table) == 1 + 3 + 2  # header, three runs, the paper's two reference rows
    assert "paper: DreamBooth (Stable Diffusion)" in (out / "comparison.md").read_text()
    for png in ("dino_vs_clip_t.png", "metrics_per_subject.png", "dino_vs_cost.png", "sample_sheet.png"):
        assert np.asarray(Image.open(out / png).convert("L")).std() > 5  # not blank
    assert _marker_blobs(out / "dino_vs_clip_t.png", RUN_COLOUR) == 3
    assert _marker_blobs(out / "metrics_per_subject.png", RUN_COLOUR) == 3 * 5
    assert _marker_blobs(out / "dino_vs_cost.png", RUN_COLOUR) == 3  # quality against accelerator-seconds (no prices set)
    # The sheet: a row per run, a tile per sample prompt, each tile the fine-tuned sample (not a placeholder).
    sheet = np.asarray(Image.open(out / "sample_sheet.png").convert("RGB"), dtype=np.float32)
    row_height = MIN_GRID_CELL + 2 * GRID_LABEL_HEIGHT
    assert sheet.shape[:2] == (3 * row_height, 2 * MIN_GRID_CELL)
    for r in range(3):
        for c in range(2):
            tile = sheet[r * row_height + 2 * GRID_LABEL_HEIGHT : (r + 1) * row_height, c * MIN_GRID_CELL : (c + 1) * MIN_GRID_CELL]
            assert tile.std() > 10
    (comparison,) = _runs(client, "dreambooth", f"tags.`{TAG_STAGE}` = 'compare'")
    assert {"comparison.md", "sample_sheet.png"} <= {a.path for a in client.list_artifacts(comparison.info.run_id)}


def test_a_subjects_file_with_five_mistakes_gives_five_lines_and_starts_nothing(tmp_path):
    copy_photos(SAMPLE_SUBJECT, tmp_path / "photos" / "dog-a", ["00.jpg", "01.jpg", "02.jpg"])
    subjects = _write_subjects(tmp_path, [
        {"id": "dog-a", "photos": "photos/dog-a", "class_noun": "dog"},
        {"id": "dog-a", "photos": "photos/dog-a", "class_noun": "dog"},
        {"id": "../escape", "photos": "photos/dog-a", "class_noun": "dog"},
        {"id": "no-photos", "class_noun": "dog"},
        {"id": "colour", "photos": "photos/dog-a", "class_noun": "dog", "colour": "grey"},
        {"id": "clash", "photos": "photos/dog-a", "class_noun": "dog", "identifier": "dog"},
    ])
    result = cli("run", "--config", "tiny", "--subjects", str(subjects), "--output-dir", str(tmp_path / "out"),
                 cwd=tmp_path, env=_environment(), timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 5 and all(line.startswith(f"error: {subjects}: entry ") for line in lines)
    for expected in ("entry 2 (dog-a): id: duplicate of entry 1", "entry 3 (../escape): id: '../escape' cannot be a folder",
                     "entry 4 (no-photos): photos: missing", "entry 5 (colour): colour: unknown field",
                     "entry 6 (clash): identifier: 'dog' is the class noun"):
        assert any(expected in line for line in lines), expected
    assert not (tmp_path / "out").exists() and not (tmp_path / "mlflow.db").exists()
