"""The one model loader: hub id, local diffusers folder or `tiny://` reference, same code path."""

from __future__ import annotations

from typing import Optional

import torch

from dreambooth.errors import InputError
from dreambooth.tiny_models import TINY_SCHEME, resolve_tiny_model


def resolve_model_source(reference: str) -> str:
    """What `from_pretrained` should read: tiny references become their built folder."""
    if reference.startswith(TINY_SCHEME):
        return str(resolve_tiny_model(reference))
    return reference


def best_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _load_error(reference: str, what: str, error: Exception) -> InputError:
    reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return InputError(f"model.base: cannot load the {what} of {reference!r} ({reason})")


def load_tokenizer(reference: str, revision: Optional[str] = None):
    from transformers import CLIPTokenizer

    try:
        return CLIPTokenizer.from_pretrained(resolve_model_source(reference), subfolder="tokenizer", revision=revision)
    except (OSError, ValueError) as error:
        raise _load_error(reference, "tokenizer", error) from None


def load_pipeline(
    reference: str,
    revision: Optional[str] = None,
    torch_dtype: torch.dtype = torch.float32,
    device: Optional[torch.device] = None,
):
    """A text-to-image DiffusionPipeline without a safety checker (DreamBooth trains on user photos)."""
    from diffusers import DiffusionPipeline

    try:
        pipeline = DiffusionPipeline.from_pretrained(
            resolve_model_source(reference),
            revision=revision,
            dtype=torch_dtype,
            safety_checker=None,
            requires_safety_checker=False,
        )
    except (OSError, ValueError, EnvironmentError) as error:
        raise _load_error(reference, "pipeline", error) from None
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device or best_device())


def use_sampler(pipeline, scheduler_name: str) -> None:
    """Swap the pipeline's sampler, keeping the model's noise schedule (e.g. a 25-step DPM-Solver)."""
    import diffusers

    scheduler_class = getattr(diffusers, scheduler_name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config"):
        raise InputError(f"sampler.scheduler: {scheduler_name!r} is not a diffusers scheduler class")
    pipeline.scheduler = scheduler_class.from_config(pipeline.scheduler.config)


def inference_dtype(precision: str = "auto") -> torch.dtype:
    """The dtype a frozen model samples in; weights being trained always stay float32."""
    if precision != "auto":
        return getattr(torch, precision)
    if torch.cuda.is_available():
        return torch.float16
    cpu_has_bf16 = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
    return torch.bfloat16 if cpu_has_bf16 else torch.float32


def native_resolution(pipeline) -> int:
    return pipeline.unet.config.sample_size * pipeline.vae_scale_factor
