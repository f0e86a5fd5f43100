"""The run's own setting parameters (config.RUN_SETTINGS) as KFP sees them: every signature that declares them
(the DAG, the shard launcher and the two tasks that apply them) declares exactly the table's, in its order,
with the setting's type; the pipelines' defaults are the settings' own, so a run created from the KFP UI's
form trains what the config file would."""

from __future__ import annotations

import inspect
import typing

import pytest

from dreambooth.config import RUN_SETTINGS, RunConfig
from dreambooth.dag.components.plan_batch import plan_batch
from dreambooth.dag.launcher import build_shard_launcher, launch_shards
from dreambooth.dag.pipeline import build_pipeline, run_settings_of

# Where a run parameter means "the config's own" (model.base "": the compiled config's; resolution 0: the model's).
THE_CONFIGS_OWN = {"base_model": "", "resolution": 0}


def setting_type(parameter: str) -> type:
    """The KFP parameter type of a setting: str for a Literal of names, int for an optional int."""
    section, key = RUN_SETTINGS[parameter]
    annotation = RunConfig.model_fields[section].annotation.model_fields[key].annotation
    arguments = [argument for argument in typing.get_args(annotation) if argument is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(arguments[0])
    return arguments[0] if arguments else annotation


def setting_default(parameter: str):
    section, key = RUN_SETTINGS[parameter]
    return THE_CONFIGS_OWN.get(parameter, getattr(getattr(RunConfig(), section), key))


def run_parameters(function) -> dict[str, inspect.Parameter]:
    return {name: parameter for name, parameter in inspect.signature(function).parameters.items() if name in RUN_SETTINGS}


def signatures() -> dict:
    config = RunConfig()
    return {"the DAG": build_pipeline(config).pipeline_func, "the shard launcher": build_shard_launcher(config).pipeline_func,
            "plan-batch": plan_batch.python_func, "launch-shards": launch_shards.python_func}


@pytest.mark.parametrize("where", ["the DAG", "the shard launcher", "plan-batch", "launch-shards"])
def test_each_signature_declares_the_tables_settings_with_their_types(where):
    declared = run_parameters(signatures()[where])
    assert list(declared) == list(RUN_SETTINGS), f"{where}: the run settings in the table's order"
    assert {name: parameter.annotation for name, parameter in declared.items()} == {name: setting_type(name) for name in RUN_SETTINGS}


@pytest.mark.parametrize("where", ["the DAG", "the shard launcher"])
def test_a_pipelines_defaults_are_the_settings_own(where):
    declared = run_parameters(signatures()[where])
    assert {name: parameter.default for name, parameter in declared.items()} == {name: setting_default(name) for name in RUN_SETTINGS}


def test_the_pipelines_hand_their_tasks_every_setting_by_the_table():
    given = {"config_json": "{}", **{name: f"value of {name}" for name in RUN_SETTINGS}}
    assert run_settings_of(given) == {name: f"value of {name}" for name in RUN_SETTINGS}
    spec = build_pipeline(RunConfig()).pipeline_spec
    compiled = {task_name: task for component in spec.components.values() for task_name, task in component.dag.tasks.items()}
    plan_task_inputs = compiled["plan-batch"].inputs.parameters
    for name in RUN_SETTINGS:
        # inside the exit handler's group KFP names the run's parameter as a channel
        assert plan_task_inputs[name].component_input_parameter == f"pipelinechannel--{name}", f"plan-batch's {name} is the run's"
