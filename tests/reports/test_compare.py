"""compare: evaluations under different protocols are not silently put in one table."""

import csv

import pytest
from mlflow.tracking import MlflowClient

from conftest import SAMPLE_SUBJECT, cli


def _evaluate(folder, tiny_model_dir, config: str, tracking_uri: str):
    result = cli("evaluate", "--config", config, "--model", str(tiny_model_dir), "--identifier", "fqs",
                 "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--output-dir", str(folder / "out"),
                 "--tracking-uri", tracking_uri, cwd=folder)
    assert result.returncode == 0, result.stderr[-3000:]


# One worker builds the store once for both tests (a module fixture is built again whenever a worker interleaves modules).
pytestmark = pytest.mark.xdist_group("two-protocols")


@pytest.fixture(scope="session")
def two_protocols(tiny_model_dir, tmp_path_factory):
    """A store with the same model evaluated twice, on different prompt sets: (its folder, its URI)."""
    folder = tmp_path_factory.mktemp("two-protocols")
    tracking_uri = f"sqlite:///{folder / 'mlflow.db'}"
    # A gate nothing passes (no model registered: quicker); the protocols differ in the prompts alone.
    small = "extends: tiny\nevaluation:\n  gate: {min_dino: 2.0}\n"
    (folder / "two-prompts.yaml").write_text(small)
    (folder / "one-prompt.yaml").write_text(small + "  max_prompts_per_category: 1\n")
    _evaluate(folder, tiny_model_dir, str(folder / "two-prompts.yaml"), tracking_uri)
    _evaluate(folder, tiny_model_dir, str(folder / "one-prompt.yaml"), tracking_uri)
    return folder, tracking_uri


def test_runs_with_different_prompt_sets_are_refused_unless_forced(two_protocols, tmp_path):
    folder, tracking_uri = two_protocols
    arguments = ("compare", "--experiment", "dreambooth", "--tracking-uri", tracking_uri, "--output-dir", str(tmp_path / "compare"))
    refused = cli(*arguments, cwd=folder)
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "different protocols: max_prompts_per_category (1, 2)" in line and "--force" in line
    assert not (tmp_path / "compare").exists()

    forced = cli(*arguments, "--force", cwd=folder)
    assert forced.returncode == 0, forced.stderr[-3000:]
    with open(tmp_path / "compare" / "comparison.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert sorted(row["protocol"] for row in rows) == ["A", "B", "reference", "reference"]
    assert "max_prompts_per_category\": 1" in (tmp_path / "compare" / "comparison.md").read_text()


def test_only_subject_runs_can_be_named(two_protocols):
    folder, tracking_uri = two_protocols
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("dreambooth")
    batch = client.search_runs([experiment.experiment_id], "tags.`dreambooth.stage` = 'batch'")[0]
    result = cli("compare", "--runs", batch.info.run_id, "--tracking-uri", tracking_uri, cwd=folder)
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --runs: {batch.info.run_id} is a batch run; name subject runs"
