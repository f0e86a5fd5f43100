"""Shared training machinery: the loop (loop.py) and the DreamBooth loss (losses.py)."""
