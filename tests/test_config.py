import pytest

from dreambooth.config import RunConfig, load_config, require_subject
from dreambooth.config_files import CONFIG_DIR
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


def test_every_problem_of_a_file_comes_at_once_with_its_line_and_the_likely_fix(tmp_path):
    (tmp_path / "team.yaml").write_text("extends: tiny\ntraining:\n  learning_rate: 0.1\n")
    bad = tmp_path / "typo.yaml"
    bad.write_text("extends: team.yaml\n"
                   "training:\n"
                   "  max_stepz: 10\n"
                   "  learning_rate: -1\n"
                   "model:\n"
                   "  max_steps: 3\n"
                   "evaluation:\n"
                   "  gate:\n"
                   "    min_dinoo: 0.2\n")
    with pytest.raises(InputError) as caught:
        load_config(str(bad))
    assert str(caught.value).splitlines() == [
        f"{bad}:3: training.max_stepz: unknown setting; did you mean max_steps?",
        f"{bad}:4: training.learning_rate: Input should be greater than 0",
        f"{bad}:6: model.max_steps: unknown setting here; did you mean training.max_steps?",
        f"{bad}:9: evaluation.gate.min_dinoo: unknown setting; did you mean min_dino?",
    ]
    # A bad value set by the file a config extends is named at its own file and line.
    (tmp_path / "team.yaml").write_text("extends: tiny\ntraining:\n  learning_rate: -2\n")
    (tmp_path / "leaf.yaml").write_text("extends: team.yaml\n")
    with pytest.raises(InputError) as caught:
        load_config(str(tmp_path / "leaf.yaml"))
    assert str(caught.value) == f"{tmp_path / 'team.yaml'}:3: training.learning_rate: Input should be greater than 0"


def test_a_whole_config_check_is_placed_at_the_line_of_the_setting_it_names(tmp_path):
    bad = tmp_path / "warmup.yaml"
    bad.write_text("extends: tiny\ntraining:\n  max_steps: 10\n  lr_warmup_steps: 20\n")
    with pytest.raises(InputError) as caught:
        load_config(str(bad))
    assert str(caught.value) == f"{bad}:4: training.lr_warmup_steps: must be smaller than training.max_steps"


def test_a_config_name_that_is_not_shipped_lists_the_shipped_ones(tmp_path):
    with pytest.raises(InputError) as caught:
        load_config("sd16")
    assert str(caught.value).startswith("--config sd16: no shipped config of that name; did you mean sd15? shipped: flux-lora, ")
    assert "tiny, " in str(caught.value) and "\n" not in str(caught.value)
    child = tmp_path / "team.yaml"
    child.write_text("# ours\nextends: sd16\n")
    with pytest.raises(InputError) as caught:
        load_config(str(child))
    assert str(caught.value).startswith(f"{child}:2: extends sd16: no shipped config of that name; did you mean sd15?")
    child.write_text("extends: base/team-base.yaml\n")
    with pytest.raises(InputError) as caught:
        load_config(str(child))
    assert str(caught.value) == f"{child}:1: extends: {tmp_path / 'base' / 'team-base.yaml'}: config file not found"


def test_a_missing_file_and_broken_yaml_are_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="config file not found"):
        load_config(str(tmp_path / "absent.yaml"))
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  base: tiny://sd\ntraining: [unclosed\n")
    with pytest.raises(InputError) as caught:
        load_config(str(broken))
    assert str(caught.value) == f"{broken}:4: not valid YAML (expected ',' or ']', but got '<stream end>')"
    broken.write_text("model:\n  base: tiny://sd\n   resolution: 64\n")
    with pytest.raises(InputError) as caught:
        load_config(str(broken))
    assert str(caught.value).startswith(f"{broken}:3: not valid YAML (mapping values are not allowed here")


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
    with pytest.raises(InputError, match=rf"elsewhere\.yaml:\d: {setting}: .*s3:// is not supported; give a local folder or gs://"):
        load_config(str(bad))


def test_configs_lists_each_shipped_config_with_what_it_is(tmp_path):
    from conftest import cli

    listed = cli("configs", cwd=tmp_path)
    rows = dict(line.split(None, 1) for line in listed.stdout.split("\n\n")[0].splitlines())
    assert listed.returncode == 0 and set(rows) == {path.stem for path in CONFIG_DIR.glob("*.yaml")}
    assert rows["tiny"] == "Offline, CPU-only smoke configuration" and rows["gke-sd15"].startswith("Stable Diffusion 1.5 on a GKE cluster")


def test_config_show_prints_the_resolved_config_which_loads_back_the_same(tmp_path):
    from conftest import cli

    shown = cli("config", "show", "--config", "gke-sd15", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "extends" not in shown.stdout.split("\n", 1)[1]  # resolved: the cluster settings and sd15's below them
    (tmp_path / "resolved.yaml").write_text(shown.stdout)
    assert load_config(str(tmp_path / "resolved.yaml")) == load_config("gke-sd15")
