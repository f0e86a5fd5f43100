"""submit and schedule against a local HTTP server that speaks KFP's v2beta1 REST shape and records requests."""

import json
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import REPO
from dreambooth.config import RunConfig, load_config


class RecordingKfpApi(BaseHTTPRequestHandler):
    """Answers the calls kfp.Client makes (healthz, experiments, runs, recurring runs) and keeps them."""

    requests: list = []

    def _reply(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self.requests.append(("GET", self.path, None))
        self._reply({"experiments": [], "total_size": 0} if "/experiments" in self.path else {"multi_user": False})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        self.requests.append(("POST", self.path, body))
        if self.path.startswith("/apis/v2beta1/experiments"):
            self._reply({"experiment_id": "exp-7", "display_name": body["display_name"]})
        elif self.path.startswith("/apis/v2beta1/runs"):
            self._reply({"run_id": "run-42", "display_name": body["display_name"], "experiment_id": "exp-7"})
        elif self.path.startswith("/apis/v2beta1/recurringruns"):
            self._reply({"recurring_run_id": "rr-9", "display_name": body["display_name"]})
        else:
            self.send_error(404)

    def log_message(self, *args):
        pass


@pytest.fixture
def kfp_api():
    RecordingKfpApi.requests = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), RecordingKfpApi)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", RecordingKfpApi.requests
    server.shutdown()


def _cli(*args):
    return subprocess.run([sys.executable, str(REPO / "pipeline.py"), *args], capture_output=True, text=True, timeout=300)


def _posted(requests, prefix):
    return [body for method, path, body in requests if method == "POST" and path.startswith(prefix)]


def test_submit_uploads_the_cluster_pipeline_with_its_parameters(kfp_api):
    host, requests = kfp_api
    result = _cli("submit", "--host", host, "--config", "gke-sd15", "--experiment", "pets",
                  "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 0, result.stderr
    assert f"{host}/#/runs/details/run-42" in result.stdout

    (experiment,) = _posted(requests, "/apis/v2beta1/experiments")
    assert experiment["display_name"] == "pets"
    (run,) = _posted(requests, "/apis/v2beta1/runs")
    assert run["experiment_id"] == "exp-7" and run["service_account"] == "dreambooth-pipeline-runner"
    spec = run["pipeline_spec"]["pipeline_spec"]
    assert spec["pipelineInfo"]["name"] == "dreambooth"
    assert all("@sha256:" in e["container"]["image"] for e in spec["deploymentSpec"]["executors"].values())
    platform = run["pipeline_spec"]["platform_spec"]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    assert platform["exec-finetune"]["tolerations"][0]["key"] == "nvidia.com/gpu"
    parameters = run["runtime_config"]["parameters"]
    assert parameters["superres_enabled"] is True and parameters["subjects_uri"] == "" and parameters["force"] is False
    # The subject is its own parameter (a batch of one), apart from the shared settings.
    assert json.loads(parameters["subjects_json"]) == [{"id": "dog", "photos": "gs://photos/dog", "class_noun": "dog"}]
    config = RunConfig.from_json(parameters["config_json"])
    assert (config.subject.class_noun, config.name) == ("", "gke-sd15")


def test_schedule_with_a_subjects_file_carries_its_uri_not_its_contents(kfp_api):
    host, requests = kfp_api
    result = _cli("schedule", "--host", host, "--config", "gke-sd15", "--cron", "0 0 2 * * *",
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
    host, requests = kfp_api
    result = _cli("schedule", "--host", host, "--config", "gke-sd15", "--cron", "0 0 9 * * 1-5",
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
    host, requests = kfp_api
    result = _cli("schedule", "--host", host, "--config", "gke-sd15", "--cron", cron,
                  "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: --cron:") and message in result.stderr
    assert requests == []


def test_submitting_a_config_without_cluster_settings_is_refused(kfp_api):
    host, requests = kfp_api
    result = _cli("submit", "--host", host, "--config", "sd15", "--subject-uri", "gs://photos/dog", "--class-noun", "dog")
    assert result.returncode == 2 and "no `cluster` section" in result.stderr
    assert requests == []
