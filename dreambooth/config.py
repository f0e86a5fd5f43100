"""Typed run configuration, validated when it is loaded.

A config is a YAML file, one shipped in the package (`dreambooth/configs/`, by name: sd15,
tiny, gke-sd15 ...) or any path, plus the few per-run values a user passes on the command
line (subject, class noun, ...). The resolved config travels to every pipeline task as one
JSON string, so a task on a cluster sees exactly what the local run saw.
"""

from __future__ import annotations

import datetime
import json
import re
from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from dreambooth.config_files import describe_problems, merge_settings, problem_lines, read_config, resolve_config_path
from dreambooth.errors import InputError
from dreambooth.stages import COMPONENT_STAGES

# The MLflow Service of manifests/ as pipeline pods reach it, in the namespace the overlay deploys to.
IN_CLUSTER_MLFLOW = "http://mlflow.{namespace}.svc.cluster.local:5000"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelSettings(Section):
    """The base text-to-image model that is personalised."""

    # A hub id, a local folder in the diffusers layout, or `tiny://NAME` for an
    # offline random model built by dreambooth.models.tiny.
    base: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    # A hub revision (branch, tag or commit) of model.base; None: the default branch.
    revision: Optional[str] = None
    # sd (1.x/2.x), sdxl, sd3 (3.x), flux (FLUX.1), flux2 (FLUX.2 [dev]), flux2-klein (FLUX.2 [klein]),
    # z-image or qwen-image; None: read from the model's model_index.json. Picks the training recipe.
    family: Optional[Literal["sd", "sdxl", "sd3", "flux", "flux2", "flux2-klein", "z-image", "qwen-image"]] = None
    # A VAE (hub id or folder) instead of the model's own, e.g. madebyollin/sdxl-vae-fp16-fix for SDXL in fp16.
    vae: Optional[str] = None
    # None: the model's native size (UNet sample size x VAE scale factor, 512 for SD 1.x).
    resolution: Optional[int] = Field(default=None, gt=0)
    # The frozen denoiser loaded quantized while adapters train on it in full precision (LoRA, pivotal,
    # textual_inversion): int8 (torchao's weight-only int8, also on CPUs), nf4 (bitsandbytes' 4-bit) or
    # fp8 (torchao's float8 weight-only), both CUDA only. What is saved loads on the unquantized base.
    quantization: Literal["none", "int8", "nf4", "fp8"] = "none"
    # Load the text encoders quantized the same way (they stay frozen and encode each prompt once): for
    # the language-model encoders of flux2, flux2-klein and z-image, most of what loading them costs.
    quantize_text_encoders: bool = False
    # A reference-image pipeline (FLUX.2 [klein] or [dev], FLUX.1 Kontext, Qwen-Image-Edit): hub id, folder
    # or tiny://. It draws the subject from its photos with no training: training.method reference makes
    # it the subject's model (the zero-shot baseline), evaluation.gate.against reference scores it beside
    # the fine-tuned model.
    reference: Optional[str] = None
    # The subject photos it is given with every prompt (a pipeline that takes one image gets the first).
    reference_images: int = Field(default=3, ge=1)
    # Only safetensors weights load: pickle files (.bin, .pt) can run code when loaded. True lets
    # them load, for every model of the run (base, VAE, upscaler, evaluation encoders); tagged on each stage run.
    allow_pickle: bool = False


class Consent(Section):
    """Who agreed to the subject's photos being trained on, and when (the paper's ethics section asks for it
    with photos of people). Recorded on the subject's run."""

    # The person who gave consent (or their guardian): a name, or the id your consent records use.
    given_by: str = Field(min_length=1)
    # When consent was given (YYYY-MM-DD); a date still to come is refused.
    given_on: datetime.date
    # Where the signed form or record is kept (optional).
    record: str = ""

    @field_validator("given_on")
    @classmethod
    def _not_ahead(cls, value: datetime.date) -> datetime.date:
        if value > datetime.date.today():
            raise ValueError(f"{value} is a date still to come")
        return value

    def describe(self) -> str:
        return f"given by {self.given_by} on {self.given_on}" + (f" (record: {self.record})" if self.record else "")


class SubjectSettings(Section):
    """The subject: its class noun, its identifier [V], its captions and what its photos must be."""

    # A label for runs and tags; `dreambooth run` defaults it to the subject folder's name.
    name: str = "subject"
    # What the subject is (dog, backpack): `a [V] <class noun>`; usually given per subject.
    class_noun: str = ""
    # None: pick a rare token of the model's own tokenizer (dreambooth.ingest.identifiers).
    identifier: Optional[str] = None
    # Token ids [low, high) the rare identifier is drawn from (the paper's rare-token range for CLIP).
    identifier_token_range: tuple[int, int] = (5000, 10000)
    # How many rare tokens make up [V].
    identifier_num_tokens: int = Field(default=1, ge=1, le=3)
    # Seeds the choice of the identifier, so a re-run picks the same one.
    identifier_seed: int = 0
    # The subject photos' caption (the instance prompt).
    prompt_template: str = "a {identifier} {class_noun}"
    # The class images' caption (the class prompt of prior preservation).
    class_prompt_template: str = "a {class_noun}"
    # Photos whose shorter side is smaller are refused.
    min_image_size: int = Field(default=256, gt=0)
    # More photos than this are refused (3-5 is the paper's number).
    max_images: int = Field(default=20, ge=1)
    # Fewer photos than this train, with a warning.
    recommended_min_images: int = Field(default=3, ge=1)
    # Larger images are refused as decompression bombs.
    max_image_pixels: int = Field(default=89_478_485, gt=0)
    # Train on the first N photos only, in file-name order (the paper's number-of-photos ablation); None: all.
    photos_limit: Optional[int] = Field(default=None, ge=1)
    # false: the subject's captions and prompts leave the class noun out (`a [V]`, the paper's no-class
    # ablation); the class noun still names the class images and picks the evaluation's prompt set.
    class_noun_in_prompts: bool = True
    # A caption per photo file name, templated like prompt_template (e.g. "a photo of {identifier}
    # {class_noun} on a sofa"); a sidecar NAME.txt beside the photo does the same. Others: prompt_template.
    captions: dict[str, str] = {}
    # person: each photo must show exactly one face (OpenCV's Haar cascade), and is cropped around it
    # (keeping the photo's shape); the face box is the subject's mask (training.mask_weight).
    kind: Literal["object", "person"] = "object"
    # With kind person: the crop's shorter side as a multiple of the face box's side (head and shoulders).
    face_crop_scale: float = Field(default=2.5, ge=1)
    # Who agreed to these photos being trained on, and when: {given_by, given_on, record}. Required with
    # kind person, and for every subject with batch.require_consent; a subject without it is refused.
    consent: Optional[Consent] = None

    def identifier_phrase(self, identifier: str) -> str:
        """What every caption of the subject must contain: `[V] noun` (`[V]` without the class noun)."""
        return self.render("{identifier} {class_noun}", identifier)

    def render(self, template: str, identifier: str = "") -> str:
        """A prompt template with this subject's identifier and class noun (none, without
        class_noun_in_prompts), spaces tidied."""
        noun = self.class_noun if self.class_noun_in_prompts else ""
        return " ".join(template.format(identifier=identifier, class_noun=noun).split())

    def instance_prompt(self, identifier: str) -> str:
        return self.render(self.prompt_template, identifier)

    def class_prompt(self) -> str:
        return self.class_prompt_template.format(class_noun=self.class_noun)

    @field_validator("class_noun")
    @classmethod
    def _strip(cls, value: str) -> str:
        return value.strip()

    @field_validator("identifier_token_range")
    @classmethod
    def _ordered(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] < value[1]:
            raise ValueError("must be [low, high) with 0 <= low < high")
        return value


class IngestSettings(Section):
    """What ingest adds to the photos."""

    # An image-to-text model (a hub id such as Salesforce/blip-image-captioning-large, a folder, or
    # tiny://captioner) that drafts a caption for each photo without one; the drafts are written beside
    # the photos as NAME.txt, so people correct them and the next run trains on theirs. None: no drafts.
    captioner: Optional[str] = None
    # The most tokens a drafted caption has.
    captioner_max_tokens: int = Field(default=30, ge=1)


class DataSettings(Section):
    """How photos become training views."""

    # Aspect-ratio buckets: each photo trains at the bucket (about resolution squared in area, sides
    # multiples of the model's latent step) nearest its aspect ratio, cropped by the least amount; a
    # batch never mixes buckets. None: on for every family but sd (SD 1.x/2.x trained on squares) and
    # the upscaler.
    buckets: Optional[bool] = None
    # The most elongated bucket, as long side over short side.
    max_aspect_ratio: float = Field(default=2.0, ge=1)

    def buckets_for(self, family: str) -> bool:
        return self.buckets if self.buckets is not None else family not in ("sd", "sd-upscaler")


class SamplerSettings(Section):
    """How a model draws images."""

    # A diffusers scheduler class name, configured from the model's own scheduler.
    scheduler: str = "DPMSolverMultistepScheduler"
    # auto: float16 on CUDA, bfloat16 on CPUs with native bf16 (AMX / AVX512-BF16), float32 otherwise.
    precision: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Denoising steps per image.
    num_inference_steps: int = Field(default=25, ge=1)
    # Classifier-free guidance.
    guidance_scale: float = Field(default=7.5, ge=0)
    # Images drawn at once.
    batch_size: int = Field(default=4, ge=1)
    # Image i is drawn from seed + i, so a set can be regenerated image by image.
    seed: int = 0
    # What guidance steers away from; empty: none.
    negative_prompt: str = ""


class PriorSettings(Section):
    """Class-specific prior preservation: the class images the frozen model draws (paper sec. 4.2)."""

    # Class-specific prior preservation (paper sec. 4.2); false trains on the subject photos alone.
    enabled: bool = True
    # Class images per class (the paper: about 200 for 1000 steps).
    num_class_images: int = Field(default=200, ge=1)
    # A folder (or gs:// prefix) of user-supplied class images: used instead of generating.
    class_images: Optional[str] = None
    # How the frozen base model draws the class images.
    sampler: SamplerSettings = SamplerSettings()
    # Generating processes, one per GPU, each drawing every N-th image. None: every visible GPU.
    num_processes: Optional[int] = Field(default=None, ge=1)


class LoraSettings(Section):
    """A low-rank adapter (peft) on the denoiser's attention projections instead of full weights."""

    # The adapters' rank: larger learns more, in more megabytes.
    rank: int = Field(default=4, ge=1)
    alpha: Optional[float] = Field(default=None, gt=0)  # None: the rank (scale 1)
    # Dropout on the adapters' input while training.
    dropout: float = Field(default=0.0, ge=0, lt=1)
    # The denoiser's modules that get an adapter (peft names).
    target_modules: list[str] = ["to_k", "to_q", "to_v", "to_out.0"]
    use_dora: bool = False  # weight-decomposed LoRA (DoRA)
    # With training.train_text_encoder: the text encoder's attention projections get an adapter too.
    text_encoder_target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "out_proj"]
    # Also write the adapter as one file in the kohya layout that AUTOMATIC1111, ComfyUI and
    # InvokeAI load (models.SINGLE_FILE_LORA), beside the diffusers file.
    export_single_file: bool = False


class TextualInversionSettings(Section):
    """The new token's embedding, with method textual_inversion or pivotal (Gal et al. 2022; the paper's baseline)."""

    # Vectors the new token stands for (per text encoder): more capture more detail, and take
    # that many places of the prompt's 77 tokens.
    num_vectors: int = Field(default=1, ge=1, le=16)
    # The word(s) whose embedding every vector starts from; None: the subject's class noun.
    initializer: Optional[str] = None
    # The embedding's learning rate (diffusers' textual_inversion example: 5e-4).
    learning_rate: float = Field(default=5e-4, gt=0)
    # pivotal: the share of training.max_steps the embedding trains with the adapter before it
    # freezes and the adapter trains on alone (diffusers' advanced SDXL script: 0.5).
    train_fraction: float = Field(default=0.5, gt=0, le=1)


class ProdigySettings(Section):
    """The Prodigy optimizer's own settings (training.optimizer: prodigy)."""

    # Its first estimate of the step size, from which it grows; short runs (a few hundred steps) may start higher.
    d0: float = Field(default=1e-6, gt=0)
    # A multiplier of the estimate (kohya's and ai-toolkit's d_coef): below 1 for gentler steps.
    d_coef: float = Field(default=1.0, gt=0)
    # Its authors' advice for diffusion fine-tunes: bias correction and the warm-up safeguard on.
    use_bias_correction: bool = True
    safeguard_warmup: bool = True  # Slows the estimate's growth while the learning rate warms up.


class EmaSettings(Section):
    """An exponential moving average of the trained weights, saved and evaluated instead of them."""

    # The average's decay per step (it warms up as (1 + n) / (10 + n) below this, n steps into it).
    decay: float = Field(default=0.999, gt=0, lt=1)
    # The step the average starts from (the weights at that step).
    start_step: int = Field(default=0, ge=0)


class TrainingSettings(Section):
    """The DreamBooth fine-tune: what trains, for how long, and how."""

    # full: every denoiser weight (the paper); lora: a low-rank adapter, megabytes per subject;
    # textual_inversion: only a new token's embedding, kilobytes (the paper's baseline);
    # pivotal: that embedding and a LoRA adapter together (the embedding freezes part way);
    # reference: nothing trains, model.reference draws the subject from its photos (the zero-shot baseline).
    method: Literal["full", "lora", "textual_inversion", "pivotal", "reference"] = "full"
    # The adapter, with method lora or pivotal.
    lora: LoraSettings = LoraSettings()
    # The new token's embedding, with method textual_inversion or pivotal.
    textual_inversion: TextualInversionSettings = TextualInversionSettings()
    # Optimizer steps (the paper: about 1000 for Stable Diffusion).
    max_steps: int = Field(default=1000, ge=1)
    # The denoiser's learning rate (the paper: 5e-6 for full fine-tuning; LoRA takes about 1e-4).
    learning_rate: float = Field(default=5e-6, gt=0)
    # How the learning rate changes over the steps (diffusers' schedulers).
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = "constant"
    # Steps over which the learning rate rises from 0 (must be fewer than max_steps).
    lr_warmup_steps: int = Field(default=0, ge=0)
    # λ: the class images' loss weight (the paper: 1); 0 trains without prior preservation.
    prior_loss_weight: float = Field(default=1.0, ge=0)
    # Min-SNR-gamma loss weighting (5 is the paper's value); None: unweighted, as DreamBooth.
    snr_gamma: Optional[float] = Field(default=None, gt=0)
    noise_offset: float = Field(default=0.0, ge=0)  # e.g. 0.05: learns overall brightness too
    # FLUX.1 [dev] and FLUX.2 [dev] (guidance-distilled): the value their guidance embedding gets while
    # training (diffusers' examples use 3.5).
    guidance_scale: float = Field(default=3.5, ge=0)
    # Also fine-tune the text encoder(s) the family trains (CLIP; never T5).
    train_text_encoder: bool = False
    # None: learning_rate.
    text_encoder_learning_rate: Optional[float] = Field(default=None, gt=0)
    # Subject photos per step (as many class images are added with prior preservation).
    batch_size: int = Field(default=1, ge=1)
    # Micro-batches per optimizer step.
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    # accelerate's mixed precision; the trained weights stay float32.
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    # Recompute activations in the backward pass: less memory, about a third slower.
    gradient_checkpointing: bool = False
    # auto: bitsandbytes' 8-bit AdamW when it and CUDA are present, torch AdamW otherwise. prodigy:
    # the Prodigy optimizer, which finds its own step size (learning_rate ~1.0 is a multiplier; every
    # trained part, the text encoder and a learned embedding too, gets learning_rate).
    optimizer: Literal["auto", "adamw", "adamw_8bit", "prodigy"] = "auto"
    # With optimizer prodigy: its settings.
    prodigy: ProdigySettings = ProdigySettings()
    # AdamW's first-moment decay (AdamW's settings are diffusers' DreamBooth example's).
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999  # AdamW's second-moment decay
    adam_weight_decay: float = 1e-2  # AdamW's decoupled weight decay
    adam_epsilon: float = 1e-8  # AdamW's epsilon
    # Gradients are clipped to this norm.
    max_grad_norm: float = Field(default=1.0, gt=0)
    # Mirror each photo half the time.
    random_flip: bool = True
    # Crop each photo's centre to the training square (or bucket); false: its top-left corner.
    center_crop: bool = True
    # The share of subject examples captioned with the bare instance prompt instead of their own caption.
    caption_dropout: float = Field(default=0.0, ge=0, le=1)
    # The loss weight outside the subject's mask (a NAME.mask.png, or a person's face box); 1: no masking.
    mask_weight: float = Field(default=1.0, ge=0, le=1)
    # An exponential moving average of the trained weights (full, LoRA or embedding); None: the raw weights.
    ema: Optional[EmaSettings] = None
    # Steps between checkpoints; a re-run or a retried task resumes from the newest.
    checkpoint_every: int = Field(default=500, ge=1)
    # Checkpoints kept; older ones are deleted.
    checkpoints_total_limit: int = Field(default=2, ge=1)
    # Checkpoints exist to survive a kill; once the model is saved they are deleted unless kept.
    keep_checkpoints: bool = False
    # Seeds each step's noise and picks from (seed, step, micro-batch): a resumed run matches an unbroken one.
    seed: int = 0
    # Steps between loss points in MLflow.
    log_every: int = Field(default=1, ge=1)
    # Base fine-tune only: every N steps, images of a fixed prompt and seeds from the model being
    # trained, logged to MLflow at their step (the subject appearing). None: no validation images.
    validation_every: Optional[int] = Field(default=None, ge=1)
    # The prompt of the validation images.
    validation_prompt: str = "a {identifier} {class_noun} on the beach"
    # Validation images per validation step.
    validation_images: int = Field(default=2, ge=1)
    # Denoising steps of each validation image.
    validation_inference_steps: int = Field(default=25, ge=1)
    # Processes (one per GPU). None: every visible GPU. The effective batch stays
    # batch_size x gradient_accumulation_steps whatever the count.
    num_processes: Optional[int] = Field(default=None, ge=1)

    @field_validator("train_text_encoder")
    @classmethod
    def _method_fits(cls, train_text_encoder: bool, info: ValidationInfo) -> bool:
        method = info.data.get("method")
        if train_text_encoder and method in ("textual_inversion", "pivotal"):
            raise ValueError(f"{method} trains the new token's embedding, not the text encoder; set it false")
        return train_text_encoder

    @model_validator(mode="after")
    def _prodigy_settings(self) -> "TrainingSettings":
        # Prodigy estimates the step size itself; a learning rate meant for AdamW would shrink it a million-fold.
        if self.optimizer == "prodigy" and not 0.1 <= self.learning_rate <= 10:
            raise ValueError(f"learning_rate: {self.learning_rate} with optimizer prodigy, which takes it as a multiplier "
                             "of the step size it finds; use about 1.0")
        if self.optimizer == "prodigy" and self.text_encoder_learning_rate not in (None, self.learning_rate):
            raise ValueError("text_encoder_learning_rate: prodigy trains every part at learning_rate; leave it unset")
        return self

    @property
    def learns_embedding(self) -> bool:
        """Whether a new token's embedding trains (textual_inversion, pivotal)."""
        return self.method in ("textual_inversion", "pivotal")

    @property
    def trains_adapter(self) -> bool:
        """Whether LoRA adapters train (lora, pivotal)."""
        return self.method in ("lora", "pivotal")


class SuperResSettings(Section):
    """Personalised super-resolution (paper sec. 4.2): the x4 upscaler fine-tuned on the subject.

    Low noise augmentation of the low-resolution condition keeps the subject's fine detail; the
    generic upscaler, trained with heavier augmentation, hallucinates texture instead.
    """

    # Run the super-resolution and evaluate-upscaled stages (batch-wide).
    enabled: bool = True
    # The x4 upscaler: a hub id, a folder, or tiny://sd-upscaler.
    base: str = "stabilityai/stable-diffusion-x4-upscaler"
    resolution: int = Field(default=512, gt=0)  # the high-resolution target; the condition is 4x smaller
    # Noise levels (low-res scheduler timesteps) drawn per example when training; the upscaler's default is 20.
    train_noise_levels: tuple[int, int] = (0, 8)
    # The noise level the personalised upscaler draws at (within train_noise_levels).
    inference_noise_level: int = Field(default=5, ge=0)
    # Train the upscaler on the class images too (with priors.enabled).
    prior_preservation: bool = True
    # The upscaler's fine-tune: the same settings as `training` (full only, no validation images).
    training: TrainingSettings = TrainingSettings(max_steps=500, learning_rate=5e-6)
    # How the upscalers draw the comparison and the evaluation's images.
    sampler: SamplerSettings = SamplerSettings(scheduler="DDIMScheduler", num_inference_steps=30, guidance_scale=7.5, batch_size=4)

    @field_validator("training")
    @classmethod
    def _full_only(cls, training: TrainingSettings) -> TrainingSettings:
        if training.method != "full":
            raise ValueError("method: the upscaler is fine-tuned in full (the other methods cover the base model)")
        if training.validation_every is not None:
            raise ValueError("validation_every: validation images are drawn by the base fine-tune only")
        return training

    @field_validator("train_noise_levels")
    @classmethod
    def _ordered_levels(cls, value: tuple[int, int]) -> tuple[int, int]:
        if not 0 <= value[0] <= value[1]:
            raise ValueError("must be [low, high] with 0 <= low <= high")
        return value


class SampleSettings(Section):
    """The sample grid drawn after the fine-tune."""

    # The sample prompts, each with {identifier} (and usually {class_noun}).
    prompts: list[str] = [
        "a {identifier} {class_noun} on the beach",
        "a {identifier} {class_noun} in the snow",
        "a {identifier} {class_noun} in the jungle",
    ]
    # Images per prompt and model.
    images_per_prompt: int = Field(default=2, ge=1)
    # How the samples are drawn.
    sampler: SamplerSettings = SamplerSettings(num_inference_steps=30, seed=1234)
    # Also draw the base model with the same seeds, beside the fine-tuned one in the grid.
    compare_with_base: bool = True

    @field_validator("prompts")
    @classmethod
    def _need_identifier(cls, prompts: list[str]) -> list[str]:
        if not prompts:
            raise ValueError("needs at least one prompt")
        for prompt in prompts:
            if "{identifier}" not in prompt:
                raise ValueError(f"prompt {prompt!r} has no {{identifier}} placeholder")
        return prompts


class GateSettings(Section):
    """A model is registered as a candidate only when all of these hold (paper's SD figures: DINO 0.668, CLIP-T 0.305)."""

    # Subject fidelity: the mean DINO similarity to the subject photos must reach this.
    min_dino: float = 0.5
    # Prompt fidelity: the mean CLIP-T must reach this.
    min_clip_t: float = 0.25
    # PRES is lower-is-better: above this, the class has collapsed onto the subject.
    max_pres: float = 0.75
    # thresholds: the three figures above decide. champion: the candidate must also be no worse than
    # the subject's champion (its registered model's `champion` alias) scored on the same protocol.
    # reference: it must also beat the zero-shot baseline (model.reference given the subject's photos),
    # scored beside it on the same prompts and seeds, on DINO by reference_margin.
    against: Literal["thresholds", "champion", "reference"] = "thresholds"
    # With against: reference, how much higher than the baseline's DINO a candidate's must be
    # (fine-tuning has to buy this much subject fidelity to be worth its GPU time).
    reference_margin: float = 0.0
    # With against: champion, how far below the champion's DINO a candidate may be,
    dino_margin: float = Field(default=0.0, ge=0)
    clip_t_margin: float = Field(default=0.0, ge=0)  # below its CLIP-T,
    pres_margin: float = Field(default=0.0, ge=0)  # and above its PRES.


class SelectSettings(Section):
    """Choosing the training step to keep before the subject takes over every prompt: the model is
    scored quickly at the named steps (same prompts and seeds each time) and a rule picks one; the
    full evaluation, the gate and the registry then use that step's model."""

    # The steps scored (the last step always is); e.g. [200, 400, 600, 800] of 1000.
    steps: list[int] = []
    # Or every N steps (N, 2N, ... and the last).
    every: Optional[int] = Field(default=None, ge=1)
    # The quick evaluation: the first N DreamBench prompts of each category,
    prompts_per_category: int = Field(default=2, ge=1)
    images_per_prompt: int = Field(default=2, ge=2)  # images of each (DIV needs two),
    pres_images: int = Field(default=4, ge=1)  # and class-prompt images for PRES.
    # The rule: the best DINO among the steps whose CLIP-T is within this margin of the best CLIP-T,
    clip_t_margin: float = Field(default=0.01, ge=0)
    # and, when set, whose PRES is at most this (none: the lowest PRES among them).
    max_pres: Optional[float] = Field(default=None, ge=0, le=1)

    def scored_steps(self, max_steps: int) -> list[int]:
        named = set(self.steps) | (set(range(self.every, max_steps, self.every)) if self.every else set())
        return sorted({step for step in named if step < max_steps} | {max_steps})

    @model_validator(mode="after")
    def _some_steps(self) -> "SelectSettings":
        if not self.steps and self.every is None:
            raise ValueError("name the steps to score: steps: [200, 400, ...] or every: 200")
        if any(step < 1 for step in self.steps):
            raise ValueError("steps: training steps count from 1")
        return self


class EvaluationSettings(Section):
    """The DreamBench evaluation (DINO, CLIP-I, CLIP-T, PRES, DIV), its quality gate and the registry."""

    # Run the evaluate stage (and evaluate-upscaled); false: nothing is scored or registered.
    enabled: bool = True
    # None: live (pets: accessorisation prompts) when the class noun is a DreamBench live class.
    live_subject: Optional[bool] = None
    prompt_file: Optional[str] = None  # a JSON list of {category, template}; default: the DreamBench set
    max_prompts_per_category: Optional[int] = Field(default=None, ge=1)  # the first N of each category (smoke runs)
    images_per_prompt: int = Field(default=4, ge=2)  # DIV needs at least two per prompt
    # Images of the class prompt per model for PRES (prior preservation).
    pres_images: int = Field(default=16, ge=1)
    # How the evaluation's images are drawn (the same seeds for every model).
    sampler: SamplerSettings = SamplerSettings(num_inference_steps=30, seed=2024, batch_size=8)
    # DINO ViT-S/16, as the paper, for DINO (subject fidelity).
    dino_model: str = "facebook/dino-vits16"
    # CLIP for CLIP-I (subject fidelity) and CLIP-T (prompt fidelity).
    clip_model: str = "openai/clip-vit-base-patch32"
    # lpips://alexnet-v0.1: torchvision's AlexNet + LPIPS v0.1 heads, fetched into the model cache on
    # first use (dreambooth.models.lpips); or a folder made by `python -m dreambooth.models.lpips`.
    lpips_model: str = "lpips://alexnet-v0.1"
    # Images per encoder batch.
    encoder_batch_size: int = Field(default=32, ge=1)
    num_processes: Optional[int] = Field(default=None, ge=1)  # generating processes; None: one per visible GPU
    # Choose the training step to keep by quick scores along the way; None: the last step's model.
    select: Optional[SelectSettings] = None
    # The quality gate before the registry.
    gate: GateSettings = GateSettings()
    # The registered model's name; {subject} is the subject's id.
    registered_model: str = "dreambooth-{subject}"
    # An output safety check before the registry: a StableDiffusionSafetyChecker (hub id such as
    # CompVis/stable-diffusion-safety-checker, folder or tiny://safety-checker) reads the evaluation's
    # images; a model with any image flagged is not registered, the reason on its run. None: no check.
    safety_checker: Optional[str] = None


class Webhook(Section):
    """Where to say that a batch ended: a URL given here, or (on a cluster, from a Kubernetes
    Secret) in an environment variable; Slack's incoming-webhook format or plain JSON."""

    # The webhook's URL (local runs; refused on a cluster, where it would be compiled in).
    url: str = ""
    # The environment variable that holds the URL (filled from a Secret by cluster.secrets).
    url_env: str = ""
    # slack: Slack's incoming-webhook text; json: the whole report.
    format: Literal["slack", "json"] = "json"

    @model_validator(mode="after")
    def _one_source(self) -> "Webhook":
        if bool(self.url) == bool(self.url_env):
            raise ValueError("give exactly one of url (the webhook) or url_env (the variable that holds it)")
        if self.url and not re.match(r"https?://", self.url):
            raise ValueError(f"url: {self.url!r} is not an http(s) URL")
        return self


class TrackingSettings(Section):
    """Where the runs are tracked (MLflow) and who is told when a batch ends."""

    # None: $MLFLOW_TRACKING_URI, else a local sqlite file (MLflow's embedded default).
    uri: Optional[str] = None
    # The MLflow experiment every run of the batch goes into.
    experiment: str = "dreambooth"
    # How long the tracking server may be away without failing a stage: every MLflow call of a pipeline
    # task waits up to this long for it to come back, and the fine-tune journals its step metrics on the
    # work disk meanwhile. Past it the stage fails; its retry (or `dreambooth sync-tracking`) recovers
    # what the journal kept.
    outage_tolerance: float = Field(default=600.0, ge=0)
    # How often each stage's run samples CPU, memory (and GPU with nvidia-ml-py); 0 switches it off.
    system_metrics_seconds: float = Field(default=10.0, ge=0)
    # Webhooks told when a batch ends (the exit handler); a failure to tell never fails the run.
    notify: list[Webhook] = []
    # Links in notifications: the MLflow UI as people reach it (default: the tracking URI when it
    # is http), and the KFP UI (e.g. https://kfp.example.com/pipeline).
    ui_url: str = ""
    kfp_ui_url: str = ""  # the KFP UI, for links in notifications


class StageResources(Section):
    """What one pipeline stage asks of the cluster."""

    # GPUs (cluster.gpu_type); a GPU stage also gets the node selector, toleration and /dev/shm.
    gpus: int = Field(default=0, ge=0)
    # CPU request (Kubernetes quantity).
    cpu: str = "2"
    # Memory request and limit (Kubernetes quantity).
    memory: str = "8G"
    # The task is stopped after this long.
    timeout_seconds: int = Field(default=3600, gt=0)
    # KFP retries of a failed task (an evicted or preempted pod, a tracking outage): every stage of a
    # cluster config retries, the cheap CPU ones too, since one lost pod otherwise fails the night.
    retries: int = Field(default=2, ge=0)
    # The first retry's wait, doubled for each later one.
    retry_backoff_seconds: int = Field(default=60, ge=0)


class SecretReference(Section):
    """A key of a Kubernetes Secret: the name travels in the YAML, never the value."""

    # The Secret's name.
    name: str
    # The key within it.
    key: str
    # The environment variable the task sees it as.
    env: str


class ScheduleSettings(Section):
    """How `dreambooth schedule`'s recurring runs behave."""

    # Start the runs missed while the schedule was paused or KFP was down, one per missed tick; off: the
    # next tick runs, once (a nightly batch trains whatever is new since the last run either way).
    catch_up: bool = False


class ClusterSettings(Section):
    """Kubernetes settings compiled into the pipeline (kfp-kubernetes); ignored by local runs."""

    # The component image, pinned by digest: a tag alone lets KFP serve stale cached steps.
    image: str
    # The Kubeflow profile namespace runs are submitted to, where manifests/ deployed MLflow, the
    # PVC, the secrets and the service account; the in-cluster tracking URI derives from it.
    namespace: Optional[str] = None
    pipeline_root: Optional[str] = None  # gs://... for task artifacts; None: the namespace's kfp-launcher default
    # The accelerator resource GPU stages ask for.
    gpu_type: str = "nvidia.com/gpu"
    # Node labels GPU stages need, e.g. cloud.google.com/gke-accelerator: nvidia-l4.
    node_selector: dict[str, str] = {}
    gpu_toleration_key: Optional[str] = "nvidia.com/gpu"  # tolerated (Exists, NoSchedule) by GPU stages
    # /dev/shm of GPU stages (data loaders and NCCL share memory through it).
    shm_size: str = "8Gi"
    model_cache_pvc: Optional[str] = None  # mounted at /cache (HF_HOME lives there in the image)
    # Secrets every task sees as environment variables.
    secrets: list[SecretReference] = []
    # The uid tasks run as (the image's user).
    run_as_user: int = 1000
    service_account: Optional[str] = None  # the Workload Identity KSA runs are submitted with
    # By stage name (dreambooth.stages: plan-batch, class-priors, fine-tune, super-resolution ...).
    stages: dict[str, StageResources] = {}
    # The GPUs this pipeline may hold at once (the node pool's, or the namespace's quota): the loops then
    # run as many class-prior groups and subjects side by side as fit at their peak GPU use, instead of
    # batch.parallelism. None: batch.parallelism.
    gpu_quota: Optional[int] = Field(default=None, ge=1)
    # The KFP API as pods reach it, where the launch of a sharded batch (batch.max_subjects_per_run)
    # creates its shards' runs: Kubeflow's in-cluster UI service (it checks the pod's pipelines token).
    kfp_host: str = "http://ml-pipeline-ui.kubeflow.svc.cluster.local"
    schedule: ScheduleSettings = ScheduleSettings()

    def loop_parallelism(self, superres: bool) -> tuple[int, int]:
        """(class-prior groups, subjects) at once within gpu_quota. A subject's peak: its fine-tune, or
        samples, evaluate and the upscaler's stage (super-resolution, then evaluate-upscaled) side by side."""
        gpus = {stage: self.resources(stage).gpus for stage in COMPONENT_STAGES}
        upscaling = max(gpus["super-resolution"], gpus["evaluate-upscaled"]) if superres else 0
        subject_peak = max(gpus["ingest"], gpus["fine-tune"], gpus["samples"] + gpus["evaluate"] + upscaling, 1)
        return max(1, self.gpu_quota // max(gpus["class-priors"], 1)), max(1, self.gpu_quota // subject_peak)

    @field_validator("pipeline_root")
    @classmethod
    def _a_supported_root(cls, value: Optional[str]) -> Optional[str]:
        return value if value is None else _supported_location(value)

    @field_validator("stages")
    @classmethod
    def _known_stages(cls, stages: dict) -> dict:
        unknown = sorted(set(stages) - set(COMPONENT_STAGES))
        if unknown:
            raise ValueError(f"{', '.join(unknown)}: not a stage of the pipeline; the stages are {', '.join(COMPONENT_STAGES)}")
        return stages

    @field_validator("image")
    @classmethod
    def _pinned(cls, image: str) -> str:
        if "@sha256:" not in image:
            raise ValueError(f"{image!r} is not pinned by digest (IMAGE@sha256:...)")
        return image

    def resources(self, stage: str) -> StageResources:
        return self.stages.get(stage, StageResources())


class BatchSettings(Section):
    """How a batch of subjects runs (dreambooth run --subjects, submit/schedule --subjects-uri)."""

    # Subjects trained at once, and class-prior groups generated at once (KFP ParallelFor parallelism).
    parallelism: int = Field(default=2, ge=1)
    # true: every subject must give `consent` (who agreed to its photos being trained on, and when), not only
    # subjects of kind person; one without it is refused and the others train.
    require_consent: bool = False
    # Refuse, before any task after the plan starts, a batch whose estimated cost (subjects to train x
    # the mean cost of the last trained subjects, in cost.currency) exceeds this; None: no limit.
    budget: Optional[float] = Field(default=None, gt=0)
    # Split a subjects file into pipeline runs (shards) of at most this many subjects to train, tied by one
    # batch run in MLflow: one Argo workflow's status grows with its tasks, and Argo refuses one past about
    # a megabyte. The plan reads the whole file; only subjects with work go into shards. None: one run.
    max_subjects_per_run: Optional[int] = Field(default=None, ge=1)


class CostSettings(Section):
    """What stages cost: each stage run records its accelerator-seconds and node type, and an estimate
    from this price table; a subject's run and the batch's sum them (dreambooth.tracking.cost)."""

    # Price per accelerator-hour by node type: the GPU's name as torch reports it, in lower case with
    # dashes (nvidia-l4, nvidia-a100-sxm4-80gb), or cpu for a stage on a machine without a GPU. A node
    # type not listed records its seconds but no estimate.
    prices: dict[str, float] = {}
    # The unit of prices, estimates and batch.budget.
    currency: str = "USD"


class StorageSettings(Section):
    """Where work that outlives a task is kept."""

    # Stable across runs: class-prior caches and training checkpoints live here so a
    # re-run or a retried task resumes instead of starting over.
    work_dir: str = "outputs/work"

    @field_validator("work_dir")
    @classmethod
    def _a_supported_location(cls, value: str) -> str:
        return _supported_location(value)


def _supported_location(value: str) -> str:
    from dreambooth.storage import unsupported_location

    if reason := unsupported_location(value):
        raise ValueError(reason)
    return value


# KFP run parameters of their own (the KFP UI shows and edits them), and the setting each sets.
RUN_SETTINGS = {
    "base_model": ("model", "base"),
    "training_method": ("training", "method"),
    "max_steps": ("training", "max_steps"),
    "learning_rate": ("training", "learning_rate"),
    "prior_loss_weight": ("training", "prior_loss_weight"),
    "num_class_images": ("priors", "num_class_images"),
    "resolution": ("model", "resolution"),
}


class RunConfig(Section):
    """A run's whole configuration: a shipped config or a file of yours, with the per-run values on top."""

    version: Literal[1] = 1  # config schema version; bumped when settings change meaning
    # The config's name (a shipped config: its file name).
    name: str = "custom"
    model: ModelSettings = ModelSettings()
    subject: SubjectSettings = SubjectSettings()
    ingest: IngestSettings = IngestSettings()
    data: DataSettings = DataSettings()
    priors: PriorSettings = PriorSettings()
    training: TrainingSettings = TrainingSettings()
    superres: SuperResSettings = SuperResSettings()
    samples: SampleSettings = SampleSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    tracking: TrackingSettings = TrackingSettings()
    storage: StorageSettings = StorageSettings()
    batch: BatchSettings = BatchSettings()
    cost: CostSettings = CostSettings()
    cluster: Optional[ClusterSettings] = None

    @model_validator(mode="before")
    @classmethod
    def _in_cluster_tracking(cls, raw):
        # One place says where MLflow runs on a cluster: cluster.namespace, the overlay's namespace.
        if isinstance(raw, dict) and isinstance(raw.get("cluster"), dict) and raw["cluster"].get("namespace"):
            tracking = raw.get("tracking") or {}
            if isinstance(tracking, dict) and not tracking.get("uri"):
                uri = IN_CLUSTER_MLFLOW.format(namespace=raw["cluster"]["namespace"])
                raw = {**raw, "tracking": {**tracking, "uri": uri}}
        return raw

    @model_validator(mode="after")
    def _consistent(self) -> "RunConfig":
        if self.model.quantization != "none" and self.training.method == "full":
            raise ValueError(f"model.quantization: {self.model.quantization} loads the denoiser frozen; train adapters on it "
                             "(training.method lora or pivotal), not every weight")
        if self.model.quantize_text_encoders and self.model.quantization == "none":
            raise ValueError("model.quantize_text_encoders: quantizes them as model.quantization says, which is none")
        if self.model.quantize_text_encoders and self.training.train_text_encoder:
            raise ValueError("model.quantize_text_encoders: a quantized text encoder stays frozen; "
                             "training.train_text_encoder would train it")
        if self.training.lr_warmup_steps >= self.training.max_steps and self.training.lr_warmup_steps:
            raise ValueError("training.lr_warmup_steps: must be smaller than training.max_steps")
        if self.training.method == "reference" and not self.model.reference:
            raise ValueError("training.method: reference draws with model.reference, a reference-image pipeline; set it")
        if self.evaluation.gate.against == "reference" and not self.model.reference:
            raise ValueError("evaluation.gate.against: reference scores model.reference beside the model; set it")
        if self.training.method == "reference" and self.evaluation.gate.against == "reference":
            raise ValueError("evaluation.gate.against: reference compares a trained model with the baseline; "
                             "this run's model is the baseline (training.method reference)")
        select = self.evaluation.select
        if select and self.training.method == "reference":
            raise ValueError("evaluation.select: chooses a training step; training.method reference trains nothing")
        if select and any(step > self.training.max_steps for step in select.steps):
            raise ValueError(f"evaluation.select.steps: past training.max_steps ({self.training.max_steps})")
        if select and not self.evaluation.enabled:
            raise ValueError("evaluation.select: scores checkpoints with the evaluation's encoders; evaluation.enabled is false")
        if self.cluster is not None:
            secret_envs = {secret.env for secret in self.cluster.secrets}
            for index, webhook in enumerate(self.tracking.notify):
                if webhook.url:
                    raise ValueError(f"tracking.notify.{index}.url: would be written into the compiled pipeline; give url_env "
                                     "and a cluster.secrets entry that fills it from a Kubernetes Secret")
                if webhook.url_env not in secret_envs:
                    raise ValueError(f"tracking.notify.{index}.url_env: no cluster.secrets entry sets {webhook.url_env}")
        namespace = self.cluster.namespace if self.cluster else None
        service = re.match(r"https?://mlflow\.([^.:/]+)\.svc", self.tracking.uri or "")
        if namespace and service and service.group(1) != namespace:
            raise ValueError(
                f"tracking.uri: {self.tracking.uri} is the MLflow of namespace {service.group(1)!r}, but "
                f"cluster.namespace is {namespace!r}; drop tracking.uri to derive it"
            )
        return self

    def to_json(self) -> str:
        return self.model_dump_json()

    def run_settings(self) -> dict:
        """The settings a KFP run takes as parameters of their own (RUN_SETTINGS), typed."""
        return {parameter: getattr(getattr(self, section), key) if key != "resolution" else (self.model.resolution or 0)
                for parameter, (section, key) in RUN_SETTINGS.items()}

    def with_run_settings(self, values: dict) -> "RunConfig":
        """These settings as a run's parameters gave them (resolution 0: the model's own); checked
        like the config file; a bad value ends in one line naming the parameter."""
        raw = self.model_dump()
        for parameter, value in values.items():
            section, key = RUN_SETTINGS[parameter]
            raw[section][key] = None if (parameter == "resolution" and not value) else value
        try:
            return RunConfig.model_validate(raw)
        except ValidationError as error:
            problem = error.errors()[0]
            where = ".".join(str(part) for part in problem["loc"])
            named = next((name for name, path in RUN_SETTINGS.items() if ".".join(path) == where), where)
            raise InputError(f"run parameter {named}: {problem['msg']}") from None

    @classmethod
    def from_json(cls, text: str) -> "RunConfig":
        return cls.model_validate_json(text)

    def result_settings(self) -> dict:
        """The settings that shape a subject's results: everything but where and how the run executes."""
        # Consent is a record about the photos, not a setting: adding it retrains nothing.
        return self.model_dump(exclude={"name": True, "tracking": True, "storage": True, "batch": True, "cluster": True, "cost": True,
                                        "subject": {"consent"}})

    def consent_refusal(self) -> str:
        """Why this subject may not train ("" when it may): consent is required and absent."""
        if self.subject.consent is not None:
            return ""
        if self.subject.kind == "person":
            why = "subject.kind is person"
        elif self.batch.require_consent:
            why = "batch.require_consent is set"
        else:
            return ""
        return (f"consent: missing ({why}): give the subject `consent: {{given_by: ..., given_on: YYYY-MM-DD}}`, "
                "who agreed to their photos being trained on and when")

    def flat_params(self) -> dict[str, str]:
        """Every setting as `section.key` -> string, for MLflow params."""
        flat: dict[str, str] = {}

        def walk(prefix: str, value) -> None:
            if isinstance(value, dict):
                for key, inner in value.items():
                    walk(f"{prefix}.{key}" if prefix else key, inner)
            else:
                flat[prefix] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)

        walk("", self.model_dump())
        return flat


def setting_problems(error: ValidationError) -> list[str]:
    """Each validation problem as `section.key: reason` (settings given without a file: overrides, run parameters)."""
    return [f"{'.'.join(str(part) for part in setting)}: {reason}" if setting else reason
            for setting, reason in problem_lines(error, RunConfig)]


def load_config(name_or_path: str, overrides: Optional[dict] = None) -> RunConfig:
    """Load a YAML config and apply nested overrides; raise InputError naming every bad setting with its file and line."""
    source = read_config(resolve_config_path(name_or_path))
    raw = dict(source.settings)
    raw.setdefault("name", source.path.stem)
    try:
        return RunConfig.model_validate(merge_settings(raw, overrides or {}))
    except ValidationError as error:
        raise InputError(describe_problems(error, RunConfig, source)) from None


def require_subject(config: RunConfig) -> None:
    if not config.subject.class_noun:
        raise InputError(
            "subject.class_noun: required (e.g. --class-noun dog); DreamBooth binds the identifier to a class"
        )
