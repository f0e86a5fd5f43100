"""The subjects file: YAML and CSV, every problem named in one pass, per-subject settings."""

import pytest
import yaml

from dreambooth.config import load_config
from dreambooth.errors import InputError
from dreambooth.catalogue.subjects import read_subjects, subject_config


@pytest.fixture
def shared():
    return load_config("tiny")


def _yaml(tmp_path, entries) -> str:
    path = tmp_path / "subjects.yaml"
    path.write_text(yaml.safe_dump({"subjects": entries}))
    return str(path)


def _problems(uri, shared) -> list[str]:
    with pytest.raises(InputError) as raised:
        read_subjects(uri, shared)
    return str(raised.value).splitlines()


def test_entries_resolve_relative_photos_and_apply_their_own_settings(tmp_path, shared):
    uri = _yaml(tmp_path, [
        {"id": "grey-dog", "photos": "gs://bucket/uploads/grey-dog/", "class_noun": "dog"},
        {"id": "red-mug", "photos": "uploads/red-mug", "class_noun": "mug", "identifier": "sks", "live": False,
         "overrides": {"training": {"max_steps": 800}}},
    ])
    grey, mug = read_subjects(uri, shared)
    assert grey.photos == "gs://bucket/uploads/grey-dog/" and mug.photos == f"{tmp_path}/uploads/red-mug"
    config = subject_config(shared, mug)
    assert (config.subject.name, config.subject.class_noun, config.subject.identifier) == ("red-mug", "mug", "sks")
    assert config.evaluation.live_subject is False and config.training.max_steps == 800
    assert subject_config(shared, grey).training.max_steps == shared.training.max_steps  # overrides stay with their subject


def test_a_csv_has_the_same_fields_but_overrides(tmp_path, shared):
    path = tmp_path / "subjects.csv"
    path.write_text("id,photos,class_noun,identifier,live\ngrey-dog,/data/grey,dog,,yes\nred-mug,/data/mug,mug,sks,\n")
    grey, mug = read_subjects(str(path), shared)
    assert (grey.identifier, grey.live, mug.identifier, mug.live) == (None, True, "sks", None)
    path.write_text("id,photos,class_noun,live\ngrey-dog,/data/grey,dog,maybe\n")
    assert _problems(str(path), shared) == [f"{path}: line 2 (grey-dog): live: 'maybe' is not true or false"]
    path.write_text("id,photos,class_noun,colour\ngrey-dog,/data/grey,dog,grey\n")
    assert "must use only the columns id,photos,class_noun,identifier,live" in _problems(str(path), shared)[0]


def test_settings_of_the_whole_batch_or_of_the_entry_cannot_be_overridden(tmp_path, shared):
    uri = _yaml(tmp_path, [
        {"id": "a", "photos": "/p", "class_noun": "dog", "overrides": {"tracking": {"experiment": "x"}}},
        {"id": "b", "photos": "/p", "class_noun": "dog", "overrides": {"superres": {"enabled": False}}},
        {"id": "c", "photos": "/p", "class_noun": "dog", "overrides": {"subject": {"class_noun": "cat"}}},
        {"id": "d", "photos": "/p", "class_noun": "dog", "overrides": {"training": {"max_stepz": 10}}},
        {"id": "e", "photos": "/p", "class_noun": "dog", "overrides": {"training": {"learning_rate": -1}}},
    ])
    problems = _problems(uri, shared)
    assert len(problems) == 5
    assert problems[0].endswith("entry 1 (a): overrides.tracking: a batch-wide setting; set it in the config, not per subject")
    assert problems[1].endswith("entry 2 (b): overrides.superres.enabled: a batch-wide setting; set it in the config, not per subject")
    assert problems[2].endswith("entry 3 (c): overrides.subject.class_noun: set the entry's `class_noun` field instead")
    assert problems[3].endswith("entry 4 (d): overrides.training.max_stepz: unknown setting; did you mean max_steps?")
    assert "entry 5 (e): overrides.training.learning_rate: Input should be greater than 0" in problems[4]


def test_ids_must_be_safe_as_folder_and_run_names(tmp_path, shared):
    uri = _yaml(tmp_path, [{"id": name, "photos": "/p", "class_noun": "dog"} for name in ("a/b", "..", "x..y", "ok-1.v2", " ")])
    problems = _problems(uri, shared)
    assert [problem.split(": ", 2)[1] for problem in problems] == ["entry 1 (a/b)", "entry 2 (..)", "entry 3 (x..y)", "entry 5"]
    assert problems[-1].endswith("entry 5: id: missing")


def test_a_file_that_is_not_a_subjects_list_is_one_line(tmp_path, shared):
    path = tmp_path / "subjects.yaml"
    for text, message in (("- {id: a}\n", "expected a mapping with the key `subjects` holding a list of subjects"), ("subjects: []\n", "lists no subjects"),
                          ("subjects: [unclosed\n", "not valid YAML")):
        path.write_text(text)
        (problem,) = _problems(str(path), shared)
        assert problem.startswith(f"{path}: ") and message in problem
    assert _problems(str(tmp_path / "absent.yaml"), shared) == [f"{tmp_path / 'absent.yaml'}: file not found"]


def test_consent_is_an_entry_field_in_yaml_and_columns_in_csv(tmp_path, shared):
    """Who agreed and when travels to the subject's settings, as plain JSON (YAML reads the date as a date)."""
    from dreambooth.catalogue.subjects import entries_to_json

    path = tmp_path / "people.yaml"
    path.write_text("subjects:\n"
                    "  - {id: ana, photos: /p/ana, class_noun: woman, consent: {given_by: Ana Ruiz, given_on: 2026-11-02}}\n")
    (ana,) = read_subjects(str(path), shared)
    assert '"given_on": "2026-11-02"' in entries_to_json([ana])
    assert subject_config(shared, ana).subject.consent.describe() == "given by Ana Ruiz on 2026-11-02"
    csv = tmp_path / "people.csv"
    csv.write_text("id,photos,class_noun,consent_given_by,consent_given_on,consent_record\n"
                   "ana,/p/ana,woman,Ana Ruiz,2026-11-02,forms/ana.pdf\nmug,/p/mug,mug,,,\n")
    ana, mug = read_subjects(str(csv), shared)
    assert subject_config(shared, ana).subject.consent.record == "forms/ana.pdf" and subject_config(shared, mug).subject.consent is None


def test_a_consent_without_a_name_or_with_a_date_to_come_is_named_by_entry(tmp_path, shared):
    uri = _yaml(tmp_path, [
        {"id": "ana", "photos": "/p", "class_noun": "woman", "consent": {"given_by": "", "given_on": "2026-11-02"}},
        {"id": "bo", "photos": "/p", "class_noun": "man", "consent": {"given_by": "Bo", "given_on": "2999-01-01"}},
        {"id": "cy", "photos": "/p", "class_noun": "man", "consent": "yes"},
        {"id": "di", "photos": "/p", "class_noun": "man", "overrides": {"subject": {"consent": {"given_by": "Di"}}}},
    ])
    problems = _problems(uri, shared)
    assert problems[0].startswith(f"{uri}: entry 1 (ana): consent.given_by: ")
    assert problems[1] == f"{uri}: entry 2 (bo): consent.given_on: 2999-01-01 is a date still to come"
    assert problems[2].startswith(f"{uri}: entry 3 (cy): consent: expected a mapping")
    assert problems[3] == f"{uri}: entry 4 (di): overrides.subject.consent: set the entry's `consent` field instead"


def test_photos_under_a_scheme_other_than_gs_are_named_by_entry(tmp_path, shared):
    uri = _yaml(tmp_path, [{"id": "a", "photos": "s3://bucket/a", "class_noun": "dog"},
                           {"id": "b", "photos": "gs://bucket/b", "class_noun": "dog"}])
    (problem,) = _problems(uri, shared)
    assert problem == (f"{uri}: entry 1 (a): photos: 's3://bucket/a': s3:// is not supported; give a local folder or "
                       "gs://bucket/prefix")
