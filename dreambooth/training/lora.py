"""LoRA: low-rank adapters (peft) on the attention projections instead of full weights, saved
alone in diffusers' layout (and, optionally, the kohya layout web UIs load)."""

from __future__ import annotations

from pathlib import Path

import torch

from dreambooth.models import LORA_WEIGHTS, SINGLE_FILE_LORA


def add_lora_adapters(unet, text_encoder, settings) -> None:
    """Freeze the weights and attach trainable low-rank adapters (peft) to the attention projections."""
    from peft import LoraConfig, inject_adapter_in_model

    lora = settings.lora

    def adapter(targets: list[str]) -> LoraConfig:
        return LoraConfig(r=lora.rank, lora_alpha=lora.alpha or lora.rank, lora_dropout=lora.dropout,
                          target_modules=targets, use_dora=lora.use_dora, init_lora_weights="gaussian")

    unet.requires_grad_(False)
    # The adapters' random initialisation follows training.seed, so a run is reproducible.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        unet.add_adapter(adapter(lora.target_modules))
        if settings.train_text_encoder:
            # peft directly: transformers' own add_adapter wants a newer peft than the registry has
            inject_adapter_in_model(adapter(lora.text_encoder_target_modules), text_encoder)


def save_lora_adapter(pipeline, modules: dict, output_dir: Path, single_file: bool) -> None:
    """The adapters alone, in diffusers' layout: `pipe.load_lora_weights(output_dir)` applies them to
    the base; with `single_file`, also in the kohya layout web UIs load."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    peft_layers = {name: get_peft_model_state_dict(module) for name, module in modules.items()}
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(state) for name, state in peft_layers.items()}
    type(pipeline).save_lora_weights(output_dir, **layers, weight_name=LORA_WEIGHTS, safe_serialization=True)
    if single_file:
        prefixed = {f"{name}.{key}": tensor for name, state in peft_layers.items() for key, tensor in state.items()}
        kohya = {key: tensor.contiguous() for key, tensor in convert_state_dict_to_kohya(prefixed).items()}
        save_file(kohya, output_dir / SINGLE_FILE_LORA)
