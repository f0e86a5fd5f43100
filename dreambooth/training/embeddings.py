"""Textual inversion: a new token whose embedding is all that trains (Gal et al. 2022, the paper's
baseline), and with LoRA beside it, pivotal tuning.

The token, and for several vectors `<tok>_1`, `<tok>_2`... as diffusers names them, is added to
each CLIP tokenizer the identifier lives in; its rows start at the initializer's embedding. Only
those rows are a parameter: the rest of the table is the base's, frozen, so the text encoder stays
bit-identical to the base and the optimizer keeps state for a few vectors, not for the whole
49k-row table (diffusers' textual_inversion example optimises the table and copies the old rows
back after every step).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional

from dreambooth.errors import InputError
from dreambooth.models.loading import EMBEDDINGS_FILE, WEB_UI_EMBEDDING_KEYS, learned_token_names


class NewTokenRows(nn.Module):
    """A token embedding table whose rows [first, first + n) are a trainable parameter, the rest frozen."""

    def __init__(self, table: nn.Embedding, first: int, rows: torch.Tensor):
        super().__init__()
        self.table, self.first = table, first
        self.rows = nn.Parameter(rows)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        is_new = (ids >= self.first) & (ids < self.first + len(self.rows))
        old = self.table(ids.masked_fill(is_new, 0))
        new = functional.embedding((ids - self.first).clamp(0, len(self.rows) - 1), self.rows)
        return torch.where(is_new.unsqueeze(-1), new.to(old.dtype), old)


@dataclass
class LearnedToken:
    """The new token's trainable rows in each text encoder it was added to."""

    token: str
    rows: dict[str, NewTokenRows]  # text encoder name -> its trainable rows

    @classmethod
    def add(cls, pipeline, encoders: tuple[tuple[str, str], ...], token: str, initializer: str, num_vectors: int,
            setting: str = "training.textual_inversion") -> "LearnedToken":
        """Add `token` to each (tokenizer, text encoder) of `encoders`, every vector starting at the
        mean embedding of the initializer's tokens."""
        if not initializer.strip():
            raise InputError(f"{setting}.initializer: the subject has no class noun to start the embedding from; name a word")
        rows = {}
        for tokenizer_name, encoder_name in encoders:
            tokenizer, encoder = getattr(pipeline, tokenizer_name), getattr(pipeline, encoder_name)
            start = encoder.get_input_embeddings().weight[tokenizer(initializer, add_special_tokens=False).input_ids].mean(0)
            names = learned_token_names(token, num_vectors)
            if tokenizer.add_tokens(names) != num_vectors:
                raise InputError(f"subject.identifier: {token!r} is already a token of the model's {tokenizer_name}")
            ids = tokenizer.convert_tokens_to_ids(names)
            if encoder.get_input_embeddings().num_embeddings <= max(ids):
                encoder.resize_token_embeddings(max(ids) + 1, mean_resizing=False)
            table = encoder.get_input_embeddings()
            table.requires_grad_(False)
            rows[encoder_name] = NewTokenRows(table, ids[0], start.detach().repeat(num_vectors, 1).clone())
            encoder.set_input_embeddings(rows[encoder_name])
        return cls(token, rows)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The embedding file's tensors as the rows are now: {token: rows} for one encoder (SD),
        {clip_l, clip_g} for SDXL."""
        trained = {name: rows.rows.detach().float().cpu().contiguous() for name, rows in self.rows.items()}
        if len(trained) == 1:
            return {self.token: next(iter(trained.values()))}
        return {WEB_UI_EMBEDDING_KEYS[name]: tensor for name, tensor in trained.items()}

    def finish(self, pipeline) -> dict[str, torch.Tensor]:
        """Write the trained rows into each encoder's table and put the plain table back; returns `tensors()`."""
        trained = self.tensors()
        for encoder_name, rows in self.rows.items():
            with torch.no_grad():
                rows.table.weight[rows.first : rows.first + len(rows.rows)] = rows.rows.to(rows.table.weight.dtype)
            getattr(pipeline, encoder_name).set_input_embeddings(rows.table)
        return trained


def save_learned_token(tensors: dict[str, torch.Tensor], output_dir: Path) -> None:
    """The embedding file: `pipe.load_textual_inversion(output_dir)` reads an SD one as it is, and
    AUTOMATIC1111 and ComfyUI load both layouts from their embeddings folder (the file's name is
    then the prompt word)."""
    from safetensors.torch import save_file

    save_file(tensors, output_dir / EMBEDDINGS_FILE)
