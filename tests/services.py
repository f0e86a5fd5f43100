"""Real services the tests and the benchmarks start on this machine: an `mlflow server` and PostgreSQL.
Plain functions (no pytest), so bench/ starts the same ones as tests/conftest.py."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Callable, Optional


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class MlflowServer:
    """A real `mlflow server` process on 127.0.0.1 with a sqlite (or given) backend and proxied artifacts; a test
    can stop it (an outage) and start it again on the same port and store."""

    def __init__(self, root: Path, artifacts_destination: str, backend_store_uri: Optional[str] = None, workers: int = 1):
        self.root, self.artifacts_destination, self.port = root, artifacts_destination, _free_port()
        self.workers = workers  # the tests' one worker starts fastest; manifests/ runs MLflow's default, 4
        self.backend_store_uri = backend_store_uri or f"sqlite:///{root / 'mlflow.db'}"
        self.uri = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "MlflowServer":
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server",
                "--backend-store-uri", self.backend_store_uri,
                "--artifacts-destination", self.artifacts_destination,
                "--host", "127.0.0.1", "--port", str(self.port), "--workers", str(self.workers),
            ],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.time() > deadline:
                self.process.kill()
                raise RuntimeError(f"mlflow server did not start; see {self.root / 'server.log'}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.process = None


def start_postgres() -> tuple[str, Callable[[], None]]:
    """A PostgreSQL server (the machine image's PostgreSQL 15 binaries) on a loopback port with a fresh
    `mlflow` database: (its libpq URI, stop). PostgreSQL refuses to run as root, so as root the server
    runs as `nobody` on a data folder that user owns."""
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="dreambooth-postgres-"))
    as_user = ["runuser", "-u", "nobody", "--"] if os.geteuid() == 0 else []
    if as_user:
        shutil.chown(root, "nobody")
    data, port = root / "data", _free_port()
    subprocess.run([*as_user, "initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "--no-sync"],
                   check=True, capture_output=True, timeout=120)
    options = f"-p {port} -h 127.0.0.1 -k {root}"
    subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-o", options, "-l", str(root / "server.log"), "-w", "start"],
                   check=True, capture_output=True, timeout=120)
    admin = psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres", autocommit=True)
    with admin.cursor() as cursor:
        cursor.execute("CREATE DATABASE mlflow")
    admin.close()

    def stop() -> None:
        subprocess.run([*as_user, "pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop"], capture_output=True, timeout=120)
        shutil.rmtree(root, ignore_errors=True)

    return f"postgresql://postgres@127.0.0.1:{port}/mlflow", stop


_EMULATOR_MAIN = """
import sys, time
from gcp_storage_emulator.server import create_server
server = create_server("127.0.0.1", int(sys.argv[1]), in_memory=True, default_bucket=sys.argv[2])
# The emulator rewrites a JSON snapshot of every object's metadata on each write (O(objects) per
# upload: hours for a catalogue's 30,000 photos). In memory it is never read back, and real GCS has
# no such cost, so a catalogue-sized bench turns it off; the JSON API it serves is unchanged.
server._storage._write_config_to_file = lambda: None
server.start()
print("ready", flush=True)
while True:
    time.sleep(3600)
"""


class GcsEmulatorProcess:
    """The GCS emulator in a process of its own, for benchmarks: its work (it serves one request at a
    time) then counts against neither the measured process's time nor its memory."""

    def __init__(self, bucket: str):
        self.bucket, self.port = bucket, _free_port()
        self.host = f"http://127.0.0.1:{self.port}"
        self.process: Optional[subprocess.Popen] = None

    def start(self) -> "GcsEmulatorProcess":
        self.process = subprocess.Popen([sys.executable, "-c", _EMULATOR_MAIN, str(self.port), self.bucket],
                                        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        if self.process.stdout.readline().strip() != "ready":
            self.stop()
            raise RuntimeError("the GCS emulator did not start")
        return self

    def stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait()
            self.process = None
