"""A saved adapter draws what the adapter drew in memory, from either file, at any alpha."""

import numpy as np
import pytest
import torch

from dreambooth.config import TrainingSettings
from dreambooth.models.loading import LORA_WEIGHTS, SINGLE_FILE_LORA, load_pipeline
from dreambooth.training.lora import add_lora_adapters, save_lora_adapter


@pytest.mark.parametrize("family, encoders", [("sd", ["text_encoder"]), ("sdxl", ["text_encoder", "text_encoder_2"])])
def test_an_adapter_at_alpha_twice_its_rank_loads_at_the_scale_it_trained_at(tmp_path, family, encoders):
    settings = TrainingSettings(method="lora", train_text_encoder=True, lora={"rank": 4, "alpha": 8})
    trained = load_pipeline(f"tiny://{family}")
    add_lora_adapters(trained.unet, [getattr(trained, name) for name in encoders], settings)
    with torch.no_grad():  # as if trained: the up-projections start at zero
        for module in [trained.unet, *(getattr(trained, name) for name in encoders)]:
            for name, weight in module.named_parameters():
                if "lora_B" in name:
                    weight.normal_(0, 0.3, generator=torch.Generator().manual_seed(len(name)))
    draw = dict(prompt="a dog", num_inference_steps=2, height=64, width=64, output_type="np")
    expected = trained(**draw, generator=torch.Generator().manual_seed(0)).images[0]
    save_lora_adapter(trained, {"unet": trained.unet, **{name: getattr(trained, name) for name in encoders}}, tmp_path, True)

    for weight_name in (LORA_WEIGHTS, SINGLE_FILE_LORA):
        loaded = load_pipeline(f"tiny://{family}")
        loaded.load_lora_weights(tmp_path, weight_name=weight_name)
        image = loaded(**draw, generator=torch.Generator().manual_seed(0)).images[0]
        assert np.abs(image - expected).max() < 1e-4, weight_name



def test_a_lora_on_an_int8_base_trains_and_saves_the_adapter_the_full_precision_base_loads(subject_dir, tmp_path, make_config, monkeypatch):
    """model.quantization int8 (torchao, on CPU): the frozen UNet's linear layers hold int8 weights while
    the adapter trains; what is saved has the unquantized run's tensors and loads on the plain base."""
    from diffusers import DiffusionPipeline
    from safetensors.torch import load_file

    from dreambooth.errors import InputError
    from dreambooth.fine_tune import fine_tune
    from dreambooth.ingest.photos import ingest_subject
    from dreambooth.models.loading import resolve_model_source
    from dreambooth.training import driver

    weight_types, saved = {}, {}
    original = driver.run_fine_tune

    def recording(job, *args, **kwargs):
        result = original(job, *args, **kwargs)
        frozen = [module.weight for module in job.recipe.pipeline.unet.modules()
                  if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad]
        weight_types[getattr(job.recipe.pipeline.unet, "is_quantized", False)] = {type(weight).__name__ for weight in frozen}
        return result

    monkeypatch.setattr(driver, "run_fine_tune", recording)
    for mode in ("none", "int8"):
        config = make_config(model={"quantization": mode}, priors={"enabled": False},
                             training={"method": "lora", "max_steps": 3, "learning_rate": 1e-3})
        ingested = ingest_subject(subject_dir, tmp_path / f"subject-{mode}", config)
        assert fine_tune(tmp_path / f"subject-{mode}", None, ingested.identifier.identifier, config, tmp_path / mode).steps == 3
        saved[mode] = load_file(tmp_path / mode / LORA_WEIGHTS)
    assert weight_types == {False: {"Parameter"}, True: {"Int8Tensor"}}  # every frozen projection int8 while it trained
    assert {key: (value.shape, value.dtype) for key, value in saved["int8"].items()} == \
        {key: (value.shape, value.dtype) for key, value in saved["none"].items()}
    assert not all(torch.equal(saved["int8"][key], saved["none"][key]) for key in saved["none"])  # it trained on other weights
    base = DiffusionPipeline.from_pretrained(resolve_model_source("tiny://sd"))
    base.load_lora_weights(tmp_path / "int8", weight_name=LORA_WEIGHTS)  # the plain base takes it
    assert load_pipeline(str(tmp_path / "int8")).unet.dtype == torch.float32

    with pytest.raises(InputError, match="model.quantize_text_encoders: quantizes them as model.quantization says, which is none"):
        make_config(model={"quantize_text_encoders": True})
    with pytest.raises(InputError, match="model.quantization: nf4 needs a CUDA GPU and this run has none"):
        load_pipeline("tiny://sd", quantization="nf4", device=torch.device("cpu"))
    with pytest.raises(InputError, match="model.quantization: int8 loads the denoiser frozen"):
        make_config(model={"quantization": "int8"}, training={"method": "full"})


def test_a_flux2_klein_lora_trains_with_its_transformer_and_language_model_int8(subject_dir, tmp_path, make_config, monkeypatch):
    """model.quantize_text_encoders: Qwen3's projections hold int8 weights while it encodes the prompts, and every
    frozen projection of the transformer holds int8 weights while its adapter trains; the adapter has the
    unquantized run's tensors (shape and type) and trained on other weights (its values differ)."""
    from safetensors.torch import load_file

    from dreambooth.fine_tune import fine_tune
    from dreambooth.ingest.photos import ingest_subject
    from dreambooth.training import driver

    weight_types, saved, mode = {}, {}, {}
    original = driver.run_fine_tune

    def recording(job, *args, **kwargs):
        result = original(job, *args, **kwargs)  # after training: what the transformer held while it trained
        pipeline = job.recipe.pipeline
        frozen = {type(module.weight).__name__ for module in pipeline.transformer.modules()
                  if isinstance(module, torch.nn.Linear) and not module.weight.requires_grad}
        weight_types[mode["now"]] = (type(pipeline.text_encoder.model.layers[0].self_attn.q_proj.weight).__name__, frozen)
        return result

    monkeypatch.setattr(driver, "run_fine_tune", recording)
    for label, model in (("none", {}), ("int8", {"quantization": "int8", "quantize_text_encoders": True})):
        mode["now"] = label
        config = make_config(model={"base": "tiny://flux2-klein", "resolution": 64, **model}, priors={"enabled": False},
                             training={"method": "lora", "max_steps": 3, "learning_rate": 1e-3})
        ingested = ingest_subject(subject_dir, tmp_path / f"subject-{label}", config)
        assert fine_tune(tmp_path / f"subject-{label}", None, ingested.identifier.identifier, config, tmp_path / label).steps == 3
        saved[label] = load_file(tmp_path / label / LORA_WEIGHTS)
    assert weight_types == {"none": ("Parameter", {"Parameter"}), "int8": ("Int8Tensor", {"Int8Tensor"})}
    assert {key: (value.shape, value.dtype) for key, value in saved["int8"].items()} == \
        {key: (value.shape, value.dtype) for key, value in saved["none"].items()}
    assert not all(torch.equal(saved["int8"][key], saved["none"][key]) for key in saved["none"])  # it trained on other weights
