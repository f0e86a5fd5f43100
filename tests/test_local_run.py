"""What `pipeline.py run` reads from kfp.local's own state, on real local pipeline runs."""

import pytest
from kfp import dsl, local

from dreambooth.local_run import failed_task_chain


@dsl.component(install_kfp_package=False)
def succeed() -> str:
    return "ok"


@dsl.component(install_kfp_package=False)
def refuse():
    raise ValueError("broken on purpose")


@dsl.pipeline(name="toy")
def toy():
    first = succeed()
    with dsl.ExitHandler(succeed()):  # nested like the product's DAG
        refuse().after(first)


def test_the_failed_task_is_named_from_kfps_report(tmp_path):
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path), raise_on_error=True)
    with pytest.raises(RuntimeError) as failure:
        toy()
    chain = failed_task_chain(str(failure.value))
    assert chain is not None and chain.split(" inside ")[0] == "refuse"
    assert failed_task_chain("CUDA out of memory") is None  # not a task failure: re-raised as it is
