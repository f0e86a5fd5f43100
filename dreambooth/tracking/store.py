"""Where tracking goes: the tracking URI (its credentials kept out of everything recorded), the
client, a local store's safe creation, and the experiment."""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import os
import time
from pathlib import Path
from typing import Callable, Iterator, Optional

from dreambooth.errors import InputError

log = logging.getLogger(__name__)


def resolve_tracking_uri(configured: Optional[str] = None) -> str:
    """--tracking-uri / config, else $MLFLOW_TRACKING_URI, else ./mlflow.db (MLflow's embedded default).
    Credentials in the URI are moved to MLflow's own variables (see adopt_credentials)."""
    uri = configured or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return adopt_credentials(uri)
    return f"sqlite:///{Path.cwd() / 'mlflow.db'}"


STORE_PROBE_SECONDS = 10  # one request to a tracking server before a command's MLflow calls


def check_store(configured: Optional[str], create: bool = False) -> str:
    """The resolved tracking URI, once it is known to answer: a server that does not is refused in one line
    naming it; a local store file that is not there is refused unless `create` (the commands that only
    read runs never make an empty store in whatever folder they were started from)."""
    uri = resolve_tracking_uri(configured)
    database = sqlite_path(uri)
    if database is not None and not create and not database.is_file():
        default = "" if configured or os.environ.get("MLFLOW_TRACKING_URI") else " (the default: mlflow.db in the folder you run from)"
        raise InputError(f"tracking: no MLflow store at {database}{default}; give --tracking-uri (or $MLFLOW_TRACKING_URI) "
                         "where your runs are, or run from the folder that holds them")
    if uri.startswith(("http://", "https://")):
        import urllib.error
        import urllib.request

        try:  # urllib, as MLflow's client, goes through $HTTP(S)_PROXY where one is set; any HTTP answer will do
            urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=STORE_PROBE_SECONDS).close()
        except urllib.error.HTTPError:
            pass
        except OSError as error:
            raise InputError(f"tracking: the MLflow server at {uri} does not answer ({error}); check it is up and reachable "
                             "from here, or give another --tracking-uri") from None
    return uri


def has_credentials(uri: str) -> bool:
    from urllib.parse import urlsplit

    return "@" in urlsplit(uri).netloc


def adopt_credentials(uri: str) -> str:
    """The URI without `user:password@`. The credentials go to MLFLOW_TRACKING_USERNAME/PASSWORD of this
    process (and the local tasks it starts), where MLflow's client reads them, so they are never
    written into a task's settings, a compiled pipeline, a log line or an MLflow param."""
    from urllib.parse import unquote, urlsplit, urlunsplit

    parts = urlsplit(uri)
    if not has_credentials(uri):
        return uri
    userinfo, host = parts.netloc.rsplit("@", 1)
    user, _, password = userinfo.partition(":")
    os.environ["MLFLOW_TRACKING_USERNAME"] = unquote(user)
    if password:
        os.environ["MLFLOW_TRACKING_PASSWORD"] = unquote(password)
    return urlunsplit(parts._replace(netloc=host))


def unreachable(error: BaseException) -> bool:
    """An MLflow call that failed because the server could not be reached (after MLflow's retries)."""
    text = str(error)
    if type(error).__name__ == "ConnectionError" and type(error).__module__.startswith("requests"):
        return True  # an artifact upload or download (mlflow-artifacts) raises requests' own error
    return type(error).__name__ == "MlflowException" and "API request to" in text and (
        "Max retries exceeded" in text or "Connection" in text or "timed out" in text
    )


OUTAGE_TOLERANCE_ENV = "DREAMBOOTH_OUTAGE_TOLERANCE"  # tracking.outage_tolerance, set on every pipeline task
OUTAGE_POLL_SECONDS = 5.0


def outage_tolerance() -> float:
    """How long this process's MLflow calls wait for a tracking server that is away (0: MLflow's own
    retries only, about a minute: commands people type should not hang for minutes)."""
    return float(os.environ.get(OUTAGE_TOLERANCE_ENV) or 0)


def patiently(call: Callable, *args, **kwargs):
    """call(*args, **kwargs), tried again while the tracking server cannot be reached, until
    outage_tolerance() has passed since the first try. Only a refused or failed connection is tried
    again: the server never saw the request, so nothing is written twice."""
    deadline = time.monotonic() + outage_tolerance()
    while True:
        try:
            return call(*args, **kwargs)
        except Exception as error:
            left = deadline - time.monotonic()
            if not unreachable(error) or left <= 0:
                raise
            log.warning("tracking unreachable (%s); trying again for %.0f s more", type(error).__name__, left)
            time.sleep(min(OUTAGE_POLL_SECONDS, left))


class PatientClient:
    """An MlflowClient whose every call waits out a tracking outage (patiently)."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name: str):
        member = getattr(self._inner, name)
        if not callable(member):
            return member

        @functools.wraps(member)
        def waiting(*args, **kwargs):
            return patiently(member, *args, **kwargs)

        return waiting


_READY_STORES: set[str] = set()


def sqlite_path(tracking_uri: str) -> Optional[Path]:
    return Path(tracking_uri[len("sqlite:///"):]) if tracking_uri.startswith("sqlite:///") else None


def client(tracking_uri: str):
    """An MlflowClient. A local sqlite store is created or upgraded under a file lock: two runs
    started together on a fresh file would otherwise race MLflow's schema migrations."""
    import fcntl

    from mlflow.tracking import MlflowClient

    database = sqlite_path(tracking_uri)
    if database is None or tracking_uri in _READY_STORES:
        return PatientClient(MlflowClient(tracking_uri=tracking_uri))
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{database}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        mlflow = MlflowClient(tracking_uri=tracking_uri)
        # The first call to each store opens it, which creates or migrates its schema.
        mlflow.search_experiments(max_results=1)
        mlflow.search_registered_models(max_results=1)
    _READY_STORES.add(tracking_uri)
    return PatientClient(mlflow)


def experiment_id(tracking_uri: str, name: str) -> str:
    """The experiment's id, created if missing. In a local sqlite store its artifacts go beside the
    database file (`mlflow-artifacts/` next to `mlflow.db`), not into the current folder."""
    from mlflow.exceptions import MlflowException

    mlflow = client(tracking_uri)
    experiment = mlflow.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    database = sqlite_path(tracking_uri)
    location = None
    if database is not None:
        folder = database.parent / f"{database.stem}-artifacts" / "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        location = folder.resolve().as_uri()
    try:
        return mlflow.create_experiment(name, artifact_location=location)
    except MlflowException as error:
        if error.error_code != "RESOURCE_ALREADY_EXISTS":  # only the race with another process may pass
            raise
        return mlflow.get_experiment_by_name(name).experiment_id


@contextlib.contextmanager
def counted_client_calls() -> Iterator["collections.Counter"]:
    """Count this process's MlflowClient calls by method while the block runs (each is one request to a
    tracking server): bench/plan_bench.py reports them per subject."""
    import collections

    from mlflow.tracking import MlflowClient

    calls: collections.Counter = collections.Counter()
    originals = {name: member for name, member in vars(MlflowClient).items() if not name.startswith("_") and inspect.isfunction(member)}
    for name, original in originals.items():
        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        setattr(MlflowClient, name, counted)
    try:
        yield calls
    finally:
        for name, original in originals.items():
            setattr(MlflowClient, name, original)


DATABASE_SCHEMES = ("sqlite:", "postgresql", "mysql", "mssql")  # a tracking URI that is the store's database itself


def erase_deleted_runs(tracking_uri: str, run_ids: list[str], logged_model_ids: list[str], experiment_id: str,
                       dataset_digests: list[str]) -> list[str]:
    """Erase deleted runs and logged models from the tracking database (MLflow's own `mlflow gc`), then the runs'
    input records and the datasets of these digests that no run uses any more (MLflow has no call for those, and
    gc leaves them). The one place that writes MLflow's tables directly. Returns what is left to do: on a
    tracking server, whose database is not reachable from here, the command to run where it is."""
    import os
    import subprocess
    import sys

    arguments = ["--run-ids", ",".join(run_ids)] + (["--logged-model-ids", ",".join(logged_model_ids)] if logged_model_ids else [])
    if not tracking_uri.startswith(DATABASE_SCHEMES):
        return [f"runs and models are deleted on {tracking_uri}; to erase their rows and artifacts, run where the server's "
                f"database is reachable: MLFLOW_TRACKING_URI={tracking_uri} mlflow gc --backend-store-uri <its database> "
                + " ".join(arguments)]
    result = subprocess.run([sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", tracking_uri, *arguments],
                            capture_output=True, text=True, env={**os.environ, "MLFLOW_TRACKING_URI": tracking_uri})
    if result.returncode != 0:
        raise RuntimeError(f"mlflow gc failed: {result.stderr.strip().splitlines()[-1] if result.stderr.strip() else result.returncode}")
    import sqlalchemy

    statements = [  # gc leaves the runs' input records, and with them the datasets they point to
        "DELETE FROM input_tags WHERE input_uuid IN (SELECT input_uuid FROM inputs WHERE destination_type = 'RUN' AND destination_id IN :runs)",
        "DELETE FROM inputs WHERE destination_type = 'RUN' AND destination_id IN :runs",
        "DELETE FROM datasets WHERE experiment_id = :experiment AND digest IN :digests AND dataset_uuid NOT IN "
        "(SELECT source_id FROM inputs WHERE source_type = 'DATASET')",
    ]
    engine = sqlalchemy.create_engine(tracking_uri)
    with engine.begin() as connection:
        for statement in statements:
            query = sqlalchemy.text(statement).bindparams(*(sqlalchemy.bindparam(name, expanding=True) for name in ("runs", "digests")
                                                            if f":{name}" in statement))
            connection.execute(query, {"experiment": int(experiment_id), "digests": dataset_digests, "runs": run_ids})
    engine.dispose()
    if (database := sqlite_path(tracking_uri)) is not None:  # deleted rows linger in free pages until the file is rebuilt
        import sqlite3

        with sqlite3.connect(database) as connection:
            connection.execute("VACUUM")
    return []
