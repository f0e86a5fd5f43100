"""Shared training machinery: the loop (loop.py), the DreamBooth loss and batches (losses.py),
prepared data and latent caches (data.py), LoRA adapters (lora.py) and saving results (saving.py)."""
