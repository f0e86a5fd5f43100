"""Fine-tuning writes a loadable diffusers pipeline, trains what it should and resumes after a kill."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from safetensors.torch import load_file

from dreambooth.errors import InputError, TrainingDiverged
from dreambooth.fine_tune import fine_tune
from dreambooth.models.loading import METADATA_FILE
from dreambooth.ingest.photos import ingest_subject
from dreambooth.priors import generate_class_priors


@pytest.fixture
def prepared(make_config, subject_dir, tmp_path):
    """Ingested subject images and class images, as the stages before fine-tuning leave them."""
    def prepare(**sections):
        priors = {"num_class_images": 4, "sampler": {"num_inference_steps": 2, "batch_size": 4}}
        config = make_config(**{**sections, "priors": {**priors, **sections.get("priors", {})}})
        ingested = ingest_subject(subject_dir, tmp_path / "subject", config)
        generate_class_priors(config, tmp_path / "classes")
        return config, ingested.identifier.identifier

    return prepare


def _weights(folder, component):
    return load_file(folder / component / "diffusion_pytorch_model.safetensors") if component in ("unet", "vae") else load_file(
        folder / component / "model.safetensors"
    )


def _changed(before, after):
    return any(not torch.equal(before[key], after[key]) for key in before)


def test_the_fine_tuned_model_loads_and_generates(prepared, tmp_path, tiny_model_dir):
    config, identifier = prepared(training={"max_steps": 4, "checkpoint_every": 2})
    result = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "model")

    assert result.steps == 4 and result.resumed_from_step == 0 and result.steps_per_second > 0
    assert set(result.final_loss) == {"loss", "instance_loss", "prior_loss"}
    pipeline = DiffusionPipeline.from_pretrained(tmp_path / "model")
    image = pipeline(f"a {identifier} dog", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (64, 64, 3)
    assert json.loads((tmp_path / "model" / METADATA_FILE).read_text())["identifier"] == identifier
    assert not list((tmp_path / "work" / "checkpoints").iterdir())  # saved model: checkpoints are no longer needed

    model = tmp_path / "model"
    assert _changed(_weights(tiny_model_dir, "unet"), _weights(model, "unet"))
    assert not _changed(_weights(tiny_model_dir, "vae"), _weights(model, "vae"))
    assert not _changed(_weights(tiny_model_dir, "text_encoder"), _weights(model, "text_encoder"))


def test_text_encoder_training_is_optional(prepared, tmp_path, tiny_model_dir):
    config, identifier = prepared(training={"max_steps": 2, "train_text_encoder": True})
    fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "model")
    assert _changed(_weights(tiny_model_dir, "text_encoder"), _weights(tmp_path / "model", "text_encoder"))


def test_without_prior_preservation_only_subject_images_are_needed(prepared, tmp_path):
    config, identifier = prepared(training={"max_steps": 2}, priors={"enabled": False})
    result = fine_tune(tmp_path / "subject", None, identifier, config, tmp_path / "model")
    assert "prior_loss" not in result.final_loss


def test_memory_saving_options_recompute_activations_and_compute_in_bf16(prepared, tmp_path, monkeypatch):
    """training.gradient_checkpointing: the UNet's blocks run forward again in the backward pass (twice as many
    forward calls); training.mixed_precision bf16: its layers compute in bf16 under autocast. Both still train."""
    from dreambooth.training import driver

    seen, original = {}, driver.run_fine_tune

    def recording(job, *args, **kwargs):
        conv, calls, dtypes = job.recipe.pipeline.unet.down_blocks[0].resnets[0].conv1, [], set()
        forward = conv.forward

        def counted(*inputs):  # the method, not a hook: torch's checkpoint recomputes without firing hooks
            output = forward(*inputs)
            calls.append(1)
            dtypes.add(output.dtype)
            return output

        monkeypatch.setattr(conv, "forward", counted)
        result = original(job, *args, **kwargs)
        seen[job.recipe.settings.gradient_checkpointing, job.recipe.settings.mixed_precision] = (len(calls), dtypes)
        return result

    monkeypatch.setattr(driver, "run_fine_tune", recording)
    for label, memory_settings in (("plain", {}), ("checkpointing", {"gradient_checkpointing": True}), ("bf16", {"mixed_precision": "bf16"})):
        config, identifier = prepared(training={"max_steps": 2, **memory_settings})
        result = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / f"model-{label}")
        assert all(torch.isfinite(torch.tensor(value)) for value in result.final_loss.values()), label
    plain_calls, plain_types = seen[False, "no"]
    assert plain_calls > 0 and plain_types == {torch.float32}
    assert seen[True, "no"] == (2 * plain_calls, {torch.float32})  # each checkpointed block recomputed in backward
    assert seen[False, "bf16"] == (plain_calls, {torch.bfloat16})


def test_8bit_adam_without_cuda_is_a_clear_error(prepared, tmp_path):
    config, identifier = prepared(training={"max_steps": 2, "optimizer": "adamw_8bit"})
    with pytest.raises(InputError, match="training.optimizer: adamw_8bit needs CUDA and the bitsandbytes package"):
        fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "model")


KILLABLE_TRAINING = """
import sys
from pathlib import Path
from dreambooth.config import RunConfig
from dreambooth.fine_tune import fine_tune
config = RunConfig.from_json(Path(sys.argv[1]).read_text())
fine_tune(Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4], config, Path(sys.argv[5]))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_killed_training_resumes_from_the_last_checkpoint(prepared, tmp_path, method):
    from dreambooth.models.loading import LORA_WEIGHTS

    config, identifier = prepared(training={"max_steps": 30, "checkpoint_every": 5, "checkpoints_total_limit": 2, "method": method})
    saved = "model_index.json" if method == "full" else LORA_WEIGHTS
    (tmp_path / "config.json").write_text(config.to_json())
    args = [str(tmp_path / p) for p in ("config.json", "subject", "classes")] + [identifier, str(tmp_path / "model")]
    process = subprocess.Popen([sys.executable, "-c", KILLABLE_TRAINING, *args], stderr=subprocess.DEVNULL)
    checkpoints = tmp_path / "work" / "checkpoints"
    deadline = time.time() + 180
    while not list(checkpoints.glob("*/step-000010/checkpoint-complete")):
        assert process.poll() is None, "training ended before its second checkpoint"
        assert time.time() < deadline, "no checkpoint within 180 s"
        time.sleep(0.2)
    # A second run of the same subject and settings, while the first trains: refused, not interleaved.
    with pytest.raises(InputError, match="another run is training this subject with the same settings"):
        fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "second")
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    assert not (tmp_path / "model" / saved).exists()

    result = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "model")
    assert result.resumed_from_step >= 10
    assert (tmp_path / "model" / saved).is_file()
    if method == "lora":  # the adapter and its optimizer state came back exactly: same weights as never killed
        torch.manual_seed(12345)  # this process's global RNG differs from the killed one's: the init must not use it
        fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "uninterrupted")
        resumed, uninterrupted = load_file(tmp_path / "model" / saved), load_file(tmp_path / "uninterrupted" / saved)
        assert resumed.keys() == uninterrupted.keys()
        for key in resumed:
            torch.testing.assert_close(resumed[key], uninterrupted[key])


def test_min_snr_and_noise_offset_change_the_training_loss(prepared, tmp_path):
    plain_config, identifier = prepared(training={"max_steps": 1, "checkpoint_every": 1})
    plain = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, plain_config, tmp_path / "plain")
    # gamma far below the SNR of most timesteps, so the first step is weighted whichever it draws
    for change in ({"snr_gamma": 0.05}, {"noise_offset": 0.1}):
        config = plain_config.model_copy(update={"training": plain_config.training.model_copy(update=change)})
        result = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / f"model-{next(iter(change))}")
        assert result.final_loss["loss"] != pytest.approx(plain.final_loss["loss"], rel=1e-3), change


@pytest.mark.parametrize("train_text_encoder", [False, True])
def test_a_lora_fine_tune_saves_an_adapter_that_loads_on_its_base(prepared, tmp_path, tiny_model_dir, train_text_encoder):
    from dreambooth.models.loading import LORA_WEIGHTS, load_pipeline

    config, identifier = prepared(training={"method": "lora", "max_steps": 6, "checkpoint_every": 3, "learning_rate": 1e-2,
                                            "train_text_encoder": train_text_encoder})
    result = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "adapter")
    adapter = tmp_path / "adapter"
    assert sorted(p.name for p in adapter.iterdir()) == sorted([LORA_WEIGHTS, METADATA_FILE])
    weights = load_file(adapter / LORA_WEIGHTS)
    assert any(key.startswith("unet.") for key in weights)
    assert any(key.startswith("text_encoder.") for key in weights) == train_text_encoder
    full_size = sum(p.stat().st_size for p in tiny_model_dir.rglob("*.safetensors"))
    assert (adapter / LORA_WEIGHTS).stat().st_size < 0.05 * full_size
    assert result.steps == 6

    prompt = f"a {identifier} dog"
    base = DiffusionPipeline.from_pretrained(tiny_model_dir)
    plain = base(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    base.load_lora_weights(adapter)  # diffusers' own loader reads it
    adapted = base(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    ours = load_pipeline(str(adapter))(prompt, num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).images[0]
    assert abs(adapted - plain).max() > 1e-3  # the adapter changes the image
    assert abs(ours - adapted).max() < 1e-4  # the one loader applies it the same way


def test_validation_images_show_the_model_as_it_trains(prepared, tmp_path):
    from PIL import Image

    config, identifier = prepared(training={"max_steps": 4, "checkpoint_every": 4, "learning_rate": 1e-2, "validation_every": 2,
                                            "validation_images": 2, "validation_inference_steps": 2, "method": "lora"})
    result = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "adapter")
    assert [step for step, _ in result.validation_images] == [2, 2, 4, 4]
    pixels = [np.asarray(Image.open(path), dtype=np.float32) for _, path in result.validation_images]
    assert pixels[0].shape == (64, 64, 3)
    assert np.abs(pixels[0] - pixels[2]).max() > 1  # same prompt and seed, two steps apart: the model moved
    assert np.abs(pixels[0] - pixels[1]).max() > 1  # two seeds


def test_validation_images_in_mixed_precision_leave_the_trained_weights_float32_and_training_goes_on(prepared, tmp_path, monkeypatch):
    """diffusers' LoRA scripts crash after a validation step under fp16 ("Attempting to unscale FP16
    gradients"): the validation pipeline cast the adapters. Here they stay float32 and training goes on."""
    import inspect

    from dreambooth.training import loop

    config, identifier = prepared(training={"method": "lora", "mixed_precision": "bf16", "max_steps": 4, "checkpoint_every": 4,
                                            "learning_rate": 1e-2, "validation_every": 2, "validation_images": 1,
                                            "validation_inference_steps": 2})
    trained_dtypes, real_train = {}, loop.train

    def watching_train(*args, **kwargs):
        bound = inspect.signature(real_train).bind(*args, **kwargs)
        modules, on_step = bound.arguments["modules"], bound.arguments["on_step"]

        def after_validation(step):
            on_step(step)  # draws the validation images at steps 2 and 4
            trained_dtypes[step] = {p.dtype for module in modules.values() for p in module.parameters() if p.requires_grad}

        bound.arguments["on_step"] = after_validation
        return real_train(*bound.args, **bound.kwargs)

    monkeypatch.setattr("dreambooth.training.driver.train", watching_train)
    result = fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "adapter")
    assert [step for step, _ in result.validation_images] == [2, 4]
    assert trained_dtypes == {step: {torch.float32} for step in (1, 2, 3, 4)}
    assert result.steps == 4 and all(np.isfinite(value) for value in result.final_loss.values())


@pytest.mark.parametrize("family, prefixes", [("sd", {"unet", "te1"}), ("sdxl", {"unet", "te1", "te2"})])
def test_the_single_file_export_is_the_same_adapter_in_the_web_ui_layout(prepared, tmp_path, family, prefixes):
    from dreambooth.models.loading import LORA_WEIGHTS, SINGLE_FILE_LORA, resolve_model_source

    # alpha 8 at rank 4: a scale of 2, which the kohya file must carry in its own alpha entries
    lora = {"export_single_file": True, "rank": 4, "alpha": 8}
    config, identifier = prepared(model={"base": f"tiny://{family}"}, training={
        "method": "lora", "max_steps": 3, "checkpoint_every": 3, "learning_rate": 1e-2, "train_text_encoder": True, "lora": lora})
    fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "adapter")
    keys = load_file(tmp_path / "adapter" / SINGLE_FILE_LORA).keys()
    assert {key.split("_")[1] for key in keys} == prefixes  # lora_unet_*, lora_te1_*, lora_te2_*: the kohya names

    def draw(weight_name):
        pipeline = DiffusionPipeline.from_pretrained(resolve_model_source(f"tiny://{family}"))
        pipeline.load_lora_weights(tmp_path / "adapter", weight_name=weight_name)
        return pipeline(f"a {identifier} dog", num_inference_steps=2, height=64, width=64, output_type="np",
                        generator=torch.Generator().manual_seed(0)).images[0]

    assert np.abs(draw(SINGLE_FILE_LORA) - draw(LORA_WEIGHTS)).max() < 1e-4


def test_a_separate_vae_replaces_the_models_own_and_travels_with_a_lora_result(prepared, tmp_path):
    from diffusers import AutoencoderKL

    from dreambooth.models.loading import load_pipeline, resolve_model_source

    torch.manual_seed(5)
    other = AutoencoderKL.from_config(AutoencoderKL.load_config(resolve_model_source("tiny://sd"), subfolder="vae"))
    other.save_pretrained(tmp_path / "vae")
    expected = load_file(tmp_path / "vae" / "diffusion_pytorch_model.safetensors")

    def uses_other_vae(pipeline) -> bool:
        return all(torch.equal(pipeline.vae.state_dict()[key], value) for key, value in expected.items())

    assert not uses_other_vae(load_pipeline("tiny://sd"))
    config, identifier = prepared(model={"vae": str(tmp_path / "vae")},
                                  training={"method": "lora", "max_steps": 2, "checkpoint_every": 2})
    fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "adapter")
    assert uses_other_vae(load_pipeline(str(tmp_path / "adapter")))  # the adapter loads with the VAE it trained with
    with pytest.raises(InputError, match="model.vae: 'nowhere/vae-folder/x' is not a folder here"):
        load_pipeline("tiny://sd", vae="nowhere/vae-folder/x")


@pytest.mark.parametrize("family, encoders", [("sdxl", {"unet", "text_encoder", "text_encoder_2"}), ("flux", {"transformer", "text_encoder"})])
def test_sdxl_and_flux_adapters_cover_their_text_encoders_and_load_on_the_base(prepared, tmp_path, family, encoders):
    from dreambooth.models.loading import LORA_WEIGHTS, load_pipeline

    sampler = {"scheduler": "FlowMatchEulerDiscreteScheduler"} if family == "flux" else {}
    # 64 px as the shipped tiny configs train (the tiny Flux's native size is 256 px: 16 times the cost).
    config, identifier = prepared(model={"base": f"tiny://{family}", "resolution": 64}, priors={"sampler": sampler},
                                  training={"method": "lora", "max_steps": 2, "checkpoint_every": 2, "learning_rate": 1e-2,
                                            "train_text_encoder": True})
    fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "adapter")
    assert {key.split(".")[0] for key in load_file(tmp_path / "adapter" / LORA_WEIGHTS)} == encoders
    prompt = dict(prompt=f"a {identifier} dog", num_inference_steps=2, height=64, width=64, output_type="np")
    plain = load_pipeline(f"tiny://{family}")(**prompt, generator=torch.Generator().manual_seed(0)).images[0]
    adapted = load_pipeline(str(tmp_path / "adapter"))(**prompt, generator=torch.Generator().manual_seed(0)).images[0]
    assert abs(adapted - plain).max() > 1e-3


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_diverging_fine_tune_stops_at_its_step_and_saves_nothing(prepared, tmp_path, method):
    config, identifier = prepared(training={"method": method, "learning_rate": 1e30, "max_steps": 6, "checkpoint_every": 1})
    with pytest.raises(TrainingDiverged, match=r"training stopped at step [2-6]: loss is (nan|inf).*last checkpoint: .*step-00000[1-5]"):
        fine_tune(tmp_path / "subject", tmp_path / "classes", identifier, config, tmp_path / "model")
    assert not (tmp_path / "model").exists()


def test_a_changed_setting_or_photo_never_resumes_another_trainings_checkpoint(prepared, tmp_path):
    config, identifier = prepared(training={"max_steps": 4, "checkpoint_every": 2, "keep_checkpoints": True})
    classes = tmp_path / "classes"
    assert fine_tune(tmp_path / "subject", classes, identifier, config, tmp_path / "first").resumed_from_step == 0

    changed = config.model_copy(update={"training": config.training.model_copy(update={"learning_rate": 2e-4})})
    assert fine_tune(tmp_path / "subject", classes, identifier, changed, tmp_path / "changed").resumed_from_step == 0
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for photo in sorted((tmp_path / "subject").glob("*.png"))[:3]:
        shutil.copyfile(photo, fewer / photo.name)
    assert fine_tune(fewer, classes, identifier, config, tmp_path / "fewer-model").resumed_from_step == 0
    # The same photos and settings do find the first training's step-2 checkpoint.
    assert fine_tune(tmp_path / "subject", classes, identifier, config, tmp_path / "same").resumed_from_step == 2
