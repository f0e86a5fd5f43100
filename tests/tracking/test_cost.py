"""What stages cost: each stage run's accelerator-seconds, node type and estimate; summed on its subject's
run; and batch.budget refusing a batch before any subject run opens."""

import time

import pytest
from mlflow.tracking import MlflowClient

from conftest import SAMPLE_SUBJECT, copy_photos
from dreambooth.stages import FINE_TUNE, SAMPLES
from dreambooth.tracking import (
    TAG_MODEL_LOCATION,
    TAG_NODE_TYPE,
    close_subject_run,
    open_batch_run,
    open_subject_run,
    stage_run,
)
from dreambooth.tracking.cost import ACCELERATOR_SECONDS, ESTIMATED

PRICE = 36.0  # per accelerator-hour: 0.01 per second, so the figures are easy to read


def test_stages_record_their_cost_a_retry_adds_to_it_and_the_subject_sums_them(tmp_path, make_config):
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config()
    subject = open_subject_run(tracking, open_batch_run(tracking, config, "job", "job"), config, "fingerprint")
    prices = {"cpu": PRICE}
    for attempt in range(2):  # the fine-tune preempted once, then retried: the second attempt continues its run
        with stage_run(tracking, subject, FINE_TUNE, prices=prices) as run:
            time.sleep(0.3)
    with pytest.raises(RuntimeError), stage_run(tracking, subject, SAMPLES, prices=prices):
        time.sleep(0.2)
        raise RuntimeError("the sampler failed")  # a failed stage spent its time all the same

    mlflow = MlflowClient(tracking)
    fine_tune, samples = mlflow.get_run(run.run_id), next(r for r in mlflow.search_runs(["1"]) if r.data.tags.get("dreambooth.stage") == "samples")
    assert fine_tune.data.tags[TAG_NODE_TYPE] == "cpu"
    assert 0.6 <= fine_tune.data.metrics[ACCELERATOR_SECONDS] < 1.5  # both attempts
    assert 0.2 <= samples.data.metrics[ACCELERATOR_SECONDS] < 1.0
    assert fine_tune.data.metrics[ESTIMATED] == pytest.approx(fine_tune.data.metrics[ACCELERATOR_SECONDS] * PRICE / 3600)
    mlflow.set_tag(subject, TAG_MODEL_LOCATION, "/models/dog")
    close_subject_run(tracking, mlflow.get_run(subject))
    summed = mlflow.get_run(subject).data.metrics
    assert summed[ACCELERATOR_SECONDS] == pytest.approx(fine_tune.data.metrics[ACCELERATOR_SECONDS] + samples.data.metrics[ACCELERATOR_SECONDS])
    assert summed[ESTIMATED] == pytest.approx(summed[ACCELERATOR_SECONDS] * PRICE / 3600)


def test_a_batch_over_budget_is_refused_before_any_subject_run_opens(tmp_path, make_config, capsys):
    from dreambooth.catalogue.subjects import SubjectEntry, entries_to_json
    from dreambooth.tasks.batch import plan_task
    from dreambooth.tracking import log_metrics, subject_runs

    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow = MlflowClient(tracking)
    config = make_config()
    yesterday = open_batch_run(tracking, config, "yesterday", "yesterday")
    for cost in (2.0, 4.0):  # two subjects trained yesterday, at 3.00 a subject on average
        run = open_subject_run(tracking, yesterday, config.model_copy(update={"subject": config.subject.model_copy(
            update={"name": f"old-{cost}"})}), f"fingerprint-{cost}")
        log_metrics(mlflow, run, {ESTIMATED: cost})
        mlflow.set_tag(run, TAG_MODEL_LOCATION, "/models/old")
        close_subject_run(tracking, mlflow.get_run(run))
        log_metrics(mlflow, run, {ESTIMATED: cost})  # closing summed its (absent) stages: the figure stays the test's

    photos = copy_photos(SAMPLE_SUBJECT, tmp_path / "dog", ["00.jpg", "01.jpg"])
    subjects = entries_to_json([SubjectEntry(id=f"dog-{i}", photos=str(photos), class_noun="dog") for i in range(4)])
    strict = config.model_copy(update={"batch": config.batch.model_copy(update={"budget": 10.0})})
    with pytest.raises(SystemExit) as stopped:
        plan_task(strict.to_json(), tracking, "", subjects, False, "tonight", "tonight", str(tmp_path / "plan.json"))
    assert stopped.value.code == 2
    assert ("error: batch.budget: 4 subjects to train x 3.00 USD (mean of the last 2 trained) = 12.00 USD, over the budget of 10.00 USD"
            in capsys.readouterr().err)
    tonight = mlflow.search_runs(["1"], "tags.`kfp.job_name` = 'tonight' and tags.`dreambooth.stage` = 'batch'")[0]
    assert subject_runs(tracking, tonight.info.run_id) == [] and not (tmp_path / "plan.json").exists()

    enough = config.model_copy(update={"batch": config.batch.model_copy(update={"budget": 12.5})})
    assert plan_task(enough.to_json(), tracking, "", subjects, False, "later", "later", str(tmp_path / "plan.json")) == 4
