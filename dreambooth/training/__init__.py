"""Shared training machinery: the fine-tune driver (driver.py) and one recipe per model family
(recipes/: sd, sdxl, sd3, flux, the x4 upscaler), the loop (loop.py), the DreamBooth loss and batches
(losses.py), prepared data and latent caches (data.py), LoRA adapters (lora.py) and saving results
(saving.py)."""
