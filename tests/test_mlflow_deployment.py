"""The MLflow of manifests/, started as the cluster starts it (conftest.deployed_mlflow), with a
pipeline run tracking to it. Pipeline pods reach it by its in-cluster name: a small forwarding
proxy plays the cluster's DNS, so every request keeps the Host header a pod would send.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from mlflow.tracking import MlflowClient

from conftest import SAMPLE_SUBJECT, _free_port, cli, quick_config, stage_states, with_notify
from dreambooth.tracking import TAG_GATE, TAG_PARENT, TAG_SELECTED_STEP, TAG_SELECTION_REASON, TAG_STAGE
from pipeline_checks import SUBJECT_STAGES, SUPERRES_STAGES, check_kfp_pages, check_tracked_subject, subject_blocks

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


@pytest.mark.slow(seconds=135)
def test_a_pipeline_run_tracks_to_the_deployed_mlflow_by_its_cluster_name_and_its_credentials_go_nowhere(
        deployed_mlflow, postgres, gcs_emulator, webhooks, tmp_path):
    """The manifest's MLflow (PostgreSQL, artifacts on the bucket) reached by its in-cluster name with
    credentials in the URI; one subject through every stage, the personalised upscaler included."""
    import psycopg
    from google.cloud import storage

    namespace, address, log_path = deployed_mlflow
    tracking_uri = f"http://mlflow.{namespace}.svc.cluster.local:5000"
    hooks, received = webhooks
    dead = f"http://127.0.0.1:{_free_port()}/hook"  # nothing listens there
    # evaluation.select scores the model of steps 4 and 8; a CLIP-T margin of 0 keeps the better CLIP-T.
    select = {"every": 4, "prompts_per_category": 1, "images_per_prompt": 2, "pres_images": 2, "clip_t_margin": 0.0}
    config = with_notify(quick_config(tmp_path, experiment="deployed", select=select), {"url": f"{hooks}/generic"},
                         {"url": f"{hooks}/slack", "format": "slack"}, {"url": dead})
    local = urlsplit(address)
    ClusterDns.routes = {urlsplit(tracking_uri).netloc: (local.hostname, local.port)}
    ClusterDns.seen = []
    proxy = ThreadingHTTPServer(("127.0.0.1", 0), ClusterDns)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    env = {**os.environ, "HTTP_PROXY": f"http://127.0.0.1:{proxy.server_address[1]}", "NO_PROXY": "127.0.0.1,localhost"}
    env.pop("http_proxy", None)
    env.pop("no_proxy", None)
    with_credentials = tracking_uri.replace("http://", "http://dreambooth:s3cret-token@")
    try:
        result = cli("run", "--config", config, "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                     "--tracking-uri", with_credentials, "--output-dir", str(tmp_path / "outputs"), cwd=tmp_path, env=env)
    finally:
        proxy.shutdown()
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:] + log_path.read_text()[-2000:]
    assert ClusterDns.seen and set(ClusterDns.seen) == {f"mlflow.{namespace}.svc.cluster.local:5000"}
    assert f"{tracking_uri}/#/experiments/" in result.stdout

    # In the server's PostgreSQL and, through the server, on the bucket.
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

    printed = subject_blocks(result.stdout)["dog"]
    client = MlflowClient(address)
    subject = check_tracked_subject(client, printed["mlflow run"], stages=SUBJECT_STAGES + SUPERRES_STAGES)
    # The learning check: 8 steps lowered the subject photos' denoising loss against the base model.
    metrics = subject.data.metrics
    assert metrics["learn/subject_loss_tuned"] < metrics["learn/subject_loss_base"] and metrics["learn/subject_loss_change"] < 0
    assert {"learn/class_loss_base", "learn/class_loss_tuned"} <= set(metrics)  # measured on the class images too
    assert printed["learned"].startswith("denoising loss vs the base model: subject photos -")
    # The credentials: not in the output, the task logs and settings kfp.local wrote, or any run's params and tags.
    assert "s3cret" not in result.stdout + result.stderr + json.dumps(received)
    leaks = [path for path in (tmp_path / "outputs").rglob("*") if path.is_file() and b"s3cret" in path.read_bytes()]
    assert leaks == []
    for run in client.search_runs([subject.info.experiment_id]):
        assert "s3cret" not in json.dumps({**run.data.params, **run.data.tags})

    # The personalised upscaler: its own fine-tune run, the comparison, and the cascade's scores.
    assert subject.data.tags[TAG_GATE] == "passed"
    children = client.search_runs([subject.info.experiment_id], f"tags.`{TAG_PARENT}` = '{subject.info.run_id}'")
    upscaling = next(run for run in children if run.data.tags[TAG_STAGE] == "super-resolution")
    fine_tune = next(run for run in children if run.data.tags[TAG_STAGE] == "fine-tune")
    clip_t = {point.step: point.value for point in client.get_metric_history(fine_tune.info.run_id, "select/clip_t")}
    assert sorted(clip_t) == [4, 8] and len(client.get_metric_history(fine_tune.info.run_id, "select/dino")) == 2
    chosen = int(subject.data.tags[TAG_SELECTED_STEP])
    assert chosen == max(clip_t, key=clip_t.get) and subject.data.metrics["selected_step"] == chosen
    assert subject.data.tags[TAG_SELECTION_REASON].startswith(f"step {chosen}: the best DINO")
    assert printed["checkpoint"].startswith(f"step {chosen if chosen == 8 else f'{chosen} of 8'}, chosen by evaluation.select")
    assert [m.step for m in client.get_metric_history(upscaling.info.run_id, "loss")] == list(range(1, 7))
    assert "superres-comparison.png" in {a.path for a in client.list_artifacts(subject.info.run_id)}
    for label in ("generic", "personalised"):
        assert f"eval/upscaled_{label}/dino" in subject.data.metrics
    assert "upscaler" in printed
    check_kfp_pages(Path(printed["model"]).parent.parent, superres=True)

    # The exit handler told both live webhooks, each in its format; the dead one changed nothing but its line.
    bodies = dict(received)
    assert sorted(bodies) == ["/generic", "/slack"]
    report = bodies["/generic"]
    assert report["succeeded"] is True and report["counts"] == {"trained": 1, "failed": 0, "up to date": 0}
    (dog,) = report["subjects"]
    assert dog["subject"] == "dog" and dog["gate"] == "passed" and dog["registered"].startswith("dreambooth-dog@candidate")
    assert dog["metrics"]["dino"] == pytest.approx(subject.data.metrics["eval/dino"])
    assert report["mlflow_url"].startswith(f"{tracking_uri}/#/experiments/{subject.info.experiment_id}/runs/")
    slack = bodies["/slack"]["text"].splitlines()
    assert slack[0].startswith(":white_check_mark: DreamBooth batch") and slack[1].startswith("• dog (dog): trained; DINO ")
    assert slack[-1].startswith(f"<{tracking_uri}/#/experiments/")
    assert stage_states(result.stdout)[("batch", "notify")] == ["failed"]
    assert f"not sent to {dead.split('/')[2]}" in next(line for line in result.stdout.splitlines() if " notify " in line)

    # The registered model serves from the registry, its files read through the server from the bucket.
    import mlflow
    import pandas as pd
    from PIL import Image

    mlflow.set_tracking_uri(address)
    registered = mlflow.pyfunc.load_model("models:/dreambooth-dog@candidate")
    kept = mlflow.artifacts.download_artifacts("models:/dreambooth-dog@candidate", dst_path=str(tmp_path / "registered"))
    assert json.loads(next(Path(kept).rglob("dreambooth.json")).read_text())["step"] == chosen  # the selected step's model
    generated = registered.predict(pd.DataFrame({"prompt": ["a dog on the beach"], "num_inference_steps": [2]}))
    assert Image.open(io.BytesIO(generated["image_png"][0])).size == (64, 64)
