"""Cluster readiness: the compiled platform spec, secrets by reference only, and a lint-clean image."""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from conftest import REPO, dag_tasks
from dreambooth.config import load_config
from dreambooth.config_files import CONFIG_DIR
from dreambooth.errors import InputError

GPU_STAGES = ["class-priors", "fine-tune", "super-resolution", "samples", "evaluate", "evaluate-upscaled"]


@pytest.fixture(scope="session")  # session: under xdist a module fixture is built again whenever a worker interleaves modules
def compiled(tmp_path_factory):
    out = tmp_path_factory.mktemp("compiled") / "dreambooth.yaml"
    # A token in the environment must never reach the YAML: only the Secret's name and key may.
    env = {**os.environ, "HF_TOKEN": "hf_live_secret_value_do_not_leak"}
    result = subprocess.run(
        [sys.executable, str(REPO / "pipeline.py"), "compile", "--config", "gke-sd15", "--output", str(out), "--allow-placeholders"],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    pipeline_spec, platform_spec = yaml.safe_load_all(text)
    return text, pipeline_spec, platform_spec["platforms"]["kubernetes"]["deploymentSpec"]["executors"]


def test_gpu_stages_get_gpus_node_pool_toleration_and_shared_memory(compiled):
    _, pipeline_spec, executors = compiled
    for stage in GPU_STAGES:
        container = pipeline_spec["deploymentSpec"]["executors"][f"exec-{stage}"]["container"]
        assert container["resources"]["accelerator"]["resourceType"] == "nvidia.com/gpu"
        assert container["resources"]["accelerator"]["resourceCount"] == "1"
        platform = executors[f"exec-{stage}"]
        assert platform["nodeSelector"]["labels"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in platform["tolerations"]
        assert {"volumeName": "dshm", "mountPath": "/dev/shm", "medium": "Memory", "sizeLimit": "16Gi"} in platform["emptyDirMounts"]
    for cpu_stage in ("ingest", "plan-batch", "prior-groups", "assign-priors", "summarize", "batch-failures"):
        assert "nodeSelector" not in executors[f"exec-{cpu_stage}"]  # CPU stages stay off the GPU pool


def test_every_stage_is_non_root_time_limited_and_pinned(compiled):
    _, pipeline_spec, executors = compiled
    for name, executor in pipeline_spec["deploymentSpec"]["executors"].items():
        assert "@sha256:" in executor["container"]["image"]
        assert executors[name]["securityContext"] == {"runAsNonRoot": True, "runAsUser": "1000"}
        assert int(executors[name]["activeDeadlineSeconds"]) > 0
        assert executors[name]["pvcMount"][0]["mountPath"] == "/cache"


def test_secrets_travel_by_reference_only(compiled):
    text, _, executors = compiled
    reference = executors["exec-fine-tune"]["secretAsEnv"][0]
    assert reference["secretName"] == "huggingface" and reference["keyToEnv"] == [{"secretKey": "token", "envVar": "HF_TOKEN"}]
    assert "hf_live_secret_value_do_not_leak" not in text
    for leak in ("private_key", "BEGIN PRIVATE KEY", "GOOGLE_APPLICATION_CREDENTIALS", "service_account.json"):
        assert leak not in text


def test_a_tracking_uri_with_credentials_is_never_compiled_in(tmp_path):
    def compile_with(config: str):
        return subprocess.run(
            [sys.executable, str(REPO / "pipeline.py"), "compile", "--config", config, "--output", str(tmp_path / f"{config}.yaml"),
             "--tracking-uri", "http://ops:p4ssw0rd@mlflow.example.com:5000"],
            capture_output=True, text=True, timeout=300,
        )

    cluster = compile_with("gke-sd15")  # pods cannot get a local variable: refused, pointing at a Secret
    assert cluster.returncode == 2 and cluster.stderr.startswith("error: tracking.uri: holds credentials")
    assert len(cluster.stderr.splitlines()) == 1 and "p4ssw0rd" not in cluster.stderr
    local = compile_with("tiny")  # kfp.local tasks inherit the variables; the YAML gets the bare URI
    assert local.returncode == 0, local.stderr
    text = (tmp_path / "tiny.yaml").read_text()
    assert "p4ssw0rd" not in text and "http://mlflow.example.com:5000" in text


def test_gpu_stages_retry_for_longer_than_they_run(compiled):
    _, pipeline_spec, _ = compiled
    _, finetune = dag_tasks(pipeline_spec)["fine-tune"]
    policy = finetune["retryPolicy"]
    assert policy["maxRetryCount"] == 2
    window = int(policy["backoffMaxDuration"].rstrip("s"))
    assert window > 3 * 10800  # three attempts of a 3-hour fine-tune fit; KFP's default 3600 s would not


def test_every_stage_retries_an_evicted_pod_cpu_stages_too(compiled):
    """One evicted CPU pod (ingest, prior-groups, the exit handler) must not fail a night that GPU stages survive."""
    _, pipeline_spec, _ = compiled
    tasks = {name: task for name, (_, task) in dag_tasks(pipeline_spec).items() if "componentRef" in task and "dag" not in
             pipeline_spec["components"][task["componentRef"]["name"]]}
    assert {"ingest", "prior-groups", "assign-priors", "batch-failures", "finish-tracking"} <= set(tasks)
    without = sorted(name for name, task in tasks.items() if task.get("retryPolicy", {}).get("maxRetryCount", 0) < 1)
    assert without == []


def test_a_local_run_of_a_cluster_config_keeps_its_retries_and_nothing_else_of_the_cluster(tmp_path):
    """kfp.local honours set_retry: a stage that fails on a tracking outage is retried locally as on the cluster."""
    from dreambooth.commands.submit import compile_pipeline

    documents = list(yaml.safe_load_all(compile_pipeline(load_config("gke-sd15"), tmp_path / "local.yaml").read_text()))
    assert len(documents) == 1  # no platform spec: no image, GPUs, node pools or secrets locally
    _, finetune = dag_tasks(documents[0])["fine-tune"]
    assert finetune["retryPolicy"]["maxRetryCount"] == 2
    _, plan = dag_tasks(yaml.safe_load(compile_pipeline(load_config("tiny"), tmp_path / "tiny.yaml").read_text()))["plan-batch"]
    assert "retryPolicy" not in plan  # a config without a cluster section retries nothing


def test_the_loops_run_as_many_at_once_as_the_gpu_quota_holds(tmp_path):
    """8 GPUs: eight class-prior groups (one GPU each); two subjects, each peaking at three (samples, evaluate
    and super-resolution side by side); without a quota, batch.parallelism."""
    from dreambooth.commands.submit import compile_pipeline

    def limits(config) -> dict[str, int]:
        spec = next(yaml.safe_load_all(compile_pipeline(config, tmp_path / "c.yaml", on_cluster=True).read_text()))
        return {task["parameterIterator"]["items"]["inputParameter"].split("--")[1]: task["iteratorPolicy"]["parallelismLimit"]
                for _, task in dag_tasks(spec).values() if "parameterIterator" in task}

    assert limits(load_config("gke-sd15", {"cluster": {"gpu_quota": 8}})) == {"prior-groups-Output": 8, "assign-priors-Output": 2}
    assert limits(load_config("gke-sd15", {"cluster": {"gpu_quota": 8}, "superres": {"enabled": False}}))["assign-priors-Output"] == 4
    default = load_config("gke-sd15")
    assert set(limits(default).values()) == {default.batch.parallelism}


def test_a_tag_without_a_digest_is_refused(tmp_path):
    config = tmp_path / "cluster.yaml"
    config.write_text("extends: sd15\ncluster:\n  image: registry.example/dreambooth-kfp:latest\n")
    with pytest.raises(InputError, match=r"cluster\.image: .*not pinned by digest"):
        load_config(str(config))


def test_extends_layers_a_config_over_another_and_refuses_loops(tmp_path):
    config = load_config("gke-sd15")
    assert config.training.learning_rate == 5e-6 and config.cluster.service_account == "dreambooth-pipeline-runner"
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(InputError, match="loops back"):
        load_config(str(tmp_path / "a.yaml"))


@pytest.mark.parametrize("dockerfile", ["Dockerfile", "mlflow.Dockerfile"])
def test_the_dockerfiles_pass_hadolint(dockerfile):
    hadolint = shutil.which("hadolint") or str(REPO / ".venv" / "bin" / "hadolint")
    result = subprocess.run([hadolint, str(REPO / "docker" / dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_webhook_reaches_the_exit_handler_from_a_secret_never_through_the_yaml(tmp_path):
    config = tmp_path / "gke-notify.yaml"
    config.write_text(yaml.safe_dump({
        "extends": str(CONFIG_DIR / "gke-sd15.yaml"),
        "tracking": {"notify": [{"url_env": "DREAMBOOTH_SLACK_WEBHOOK", "format": "slack"}]},
        "cluster": {"secrets": [{"name": "huggingface", "key": "token", "env": "HF_TOKEN"},
                                {"name": "dreambooth-notify", "key": "slack-url", "env": "DREAMBOOTH_SLACK_WEBHOOK"}]},
    }))
    out = tmp_path / "dreambooth.yaml"
    env = {**os.environ, "DREAMBOOTH_SLACK_WEBHOOK": "https://hooks.slack.com/services/T000/B000/do-not-leak"}
    result = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "compile", "--config", str(config), "--output", str(out),
                             "--allow-placeholders"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    text = out.read_text()
    assert "do-not-leak" not in text and "hooks.slack.com" not in text
    executors = list(yaml.safe_load_all(text))[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    handler = executors["exec-finish-tracking"]["secretAsEnv"]
    assert [(ref["secretName"], ref["keyToEnv"]) for ref in handler if ref["secretName"] == "dreambooth-notify"] == [
        ("dreambooth-notify", [{"secretKey": "slack-url", "envVar": "DREAMBOOTH_SLACK_WEBHOOK"}])]


def _ir(pipeline, tmp_path) -> dict:
    from kfp import compiler

    compiler.Compiler().compile(pipeline, str(tmp_path / "ir.yaml"))
    return next(yaml.safe_load_all((tmp_path / "ir.yaml").read_text()))


def test_argo_nodes_are_counted_as_kfps_argo_compiler_lays_them_out(tmp_path):
    from kfp import dsl

    from dreambooth.dag.workflow_size import workflow_nodes

    @dsl.component
    def hello(text: str) -> str:
        return text

    @dsl.pipeline(name="one-task")
    def one_task(text: str = "hi"):
        hello(text=text)

    # KFP's own testdata (hello_world.yaml): entrypoint, root driver, root DAG; the task's driver, executor DAG, pod.
    assert workflow_nodes(_ir(one_task, tmp_path), 0) == 6

    @dsl.pipeline(name="a-loop")
    def a_loop(items: list = ["a", "b", "c"]):
        with dsl.ParallelFor(items) as item:
            hello(text=item).set_retry(num_retries=2)

    # the loop's driver and fan-out node, then per item its driver and DAG and the task (with its retry node)
    assert workflow_nodes(_ir(a_loop, tmp_path), 3) == 3 + 2 + 3 * (2 + 4)


def test_a_shard_too_large_for_one_argo_workflow_is_refused_before_anything_is_sent(tmp_path):
    from dreambooth.commands.submit import check_submission

    with pytest.raises(InputError) as refused:
        check_submission(load_config("gke-sd15", {"batch": {"max_subjects_per_run": 100}}))
    # gke-sd15: 45 nodes without a subject and 40 a subject (its stages, conditions, retries and class priors)
    assert str(refused.value) == ("batch.max_subjects_per_run: a shard of 100 subjects is a workflow of up to 4,045 Argo nodes, "
                                  "over the 1,000 one run can hold; use at most 23")
    check_submission(load_config("gke-sd15", {"batch": {"max_subjects_per_run": 23}}))
