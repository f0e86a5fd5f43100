"""What an experiment costs: its trainings, steps and images, and the GPU hours they take at measured rates.

    python bench/experiment_cost.py experiments/dreambench.yaml --config sd15 \\
        --train-steps-per-second 2.1 --ti-steps-per-second 6.0 --images-per-second 1.3

The counts come from the experiment file and config exactly as the batch would run them: one
training per (subject, variant), its steps, the class images of each distinct class (drawn once,
shared), and each run's sample and evaluation images. The rates are yours to measure on the card
you will use: `bench/denoiser_bench.py --families sd15 --methods full,textual_inversion` (training
steps/s) and `bench/evaluation_bench.py --model <base> --steps <sampler steps>` (images/s). Without
rates only the counts are printed.
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("experiment", type=Path)
    parser.add_argument("--config", default="sd15")
    parser.add_argument("--train-steps-per-second", type=float, help="full fine-tune (and LoRA) steps/s on your card")
    parser.add_argument("--ti-steps-per-second", type=float, help="textual inversion steps/s (default: the full rate)")
    parser.add_argument("--images-per-second", type=float, help="images/s of the base model at the samplers' step counts")
    args = parser.parse_args()

    from dreambooth.config import load_config
    from dreambooth.evaluation.evaluate import limit_per_category
    from dreambooth.evaluation.prompts import is_live_subject, load_prompts
    from dreambooth.priors import prior_key
    from dreambooth.catalogue.subjects import parse_subjects, subject_config

    shared = load_config(args.config)
    entries = parse_subjects(args.experiment.read_text(), str(args.experiment), shared)
    per_variant: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    class_images: dict[str, int] = {}
    for entry in entries:
        config = subject_config(shared, entry)
        counts = per_variant[entry.experiment["variant"]]
        counts["trainings"] += 1
        kind = "ti_steps" if config.training.method == "textual_inversion" else "steps"
        counts[kind] += config.training.max_steps
        if config.priors.enabled and config.training.prior_loss_weight > 0:
            key = prior_key(config)
            class_images[key] = max(class_images.get(key, 0), config.priors.num_class_images)
        evaluation = config.evaluation
        live = evaluation.live_subject if evaluation.live_subject is not None else is_live_subject(config.subject.class_noun)
        prompts = limit_per_category(load_prompts(config.subject.class_noun, live, evaluation.prompt_file),
                                     evaluation.max_prompts_per_category)
        samples = len(config.samples.prompts) * config.samples.images_per_prompt * (2 if config.samples.compare_with_base else 1)
        counts["images"] += len(prompts) * evaluation.images_per_prompt + 2 * evaluation.pres_images + samples

    print(f"{args.experiment}: {len({e.experiment['subject'] for e in entries})} subjects x {len(per_variant)} variants, config {args.config}")
    print(f"{'variant':28}{'trainings':>10}{'steps':>12}{'TI steps':>12}{'images':>10}")
    totals = defaultdict(float)
    for variant, counts in per_variant.items():
        print(f"{variant:28}{counts['trainings']:10.0f}{counts['steps']:12.0f}{counts['ti_steps']:12.0f}{counts['images']:10.0f}")
        for key, value in counts.items():
            totals[key] += value
    totals["images"] += sum(class_images.values())
    print(f"{'class images (shared)':28}{'':10}{'':12}{'':12}{sum(class_images.values()):10.0f}  ({len(class_images)} classes)")
    print(f"{'total':28}{totals['trainings']:10.0f}{totals['steps']:12.0f}{totals['ti_steps']:12.0f}{totals['images']:10.0f}")
    if not (args.train_steps_per_second and args.images_per_second):
        print("\nGPU time: give --train-steps-per-second and --images-per-second, measured on your card")
        return
    ti_rate = args.ti_steps_per_second or args.train_steps_per_second
    seconds = totals["steps"] / args.train_steps_per_second + totals["ti_steps"] / ti_rate + totals["images"] / args.images_per_second
    print(f"\nGPU time at {args.train_steps_per_second} steps/s (TI {ti_rate}), {args.images_per_second} images/s: "
          f"{seconds / 3600:.1f} GPU hours (model loading and I/O not included)")


if __name__ == "__main__":
    main()
