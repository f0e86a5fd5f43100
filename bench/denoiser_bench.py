"""GPU benchmark: training steps/s and peak GPU memory of full-size denoisers, by training method.

    python bench/denoiser_bench.py [--families sd15,sdxl,sd35,flux,flux2,flux2-klein,z-image,qwen-image] [--methods full,lora,textual_inversion,pivotal] [--steps 30]
                                   [--mixed-precision bf16] [--gradient-checkpointing] [--optimizer auto]
                                   [--quantization none,int8,nf4,fp8]
    python bench/denoiser_bench.py --tiny   # the same code path on tiny denoisers, on any CPU

Each denoiser is built from its published configuration with random weights (a step costs the
same as with real ones, and no weights are needed): SD 1.5's UNet (860M parameters, 512 px),
SDXL's UNet (2.6B, 1024 px), SD 3.5 Medium's MMDiT (2.5B, 1024 px; full and LoRA), FLUX.1-dev's
transformer (12B, 512 px), FLUX.2 [dev]'s (32B, 1024 px), FLUX.2 [klein] base 4B's (1024 px), Z-Image's
(6B, 1024 px) and Qwen-Image's (20B, 1024 px) (the last five LoRA only, as the project trains them). Each (family, method) runs in a fresh process through this project's own
training loop and recipe loss (batch 1 subject + 1 class example, text conditioning random
but shaped as the family's encoders give it), so the figures are what `pipeline.py` pays per
step. textual_inversion and pivotal also build the family's CLIP text encoders (SD 1.5's
CLIP-L; SDXL's CLIP-L and OpenCLIP bigG) with one new token whose embedding row trains, as
dreambooth.training.embeddings does: the text encoders run forward and backward every step.
Peak memory is torch.cuda.max_memory_allocated.
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
SD35_MEDIUM_TRANSFORMER = dict(
    sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)), qk_norm="rms_norm",
)
# FLUX.2 [klein] base 4B's transformer/config.json; FLUX.2 [dev]'s (32B) and Z-Image's (6B) are their
# classes' defaults.
FLUX2_KLEIN_4B_TRANSFORMER = dict(
    in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=7680,
    timestep_guidance_channels=256, mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False,
)
Z_IMAGE_TRANSFORMER = dict()
SD_SCHEDULER = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
FLUX_SCHEDULER = dict(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15)
SD3_SCHEDULER = dict(shift=3.0)

# The text encoders a learned token trains through: SD 1.5's CLIP-L (SDXL's first encoder too) and SDXL's OpenCLIP bigG.
CLIP_L = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768)
CLIP_BIG_G = dict(vocab_size=49408, hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                  max_position_embeddings=77, hidden_act="gelu", projection_dim=1280)
EMBEDDING_METHODS = ("textual_inversion", "pivotal")

# family: (recipe, latent channels, latent size, text tokens, text width, pooled width); FLUX.2's latents
# are as its loss reads them, 2x2-patchified (32 channels at 128 -> 128 at 64, 1024 px); Z-Image's text is
# a prompt's own tokens (about 40 for a DreamBench prompt in Qwen's chat template).
FULL_SIZE = {"sd15": ("sd", 4, 64, 77, 768, None), "sdxl": ("sdxl", 4, 128, 77, 2048, 1280), "flux": ("flux", 16, 64, 512, 4096, 768),
             "sd35": ("sd3", 16, 128, 77 + 256, 4096, 2048), "flux2-klein": ("flux2-klein", 128, 64, 512, 7680, None),
             "flux2": ("flux2", 128, 64, 512, 15360, None),
             "z-image": ("z-image", 16, 128, 40, 2560, None), "qwen-image": ("qwen-image", 16, 128, 40, 3584, None)}
TINY = {"sd15": ("sd", 4, 32, 77, 32, None), "sdxl": ("sdxl", 4, 32, 77, 64, 32), "flux": ("flux", 4, 32, 77, 32, 32),
        "sd35": ("sd3", 4, 32, 77 + 256, 64, 64), "flux2-klein": ("flux2-klein", 16, 16, 512, 48, None),
        "flux2": ("flux2", 16, 16, 512, 48, None),
        "z-image": ("z-image", 4, 32, 40, 16, None), "qwen-image": ("qwen-image", 4, 32, 40, 16, None)}
TINY_MODELS = {"sd15": "tiny://sd", "sdxl": "tiny://sdxl", "flux": "tiny://flux", "sd35": "tiny://sd3",
               "flux2-klein": "tiny://flux2-klein", "flux2": "tiny://flux2", "z-image": "tiny://z-image", "qwen-image": "tiny://qwen-image"}
TRANSFORMER_FAMILIES = ("flux", "sd35", "flux2", "flux2-klein", "z-image", "qwen-image")


def _denoiser(family: str, tiny: bool, quantization: str = "none"):
    """The family's denoiser with random weights; quantized, it is saved and loaded back through
    diffusers' quantization config (dreambooth.models.loading.denoiser_quantization), as training loads a base."""
    import torch
    from diffusers import (Flux2Transformer2DModel, FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel,
                           UNet2DConditionModel, ZImageTransformer2DModel)

    from dreambooth.models.loading import denoiser_quantization, load_pipeline

    if tiny:
        pipeline = load_pipeline(TINY_MODELS[family])
        built = pipeline.transformer if family in TRANSFORMER_FAMILIES else pipeline.unet
    elif family == "flux":
        built = FluxTransformer2DModel(**FLUX_DEV_TRANSFORMER)
    elif family == "flux2-klein":
        built = Flux2Transformer2DModel(**FLUX2_KLEIN_4B_TRANSFORMER)
    elif family == "flux2":
        built = Flux2Transformer2DModel()  # the class defaults are FLUX.2 [dev]'s shape
    elif family == "z-image":
        built = ZImageTransformer2DModel(**Z_IMAGE_TRANSFORMER)
    elif family == "qwen-image":
        built = QwenImageTransformer2DModel()  # the class defaults are Qwen-Image's shape (20B)
    elif family == "sd35":
        built = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER)
    else:
        built = UNet2DConditionModel(**(SD15_UNET if family == "sd15" else SDXL_UNET))
    if quantization == "none":
        return built
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.float32 if tiny else torch.bfloat16
    with tempfile.TemporaryDirectory() as folder:
        built.to(dtype).save_pretrained(folder)
        model_class = type(built)
        del built
        return model_class.from_pretrained(folder, torch_dtype=dtype, quantization_config=denoiser_quantization(quantization, device))


def _text_encoders(family: str, tiny: bool) -> list:
    """The family's CLIP text encoders (random weights), as the pipeline holds them."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    if tiny:
        from dreambooth.models.loading import load_pipeline

        pipeline = load_pipeline("tiny://sd" if family == "sd15" else "tiny://sdxl")
        return [pipeline.text_encoder] + ([pipeline.text_encoder_2] if family == "sdxl" else [])
    if family == "sd15":
        return [CLIPTextModel(CLIPTextConfig(**CLIP_L))]
    return [CLIPTextModel(CLIPTextConfig(**CLIP_L)), CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIG_G))]


def _learned_token(encoders: list, device):
    """One new token per encoder whose embedding row alone trains (dreambooth.training.embeddings.NewTokenRows);
    returns prompt ids (77 tokens, the new token among them) for each encoder."""
    import torch

    from dreambooth.training.embeddings import NewTokenRows

    ids = []
    for encoder in encoders:
        encoder.requires_grad_(False)
        table = encoder.get_input_embeddings()
        new_id = table.num_embeddings
        encoder.resize_token_embeddings(new_id + 1, mean_resizing=False)
        table = encoder.get_input_embeddings()
        table.requires_grad_(False)
        encoder.set_input_embeddings(NewTokenRows(table, new_id, table.weight[:1].detach().clone()))
        encoder.to(device)
        prompt = torch.randint(new_id, (2, 77), generator=torch.Generator().manual_seed(1))
        prompt[:, 2] = new_id
        ids.append(prompt.to(device))
    return ids


def _measure(family: str, method: str, quantization: str, args) -> dict:
    """One (family, method, quantization) in this process: build, train args.steps steps, report."""
    import torch
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from dreambooth.config import TrainingSettings
    from dreambooth.training.lora import add_lora_adapters, freeze
    from dreambooth.training.loop import train
    from dreambooth.training.recipes import recipe_class

    recipe_name, channels, size, tokens, width, pooled = (TINY if args.tiny else FULL_SIZE)[family]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    settings = TrainingSettings(
        method=method, max_steps=args.steps, learning_rate=1e-4 if method in ("lora", "pivotal") else 5e-6, checkpoint_every=10**9,
        mixed_precision=args.mixed_precision, gradient_checkpointing=args.gradient_checkpointing, optimizer=args.optimizer,
    )
    denoiser = _denoiser(family, args.tiny, quantization)
    if not (quantization == "nf4" and device.type == "cuda"):
        denoiser = denoiser.to(device)  # bitsandbytes' 4-bit weights are placed on the GPU as they load
    parameters = sum(p.numel() for p in denoiser.parameters())
    name = "transformer" if family in TRANSFORMER_FAMILIES else "unet"
    flow = {"flux": FLUX_SCHEDULER, "flux2": FLUX_SCHEDULER, "flux2-klein": FLUX_SCHEDULER, "sd3": SD3_SCHEDULER, "z-image": SD3_SCHEDULER,
            "qwen-image": FLUX_SCHEDULER}
    scheduler = FlowMatchEulerDiscreteScheduler(**flow[recipe_name]) if recipe_name in flow else DDPMScheduler(**SD_SCHEDULER)
    vae_scale = 8
    pipeline = SimpleNamespace(**{name: denoiser}, scheduler=scheduler, vae_scale_factor=vae_scale,
                               vae=SimpleNamespace(config=SimpleNamespace(scaling_factor=1.0, shift_factor=0.0)))
    recipe = recipe_class(recipe_name)(pipeline, settings, device, resolution=size * vae_scale)
    if method in ("lora", "pivotal"):
        add_lora_adapters(denoiser, [], settings)
    elif method == "textual_inversion":
        freeze(denoiser, settings)
    else:
        denoiser.requires_grad_(True)
    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    trainable = sum(p.numel() for p in denoiser.parameters() if p.requires_grad)

    batch = 2  # 1 subject + 1 class example
    generator = torch.Generator().manual_seed(0)
    conditioning = {"embeddings": torch.randn(batch, tokens, width, generator=generator).to(device)}
    extras = {}  # what each view brings beside its latents: SDXL's size and crop ids
    if recipe_name == "sdxl":
        conditioning["text_embeds"] = torch.randn(batch, pooled, generator=generator).to(device)
        extras["time_ids"] = torch.tensor([[size * vae_scale] * 2 + [0, 0] + [size * vae_scale] * 2] * batch, dtype=torch.float32)
    if recipe_name == "sd3":
        conditioning["pooled"] = torch.randn(batch, pooled, generator=generator).to(device)
    if recipe_name == "flux":
        conditioning["pooled"] = torch.randn(batch, pooled, generator=generator).to(device)
        conditioning["text_ids"] = torch.zeros(tokens, 3, device=device)
    if recipe_name in ("flux2", "flux2-klein"):
        from dreambooth.training.recipes.flux2 import position_ids

        conditioning["text_ids"] = position_ids(batch, 1, 1, 1, tokens, device)
    if recipe_name == "z-image":
        conditioning["lengths"] = torch.full((batch,), tokens, device=device)
    if recipe_name == "qwen-image":
        conditioning["mask"] = torch.ones(batch, tokens, dtype=torch.long, device=device)

    modules = {} if method == "textual_inversion" else {name: denoiser}
    encoders = _text_encoders(family, args.tiny) if method in EMBEDDING_METHODS else []
    prompt_ids = _learned_token(encoders, device) if encoders else []
    modules.update({f"text_encoder_{index}": encoder for index, encoder in enumerate(encoders)})
    trainable += sum(p.numel() for encoder in encoders for p in encoder.parameters() if p.requires_grad)

    def text_conditioning(modules) -> dict:
        """What the family's encoders give the denoiser, through the new token's trainable row."""
        if recipe_name == "sd":
            return {**conditioning, "embeddings": modules["text_encoder_0"](prompt_ids[0])[0]}
        outputs = [modules[f"text_encoder_{i}"](prompt_ids[i], output_hidden_states=True) for i in range(2)]
        return {**conditioning, "embeddings": torch.cat([output.hidden_states[-2] for output in outputs], dim=-1),
                "text_embeds": outputs[1][0]}

    def compute_loss(modules, step, step_generator):
        latents = torch.randn(batch, channels, size, size, generator=step_generator).to(device)
        return recipe.loss(modules, latents, extras, text_conditioning(modules) if encoders else conditioning, 1, step_generator)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    rates = {key: 5e-4 if key.startswith("text_encoder") else settings.learning_rate for key in modules}
    with tempfile.TemporaryDirectory() as checkpoints:
        result = train(modules, rates, compute_loss, settings, Path(checkpoints))
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return {"family": family, "method": method, "quantization": quantization, "parameters": parameters, "trainable": trainable,
            "steps_per_second": result.steps_per_second, "peak_gb": peak, "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", default="sd15,sdxl,sd35,flux,flux2,flux2-klein,z-image,qwen-image")
    parser.add_argument("--methods", default="full,lora,textual_inversion,pivotal")
    parser.add_argument("--steps", type=int, default=30, help="training steps per run (the first 3 are not timed)")
    parser.add_argument("--mixed-precision", default="bf16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--optimizer", default="auto", choices=["auto", "adamw", "adamw_8bit"])
    parser.add_argument("--quantization", default="none", help="the frozen denoiser's model.quantization values to measure "
                        "(none,int8,nf4,fp8), with LoRA and pivotal only")
    parser.add_argument("--tiny", action="store_true", help="tiny denoisers: check the bench itself on a CPU")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_measure(*args.child.split(":"), args)))
        return
    from dreambooth.training.recipes import recipe_class

    print(f"{'family':12}{'method':19}{'quant':6}{'params':>10}{'trainable':>15}{'steps/s':>10}{'peak GPU GB':>13}")
    runs = [(family, method, quantization) for family in args.families.split(",") for method in args.methods.split(",")
            for quantization in args.quantization.split(",")]
    for family, method, quantization in runs:
            if method not in recipe_class(FULL_SIZE[family][0]).methods:
                continue  # what the project does not train that way (Flux: LoRA only)
            if quantization != "none" and method not in ("lora", "pivotal"):
                continue  # a quantized denoiser is frozen: adapters train on it
            label = f"{family:12}{method:19}{quantization:6}"
            command = [sys.executable, __file__, "--child", f"{family}:{method}:{quantization}", "--steps", str(args.steps),
                       "--mixed-precision", args.mixed_precision, "--optimizer", args.optimizer]
            command += ["--gradient-checkpointing"] * args.gradient_checkpointing + ["--tiny"] * args.tiny
            started = time.perf_counter()
            run = subprocess.run(command, capture_output=True, text=True)
            if run.returncode != 0:
                reason = "out of GPU memory" if "OutOfMemoryError" in run.stderr else run.stderr.strip().splitlines()[-1]
                print(f"{label}  failed: {reason}")
                continue
            row = json.loads(run.stdout.strip().splitlines()[-1])
            print(f"{label}{row['parameters'] / 1e6:9.0f}M{row['trainable']:15,}"
                  f"{row['steps_per_second']:10.2f}{row['peak_gb']:13.1f}   ({row['device']}, {time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
