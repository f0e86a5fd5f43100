"""Stage 1: validate and normalise the subject photos, and choose the identifier `[V]`.

Everything here runs before any model weights are loaded (the tokenizer is a vocabulary
file), so a bad upload is refused in seconds, before GPU time is spent.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dreambooth.config import RunConfig, require_subject
from dreambooth.errors import InputError
from dreambooth.identifiers import IdentifierChoice, check_user_identifier, new_token_identifier, select_rare_identifier
from dreambooth.images import load_rgb
from dreambooth.models import load_tokenizer, model_family

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ManifestEntry:
    source_file: str
    normalised_file: str
    sha256: str  # of the source file's bytes
    original_size: tuple[int, int]  # (width, height) as stored
    original_mode: str
    size: tuple[int, int]  # after EXIF orientation


@dataclass
class IngestResult:
    images: list[ManifestEntry]
    identifier: IdentifierChoice
    class_noun: str
    instance_prompt: str
    duplicates_dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def as_manifest(self) -> dict:
        return {
            "class_noun": self.class_noun,
            "identifier": self.identifier.as_dict(),
            "instance_prompt": self.instance_prompt,
            "images": [asdict(entry) for entry in self.images],
            "duplicates_dropped": self.duplicates_dropped,
            "warnings": self.warnings,
        }


def _candidate_files(subject_dir: Path) -> list[Path]:
    if not subject_dir.is_dir():
        raise InputError(f"{subject_dir}: subject folder not found")
    files = sorted(p for p in subject_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    inside = subject_dir.resolve()
    for path in files:  # a link would make a file elsewhere on disk a training photo
        if path.is_symlink() and not path.resolve().is_relative_to(inside):
            raise InputError(f"{path}: links to {path.resolve()}, outside the subject folder; copy the photo in instead")
    if not files:
        raise InputError(f"{subject_dir}: no images in the subject folder")
    return files


def ingest_subject(subject_dir: Path, output_dir: Path, config: RunConfig) -> IngestResult:
    """Check every photo, write the normalised RGB PNGs and manifest.json to output_dir."""
    require_subject(config)
    settings = config.subject
    files = _candidate_files(subject_dir)[: settings.photos_limit]

    loaded = []
    seen_pixels: dict[str, str] = {}
    duplicates: list[str] = []
    for path in files:
        image = load_rgb(path, settings.max_image_pixels)
        width, height = image.image.size
        if min(width, height) < settings.min_image_size:
            raise InputError(
                f"{path}: {width}x{height} is too small; the shorter side must be at least "
                f"{settings.min_image_size} px (subject.min_image_size)"
            )
        # Same pixels = same training example, whatever the file format or name.
        pixel_hash = hashlib.sha256(image.image.tobytes() + repr(image.image.size).encode()).hexdigest()
        if pixel_hash in seen_pixels:
            duplicates.append(path.name)
            log.warning("%s: duplicate of %s, dropped", path, seen_pixels[pixel_hash])
            continue
        seen_pixels[pixel_hash] = path.name
        loaded.append((path, image))

    if len(loaded) > settings.max_images:
        raise InputError(
            f"{subject_dir}: {len(loaded)} distinct images, at most {settings.max_images} allowed (subject.max_images)"
        )
    warnings = []
    if len(loaded) < settings.recommended_min_images:
        warnings.append(
            f"{subject_dir}: only {len(loaded)} distinct image(s); DreamBooth works best with "
            f"{settings.recommended_min_images}-5 photos of the subject"
        )
        log.warning(warnings[-1])

    tokenizer, *others = identifier_tokenizers(config)
    if config.training.learns_embedding:
        choice = new_token_identifier([tokenizer, *others], settings.name, settings.identifier)
    elif settings.identifier:
        choice = check_user_identifier(tokenizer, settings.identifier, settings.class_noun, tuple(others))
    else:
        choice = select_rare_identifier(
            tokenizer,
            settings.class_noun,
            [settings.prompt_template, *config.samples.prompts],
            settings.identifier_token_range,
            settings.identifier_num_tokens,
            settings.identifier_seed,
            tuple(others),
        )

    output_dir.mkdir(parents=True, exist_ok=True)
    entries = []
    for index, (path, image) in enumerate(loaded):
        name = f"{index:02d}-{path.stem}.png"
        image.image.save(output_dir / name, format="PNG")
        entries.append(
            ManifestEntry(
                source_file=path.name,
                normalised_file=name,
                sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
                original_size=image.original_size,
                original_mode=image.original_mode,
                size=image.image.size,
            )
        )
    result = IngestResult(
        images=entries,
        identifier=choice,
        class_noun=settings.class_noun,
        instance_prompt=settings.instance_prompt(choice.identifier),
        duplicates_dropped=duplicates,
        warnings=warnings,
    )
    (output_dir / MANIFEST_FILE).write_text(json.dumps(result.as_manifest(), indent=2))
    return result


def identifier_tokenizers(config: RunConfig) -> list:
    """The model's CLIP tokenizers the identifier must be one rare token of (SDXL has two)."""
    from dreambooth.training.recipes import recipe_class

    model = config.model
    recipe = recipe_class(model_family(model.base, model.revision, declared=model.family))
    recipe.check_settings(config.training)  # what the family cannot train is refused before any work
    return [load_tokenizer(config.model.base, config.model.revision, name) for name in recipe.identifier_tokenizers]


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())
