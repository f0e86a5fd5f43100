"""The compiled DAG, the command line's single stages, and one batch of LoRA runs (one per model family) through kfp.local."""

import json
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from mlflow.tracking import MlflowClient

from conftest import REPO, SAMPLE_SUBJECT, cli, dag_tasks, quick_config
from dreambooth.config import RunConfig, load_config
from dreambooth.config_files import CONFIG_DIR, merge_settings
from dreambooth.tracking import STAGE_SUBJECT, TAG_CONSENT, TAG_ERROR, TAG_GATE_REASON, TAG_IDENTIFIER, TAG_STAGE, TAG_SUBJECT, client
from dreambooth.storage import is_complete, read_text
from pipeline_checks import report_lines, subject_blocks


def _parents(tasks: dict, name: str) -> list[str]:
    """The groups (loops, conditions, exit handler) a task sits in, innermost first."""
    chain, component = [], tasks[name][0]
    while component != "root":
        group = next(task_name for task_name, (_, task) in tasks.items() if task["componentRef"]["name"] == component)
        chain.append(group)
        component = tasks[group][0]
    return chain


def test_compile_writes_a_batch_dag_priors_fan_out_before_subjects_fan_out(tmp_path):
    result = cli("compile", "--output", str(tmp_path / "dreambooth.yaml"), "--config", "sd15", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    spec = next(yaml.safe_load_all((tmp_path / "dreambooth.yaml").read_text()))
    json_format.ParseDict(spec, pipeline_spec_pb2.PipelineSpec())  # a valid KFP PipelineSpec
    tasks = dag_tasks(spec)

    priors_loop, subjects_loop = _parents(tasks, "class-priors")[0], _parents(tasks, "ingest")[0]
    for loop, items in ((priors_loop, "prior-groups"), (subjects_loop, "assign-priors")):
        assert tasks[loop][1]["parameterIterator"]["items"]["inputParameter"] == f"pipelinechannel--{items}-Output"
        assert tasks[loop][1]["iteratorPolicy"]["parallelismLimit"] == load_config("sd15").batch.parallelism
    assert tasks["assign-priors"][1]["dependentTasks"] == [priors_loop]  # fan-in of the priors (dsl.Collected)
    assert tasks[subjects_loop][1]["dependentTasks"] == ["assign-priors"]  # the subjects start after every prior
    assert tasks["summarize"][1]["dependentTasks"] == [subjects_loop]
    # Within a subject: each stage runs only when the one before succeeded for that subject.
    finetune_gate = tasks[_parents(tasks, "fine-tune")[0]][1]["triggerPolicy"]["condition"]
    assert finetune_gate == "inputs.parameter_values['pipelinechannel--ingest-Output'] == 'ok'"
    assert _parents(tasks, "samples") == _parents(tasks, "evaluate")
    assert "fine-tune-Output" in tasks[_parents(tasks, "evaluate")[0]][1]["triggerPolicy"]["condition"]
    assert "superres_enabled" in tasks[_parents(tasks, "super-resolution")[0]][1]["triggerPolicy"]["condition"]
    # Nothing to train: only the summary runs.
    assert "plan-batch-Output" in tasks[_parents(tasks, "summarize-2")[0]][1]["triggerPolicy"]["condition"]
    assert all(not task.get("cachingOptions", {}).get("enableCache") for _, task in tasks.values())

    closing = spec["root"]["dag"]["tasks"]["finish-tracking"]
    assert closing["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"  # runs even when a stage fails
    parameters = spec["root"]["inputDefinitions"]["parameters"]
    assert RunConfig.from_json(parameters["config_json"]["defaultValue"]) == load_config("sd15")
    assert {"subjects_uri", "subjects_json", "force", "superres_enabled"} <= set(parameters)
    # The settings people compare are run parameters of their own, typed, defaulting to the config's.
    typed = {name: (parameters[name]["parameterType"], parameters[name]["defaultValue"]) for name in
             ("base_model", "training_method", "max_steps", "learning_rate", "prior_loss_weight", "num_class_images", "resolution")}
    assert typed == {
        "base_model": ("STRING", "stable-diffusion-v1-5/stable-diffusion-v1-5"), "training_method": ("STRING", "full"),
        "max_steps": ("NUMBER_INTEGER", 1000), "learning_rate": ("NUMBER_DOUBLE", 5e-06), "prior_loss_weight": ("NUMBER_DOUBLE", 1.0),
        "num_class_images": ("NUMBER_INTEGER", 200), "resolution": ("NUMBER_INTEGER", 512),
    }
    plan_task = tasks["plan-batch"][1]["inputs"]["parameters"]  # the plan applies them over config_json
    assert plan_task["max_steps"]["componentInputParameter"] == "pipelinechannel--max_steps"


def test_ingest_alone_validates_an_upload(tmp_path):
    result = cli("ingest", "--config", "tiny", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                 "--output-dir", str(tmp_path / "checked"), cwd=tmp_path, in_process=False)  # the command's smoke test
    assert result.returncode == 0, result.stderr
    assert "identifier" in result.stdout
    assert json.loads((tmp_path / "checked" / "manifest.json").read_text())["class_noun"] == "dog"


def test_a_bad_upload_fails_in_one_line_before_any_task_starts(subject_dir, tmp_path):
    (subject_dir / "scan.pdf").write_bytes(b"%PDF-1.4 not an image")
    for command in ("ingest", "run"):
        result = cli(command, "--config", "tiny", "--subject-dir", str(subject_dir), "--class-noun", "dog",
                     "--output-dir", str(tmp_path / command), cwd=tmp_path)
        assert result.returncode == 2
        assert result.stderr.strip().splitlines() == [f"error: {subject_dir / 'scan.pdf'}: not an image Pillow can read"]
    assert not (tmp_path / "run" / "kfp").exists()


def test_an_evaluate_stopped_by_sigterm_leaves_no_run_running(tiny_model_dir, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    process = subprocess.Popen(
        [sys.executable, str(REPO / "pipeline.py"), "evaluate", "--config", "tiny", "--model", str(tiny_model_dir),
         "--identifier", "fqs", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
         "--output-dir", str(tmp_path / "out"), "--tracking-uri", store],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "mlflow.db").is_file() or not client(store).search_runs(  # client(): waits for the store's setup
        ["1"], f"tags.`{TAG_STAGE}` = 'evaluate' and attributes.status = 'RUNNING'"
    ):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.5)
    process.send_signal(signal.SIGTERM)  # e.g. a CI job cancelled mid-evaluation
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130 and stderr.strip().splitlines()[-1] == "error: evaluate: stopped by SIGTERM", stderr[-4000:]
    runs = MlflowClient(store).search_runs(["1"])
    assert {run.data.tags[TAG_STAGE] for run in runs} == {"batch", "subject", "evaluate"}
    for run in runs:
        assert run.info.status == "FAILED" and "stopped by SIGTERM" in run.data.tags[TAG_ERROR], run.data.tags


@pytest.mark.slow(seconds=40)
def test_a_local_run_stopped_by_sigterm_closes_its_runs_as_killed(tmp_path):
    """A CI job cancelled mid-fine-tune: the signal reaches the whole process group (the command and its
    kfp.local tasks); the batch run and the subject's run end KILLED with the reason, none stays RUNNING."""
    import os
    import signal
    import subprocess
    import sys
    import time

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = quick_config(tmp_path, superres=False, max_steps=400, checkpoint_every=400)
    process = subprocess.Popen(
        [sys.executable, str(REPO / "pipeline.py"), "run", "--config", config, "--subject-dir", str(SAMPLE_SUBJECT),
         "--class-noun", "dog", "--output-dir", str(tmp_path / "out"), "--tracking-uri", store],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    deadline = time.time() + 300
    while not (tmp_path / "mlflow.db").is_file() or not client(store).search_runs(
        ["1"], f"tags.`{TAG_STAGE}` = 'fine-tune' and attributes.status = 'RUNNING'"
    ):
        assert process.poll() is None and time.time() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.5)
    os.killpg(process.pid, signal.SIGTERM)
    _, stderr = process.communicate(timeout=180)
    assert process.returncode == 130, stderr[-4000:]
    runs = {run.data.tags[TAG_STAGE]: run for run in MlflowClient(store).search_runs(["1"])}
    assert runs["batch"].info.status == "KILLED" and "the local run was stopped by SIGTERM" in runs["batch"].data.tags[TAG_ERROR]
    assert runs["subject"].info.status == "KILLED" and "the pipeline ended (KILLED)" in runs["subject"].data.tags[TAG_ERROR]
    assert not [stage for stage, run in runs.items() if run.info.status == "RUNNING"]


def test_evaluate_alone_scores_a_model_trained_elsewhere(tiny_model_dir, tmp_path):
    result = cli("evaluate", "--config", "tiny", "--model", str(tiny_model_dir), "--identifier", "fqs",
                 "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--output-dir", str(tmp_path / "out"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# DreamBench evaluation: `fqs` dog" in result.stdout
    assert json.loads((tmp_path / "out" / "evaluation" / "evaluation.json").read_text())["identifier"] == "fqs"
    assert "quality gate: passed, registered as dreambooth-dog@candidate (version 1)" in result.stdout


LORA_SUBJECTS = {"person-sd": "tiny", "dog-sdxl": "tiny-sdxl", "dog-sd3": "tiny-sd3", "dog-flux": "tiny-flux",
                 "dog-flux2-klein": "tiny-flux2-klein", "dog-flux2": "tiny-flux2", "dog-z-image": "tiny-z-image",
                 "dog-qwen-image": "tiny-qwen-image"}
# The zero-shot baseline: FLUX.2 [dev] handed the dog's photos, no training (tests/test_baseline.py
# hands them to [klein]); the klein subject is gated against it (the margin lets random tiny weights
# through: the test is of the mechanism).
REFERENCE_MODEL = {"model": {"reference": "tiny://flux2"}}
REFERENCE_SUBJECT = {"id": "dog-reference", "config": "tiny-flux2-klein", "training": {"method": "reference"}}
AGAINST_REFERENCE = {"evaluation": {"gate": {"against": "reference", "reference_margin": -1.0}}}
# The flow-matching families train without class priors here: each class-priors task is a process that loads its
# family to draw 4 images (a minute of the batch for six families). Their prior-preservation loss and class examples
# are proven against their own pipelines (tests/training/test_recipes.py); sd and sdxl draw theirs in this batch.
WITHOUT_CLASS_PRIORS = {"dog-sd3", "dog-flux", "dog-flux2-klein", "dog-flux2", "dog-z-image", "dog-qwen-image"}
# Real photos of a person, every data and training option on at once (on sd).
PERSON_SETTINGS = {
    "subject": {"kind": "person", "face_crop_scale": 2.0},
    "data": {"buckets": True},
    "ingest": {"captioner": "tiny://captioner", "captioner_max_tokens": 6},
    # Prodigy's estimate starts at 1e-3: from its default 1e-6 it barely moves an adapter in 8 steps.
    "training": {"mask_weight": 0.2, "ema": {"decay": 0.9, "start_step": 2}, "optimizer": "prodigy", "learning_rate": 1.0,
                 "prodigy": {"d0": 1e-3}, "caption_dropout": 0.25},
}
# A person trains only with consent on record (photo: NASA, public domain; the field is what's tested).
PERSON_CONSENT = {"given_by": "Eileen Collins (NASA, public domain)", "given_on": "2026-11-02"}
PERSON_CAPTIONS = {"portrait.png": "a photo of {identifier} {class_noun} in a white spacesuit",
                   "landscape.png": "a {identifier} {class_noun} in front of a flag"}


def person_photos(folder: Path) -> Path:
    """scikit-image's astronaut, whole, as a 3:4 portrait and as a 16:9 landscape, each with her face;
    the portrait's caption beside it, the landscape's in the subjects file, the whole one's drafted."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True)
    photo = data.astronaut()
    Image.fromarray(photo).save(folder / "astronaut.png")
    Image.fromarray(photo[:, 60:444]).save(folder / "portrait.png")
    Image.fromarray(photo[:288]).save(folder / "landscape.png")
    (folder / "portrait.txt").write_text(PERSON_CAPTIONS["portrait.png"])
    return folder


@pytest.fixture(scope="session")  # session: a module fixture is set up again when a worker interleaves modules
def lora_batch(tmp_path_factory, gcs_emulator):
    """One batch, one subject per model family (its shipped tiny config as the subject's overrides), LoRA,
    its results written to a bucket (the GCS emulator); the sd subject is a person with every photo option on."""
    root = tmp_path_factory.mktemp("lora")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    config = quick_config(root, experiment="lora", superres=False, method="lora", learning_rate=1e-3,
                          validation_every=4, validation_images=1, validation_inference_steps=2)
    entries = []
    for subject, family in LORA_SUBJECTS.items():
        overrides = yaml.safe_load((CONFIG_DIR / f"{family}.yaml").read_text()) if family != "tiny" else {}
        overrides.pop("extends", None)
        if subject.startswith("person"):
            entries.append({"id": subject, "photos": str(person_photos(root / "photos" / subject)), "class_noun": "woman",
                            "captions": {"landscape.png": PERSON_CAPTIONS["landscape.png"]}, "consent": PERSON_CONSENT,
                            "overrides": merge_settings(overrides, PERSON_SETTINGS)})
            continue
        if subject == "dog-flux2-klein":
            overrides = merge_settings(overrides, {**REFERENCE_MODEL, **AGAINST_REFERENCE})
        if subject in WITHOUT_CLASS_PRIORS:
            overrides = merge_settings(overrides, {"priors": {"enabled": False}})
        entries.append({"id": subject, "photos": str(SAMPLE_SUBJECT), "class_noun": "dog", "overrides": overrides})
    baseline = yaml.safe_load((CONFIG_DIR / f"{REFERENCE_SUBJECT['config']}.yaml").read_text())
    baseline.pop("extends")
    entries.append({"id": REFERENCE_SUBJECT["id"], "photos": str(SAMPLE_SUBJECT), "class_noun": "dog",
                    "overrides": merge_settings(baseline, {**REFERENCE_MODEL, "training": REFERENCE_SUBJECT["training"]})})
    subjects = root / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({"subjects": entries}))
    result = cli("run", "--config", config, "--subjects", str(subjects), "--output-dir", f"gs://{gcs_emulator}/lora",
                 "--tracking-uri", tracking, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # kfp.local's folder was a staging folder: the task logs went to the bucket beside the results.
    logs = report_lines(result.stdout)["task logs"]
    assert logs.startswith(f"gs://{gcs_emulator}/lora/dreambooth-") and logs.endswith("/logs")
    assert is_complete(logs) and "Executing task" in read_text(f"{logs}/dog-flux/fine-tune.log")
    return root, tracking, subject_blocks(result.stdout), {entry["id"]: entry["overrides"] for entry in entries}, gcs_emulator


@pytest.mark.slow(seconds=150)
@pytest.mark.xdist_group("lora-batch")  # one worker: the three share the batch (a module fixture)
@pytest.mark.parametrize("subject", list(LORA_SUBJECTS))
def test_a_lora_run_goes_through_every_stage_and_registers_megabytes(lora_batch, subject):
    """SD, SDXL and Flux: LoRA through every stage, an adapter diffusers loads, registered with MLflow's flavour."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from google.cloud import storage

    from transformers import AutoTokenizer

    from dreambooth.models.loading import LORA_WEIGHTS, has_text_only_processor, resolve_model_source
    from dreambooth.storage import COMPLETE_MARKER, local_folder

    root, tracking, blocks, overrides, bucket = lora_batch
    printed = blocks[subject]
    assert printed["quality gate"].startswith("passed")  # samples and evaluation ran on base + adapter

    # The results went to the bucket, each folder complete, and the adapter loads from there.
    adapter_uri = printed["model"]
    assert adapter_uri.startswith(f"gs://{bucket}/lora/dreambooth-") and adapter_uri.endswith(f"/{subject}/model")
    assert is_complete(adapter_uri) and printed["sample grid"].endswith(f"/{subject}/samples/samples-grid.png")
    subject_folder = adapter_uri.removeprefix(f"gs://{bucket}/").removesuffix("/model")
    stored = {blob.name for blob in storage.Client().list_blobs(bucket, prefix=f"{subject_folder}/")}
    for expected in (f"model/{LORA_WEIGHTS}", "samples/samples-grid.png", "evaluation/report.md", f"model/{COMPLETE_MARKER}"):
        assert f"{subject_folder}/{expected}" in stored
    assert not [name for name in stored if "/model/unet/" in name or "/model/transformer/" in name]  # the adapter alone

    # diffusers' own loader applies it on the base, and it changes the image
    base_dir = resolve_model_source(overrides[subject].get("model", {}).get("base", load_config("tiny").model.base))
    text_only = has_text_only_processor(base_dir)  # FLUX.2 [dev]: its PixtralProcessor needs torchvision
    base = DiffusionPipeline.from_pretrained(base_dir, **({"tokenizer": None} if text_only else {}))
    if text_only:  # what the project's loader does: the processor's tokenizer alone
        base.register_modules(tokenizer=AutoTokenizer.from_pretrained(base_dir, subfolder="tokenizer"))
    draw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    plain = base(prompt="a dog", generator=torch.Generator().manual_seed(0), **draw).images[0]
    with local_folder(adapter_uri, require_complete=True) as adapter:
        base.load_lora_weights(adapter)
    adapted = base(prompt="a dog", generator=torch.Generator().manual_seed(0), **draw).images[0]
    assert np.abs(adapted - plain).max() > 1e-4  # the same seed: the base alone draws the same image to the bit

    import mlflow

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("lora").experiment_id
    (fine_tune,) = client.search_runs([experiment], f"tags.`{TAG_STAGE}` = 'fine-tune' and tags.`{TAG_SUBJECT}` = '{subject}'")
    validation = [a.path for a in client.list_artifacts(fine_tune.info.run_id, "images") if "validation" in a.path]
    assert sorted(int(path.split("+step+")[1].split("+")[0]) for path in validation if path.endswith(".png")) == [4, 8]
    name = f"dreambooth-{subject}"
    version = client.get_model_version_by_alias(name, "candidate")
    mlflow.set_tracking_uri(tracking)
    downloaded = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/{version.version}", dst_path=str(root / "registered" / subject)))
    # MLflow's own LoRA flavour; FLUX.2 [dev]'s base needs this package's loader without torchvision
    flavour = "python_function" if text_only else "diffusers"
    assert set(yaml.safe_load((downloaded / "MLmodel").read_text())["flavors"]) == {flavour} | {"python_function"}
    weights = list(downloaded.rglob("*.safetensors"))
    assert [path.name for path in weights] == [LORA_WEIGHTS]  # the adapter, never the base's weights
    if not text_only:  # (a pyfunc also carries this package's code, more than a tiny base weighs)
        registered_bytes = sum(p.stat().st_size for p in downloaded.rglob("*") if p.is_file())
        full_bytes = sum(p.stat().st_size for p in Path(base_dir).rglob("*") if p.is_file())
        assert registered_bytes < 0.05 * full_bytes, (registered_bytes, full_bytes)


@pytest.mark.slow(seconds=5)
@pytest.mark.xdist_group("lora-batch")
def test_the_reference_baseline_is_a_row_of_its_own_and_the_fine_tuned_model_is_gated_against_it(lora_batch):
    """FLUX.2 [dev] drawing from the dog's photos, untrained: scored on the same protocol, a summary
    row with all five metrics; the klein LoRA subject scored it beside itself and was gated on it."""
    root, tracking, blocks, overrides, bucket = lora_batch
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("lora").experiment_id
    (batch,) = client.search_runs([experiment], f"tags.`{TAG_STAGE}` = 'batch'")
    table = json.loads(Path(client.download_artifacts(batch.info.run_id, "batch_summary.json", str(root / "summary"))).read_text())
    rows = {row[table["columns"].index("subject")]: dict(zip(table["columns"], row)) for row in table["data"]}
    baseline = rows["dog-reference"]
    assert all(0 <= baseline[name] <= 1 for name in ("dino", "clip_i", "clip_t", "pres", "div")), baseline
    assert baseline["steps"] == 0 and blocks["dog-reference"]["quality gate"].startswith("passed")

    def subject_run(subject):
        (run,) = client.search_runs([experiment], f"tags.`{TAG_STAGE}` = 'subject' and tags.`{TAG_SUBJECT}` = '{subject}'")
        return run

    reference_run, klein_run = subject_run("dog-reference"), subject_run("dog-flux2-klein")
    assert reference_run.data.params["training.method"] == "reference"
    assert reference_run.data.tags[TAG_IDENTIFIER] == ""  # its prompts name no token: the photos say which dog
    # Scored beside the fine-tuned model on the same prompts and seeds: the same figures as its own row.
    for name in ("dino", "clip_i", "clip_t", "pres", "div"):
        assert klein_run.data.metrics[f"reference/{name}"] == pytest.approx(reference_run.data.metrics[f"eval/{name}"], abs=1e-6), name
    assert klein_run.data.tags[TAG_GATE_REASON].startswith("beat the reference baseline: DINO ")


@pytest.mark.slow(seconds=40)
@pytest.mark.xdist_group("lora-batch")
def test_every_registered_adapter_generates_where_the_repository_is_not(lora_batch):
    """One process that cannot import this repository loads each family's adapter from the registry
    (MLflow's diffusers flavour: MLflow and diffusers alone) and draws with it."""
    from conftest import run_without_repository

    root, tracking, blocks, overrides, bucket = lora_batch
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    names = [f"dreambooth-{subject}" for subject in LORA_SUBJECTS]
    loaded = run_without_repository(LOAD_ADAPTERS_ELSEWHERE.format(tracking=tracking, names=names), elsewhere)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert [line for line in loaded.stdout.splitlines() if line.startswith("generated")] == \
        [f"generated {name} (64, 64)" for name in names]


@pytest.mark.slow(seconds=150)
@pytest.mark.xdist_group("lora-batch")
@pytest.mark.parametrize("subject", ["person-sd"])  # one family carries the person and photo options
def test_a_person_trains_in_buckets_with_her_captions_and_records_masks_ema_and_prodigy(lora_batch, subject):
    """What the run recorded: each photo's face crop and bucket, the captions the text encoder got, and the mask, EMA and
    Prodigy settings it trained with (what each does is proven where it runs: tests/training/test_losses.py masks,
    tests/training/test_loop.py EMA and Prodigy)."""
    root, tracking, blocks, overrides, bucket = lora_batch
    assert blocks[subject]["quality gate"].startswith("passed")
    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("lora").experiment_id

    def stage_run(stage):
        (run,) = client.search_runs([experiment], f"tags.`{TAG_STAGE}` = '{stage}' and tags.`{TAG_SUBJECT}` = '{subject}'")
        return run

    def artifact(run, name):
        return json.loads(Path(client.download_artifacts(run.info.run_id, name, str(root / "downloads" / subject / run.info.run_id))).read_text())

    # Her consent, on the subject's run (without it, the plan refuses her: tests/catalogue/test_planning.py)
    assert stage_run(STAGE_SUBJECT).data.tags[TAG_CONSENT] == f"given by {PERSON_CONSENT['given_by']} on {PERSON_CONSENT['given_on']}"
    ingest = stage_run("ingest")
    photos = artifact(ingest, "photos.json")
    assert photos["columns"] == ["photo", "bucket", "caption"]
    rows = {row[0]: row[1:] for row in photos["data"]}
    width, height = (int(side) for side in rows["portrait.png"][0].split("x"))
    assert width < height  # the portrait crop around her face trains in a tall bucket...
    width, height = (int(side) for side in rows["landscape.png"][0].split("x"))
    assert width > height  # ...the landscape in a wide one
    manifest = artifact(ingest, "manifest.json")
    identifier = manifest["identifier"]["identifier"]
    assert all(entry["face"] and entry["mask"] for entry in manifest["images"])  # a face, its box the mask
    captions = {name: template.format(identifier=identifier, class_noun="woman") for name, template in PERSON_CAPTIONS.items()}
    assert rows["portrait.png"][1] == captions["portrait.png"] and rows["landscape.png"][1] == captions["landscape.png"]
    drafted = rows["astronaut.png"][1]
    assert drafted.startswith(f"a {identifier} woman, ") or f"{identifier} woman" in drafted  # the captioner's, with [V]

    fine_tune = stage_run("fine-tune")
    prompts = artifact(fine_tune, "training_prompts.json")
    trained = {row[0]: row[1] for row in prompts["data"]}
    assert set(trained) == {captions["portrait.png"], captions["landscape.png"], drafted, f"a {identifier} woman"}
    params = client.get_run(fine_tune.data.tags["mlflow.parentRunId"]).data.params  # the subject run holds every setting
    assert params["training.optimizer"] == "prodigy" and params["training.mask_weight"] == "0.2" and params["training.ema.decay"] == "0.9"


LOAD_ADAPTERS_ELSEWHERE = """
import io
import mlflow, pandas as pd
from PIL import Image
mlflow.set_tracking_uri({tracking!r})
for name in {names!r}:
    model = mlflow.pyfunc.load_model(f"models:/{{name}}@candidate")
    out = model.predict(pd.DataFrame({{"prompt": ["a dog on the beach"]}}), params={{"num_inference_steps": 2, "height": 64, "width": 64}})
    png = out["image_png"][0] if hasattr(out, "columns") else out[0]  # this package's pyfunc, or MLflow's diffusers flavour
    print("generated", name, Image.open(io.BytesIO(png)).size)
"""
