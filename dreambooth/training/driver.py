"""The one fine-tune driver: every model family and method, through its recipe.

The VAE never changes, so every image is encoded once up front and its latent distribution
cached; with frozen text encoders the prompts' conditioning is cached too. A step then costs only
the denoiser (and the text encoders that train). `training.method` picks what trains: every
denoiser weight (full, the paper), low-rank adapters on its attention projections (lora), a new
token's embedding alone (textual_inversion), or that embedding and the adapters (pivotal: the
embedding freezes after training.textual_inversion.train_fraction of the steps).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import torch

from dreambooth.config import RunConfig, TrainingSettings
from dreambooth.errors import InputError
from dreambooth.images import list_images
from dreambooth.training.buckets import share_out
from dreambooth.training.data import class_images_for, training_fingerprint
from dreambooth.training.embeddings import LearnedToken
from dreambooth.training.lora import add_lora_adapters, freeze
from dreambooth.training.loop import OnLog, OnStep, TrainingResult, process_state, split_batch, train
from dreambooth.training.losses import LossTerms
from dreambooth.training.recipes import Recipe
from dreambooth.training.recipes.base import TrainingImages
from dreambooth.training.saving import (
    FineTuneResult, claim_checkpoints, release_checkpoints, save_trained_pipeline, saved_result, write_snapshot,
)


def pick_group(images: TrainingImages, generator: torch.Generator) -> int:
    """A bucket for this step, in proportion to its views: every view is as likely as in one square group."""
    if len(images.groups) == 1:
        return 0
    counts = torch.tensor([len(group.latents) for group in images.groups], dtype=torch.float)
    return int(torch.multinomial(counts, 1, generator=generator))


class SubjectCaptions:
    """Each subject example's prompt: its photo's caption, or the bare instance prompt for a photo
    without one and for training.caption_dropout of the examples; counts what was drawn."""

    def __init__(self, images: TrainingImages, instance_prompt: str, dropout: float):
        self.images, self.instance_prompt, self.dropout = images, instance_prompt, dropout
        self.counts: Counter = Counter()

    def prompts(self) -> list[str]:
        return list(dict.fromkeys([self.instance_prompt, *(caption or self.instance_prompt
                                                           for group in self.images.groups for caption in group.captions)]))

    def draw(self, views, picked: torch.Tensor, generator: torch.Generator) -> list[str]:
        prompts = [views.captions[index] or self.instance_prompt for index in picked.tolist()]
        if self.dropout:
            bare = (torch.rand(len(prompts), generator=generator) < self.dropout).tolist()
            prompts = [self.instance_prompt if drop else prompt for prompt, drop in zip(prompts, bare)]
        self.counts.update(prompts)
        return prompts


@dataclass
class FineTuneJob:
    recipe: Recipe  # holds the loaded pipeline and the per-process training settings
    instance_images: list[Path]
    class_images: list[Path]  # empty: no prior preservation
    instance_prompt: str
    class_prompt: str
    checkpoints: Path
    description: str = "fine-tune"
    owner: str = ""  # the tracking run training (written into checkpoints)
    identifier: str = ""  # [V]: the new token, for the methods that learn its embedding
    initializer: str = ""  # the word(s) a learned embedding starts from
    snapshot_steps: tuple[int, ...] = ()  # steps whose model is kept aside (evaluation.select)


def run_fine_tune(job: FineTuneJob, on_log: Optional[OnLog] = None, on_step: Optional[OnStep] = None,
                 metadata: Optional[dict] = None) -> TrainingResult:
    """Train job.recipe's denoiser (and text encoders, when set) on the subject, resuming from job.checkpoints;
    the model at each of job.snapshot_steps is written aside as a result folder with `metadata`."""
    recipe, settings = job.recipe, job.recipe.settings
    pipeline = recipe.pipeline
    pipeline.vae.requires_grad_(False)
    instance = recipe.prepare_images(job.instance_images, with_masks=settings.mask_weight < 1.0)
    classes = None
    if job.class_images:  # drawn at the subject's buckets, in proportion to its photos
        class_paths, class_buckets = share_out(job.class_images, instance.counts())
        classes = recipe.prepare_images(class_paths, buckets=class_buckets)
    pipeline.vae.to("cpu")  # not needed again until the pipeline is saved

    batch = settings.batch_size
    captions = SubjectCaptions(instance, job.instance_prompt, settings.caption_dropout)
    known_prompts = list(dict.fromkeys([*captions.prompts(), job.class_prompt]))
    prompt_rows = {prompt: row for row, prompt in enumerate(known_prompts)}
    denoiser = getattr(pipeline, recipe.denoiser)
    training_encoders, learned = _set_up_method(job)
    cached = None
    if not training_encoders:
        with torch.no_grad():
            cached = recipe.encode_prompts({}, known_prompts)
        for name in recipe.text_encoders:
            if not getattr(getattr(pipeline, name), "is_quantized", False):  # bitsandbytes' 4-bit weights cannot move
                getattr(pipeline, name).to("cpu")

    if settings.gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
        for name in training_encoders:
            getattr(pipeline, name).gradient_checkpointing_enable()

    # pivotal: past this step the embedding gets no gradient, so the optimizer leaves it where it is
    embedding_steps = settings.max_steps
    if settings.method == "pivotal":
        embedding_steps = max(1, int(settings.textual_inversion.train_fraction * settings.max_steps))

    def compute_loss(modules, step: int, generator: torch.Generator) -> LossTerms:
        group = pick_group(instance, generator)
        views = instance.groups[group]
        picked = torch.randint(len(views.latents), (batch,), generator=generator)
        latents, extras = recipe.sample(instance, picked, generator, group)
        prompts = captions.draw(views, picked, generator)
        if classes is not None:
            class_group = classes.group_of(views.size)
            drawn = torch.randint(len(classes.groups[class_group].latents), (batch,), generator=generator)
            class_latents, class_extras = recipe.sample(classes, drawn, generator, class_group)
            latents = torch.cat([latents, class_latents])
            # "mask" stays the subject examples' own: class images train on every pixel
            extras = {name: torch.cat([rows, class_extras[name]]) if name in class_extras else rows for name, rows in extras.items()}
            prompts += [job.class_prompt] * batch
        if cached is not None:
            conditioning = recipe.conditioning_rows(cached, [prompt_rows[prompt] for prompt in prompts])
        else:
            with torch.set_grad_enabled(step <= embedding_steps):
                conditioning = recipe.encode_prompts(modules, prompts)
        return recipe.loss(modules, latents.to(recipe.device), extras, conditioning, batch, generator)

    trains_denoiser = settings.method != "textual_inversion"
    modules = {**({recipe.denoiser: denoiser} if trains_denoiser else {}), **{name: getattr(pipeline, name) for name in training_encoders}}
    text_rate = settings.textual_inversion.learning_rate if learned else settings.text_encoder_learning_rate or settings.learning_rate
    if settings.optimizer == "prodigy":  # it finds each part's step size; learning_rate scales them all
        text_rate = settings.learning_rate
    learning_rates = {name: settings.learning_rate if name == recipe.denoiser else text_rate for name in modules}
    # The modules that carry adapters: with pivotal tuning the text encoders only learn the token.
    adapters = {name: module for name, module in modules.items() if name == recipe.denoiser or not learned} if settings.trains_adapter else {}

    def after_step(step: int) -> None:
        if step in job.snapshot_steps:
            write_snapshot(pipeline, job.checkpoints, step, metadata or {}, adapters, learned.tensors() if learned else {})
        if on_step:
            on_step(step)

    result = train(modules, learning_rates, compute_loss, settings, job.checkpoints, on_log, job.description,
                   after_step if job.snapshot_steps or on_step else None, job.owner, averaged_steps=job.snapshot_steps)
    result.adapters = {name: result.modules[name] for name in adapters}
    result.prompts = dict(captions.counts)
    if learned:
        result.embedding = learned.finish(pipeline)
    return result


def _set_up_method(job: FineTuneJob) -> tuple[tuple[str, ...], Optional[LearnedToken]]:
    """Freeze what training.method leaves alone, attach its adapters or add its learned token;
    returns the text encoders that train and the learned token (None without one)."""
    recipe, settings = job.recipe, job.recipe.settings
    pipeline = recipe.pipeline
    training_encoders = recipe.trainable_text_encoders if settings.train_text_encoder else ()
    for name in recipe.text_encoders:
        getattr(pipeline, name).requires_grad_(name in training_encoders and settings.method == "full")
    denoiser = getattr(pipeline, recipe.denoiser)
    if settings.trains_adapter:
        add_lora_adapters(denoiser, [getattr(pipeline, name) for name in training_encoders], settings)
    elif settings.method == "textual_inversion":
        freeze(denoiser, settings)
    if not settings.learns_embedding:
        return training_encoders, None
    inversion = settings.textual_inversion
    learned = LearnedToken.add(pipeline, recipe.embedding_encoders, job.identifier, inversion.initializer or job.initializer,
                               inversion.num_vectors)
    return tuple(learned.rows), learned


def train_and_save(
    job: FineTuneJob, output_dir: Path, metadata: dict, on_log: Optional[OnLog] = None,
    on_step: Optional[OnStep] = None, release: bool = True,
) -> FineTuneResult:
    """Train, put the trained modules into the pipeline and save it. `release=False` keeps the
    checkpoint folder's marker until the caller has recorded the model (see saving.py)."""
    settings = job.recipe.settings
    result = run_fine_tune(job, on_log, on_step, metadata)
    for name, module in result.modules.items():
        setattr(job.recipe.pipeline, name, module)
    images_per_step = settings.batch_size * settings.gradient_accumulation_steps * (2 if job.class_images else 1)
    saved = save_trained_pipeline(
        job.recipe.pipeline, result, output_dir, metadata, job.checkpoints, settings.keep_checkpoints, images_per_step, job.owner,
    )
    if release and process_state().is_main_process:
        release_checkpoints(saved, settings.keep_checkpoints)
    return saved


@dataclass(frozen=True)
class SubjectTraining:
    """What both fine-tunes (the base model, the upscaler) train on: the subject's photos captioned
    `a [V] noun`, the class images captioned `a noun` (none without prior preservation), and the
    checkpoint folder their fingerprint names, so a re-run with the same inputs resumes."""

    settings: TrainingSettings  # this process's share of the batch
    instance_images: list[Path]
    class_images: list[Path]
    instance_prompt: str
    class_prompt: str
    fingerprint: str
    checkpoints: Path
    identifier: str = ""
    initializer: str = ""  # what a learned embedding starts from: the class noun
    snapshot_steps: tuple[int, ...] = ()  # steps whose model is kept aside (evaluation.select)

    def train(
        self, make_recipe: Callable[[TrainingSettings, torch.device], Recipe], output_dir: Path, describe: Callable[[Recipe], dict],
        on_log: Optional[OnLog] = None, on_step: Optional[Callable[[Recipe], OnStep]] = None, release: bool = True,
        description: str = "fine-tune", owner: str = "",
    ) -> FineTuneResult:
        """Train and save, or return the model an earlier attempt saved here; one run at a time per folder.
        `describe(recipe)`: what the saved folder records (dreambooth.json); `on_step(recipe)`: a per-step
        hook for the loaded recipe; `owner`: the tracking run training."""
        with claim_checkpoints(self.checkpoints):
            reused = saved_result(self.checkpoints, output_dir)
            if reused is not None:
                return reused
            recipe = make_recipe(self.settings, process_state().device)
            job = FineTuneJob(recipe, self.instance_images, self.class_images, self.instance_prompt, self.class_prompt,
                              self.checkpoints, description, owner, self.identifier, self.initializer, self.snapshot_steps)
            return train_and_save(job, output_dir, describe(recipe), on_log, on_step(recipe) if on_step else None, release)


def subject_training(
    instance_dir: Path, class_dir: Optional[Path], identifier: str, config: RunConfig, training: TrainingSettings,
    prior_preservation: bool, prior_setting: str, fingerprint_settings: list, snapshot_steps: list[int] = (),
) -> SubjectTraining:
    """The subject's photos and class images, checked; `prior_setting` names the setting that asked
    for prior preservation, in the refusal when there are no class images; the model of each of
    `snapshot_steps` is kept aside (evaluation.select)."""
    settings = split_batch(training, process_state().num_processes)
    instance_images = list_images(instance_dir)
    if not instance_images:
        raise InputError(f"{instance_dir}: no subject images (run the ingest stage first)")
    use_prior = prior_preservation and settings.prior_loss_weight > 0
    class_images = class_images_for(config, class_dir) if use_prior and class_dir else []
    if use_prior and not class_images:  # never train without the prior that was asked for
        raise InputError(f"{class_dir}: no class images for prior preservation ({prior_setting} is true)")
    subject = config.subject
    fingerprint = training_fingerprint([*fingerprint_settings, subject.class_noun, identifier], instance_images, class_images)
    return SubjectTraining(settings, instance_images, class_images, subject.instance_prompt(identifier), subject.class_prompt(),
                           fingerprint, Path(config.storage.work_dir) / "checkpoints" / fingerprint, identifier, subject.class_noun,
                           tuple(snapshot_steps))
