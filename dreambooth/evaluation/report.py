"""The evaluation as Markdown: the KFP UI shows it, MLflow keeps it."""

from __future__ import annotations

from typing import Optional

from dreambooth.evaluation.evaluate import PAPER_REAL_IMAGES, PAPER_STABLE_DIFFUSION, EvaluationResult


def _cell(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3f}"


def render_report(result: EvaluationResult, registered: Optional[str] = None) -> str:
    overall, real = result.overall, result.real_images
    verdict = (
        f"**passed** - registered as `{registered}`" if result.gate.passed and registered
        else "**passed**" if result.gate.passed
        else "**rejected** - " + "; ".join(result.gate.reasons)
    )
    lines = [
        f"# DreamBench evaluation: `{result.identifier}` {result.class_noun}",
        "",
        f"Model `{result.model}`; {result.settings['prompts']} prompts x {result.settings['images_per_prompt']} images, "
        f"{result.settings['scheduler']} {result.settings['num_inference_steps']} steps, seed {result.settings['seed']}; "
        f"DINO `{result.settings['dino_model']}`, CLIP `{result.settings['clip_model']}`, LPIPS `{result.settings['lpips_model']}`.",
        "",
        f"Quality gate: {verdict}",
        "",
        "| | DINO | CLIP-I | CLIP-T | DIV | PRES (lower is better) |",
        "|---|---|---|---|---|---|",
        f"| this model | {_cell(overall['dino'])} | {_cell(overall['clip_i'])} | {_cell(overall['clip_t'])} | {_cell(overall['div'])} | {_cell(overall['pres'])} |",
        f"| base model (prior reference) | - | - | - | - | {_cell(overall['pres_base'])} |",
        f"| real images (this subject) | {_cell(real['dino'])} | {_cell(real['clip_i'])} | - | - | - |",
        f"| paper: Stable Diffusion | {_cell(PAPER_STABLE_DIFFUSION['dino'])} | {_cell(PAPER_STABLE_DIFFUSION['clip_i'])} | {_cell(PAPER_STABLE_DIFFUSION['clip_t'])} | - | - |",
        f"| paper: real images | {_cell(PAPER_REAL_IMAGES['dino'])} | {_cell(PAPER_REAL_IMAGES['clip_i'])} | - | - | - |",
        "",
        "## By prompt category",
        "",
        "| category | DINO | CLIP-I | CLIP-T | DIV |",
        "|---|---|---|---|---|",
    ]
    for category, values in result.by_category.items():
        lines.append(f"| {category} | {_cell(values['dino'])} | {_cell(values['clip_i'])} | {_cell(values['clip_t'])} | {_cell(values['div'])} |")
    lines += ["", "## By prompt", "", "| prompt | category | DINO | CLIP-I | CLIP-T | DIV |", "|---|---|---|---|---|---|"]
    for score in result.prompts:
        lines.append(
            f"| {score.prompt} | {score.category} | {_cell(score.dino)} | {_cell(score.clip_i)} | {_cell(score.clip_t)} | {_cell(score.div)} |"
        )
    return "\n".join(lines) + "\n"
