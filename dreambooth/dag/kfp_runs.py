"""Runs of the pipeline on a KFP host: where and as whom they are created (KfpTarget), with which
parameters (run_parameters), and the shards of a sharded batch created from inside the cluster.

A multi-user Kubeflow runs a pipeline in the namespace it is submitted to (the profile where
manifests/ put the PVC, secrets and service account) and wants credentials: a service-account
token file (refreshed by the kubelet, as Kubeflow's docs use), or a token or session cookie taken
from the environment.
"""

from __future__ import annotations

import json
import os
import tempfile
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dreambooth.config import RunConfig
from dreambooth.errors import InputError


def run_parameters(config: RunConfig, subjects_uri: str = "", subjects_json: str = "", force: bool = False) -> dict:
    """The pipeline's runtime parameters: shared settings, the subjects' location (or inline entries)."""
    return {
        "config_json": config.to_json(),
        "tracking_uri": config.tracking.uri or "",
        "subjects_uri": subjects_uri,
        "subjects_json": subjects_json,
        "force": force,
        "superres_enabled": config.superres.enabled,
        **config.run_settings(),
    }


def compile_dag(config: RunConfig, output: Path, on_cluster: bool = False) -> Path:
    """The DAG as KFP IR YAML; the config becomes the default parameters, so a run changes by parameters only."""
    from kfp import compiler

    from dreambooth.dag.pipeline import build_pipeline

    compiler.Compiler().compile(build_pipeline(config, on_cluster), str(output), pipeline_parameters=run_parameters(config))
    return output


TOKEN_ENV = "KF_PIPELINES_TOKEN"  # a bearer token obtained elsewhere (e.g. gcloud auth print-identity-token)
COOKIES_ENV = "KF_PIPELINES_COOKIES"  # a Dex/oauth2-proxy session, e.g. "authservice_session=..."
TOKEN_FILE_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp's own name for a service-account token file
PROBE_SECONDS = 10  # one request to a service preflight or submit checks


@dataclass(frozen=True)
class KfpTarget:
    """Where and as whom runs are submitted."""

    host: str
    namespace: Optional[str] = None
    token_file: Optional[str] = None

    def _token_file(self) -> Optional[Path]:
        path = self.token_file or os.environ.get(TOKEN_FILE_ENV)
        if path and not Path(path).is_file():
            raise InputError(f"--token-file: {path} is not a file")
        return Path(path) if path else None

    def bearer_token(self) -> Optional[str]:
        path = self._token_file()
        return path.read_text().strip() if path else os.environ.get(TOKEN_ENV) or None

    def client(self, multi_user: bool):
        import kfp
        from kfp.client.set_volume_credentials import ServiceAccountTokenVolumeCredentials

        path = self._token_file()
        credentials = ServiceAccountTokenVolumeCredentials(str(path)) if path else None
        # "kubeflow" is kfp.Client's "no namespace": a single-user KFP takes none.
        return kfp.Client(
            host=self.host, namespace=self.namespace if multi_user and self.namespace else "kubeflow", credentials=credentials,
            existing_token=None if path else os.environ.get(TOKEN_ENV), cookies=os.environ.get(COOKIES_ENV),
        )

    def multi_user(self) -> bool:
        """Ask the host (once, short timeout, with the credentials) whether it is a multi-user Kubeflow."""
        headers = {"Accept": "application/json"}
        if token := self.bearer_token():
            headers["Authorization"] = f"Bearer {token}"
        if cookies := os.environ.get(COOKIES_ENV):
            headers["Cookie"] = cookies
        try:
            request = urllib.request.Request(f"{self.host.rstrip('/')}/apis/v2beta1/healthz", headers=headers)
            with urllib.request.urlopen(request, timeout=PROBE_SECONDS) as response:
                return bool(json.loads(response.read() or b"{}").get("multi_user"))
        except urllib.error.HTTPError as error:
            raise InputError(f"--host: {self.host} answered {error.code} {error.reason}{_credentials_hint(error.code)}") from None
        except (OSError, ValueError) as error:
            raise InputError(f"--host: {self.host} is unreachable ({error})") from None

    def probe(self) -> str:
        """The host answers, accepts the credentials, and (multi-user) lists the namespace's experiments."""
        if not self.multi_user():
            return f"{self.host} (single-user: runs execute in KFP's own namespace; manifests/ must be deployed there)"
        if not self.namespace:
            raise InputError("--namespace: this Kubeflow is multi-user; give the profile namespace (or cluster.namespace)")
        import kfp_server_api

        try:
            self.client(multi_user=True).list_experiments(page_size=1, namespace=self.namespace)
        except kfp_server_api.ApiException as error:
            raise InputError(f"--namespace: {self.namespace!r} on {self.host}: {error.status} {error.reason}{_credentials_hint(error.status)}") from None
        return f"{self.host} (multi-user, namespace {self.namespace})"


def _credentials_hint(status: int) -> str:
    if status in (401, 403):
        return f"; pass --token-file, or set {TOKEN_ENV} or {COOKIES_ENV}, with access to the namespace"
    return ""


@contextmanager
def shard_launcher(config_json: str, tracking_uri: str, kfp_experiment: str, job_name: str, force: bool, run_settings: dict):
    """Inside the cluster, `launch` for dreambooth.tasks.launch: each shard becomes a run of the DAG, created
    through the KFP API at cluster.kfp_host with the pod's pipelines token (Kubeflow's PodDefault)."""
    from dreambooth.catalogue.subjects import entries_to_json

    config = RunConfig.from_json(config_json).with_run_settings(run_settings)
    config = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": tracking_uri})})
    target = KfpTarget(config.cluster.kfp_host, config.cluster.namespace)
    multi_user = target.multi_user()
    kfp = target.client(multi_user)
    with tempfile.TemporaryDirectory() as scratch:
        package = str(compile_dag(config, Path(scratch) / "dreambooth.yaml", on_cluster=True))

        def launch(shard, entries) -> str:
            arguments = {**run_parameters(config, subjects_json=entries_to_json(entries), force=force), "shard": shard.to_json()}
            created = kfp.create_run_from_pipeline_package(
                package, arguments=arguments, run_name=f"{job_name}-shard-{shard.index}-of-{shard.of}", experiment_name=kfp_experiment,
                namespace=target.namespace if multi_user else None, service_account=config.cluster.service_account or "",
            )
            return created.run_id

        yield launch
