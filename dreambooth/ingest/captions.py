"""A photo's caption: a template of {identifier} and {class_noun} from the subjects file
(subject.captions) or a NAME.txt beside the photo, checked to name the subject; for photos with
neither, a draft by an image-to-text model (ingest.captioner).

A draft's first mention of the class noun becomes `{identifier} {class_noun}`, or without one the
instance phrase leads it. Drafts are written beside the photos (NAME.txt), where people correct
them; a photo with a caption file is never drafted again.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Optional

from PIL import Image

from dreambooth.config import RunConfig, SubjectSettings
from dreambooth.errors import InputError
from dreambooth.models.loading import load_failure_reason, resolve_model_source, weights_format
from dreambooth.training.data import caption_file

log = logging.getLogger(__name__)


def photo_caption_template(path: Path, settings: SubjectSettings) -> Optional[str]:
    """The photo's caption template: subject.captions, else its NAME.txt; None: it has none."""
    template = settings.captions.get(path.name)
    if template is None and caption_file(path).is_file():
        template = caption_file(path).read_text()
    return template


def render_caption(path: Path, template: Optional[str], settings: SubjectSettings, identifier: str) -> str:
    """The template with the subject's identifier and class noun; refused when it would not name the subject."""
    if template is None:
        return ""
    try:
        caption = settings.render(template, identifier)
    except (KeyError, IndexError, ValueError) as error:
        raise InputError(f"{path}: caption {template.strip()!r} is not a template of {{identifier}} and {{class_noun}} ({error})") from None
    phrase = settings.identifier_phrase(identifier)
    if phrase not in caption:
        raise InputError(f"{path}: caption {caption!r} does not contain the identifier phrase {phrase!r}; "
                         "write {identifier} {class_noun} in it")
    return caption


def draft_captions(config: RunConfig, templates: dict[Path, Optional[str]], images: dict[Path, Image.Image]) -> list[str]:
    """ingest.captioner's templates for the photos without one, written beside them (NAME.txt) for
    people to correct; returns the photos captioned."""
    needed = [path for path, template in templates.items() if template is None]
    if not (config.ingest.captioner and needed):
        return []
    descriptions = describe_photos(config.ingest.captioner, [images[path] for path in needed], config.ingest.captioner_max_tokens)
    for path, description in zip(needed, descriptions):
        templates[path] = caption_template(description, config.subject.class_noun)
        caption_file(path).write_text(templates[path] + "\n")
        log.info("%s: captioned %r (edit %s to change it)", path.name, templates[path], caption_file(path).name)
    return [path.name for path in needed]


def describe_photos(reference: str, images: list[Image.Image], max_tokens: int) -> list[str]:
    """One description per image from the captioning model (BLIP and other AutoModelForImageTextToText models)."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        source = resolve_model_source(reference, setting="ingest.captioner")
        processor = AutoProcessor.from_pretrained(source)
        model = AutoModelForImageTextToText.from_pretrained(source, **weights_format()).eval()
    except (OSError, ValueError) as error:
        raise InputError(f"ingest.captioner: cannot load {reference!r} ({load_failure_reason(error)})") from None
    descriptions = []
    with torch.no_grad():
        for image in images:
            ids = model.generate(**processor(images=image, return_tensors="pt"), max_new_tokens=max_tokens)
            descriptions.append(" ".join(processor.batch_decode(ids, skip_special_tokens=True)[0].split()))
    return descriptions


def caption_template(description: str, class_noun: str) -> str:
    """`a dog on the grass` -> `a {identifier} {class_noun} on the grass`; with no mention of the noun,
    `a {identifier} {class_noun}, <description>`."""
    text = description.replace("{", "{{").replace("}", "}}")
    mention = re.search(rf"\b{re.escape(class_noun)}\b", text, flags=re.IGNORECASE) if class_noun else None
    if mention:
        return f"{text[: mention.start()]}{{identifier}} {{class_noun}}{text[mention.end():]}"
    return f"a {{identifier}} {{class_noun}}, {text}" if text else "a {identifier} {class_noun}"
