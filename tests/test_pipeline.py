"""pipeline.py: the compiled DAG, the command line, and whole single-subject runs through kfp.local."""

import json
import os
import re
from pathlib import Path

import pytest
import yaml
from google.protobuf import json_format
from kfp.pipeline_spec import pipeline_spec_pb2
from mlflow.tracking import MlflowClient

from conftest import REPO, SAMPLE_SUBJECT, _free_port, cli, dag_tasks, quick_config, stage_states, with_notify
from dreambooth.config import CONFIG_DIR, RunConfig, load_config
from dreambooth.tracking import TAG_ERROR, TAG_GATE, TAG_GATE_REASON, TAG_MODEL_URI, TAG_PARENT, TAG_STAGE, TAG_SUBJECT, client


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


SUBJECT_STAGES = ["ingest", "fine-tune", "samples", "evaluate"]
SUPERRES_STAGES = ["super-resolution", "evaluate-upscaled"]


def _subject_lines(stdout: str) -> dict:
    """The indented `label: value` lines `run` prints under a subject."""
    return {key.strip(): value.strip() for key, value in
            (line.split(":", 1) for line in stdout.splitlines() if line.startswith("  ") and ":" in line)}


def _check_tracked_run(client, experiment_name="dreambooth", steps=8, stages=tuple(SUBJECT_STAGES)):
    """batch run -> class-priors run and the subject's run -> one run per stage, each with what users compare."""
    experiment = client.get_experiment_by_name(experiment_name)
    (batch,) = client.search_runs([experiment.experiment_id], f"tags.`{TAG_STAGE}` = 'batch'")
    assert batch.info.status == "FINISHED"
    below_batch = client.search_runs([experiment.experiment_id], f"tags.`{TAG_PARENT}` = '{batch.info.run_id}'")
    assert sorted(run.data.tags[TAG_STAGE] for run in below_batch) == ["class-priors", "subject"]
    priors = next(run for run in below_batch if run.data.tags[TAG_STAGE] == "class-priors")
    assert "class-priors-preview.png" in {a.path for a in client.list_artifacts(priors.info.run_id)}
    subject = next(run for run in below_batch if run.data.tags[TAG_STAGE] == "subject")
    assert subject.info.status == "FINISHED"
    children = client.search_runs([experiment.experiment_id], f"tags.`{TAG_PARENT}` = '{subject.info.run_id}'")
    assert sorted(run.data.tags[TAG_STAGE] for run in children) == sorted(stages)
    assert all(run.info.status == "FINISHED" for run in children)
    fine_tune = next(run for run in children if run.data.tags[TAG_STAGE] == "fine-tune")
    for curve in ("loss", "instance_loss", "prior_loss", "lr"):
        assert [m.step for m in client.get_metric_history(fine_tune.info.run_id, curve)] == list(range(1, steps + 1))
    assert "train_steps_per_second" in subject.data.metrics
    assert subject.data.params["model.base"] == "tiny://sd" and subject.data.params["subject.class_noun"] == "dog"
    assert {"manifest.json", "samples-grid.png"} <= {a.path for a in client.list_artifacts(subject.info.run_id)}
    assert subject.data.tags[TAG_MODEL_URI].startswith("models:/")  # the pipeline folder as an MLflow model

    evaluation = next(run for run in children if run.data.tags[TAG_STAGE] == "evaluate")
    for name in ("eval/dino", "eval/clip_i", "eval/clip_t", "eval/div", "eval/pres", "eval/pres_base", "eval/real_images_dino"):
        assert name in evaluation.data.metrics and name in subject.data.metrics
    evaluation_files = {a.path for a in client.list_artifacts(evaluation.info.run_id)}
    assert {"eval_prompts.json", "evaluation_config.json", "report.md", "eval_grids"} <= evaluation_files
    grids = {a.path for a in client.list_artifacts(evaluation.info.run_id, "eval_grids")}
    assert {"eval_grids/grid-recontextualization.png", "eval_grids/grid-accessorization.png"} <= grids

    # Every stage run: the settings people compare as params, the photos as its input, system metrics.
    photos = subject.inputs.dataset_inputs
    assert [(d.dataset.name, d.dataset.source_type, len(d.dataset.digest)) for d in photos] == [("dog-photos", "local", 32)]
    for run in children:
        assert run.data.params["training.method"] == "full" and run.data.params["training.max_steps"] == str(steps)
        assert {"model.base", "training.learning_rate", "training.prior_loss_weight", "priors.num_class_images", "model.resolution"} <= set(run.data.params)
        assert [d.dataset.digest for d in run.inputs.dataset_inputs] == [photos[0].dataset.digest], run.data.tags[TAG_STAGE]
        assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(run.data.metrics), run.data.tags[TAG_STAGE]
    return subject


def _check_kfp_pages(iteration_dir):
    """The KFP UI renders HTML outputs inline: the sample grid, the evaluation grids and the upscaler comparison, images inside."""
    import base64
    import io

    from PIL import Image

    expected = {"samples/sample_page": 1, "evaluate/grids": 3, "super-resolution/comparison": 1, "evaluate-upscaled/grids": 6}
    for output, count in expected.items():
        page = (iteration_dir / output).read_text()
        images = re.findall(r'src="data:image/jpeg;base64,([^"]+)"', page)
        assert len(images) >= count, (output, len(images))
        for data in images:
            with Image.open(io.BytesIO(base64.b64decode(data))) as image:
                assert image.format == "JPEG" and min(image.size) >= 64
    assert "DINO" in (iteration_dir / "evaluate" / "grids").read_text()  # the headline figures above the grids


def _check_kfp_outputs(iteration_dir):
    """The evaluation shows in KFP too: a Metrics output (in the executor metadata) and a Markdown report."""
    executor_output = json.loads((iteration_dir / "evaluate" / "executor_output.json").read_text())
    metrics = executor_output["artifacts"]["metrics"]["artifacts"][0]["metadata"]
    assert {"dino", "clip_i", "clip_t", "div", "pres"} <= set(metrics)
    assert (iteration_dir / "evaluate" / "report").read_text().startswith("# DreamBench evaluation")


@pytest.mark.slow
def test_run_on_the_tiny_config_tracks_into_local_sqlite_by_default(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    strict = {"min_dino": 2.0, "min_clip_t": -1.0, "max_pres": 1.0}  # no model reaches DINO 2: rejected
    result = cli("run", "--config", quick_config(tmp_path, gate=strict, superres=False), "--subject-dir", str(SAMPLE_SUBJECT),
                 "--class-noun", "dog", "--output-dir", str(tmp_path / "outputs"), cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = _subject_lines(result.stdout)
    assert "upscaler" not in printed  # superres.enabled: false, so the DAG skipped the stage
    model_dir = printed["model"]

    # Not a terminal: one line per stage state change, none of kfp.local's stream; each task's log in a file.
    assert stage_states(result.stdout) == {
        ("batch", "plan-batch"): ["running", "done"], ("class:dog", "class-priors"): ["running", "done"],
        **{("dog", stage): ["running", "done"] for stage in SUBJECT_STAGES},
        ("batch", "summarize"): ["running", "done"], ("batch", "finish-tracking"): ["running", "done"],
    }
    assert "Executing task" not in result.stdout and "executor_input" not in result.stdout
    done = next(line for line in result.stdout.splitlines() if re.search(r" dog +fine-tune +done ", line))
    assert re.search(r"step 8/8 · loss \d\.\d{4}", done), done
    assert len(result.stdout.split("\njob:")[0].splitlines()) < 40
    logs = Path(next(line for line in result.stdout.splitlines() if line.startswith("task logs:")).split(":", 1)[1].strip())
    assert "Got executor_input" in (logs / "dog" / "fine-tune.log").read_text()
    assert "Executing task 'ingest'" in (logs / "dog" / "ingest.log").read_text()
    assert "Executing task 'fine-tune'" not in (logs / "dog" / "ingest.log").read_text()
    assert "[progress] dog evaluate done" in (logs / "dog" / "evaluate.log").read_text()
    assert (logs / "pipeline.log").read_text().count("Executing task") >= 9

    from diffusers import DiffusionPipeline

    image = DiffusionPipeline.from_pretrained(model_dir)("a dog", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert (tmp_path / "mlflow.db").is_file()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    subject = _check_tracked_run(client)
    assert printed["mlflow run"] == subject.info.run_id
    assert subject.data.tags[TAG_GATE] == "rejected" and subject.data.tags[TAG_GATE_REASON].startswith("DINO")
    assert client.search_registered_models() == []  # a rejected model is not registered
    assert printed["quality gate"].startswith("rejected (DINO")
    iteration_dir = Path(model_dir).parent.parent
    _check_kfp_outputs(iteration_dir)
    assert "**rejected** - DINO" in (iteration_dir / "evaluate" / "report").read_text()

    # --verbose: everything, as kfp.local prints it (the subject is up to date now, so this is quick)
    again = cli("run", "--config", quick_config(tmp_path, gate=strict, superres=False), "--subject-dir", str(SAMPLE_SUBJECT),
                "--class-noun", "dog", "--output-dir", str(tmp_path / "outputs"), "--verbose", cwd=tmp_path, env=env)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "Executing task" in again.stdout and "Got executor_input" in again.stdout
    assert "dog (dog): up to date" in again.stdout


@pytest.mark.slow
def test_run_tracks_into_an_mlflow_server_and_its_credentials_go_nowhere(tmp_path, mlflow_server, webhooks):
    hooks, received = webhooks
    dead = f"http://127.0.0.1:{_free_port()}/hook"  # nothing listens there
    config = with_notify(quick_config(tmp_path, experiment="served"), {"url": f"{hooks}/generic"},
                         {"url": f"{hooks}/slack", "format": "slack"}, {"url": dead})
    with_credentials = mlflow_server.replace("http://", "http://dreambooth:s3cret-token@")
    result = cli("run", "--config", config, "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                 "--output-dir", str(tmp_path / "outputs"), "--tracking-uri", with_credentials, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"{mlflow_server}/#/experiments/" in result.stdout
    client = MlflowClient(mlflow_server)
    subject = _check_tracked_run(client, "served", stages=SUBJECT_STAGES + SUPERRES_STAGES)
    # The learning check: 8 steps lowered the subject photos' denoising loss against the base model.
    metrics = subject.data.metrics
    assert metrics["learn/subject_loss_tuned"] < metrics["learn/subject_loss_base"] and metrics["learn/subject_loss_change"] < 0
    assert {"learn/class_loss_base", "learn/class_loss_tuned"} <= set(metrics)  # measured on the class images too
    assert _subject_lines(result.stdout)["learned"].startswith("denoising loss vs the base model: subject photos -")
    # Not in the output, the task logs and settings kfp.local wrote, or any run's params and tags.
    assert "s3cret" not in result.stdout + result.stderr + json.dumps(received)
    leaks = [path for path in (tmp_path / "outputs").rglob("*") if path.is_file() and b"s3cret" in path.read_bytes()]
    assert leaks == []
    for run in client.search_runs([subject.info.experiment_id]):
        assert "s3cret" not in json.dumps({**run.data.params, **run.data.tags})
    assert subject.data.tags[TAG_GATE] == "passed"
    children = client.search_runs([subject.info.experiment_id], f"tags.`{TAG_PARENT}` = '{subject.info.run_id}'")
    upscaling = next(run for run in children if run.data.tags[TAG_STAGE] == "super-resolution")
    assert [m.step for m in client.get_metric_history(upscaling.info.run_id, "loss")] == list(range(1, 7))
    assert "superres-comparison.png" in {a.path for a in client.list_artifacts(subject.info.run_id)}
    for label in ("generic", "personalised"):
        assert f"eval/upscaled_{label}/dino" in subject.data.metrics
    assert "upscaler" in _subject_lines(result.stdout)
    _check_kfp_pages(Path(_subject_lines(result.stdout)["model"]).parent.parent)

    # The exit handler told both live webhooks, each in its format; the dead one changed nothing but its line.
    bodies = dict(received)
    assert sorted(bodies) == ["/generic", "/slack"]
    report = bodies["/generic"]
    assert report["succeeded"] is True and report["counts"] == {"trained": 1, "failed": 0, "up to date": 0}
    (dog,) = report["subjects"]
    assert dog["subject"] == "dog" and dog["gate"] == "passed" and dog["registered"].startswith("dreambooth-dog@candidate")
    assert dog["metrics"]["dino"] == pytest.approx(subject.data.metrics["eval/dino"])
    assert report["mlflow_url"].startswith(f"{mlflow_server}/#/experiments/{subject.info.experiment_id}/runs/")
    slack = bodies["/slack"]["text"].splitlines()
    assert slack[0].startswith(":white_check_mark: DreamBooth batch") and slack[1].startswith("• dog (dog): trained; DINO ")
    assert slack[-1].startswith(f"<{mlflow_server}/#/experiments/")
    assert stage_states(result.stdout)[("batch", "notify")] == ["failed"]
    assert f"not sent to {dead.split('/')[2]}" in next(line for line in result.stdout.splitlines() if " notify " in line)

    import io

    import mlflow
    import pandas as pd
    from PIL import Image

    mlflow.set_tracking_uri(mlflow_server)
    registered = mlflow.pyfunc.load_model("models:/dreambooth-dog@candidate")
    generated = registered.predict(pd.DataFrame({"prompt": ["a dog on the beach"], "num_inference_steps": [2]}))
    assert Image.open(io.BytesIO(generated["image_png"][0])).size == (64, 64)


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


def test_evaluate_alone_scores_a_model_trained_elsewhere(tiny_model_dir, tmp_path):
    result = cli("evaluate", "--config", "tiny", "--model", str(tiny_model_dir), "--identifier", "fqs",
                 "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--output-dir", str(tmp_path / "out"),
                 "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# DreamBench evaluation: `fqs` dog" in result.stdout
    assert json.loads((tmp_path / "out" / "evaluation" / "evaluation.json").read_text())["identifier"] == "fqs"
    assert "quality gate: passed, registered as dreambooth-dog@candidate (version 1)" in result.stdout


LORA_SUBJECTS = {"dog-sd": "tiny", "dog-sdxl": "tiny-sdxl", "dog-flux": "tiny-flux"}


def _subject_blocks(stdout: str) -> dict[str, dict]:
    """{subject: its indented `label: value` lines} from `run`'s report of a batch."""
    blocks: dict[str, dict] = {}
    current = None
    for line in stdout.split("\nbatch:", 1)[-1].splitlines():
        found = re.match(r"^(\S+) \(\w+\): ", line)
        if found:
            current = blocks.setdefault(found[1], {})
        elif current is not None and line.startswith("  ") and ":" in line:
            key, value = line.split(":", 1)
            current[key.strip()] = value.strip()
    return blocks


@pytest.fixture(scope="session")  # session: a module fixture is set up again when a worker interleaves modules
def lora_batch(tmp_path_factory):
    """One batch, one subject per model family (its shipped tiny config as the subject's overrides), LoRA."""
    root = tmp_path_factory.mktemp("lora")
    tracking = f"sqlite:///{root / 'mlflow.db'}"
    config = quick_config(root, experiment="lora", superres=False, method="lora", learning_rate=1e-3,
                          validation_every=4, validation_images=1, validation_inference_steps=2)
    entries = []
    for subject, family in LORA_SUBJECTS.items():
        overrides = yaml.safe_load((CONFIG_DIR / f"{family}.yaml").read_text()) if family != "tiny" else {}
        overrides.pop("extends", None)
        entries.append({"id": subject, "photos": str(SAMPLE_SUBJECT), "class_noun": "dog", "overrides": overrides})
    subjects = root / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({"subjects": entries}))
    result = cli("run", "--config", config, "--subjects", str(subjects), "--output-dir", str(root / "outputs"),
                 "--tracking-uri", tracking, cwd=root)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return root, tracking, _subject_blocks(result.stdout), {entry["id"]: entry["overrides"] for entry in entries}


@pytest.mark.slow
@pytest.mark.xdist_group("lora-batch")  # one worker: the three share the batch (a module fixture)
@pytest.mark.parametrize("subject", list(LORA_SUBJECTS))
def test_a_lora_run_goes_through_every_stage_and_registers_megabytes(lora_batch, subject):
    """SD, SDXL and Flux: LoRA through every stage, an adapter diffusers loads, registered with MLflow's flavour."""
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from conftest import run_without_repository
    from dreambooth.models import LORA_WEIGHTS, resolve_model_source

    root, tracking, blocks, overrides = lora_batch
    printed = blocks[subject]
    adapter = Path(printed["model"])
    assert (adapter / LORA_WEIGHTS).is_file() and not (adapter / "unet").exists() and not (adapter / "transformer").exists()
    assert printed["quality gate"].startswith("passed")  # samples and evaluation ran on base + adapter

    # diffusers' own loader applies it on the base, and it changes the image
    base_dir = resolve_model_source(overrides[subject].get("model", {}).get("base", load_config("tiny").model.base))
    base = DiffusionPipeline.from_pretrained(base_dir)
    draw = dict(num_inference_steps=2, height=64, width=64, output_type="np")
    plain = base("a dog", generator=torch.Generator().manual_seed(0), **draw).images[0]
    base.load_lora_weights(adapter)
    adapted = base("a dog", generator=torch.Generator().manual_seed(0), **draw).images[0]
    assert np.abs(adapted - plain).max() > 1e-3

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
    assert "diffusers" in yaml.safe_load((downloaded / "MLmodel").read_text())["flavors"]  # MLflow's own LoRA flavour
    registered_bytes = sum(p.stat().st_size for p in downloaded.rglob("*") if p.is_file())
    full_bytes = sum(p.stat().st_size for p in Path(base_dir).rglob("*") if p.is_file())
    assert registered_bytes < 0.05 * full_bytes, (registered_bytes, full_bytes)

    # In a process that cannot import this repository: MLflow and diffusers alone load it.
    elsewhere = root / "elsewhere" / subject
    elsewhere.mkdir(parents=True)
    loaded = run_without_repository(LOAD_ADAPTER_ELSEWHERE.format(tracking=tracking, name=name), elsewhere)
    assert loaded.returncode == 0, loaded.stderr[-3000:]
    assert "generated (64, 64)" in loaded.stdout


LOAD_ADAPTER_ELSEWHERE = """
import io
import mlflow, pandas as pd
from PIL import Image
mlflow.set_tracking_uri({tracking!r})
model = mlflow.pyfunc.load_model("models:/{name}@candidate")
out = model.predict(pd.DataFrame({{"prompt": ["a dog on the beach"]}}), params={{"num_inference_steps": 2, "height": 64, "width": 64}})
print("generated", Image.open(io.BytesIO(out[0])).size)
"""
