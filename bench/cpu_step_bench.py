"""What one full-size fine-tune step costs on a CPU: the figure behind preflight's refusal of a real
model on a machine without CUDA (dreambooth.commands.preflight.CPU_SECONDS_PER_STEP).

    python bench/cpu_step_bench.py [--steps 3]

Builds Stable Diffusion 1.5's UNet with random weights (the same cost as the real ones; nothing is
downloaded) and times a DreamBooth step as sd15 trains it: one subject and one class latent at
512 px (64x64 latents), CLIP-sized text states, MSE loss, backward, AdamW. Prints each step's
seconds, the median after the first, the parameter count and the threads torch used.
"""

from __future__ import annotations

import argparse
import statistics
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()

    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # stable-diffusion-v1-5's unet/config.json
        sample_size=64, cross_attention_dim=768, attention_head_dim=8, layers_per_block=2,
        block_out_channels=(320, 640, 1280, 1280),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )
    optimizer = torch.optim.AdamW(unet.parameters(), lr=5e-6)
    latents, states = torch.randn(2, 4, 64, 64), torch.randn(2, 77, 768)
    seconds = []
    for step in range(args.steps):
        started = time.perf_counter()
        timesteps = torch.randint(0, 1000, (2,))
        loss = (unet(latents, timesteps, states).sample - latents).pow(2).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        seconds.append(time.perf_counter() - started)
        print(f"step {step}: {seconds[-1]:.1f} s", flush=True)
    parameters = sum(parameter.numel() for parameter in unet.parameters())
    steady = statistics.median(seconds[1:] or seconds)
    print(f"SD 1.5 UNet ({parameters / 1e6:.0f}M parameters), batch 2 at 512 px, fp32 AdamW, {torch.get_num_threads()} threads: "
          f"{steady:.1f} s a step; 1,000 steps = {steady * 1000 / 3600:.1f} h")


if __name__ == "__main__":
    main()
