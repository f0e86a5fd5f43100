"""`dreambooth preflight`: in seconds, what would otherwise fail after GPU time.

Each check is one line: the models every stage loads (a folder here, the hub reachable, or a
cached copy; HF_HUB_OFFLINE honoured), MLflow reachable *and accepting the host name the
pipeline's pods will send*, the pipeline root writable, the subjects readable, the image pinned,
and the KFP host reachable with the namespace; for a local run, whether this machine can train the
model at all. `run`, `experiment`, `submit` and `schedule` run it first.

From outside the cluster the in-cluster MLflow name does not resolve: `--mlflow-via` connects to
another address (a `kubectl port-forward`) while still sending the configured Host header.
"""

from __future__ import annotations

import http.client
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional
from urllib.parse import quote, urlsplit

from dreambooth.dag.kfp_runs import PROBE_SECONDS
from dreambooth.config import RunConfig
from dreambooth.errors import InputError

PLACEHOLDER_DIGEST = re.compile(r"@sha256:0{64}$")

# bench/cpu_step_bench.py on 2 CPU cores (torch 2.13 CPU build, 2 threads): one sd15 DreamBooth step, the
# UNet's forward, backward and AdamW on a subject and a class latent at 512 px, took 44.6 s.
CPU_SECONDS_PER_STEP, CPU_REFERENCE_PARAMETERS, CPU_REFERENCE_CORES = 44.6, 859.5e6, 2
# A local fine-tune estimated longer than this on a CPU is refused (--allow-cpu runs it anyway).
CPU_LIMIT_SECONDS = 3600


@dataclass(frozen=True)
class Check:
    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name:<24} {self.detail}"


def _run(name: str, probe: Callable[[], str]) -> Check:
    try:
        return Check(name, True, probe())
    except InputError as error:
        return Check(name, False, str(error).removeprefix(f"{name}: "))
    except Exception as error:  # a check that breaks is a failed check, reported like the others
        return Check(name, False, f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}")


def _tracking_headers(host: str) -> dict[str, str]:
    """The Host header pods will send, and MLflow's own credentials from the environment."""
    import base64

    headers = {"Host": host, "Accept": "application/json"}
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        headers["Authorization"] = f"Bearer {token}"
    elif (user := os.environ.get("MLFLOW_TRACKING_USERNAME")) and (password := os.environ.get("MLFLOW_TRACKING_PASSWORD")):
        headers["Authorization"] = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()
    return headers


def _get_status(target, path: str, headers: dict, through_proxy: bool) -> int:
    """The HTTP status of a GET. Directly to the configured server: through $HTTP(S)_PROXY as MLflow's client
    goes (urllib honours it and NO_PROXY); to a --mlflow-via address: straight there, with the configured Host."""
    import urllib.error
    import urllib.request

    if through_proxy:
        request = urllib.request.Request(f"{target.scheme}://{target.netloc.rsplit('@', 1)[-1]}{path}",
                                         headers={key: value for key, value in headers.items() if key != "Host"})
        try:
            with urllib.request.urlopen(request, timeout=PROBE_SECONDS) as response:
                return response.status
        except urllib.error.HTTPError as error:
            return error.code
    connection_class = http.client.HTTPSConnection if target.scheme == "https" else http.client.HTTPConnection
    connection = connection_class(target.hostname, target.port, timeout=PROBE_SECONDS)
    try:
        connection.request("GET", path, headers=headers)
        return connection.getresponse().status
    finally:
        connection.close()


def check_tracking(uri: Optional[str], experiment: str, via: Optional[str] = None, namespace: Optional[str] = None) -> str:
    from dreambooth.tracking import resolve_tracking_uri

    uri = resolve_tracking_uri(uri)
    if not uri.startswith(("http://", "https://")):
        return f"local store {uri}"
    configured, target = urlsplit(uri), urlsplit(via or uri)
    host = configured.netloc.rsplit("@", 1)[-1]
    path = f"{target.path.rstrip('/')}/api/2.0/mlflow/experiments/get-by-name?experiment_name={quote(experiment)}"
    try:
        status = _get_status(target, path, _tracking_headers(host), through_proxy=not via)
    except OSError as error:
        forward = f"kubectl -n {namespace or 'NAMESPACE'} port-forward svc/mlflow 5000, then --mlflow-via http://localhost:5000"
        hint = "" if via else f"; from outside the cluster: {forward}"
        raise InputError(f"tracking.uri: MLflow at {via or uri} is unreachable ({error}){hint}") from None
    if status == 403:
        raise InputError(f"tracking.uri: MLflow refuses the Host header {host!r} (403); list it in the server's --allowed-hosts (manifests/base/mlflow.yaml)")
    if status == 401:
        raise InputError("tracking.uri: MLflow wants credentials; set MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD")
    if status == 200:
        return f"{uri} accepts Host {host}; experiment {experiment!r} exists"
    if status == 404:
        return f"{uri} accepts Host {host}; experiment {experiment!r} is made by the first run"
    raise InputError(f"tracking.uri: MLflow answered {status} to an API request")


def check_image(image: str) -> str:
    if PLACEHOLDER_DIGEST.search(image):
        raise InputError("cluster.image: the digest is the shipped placeholder; build and push docker/Dockerfile, then pin the digest it printed")
    return image.rsplit("@", 1)[1][:19] + "..."


def check_compute(config: RunConfig, allow_cpu: bool) -> str:
    """A local run's fine-tune fits this machine: a real model on a machine without CUDA is refused
    with the time it would take (scaled from the measured sd15 step by the denoiser's size, the
    resolution and the cores), unless allow_cpu; the tiny models are made for CPUs."""
    from dreambooth.models.loading import denoiser_parameters
    from dreambooth.models.tiny import TINY_SCHEME

    if config.model.base.startswith(TINY_SCHEME):
        return "tiny model: made for a CPU"
    parameters = denoiser_parameters(config.model.base, config.model.revision)
    resolution = config.model.resolution or 512
    scale = ((parameters or CPU_REFERENCE_PARAMETERS) / CPU_REFERENCE_PARAMETERS) * (resolution / 512) ** 2
    seconds = config.training.max_steps * CPU_SECONDS_PER_STEP * scale * CPU_REFERENCE_CORES / (os.cpu_count() or 1)
    size = f"a {parameters / 1e6:,.0f}M-parameter denoiser" if parameters else "a full-size denoiser (its size unknown here: at least sd15's)"
    if seconds <= CPU_LIMIT_SECONDS:
        return f"{size}: about {seconds / 60:.0f} min of fine-tune on this CPU"
    from dreambooth.models.loading import best_device

    if best_device().type == "cuda":
        import torch

        return f"CUDA: {torch.cuda.get_device_name(0)}"
    estimate = f"{config.training.max_steps:,} steps of {size} at {resolution} px take about {seconds / 3600:,.0f} h on this CPU"
    if allow_cpu:
        return f"no CUDA GPU: {estimate} (--allow-cpu)"
    raise InputError(f"no CUDA GPU here, and {estimate} (model.base); run it on a GPU machine or a cluster (dreambooth submit), "
                     "use --config tiny for a demo, or pass --allow-cpu")


def check_subjects(config: RunConfig, subjects_uri: Optional[str], subject_uri: Optional[str]) -> str:
    """The subjects file parses and validates; every photos location holds files (listed, not downloaded)."""
    from dreambooth.storage import content_digests
    from dreambooth.catalogue.subjects import read_subjects

    locations = [entry.photos for entry in read_subjects(subjects_uri, config)] if subjects_uri else [subject_uri]
    empty = [location for location in locations if not content_digests(location)]
    if empty:
        raise InputError(f"no photos at {', '.join(empty)}")
    return f"{len(locations)} subject(s), photos present"


def run_preflight(
    config: RunConfig,
    target=None,
    mlflow_via: Optional[str] = None,
    subjects_uri: Optional[str] = None,
    subject_uri: Optional[str] = None,
    local: bool = False,
    allow_cpu: bool = False,
) -> list[Check]:
    """Every check, each reported whatever the others found; `local`: for a run on this machine (its compute too)."""
    from dreambooth.models.loading import describe_model_source, models_in_use
    from dreambooth.storage import check_writable, is_gcs

    checks = [
        _run(use.setting, lambda use=use: describe_model_source(use.reference, use.revision, use.setting))
        for use in models_in_use(config)
    ]
    checks.append(_run("tracking.uri", lambda: check_tracking(
        config.tracking.uri, config.tracking.experiment, mlflow_via, config.cluster.namespace if config.cluster else None)))
    if subjects_uri or subject_uri:
        checks.append(_run("subjects", lambda: check_subjects(config, subjects_uri, subject_uri)))
    if local:
        checks.append(_run("compute", lambda: check_compute(config, allow_cpu)))
    elif config.cluster is not None:
        checks.append(_run("cluster.image", lambda: check_image(config.cluster.image)))
        root = config.cluster.pipeline_root
        if root:
            checks.append(_run("cluster.pipeline_root", lambda: check_writable(root) if is_gcs(root) else f"{root} (not on GCS: not checked)"))
    if target is not None:
        checks.append(_run("kfp", target.probe))
    return checks


def report(checks: list[Check]) -> bool:
    for check in checks:
        print(check.line())
    failed = [check.name for check in checks if not check.ok]
    print(f"preflight: {len(checks) - len(failed)}/{len(checks)} passed" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return not failed
