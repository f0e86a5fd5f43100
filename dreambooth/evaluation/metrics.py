"""The DreamBench metrics as plain functions of embeddings and distances (paper sec. 4.1).

- DINO / CLIP-I: mean pairwise cosine similarity between generated and real image embeddings.
- CLIP-T: mean cosine similarity between each image and its prompt's text embedding.
- PRES: DINO between class-prompt images of the fine-tuned model and the real subject images.
- DIV: mean pairwise LPIPS distance between images generated for the same prompt.
"""

from __future__ import annotations

from itertools import combinations

import torch
import torch.nn.functional as F


def cosine_matrix(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    return F.normalize(first.double(), dim=-1) @ F.normalize(second.double(), dim=-1).T


def mean_pairwise_similarity(generated: torch.Tensor, real: torch.Tensor) -> float:
    """Every generated image against every real image."""
    return cosine_matrix(generated, real).mean().item()


def mean_distinct_pair_similarity(embeddings: torch.Tensor) -> float:
    """Every pair of distinct images of one set (the paper's "Real Images" row)."""
    count = embeddings.shape[0]
    if count < 2:
        return float("nan")
    similarities = cosine_matrix(embeddings, embeddings)
    off_diagonal = similarities.sum() - similarities.diagonal().sum()
    return (off_diagonal / (count * (count - 1))).item()


def image_text_similarity(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of row i of each: one value per image."""
    return (F.normalize(image_embeddings.double(), dim=-1) * F.normalize(text_embeddings.double(), dim=-1)).sum(-1)


def distinct_pairs(count: int) -> list[tuple[int, int]]:
    return list(combinations(range(count), 2))
