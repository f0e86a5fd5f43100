"""Each stage's component as a spec file, for teams that build their own pipelines from our stages:
`components/<stage>/component.yaml` (KFP's compiled component, loaded with
`kfp.components.load_component_from_file`) and a README of its inputs and outputs. Written by
`dreambooth components --output components/`; tests/dag/test_component_specs.py keeps the checked-in
folder in sync with the package.
"""

from __future__ import annotations

from pathlib import Path

from dreambooth.dag.components.image import COMPONENT_IMAGE
from dreambooth.dag.components.assign_priors import assign_priors
from dreambooth.dag.components.batch_failures import batch_failures
from dreambooth.dag.components.class_priors import class_priors
from dreambooth.dag.components.evaluate import evaluate
from dreambooth.dag.components.evaluate_upscaled import evaluate_upscaled
from dreambooth.dag.components.fine_tune import fine_tune
from dreambooth.dag.components.finish_tracking import finish_tracking
from dreambooth.dag.components.ingest import ingest
from dreambooth.dag.components.plan_batch import plan_batch
from dreambooth.dag.components.prior_groups import prior_groups
from dreambooth.dag.components.samples import samples
from dreambooth.dag.components.summarize import summarize
from dreambooth.dag.components.super_resolution import super_resolution
from dreambooth.dag.launcher import launch_shards
from dreambooth.stages import BY_NAME, COMPONENT_STAGES

SPEC_FILE = "component.yaml"
COMPONENTS = (launch_shards, plan_batch, prior_groups, class_priors, assign_priors, ingest, fine_tune, samples, evaluate,
              super_resolution, evaluate_upscaled, summarize, batch_failures, finish_tracking)


def stage_components() -> dict:
    """{stage name: its component}, in the order of the stage table."""
    by_stage = {component.component_spec.name: component for component in COMPONENTS}
    return {name: by_stage[name] for name in COMPONENT_STAGES}


def _type_name(kfp_type: str) -> str:
    return kfp_type.removeprefix("system.").split("@", 1)[0]


def readme(name: str, component) -> str:
    """A component's README: what it does, its inputs and outputs, and how to load it."""
    spec = component.component_spec
    does = BY_NAME[name].does
    lines = [f"# {name}", "", f"{does[0].upper()}{does[1:]} (a {BY_NAME[name].scope} stage).", "", (spec.description or "").strip(), "",
             "| input | type |", "| --- | --- |"]
    lines += [f"| `{input_name}` | {_type_name(item.type)} |" for input_name, item in spec.inputs.items()]
    lines += ["", "| output | type |", "| --- | --- |"]
    lines += [f"| `{output_name}` | {_type_name(item.type)} |" for output_name, item in (spec.outputs or {}).items()]
    lines += ["", f"It runs in the component image (`{COMPONENT_IMAGE}` unless DREAMBOOTH_COMPONENT_IMAGE named another when",
              "the specs were written), which holds the `dreambooth` package.", "", "```python",
              "from kfp import components", "", f'{name.replace("-", "_")} = components.load_component_from_file("components/{name}/{SPEC_FILE}")',
              "```", ""]
    return "\n".join(lines)


def write_component_specs(output: Path) -> list[Path]:
    """Write every stage's spec and README under `output`; returns the spec files."""
    from kfp import compiler

    written = []
    for name, component in stage_components().items():
        folder = output / name
        folder.mkdir(parents=True, exist_ok=True)
        compiler.Compiler().compile(component, str(folder / SPEC_FILE))
        (folder / "README.md").write_text(readme(name, component))
        written.append(folder / SPEC_FILE)
    (output / "README.md").write_text(index())
    return written


def index() -> str:
    """The folder's README: one line per stage, and how a pipeline of your own uses them."""
    lines = ["# Components", "", "Each stage of the DreamBooth pipeline as a KFP v2 component spec, compiled from the `dreambooth`",
             "package (`dreambooth components --output components/` writes this folder; a test keeps it in sync).",
             "Load one into a pipeline of your own with `kfp.components.load_component_from_file`; it runs in the",
             "component image, which holds the package.", "", "| stage | what it does | whose |", "| --- | --- | --- |"]
    lines += [f"| [{name}]({name}/README.md) | {BY_NAME[name].does} | {BY_NAME[name].scope} |" for name in stage_components()]
    lines += ["", "```python", "from kfp import components, dsl", "",
              'plan_batch = components.load_component_from_file("components/plan-batch/component.yaml")',
              'prior_groups = components.load_component_from_file("components/prior-groups/component.yaml")', "",
              "@dsl.pipeline(name=\"my-pipeline\")", "def my_pipeline(config_json: str, tracking_uri: str, subjects_json: str):",
              "    plan = plan_batch(config_json=config_json, tracking_uri=tracking_uri, subjects_json=subjects_json, ...)",
              '    prior_groups(batch_plan=plan.outputs["batch_plan"])', "```", ""]
    return "\n".join(lines)
