"""submit and schedule against a local HTTP server that speaks KFP's v2beta1 REST shape and records requests."""

import json
from pathlib import Path

import pytest
import yaml

from conftest import SAMPLE_SUBJECT, cli, copy_photos
from dreambooth.config import RunConfig, load_config


def _cli(*args, env=None):
    return cli(*args, env=env, timeout=300)


def _posted(requests, prefix):
    return [body for method, path, body, _ in requests if method == "POST" and path.startswith(prefix)]


def test_submit_uploads_the_cluster_pipeline_with_its_parameters(kfp_api):
    host, requests, server = kfp_api
    result = cli("submit", "--skip-preflight", "--host", host, "--config", "gke-sd15", "--experiment", "pets",
                 "--subject-uri", "gs://photos/dog", "--class-noun", "dog", in_process=False)  # the command's smoke test
    assert result.returncode == 0, result.stderr
    assert f"{host}/#/runs/details/run-42" in result.stdout

    (experiment,) = _posted(requests, "/apis/v2beta1/experiments")
    assert experiment["display_name"] == "pets"
    (run,) = _posted(requests, "/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-7" and run["service_account"] == "dreambooth-pipeline-runner"
    spec, platform_spec = server.version_package(run["pipeline_version_reference"]["pipeline_version_id"])
    assert spec["pipelineInfo"]["name"] == "dreambooth"
    assert [pipeline["display_name"] for pipeline in server.pipelines.values()] == ["dreambooth-gke-sd15"]
    assert all("@sha256:" in e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values())
    platform = platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-fine-tune"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    parameters = run["runtime_config"]["parameters"]
    assert parameters["superres_enabled"] is True and parameters["subjects_uri"] == "" and parameters["force"] is False
    # The subject is its own parameter (a batch of one), apart from the shared settings.
    assert json.loads(parameters["subjects_json"]) == [{"id": "dog", "photos": "gs://photos/dog", "class_noun": "dog"}]
    config = RunConfig.from_json(parameters["config_json"])
    assert (config.subject.class_noun, config.name) == ("", "gke-sd15")


def test_schedule_with_a_subjects_file_carries_its_uri_not_its_contents(kfp_api):
    host, requests, _ = kfp_api
    result = _cli("schedule", "--skip-preflight", "--host", host, "--config", "gke-sd15", "--cron", "0 0 2 * * *",
                  "--subjects-uri", "gs://catalogue/subjects.yaml", "--run-name", "nightly-catalogue")
    assert result.returncode == 0, result.stderr
    (recurring,) = _posted(requests, "/apis/v2beta1/recurringruns")
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 2 * * *"
    assert recurring["display_name"] == "nightly-catalogue" and recurring["experiment_id"] == "exp-7"
    parameters = recurring["runtime_config"]["parameters"]
    # Read by the plan task when each run starts, so entries added between ticks are picked up.
    assert parameters["subjects_uri"] == "gs://catalogue/subjects.yaml" and parameters["subjects_json"] == ""
    assert RunConfig.from_json(parameters["config_json"]) == load_config("gke-sd15")


def test_schedule_creates_a_recurring_run_with_the_cron(kfp_api):
    host, requests, _ = kfp_api
    result = _cli("schedule", "--skip-preflight", "--host", host, "--config", "gke-sd15", "--cron", "0 0 9 * * 1-5",
                  "--subject-uri", "gs://photos/backpack", "--class-noun", "backpack", "--run-name", "weekday-backpack")
    assert result.returncode == 0, result.stderr
    (recurring,) = _posted(requests, "/apis/v2beta1/recurringruns")
    assert recurring["trigger"]["cron_schedule"]["cron"] == "0 0 9 * * 1-5"
    assert recurring["display_name"] == "weekday-backpack" and recurring["experiment_id"] == "exp-7"
    assert json.loads(recurring["runtime_config"]["parameters"]["subjects_json"])[0]["photos"] == "gs://photos/backpack"


@pytest.mark.parametrize(
    "cron, message",
    [
        ("0 9 * * *", "has 5 fields; KFP cron has 6, seconds first"),
        ("0 0 25 * * *", "hour 25 is outside 0-23"),
        ("0 0 9 * * $", "day of week field '$' has characters cron does not use"),
    ],
)
def test_a_bad_cron_is_refused_before_anything_is_sent(kfp_api, cron, message):
    host, requests, _ = kfp_api
    result = _cli("schedule", "--host", host, "--config", "gke-sd15", "--cron", cron,
                  "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --cron:") and message in result.stderr
    assert requests == []


def test_submitting_a_config_without_cluster_settings_is_refused(kfp_api):
    host, requests, _ = kfp_api
    result = _cli("submit", "--host", host, "--config", "sd15", "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 2 and "no `cluster` section" in result.stderr
    assert requests == []


def test_a_multi_user_kubeflow_gets_the_namespace_and_the_service_account_token(kfp_api, tmp_path):
    host, requests, server = kfp_api
    server.multi_user, server.token = True, "sa-token-123"
    token_file = tmp_path / "token"
    token_file.write_text("sa-token-123\n")
    result = _cli("submit", "--skip-preflight", "--host", host, "--config", "gke-sd15", "--token-file", str(token_file),
                  "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 0, result.stderr
    (experiment,) = _posted(requests, "/apis/v2beta1/experiments")
    assert experiment["namespace"] == "dreambooth-dev"  # cluster.namespace, where manifests/ put the PVC and secrets
    assert {headers.get("authorization") for *_, headers in requests} == {"Bearer sa-token-123"}

    requests.clear()
    server.token = "from-the-environment"
    env = {**__import__("os").environ, "KF_PIPELINES_TOKEN": "from-the-environment"}
    result = _cli("submit", "--skip-preflight", "--host", host, "--config", "gke-sd15", "--namespace", "team-b",
                  "--subject-uri", "gs://photos/dog", "--class-noun", "dog", env=env)
    assert result.returncode == 0, result.stderr
    assert _posted(requests, "/apis/v2beta1/experiments")[0]["namespace"] == "team-b"
    assert {headers.get("authorization") for *_, headers in requests} == {"Bearer from-the-environment"}


def test_refused_credentials_end_in_one_line_before_anything_is_created(kfp_api):
    host, requests, server = kfp_api
    server.multi_user, server.token = True, "the-right-one"
    result = _cli("submit", "--skip-preflight", "--host", host, "--config", "gke-sd15",
                  "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 2
    assert result.stderr.strip() == (f"error: --host: {host} answered 401 Unauthorized; pass --token-file, "
                                     "or set KF_PIPELINES_TOKEN or KF_PIPELINES_COOKIES, with access to the namespace")
    assert not _posted(requests, "/apis/v2beta1/")


@pytest.mark.parametrize("state, exit_code", [("SUCCEEDED", 0), ("FAILED", 1)])
def test_wait_follows_the_run_and_links_its_mlflow_batch_run(kfp_api, mlflow_server, state, exit_code):
    from dreambooth.tracking import open_batch_run

    host, _, server = kfp_api
    server.run_state = state
    config = load_config("gke-sd15")
    batch_run = open_batch_run(mlflow_server, config, "run-42", "dreambooth-dog-dog")  # what plan-batch opens in the run
    result = _cli("submit", "--skip-preflight", "--host", host, "--config", "gke-sd15", "--wait", "60",
                  "--mlflow-via", mlflow_server, "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == exit_code, result.stderr
    assert f"state:        {state}" in result.stdout
    assert f"{mlflow_server}/#/experiments/" in result.stdout and f"/runs/{batch_run}" in result.stdout


def test_submit_runs_preflight_first_and_sends_nothing_when_it_fails(kfp_api):
    host, requests, _ = kfp_api
    result = _cli("submit", "--host", host, "--config", "gke-sd15", "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 2
    assert "FAIL  cluster.image" in result.stdout and "preflight failed" in result.stderr
    assert not _posted(requests, "/apis/v2beta1/")


def test_an_experiment_with_a_host_is_submitted_as_one_batch_reading_its_file_on_the_cluster(kfp_api, gcs_emulator, tmp_path):
    from google.cloud import storage

    host, requests, _ = kfp_api
    text = ("subjects:\n  - {id: dog, photos: gs://photos/dog, class_noun: dog}\n"
            "variants:\n  - {name: dreambooth}\n  - {name: no-ppl, training: {prior_loss_weight: 0}}\n")
    storage.Client(project="dreambooth-test").bucket(gcs_emulator).blob("experiments/paper.yaml").upload_from_string(text)
    uri = f"gs://{gcs_emulator}/experiments/paper.yaml"
    result = _cli("experiment", uri, "--skip-preflight", "--host", host, "--config", "gke-sd15")
    assert result.returncode == 0, result.stderr
    (run,) = _posted(requests, "/apis/v2beta1/runs")
    assert run["display_name"] == "dreambooth-paper" and run["runtime_config"]["parameters"]["subjects_uri"] == uri

    local = tmp_path / "paper.yaml"
    local.write_text(text)
    refused = _cli("experiment", str(local), "--skip-preflight", "--host", host, "--config", "gke-sd15")
    assert refused.returncode == 2 and refused.stderr.splitlines() == [
        f"error: experiment: {local} is on this machine; with --host give the file where the cluster reads it (gs://...)"]
    no_variants = tmp_path / "subjects.yaml"
    no_variants.write_text(text.split("variants:")[0])
    plain = _cli("experiment", str(no_variants), "--config", "tiny")
    assert plain.returncode == 2 and plain.stderr.splitlines() == [
        f"error: {no_variants}: no `variants:`; an experiment runs each subject once per variant (for subjects alone: run --subjects)"]


def test_a_sharded_batch_schedules_its_launcher_which_starts_a_run_per_shard_with_work(kfp_api, tmp_path):
    """What the recurring run holds, then its one task as the cluster runs it: shards created through the KFP API."""
    from dreambooth.dag.launcher import launch_shards
    from dreambooth.tasks.batch import exit_handler_task
    from dreambooth.tracking import TAG_SHARDS, TAG_STAGE

    host, requests, server = kfp_api
    config = tmp_path / "catalogue.yaml"
    config.write_text(f"extends: gke-sd15\nbatch:\n  max_subjects_per_run: 2\ncluster:\n  kfp_host: {host}\n")
    result = _cli("schedule", "--skip-preflight", "--host", host, "--config", str(config), "--cron", "0 0 2 * * *",
                  "--subjects-uri", "gs://catalogue/subjects.yaml", "--experiment", "pets")
    assert result.returncode == 0, result.stderr
    (recurring,) = _posted(requests, "/apis/v2beta1/recurringruns")
    spec, platform = server.version_package(recurring["pipeline_version_reference"]["pipeline_version_id"])
    assert spec["pipelineInfo"]["name"] == "dreambooth-shards" and set(spec["root"]["dag"]["tasks"]) == {"exit-handler-1", "finish-tracking"}
    parameters = recurring["runtime_config"]["parameters"]
    assert parameters["subjects_uri"] == "gs://catalogue/subjects.yaml" and parameters["kfp_experiment"] == "pets"
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    # The label Kubeflow's PodDefault (manifests/base/kfp-api-access.yaml) selects to hand the pod its API token.
    assert executors["exec-launch-shards"]["podMetadata"]["labels"] == {"access-ml-pipeline": "true"}

    ids = [f"item-{n}" for n in range(5)]
    for subject in ids:
        copy_photos(SAMPLE_SUBJECT, tmp_path / subject, ["00.jpg", "01.jpg", "02.jpg"])
    subjects = tmp_path / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({"subjects": [{"id": s, "photos": str(tmp_path / s), "class_noun": "dog"} for s in ids]}))
    requests.clear()
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    shared = load_config(str(config)).to_json()
    started = launch_shards.python_func(
        config_json=shared, tracking_uri=tracking, subjects_uri=str(subjects), force=False, kfp_experiment="pets",
        job_id="tick-1", job_name="nightly", **load_config(str(config)).run_settings())
    assert started == 3
    runs = _posted(requests, "/apis/v2beta1/runs")
    assert [run["display_name"] for run in runs] == [f"nightly-shard-{n}-of-3" for n in (1, 2, 3)]
    assert all(run["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "dreambooth" for run in runs)
    given = [json.loads(run["runtime_config"]["parameters"]["subjects_json"]) for run in runs]
    assert [[entry["id"] for entry in entries] for entries in given] == [ids[:2], ids[2:4], ids[4:]]
    shards = [json.loads(run["runtime_config"]["parameters"]["shard"]) for run in runs]
    assert [(shard["index"], shard["of"], shard["subjects"]) for shard in shards] == [(1, 3, ids[:2]), (2, 3, ids[2:4]), (3, 3, ids[4:])]

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking)
    (batch,) = client.search_runs([client.get_experiment_by_name("dreambooth").experiment_id], f"tags.`{TAG_STAGE}` = 'batch'")
    assert batch.info.run_id == shards[0]["batch_run_id"] and batch.data.tags[TAG_SHARDS] == "3"
    assert [shard["launched"] for shard in json.loads(Path(client.download_artifacts(batch.info.run_id, "shards.json")).read_text())] == ["run-42"] * 3
    # The launcher's exit handler leaves the batch run open: its shards run on, and the last to end closes it.
    exit_handler_task(shared, tracking, "tick-1", "SUCCEEDED")
    assert client.get_run(batch.info.run_id).info.status == "RUNNING"
    exit_handler_task(shared, tracking, "tick-1", "FAILED")
    assert client.get_run(batch.info.run_id).info.status == "FAILED"


@pytest.mark.parametrize("sharded", [False, True])
def test_compile_writes_exactly_what_submit_sends(kfp_api, tmp_path, sharded):
    """Uploaded through the KFP UI or GitOps, the compiled YAML must be the pipeline submit would have sent:
    the DAG, or for a sharded config and a subjects file its launcher, with the same platform settings."""
    host, requests, server = kfp_api
    config = tmp_path / "team.yaml"
    config.write_text("extends: gke-sd15\ncluster:\n  image: registry.example/dreambooth-kfp@sha256:" + "ab" * 32 + "\n"
                      "  pipeline_root: gs://team-bucket/pipeline-root\n" + ("batch:\n  max_subjects_per_run: 4\n" if sharded else ""))
    compiled = tmp_path / "compiled.yaml"
    written = cli("compile", "--config", str(config), "--output", str(compiled), cwd=tmp_path)
    assert written.returncode == 0, written.stderr
    sent = _cli("submit", "--skip-preflight", "--host", host, "--config", str(config), "--subjects-uri", "gs://catalogue/subjects.yaml")
    assert sent.returncode == 0, sent.stderr
    (run,) = _posted(requests, "/apis/v2beta1/runs")
    pipeline_spec, platform_spec = yaml.safe_load_all(compiled.read_text())
    assert server.version_package(run["pipeline_version_reference"]["pipeline_version_id"]) == [pipeline_spec, platform_spec]
    assert pipeline_spec["pipelineInfo"]["name"] == ("dreambooth-shards" if sharded else "dreambooth")


def test_compile_refuses_what_submit_refuses_and_the_shipped_placeholders(tmp_path):
    too_large = tmp_path / "too-large.yaml"
    too_large.write_text("extends: gke-sd15\nbatch:\n  max_subjects_per_run: 30\n")
    refused = cli("compile", "--config", str(too_large), "--output", str(tmp_path / "x.yaml"), "--allow-placeholders", cwd=tmp_path)
    assert refused.returncode == 2 and refused.stderr.startswith("error: batch.max_subjects_per_run: a shard of 30 subjects")
    shipped = cli("compile", "--config", "gke-sd15", "--output", str(tmp_path / "x.yaml"), cwd=tmp_path)
    assert shipped.returncode == 2 and not (tmp_path / "x.yaml").exists()
    lines = shipped.stderr.splitlines()
    assert [line.split(": ")[2] for line in lines] == ["cluster.image", "cluster.pipeline_root"]
    assert "PROJECT, the all-zero digest still a placeholder" in lines[0] and "gke-sd15.yaml" in lines[0]
    assert "BUCKET still a placeholder in 'gs://BUCKET-dev/pipeline-root'" in lines[1]


def test_a_schedule_is_managed_by_name_on_a_named_pipeline_version(kfp_api, tmp_path):
    """Scheduling twice leaves one recurring run; an unchanged config reuses its pipeline version, a changed one
    adds a version; catch-up is off; list, pause, resume and delete find the schedule by its name."""
    host, requests, server = kfp_api
    config = tmp_path / "nightly.yaml"
    config.write_text("extends: gke-sd15\n")
    schedule = ("schedule", "--skip-preflight", "--host", host, "--config", str(config), "--subjects-uri", "gs://catalogue/subjects.yaml",
                "--run-name", "nightly")
    first = _cli(*schedule, "--cron", "0 0 2 * * *")
    assert first.returncode == 0, first.stderr
    assert "pipeline:      dreambooth-nightly version " in first.stdout and "(uploaded)" in first.stdout
    again = _cli(*schedule, "--cron", "0 30 3 * * *")  # the same name, another time: replaced, not doubled
    assert again.returncode == 0, again.stderr
    assert "replaced recurring run" in again.stdout and "(unchanged, reused)" in again.stdout
    (only,) = server.recurring_runs.values()
    assert only["display_name"] == "nightly" and only["trigger"]["cron_schedule"]["cron"] == "0 30 3 * * *"
    assert only["no_catchup"] is True  # after downtime, one run, not one per missed night
    (pipeline,) = server.pipelines.values()
    assert pipeline["display_name"] == "dreambooth-nightly"
    digest = only["pipeline_version_reference"]["pipeline_version_id"]
    assert [version["display_name"] for version in pipeline["versions"]][1:] == [_version_name(server, digest)]

    config.write_text("extends: gke-sd15\ntraining:\n  max_steps: 800\ncluster:\n  schedule:\n    catch_up: true\n")
    changed = _cli(*schedule, "--cron", "0 30 3 * * *")
    assert changed.returncode == 0, changed.stderr and "(uploaded)" in changed.stdout
    (only,) = server.recurring_runs.values()
    assert len(pipeline["versions"]) == 3 and only["no_catchup"] is False

    manage = ("--host", host, "--config", str(config))
    listed = _cli("schedules", "list", *manage)
    assert listed.returncode == 0 and listed.stdout.split()[:4] == ["nightly", "active", "0", "30"]
    assert _cli("schedules", "pause", "--name", "nightly", *manage).returncode == 0
    assert _cli("schedules", "list", *manage).stdout.split()[1] == "paused"
    assert _cli("schedules", "resume", "--name", "nightly", *manage).returncode == 0
    assert _cli("schedules", "list", *manage).stdout.split()[1] == "active"
    missing = _cli("schedules", "delete", "--name", "weekly", *manage)
    assert missing.returncode == 2 and missing.stderr.startswith("error: --name: no schedule 'weekly'")
    assert _cli("schedules", "delete", "--name", "nightly", *manage).returncode == 0
    assert server.recurring_runs == {} and "no schedules" in _cli("schedules", "list", *manage).stdout


def _version_name(server, version_id: str) -> str:
    return next(version["display_name"] for pipeline in server.pipelines.values() for version in pipeline["versions"]
                if version["pipeline_version_id"] == version_id)
