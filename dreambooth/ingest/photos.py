"""Stage 1: validate and normalise the subject photos, and choose the identifier `[V]`.

Everything here runs before any model weights are loaded (the tokenizer is a vocabulary
file, the bucket sizes come from config files), so a bad upload is refused in seconds, before
GPU time is spent. Each normalised photo may have a caption (NAME.txt) and a mask (NAME.mask.png)
beside it: from the user's sidecar files or `subject.captions`, and for a person, the crop around
the face and the face's box.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image

from dreambooth.ingest.captions import draft_captions, photo_caption_template, render_caption
from dreambooth.config import RunConfig, SubjectSettings, require_subject
from dreambooth.errors import InputError
from dreambooth.ingest.faces import crop_around, detect_faces, face_mask
from dreambooth.ingest.identifiers import IdentifierChoice, check_user_identifier, new_token_identifier, select_rare_identifier
from dreambooth.images import MASK_SUFFIX, list_images, load_rgb
from dreambooth.models.loading import component_config, load_tokenizer, model_family
from dreambooth.training.buckets import place
from dreambooth.training.data import ViewShape, caption_file, mask_file

log = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"


@dataclass(frozen=True)
class ManifestEntry:
    source_file: str
    normalised_file: str
    sha256: str  # of the source file's bytes
    original_size: tuple[int, int]  # (width, height) as stored
    original_mode: str
    size: tuple[int, int]  # after EXIF orientation (and a person's face crop)
    bucket: tuple[int, int]  # (width, height) it trains at
    caption: str = ""  # "": the instance prompt
    face: Optional[tuple[int, int, int, int]] = None  # a person's face box in the upright photo
    mask: str = ""  # the mask file beside it, when there is one


@dataclass
class IngestResult:
    images: list[ManifestEntry]
    identifier: IdentifierChoice
    class_noun: str
    instance_prompt: str
    duplicates_dropped: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    drafted_captions: list[str] = field(default_factory=list)  # photos ingest.captioner captioned (NAME.txt beside them)

    def as_manifest(self) -> dict:
        return {
            "class_noun": self.class_noun,
            "identifier": self.identifier.as_dict(),
            "instance_prompt": self.instance_prompt,
            "images": [asdict(entry) for entry in self.images],
            "duplicates_dropped": self.duplicates_dropped,
            "warnings": self.warnings,
        }


def is_sidecar(path: Path) -> bool:
    """A photo's caption (NAME.txt) or mask (NAME.mask.png), not a photo."""
    return path.suffix.lower() == ".txt" or path.name.lower().endswith(MASK_SUFFIX)


def _candidate_files(subject_dir: Path) -> list[Path]:
    if not subject_dir.is_dir():
        raise InputError(f"{subject_dir}: subject folder not found")
    files = sorted(p for p in subject_dir.iterdir() if p.is_file() and not p.name.startswith(".") and not is_sidecar(p))
    stems = {path.stem for path in files}
    for caption in subject_dir.glob("*.txt"):  # a caption whose photo was renamed would be lost without a word
        if caption.stem not in stems and not caption.name.startswith("."):
            raise InputError(f"{caption}: a caption file, but no photo of the folder is named {caption.stem}.*")
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
    every_photo = _candidate_files(subject_dir)
    loaded, duplicates = _distinct_photos(every_photo[: settings.photos_limit], settings)
    warnings = _count_warnings(subject_dir, len(loaded), settings)
    choice = _identifier_choice(config, settings)
    unknown = sorted(set(settings.captions) - {path.name for path in every_photo})
    if unknown:
        raise InputError(f"subject.captions: {unknown[0]} is not a photo of {subject_dir}")
    shape = view_shape(config)
    prepared, drafted = _prepared_with_captions(loaded, config, choice.identifier)

    output_dir.mkdir(parents=True, exist_ok=True)
    entries = [_write_photo(index, path, image, photo, output_dir, shape)
               for index, ((path, image), photo) in enumerate(zip(loaded, prepared))]
    result = IngestResult(
        images=entries,
        identifier=choice,
        class_noun=settings.class_noun,
        instance_prompt=settings.instance_prompt(choice.identifier),
        duplicates_dropped=duplicates,
        warnings=warnings,
        drafted_captions=drafted,
    )
    (output_dir / MANIFEST_FILE).write_text(json.dumps(result.as_manifest(), indent=2))
    return result


def _distinct_photos(files: list[Path], settings: SubjectSettings) -> tuple[list, list[str]]:
    """([(path, loaded image)] of every distinct photo, the names of the duplicates dropped); a photo too small fails."""
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
    return loaded, duplicates


def _count_warnings(subject_dir: Path, count: int, settings: SubjectSettings) -> list[str]:
    """More photos than subject.max_images fail; fewer than it recommends are a warning."""
    if count > settings.max_images:
        raise InputError(f"{subject_dir}: {count} distinct images, at most {settings.max_images} allowed (subject.max_images)")
    warnings = []
    if count < settings.recommended_min_images:
        warnings.append(
            f"{subject_dir}: only {count} distinct image(s); DreamBooth works best with "
            f"{settings.recommended_min_images}-5 photos of the subject"
        )
        log.warning(warnings[-1])
    return warnings


def _prepared_with_captions(loaded: list, config: RunConfig, identifier: str) -> tuple[list[PreparedPhoto], list[str]]:
    """Each photo cropped (a person's to the face) and captioned: its own caption, or one a captioner drafts."""
    settings = config.subject
    templates = {path: photo_caption_template(path, settings) for path, _ in loaded}
    # the user's captions are checked before any model drafts the rest
    captions = {path: render_caption(path, template, settings, identifier) for path, template in templates.items()}
    prepared = [_prepare_photo(path, image.image, settings) for path, image in loaded]
    drafted = draft_captions(config, templates, {path: photo.image for (path, _), photo in zip(loaded, prepared)})
    for (path, _), photo in zip(loaded, prepared):
        photo.caption = render_caption(path, templates[path], settings, identifier) if path.name in drafted else captions[path]
    return prepared, drafted


def _write_photo(index: int, path: Path, image, photo: PreparedPhoto, output_dir: Path, shape: ViewShape) -> ManifestEntry:
    """The photo as trained (a PNG, its caption and mask beside it), and its manifest entry."""
    name = f"{index:02d}-{path.stem}.png"
    photo.image.save(output_dir / name, format="PNG")
    if photo.caption:
        caption_file(output_dir / name).write_text(photo.caption + "\n")
    if photo.mask is not None:
        photo.mask.save(mask_file(output_dir / name), format="PNG")
    bucket = shape.placement(photo.image.size).bucket
    log.info("%s: trains at %dx%d%s", path.name, *bucket, f" as {photo.caption!r}" if photo.caption else "")
    return ManifestEntry(
        source_file=path.name,
        normalised_file=name,
        sha256=hashlib.sha256(path.read_bytes()).hexdigest(),
        original_size=image.original_size,
        original_mode=image.original_mode,
        size=photo.image.size,
        bucket=bucket,
        caption=photo.caption,
        face=photo.face,
        mask=mask_file(output_dir / name).name if photo.mask is not None else "",
    )


@dataclass
class PreparedPhoto:
    image: Image.Image
    caption: str = ""
    mask: Optional[Image.Image] = None
    face: Optional[tuple[int, int, int, int]] = None


def _prepare_photo(path: Path, image: Image.Image, settings: SubjectSettings) -> PreparedPhoto:
    """The photo's mask, and for a person the crop around its one face."""
    mask = _user_mask(path, image)
    face = None
    if settings.kind == "person":
        faces = detect_faces(image)
        if len(faces) != 1:
            raise InputError(f"{path}: {'no face' if not faces else f'{len(faces)} faces'} found; a person's photos "
                             "must each show exactly one face (subject.kind: person)")
        face = faces[0]
        crop = crop_around(face, image.size, settings.face_crop_scale)
        mask = mask.crop(crop) if mask is not None else face_mask(face, crop)
        image = image.crop(crop)
    return PreparedPhoto(image, "", mask, face)


def _user_mask(path: Path, image: Image.Image) -> Optional[Image.Image]:
    """NAME.mask.png beside the photo: white where the subject is, the photo's upright size."""
    mask_path = mask_file(path)
    if not mask_path.is_file():
        return None
    mask = load_rgb(mask_path, max_pixels=4 * image.width * image.height).image.convert("L")
    if mask.size != image.size:
        raise InputError(f"{mask_path}: {mask.width}x{mask.height}, but its photo is {image.width}x{image.height} (upright)")
    return mask.point(lambda value: 255 if value >= 128 else 0)


def view_shape(config: RunConfig) -> ViewShape:
    """Where the fine-tune cuts its views: the base model's training size and, with buckets, its image step."""
    from dreambooth.training.recipes import recipe_class

    model = config.model
    recipe = recipe_class(model_family(model.base, model.revision, declared=model.family))
    denoiser = component_config(model.base, model.revision, recipe.denoiser)
    vae = component_config(model.base, model.revision, "vae")
    resolution = model.resolution or recipe.native_size(denoiser, vae)
    return recipe.shape_of_views(config.data, config.training, resolution, denoiser, vae)


def _identifier_choice(config: RunConfig, settings: SubjectSettings) -> IdentifierChoice:
    """[V]: a rare token of the model's tokenizers, the user's, or a new learned token; none for the
    zero-shot baseline, whose photos say which subject it draws."""
    if config.training.method == "reference":
        from dreambooth.baseline import check_reference_pipeline

        check_reference_pipeline(config)
        return IdentifierChoice(identifier="", token_ids=[], source="none",
                                reason="training.method reference: the subject's photos, not a token, say what to draw")
    tokenizer, *others = identifier_tokenizers(config)
    if config.training.learns_embedding:
        return new_token_identifier([tokenizer, *others], settings.name, settings.identifier)
    if settings.identifier:
        return check_user_identifier(tokenizer, settings.identifier, settings.class_noun, tuple(others))
    return select_rare_identifier(tokenizer, settings.class_noun, [settings.prompt_template, *config.samples.prompts],
                                  settings.identifier_token_range, settings.identifier_num_tokens, settings.identifier_seed,
                                  tuple(others))


def identifier_tokenizers(config: RunConfig) -> list:
    """The model's CLIP tokenizers the identifier must be one rare token of (SDXL has two)."""
    from dreambooth.training.recipes import recipe_class

    model = config.model
    recipe = recipe_class(model_family(model.base, model.revision, declared=model.family))
    recipe.check_settings(config.training)  # what the family cannot train is refused before any work
    return [load_tokenizer(config.model.base, config.model.revision, name) for name in recipe.identifier_tokenizers]


def read_manifest(folder: Path) -> dict:
    return json.loads((folder / MANIFEST_FILE).read_text())


def photos_as_trained(folder: Path, center_crop: bool = True) -> list[Image.Image]:
    """The folder's photos cut as the fine-tune cut them (to their bucket's shape, at full size),
    for the evaluation to compare with; a folder without a manifest: the photos as they are."""
    buckets = {}
    if (folder / MANIFEST_FILE).is_file():
        buckets = {entry["normalised_file"]: tuple(entry["bucket"]) for entry in read_manifest(folder)["images"] if entry.get("bucket")}
    photos = []
    for path in list_images(folder):
        image = load_rgb(path, 1 << 40).image
        if path.name in buckets:
            image = image.crop(place(image.size, buckets[path.name], center_crop).box_in(image.size))
        photos.append(image)
    return photos
