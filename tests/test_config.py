import pytest

from dreambooth.config import CONFIG_DIR, RunConfig, load_config, require_subject
from dreambooth.errors import InputError


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_config_loads(path):
    config = load_config(str(path))
    assert config.name == path.stem
    assert RunConfig.from_json(config.to_json()) == config


def test_stable_diffusion_configs_follow_the_paper_defaults():
    config = load_config("sd15")
    assert config.training.learning_rate == 5e-6
    assert config.training.max_steps == 1000
    assert config.training.prior_loss_weight == 1.0
    assert config.priors.num_class_images == 200
    assert config.subject.identifier_token_range == (5000, 10000)


def test_a_bad_value_names_the_file_and_the_setting(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("training:\n  learning_rate: -1\n")
    with pytest.raises(InputError, match=r"bad\.yaml: training\.learning_rate: .*greater than 0"):
        load_config(str(bad))


def test_an_unknown_setting_is_refused(tmp_path):
    bad = tmp_path / "typo.yaml"
    bad.write_text("training:\n  max_step: 10\n")
    with pytest.raises(InputError, match=r"typo\.yaml: training\.max_step: Extra inputs"):
        load_config(str(bad))


def test_a_missing_file_and_broken_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("training: [unclosed\n")
    with pytest.raises(InputError, match="not valid YAML"):
        load_config(str(broken))


def test_sample_prompts_must_contain_the_identifier():
    with pytest.raises(InputError, match=r"samples\.prompts: .*no \{identifier\}"):
        load_config("tiny", {"samples": {"prompts": ["a dog on the beach"]}})


def test_the_class_noun_is_required():
    with pytest.raises(InputError, match="subject.class_noun: required"):
        require_subject(load_config("tiny"))


def test_flat_params_cover_every_setting():
    params = load_config("tiny").flat_params()
    assert params["training.learning_rate"] == "0.0001"
    assert params["model.base"] == "tiny://sd"
    assert "samples.prompts" in params


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"superres": {"training": {"method": "lora"}}}, "superres.training: method: the upscaler is fine-tuned in full"),
        ({"training": {"snr_gamma": 0}}, "training.snr_gamma: Input should be greater than 0"),
        ({"cluster": {"image": "r/i@sha256:" + "a" * 64, "namespace": "team-a"},
          "tracking": {"uri": "http://mlflow.team-b.svc.cluster.local:5000"}}, "tracking.uri: http://mlflow.team-b"),
        ({"tracking": {"notify": [{"url": "http://hooks.example/x", "url_env": "HOOK"}]}}, "tracking.notify.0: give exactly one of url"),
        ({"tracking": {"notify": [{"url": "hooks.example/x"}]}}, "is not an http(s) URL"),
        # On a cluster the URL is a secret: never in the compiled YAML, always from a Kubernetes Secret.
        ({"cluster": {"image": "r/i@sha256:" + "a" * 64}, "tracking": {"notify": [{"url": "https://hooks.slack.com/services/T/B/x"}]}},
         "tracking.notify.0.url: would be written into the compiled pipeline"),
        ({"cluster": {"image": "r/i@sha256:" + "a" * 64}, "tracking": {"notify": [{"url_env": "SLACK_HOOK"}]}},
         "tracking.notify.0.url_env: no cluster.secrets entry sets SLACK_HOOK"),
        ({"training": {"method": "reference"}}, "training.method: reference draws with model.reference"),
        ({"evaluation": {"gate": {"against": "reference"}}}, "evaluation.gate.against: reference scores model.reference"),
        ({"model": {"reference": "tiny://flux2-klein"}, "training": {"method": "reference"}, "evaluation": {"select": {"every": 100}}},
         "evaluation.select: chooses a training step; training.method reference trains nothing"),
    ],
)
def test_inconsistent_settings_are_refused_in_one_line(overrides, message):
    with pytest.raises(InputError) as caught:
        load_config("sd15", overrides)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_run_parameters_set_their_settings_and_a_bad_one_is_refused_in_one_line():
    config = load_config("sd15")
    assert config.run_settings()["max_steps"] == 1000 and config.with_run_settings(config.run_settings()) == config
    changed = config.with_run_settings({"max_steps": 400, "learning_rate": 2e-6, "training_method": "lora", "resolution": 0})
    assert (changed.training.max_steps, changed.training.learning_rate, changed.training.method) == (400, 2e-6, "lora")
    assert changed.model.resolution is None  # 0: the model's own resolution
    with pytest.raises(InputError) as caught:
        config.with_run_settings({"training_method": "dora"})
    assert str(caught.value) == "run parameter training_method: Input should be 'full', 'lora', 'textual_inversion', 'pivotal' or 'reference'"
    with pytest.raises(InputError) as caught:
        config.with_run_settings({"max_steps": 0})
    assert str(caught.value) == "run parameter max_steps: Input should be greater than or equal to 1"


def test_a_binary_config_and_an_empty_identifier_end_in_one_line(tmp_path):
    from conftest import SAMPLE_SUBJECT, cli

    (tmp_path / "photo.yaml").write_bytes(bytes(range(256)) * 4)  # e.g. a photo passed as --config
    binary = cli("compile", "--config", str(tmp_path / "photo.yaml"), cwd=tmp_path)
    assert binary.returncode == 2 and binary.stderr == f"error: {tmp_path / 'photo.yaml'}: not a text file (byte 128 is not UTF-8)\n"
    empty = cli("ingest", "--config", "tiny", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog", "--identifier", "",
                "--output-dir", str(tmp_path / "out"), cwd=tmp_path)
    assert empty.returncode == 2 and empty.stderr.startswith("error: --identifier: empty") and len(empty.stderr.splitlines()) == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setting, yaml_text", [
    ("storage.work_dir", "storage:\n  work_dir: s3://bucket/work\n"),
    ("cluster.pipeline_root", "extends: gke-sd15\ncluster:\n  pipeline_root: s3://bucket/root\n"),
])
def test_a_storage_location_under_another_scheme_is_refused(tmp_path, setting, yaml_text):
    bad = tmp_path / "elsewhere.yaml"
    bad.write_text(yaml_text)
    with pytest.raises(InputError, match=rf"elsewhere\.yaml: {setting}: .*s3:// is not supported; give a local folder or gs://"):
        load_config(str(bad))
