"""compare: evaluations under different protocols are not silently put in one table."""

import csv

from mlflow.tracking import MlflowClient

from conftest import SAMPLE_SUBJECT, cli


def _evaluate(tmp_path, tiny_model_dir, config: str, tracking_uri: str):
    result = cli("evaluate", "--config", config, "--model", str(tiny_model_dir), "--identifier", "fqs",
                 "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--output-dir", str(tmp_path / "out"),
                 "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]


def test_runs_with_different_prompt_sets_are_refused_unless_forced(tiny_model_dir, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    fewer_prompts = tmp_path / "fewer-prompts.yaml"
    fewer_prompts.write_text("extends: tiny\nevaluation:\n  max_prompts_per_category: 1\n")
    _evaluate(tmp_path, tiny_model_dir, "tiny", tracking_uri)
    _evaluate(tmp_path, tiny_model_dir, str(fewer_prompts), tracking_uri)

    arguments = ("compare", "--experiment", "dreambooth", "--tracking-uri", tracking_uri, "--output-dir", str(tmp_path / "compare"))
    refused = cli(*arguments, cwd=tmp_path)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "different protocols: max_prompts_per_category (1, 2)" in line and "--force" in line
    assert not (tmp_path / "compare").exists()

    forced = cli(*arguments, "--force", cwd=tmp_path)
    assert forced.returncode == 0, forced.stderr[-3000:]
    with open(tmp_path / "compare" / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["protocol"] for row in rows) == ["A", "B", "reference", "reference"]
    assert "max_prompts_per_category\": 1" in (tmp_path / "compare" / "comparison.md").read_text()


def test_only_subject_runs_can_be_named(tiny_model_dir, tmp_path):
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    _evaluate(tmp_path, tiny_model_dir, "tiny", tracking_uri)
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dreambooth")
    (batch,) = client.search_runs([experiment.experiment_id], "tags.`dreambooth.stage` = 'batch'")
    result = cli("compare", "--runs", batch.info.run_id, "--tracking-uri", tracking_uri, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --runs: {batch.info.run_id} is a batch run; name subject runs"
