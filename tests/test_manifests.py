"""manifests/: what `kubectl kustomize` builds is valid Kubernetes and fits the pipeline that runs beside it.

Each overlay is built by kubectl itself (offline), so patches, images and namespaces are applied
exactly as `kubectl apply -k` will apply them.
"""

import re

import kubernetes_validate
import pytest
import yaml
from mlflow.server.security_utils import is_allowed_host_header

from conftest import MANIFESTS, REPO, by_kind, cli, container, expand, kustomize
from dreambooth.config import IN_CLUSTER_MLFLOW, load_config
from dreambooth.config_files import CONFIG_DIR

KUBERNETES_VERSION = "1.31.0"
OVERLAYS = sorted(p.parent.name for p in (MANIFESTS / "overlays").glob("*/kustomization.yaml"))
CLUSTER_CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if load_config(p.stem).cluster is not None)


@pytest.mark.parametrize("kustomization", ["base"] + [f"overlays/{o}" for o in OVERLAYS])
def test_each_kustomization_builds_into_valid_resources(kustomization):
    resources = kustomize(MANIFESTS / kustomization)
    for resource in resources:
        if resource["apiVersion"].startswith("kubeflow.org/"):  # Kubeflow's own kinds: no Kubernetes schema
            continue
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    assert {("Deployment", "mlflow"), ("StatefulSet", "mlflow-postgres"), ("NetworkPolicy", "mlflow-ingress"),
            ("ServiceAccount", "dreambooth-pipeline-runner"), ("ConfigMap", "kfp-launcher"),
            ("Job", "model-cache-prepare")} <= set(by_kind(resources))


def test_the_dev_overlay_lands_in_its_namespace_with_its_patches_and_pinned_images():
    resources = by_kind(kustomize(MANIFESTS / "overlays" / "dev"))
    mlflow = resources[("Deployment", "mlflow")]
    assert mlflow["metadata"]["namespace"] == "dreambooth-dev" and mlflow["spec"]["replicas"] == 1
    server = container(mlflow, "mlflow")
    env = {e["name"]: e.get("value") for e in server["env"]}
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "gs://BUCKET-dev/mlflow-artifacts"
    assert server["readinessProbe"]["httpGet"]["path"] == "/health"  # kept from the base by the merge
    assert resources[("ConfigMap", "kfp-launcher")]["data"]["defaultPipelineRoot"] == "gs://BUCKET-dev/pipeline-root"
    for resource in (mlflow, resources[("Job", "model-cache-prepare")]):
        ours = [c for c in resource["spec"]["template"]["spec"]["containers"] if "dreambooth" in c["image"]]
        assert ours and all("@sha256:" in c["image"] for c in ours)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_mlflow_accepts_every_name_pipeline_pods_use_for_its_service(overlay):
    """MLflow 3.17 refuses unknown Host headers with 403; the allow-list must cover the Service in this namespace."""
    resources = by_kind(kustomize(MANIFESTS / "overlays" / overlay))
    mlflow = resources[("Deployment", "mlflow")]
    namespace = mlflow["metadata"]["namespace"]
    server = container(mlflow, "mlflow")
    args = [expand(arg, {"POD_NAMESPACE": namespace}) for arg in server["args"]]
    (allowed,) = [arg.split("=", 1)[1].split(",") for arg in args if arg.startswith("--allowed-hosts=")]
    for host in ("mlflow:5000", f"mlflow.{namespace}:5000", f"mlflow.{namespace}.svc:5000",
                 f"mlflow.{namespace}.svc.cluster.local:5000", "localhost:5000"):
        assert is_allowed_host_header(allowed, host), host
    assert not is_allowed_host_header(allowed, "mlflow.elsewhere.svc.cluster.local:5000")
    assert "*" not in allowed  # a wildcard would accept DNS-rebinding requests


def test_the_mlflow_image_has_the_database_driver_and_the_gcs_client():
    resources = by_kind(kustomize(MANIFESTS / "base"))
    assert container(resources[("Deployment", "mlflow")], "mlflow")["image"] == "dreambooth-mlflow"
    dockerfile = (REPO / "docker" / "mlflow.Dockerfile").read_text()
    assert "docker/mlflow-requirements.txt" in dockerfile
    pins = dict(line.split("#")[0].strip().split("==") for line in (REPO / "docker" / "mlflow-requirements.txt").read_text().splitlines()
                if "==" in line)
    assert {"mlflow", "psycopg[binary]", "google-cloud-storage"} <= set(pins)


@pytest.mark.parametrize("name", CLUSTER_CONFIGS)
def test_each_cluster_config_tracks_to_the_mlflow_of_a_deployed_namespace(name):
    config = load_config(name)
    deployed = {}
    for overlay in OVERLAYS:
        resources = by_kind(kustomize(MANIFESTS / "overlays" / overlay))
        deployed[resources[("Deployment", "mlflow")]["metadata"]["namespace"]] = resources
    assert config.cluster.namespace in deployed, f"{name}: cluster.namespace is no overlay's namespace"
    assert config.tracking.uri == IN_CLUSTER_MLFLOW.format(namespace=config.cluster.namespace)
    resources = deployed[config.cluster.namespace]
    assert config.cluster.pipeline_root == resources[("ConfigMap", "kfp-launcher")]["data"]["defaultPipelineRoot"]
    assert ("PersistentVolumeClaim", config.cluster.model_cache_pvc) in resources
    assert ("ServiceAccount", config.cluster.service_account) in resources


def test_the_cache_volume_is_made_writable_for_the_pipeline_user_before_it_is_filled(tmp_path):
    config = load_config("gke-sd15")
    compiled = tmp_path / "dreambooth.yaml"
    assert cli("compile", "--config", "gke-sd15", "--output", str(compiled), "--allow-placeholders", cwd=tmp_path).returncode == 0
    _, platform = yaml.safe_load_all(compiled.read_text())
    executors = platform["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    claims = {mount["constant"] for e in executors.values() for mount in e.get("pvcMount", [])}
    users = {int(e["securityContext"]["runAsUser"]) for e in executors.values()}
    assert claims == {config.cluster.model_cache_pvc} and users == {config.cluster.run_as_user}

    job = by_kind(kustomize(MANIFESTS / "overlays" / "dev"))[("Job", "model-cache-prepare")]
    pod = job["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("persistentVolumeClaim")]
    assert volume["persistentVolumeClaim"]["claimName"] == config.cluster.model_cache_pvc
    assert pod["securityContext"]["fsGroup"] == config.cluster.run_as_user  # block volumes
    owner = container(job, "own-cache")  # NFS (Filestore) ignores fsGroup: a root step sets the owner
    assert owner["securityContext"]["runAsUser"] == 0 and "CHOWN" in owner["securityContext"]["capabilities"]["add"]
    script = " ".join(owner["args"])
    assert f"chown {config.cluster.run_as_user}:{config.cluster.run_as_user} /cache " in script
    warm = container(job, "warm-cache")
    assert warm["securityContext"]["runAsUser"] == config.cluster.run_as_user
    assert warm["command"] == ["dreambooth", "warm-cache"] and warm["args"] == ["--config", "gke-sd15"]


def test_mlflow_reads_its_database_from_a_secret_and_no_secret_is_shipped():
    base = by_kind(kustomize(MANIFESTS / "base"))
    assert not [key for key in base if key[0] == "Secret"]
    env = {e["name"]: e for e in container(base[("Deployment", "mlflow")], "mlflow")["env"]}
    assert env["MLFLOW_BACKEND_STORE_URI"]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    runner = base[("ServiceAccount", "dreambooth-pipeline-runner")]
    assert "iam.gke.io/gcp-service-account" in runner["metadata"]["annotations"]


def test_the_component_image_installs_bitsandbytes_for_8bit_adam():
    dockerfile = (REPO / "docker" / "Dockerfile").read_text()
    installs = " ".join(line for line in dockerfile.splitlines() if "pip install" in line)
    assert "-r gpu-requirements.txt" in installs and "docker/gpu-requirements.txt" in dockerfile
    assert re.search(r"^bitsandbytes==\d", (REPO / "docker" / "gpu-requirements.txt").read_text(), re.M)


def test_the_shard_launcher_gets_its_kfp_api_token_from_the_pod_default(tmp_path):
    """The label the launch task carries is the one the PodDefault selects, and the token lands where kfp.Client reads it."""
    from kfp import client as kfp_client

    from dreambooth.commands.submit import compile_pipeline

    spec = list(yaml.safe_load_all(compile_pipeline(load_config("gke-sd15"), tmp_path / "launcher.yaml", on_cluster=True, launcher=True).read_text()))
    labels = spec[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]["exec-launch-shards"]["podMetadata"]["labels"]
    default = by_kind(kustomize(MANIFESTS / "overlays" / "dev"))[("PodDefault", "access-ml-pipeline")]
    assert default["metadata"]["namespace"] == "dreambooth-dev"  # a PodDefault acts in its own namespace only
    assert default["spec"]["selector"]["matchLabels"] == labels
    (mount,) = default["spec"]["volumeMounts"]
    (source,) = next(v for v in default["spec"]["volumes"] if v["name"] == mount["name"])["projected"]["sources"]
    token_path = f"{mount['mountPath']}/{source['serviceAccountToken']['path']}"
    assert source["serviceAccountToken"]["audience"] == "pipelines.kubeflow.org"
    assert {e["name"]: e["value"] for e in default["spec"]["env"]} == {kfp_client.KF_PIPELINES_SA_TOKEN_ENV: token_path}
    assert token_path == kfp_client.KF_PIPELINES_SA_TOKEN_PATH
