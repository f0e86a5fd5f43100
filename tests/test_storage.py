"""gs:// folders against a real GCS API emulator: resumable uploads, completion, and no half models."""

import os
import signal
import subprocess
import sys
import time

import pytest
from google.cloud import storage

from dreambooth.errors import InputError
from dreambooth.storage import COMPLETE_MARKER, download_folder, is_complete, local_folder, upload_folder


def _blob_names(bucket, prefix):
    return sorted(b.name for b in storage.Client(project="dreambooth-test").list_blobs(bucket, prefix=prefix))


def test_a_folder_round_trips_with_resumable_uploads(gcs_emulator, tmp_path):
    folder = tmp_path / "model"
    (folder / "unet").mkdir(parents=True)
    big = os.urandom(20 * 1024 * 1024 + 123)  # larger than two 8 MiB chunks: a resumable upload
    (folder / "unet" / "weights.bin").write_bytes(big)
    (folder / "model_index.json").write_text("{}")
    uri = f"gs://{gcs_emulator}/roundtrip/model"
    upload_folder(folder, uri)

    assert is_complete(uri)
    assert _blob_names(gcs_emulator, "roundtrip/") == [
        f"roundtrip/model/{COMPLETE_MARKER}", "roundtrip/model/model_index.json", "roundtrip/model/unet/weights.bin"
    ]
    copy = download_folder(uri, tmp_path / "copy")
    assert (copy / "unet" / "weights.bin").read_bytes() == big
    assert not (copy / COMPLETE_MARKER).exists()


UPLOAD_SLOWLY = """
import sys
from pathlib import Path
from dreambooth.storage import upload_folder
upload_folder(Path(sys.argv[1]), sys.argv[2])
"""


def test_an_interrupted_upload_is_never_read_as_a_model(gcs_emulator, tmp_path):
    folder = tmp_path / "model"
    folder.mkdir()
    for index in range(12):
        (folder / f"part-{index:02d}.bin").write_bytes(os.urandom(6 * 1024 * 1024))
    uri = f"gs://{gcs_emulator}/interrupted/model"
    process = subprocess.Popen([sys.executable, "-c", UPLOAD_SLOWLY, str(folder), uri], env=os.environ.copy())
    deadline = time.time() + 120
    while not _blob_names(gcs_emulator, "interrupted/"):
        assert process.poll() is None, "the upload finished before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()

    assert 0 < len(_blob_names(gcs_emulator, "interrupted/")) < 12
    assert not is_complete(uri)
    with pytest.raises(InputError, match=r"interrupted/model: incomplete upload"):
        download_folder(uri, tmp_path / "copy")
    with pytest.raises(InputError, match="incomplete upload"):
        with local_folder(uri, require_complete=True):
            pass


def test_subject_photos_uploaded_by_a_user_need_no_marker(gcs_emulator, subject_dir, make_config, tmp_path):
    from dreambooth.ingest import ingest_subject

    bucket = storage.Client(project="dreambooth-test").bucket(gcs_emulator)
    for photo in subject_dir.iterdir():
        bucket.blob(f"subjects/dog/{photo.name}").upload_from_filename(str(photo))
    with local_folder(f"gs://{gcs_emulator}/subjects/dog") as photos:
        result = ingest_subject(photos, tmp_path / "out", make_config())
    assert len(result.images) == 4


@pytest.mark.slow
def test_a_run_writes_its_results_and_mlflow_artifacts_to_the_bucket(gcs_emulator, mlflow_server_on_gcs, tmp_path):
    from mlflow.tracking import MlflowClient

    from conftest import SAMPLE_SUBJECT
    from test_pipeline import _cli, _quick_config

    config = _quick_config(tmp_path, experiment="on-gcs", superres=False)
    result = _cli("run", "--config", config, "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog",
                  "--output-dir", f"gs://{gcs_emulator}/runs", "--tracking-uri", mlflow_server_on_gcs, cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = dict(line.split(":", 1) for line in result.stdout.splitlines() if ":" in line and not line.startswith(" "))
    model_uri = printed["model"].strip()
    assert model_uri.startswith(f"gs://{gcs_emulator}/runs/dreambooth-") and is_complete(model_uri)
    assert printed["sample grid"].strip().endswith("/samples/samples-grid.png")

    job = model_uri.split("/")[-2]
    stored = _blob_names(gcs_emulator, f"runs/{job}/")
    for expected in ("model/model_index.json", "model/unet/diffusion_pytorch_model.safetensors",
                     "samples/samples-grid.png", "evaluation/report.md", f"model/{COMPLETE_MARKER}"):
        assert f"runs/{job}/{expected}" in stored

    from diffusers import DiffusionPipeline

    with local_folder(model_uri, require_complete=True) as model:
        assert DiffusionPipeline.from_pretrained(model)("a dog", num_inference_steps=2, output_type="np").images[0].shape == (64, 64, 3)

    # The MLflow server proxies artifacts into the bucket: the run's grid lives on the emulator.
    client = MlflowClient(mlflow_server_on_gcs)
    experiment = client.get_experiment_by_name("on-gcs")
    (parent,) = client.search_runs([experiment.experiment_id], "tags.`dreambooth.stage` = 'pipeline'")
    assert any(name.endswith(f"{parent.info.run_id}/artifacts/samples-grid.png") for name in _blob_names(gcs_emulator, "mlflow/"))
