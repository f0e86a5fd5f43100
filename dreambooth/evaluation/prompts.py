"""The DreamBench prompt set: 25 prompts per subject, by category, from the project's copy.

Live subjects (pets) get 10 recontextualisation, 10 accessorisation and 5 property prompts;
objects 20 recontextualisation and 5 property prompts (paper sec. 4.1).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Optional

from dreambooth.errors import InputError


@dataclass(frozen=True)
class EvaluationPrompt:
    category: str
    template: str  # with {identifier} and {class_noun}


@lru_cache(maxsize=1)
def dreambench() -> dict:
    return json.loads(resources.files("dreambooth").joinpath("data/dreambench.json").read_text())


def is_live_subject(class_noun: str) -> bool:
    return class_noun.strip().lower() in dreambench()["live_classes"]


def load_prompts(class_noun: str, live: Optional[bool] = None, prompt_file: Optional[str] = None) -> list[EvaluationPrompt]:
    """The DreamBench list for the subject's kind, or a user file (JSON list of {category, template})."""
    if prompt_file:
        path = Path(prompt_file)
        try:
            entries = json.loads(path.read_text())
            prompts = [EvaluationPrompt(str(e["category"]), str(e["template"])) for e in entries]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise InputError(f"evaluation.prompt_file: {path}: expected a JSON list of {{category, template}} ({error})") from None
        for prompt in prompts:
            if "{identifier}" not in prompt.template:
                raise InputError(f"evaluation.prompt_file: {path}: {prompt.template!r} has no {{identifier}}")
        return prompts
    kind = "live" if (is_live_subject(class_noun) if live is None else live) else "object"
    return [EvaluationPrompt(e["category"], e["template"]) for e in dreambench()["prompts"][kind]]


def without_identifier(prompt: str, identifier: str) -> str:
    """CLIP-T text: a rare token means nothing to CLIP, so it is removed (paper sec. 4.1)."""
    return re.sub(r"\s+", " ", re.sub(rf"(?<!\w){re.escape(identifier)}(?!\w)", "", prompt)).strip()
