"""The quality gate against the subject's champion and against the zero-shot reference baseline: the
rules on constructed figures, and the evaluate stage with a real MLflow registry deciding by the
champion's own run."""

import json
import shutil

from dreambooth.config import GateSettings
from dreambooth.evaluation.evaluate import champion_decision, baseline_decision
from dreambooth.tracking.registry import Champion
from dreambooth.models.loading import METADATA_FILE

PROTOCOL = '{"prompts": "dreambench"}'
CHAMPION = Champion("3", {"dino": 0.70, "clip_t": 0.30, "pres": 0.50}, PROTOCOL)


def test_a_candidate_passes_only_when_no_worse_than_the_champion_by_the_margins():
    better = champion_decision({"dino": 0.72, "clip_t": 0.31, "pres": 0.45}, PROTOCOL, CHAMPION, GateSettings(against="champion"))
    assert better.passed and better.reasons == ["no worse than champion v3 (DINO 0.720 vs 0.700, CLIP-T 0.310 vs 0.300, PRES 0.450 vs 0.500)"]
    slightly_worse = {"dino": 0.69, "clip_t": 0.295, "pres": 0.52}
    strict = champion_decision(slightly_worse, PROTOCOL, CHAMPION, GateSettings(against="champion"))
    assert not strict.passed
    assert strict.reasons == ["DINO 0.690 < champion v3's 0.700 - 0", "CLIP-T 0.295 < champion v3's 0.300 - 0",
                              "PRES 0.520 > champion v3's 0.500 + 0"]
    margins = GateSettings(against="champion", dino_margin=0.02, clip_t_margin=0.01, pres_margin=0.05)
    assert champion_decision(slightly_worse, PROTOCOL, CHAMPION, margins).passed


def test_a_fine_tuned_model_passes_only_when_it_beats_the_reference_baseline_on_dino_by_the_margin():
    baseline = {"dino": 0.60, "clip_i": 0.75, "clip_t": 0.31}
    model = {"dino": 0.64, "clip_i": 0.78, "clip_t": 0.29}
    assert baseline_decision(model, baseline, GateSettings(against="reference")).passed
    assert baseline_decision(model, baseline, GateSettings(against="reference", reference_margin=0.04)).passed
    short = baseline_decision(model, baseline, GateSettings(against="reference", reference_margin=0.05))
    assert not short.passed
    assert short.reasons == ["DINO 0.640 < the reference baseline's 0.600 + 0.05 (CLIP-I 0.780 vs 0.750, CLIP-T 0.290 vs 0.310): "
                             "fine-tuning did not beat drawing from the photos"]


def test_no_champion_lets_the_thresholds_decide_and_another_protocol_is_not_compared():
    figures = {"dino": 0.1, "clip_t": 0.1, "pres": 0.9}
    assert champion_decision(figures, PROTOCOL, None, GateSettings()).reasons == ["no champion yet: the thresholds alone decide"]
    other = champion_decision({"dino": 0.9, "clip_t": 0.9, "pres": 0.1}, '{"prompts": "mine"}', CHAMPION, GateSettings())
    assert not other.passed and other.reasons[0].startswith("champion v3 was scored on another protocol")


def test_the_evaluate_stage_registers_against_the_champion_the_registry_names(tiny_model_dir, subject_dir, make_config, tmp_path):
    from mlflow.tracking import MlflowClient

    from dreambooth.tasks.subject import evaluate_task
    from dreambooth.tracking import TAG_GATE, TAG_GATE_REASON, open_batch_run, open_subject_run

    model = tmp_path / "model"  # the tiny base in a fine-tuned folder's layout
    shutil.copytree(tiny_model_dir, model)
    (model / METADATA_FILE).write_text(json.dumps({"identifier": "fqs", "class_noun": "dog", "base_model": str(tiny_model_dir)}))
    tracking = f"sqlite:///{tmp_path / 'mlflow.db'}"
    config = make_config(evaluation={"gate": {"against": "champion"}, "max_prompts_per_category": 1, "pres_images": 1})
    client = MlflowClient(tracking)

    def evaluate(name: str) -> dict:
        subject_run = open_subject_run(tracking, open_batch_run(tracking, config, name, name), config, name)
        evaluate_task(config.to_json(), tracking, subject_run, str(model), str(subject_dir), str(tmp_path / name))
        return client.get_run(subject_run).data

    first = evaluate("first")
    assert first.tags[TAG_GATE] == "passed" and first.tags[TAG_GATE_REASON] == "no champion yet: the thresholds alone decide"
    client.set_registered_model_alias("dreambooth-dog", "champion", "1")
    # The champion's figures are its subject run's: with a DINO no model of this run reaches, the same model is worse.
    champion_run = client.get_model_version("dreambooth-dog", "1").tags["subject_run"]
    client.log_metric(champion_run, "eval/dino", 0.999)
    second = evaluate("second")
    assert second.tags[TAG_GATE] == "rejected"
    assert second.tags[TAG_GATE_REASON] == f"DINO {second.metrics['eval/dino']:.3f} < champion v1's 0.999 - 0"
    assert [str(version.version) for version in client.search_model_versions("name = 'dreambooth-dog'")] == ["1"]  # not registered
