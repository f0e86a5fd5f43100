"""The cluster path: compile the DAG with its Kubernetes settings, submit a run, schedule a recurring one.

A run's parameters carry the shared settings and *where* the subjects are (a subjects file URI),
never the list itself, so a recurring run reads the file anew at every tick and trains what was
added since the last one. A single subject (submit --subject-uri) travels inline instead.

A multi-user Kubeflow runs a pipeline in the namespace it is submitted to (the profile where
manifests/ put the PVC, secrets and service account) and wants credentials: a service-account
token file (refreshed by the kubelet, as Kubeflow's docs use), or a token or session cookie taken
from the environment.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dreambooth.config import RunConfig
from dreambooth.errors import InputError

CRON_FIELDS = ("second", "minute", "hour", "day of month", "month", "day of week")
CRON_RANGES = {0: (0, 59), 1: (0, 59), 2: (0, 23), 3: (1, 31), 4: (1, 12), 5: (0, 7)}


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


def compile_pipeline(config: RunConfig, output: Path, on_cluster: bool = False) -> Path:
    """Write the KFP IR YAML; the config becomes the default parameters, so a run changes by parameters only."""
    from kfp import compiler

    from dreambooth.pipeline import build_pipeline

    if on_cluster and config.cluster is None:
        raise InputError(f"config {config.name!r}: no `cluster` section; use a cluster config (e.g. --config gke-sd15)")
    compiler.Compiler().compile(build_pipeline(config, on_cluster), str(output), pipeline_parameters=run_parameters(config))
    return output


def validate_cron(expression: str) -> str:
    """KFP recurring runs take 6-field cron, seconds first; refuse anything else in one line."""
    fields = expression.split()
    example = "e.g. '0 0 9 * * 1-5' for 09:00 on weekdays"
    if len(fields) != 6:
        raise InputError(f"--cron: {expression!r} has {len(fields)} fields; KFP cron has 6, seconds first ({example})")
    for index, field in enumerate(fields):
        if not re.fullmatch(r"[0-9A-Za-z*?/,\-#LW]+", field):
            raise InputError(f"--cron: {CRON_FIELDS[index]} field {field!r} has characters cron does not use")
        low, high = CRON_RANGES[index]
        for number in re.findall(r"\d+", field.split("/")[0]):
            if not low <= int(number) <= high:
                raise InputError(f"--cron: {CRON_FIELDS[index]} {number} is outside {low}-{high} ({example})")
    return expression


TOKEN_ENV = "KF_PIPELINES_TOKEN"  # a bearer token obtained elsewhere (e.g. gcloud auth print-identity-token)
COOKIES_ENV = "KF_PIPELINES_COOKIES"  # a Dex/oauth2-proxy session, e.g. "authservice_session=..."
TOKEN_FILE_ENV = "KF_PIPELINES_SA_TOKEN_PATH"  # kfp's own name for a service-account token file
PROBE_SECONDS = 10  # one request to a service preflight or submit checks
WAIT_POLL_SECONDS = 15


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


def check_submission(config: RunConfig, cron: Optional[str] = None) -> None:
    """What submit refuses before contacting anything: a bad cron, a config without cluster settings."""
    if cron is not None:
        validate_cron(cron)
    if config.cluster is None:
        raise InputError(f"config {config.name!r}: no `cluster` section; submit a cluster config (e.g. --config gke-sd15)")


def submit(
    config: RunConfig, target: KfpTarget, experiment: str, parameters: dict,
    run_name: str, cron: Optional[str] = None, wait_seconds: Optional[int] = None, mlflow_via: Optional[str] = None,
) -> int:
    """Compile with the cluster settings and create a run (or, with cron, a recurring run) on a KFP v2 host.

    With `wait_seconds`, follow the run to its end: exit 0 only if it succeeded.
    """
    check_submission(config, cron)
    multi_user = target.multi_user()
    namespace = target.namespace if multi_user else None
    client = target.client(multi_user)
    account = config.cluster.service_account or ""
    host = target.host.rstrip("/")
    with tempfile.TemporaryDirectory() as scratch:
        package = compile_pipeline(config, Path(scratch) / "dreambooth.yaml", on_cluster=True)
        if cron is not None:
            experiment_id = client.create_experiment(experiment, namespace=namespace).experiment_id
            recurring = client.create_recurring_run(
                experiment_id=experiment_id, job_name=run_name, cron_expression=cron, pipeline_package_path=str(package),
                params=parameters, service_account=account,
            )
            print(f"recurring run: {recurring.recurring_run_id} ({cron})")
            print(f"url:           {host}/#/recurringrun/details/{recurring.recurring_run_id}")
            return 0
        result = client.create_run_from_pipeline_package(
            str(package), arguments=parameters, run_name=run_name, experiment_name=experiment,
            namespace=namespace, service_account=account,
        )
    print(f"run:          {result.run_id}")
    print(f"url:          {host}/#/runs/details/{result.run_id}")
    if wait_seconds is None:
        return 0
    try:
        state = str(client.wait_for_run_completion(result.run_id, timeout=wait_seconds, sleep_duration=WAIT_POLL_SECONDS).state).upper()
    except TimeoutError:
        state = f"still running after {wait_seconds} s"
    print(f"state:        {state}")
    print(f"mlflow:       {mlflow_link(config, result.run_id, mlflow_via)}")
    return 0 if state == "SUCCEEDED" else 1


def mlflow_link(config: RunConfig, kfp_run_id: str, via: Optional[str] = None) -> str:
    """The batch run's page in the MLflow UI, looked up through `via` (e.g. a port-forward), else where to find it."""
    from dreambooth.tracking import TAG_JOB_ID, find_batch_run

    search = f"{config.tracking.uri}, experiment {config.tracking.experiment!r}, tag {TAG_JOB_ID} = {kfp_run_id}"
    if not via:
        return search
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")  # a lookup, not worth minutes of retries
    try:
        run = find_batch_run(via, config.tracking.experiment, job_id=kfp_run_id)
    except Exception as error:  # the link is a convenience: the run's state is already known
        return f"{search} (lookup through {via} failed: {type(error).__name__})"
    if run is None:
        return f"{search} (no such run yet)"
    return f"{via.rstrip('/')}/#/experiments/{run.info.experiment_id}/runs/{run.info.run_id}"
