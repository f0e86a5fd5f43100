"""A sharded batch (batch.max_subjects_per_run) through kfp.local: three subjects at most two a run are
two pipeline runs under one batch run, the second not full; the same file again launches nothing."""

import csv
import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import SAMPLE_SUBJECT, cli, copy_photos, quick_config, with_notify
from dreambooth.tracking import TAG_JOB_ID, TAG_PARENT, TAG_SHARD, TAG_SHARDS, TAG_STAGE, TAG_SUBJECT


SUBJECTS = [f"dog-{letter}" for letter in "abc"]


def _sharded_config(root: Path) -> str:
    path = Path(quick_config(root, superres=False, max_steps=2, checkpoint_every=2))
    raw = yaml.safe_load(path.read_text())
    raw["priors"]["enabled"] = False  # the shards, not the class priors, are under test here
    raw["batch"] = {"max_subjects_per_run": 2}
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def _batch_runs(client, experiment_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.`{TAG_STAGE}` = 'batch'", max_results=100)


def _summary(client, run_id: str) -> list[dict]:
    table = json.loads(Path(client.download_artifacts(run_id, "batch_summary.json")).read_text())
    return [dict(zip(table["columns"], row)) for row in table["data"]]


def test_the_launch_plans_a_whole_file_in_the_same_mlflow_calls_whatever_its_size(tmp_path):
    """The launch of a sharded batch opens nothing per subject: its MLflow calls do not grow with the file
    (the shards open their subjects' runs, each its own)."""
    from dreambooth.config import load_config
    from dreambooth.tasks.launch import launch_shards
    from dreambooth.tracking.store import counted_client_calls

    config = load_config("tiny", {"batch": {"max_subjects_per_run": 4}}).to_json()
    photos = copy_photos(SAMPLE_SUBJECT, tmp_path / "dog", ["00.jpg", "01.jpg"])
    totals, shards = {}, {}
    for count in (6, 18):
        subjects = tmp_path / f"{count}.yaml"
        subjects.write_text(yaml.safe_dump({"subjects": [{"id": f"dog-{i}", "photos": str(photos), "class_noun": "dog"} for i in range(count)]}))
        launched = []
        with counted_client_calls() as calls:
            launch_shards(config, f"sqlite:///{tmp_path / f'{count}.db'}", str(subjects), False, f"job-{count}", f"job-{count}",
                          lambda shard, entries: launched.append([entry.id for entry in entries]) or "")
        totals[count], shards[count] = sum(calls.values()), launched
    assert totals[18] == totals[6]
    assert shards[18] == [[f"dog-{i}" for i in range(start, min(start + 4, 18))] for start in range(0, 18, 4)]


@pytest.mark.slow(seconds=130)
def test_three_subjects_at_most_two_a_run_train_as_two_shards_and_again_as_none(tmp_path, webhooks):
    hooks, received = webhooks
    for index, subject in enumerate(SUBJECTS):  # different photos, so each subject is its own
        copy_photos(SAMPLE_SUBJECT, tmp_path / "photos" / subject, [f"0{(index + k) % 4}.jpg" for k in range(3)])
    subjects = tmp_path / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({"subjects": [{"id": s, "photos": f"photos/{s}", "class_noun": "dog"} for s in SUBJECTS]}))
    config = with_notify(_sharded_config(tmp_path), {"url": f"{hooks}/night"})
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}

    def run_batch():
        result = cli("run", "--config", config, "--subjects", str(subjects), "--output-dir", str(tmp_path / "out"),
                     cwd=tmp_path, env=environment)
        assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
        return result

    first = run_batch()
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("dreambooth").experiment_id
    (batch,) = [r for r in _batch_runs(client, experiment) if TAG_PARENT not in r.data.tags]
    shards = [r for r in _batch_runs(client, experiment) if r.data.tags.get(TAG_PARENT) == batch.info.run_id]
    # Two pipeline runs, each a KFP job of its own, with at most two subjects each.
    assert sorted(r.data.tags[TAG_SHARD] for r in shards) == ["1/2", "2/2"] and batch.data.tags[TAG_SHARDS] == "2"
    assert len({r.data.tags[TAG_JOB_ID] for r in shards}) == 2
    trained_in = {}
    for shard in shards:
        for run in client.search_runs([experiment], f"tags.`{TAG_PARENT}` = '{shard.info.run_id}' and tags.`{TAG_STAGE}` = 'subject'"):
            trained_in[run.data.tags[TAG_SUBJECT]] = shard.data.tags[TAG_SHARD]
    assert sorted(trained_in) == SUBJECTS and sorted(trained_in.values()) == ["1/2", "1/2", "2/2"]
    assert first.stdout.count("job:") == 2
    # The last shard to end wrote the batch's summary across the two and closed the batch run.
    batch = client.get_run(batch.info.run_id)
    assert batch.info.status == "FINISHED" and all(client.get_run(r.info.run_id).info.status == "FINISHED" for r in shards)
    rows = _summary(client, batch.info.run_id)
    assert [row["subject"] for row in rows] == SUBJECTS and {row["status"] for row in rows} == {"trained"}
    assert "batch:        3 subjects: 3 trained, 0 up to date, 0 failed, in 2 shard(s) of at most 2" in first.stdout
    # One word for the night, from the last shard to end: the whole batch's subjects, under the batch run.
    ((path, report),) = received
    assert path == "/night" and report["succeeded"] is True and report["counts"] == {"trained": 3, "up to date": 0, "failed": 0}
    assert sorted(subject["subject"] for subject in report["subjects"]) == SUBJECTS
    assert report["job_id"] == batch.data.tags[TAG_JOB_ID]
    # compare over the batch run reads the subjects of every shard
    compared = cli("compare", "--batch-run", batch.info.run_id, "--output-dir", str(tmp_path / "compare"),
                   "--tracking-uri", f"sqlite:///{tmp_path / 'mlflow.db'}", cwd=tmp_path)
    assert compared.returncode == 0, compared.stderr[-3000:]
    with open(tmp_path / "compare" / "comparison.csv") as table:
        assert sorted(row["subject"] for row in csv.DictReader(table) if row["run"]) == SUBJECTS

    second = run_batch()
    assert "job:" not in second.stdout  # no shard had work, so no pipeline ran
    assert len(client.search_runs([experiment], f"tags.`{TAG_STAGE}` = 'fine-tune'")) == 3  # still the first night's
    (again,) = [r for r in _batch_runs(client, experiment) if TAG_PARENT not in r.data.tags and r.info.run_id != batch.info.run_id]
    assert again.data.tags[TAG_SHARDS] == "0" and again.info.status == "FINISHED"
    rows = _summary(client, again.info.run_id)
    assert [row["subject"] for row in rows] == SUBJECTS and {row["status"] for row in rows} == {"up to date"}
    assert [report["counts"]["up to date"] for _, report in received] == [0, 3]  # the launch alone told of this one
