"""GPU benchmark: training steps/s and peak GPU memory of full-size denoisers, full fine-tune vs LoRA.

    python bench/denoiser_bench.py [--families sd15,sdxl,flux] [--methods full,lora] [--steps 30]
                                   [--mixed-precision bf16] [--gradient-checkpointing] [--optimizer auto]
    python bench/denoiser_bench.py --tiny   # the same code path on tiny denoisers, on any CPU

Each denoiser is built from its published configuration with random weights (a step costs the
same as with real ones, and no weights are needed): SD 1.5's UNet (860M parameters, 512 px),
SDXL's UNet (2.6B, 1024 px) and FLUX.1-dev's transformer (12B, 512 px; LoRA only, as the
project trains it). Each (family, method) runs in a fresh process through this project's own
training loop and recipe loss (batch 1 subject + 1 class example, text conditioning random
but shaped as the family's encoders give it), so the figures are what `pipeline.py` pays per
step. Peak memory is torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

SD15_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8,
)
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
FLUX_DEV_TRANSFORMER = dict(guidance_embeds=True)  # the class defaults are FLUX.1's shape
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)

# family: (recipe, latent channels, latent size, text tokens, text width, pooled width)
FULL_SIZE = {"sd15": ("sd", 4, 64, 77, 768, None), "sdxl": ("sdxl", 4, 128, 77, 2048, 1280), "flux": ("flux", 16, 64, 512, 4096, 768)}
TINY = {"sd15": ("sd", 4, 32, 77, 32, None), "sdxl": ("sdxl", 4, 32, 77, 64, 32), "flux": ("flux", 4, 32, 77, 32, 32)}


def _denoiser(family: str, tiny: bool):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    if tiny:
        from dreambooth.models import load_pipeline

        pipeline = load_pipeline({"sd15": "tiny://sd", "sdxl": "tiny://sdxl", "flux": "tiny://flux"}[family])
        return pipeline.transformer if family == "flux" else pipeline.unet
    if family == "flux":
        return FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    return UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))


def _measure(family: str, method: str, args) -> dict:
    """One (family, method) in this process: build, train args.steps steps, report."""
    import torch
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from dreambooth.config import TrainingSettings
    from dreambooth.training.lora import add_lora_adapters
    from dreambooth.training.loop import train
    from dreambooth.training.recipes import recipe_class

    recipe_name, channels, size, tokens, width, pooled = (TINY if args.tiny else FULL_SIZE)[family]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = TrainingSettings(
        method=method, max_steps=args.steps, learning_rate=1e-4 if method == "lora" else 5e-6, checkpoint_every=10**9,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
    )
    denoiser = _denoiser(family, args.tiny).to(device)
    parameters = sum(p.numel() for p in denoiser.parameters())
    name = "transformer" if recipe_name == "flux" else "unet"
    scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER) if recipe_name == "flux" else DDPMScheduler(**SD_SCHEDULER)
    vae_scale = 8
    pipeline = SimpleNamespace(**{name: denoiser}, scheduler=scheduler, vae_scale_factor=vae_scale,
                               vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0, shift_factor=0.0)))
    recipe = recipe_class(recipe_name)(pipeline, settings, device, resolution=size * vae_scale)
    if method == "lora":
        add_lora_adapters(denoiser, [], settings)
    else:
        denoiser.requires_grad_(True)
    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)

    batch = 2  # 1 subject + 1 class example
    generator = torch.Generator().manual_seed(0)
    conditioning = {"embeddings": torch.randn(batch, tokens, width, generator=generator).to(device)}
    if recipe_name == "sdxl":
        conditioning["text_embeds"] = torch.randn(batch, pooled, generator=generator).to(device)
        conditioning["time_ids"] = torch.tensor([[size * vae_scale] * 2 + [0, 0] + [size * vae_scale] * 2] * batch, device=device, dtype=torch.float32)
    if recipe_name == "flux":
        conditioning["pooled"] = torch.randn(batch, pooled, generator=generator).to(device)
        conditioning["text_ids"] = torch.zeros(tokens, 3, device=device)

    def compute_loss(modules, step, step_generator):
        latents = torch.randn(batch, channels, size, size, generator=step_generator).to(device)
        return recipe.loss(modules, latents, None, conditioning, 1, step_generator)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train({name: denoiser}, {name: settings.learning_rate}, compute_loss, settings, Path(checkpoints))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"family": family, "method": method, "parameters": parameters, "trainable": trainable,
            "steps_per_second": result.steps_per_second, "peak_gb": peak, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="sd15,sdxl,flux")
    parser.add_argument("--methods", default="full,lora")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (the first 3 are not timed)")
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "adamw_8bit"])
    parser.add_argument("--tiny", action="store_true", help="tiny denoisers: check the bench itself on a CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(*args.child.split(":"), args)))
        return
    from dreambooth.training.recipes import recipe_class

    print(f"{'family':8}{'method':8}{'params':>10}{'trainable':>12}{'steps/s':>10}{'peak GPU GB':>13}")
    for family in args.families.split(","):
        for method in args.methods.split(","):
            if method not in recipe_class(FULL_SIZE[family][0]).methods:
                continue  # what the project does not train that way (Flux: LoRA only)
            command = [sys.executable, __file__, "--child", f"{family}:{method}", "--steps", str(args.steps),
                       "--mixed-precision", args.mixed_precision, "--optimizer", args.optimizer]
            command += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--tiny"] * args.tiny
            started = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                reason = "out of GPU memory" if "OutOfMemoryError" in run.stderr else run.stderr.strip().splitlines()[-1]
                print(f"{family:8}{method:8}  failed: {reason}")
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{family:8}{method:8}{row['parameters'] / 1e6:9.0f}M{row['trainable'] / 1e6:11.2f}M"
                  f"{row['steps_per_second']:10.2f}{row['peak_gb']:13.1f}   ({row['device']}, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
