"""LoRA: low-rank adapters (peft) on the attention projections instead of full weights, saved
alone in diffusers' layout (and, optionally, the kohya layout web UIs load)."""

from __future__ import annotations

from pathlib import Path

import torch

from dreambooth.models.loading import LORA_WEIGHTS, SINGLE_FILE_LORA


HALF_PRECISION = {"fp16": torch.float16, "bf16": torch.bfloat16}


def freeze(module, settings) -> None:
    """No gradients for the module's weights; under mixed precision they are stored in its half
    type, as they only feed autocast (half the memory); quantized weights (model.quantization) stay as loaded."""
    module.requires_grad_(False)
    if (frozen_dtype := HALF_PRECISION.get(settings.mixed_precision)) is not None and not getattr(module, "is_quantized", False):
        module.to(frozen_dtype)


def add_lora_adapters(denoiser, text_encoders: list, settings) -> None:
    """Freeze the weights and attach trainable low-rank adapters (peft) to the attention projections
    of the denoiser (UNet or transformer) and of `text_encoders`.

    With mixed precision the frozen weights are stored in its half type (`freeze`), which is what
    fits SDXL or Flux on one GPU; the adapters stay float32.
    """
    from diffusers.training_utils import cast_training_params
    from peft import LoraConfig, inject_adapter_in_model

    lora = settings.lora

    def adapter(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                          target_modules=targets, use_dora=lora.use_dora, init_lora_weights="gaussian")

    for module in (denoiser, *text_encoders):
        freeze(module, settings)
    # The adapters' random initialisation follows training.seed, so a run is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        denoiser.add_adapter(adapter(lora.target_modules))
        for text_encoder in text_encoders:
            # peft directly: transformers' own add_adapter wants a newer peft than the registry has
            inject_adapter_in_model(adapter(lora.text_encoder_target_modules), text_encoder)
    cast_training_params([denoiser, *text_encoders], dtype=torch.float32)


def save_lora_adapter(pipeline, modules: dict, output_dir: Path, single_file: bool) -> None:
    """The adapters alone, in diffusers' layout: `pipe.load_lora_weights(output_dir)` applies them to
    the base; with `single_file`, also in the kohya layout web UIs load.

    Each adapter's LoRA config travels with it (diffusers' adapter metadata, the kohya `.alpha`
    entries): without it a loader assumes alpha = rank, and an adapter trained at another alpha
    would apply at the wrong scale.
    """
    from diffusers.training_utils import _collate_lora_metadata
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_layers = {name: get_peft_model_state_dict(module) for name, module in modules.items()}
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(state) for name, state in peft_layers.items()}
    type(pipeline).save_lora_weights(output_dir, **layers, **_collate_lora_metadata(modules), weight_name=LORA_WEIGHTS,
                                     safe_serialization=True)
    if single_file:
        prefixed = {f"{name}.{key}": tensor for name, state in peft_layers.items() for key, tensor in state.items()}
        kohya = {key: tensor.contiguous() for key, tensor in convert_state_dict_to_kohya(prefixed).items()}
        alpha = next(iter(modules.values())).peft_config["default"].lora_alpha  # one LoRA config for every module
        kohya.update({key: torch.tensor(alpha) for key in kohya if key.endswith(".alpha")})
        save_file(kohya, output_dir / SINGLE_FILE_LORA)
