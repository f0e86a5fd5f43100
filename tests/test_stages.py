"""The table of stages (dreambooth.stages) is the one spelling the DAG and the cluster settings use."""

import pytest
import yaml

from conftest import dag_tasks
from dreambooth.commands.submit import compile_pipeline
from dreambooth.config import load_config
from dreambooth.errors import InputError
from dreambooth.commands.kfp_local import component_of
from dreambooth.stages import COMPONENT_STAGES, FINE_TUNE


def test_every_task_of_the_dag_is_a_stage_of_the_table_and_every_stage_is_in_the_dag(tmp_path):
    containers = set()
    for launcher in (False, True):  # the DAG, and the launcher of a sharded batch
        compile_pipeline(load_config("gke-sd15"), tmp_path / "dreambooth.yaml", on_cluster=True, launcher=launcher)
        spec = next(yaml.safe_load_all((tmp_path / "dreambooth.yaml").read_text()))
        containers |= {name for name, (_, task) in dag_tasks(spec).items() if "executorLabel" in spec["components"][task["componentRef"]["name"]]}
    assert {component_of(name) for name in containers} == set(COMPONENT_STAGES)


def test_cluster_settings_name_stages_by_the_table():
    assert load_config("gke-sd15").cluster.resources(FINE_TUNE.name).gpus == 1
    with pytest.raises(InputError, match=r"cluster.stages: finetune: not a stage of the pipeline; the stages are .*fine-tune"):
        load_config("gke-sd15", {"cluster": {"stages": {"finetune": {"gpus": 1}}}})
