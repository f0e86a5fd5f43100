"""manifests/: every resource valid against the Kubernetes schemas (offline), and each kustomization builds.

The build is a structural equivalent of `kustomize build` (no kustomize binary here): resources
and nested kustomizations are collected, the namespace and labels applied, and strategic-merge
patches merged into the resource they name, which must exist.
"""

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from conftest import REPO

MANIFESTS = REPO / "manifests"
KUBERNETES_VERSION = "1.31.0"
CLUSTER_SCOPED = {"Namespace", "PersistentVolume", "StorageClass", "ClusterRole", "ClusterRoleBinding"}


def _documents(path: Path) -> list[dict]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def _merge(target, patch):
    """Strategic merge, as kustomize does for the fields used here: maps merge, named lists merge by name."""
    if isinstance(target, dict) and isinstance(patch, dict):
        merged = dict(target)
        for key, value in patch.items():
            merged[key] = _merge(target[key], value) if key in target else value
        return merged
    if isinstance(target, list) and isinstance(patch, list) and all(isinstance(i, dict) and "name" in i for i in target + patch):
        by_name = {item["name"]: item for item in target}
        return [_merge(by_name[item["name"]], item) if item["name"] in by_name else item for item in patch] + [
            item for item in target if item["name"] not in {p["name"] for p in patch}
        ]
    return patch


def build(folder: Path) -> list[dict]:
    kustomization = yaml.safe_load((folder / "kustomization.yaml").read_text())
    resources: list[dict] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        assert path.exists(), f"{folder}/kustomization.yaml lists {entry}, which does not exist"
        resources += build(path) if path.is_dir() else _documents(path)
    for patch_entry in kustomization.get("patches", []):
        for patch in _documents(folder / patch_entry["path"]):
            key = (patch["kind"], patch["metadata"]["name"])
            matches = [i for i, r in enumerate(resources) if (r["kind"], r["metadata"]["name"]) == key]
            assert matches, f"{folder}: patch {patch_entry['path']} names {key}, which no resource is"
            resources[matches[0]] = _merge(resources[matches[0]], patch)
    for label_set in kustomization.get("labels", []):
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(label_set["pairs"])
    if "namespace" in kustomization:
        for resource in resources:
            if resource["kind"] not in CLUSTER_SCOPED:
                resource["metadata"]["namespace"] = kustomization["namespace"]
    return copy.deepcopy(resources)


ALL_FILES = sorted(p for p in MANIFESTS.rglob("*.yaml") if p.name != "kustomization.yaml")
PATCHES = {MANIFESTS / "overlays" / "dev" / name for name in ("mlflow-dev.yaml", "model-cache-dev.yaml", "kfp-launcher-dev.yaml")}


@pytest.mark.parametrize("path", [p for p in ALL_FILES if p not in PATCHES], ids=lambda p: str(p.relative_to(MANIFESTS)))
def test_every_manifest_is_valid_kubernetes(path):
    for document in _documents(path):
        kubernetes_validate.validate(document, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("kustomization", ["base", "overlays/dev"])
def test_each_kustomization_builds_into_valid_resources(kustomization):
    resources = build(MANIFESTS / kustomization)
    for resource in resources:
        kubernetes_validate.validate(resource, KUBERNETES_VERSION, strict=True)
    kinds = {(r["kind"], r["metadata"]["name"]) for r in resources}
    assert {("Deployment", "mlflow"), ("StatefulSet", "mlflow-postgres"), ("NetworkPolicy", "mlflow-ingress"),
            ("ServiceAccount", "dreambooth-pipeline-runner"), ("ConfigMap", "kfp-launcher")} <= kinds


def test_the_dev_overlay_lands_in_its_namespace_with_its_patches():
    resources = {(r["kind"], r["metadata"]["name"]): r for r in build(MANIFESTS / "overlays" / "dev")}
    mlflow = resources[("Deployment", "mlflow")]
    assert mlflow["metadata"]["namespace"] == "dreambooth-dev" and mlflow["spec"]["replicas"] == 1
    container = mlflow["spec"]["template"]["spec"]["containers"][0]
    assert "--artifacts-destination=gs://BUCKET-dev/mlflow-artifacts" in container["args"]
    assert container["readinessProbe"]["httpGet"]["path"] == "/health"  # kept from the base by the merge
    assert resources[("ConfigMap", "kfp-launcher")]["data"]["defaultPipelineRoot"] == "gs://BUCKET-dev/pipeline-root"
    assert "namespace" not in resources[("Namespace", "dreambooth-dev")]["metadata"]


def test_mlflow_reads_its_database_from_a_secret_and_no_secret_is_shipped():
    base = build(MANIFESTS / "base")
    assert not [r for r in base if r["kind"] == "Secret"]
    mlflow = next(r for r in base if r["kind"] == "Deployment")
    env = mlflow["spec"]["template"]["spec"]["containers"][0]["env"]
    assert env[0]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-db", "key": "uri"}
    runner = next(r for r in base if r["metadata"]["name"] == "dreambooth-pipeline-runner")
    assert "iam.gke.io/gcp-service-account" in runner["metadata"]["annotations"]
