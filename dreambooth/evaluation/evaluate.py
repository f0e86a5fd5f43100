"""Stage 5: score a personalised model by the DreamBench protocol.

For each prompt the fine-tuned model draws `images_per_prompt` images, image i of prompt p
from seed (seed + 1000 p + i). Subject fidelity compares them with the real photos (DINO,
CLIP-I), prompt fidelity with the prompt text (CLIP-T), diversity with each other (DIV);
prior preservation compares the plain class prompt's images with the real photos (PRES),
for the fine-tuned model and, as the reference point, the base model. The real photos are
embedded once and reused for every prompt.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from PIL import Image

from dreambooth.config import EvaluationSettings, GateSettings, RunConfig, SubjectSettings, SuperResSettings
from dreambooth.errors import InputError
from dreambooth.evaluation.encoders import ClipEncoder, DinoEncoder, LpipsDistance
from dreambooth.evaluation.metrics import (
    distinct_pairs,
    image_text_similarity,
    mean_distinct_pair_similarity,
    mean_pairwise_similarity,
)
from dreambooth.evaluation.prompts import EvaluationPrompt, is_live_subject, load_prompts, without_identifier
from dreambooth.models.loading import METADATA_FILE
from dreambooth.generation import OnImages, generate, generate_files, load_sampling_pipeline, planned_generators
from dreambooth.images import labelled_grid, list_images, load_rgb
from dreambooth.ingest.photos import photos_as_trained
from dreambooth.progress import OnProgress, counter
from dreambooth.baseline import base_of
from dreambooth.watermark import payload_for, save_marked

if TYPE_CHECKING:  # the registry reads the champion; evaluation only compares with it
    from dreambooth.tracking.registry import Champion

RESULTS_FILE = "evaluation.json"
PROMPT_SEED_STRIDE = 1000
PRES_SEED_OFFSET = 1_000_000
# The DreamBooth paper's Stable Diffusion row and its real-image upper bound (Table 1).
PAPER_STABLE_DIFFUSION = {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}
PAPER_REAL_IMAGES = {"dino": 0.774, "clip_i": 0.885}


@dataclass
class PromptScores:
    prompt: str
    category: str
    dino: float
    clip_i: float
    clip_t: float
    div: float
    image_files: list[str]


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]


@dataclass
class EvaluationResult:
    model: str
    identifier: str
    class_noun: str
    class_prompt: str
    live_subject: bool
    overall: dict[str, float]
    by_category: dict[str, dict[str, float]]
    prompts: list[PromptScores]
    real_images: dict[str, float]
    gate: GateDecision
    settings: dict
    throughput: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


@dataclass(frozen=True)
class EvaluationInputs:
    """What an evaluation reads of a run's settings, and no more: its protocol and gate (evaluation), the
    subject's prompts and the identifier and class noun a model without metadata falls back on (subject),
    the base model whose class images are PRES's reference, how the photos were cut for training, and how
    a cascade's upscaler samples (super-resolution)."""

    evaluation: EvaluationSettings
    subject: SubjectSettings
    base_model: str
    base_revision: Optional[str]
    base_vae: Optional[str]
    resolution: Optional[int]
    center_crop: bool
    upscaling: SuperResSettings

    @classmethod
    def of(cls, config: RunConfig) -> "EvaluationInputs":
        model = config.model
        return cls(config.evaluation, config.subject, model.base, model.revision, model.vae, model.resolution,
                   config.training.center_crop, config.superres)


@dataclass
class RealPhotos:
    """The subject's real photos and their embeddings, computed once per subject."""

    images: list[Image.Image]
    dino: torch.Tensor
    clip: torch.Tensor


def _model_identity(model: str, inputs: EvaluationInputs, identifier: Optional[str], class_noun: Optional[str]) -> tuple[str, str, str]:
    metadata_file = Path(model) / METADATA_FILE
    metadata = json.loads(metadata_file.read_text()) if metadata_file.is_file() else {}
    baseline = metadata.get("method") == "reference"  # the zero-shot baseline's prompts carry no identifier
    identifier = "" if baseline else identifier or metadata.get("identifier") or inputs.subject.identifier
    class_noun = class_noun or metadata.get("class_noun") or inputs.subject.class_noun
    if not (identifier or baseline) or not class_noun:
        raise InputError(
            f"{model}: no {METADATA_FILE} naming the identifier and class noun; pass --identifier and --class-noun"
        )
    return identifier, class_noun, metadata.get("base_model") or inputs.base_model


def _draw(model: str, revision: Optional[str], requests: list[tuple[str, int]], inputs: EvaluationInputs,
          vae: Optional[str] = None, on_images: Optional[OnImages] = None) -> list[Image.Image]:
    """Generate in this process, or split across one process per GPU when there are several."""
    sampler = inputs.evaluation.sampler
    processes = planned_generators(inputs.evaluation.num_processes, len(requests))
    if processes == 1:
        pipeline = load_sampling_pipeline(model, sampler, revision, vae)
        return generate(pipeline, requests, sampler, inputs.resolution, on_images)
    with tempfile.TemporaryDirectory() as scratch:
        names = [f"{i:06d}.png" for i in range(len(requests))]
        generate_files(model, revision, requests, names, Path(scratch), sampler, inputs.resolution, processes, vae, on_images)
        return [load_rgb(Path(scratch) / name, 1 << 40).image for name in names]


def upscale_images(upscaler: str, prompts: list[str], images: list[Image.Image], settings: SuperResSettings) -> list[Image.Image]:
    """The second stage of the cascade, at the configured inference noise level."""
    from dreambooth.models.loading import inference_dtype
    from dreambooth.super_resolution import load_upscaler, upscale

    pipeline = load_upscaler(upscaler, dtype=inference_dtype(settings.sampler.precision))
    return upscale(pipeline, prompts, images, settings.inference_noise_level, settings.sampler, settings.sampler.seed)


def limit_per_category(prompts: list[EvaluationPrompt], limit: Optional[int]) -> list[EvaluationPrompt]:
    if limit is None:
        return prompts
    taken: dict[str, int] = defaultdict(int)
    kept = []
    for prompt in prompts:
        if taken[prompt.category] < limit:
            taken[prompt.category] += 1
            kept.append(prompt)
    return kept


def gate_decision(overall: dict[str, float], gate: GateSettings) -> GateDecision:
    reasons = []
    if overall["dino"] < gate.min_dino:
        reasons.append(f"DINO {overall['dino']:.3f} < {gate.min_dino}")
    if overall["clip_t"] < gate.min_clip_t:
        reasons.append(f"CLIP-T {overall['clip_t']:.3f} < {gate.min_clip_t}")
    if overall["pres"] > gate.max_pres:
        reasons.append(f"PRES {overall['pres']:.3f} > {gate.max_pres}")
    return GateDecision(passed=not reasons, reasons=reasons)


def champion_decision(overall: dict[str, float], protocol: str, champion: Optional[Champion], gate) -> GateDecision:
    """evaluation.gate.against champion: no worse than the champion on DINO, CLIP-T and PRES, by the
    gate's margins, on the same protocol. The reasons say why either way (they go on the run)."""
    if champion is None:
        return GateDecision(True, ["no champion yet: the thresholds alone decide"])
    if champion.protocol != protocol:
        return GateDecision(False, [f"champion v{champion.version} was scored on another protocol; evaluate it on this "
                                    "one (or set evaluation.gate.against: thresholds)"])
    checks = [  # (label, candidate, champion's, margin, higher is better)
        ("DINO", overall["dino"], champion.overall["dino"], gate.dino_margin, True),
        ("CLIP-T", overall["clip_t"], champion.overall["clip_t"], gate.clip_t_margin, True),
        ("PRES", overall["pres"], champion.overall["pres"], gate.pres_margin, False),
    ]
    worse = []
    for label, value, theirs, margin, higher_better in checks:
        bound = theirs - margin if higher_better else theirs + margin
        if (value < bound) if higher_better else (value > bound):
            worse.append(f"{label} {value:.3f} {'<' if higher_better else '>'} champion v{champion.version}'s {theirs:.3f} "
                         f"{'-' if higher_better else '+'} {margin:g}")
    if worse:
        return GateDecision(False, worse)
    figures = ", ".join(f"{label} {value:.3f} vs {theirs:.3f}" for label, value, theirs, _, _ in checks)
    return GateDecision(True, [f"no worse than champion v{champion.version} ({figures})"])


def baseline_decision(overall: dict[str, float], baseline: dict[str, float], gate) -> GateDecision:
    """evaluation.gate.against reference: the model's DINO must beat the zero-shot baseline's (model.reference
    given the subject's photos, scored on the same protocol) by gate.reference_margin."""
    needed = baseline["dino"] + gate.reference_margin
    against = (f"the reference baseline's {baseline['dino']:.3f} + {gate.reference_margin:g} "
               f"(CLIP-I {overall['clip_i']:.3f} vs {baseline['clip_i']:.3f}, CLIP-T {overall['clip_t']:.3f} vs {baseline['clip_t']:.3f})")
    if overall["dino"] < needed:
        return GateDecision(False, [f"DINO {overall['dino']:.3f} < {against}: fine-tuning did not beat drawing from the photos"])
    return GateDecision(True, [f"beat the reference baseline: DINO {overall['dino']:.3f} >= {against}"])


def evaluate_baseline(subject_dir: Path, config: RunConfig, output_dir: Path, on_progress: Optional[OnProgress] = None) -> EvaluationResult:
    """The zero-shot baseline of this subject (model.reference with its photos), evaluated on the same protocol."""
    from dreambooth.baseline import write_baseline_result

    write_baseline_result(subject_dir, config, output_dir / "model")
    return evaluate_model(str(output_dir / "model"), subject_dir, EvaluationInputs.of(config), output_dir, on_progress=on_progress)


def _mean(values: list[float]) -> float:
    return float(sum(values) / len(values)) if values else float("nan")


def evaluate_model(
    model: str,
    subject_dir: Path,
    inputs: EvaluationInputs,
    output_dir: Path,
    identifier: Optional[str] = None,
    class_noun: Optional[str] = None,
    on_progress: Optional[OnProgress] = None,
) -> EvaluationResult:
    """Generate, score and write images, grids and evaluation.json to output_dir."""
    return _evaluate(model, subject_dir, inputs, {"": (output_dir, None)}, identifier, class_noun, on_progress)[""]


def evaluate_cascade(
    model: str, subject_dir: Path, inputs: EvaluationInputs, output_dir: Path, upscalers: dict[str, str],
    on_progress: Optional[OnProgress] = None,
) -> dict[str, EvaluationResult]:
    """The two-stage cascade, once per upscaler (label -> a StableDiffusionUpscalePipeline folder or hub
    id): the model's images, drawn once, upscaled 4x by each and scored at the higher resolution;
    each upscaler's results under output_dir/label."""
    variants = {label: (output_dir / label, upscaler) for label, upscaler in upscalers.items()}
    return _evaluate(model, subject_dir, inputs, variants, None, None, on_progress)


@dataclass
class Protocol:
    """What one evaluation draws: the model's identity, its prompts and the seeded requests (paper sec. 4.1)."""

    identifier: str
    class_noun: str
    base_model: str
    live: bool
    prompts: list[EvaluationPrompt]
    class_prompt: str
    rendered: list[str]  # each prompt with the identifier and class noun in
    requests: list[tuple[str, int]]  # images_per_prompt seeds per prompt
    pres_requests: list[tuple[str, int]]  # the class prompt, for PRES


@dataclass
class Drawn:
    """The protocol's images: the model's per prompt, and the class prompt's from the model and from its base."""

    images: list[Image.Image]
    pres_images: list[Image.Image]
    pres_base_images: list[Image.Image]
    seconds: float


def _protocol(model: str, inputs: EvaluationInputs, identifier: Optional[str], class_noun: Optional[str]) -> Protocol:
    settings = inputs.evaluation
    identifier, class_noun, base_model = _model_identity(model, inputs, identifier, class_noun)
    live = settings.live_subject if settings.live_subject is not None else is_live_subject(class_noun)
    prompts = limit_per_category(load_prompts(class_noun, live, settings.prompt_file), settings.max_prompts_per_category)
    class_prompt = inputs.subject.class_prompt_template.format(class_noun=class_noun)
    sampler, per_prompt = settings.sampler, settings.images_per_prompt
    subject = inputs.subject.model_copy(update={"class_noun": class_noun})
    rendered = [subject.render(prompt.template, identifier) for prompt in prompts]
    requests = [(text, sampler.seed + PROMPT_SEED_STRIDE * p + i) for p, text in enumerate(rendered) for i in range(per_prompt)]
    pres_requests = [(class_prompt, sampler.seed + PRES_SEED_OFFSET + i) for i in range(settings.pres_images)]
    return Protocol(identifier, class_noun, base_model, live, prompts, class_prompt, rendered, requests, pres_requests)


def _draw_protocol(model: str, protocol: Protocol, inputs: EvaluationInputs, advance: OnImages) -> Drawn:
    """Generation, model by model, so only one pipeline is in memory at a time."""
    started = time.perf_counter()
    requests, pres_requests = protocol.requests, protocol.pres_requests
    if base_of(model):  # the zero-shot baseline's weights are its pipeline's: the class prompt is drawn once, without the photos
        generated = _draw(model, None, requests, inputs, on_images=advance)
        pres_base_images = _draw(protocol.base_model, None, pres_requests, inputs, None, advance)
        advance(len(pres_requests))
        generated += pres_base_images
    else:
        generated = _draw(model, None, requests + pres_requests, inputs, on_images=advance)
        pres_base_images = _draw(protocol.base_model, inputs.base_revision, pres_requests, inputs, inputs.base_vae, advance)
    return Drawn(generated[: len(requests)], generated[len(requests) :], pres_base_images, time.perf_counter() - started)


def _evaluate(
    model: str, subject_dir: Path, inputs: EvaluationInputs, variants: dict[str, tuple[Path, Optional[str]]],
    identifier: Optional[str], class_noun: Optional[str], on_progress: Optional[OnProgress],
) -> dict[str, EvaluationResult]:
    """Draw the protocol's images once; score them as drawn (upscaler None) or as each upscaler upscales them."""
    settings = inputs.evaluation
    protocol = _protocol(model, inputs, identifier, class_noun)
    if not list_images(subject_dir):
        raise InputError(f"{subject_dir}: no subject images to compare with")

    # The encoders load first: a missing or unreachable one fails before any GPU time is spent.
    batch = settings.encoder_batch_size
    encoders = (DinoEncoder(settings.dino_model, batch), ClipEncoder(settings.clip_model, batch), LpipsDistance(settings.lpips_model, batch))
    dino, clip, _ = encoders

    upscaled = sum(1 for _, upscaler in variants.values() if upscaler)
    advance = counter(len(protocol.requests) * (1 + upscaled) + 2 * len(protocol.pres_requests), on_progress)
    drawn = _draw_protocol(model, protocol, inputs, advance)
    real_images = photos_as_trained(subject_dir, inputs.center_crop)
    real = RealPhotos(real_images, dino.embed(real_images), clip.embed(real_images))
    # PRES compares the class prompt's images, which no upscaler touches: scored once for every variant.
    pres_embeddings = dino.embed(drawn.pres_images + drawn.pres_base_images)
    pres = mean_pairwise_similarity(pres_embeddings[: len(drawn.pres_images)], real.dino)
    pres_base = mean_pairwise_similarity(pres_embeddings[len(drawn.pres_images) :], real.dino)
    # The prompts' texts are the same for every variant: embedded once.
    texts = clip.embed_texts([without_identifier(text, protocol.identifier) for text in protocol.rendered])

    results = {}
    for label, (output_dir, upscaler) in variants.items():
        started = time.perf_counter()
        images = drawn.images
        if upscaler:
            images = upscale_images(upscaler, [text for text, _ in protocol.requests], drawn.images, inputs.upscaling)
            advance(len(images))
        upscaling_seconds = time.perf_counter() - started
        started = time.perf_counter()
        scores = _score_prompts(images, protocol, encoders, texts, real, settings.images_per_prompt)
        scoring_seconds = time.perf_counter() - started
        result = _result(model, protocol, scores, {"pres": pres, "pres_base": pres_base}, real, settings, upscaler, images[0].width)
        result.throughput = {
            "generation_images_per_second": (len(protocol.requests) + 2 * len(drawn.pres_base_images)) / max(drawn.seconds + upscaling_seconds, 1e-9),
            "scoring_images_per_second": (len(images) + len(pres_embeddings) + len(real_images)) / max(scoring_seconds, 1e-9),
        }
        _write_variant(result, images, drawn, output_dir, payload_for(model), payload_for(protocol.base_model), settings.images_per_prompt)
        results[label] = result
    return results


def _score_prompts(images: list[Image.Image], protocol: Protocol, encoders, texts: torch.Tensor, real: RealPhotos,
                   per_prompt: int) -> list[PromptScores]:
    """DINO, CLIP-I, CLIP-T (against `texts`, the prompts' CLIP embeddings) and DIV of each prompt's images;
    every encoder call is batched."""
    dino, clip, lpips = encoders
    dino_generated = dino.embed(images)
    clip_generated = clip.embed(images)
    pair_index = [(p * per_prompt + a, p * per_prompt + b) for p in range(len(protocol.prompts)) for a, b in distinct_pairs(per_prompt)]
    distances = lpips.pairwise([(images[a], images[b]) for a, b in pair_index])
    pairs_per_prompt = len(distinct_pairs(per_prompt))
    scores = []
    for p, (prompt, text) in enumerate(zip(protocol.prompts, protocol.rendered)):
        rows = slice(p * per_prompt, (p + 1) * per_prompt)
        scores.append(PromptScores(
            prompt=text,
            category=prompt.category,
            dino=mean_pairwise_similarity(dino_generated[rows], real.dino),
            clip_i=mean_pairwise_similarity(clip_generated[rows], real.clip),
            clip_t=image_text_similarity(clip_generated[rows], texts[p].expand(per_prompt, -1)).mean().item(),
            div=distances[p * pairs_per_prompt : (p + 1) * pairs_per_prompt].mean().item(),
            image_files=[f"images/{prompt.category}/p{p:02d}-{i}.png" for i in range(per_prompt)],
        ))
    return scores


def _result(model: str, protocol: Protocol, scores: list[PromptScores], pres: dict[str, float], real: RealPhotos,
            settings: EvaluationSettings, upscaler: Optional[str], resolution: int) -> EvaluationResult:
    """The scores averaged overall and per category, with the gate's decision and the protocol's settings."""
    sampler = settings.sampler
    metric_names = ("dino", "clip_i", "clip_t", "div")
    overall = {name: _mean([getattr(s, name) for s in scores]) for name in metric_names}
    overall.update(pres)
    grouped: dict[str, list[PromptScores]] = defaultdict(list)
    for score in scores:
        grouped[score.category].append(score)
    by_category = {category: {name: _mean([getattr(s, name) for s in members]) for name in metric_names} for category, members in grouped.items()}
    return EvaluationResult(
        model=str(model),
        identifier=protocol.identifier,
        class_noun=protocol.class_noun,
        class_prompt=protocol.class_prompt,
        live_subject=protocol.live,
        overall=overall,
        by_category=by_category,
        prompts=scores,
        real_images={"dino": mean_distinct_pair_similarity(real.dino), "clip_i": mean_distinct_pair_similarity(real.clip)},
        gate=gate_decision(overall, settings.gate),
        settings={
            "dino_model": settings.dino_model,
            "clip_model": settings.clip_model,
            "lpips_model": settings.lpips_model,
            "prompts": len(protocol.prompts),
            "images_per_prompt": settings.images_per_prompt,
            "pres_images": settings.pres_images,
            "seed": sampler.seed,
            "scheduler": sampler.scheduler,
            "num_inference_steps": sampler.num_inference_steps,
            "guidance_scale": sampler.guidance_scale,
            "base_model": protocol.base_model,
            "upscaler": upscaler,
            "resolution": resolution,
        },
    )


def _write_variant(result: EvaluationResult, images: list[Image.Image], drawn: Drawn, output_dir: Path, payload: str,
                   base_payload: str, per_prompt: int) -> None:
    """Every image (marked as the model that drew it), the grids and evaluation.json under output_dir."""
    output_dir.mkdir(parents=True, exist_ok=True)
    for p, score in enumerate(result.prompts):
        for image, name in zip(images[p * per_prompt : (p + 1) * per_prompt], score.image_files):
            (output_dir / name).parent.mkdir(parents=True, exist_ok=True)
            save_marked(image, output_dir / name, payload)
    for name, images_of, mark in (("fine-tuned", drawn.pres_images, payload), ("base", drawn.pres_base_images, base_payload)):
        for i, image in enumerate(images_of):
            path = output_dir / "images" / "prior-preservation" / f"{name}-{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            save_marked(image, path, mark)
    _write_grids(result, images, per_prompt, drawn.pres_images, drawn.pres_base_images, output_dir, payload)
    (output_dir / RESULTS_FILE).write_text(result.to_json())


def _write_grids(result: EvaluationResult, images, per_prompt: int, pres_images, pres_base_images, output_dir: Path,
                 payload: str) -> None:
    """One labelled grid per prompt category, and one for prior preservation (each marked as the model's)."""
    for category in result.by_category:
        rows = [
            (f"{s.prompt}  (DINO {s.dino:.2f}, CLIP-T {s.clip_t:.2f})", [(f"seed {i}", images[p * per_prompt + i]) for i in range(per_prompt)])
            for p, s in enumerate(result.prompts)
            if s.category == category
        ]
        save_marked(labelled_grid(rows), output_dir / f"grid-{category}.png", payload)
    shown = min(len(pres_images), 8)
    save_marked(labelled_grid(
        [
            (f"fine-tuned: {result.class_prompt}  (PRES {result.overall['pres']:.2f})", [(f"{i}", pres_images[i]) for i in range(shown)]),
            (f"base: {result.class_prompt}  (PRES {result.overall['pres_base']:.2f})", [(f"{i}", pres_base_images[i]) for i in range(shown)]),
        ]
    ), output_dir / "grid-prior-preservation.png", payload)
