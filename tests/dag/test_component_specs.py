"""components/ at the top of the repository: each stage's KFP component spec, compiled from the package's
component, for teams that build their own pipelines from our stages."""

# No `from __future__ import annotations`: KFP reads the pipeline signature's real types.

import filecmp
from pathlib import Path

from conftest import REPO, SAMPLE_OBJECT, SAMPLE_SUBJECT, cli, quick_config
from dreambooth.stages import COMPONENT_STAGES

COMPONENTS = REPO / "components"


def _files(root: Path) -> list[Path]:
    return sorted(path.relative_to(root) for path in root.rglob("*") if path.is_file())


def test_the_checked_in_specs_are_what_the_package_writes(tmp_path):
    """`dreambooth components --output components/` after any change to a component (this fails until then)."""
    result = cli("components", "--output", str(tmp_path / "components"))
    assert result.returncode == 0, result.stderr
    written = tmp_path / "components"
    assert _files(written) == _files(COMPONENTS)
    stale = [str(name) for name in _files(written) if not filecmp.cmp(written / name, COMPONENTS / name, shallow=False)]
    assert stale == [], "run `dreambooth components --output components/`"


def test_every_stage_with_a_task_has_a_spec_that_loads_as_that_stage():
    from kfp import components

    from dreambooth.dag.specs import stage_components

    assert sorted(path.name for path in COMPONENTS.iterdir() if path.is_dir()) == sorted(COMPONENT_STAGES)
    for name, component in stage_components().items():
        loaded = components.load_component_from_file(str(COMPONENTS / name / "component.yaml"))
        assert loaded.component_spec.name == name
        assert sorted(loaded.component_spec.inputs) == sorted(component.component_spec.inputs)
        assert sorted(loaded.component_spec.outputs or {}) == sorted(component.component_spec.outputs or {})


def test_a_pipeline_of_two_stages_loaded_from_their_specs_runs_locally(tmp_path):
    """plan-batch -> prior-groups, composed by a team from the spec files, through kfp.local: two subjects of two
    classes plan into two class-prior groups, on a batch run in the team's MLflow (about 10 s: both are CPU tasks)."""
    from kfp import components, dsl, local

    from dreambooth.catalogue.subjects import entries_to_json, validate_entries
    from dreambooth.config import load_config
    from dreambooth.tracking import find_batch_run

    plan_batch = components.load_component_from_file(str(COMPONENTS / "plan-batch" / "component.yaml"))
    prior_groups = components.load_component_from_file(str(COMPONENTS / "prior-groups" / "component.yaml"))

    config = load_config(quick_config(tmp_path))

    @dsl.pipeline(name="a-teams-own-pipeline")
    def teams_pipeline(config_json: str, tracking_uri: str, subjects_json: str) -> list:
        plan = plan_batch(config_json=config_json, tracking_uri=tracking_uri, subjects_uri="", subjects_json=subjects_json,
                          force=False, job_id="team-job-1", job_name="a-teams-own-pipeline", shard="", **config.run_settings())
        return prior_groups(batch_plan=plan.outputs["batch_plan"]).output

    entries = validate_entries([("test", {"id": "rex", "photos": str(SAMPLE_SUBJECT), "class_noun": "dog"}),
                                ("test", {"id": "pack", "photos": str(SAMPLE_OBJECT), "class_noun": "backpack"})], "test", config)
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "root"), raise_on_error=True)
    task = teams_pipeline(config_json=config.to_json(), tracking_uri=tracking_uri, subjects_json=entries_to_json(entries))
    groups = task.output
    assert sorted(group["class_noun"] for group in groups) == ["backpack", "dog"]
    batch_run = find_batch_run(tracking_uri, "dreambooth", "team-job-1")
    assert batch_run is not None and {group["batch_run_id"] for group in groups} == {batch_run.info.run_id}
