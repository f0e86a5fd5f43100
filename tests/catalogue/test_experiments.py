"""Experiment files: subjects x variants as batch entries, what each variant tests, and the paper's
tables filled from figures (missing never shown as zero)."""

import pytest

from dreambooth.config import load_config
from dreambooth.errors import InputError
from dreambooth.reports.paper_tables import ExperimentRun, as_csv, as_markdown, fill_tables, write_tables
from dreambooth.catalogue.subjects import parse_subjects, subject_config

EXPERIMENT = """
subjects:
  - {id: grey-dog, photos: /data/dog, class_noun: dog, overrides: {training: {max_steps: 30}}}
  - {id: bag, photos: /data/bag, class_noun: backpack}
variants:
  - {name: dreambooth}
  - {name: ti, training: {method: textual_inversion}}
  - {name: no-ppl, training: {prior_loss_weight: 0}}
  - {name: no-class, class_noun: ""}
  - {name: wrong-class, class_noun: {grey-dog: backpack}}
  - {name: photos-2, photos_limit: 2}
"""


def test_each_subject_runs_once_per_variant_with_the_variants_settings_over_its_own():
    shared = load_config("tiny")
    entries = {entry.id: entry for entry in parse_subjects(EXPERIMENT, "experiment.yaml", shared)}
    assert list(entries)[:6] == [f"grey-dog--{name}" for name in ("dreambooth", "ti", "no-ppl", "no-class", "wrong-class", "photos-2")]
    assert len(entries) == 12
    roles = {key: entry.experiment["roles"] for key, entry in entries.items() if key.startswith("grey-dog")}
    assert roles == {"grey-dog--dreambooth": [], "grey-dog--ti": ["textual_inversion"], "grey-dog--no-ppl": ["no_prior"],
                     "grey-dog--no-class": ["no_class"], "grey-dog--wrong-class": ["wrong_class"], "grey-dog--photos-2": ["photos"]}
    assert entries["bag--wrong-class"].experiment["roles"] == []  # the map names only the dog: the bag keeps its class

    def config(key):
        return subject_config(shared, entries[key])

    ti = config("grey-dog--ti")
    assert ti.training.method == "textual_inversion" and ti.training.max_steps == 30  # the subject's own override stays
    wrong = config("grey-dog--wrong-class")
    assert wrong.subject.instance_prompt("sks") == "a sks backpack" and wrong.subject.class_prompt() == "a backpack"
    assert wrong.evaluation.live_subject is True  # the prompt set follows what the subject is: a dog
    no_class = config("grey-dog--no-class")
    assert no_class.subject.instance_prompt("sks") == "a sks" and no_class.subject.class_prompt() == "a dog"
    assert no_class.subject.render("a {identifier} {class_noun} on the beach", "sks") == "a sks on the beach"
    assert config("grey-dog--photos-2").subject.photos_limit == 2
    assert config("bag--dreambooth").evaluation.live_subject is False


def test_every_problem_of_the_variants_is_reported_at_once():
    bad = EXPERIMENT.split("variants:")[0] + """variants:
  - {name: dreambooth, training: {max_steps: 3}}
  - {name: a--b}
  - {name: x, class_noun: {cat: dog}, photos_limit: 0, tracking: {uri: x}}
  - {name: x}
  - {name: y, training: {max_steps: -1}}
"""
    with pytest.raises(InputError) as caught:
        parse_subjects(bad, "bad.yaml", load_config("tiny"))
    assert str(caught.value).splitlines() == [
        "bad.yaml: variant 1 (dreambooth): dreambooth is the baseline and takes no settings; give this variant another name",
        "bad.yaml: variant 2 (a--b): name: 'a--b' is not a usable name (letters, digits, '.', '_' and single '-')",
        "bad.yaml: variant 3 (x): class_noun: 'cat' is no subject of this file",
        "bad.yaml: variant 3 (x): photos_limit: 0 is not a count of photos (1 or more)",
        "bad.yaml: variant 3 (x): tracking: a batch-wide setting; set it in the config, not per subject",
        "bad.yaml: variant 4 (x): name: duplicate of variant 3",
        "bad.yaml: variant 5 (y): training.max_steps: Input should be greater than or equal to 1",
    ]


def _run(subject, variant, roles=(), photos_limit=None, photos=4, **figures):
    return ExperimentRun(subject, variant, tuple(roles), photos_limit, figures, photos)


def test_the_tables_take_each_row_from_the_variant_that_tests_it_and_say_missing_for_the_rest(tmp_path):
    runs = [
        _run("dog", "dreambooth", dino=0.70, clip_i=0.80, clip_t=0.30, pres=0.5, div=0.4, real_images_dino=0.78, real_images_clip_i=0.88),
        _run("bag", "dreambooth", dino=0.60, clip_i=0.76, clip_t=0.28, pres=0.4, div=0.3, real_images_dino=0.70, real_images_clip_i=0.86),
        _run("dog", "ti", ["textual_inversion"], dino=0.50, clip_i=0.70, clip_t=0.25),
        _run("bag", "ti", ["textual_inversion"], photos=None),  # failed: no figures
        _run("dog", "p2", ["photos"], photos_limit=2, photos=2, dino=0.65),
        _run("bag", "p2", ["photos"], photos_limit=2, photos=None),  # failed before its photos were counted
        _run("bag", "p5", ["photos"], photos_limit=5, photos=4, dino=0.61),  # 4 photos only: the 4-photo row
    ]
    method, class_noun, prior, photos = fill_tables(runs)
    rows = {row.label: (variant, cells) for row, variant, cells in method.rows}
    assert rows["DreamBooth (Stable Diffusion)"][1]["dino"].text() == "0.650 ± 0.071 (n=2)"
    assert rows["Real images"][1]["dino"].text() == "0.740 ± 0.057 (n=2)" and rows["Real images"][1]["clip_t"].text() == "n/a"
    assert rows["Textual Inversion (Stable Diffusion)"][1]["dino"].text() == "0.500 (n=1)"  # the failed bag is left out, not zero
    assert [line[1:] for line in class_noun.lines()][1:] == [["missing", "missing", "missing", "0.303", "0.607"],
                                                            ["missing", "missing", "missing", "0.454", "0.728"]]
    assert prior.lines()[1][2] == "missing"
    assert [(line[0], line[1], line[2]) for line in photos.lines()] == [
        ("2 photos", "p2", "0.650 (n=1)"),
        ("4 photos", "dreambooth, p5", "0.655 ± 0.064 (n=2)"),  # the bag's p5 figure, not its baseline's
    ]
    assert photos.lines()[1][3:] == ["0.604", "0.876"]  # the paper's backpack and dog at 4 photos
    markdown = as_markdown([method, class_noun, prior, photos], "Experiment")
    assert "| no class noun | missing | missing | missing | 0.303 | 0.607 |" in markdown
    assert "method,Textual Inversion (Stable Diffusion),ti,dino,0.5000,0.0000,1,0.569" in as_csv([method])
    written = write_tables([method, class_noun, prior, photos], "Experiment", tmp_path)
    assert [path.name for path in written] == ["tables.md", "tables.csv", "table-method.png", "table-class_noun.png",
                                               "table-prior_preservation.png", "table-photos.png"]


def test_the_shipped_dreambench_experiment_is_valid_for_the_sd15_config():
    from conftest import REPO

    source = REPO / "experiments" / "dreambench.yaml"
    entries = parse_subjects(source.read_text(), str(source), load_config("sd15"))
    subjects = {entry.experiment["subject"] for entry in entries}
    variants = {entry.experiment["variant"]: entry.experiment["roles"] for entry in entries}
    assert len(subjects) == 30 and len(entries) == 30 * len(variants)
    assert variants["textual-inversion"] == ["textual_inversion"]  # not also the prior-preservation ablation's row
    assert variants["no-prior-preservation"] == ["no_prior"] and variants["no-class-noun"] == ["no_class"]
    assert all(entry.experiment["roles"] == ["wrong_class"] for entry in entries if entry.experiment["variant"] == "wrong-class-noun")
