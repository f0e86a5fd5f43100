"""The tracking store's one direct write to MLflow's tables: erasing deleted runs (what `forget` needs and
MLflow's API cannot do), on sqlite and on the PostgreSQL a tracking server runs on."""

from __future__ import annotations

import pytest

from dreambooth.tracking import client, experiment_id, log_photos_input, photos_dataset
from dreambooth.tracking.store import erase_deleted_runs


def _rows(uri: str, query: str, **values) -> int:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    with engine.connect() as connection:
        count = connection.execute(sqlalchemy.text(query), values).scalar()
    engine.dispose()
    return count


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_erasing_deleted_runs_leaves_no_row_of_them_nor_of_their_photos(backend, tmp_path, request):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}" if backend == "sqlite" else request.getfixturevalue("postgres")
    mlflow = client(uri)
    experiment = experiment_id(uri, f"erase-{tmp_path.name}")
    forgotten, kept = (mlflow.create_run(experiment).info.run_id for _ in range(2))
    log_photos_input(mlflow, forgotten, photos_dataset("rex", "/photos/rex", "digest-of-rex", 4))
    log_photos_input(mlflow, kept, photos_dataset("pack", "/photos/pack", "digest-of-pack", 5))
    mlflow.log_param(forgotten, "subject", "rex")
    mlflow.delete_run(forgotten)

    assert erase_deleted_runs(uri, [forgotten], [], experiment, ["digest-of-rex"]) == []

    for table, column in (("runs", "run_uuid"), ("params", "run_uuid"), ("inputs", "destination_id")):
        assert _rows(uri, f"SELECT count(*) FROM {table} WHERE {column} = :run", run=forgotten) == 0, table
        assert _rows(uri, f"SELECT count(*) FROM {table} WHERE {column} = :run", run=kept) > 0 or table == "params", table
    assert _rows(uri, "SELECT count(*) FROM datasets WHERE digest = 'digest-of-rex'") == 0
    assert _rows(uri, "SELECT count(*) FROM datasets WHERE digest = 'digest-of-pack'") == 1


def test_a_tracking_server_is_told_what_to_run_where_its_database_is():
    notes = erase_deleted_runs("http://mlflow.example:5000", ["run-a", "run-b"], ["m-1"], "1", ["digest"])
    assert len(notes) == 1 and "mlflow gc --backend-store-uri <its database> --run-ids run-a,run-b --logged-model-ids m-1" in notes[0]
