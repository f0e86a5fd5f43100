"""Planning a batch: fingerprints, up-to-date subjects, class-prior groups, and failed groups."""

import json

import pytest

from conftest import SAMPLE_SUBJECT, copy_photos
from dreambooth.catalogue.planning import BatchPlan, PriorOutcome, group_priors, plan_batch, subject_fingerprint, subjects_with_priors
from dreambooth.storage import content_digests, content_digests_of
from dreambooth.catalogue.subjects import SubjectEntry, subject_config
from dreambooth.tasks.batch import prior_groups_task


PHOTOS = str(SAMPLE_SUBJECT)  # planning lists the photos (not read further): any real folder of them


@pytest.fixture
def shared(make_config):
    return make_config()


def _plan(entries, shared, trained=None, force=False):
    opened = []

    def open_run(config, fingerprint):
        opened.append(config.subject.name)
        return f"run-{config.subject.name}"

    planned = plan_batch(entries, shared, content_digests_of, lambda fp: (trained or {}).get(fp), open_run, force)
    return planned, opened


def test_the_fingerprint_follows_photos_and_settings_but_not_where_the_run_goes(tmp_path, shared):
    photos = copy_photos(SAMPLE_SUBJECT, tmp_path / "dog", ["00.jpg", "01.jpg"])
    entry = SubjectEntry(id="dog", photos=str(photos), class_noun="dog")
    config = subject_config(shared, entry)
    first = subject_fingerprint(config, content_digests(str(photos)))
    moved = config.model_copy(update={"tracking": config.tracking.model_copy(update={"uri": "http://elsewhere:5000"}),
                                      "storage": config.storage.model_copy(update={"work_dir": "/elsewhere"})})
    assert subject_fingerprint(moved, content_digests(str(photos))) == first
    longer = config.model_copy(update={"training": config.training.model_copy(update={"max_steps": 9})})
    assert subject_fingerprint(longer, content_digests(str(photos))) != first
    (photos / "01.jpg").write_bytes((photos / "01.jpg").read_bytes() + b"\0")  # one byte more
    assert subject_fingerprint(config, content_digests(str(photos))) != first


def test_subjects_a_finished_run_trained_are_up_to_date_unless_forced(tmp_path, shared):
    entries = [SubjectEntry(id=name, photos=str(copy_photos(SAMPLE_SUBJECT, tmp_path / name, ["00.jpg", "01.jpg"])), class_noun="dog")
               for name in ("old", "new")]
    planned, _ = _plan(entries, shared)
    trained = {planned[0].fingerprint: "run-from-yesterday"}
    again, opened = _plan(entries, shared, trained)
    assert [s.up_to_date_run_id for s in again] == ["run-from-yesterday", ""] and opened == ["new"]
    forced, opened = _plan(entries, shared, trained, force=True)
    assert not any(s.up_to_date for s in forced) and opened == ["old", "new"]


def test_subjects_share_class_priors_when_their_images_would_be_drawn_alike(shared):
    entries = [
        SubjectEntry(id="dog-a", photos=PHOTOS, class_noun="dog"),
        SubjectEntry(id="dog-b", photos=PHOTOS, class_noun="dog", overrides={"priors": {"num_class_images": 12}}),
        SubjectEntry(id="dog-c", photos=PHOTOS, class_noun="dog", overrides={"priors": {"sampler": {"num_inference_steps": 3}}}),
        SubjectEntry(id="mug", photos=PHOTOS, class_noun="mug"),
        SubjectEntry(id="plain", photos=PHOTOS, class_noun="dog", overrides={"priors": {"enabled": False}}),
    ]
    planned, _ = _plan(entries, shared)
    groups = group_priors(planned)
    assert sorted(group.subjects for group in groups) == [["dog-a", "dog-b"], ["dog-c"], ["mug"]]
    shared_dogs = next(group for group in groups if group.subjects == ["dog-a", "dog-b"])
    assert json.loads(shared_dogs.config_json)["priors"]["num_class_images"] == 12  # enough for the larger need
    # The group's settings (its priors run's params, its task's log) name no member: `forget` leaves them.
    assert json.loads(shared_dogs.config_json)["subject"]["name"] == "class-dog" and "dog-a" not in shared_dogs.config_json
    assert planned[-1].prior_key == ""  # trains without prior preservation


def test_a_failed_prior_group_fails_its_subjects_but_keeps_them_in_the_fan_out(shared):
    entries = [SubjectEntry(id="dog", photos=PHOTOS, class_noun="dog"), SubjectEntry(id="mug", photos=PHOTOS, class_noun="mug")]
    planned, _ = _plan(entries, shared)
    plan = BatchPlan("batch-1", planned, group_priors(planned))
    dog, mug = (group.prior_key for group in plan.prior_groups)
    outcomes = [vars(PriorOutcome(dog, class_images="/classes/dog", count=4)), vars(PriorOutcome(mug, error="cannot load the model"))]
    items, failed = subjects_with_priors(BatchPlan.from_json(plan.to_json()), outcomes)
    assert [(item["subject_id"], item["class_images"]) for item in items] == [("dog", "/classes/dog"), ("mug", "")]
    assert failed == {"mug": "class priors: cannot load the model"}


def test_without_any_prior_group_one_empty_group_keeps_the_loop_collectable(tmp_path, shared):
    planned, _ = _plan([SubjectEntry(id="plain", photos=PHOTOS, class_noun="dog", overrides={"priors": {"enabled": False}})], shared)
    path = tmp_path / "plan.json"
    path.write_text(BatchPlan("batch-1", planned, group_priors(planned)).to_json())
    assert [group["prior_key"] for group in prior_groups_task(str(path))] == [""]


def test_the_runs_setting_parameters_shape_every_subject_of_the_plan(tmp_path, shared):
    """What a KFP user edits in the run's parameters (max_steps, learning_rate...) is what trains, and what is tracked."""
    from mlflow.tracking import MlflowClient

    from dreambooth.catalogue.subjects import entries_to_json
    from dreambooth.tasks.batch import plan_task

    photos = copy_photos(SAMPLE_SUBJECT, tmp_path / "dog", ["00.jpg", "01.jpg", "02.jpg"])
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    subjects = entries_to_json([SubjectEntry(id="dog", photos=str(photos), class_noun="dog")])
    edited = {**shared.run_settings(), "max_steps": 3, "learning_rate": 2e-4}
    plan_path = tmp_path / "plan.json"
    assert plan_task(shared.to_json(), tracking, "", subjects, False, "job-1", "job-1", str(plan_path), edited) == 1
    plan = BatchPlan.from_json(plan_path.read_text())
    from dreambooth.config import RunConfig

    trained_with = RunConfig.from_json(plan.subjects[0].config_json).training
    assert (trained_with.max_steps, trained_with.learning_rate) == (3, 2e-4) and shared.training.max_steps != 3
    params = MlflowClient(tracking).get_run(plan.subjects[0].subject_run_id).data.params
    assert (params["training.max_steps"], params["training.learning_rate"]) == ("3", "0.0002")


def test_a_person_without_consent_is_refused_on_its_run_and_the_others_train(tmp_path, shared, capsys):
    """The plan refuses the subject in one line and records why on its run; its class priors are not drawn;
    the subject that gave consent has it on its run; consent itself retrains nothing."""
    import yaml
    from mlflow.tracking import MlflowClient

    from dreambooth.reports.summary import collect_rows
    from dreambooth.tasks.batch import plan_task
    from dreambooth.tracking import TAG_CONSENT, TAG_ERROR, TAG_SUBJECT_STATUS

    person = {"subject": {"kind": "person"}}
    consent = {"given_by": "Ana Ruiz", "given_on": "2026-11-02", "record": "forms/ana.pdf"}
    subjects = tmp_path / "subjects.yaml"
    subjects.write_text(yaml.safe_dump({"subjects": [
        {"id": "dog", "photos": str(SAMPLE_SUBJECT), "class_noun": "dog"},
        {"id": "ana", "photos": str(SAMPLE_SUBJECT), "class_noun": "woman", "overrides": person, "consent": consent},
        {"id": "bob", "photos": str(SAMPLE_SUBJECT), "class_noun": "man", "overrides": person},
    ]}))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    plan_path = tmp_path / "plan.json"
    assert plan_task(shared.to_json(), tracking, str(subjects), "", False, "job-1", "job-1", str(plan_path)) == 3
    printed = capsys.readouterr().out
    assert "bob: refused: consent: missing (subject.kind is person): give the subject `consent: " in printed
    assert "dog: to train" in printed and "ana: to train" in printed

    plan = BatchPlan.from_json(plan_path.read_text())
    assert [s.subject_id for s in plan.subjects if s.refused] == ["bob"]
    assert sorted(group.subjects for group in plan.prior_groups) == [["ana"], ["dog"]]  # no class images of a man
    runs = {s.subject_id: MlflowClient(tracking).get_run(s.subject_run_id).data.tags for s in plan.subjects}
    assert runs["bob"][TAG_SUBJECT_STATUS] == "failed" and runs["bob"][TAG_ERROR].startswith("refused: consent: missing")
    assert runs["ana"][TAG_CONSENT] == "given by Ana Ruiz on 2026-11-02 (record: forms/ana.pdf)" and TAG_CONSENT not in runs["dog"]
    rows = {row.subject: row for row in collect_rows(tracking, plan)}
    assert rows["bob"].status == "failed" and "consent" in rows["bob"].reason and rows["ana"].status != "failed"
    ana = next(s for s in plan.subjects if s.subject_id == "ana")
    without = json.loads(ana.config_json)
    without["subject"]["consent"] = None
    from dreambooth.config import RunConfig

    assert subject_fingerprint(RunConfig.model_validate(without), content_digests(str(SAMPLE_SUBJECT))) == ana.fingerprint


def test_a_subject_whose_photos_are_not_there_is_refused_at_the_plan_and_no_class_image_is_drawn_for_it(tmp_path, shared):
    (tmp_path / "empty").mkdir()
    entries = [SubjectEntry(id="rex", photos=str(tmp_path / "rex"), class_noun="dog"),
               SubjectEntry(id="dog", photos=PHOTOS, class_noun="dog"),
               SubjectEntry(id="mug", photos=str(tmp_path / "empty"), class_noun="mug")]
    planned, opened = _plan(entries, shared)
    assert [s.refused for s in planned] == [f"photos: nothing at {tmp_path / 'rex'} (a missing or empty folder)", "",
                                            f"photos: nothing at {tmp_path / 'empty'} (a missing or empty folder)"]
    assert opened == ["rex", "dog", "mug"]  # each gets a run, to record why
    assert [(group.class_noun, group.subjects) for group in group_priors(planned)] == [("dog", ["dog"])]  # no mug priors


def test_batch_require_consent_refuses_every_subject_without_it(shared):
    strict = shared.model_copy(update={"batch": shared.batch.model_copy(update={"require_consent": True})})
    entries = [SubjectEntry(id="dog", photos=PHOTOS, class_noun="dog"),
               SubjectEntry(id="rex", photos=PHOTOS, class_noun="dog", consent={"given_by": "Rex's owner", "given_on": "2026-10-01"})]
    planned, _ = _plan(entries, strict)
    assert [s.refused for s in planned] == ["consent: missing (batch.require_consent is set): give the subject `consent: "
                                            "{given_by: ..., given_on: YYYY-MM-DD}`, who agreed to their photos being trained on and when", ""]
    assert [group.subjects for group in group_priors(planned)] == [["rex"]]


def test_planning_costs_the_same_few_mlflow_calls_for_every_subject_more(tmp_path, shared):
    """A subject to train costs its run and its params, nothing that grows with the batch or the experiment
    (one search per subject, or a listing of the batch's runs per subject, would)."""
    import math

    from dreambooth.catalogue.subjects import entries_to_json
    from dreambooth.tasks.batch import plan_task
    from dreambooth.tracking.store import counted_client_calls

    photos = copy_photos(SAMPLE_SUBJECT, tmp_path / "dog", ["00.jpg", "01.jpg"])
    totals = {}
    for count in (3, 9):
        tracking = f"sqlite:///{tmp_path / f'mlflow-{count}.db'}"
        subjects = entries_to_json([SubjectEntry(id=f"dog-{i}", photos=str(photos), class_noun="dog") for i in range(count)])
        with counted_client_calls() as calls:
            plan_task(shared.to_json(), tracking, "", subjects, False, f"job-{count}", f"job-{count}", str(tmp_path / f"{count}.json"))
        totals[count] = sum(calls.values())
    per_subject = (totals[9] - totals[3]) / 6
    assert per_subject == 1 + math.ceil(len(shared.flat_params()) / 100)  # create_run, then params 100 per request


def test_a_shard_looks_up_its_own_subjects_not_every_run_the_experiment_trained(tmp_path, shared, monkeypatch):
    """Each of a catalogue's hundreds of shards plans a few subjects: its MLflow calls must not grow with the
    runs the experiment holds (reading every trained run again per shard would), and it still finds the
    subject that is up to date."""
    from mlflow.tracking import MlflowClient

    from dreambooth.catalogue.shards import Shard
    from dreambooth.catalogue.subjects import entries_to_json
    from dreambooth.tasks.batch import plan_task
    from dreambooth.tracking import TAG_SUBJECT_STATUS, TRAINED, experiment_id, layout
    from dreambooth.tracking.store import counted_client_calls

    monkeypatch.setattr(layout, "PAGE_SIZE", 2)  # so that reading the experiment's trained runs takes pages
    folders = [copy_photos(SAMPLE_SUBJECT, tmp_path / f"dog-{i}", [f"0{i % 4}.jpg", f"0{(i + 1) % 4}.jpg"]) for i in range(4)]
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking)
    experiment_id(tracking, shared.tracking.experiment)  # it exists, empty

    def shard_plan(name: str, entries: list) -> tuple[int, BatchPlan]:
        shard = Shard("the-batch-run", 1, 1, [entry.id for entry in entries])
        with counted_client_calls() as calls:
            plan_task(shared.to_json(), tracking, "", entries_to_json(entries), False, name, name, str(tmp_path / f"{name}.json"),
                      None, shard.to_json())
        return calls["search_runs"], BatchPlan.from_json((tmp_path / f"{name}.json").read_text())

    shard_entries = [SubjectEntry(id="rex", photos=str(folders[0]), class_noun="dog"),
                     SubjectEntry(id="fido", photos=str(folders[1]), class_noun="dog")]
    searches_before, _ = shard_plan("empty", shard_entries)
    # The experiment now holds six trained subject runs, rex's among them.
    many = [shard_entries[0]] + [SubjectEntry(id=f"old-{i}", photos=str(folders[2 + i % 2]), class_noun="dog") for i in range(5)]
    plan_task(shared.to_json(), tracking, "", entries_to_json(many), False, "old", "old", str(tmp_path / "old.json"))
    for subject in BatchPlan.from_json((tmp_path / "old.json").read_text()).subjects:
        client.set_tag(subject.subject_run_id, TAG_SUBJECT_STATUS, TRAINED)
        client.set_terminated(subject.subject_run_id)
    searches_after, plan = shard_plan("full", shard_entries)
    assert searches_after == searches_before
    assert {subject.subject_id: subject.up_to_date for subject in plan.subjects} == {"rex": True, "fido": False}
