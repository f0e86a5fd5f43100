"""The MLflow of manifests/, started as the cluster starts it (conftest.deployed_mlflow), with a
pipeline run tracking to it. Pipeline pods reach it by its in-cluster name: a small forwarding
proxy plays the cluster's DNS, so every request keeps the Host header a pod would send.
"""

from __future__ import annotations

import http.client
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from conftest import SAMPLE_SUBJECT, cli, quick_config

# The manifest's MLflow listens on its fixed port: its tests share one pytest-xdist worker.
pytestmark = pytest.mark.xdist_group("deployed-mlflow")


def _get(address: str, path: str, host: str) -> int:
    target = urlsplit(address)
    connection = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
    connection.request("GET", path, headers={"Host": host})
    status = connection.getresponse().status
    connection.close()
    return status


def test_the_api_answers_pods_by_the_service_name_and_refuses_other_hosts(deployed_mlflow):
    namespace, address, _ = deployed_mlflow
    api = "/api/2.0/mlflow/experiments/search?max_results=1"
    assert _get(address, api, f"mlflow.{namespace}.svc.cluster.local:5000") == 200
    assert _get(address, api, f"mlflow.{namespace}:5000") == 200
    assert _get(address, api, "mlflow.elsewhere.svc.cluster.local:5000") == 403
    assert _get(address, "/health", "mlflow.elsewhere.svc.cluster.local:5000") == 200  # why probes cannot tell


class ClusterDns(BaseHTTPRequestHandler):
    """An HTTP forward proxy that resolves the in-cluster MLflow name to the local server, Host header untouched."""

    routes: dict[str, tuple[str, int]] = {}
    seen: list[str] = []

    def _forward(self):
        target = urlsplit(self.path)
        if target.netloc not in self.routes:
            self.send_error(502, f"no route to {target.netloc}")
            return
        self.seen.append(self.headers["Host"])
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        upstream = http.client.HTTPConnection(*self.routes[target.netloc], timeout=120)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("proxy-connection", "connection")}
        upstream.request(self.command, target.path + (f"?{target.query}" if target.query else ""), body=body or None, headers=headers)
        response = upstream.getresponse()
        data = response.read()
        self.send_response(response.status)
        for key, value in response.getheaders():
            if key.lower() not in ("transfer-encoding", "connection", "content-length"):
                self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        upstream.close()

    do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _forward

    def log_message(self, *args):
        pass


@pytest.mark.slow
def test_a_pipeline_run_tracks_to_the_deployed_mlflow_by_its_cluster_name_and_writes_to_the_bucket(
        deployed_mlflow, postgres, gcs_emulator, tmp_path):
    """The manifest's MLflow (PostgreSQL, artifacts on the bucket) reached by its in-cluster name, results to gs://."""
    import psycopg
    from diffusers import DiffusionPipeline
    from google.cloud import storage

    from dreambooth.storage import COMPLETE_MARKER, is_complete, local_folder

    namespace, address, log_path = deployed_mlflow
    tracking_uri = f"http://mlflow.{namespace}.svc.cluster.local:5000"
    local = urlsplit(address)
    ClusterDns.routes = {urlsplit(tracking_uri).netloc: (local.hostname, local.port)}
    ClusterDns.seen = []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), ClusterDns)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {**__import__("os").environ, "HTTP_PROXY": f"http://127.0.0.1:{proxy.server_address[1]}",
           "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("http_proxy", None)
    env.pop("no_proxy", None)
    try:
        result = cli("run", "--config", quick_config(tmp_path, experiment="deployed", superres=False),
                     "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--tracking-uri", tracking_uri,
                     "--output-dir", f"gs://{gcs_emulator}/runs", cwd=tmp_path, env=env)
    finally:
        proxy.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log_path.read_text()[-2000:]
    assert ClusterDns.seen and set(ClusterDns.seen) == {f"mlflow.{namespace}.svc.cluster.local:5000"}

    with psycopg.connect(postgres) as connection, connection.cursor() as cursor:
        cursor.execute(
            "SELECT r.name, r.status FROM runs r JOIN experiments e ON r.experiment_id = e.experiment_id "
            "WHERE e.name = 'deployed'"
        )
        runs = dict(cursor.fetchall())
        cursor.execute(
            "SELECT count(*) FROM metrics m JOIN runs r ON m.run_uuid = r.run_uuid WHERE r.name = 'fine-tune' AND m.key = 'loss'"
        )
        (loss_points,) = cursor.fetchone()
        cursor.execute("SELECT name FROM registered_models")
        registered = {name for (name,) in cursor.fetchall()}
    assert runs.get("fine-tune") == "FINISHED" and runs.get("evaluate") == "FINISHED", runs
    assert loss_points >= 8  # one per optimizer step of the quick config
    assert "dreambooth-dog" in registered
    artifacts = [blob.name for blob in storage.Client().list_blobs(gcs_emulator, prefix="mlflow-artifacts/")]
    assert any(name.endswith("MLmodel") for name in artifacts)
    assert any(name.endswith("/artifacts/samples-grid.png") for name in artifacts)  # proxied into the bucket

    # The results went to the bucket, each folder complete, and the model loads from there.
    printed = {key.strip(): value.strip() for key, value in
               (line.split(":", 1) for line in result.stdout.splitlines() if line.startswith("  ") and ":" in line)}
    model_uri = printed["model"]
    assert model_uri.startswith(f"gs://{gcs_emulator}/runs/dreambooth-") and model_uri.endswith("/dog/model") and is_complete(model_uri)
    assert printed["sample grid"].endswith("/dog/samples/samples-grid.png")
    subject_folder = model_uri.removeprefix(f"gs://{gcs_emulator}/").removesuffix("/model")
    stored = {blob.name for blob in storage.Client().list_blobs(gcs_emulator, prefix=f"{subject_folder}/")}
    for expected in ("model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
                     "samples/samples-grid.png", "evaluation/report.md", f"model/{COMPLETE_MARKER}"):
        assert f"{subject_folder}/{expected}" in stored
    with local_folder(model_uri, require_complete=True) as model:
        assert DiffusionPipeline.from_pretrained(model)("a dog", num_inference_steps=2, output_type="np").images[0].shape == (64, 64, 3)
