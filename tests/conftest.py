"""Shared fixtures: the offline tiny model, a tiny config, the sample subject, a real MLflow server."""

from __future__ import annotations

import json
import inspect
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Optional

import pytest

from tests.services import MlflowServer, _free_port, start_postgres  # noqa: F401 (tests import them from here)
from tests import process_budget

# Every process a test starts from here on writes to the ledger the process budget counts (tests/process_budget.py).
process_budget.start_ledger()

# Under pytest-xdist every worker (and each process it starts) gets one thread for torch's math:
# two workers of the default two threads each on two cores run slower than one worker alone.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("MKL_NUM_THREADS", "1")


def _name_the_frames_without_source() -> None:
    """kfp calls inspect.stack() for each task setting it applies, and for a frame whose file no module holds
    (`python -m pytest`'s `<frozen runpy>`, an xdist worker's `xdist/remote.py`, run by exec) inspect scans every module
    in sys.modules: ~0.1 s a call once torch is loaded, 15 s for one cluster DAG built in a worker. Those frames lie
    under every test; recording once that no module holds them gives inspect the answer its scan finds."""
    frame = sys._getframe()
    while frame is not None:
        filename = frame.f_code.co_filename
        if inspect.getmodule(frame.f_code, filename) is None:
            inspect.modulesbyfile[filename] = "<no module>"
        frame = frame.f_back


_name_the_frames_without_source()



def pytest_addoption(parser):
    parser.addoption("--process-budget", metavar="NAME", help="hold the run to tests/process_budget.json's NAME section "
                     "(make test: test; make test-fast: test-fast): fail when a test file starts more whole-pipeline "
                     "runs or torch processes than its budget")
    parser.addoption("--process-budget-write", action="store_true", help="with --process-budget: write this run's counts as the budget")


def pytest_configure(config):
    # A plugin, not a conftest hook: a session fixture's setup runs on the session's node, which sees no conftest below the root.
    config.pluginmanager.register(process_budget.FixtureSetups(), "process-budget-fixture-setups")


def pytest_sessionfinish(session, exitstatus):
    """The suite's last step (the controller, once every worker is done): count what the tests started."""
    config = session.config
    if hasattr(config, "workerinput"):
        return
    per_test = process_budget.read_ledger(Path(os.environ["DREAMBOOTH_TEST_LEDGER"]))
    files = process_budget.by_file(per_test)
    total = {kind: sum(counts[kind] for counts in files.values()) for kind in process_budget.KINDS}
    config._process_budget_lines = [f"processes started: {total['pipeline']} whole-pipeline runs, {total['torch']} torch processes"]
    name = config.getoption("--process-budget")
    if not name:
        return
    budgets = json.loads(process_budget.BUDGET_FILE.read_text()) if process_budget.BUDGET_FILE.exists() else {}
    if config.getoption("--process-budget-write"):
        budgets[name] = process_budget.as_budget(per_test)
        process_budget.BUDGET_FILE.write_text(json.dumps(budgets, indent=1, sort_keys=True) + "\n")
        config._process_budget_lines.append(f"written as the {name!r} budget in {process_budget.BUDGET_FILE.name}")
        return
    over = process_budget.over_budget(per_test, budgets.get(name, {}))
    if over:
        config._process_budget_lines += ["OVER THE PROCESS BUDGET (a new scenario joins an existing run; "
                                         "the budget rises only in a commit that says why):", *over]
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    for line in getattr(config, "_process_budget_lines", []):
        terminalreporter.write_line(line)


def pytest_collection_modifyitems(config, items):
    """`--dist loadgroup` (make test): tests marked xdist_group("name") run on one worker.

    pytest-xdist 3.8 tags a grouped test by rewriting `item._nodeid`, which pytest 9 no longer reads
    (a node keeps its id as `item._id`), so its groups are silently ignored and a whole batch built by
    a session fixture is built again on the other worker. This tags them the way pytest 9 keeps ids;
    `coerce_node_id` is pytest's own, and its import fails loudly if pytest moves it.
    """
    # The long tests first, the longest before the others (`slow(seconds=N)`, measured on 2 cores;
    # a stable sort keeps a module's order): the workers then end together instead of one waiting
    # on a long run handed out last. make test keeps this order (--no-loadscope-reorder).
    def cost(item) -> tuple:
        slow = item.get_closest_marker("slow")
        return (slow is None, -(slow.kwargs.get("seconds", 0) if slow else 0))

    items.sort(key=cost)
    if not (os.environ.get("PYTEST_XDIST_WORKER") and config.getvalue("loadgroup")):
        return
    from _pytest.nodeid import coerce_node_id

    for item in items:
        names = sorted({str(mark.args[0] if mark.args else mark.kwargs.get("name", "default")) for mark in item.iter_markers("xdist_group")})
        if names and "@" not in item.nodeid:
            item._id = coerce_node_id(f"{item.nodeid}@{'_'.join(names)}")


REPO = Path(__file__).resolve().parent.parent
SAMPLE_SUBJECT = REPO / "examples" / "subjects" / "dog"
SAMPLE_OBJECT = REPO / "examples" / "subjects" / "backpack"


def cli(*args, cwd=None, env=None, timeout=900, in_process=None) -> subprocess.CompletedProcess:
    """`dreambooth ...` as a user runs it: its exit status, stdout and stderr.

    A whole `run` or `experiment` (kfp.local, its own stdout handling) and a command whose environment changes what
    huggingface_hub reads when it is imported (HF_*) run in their own process, as `python pipeline.py`;
    the others run in this one (an interpreter start, with torch and MLflow imported, costs seconds),
    in `cwd` with `env`, both restored after. `in_process=False` forces the subprocess: the smoke tests.
    """
    environment = dict(os.environ) if env is None else dict(env)
    hub_changed = any(environment.get(key) != os.environ.get(key) for key in {*environment, *os.environ} if key.startswith("HF_"))
    if in_process is None:
        in_process = args[0] not in ("run", "experiment") and not hub_changed
    if not in_process:
        return subprocess.run([sys.executable, str(REPO / "pipeline.py"), *args], cwd=cwd, capture_output=True, text=True,
                              env=environment, timeout=timeout)
    return _cli_in_process(list(args), cwd, environment)


def _cli_in_process(args: list[str], cwd, environment: dict) -> subprocess.CompletedProcess:
    import contextlib
    import io
    import signal

    from dreambooth.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_environment, saved_cwd = dict(os.environ), os.getcwd()
    handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGALRM)}
    os.environ.clear()
    os.environ.update(environment)
    try:
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(args)
            except SystemExit as exit:  # argparse's refusals
                code = exit.code if isinstance(exit.code, int) else 2
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_environment)
        for number, handler in handlers.items():
            signal.signal(number, handler)
    return subprocess.CompletedProcess(["dreambooth", *args], code, out.getvalue(), err.getvalue())


STATE_LINE = re.compile(r"^\d\d:\d\d:\d\d  (\S+)\s+(\S+)\s+(running|done|failed|skipped)\b")


def stage_states(stdout: str) -> dict[tuple[str, str], list[str]]:
    """`run`'s compact output as {(subject or batch, stage): the states it printed, in order}."""
    states: dict[tuple[str, str], list[str]] = {}
    for line in stdout.splitlines():
        found = STATE_LINE.match(line)
        if found:
            states.setdefault((found[1], found[2]), []).append(found[3])
    return states


def quick_config(folder: Path, experiment="dreambooth", gate=None, superres=True, base="tiny", select=None, **training) -> str:
    """The tiny config (or `base`, a tiny config extending it), shrunk further so a whole pipeline run
    takes well under a minute per subject; `select`: evaluation.select."""
    import yaml

    from dreambooth.config_files import CONFIG_DIR, merge_settings

    path = folder / f"quick-{experiment}.yaml"
    raw = yaml.safe_load((CONFIG_DIR / "tiny.yaml").read_text())
    if base != "tiny":
        family = yaml.safe_load((CONFIG_DIR / f"{base}.yaml").read_text())
        assert family.pop("extends") == "tiny"
        raw = merge_settings(raw, family)
    raw["priors"]["num_class_images"] = 4
    # The tiny model draws noise whatever the steps: two are enough to run every sampler's code.
    for section in ("priors", "samples", "evaluation", "superres"):
        raw[section]["sampler"]["num_inference_steps"] = 2
    raw["training"].update({"max_steps": 8, "checkpoint_every": 4, **training})
    raw["tracking"] = {"experiment": experiment}
    raw["superres"].update({"enabled": superres, "training": {"max_steps": 6, "learning_rate": 1.0e-4, "checkpoint_every": 3}})
    raw["evaluation"].update({"max_prompts_per_category": 1, "gate": gate or raw["evaluation"]["gate"], "select": select})
    raw["samples"].update({"images_per_prompt": 1, "prompts": ["a {identifier} {class_noun} on the beach", "a {identifier} {class_noun} in the snow"]})
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def dag_tasks(spec: dict) -> dict:
    """Every task of the compiled DAG, nested groups included: {task name: (enclosing component, task spec)}."""
    found = {}
    for component, body in spec["components"].items():
        for name, task in body.get("dag", {}).get("tasks", {}).items():
            found[name] = (component, task)
    found.update({name: ("root", task) for name, task in spec["root"]["dag"]["tasks"].items()})
    return found


def copy_photos(source: Path, target: Path, names: list[str]) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copyfile(source / name, target / name)
    return target


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Tiny models are built once per test session, in a private cache (subprocesses inherit it); under
    pytest-xdist the workers share one (a model folder appears only complete, by rename)."""
    shared = tmp_path_factory.getbasetemp().parent / "model-cache" if os.environ.get("PYTEST_XDIST_WORKER") else None
    cache = Path(os.environ.get("DREAMBOOTH_TEST_CACHE") or shared or tmp_path_factory.mktemp("model-cache"))
    os.environ["DREAMBOOTH_CACHE"] = str(cache)
    return cache


@pytest.fixture(scope="session")
def tiny_model_dir(model_cache) -> Path:
    from dreambooth.models.loading import resolve_model_source

    return Path(resolve_model_source("tiny://sd"))


@pytest.fixture
def subject_dir(tmp_path) -> Path:
    target = tmp_path / "dog"
    shutil.copytree(SAMPLE_SUBJECT, target)
    return target


@pytest.fixture
def make_config(tmp_path):
    """The shipped tiny config with test-sized overrides (nested dicts merge into it)."""
    from dreambooth.config import load_config

    def make(**sections):
        overrides = {"subject": {"class_noun": "dog", "name": "dog"}, "storage": {"work_dir": str(tmp_path / "work")}}
        for section, values in sections.items():
            overrides[section] = {**overrides.get(section, {}), **values}
        return load_config("tiny", overrides)

    return make


def _serve_mlflow(root: Path, artifacts_destination: str):
    server = MlflowServer(root, artifacts_destination).start()
    yield server.uri
    server.stop()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    root = tmp_path_factory.mktemp("mlflow-server")
    yield from _serve_mlflow(root, str(root / "artifacts"))


GCS_BUCKET = "dreambooth-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    """A real GCS JSON API emulator (gcp-storage-emulator) on 127.0.0.1; subprocesses inherit its address."""
    from gcp_storage_emulator.server import create_server

    port = _free_port()
    server = create_server("127.0.0.1", port, in_memory=True, default_bucket=GCS_BUCKET)
    server.start()
    os.environ["STORAGE_EMULATOR_HOST"] = f"http://127.0.0.1:{port}"
    os.environ["GOOGLE_CLOUD_PROJECT"] = "dreambooth-test"
    yield GCS_BUCKET
    server.stop()
    os.environ.pop("STORAGE_EMULATOR_HOST", None)


class FaultyGcsProxy(ThreadingHTTPServer):
    """A proxy on 127.0.0.1 in front of the GCS emulator that fails a bounded number of requests, in
    turn: a 503, a request left hanging (past the client's timeout), a connection dropped unanswered.
    Faults hit before the emulator sees the request; every other request is forwarded as it is, with
    the emulator's address in headers and bodies (resumable session URLs, media links) rewritten."""

    KINDS = ("503", "hang", "drop")
    daemon_threads, block_on_close = True, False  # a hanging request never holds up the test's end

    def __init__(self, upstream: str, faults: int, every: int = 2, hang_seconds: float = 20.0):
        super().__init__(("127.0.0.1", 0), _ProxyHandler)
        self.upstream, self.faults_left, self.every, self.hang_seconds = upstream, faults, every, hang_seconds
        self.address = f"http://127.0.0.1:{self.server_address[1]}"
        self.requests, self.injected = 0, {kind: 0 for kind in self.KINDS}
        self.lock = threading.Lock()

    def next_fault(self) -> Optional[str]:
        with self.lock:
            self.requests += 1
            if self.faults_left <= 0 or self.requests % self.every:
                return None
            self.faults_left -= 1
            kind = self.KINDS[sum(self.injected.values()) % len(self.KINDS)]
            self.injected[kind] += 1
            return kind


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def _handle(self):
        import http.client
        from urllib.parse import urlsplit

        proxy: FaultyGcsProxy = self.server
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        fault = proxy.next_fault()
        if fault == "503":
            payload = b'{"error": {"code": 503, "message": "injected"}}'
            self.send_response(503)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if fault in ("hang", "drop"):
            if fault == "hang":
                time.sleep(proxy.hang_seconds)
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        upstream = urlsplit(proxy.upstream)
        connection = http.client.HTTPConnection(upstream.hostname, upstream.port, timeout=60)
        headers = {key: value for key, value in self.headers.items() if key.lower() not in ("host", "content-length")}
        connection.request(self.command, self.path, body=body or None, headers=headers)
        response = connection.getresponse()
        payload = response.read().replace(proxy.upstream.encode(), proxy.address.encode())
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("content-length", "transfer-encoding", "connection", "server", "date"):
                self.send_header(key, value.replace(proxy.upstream, proxy.address))
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)
        connection.close()

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def faulty_gcs(gcs_emulator, monkeypatch):
    """The emulator behind FaultyGcsProxy for this test; storage calls time out after 1.5 s."""
    proxy = FaultyGcsProxy(os.environ["STORAGE_EMULATOR_HOST"], faults=9)
    thread = threading.Thread(target=proxy.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("STORAGE_EMULATOR_HOST", proxy.address)
    monkeypatch.setenv("DREAMBOOTH_GCS_TIMEOUT", "1.5")
    yield proxy
    proxy.shutdown()
    proxy.server_close()


@pytest.fixture(scope="session")
def postgres():
    """A real PostgreSQL server (the machine image's PostgreSQL 15 binaries) on a loopback port: yields a
    libpq URI for a fresh `mlflow` database (tests/services.py)."""
    if not shutil.which("initdb"):
        pytest.fail("PostgreSQL server binaries (initdb, pg_ctl) are not on PATH")
    uri, stop = start_postgres()
    yield uri
    stop()


# ---- the cluster side, as far as it runs here -------------------------------------------------

MANIFESTS = REPO / "manifests"


def kustomize(folder: Path) -> list[dict]:
    """What `kubectl kustomize` (the same build `kubectl apply -k` applies) makes of a folder."""
    import yaml

    result = subprocess.run(["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def by_kind(resources: list[dict]) -> dict:
    return {(r["kind"], r["metadata"]["name"]): r for r in resources}


def expand(value: str, env: dict[str, str]) -> str:
    """$(VAR) in a container's command and args, as the kubelet expands it; unknown names stay."""
    import re

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", lambda m: env.get(m.group(1), m.group(0)), value)


def container(resource: dict, name: str) -> dict:
    spec = resource["spec"]["template"]["spec"]
    return next(c for c in spec.get("initContainers", []) + spec["containers"] if c["name"] == name)


@pytest.fixture(scope="session")
def deployed_mlflow(tmp_path_factory, postgres, gcs_emulator):
    """`mlflow server` exactly as manifests/overlays/dev runs it: yields (namespace, local address, log path).

    The command and arguments are the Deployment's, `$(VAR)` expanded as the kubelet does; only the
    database URI (a real PostgreSQL) and the bucket (on the GCS emulator) are put in.
    """
    resources = by_kind(kustomize(MANIFESTS / "overlays" / "dev"))
    mlflow = resources[("Deployment", "mlflow")]
    namespace, server = mlflow["metadata"]["namespace"], container(mlflow, "mlflow")
    env = {}
    for variable in server["env"]:
        if variable["name"] == "POD_NAMESPACE":
            env["POD_NAMESPACE"] = namespace
        elif variable["name"] == "MLFLOW_BACKEND_STORE_URI":
            env["MLFLOW_BACKEND_STORE_URI"] = postgres  # the mlflow-db Secret's `uri`
        else:
            env[variable["name"]] = variable["value"].replace("gs://BUCKET-dev/", f"gs://{gcs_emulator}/")
    command = [expand(part, env) for part in server["command"] + server["args"]]
    assert not [part for part in command if "$(" in part], command
    command[0] = str(Path(sys.executable).parent / command[0])  # the same mlflow, from this environment
    (port,) = [int(part.split("=", 1)[1]) for part in command if part.startswith("--port=")]
    log_path = tmp_path_factory.mktemp("deployed-mlflow") / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    address = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2):
                break
        except OSError:
            if process.poll() is not None or time.time() > deadline:
                process.kill()
                pytest.fail(f"the manifest's mlflow server did not start (port {port} busy?):\n{log_path.read_text()[-2000:]}")
            time.sleep(0.5)
    yield namespace, address, log_path
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


class RecordingKfpApi(BaseHTTPRequestHandler):
    """Answers the calls kfp.Client makes in KFP's v2beta1 REST shape and keeps (method, path, body, headers with
    lower-case names) of each: healthz, experiments, runs, and, holding them as the API server does, named
    pipelines with their versions (uploaded packages) and recurring runs (listed by name, paused, resumed,
    deleted). With `token` set, a request without that bearer token gets 401, as a multi-user Kubeflow answers."""

    requests: list = []
    multi_user = False
    token: Optional[str] = None
    run_state = "SUCCEEDED"
    experiments: dict = {}  # (namespace, name) -> id
    pipelines: dict = {}  # id -> {"display_name", "versions": [{"pipeline_version_id", "display_name", "package"}]}
    recurring_runs: dict = {}  # id -> the recurring run as created, its mode kept current

    @classmethod
    def reset(cls) -> None:
        cls.requests, cls.experiments, cls.pipelines, cls.recurring_runs = [], {}, {}, {}
        cls.multi_user, cls.token, cls.run_state = False, None, "SUCCEEDED"

    def _reply(self, body: dict, status: int = 200) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _refused(self) -> bool:
        if self.token and self.headers.get("Authorization") != f"Bearer {self.token}":
            self._reply({"error": "unauthenticated"}, status=401)
            return True
        return False

    def _query(self) -> tuple[str, dict]:
        from urllib.parse import parse_qs, urlsplit

        parts = urlsplit(self.path)
        return parts.path, {key: values[0] for key, values in parse_qs(parts.query).items()}

    @staticmethod
    def _named(items: list, query: dict) -> list:
        """KFP's `filter`, as kfp.Client sends it: display_name EQUALS a value."""
        if "filter" not in query:
            return items
        (predicate,) = json.loads(query["filter"])["predicates"]
        return [item for item in items if item["display_name"] == predicate["stringValue"]]

    def do_GET(self):
        self.requests.append(("GET", self.path, None, {k.lower(): v for k, v in self.headers.items()}))
        if self._refused():
            return
        path, query = self._query()
        if path == "/apis/v2beta1/healthz":
            self._reply({"multi_user": self.multi_user})
        elif path == "/apis/v2beta1/experiments":  # a multi-user KFP keeps each namespace's apart
            found = [{"experiment_id": id_, "display_name": name} for (namespace, name), id_ in self.experiments.items()
                     if namespace == query.get("namespace", "")]
            self._reply({"experiments": self._named(found, query), "total_size": len(found)})
        elif path.startswith("/apis/v2beta1/runs/"):
            self._reply({"run_id": path.rsplit("/", 1)[-1], "display_name": "run", "experiment_id": "exp-7", "state": self.run_state})
        elif path == "/apis/v2beta1/pipelines":
            found = [{"pipeline_id": id_, "display_name": p["display_name"]} for id_, p in self.pipelines.items()]
            self._reply({"pipelines": self._named(found, query), "total_size": len(found)})
        elif path.startswith("/apis/v2beta1/pipelines/") and path.endswith("/versions"):
            pipeline_id = path.split("/")[4]
            versions = [{key: v[key] for key in ("pipeline_version_id", "display_name")} | {"pipeline_id": pipeline_id}
                        for v in self.pipelines[pipeline_id]["versions"]]
            self._reply({"pipeline_versions": self._named(versions, query), "total_size": len(versions)})
        elif path == "/apis/v2beta1/recurringruns":
            found = [run for run in self.recurring_runs.values() if run["experiment_id"] == query.get("experiment_id", run["experiment_id"])]
            self._reply({"recurringRuns": self._named(found, query), "total_size": len(found)})  # the API's own camelCase here
        elif path.startswith("/apis/v2beta1/recurringruns/") and path.rsplit("/", 1)[-1] in self.recurring_runs:
            self._reply(self.recurring_runs[path.rsplit("/", 1)[-1]])
        else:
            self.send_error(404)

    def _uploaded_package(self, raw: bytes) -> str:
        """The `uploadfile` part of kfp.Client's multipart upload."""
        from email.parser import BytesParser

        message = BytesParser().parsebytes(f"Content-Type: {self.headers['Content-Type']}\r\n\r\n".encode() + raw)
        (part,) = [part for part in message.get_payload() if part.get_param("name", header="content-disposition") == "uploadfile"]
        return part.get_payload(decode=True).decode()

    def do_POST(self):
        raw = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        path, query = self._query()
        uploading = path in ("/apis/v2beta1/pipelines/upload", "/apis/v2beta1/pipelines/upload_version")
        body = {"query": query} if uploading else json.loads(raw or b"{}")
        self.requests.append(("POST", self.path, body, {k.lower(): v for k, v in self.headers.items()}))
        if self._refused():
            return
        if path == "/apis/v2beta1/experiments":
            self.experiments[(body.get("namespace") or "", body["display_name"])] = "exp-7"
            self._reply({"experiment_id": "exp-7", "display_name": body["display_name"]})
        elif path == "/apis/v2beta1/runs":
            self._reply({"run_id": "run-42", "display_name": body["display_name"], "experiment_id": "exp-7"})
        elif path == "/apis/v2beta1/pipelines/upload":  # a pipeline and its first version, both of the name given
            pipeline_id = f"pipeline-{len(self.pipelines) + 1}"
            version = {"pipeline_version_id": f"{pipeline_id}-v1", "display_name": query["name"], "package": self._uploaded_package(raw)}
            self.pipelines[pipeline_id] = {"display_name": query["name"], "versions": [version]}
            self._reply({"pipeline_id": pipeline_id, "display_name": query["name"]})
        elif path == "/apis/v2beta1/pipelines/upload_version":
            versions = self.pipelines[query["pipelineid"]]["versions"]
            if any(version["display_name"] == query["name"] for version in versions):
                self._reply({"error": f"a version named {query['name']} exists"}, status=409)
                return
            version = {"pipeline_version_id": f"{query['pipelineid']}-v{len(versions) + 1}", "display_name": query["name"],
                       "package": self._uploaded_package(raw)}
            versions.append(version)
            self._reply({"pipeline_id": query["pipelineid"], "pipeline_version_id": version["pipeline_version_id"],
                         "display_name": query["name"]})
        elif path == "/apis/v2beta1/recurringruns":
            recurring_id = f"rr-{9 + len(self.requests)}"
            self.recurring_runs[recurring_id] = {**body, "recurring_run_id": recurring_id, "mode": body.get("mode", "ENABLE")}
            self._reply(self.recurring_runs[recurring_id])
        elif path.startswith("/apis/v2beta1/recurringruns/") and path.endswith((":enable", ":disable")):
            recurring_id, action = path.rsplit("/", 1)[-1].split(":")
            self.recurring_runs[recurring_id]["mode"] = "ENABLE" if action == "enable" else "DISABLE"
            self._reply({})
        else:
            self.send_error(404)

    def do_DELETE(self):
        self.requests.append(("DELETE", self.path, None, {k.lower(): v for k, v in self.headers.items()}))
        path, _ = self._query()
        if self._refused():
            return
        if self.recurring_runs.pop(path.rsplit("/", 1)[-1], None) is None:
            self.send_error(404)
            return
        self._reply({})

    @classmethod
    def version_package(cls, version_id: str) -> list[dict]:
        """An uploaded version's YAML documents: the pipeline spec, then (a cluster's) the platform spec."""
        import yaml

        for pipeline in cls.pipelines.values():
            for version in pipeline["versions"]:
                if version["pipeline_version_id"] == version_id:
                    return list(yaml.safe_load_all(version["package"]))
        raise KeyError(version_id)

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    """A recording KFP API server on 127.0.0.1: yields (host, requests, handler class to configure and read)."""
    RecordingKfpApi.reset()
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingKfpApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RecordingKfpApi.requests, RecordingKfpApi
    server.shutdown()


class WebhookReceiver(BaseHTTPRequestHandler):
    """A webhook endpoint (Slack's or anyone's): keeps (path, JSON body) of each POST, answers 200."""

    received: list = []

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
        self.received.append((self.path, body))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args):
        pass


@pytest.fixture
def webhooks():
    """A local webhook server: yields (its base URL, the (path, body) list it received)."""
    WebhookReceiver.received = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), WebhookReceiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", WebhookReceiver.received
    server.shutdown()


def with_notify(config_path: str, *webhooks: dict) -> str:
    """The config file with tracking.notify set to these webhooks."""
    import yaml

    raw = yaml.safe_load(Path(config_path).read_text())
    raw["tracking"]["notify"] = list(webhooks)
    Path(config_path).write_text(yaml.safe_dump(raw))
    return config_path


# The child forgets every way to this checkout (the editable install's finder, the repository on
# sys.path), and proves it, before running the rest of the script.
_WITHOUT_REPOSITORY = """
import importlib.util, sys
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__ and "editable" not in repr(f)]
sys.path[:] = [p for p in sys.path if not p.startswith({repo!r}) or p.startswith(sys.prefix)]  # keep the venv
assert importlib.util.find_spec("dreambooth") is None, "the repository is still importable"
"""


def run_without_repository(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """`script` in a fresh isolated Python (-I) that cannot import this repository."""
    preamble = _WITHOUT_REPOSITORY.format(repo=str(REPO))
    return subprocess.run([sys.executable, "-I", "-c", preamble + script], cwd=cwd, capture_output=True, text=True, timeout=300)
