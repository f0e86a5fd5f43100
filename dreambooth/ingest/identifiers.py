"""Choosing the identifier `[V]`: a rare token of the model's own tokenizer (paper, sec. 4.1).

A rare token has a weak prior in the text encoder, so fine-tuning can bind it to the
subject without first unlearning another meaning. We take whole-word tokens from a rare
id range (the paper used ids 5000-10000 of its tokenizer) that decode to at most 3 letters,
are not ordinary words, and round-trip through the tokenizer as exactly that token.
"""

from __future__ import annotations

import random
import re
from dataclasses import asdict, dataclass
from functools import lru_cache
from importlib import resources

from dreambooth.errors import InputError

_WORD_END = "</w>"  # CLIP's BPE marks a token that ends a word
_SPACE_BEFORE = "\u0120"  # byte-level BPE (Qwen's, GPT-2's) marks a token that starts after a space: "Ġdog"


def _whole_word(token: str) -> str | None:
    """The word a vocabulary entry stands for when it is a whole word in running text, else None."""
    if token.endswith(_WORD_END):
        return token[: -len(_WORD_END)]
    if token.startswith(_SPACE_BEFORE):
        return token[len(_SPACE_BEFORE):]
    return None


def _tokens_in_text(tokenizer, text: str) -> list[int]:
    """`text`'s ids as it appears inside a prompt, after a space (byte-level BPE spells a word's start with it)."""
    return tokenizer(" " + text, add_special_tokens=False)["input_ids"]


@dataclass(frozen=True)
class IdentifierChoice:
    identifier: str
    token_ids: list[int]
    source: str  # "selected" or "user"
    reason: str

    def as_dict(self) -> dict:
        return asdict(self)


@lru_cache(maxsize=1)
def common_short_words() -> frozenset[str]:
    text = resources.files("dreambooth").joinpath("data/common_short_words.txt").read_text()
    words = [word for line in text.splitlines() if not line.startswith("#") for word in line.split()]
    return frozenset(words)


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z]+", text.lower()))


def rare_token_candidates(tokenizer, token_range: tuple[int, int], avoid: set[str], others: tuple = ()) -> list[tuple[int, str]]:
    """(id, text) of usable rare tokens in `token_range`, in id order; one token in each of `others` too."""
    low, high = token_range
    ordinary = common_short_words()
    candidates = []
    for token, token_id in tokenizer.get_vocab().items():
        text = _whole_word(token)
        if text is None or not low <= token_id < high:
            continue
        if not (1 <= len(text) <= 3 and text.isascii() and text.isalpha() and text.islower()):
            continue
        if text in ordinary or text in avoid:
            continue
        if _tokens_in_text(tokenizer, text) != [token_id]:
            continue
        if any(len(_tokens_in_text(other, text)) != 1 for other in others):
            continue
        candidates.append((token_id, text))
    return sorted(candidates)


def select_rare_identifier(
    tokenizer,
    class_noun: str,
    prompt_templates: list[str],
    token_range: tuple[int, int],
    num_tokens: int = 1,
    seed: int = 0,
    other_tokenizers: tuple = (),
) -> IdentifierChoice:
    """A random pick among the rare tokens of `tokenizer` (and single tokens of `other_tokenizers`: SDXL's second)."""
    avoid = _words(class_noun) | set().union(*(_words(t.replace("{identifier}", "")) for t in prompt_templates))
    candidates = rare_token_candidates(tokenizer, token_range, avoid, other_tokenizers)
    if len(candidates) < num_tokens:
        raise InputError(
            f"subject.identifier_token_range: [{token_range[0]}, {token_range[1]}) holds {len(candidates)} usable rare tokens "
            f"of this tokenizer, {num_tokens} needed; widen the range or pass --identifier"
        )
    picked = random.Random(seed).sample(candidates, num_tokens)
    identifier = " ".join(text for _, text in picked)
    ids = [token_id for token_id, _ in picked]
    reason = (
        f"rare token{'s' if num_tokens > 1 else ''} {ids} drawn (seed {seed}) from {len(candidates)} candidates "
        f"in id range [{token_range[0]}, {token_range[1]}): whole-word tokens of at most 3 letters that are not "
        f"ordinary words and do not overlap the class noun or prompts"
    )
    return IdentifierChoice(identifier=identifier, token_ids=ids, source="selected", reason=reason)


def check_user_identifier(tokenizer, identifier: str, class_noun: str, other_tokenizers: tuple = ()) -> IdentifierChoice:
    identifier = identifier.strip()
    if not identifier:
        raise InputError("subject.identifier: empty; leave it unset to pick a rare token automatically")
    ids = _tokens_in_text(tokenizer, identifier)
    for index, checked in enumerate((tokenizer, *other_tokenizers)):
        count = len(_tokens_in_text(checked, identifier))
        if not 1 <= count <= 3:
            which = "this model's tokenizer" if index == 0 else f"this model's tokenizer {index + 1}"
            raise InputError(f"subject.identifier: {identifier!r} is {count} tokens of {which}; use 1-3 tokens")
    if _words(identifier) & _words(class_noun):
        raise InputError(f"subject.identifier: {identifier!r} overlaps the class noun {class_noun!r}")
    ordinary = sorted(_words(identifier) & common_short_words())
    note = f"; note: {', '.join(ordinary)} is an ordinary word with a prior meaning" if ordinary else ""
    return IdentifierChoice(
        identifier=identifier, token_ids=ids, source="user", reason=f"given by the user ({len(ids)} tokens){note}"
    )


def new_token_identifier(tokenizers: list, subject_name: str, user_identifier: str | None) -> IdentifierChoice:
    """[V] for methods that learn an embedding (textual_inversion, pivotal): a token the tokenizers
    do not have yet, added to them with its own trained embedding; `<subject-name>` unless given."""
    token = (user_identifier or "").strip() or f"<{re.sub(r'[^a-z0-9]+', '-', subject_name.lower()).strip('-') or 'subject'}>"
    if re.search(r"\s", token):
        raise InputError(f"subject.identifier: {token!r} has white space; a learned embedding's token is one word, e.g. <my-dog>")
    for index, tokenizer in enumerate(tokenizers):
        if token in tokenizer.get_vocab():
            which = "this model's tokenizer" if index == 0 else f"this model's tokenizer {index + 1}"
            raise InputError(f"subject.identifier: {token!r} is already a token of {which}; a learned embedding needs a new one")
    return IdentifierChoice(
        identifier=token, token_ids=[], source="user" if user_identifier else "selected",
        reason=f"a new token {token}, added to the tokenizer; its embedding is what trains",
    )
