"""An experiment through kfp.local: 2 subjects x 5 variants as one batch, the paper's tables filled
from its runs, logged on the batch run and printed, and `compare --batch-run` rendering them again."""

import json
import os
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from conftest import SAMPLE_OBJECT, SAMPLE_SUBJECT, cli, quick_config
from dreambooth.catalogue.planning import read_plan
from dreambooth.tracking import TAG_CLASS_PROMPT, TAG_PRIOR_KEY
from pipeline_checks import report_lines, subject_blocks

pytestmark = pytest.mark.slow(seconds=170)

VARIANTS = [
    {"name": "dreambooth"},
    {"name": "ti", "training": {"method": "textual_inversion", "textual_inversion": {"learning_rate": 5.0e-2}}},
    {"name": "no-ppl", "training": {"prior_loss_weight": 0}},
    {"name": "no-class", "class_noun": ""},
    {"name": "wrong-class", "class_noun": {"dog": "backpack", "backpack": "dog"}},
]


def test_an_experiment_runs_every_variant_and_fills_the_papers_tables(tmp_path):
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text(yaml.safe_dump({
        "subjects": [{"id": "dog", "photos": str(SAMPLE_SUBJECT), "class_noun": "dog"},
                     {"id": "backpack", "photos": str(SAMPLE_OBJECT), "class_noun": "backpack"}],
        "variants": VARIANTS,
    }))
    config = quick_config(tmp_path, experiment="paper", superres=False, max_steps=2, checkpoint_every=2)
    raw = yaml.safe_load(Path(config).read_text())  # ten trainings: each as small as the stages allow
    raw["priors"]["num_class_images"] = 2
    raw["samples"].update({"prompts": raw["samples"]["prompts"][:1], "compare_with_base": False})
    raw["evaluation"]["pres_images"] = 1
    Path(config).write_text(yaml.safe_dump(raw))
    environment = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    result = cli("experiment", str(experiment), "--config", config, "--output-dir", str(tmp_path / "out"), cwd=tmp_path, env=environment)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-3000:]

    # Every (subject, variant) trained in the one batch.
    blocks = subject_blocks(result.stdout)
    assert sorted(blocks) == sorted(f"{subject}--{variant['name']}" for subject in ("dog", "backpack") for variant in VARIANTS)
    # The four tables, printed at the end with every cell filled (ours beside the paper's).
    printed = result.stdout.split("\n# Experiment ", 1)[1]
    for title in ("## Method comparison", "## Class noun", "## Prior preservation", "## Number of photos (DINO)"):
        assert title in printed
    cells = [line for line in printed.splitlines() if line.startswith("| ") and "---" not in line and "(ours)" not in line]
    assert len(cells) == 3 + 3 + 2 + 1  # the photos table: both subjects' 4 photos, the baseline's count
    assert not [line for line in cells if "missing" in line], cells
    assert all("(n=2)" in line for line in cells if not line.startswith("| Real images"))
    assert "| 4 photos | dreambooth |" in printed and "| 0.604 | 0.876 |" in printed  # the paper's 4-photo figures beside

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    batch_run = report_lines(result.stdout)["mlflow run"].split()[0]
    logged = {artifact.path for artifact in client.list_artifacts(batch_run, "experiment")}
    assert logged == {f"experiment/{name}" for name in ("tables.md", "tables.csv", "table-method.png", "table-class_noun.png",
                                                        "table-prior_preservation.png", "table-photos.png")}

    # The class-noun variants trained with the prompts they claim, on the class images they claim.
    children = client.search_runs([client.get_experiment_by_name("paper").experiment_id], f"tags.`mlflow.parentRunId` = '{batch_run}'")
    priors = {run.data.tags[TAG_PRIOR_KEY]: run for run in children if TAG_PRIOR_KEY in run.data.tags}  # one run per class drawn
    prior_keys = {planned.subject_id: planned.prior_key for planned in read_plan(f"sqlite:///{tmp_path / 'mlflow.db'}", batch_run).subjects}
    for subject, variant, instance_noun, class_noun, like in (
        ("dog", "wrong-class", "backpack", "backpack", "backpack--dreambooth"),
        ("dog", "no-class", None, "dog", "dog--dreambooth"),
        ("backpack", "wrong-class", "dog", "dog", "dog--dreambooth"),
    ):
        entry = f"{subject}--{variant}"
        trained = json.loads((Path(blocks[entry]["model"]) / "dreambooth.json").read_text())
        identifier = trained["identifier"]
        assert trained["instance_prompt"] == f"a {identifier} {instance_noun}" if instance_noun else f"a {identifier}"
        assert trained["class_prompt"] == f"a {class_noun}"
        assert prior_keys[entry] == prior_keys[like]  # that class's images, drawn once and shared
        assert priors[prior_keys[entry]].data.tags[TAG_CLASS_PROMPT] == f"a {class_noun}"
    assert json.loads((Path(blocks["dog--ti"]["model"]) / "dreambooth.json").read_text())["method"] == "textual_inversion"
    assert json.loads((Path(blocks["dog--no-ppl"]["model"]) / "dreambooth.json").read_text())["class_prompt"] is None  # no class images

    # compare renders the same tables again from the runs.
    compared = cli("compare", "--batch-run", batch_run, "--config", config, "--output-dir", str(tmp_path / "compare"),
                   cwd=tmp_path, env=environment)
    assert compared.returncode == 0, compared.stderr
    again = (tmp_path / "compare" / "experiment" / "tables.md").read_text()
    logged_text = Path(client.download_artifacts(batch_run, "experiment/tables.md", str(tmp_path / "logged"))).read_text()
    assert again.split("\n", 1)[1] == logged_text.split("\n", 1)[1]  # the same tables; only the title differs
