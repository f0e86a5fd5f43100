"""Fine-tune benchmark: training steps/s, peak memory and whole-job wall time.

    python bench/finetune_bench.py [--base-model DIR] [--steps 200] [--class-images 50] [--methods full,lora,textual_inversion]
                                   [--reference-script PATH/TO/diffusers/examples/dreambooth/train_dreambooth.py]
                                   [--reference-lora-script PATH/TO/.../train_dreambooth_lora.py]
                                   [--reference-ti-script PATH/TO/.../examples/textual_inversion/textual_inversion.py]

Every measurement runs in a fresh subprocess, so peak memory (max RSS, from wait4) belongs
to that run alone. Steady-state steps/s is differential: two runs of the same job that
differ only in step count, (long - short steps) / (long - short seconds), which cancels
model loading, caching and saving for both tools alike (`--repeats N`: the median of N pairs).

`--methods full,lora` measures the full fine-tune and the LoRA adapter (rank 4, lr 1e-4, as
diffusers' LoRA example) side by side, with the size of what each saves.

With --reference-lora-script, diffusers' LoRA DreamBooth example trains the same rank-4 adapter
(lr 1e-4, its default target modules) beside ours, under the same differential measurement.

`textual_inversion` learns one new token's embedding (lr 5e-4, initialised from the class noun,
no prior preservation, as diffusers' textual_inversion example trains); with --reference-ti-script
that example trains the same token on the same model and photos beside ours.

With --reference-script, diffusers' reference DreamBooth example runs on the same model,
subject, prompts and settings (batch 1 subject + 1 class image, fp32, AdamW, lr 5e-6,
prior preservation, centre crop, no flips, no checkpoints), and the figures are printed
side by side. The whole job is class priors + fine-tune (+ our sample grid); the reference
generates its priors with the model's own sampler and step count, ours with the sampler
and step count configured here.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

DEFAULT_SUBJECT = REPO / "examples" / "subjects" / "dog"
IDENTIFIER = "fqs"
NEW_TOKEN = "<fqs>"  # textual inversion's [V]: a token the tokenizer does not have
CLASS_NOUN = "dog"


def _measure(command: list[str], log: Path, env: dict | None = None) -> tuple[float, float]:
    """(wall seconds, peak RSS in GB) of one subprocess; raises with the log's tail on failure."""
    started = time.perf_counter()
    with open(log, "w") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env or os.environ.copy())
        _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        tail = "\n".join(log.read_text().splitlines()[-15:])
        raise SystemExit(f"benchmark run failed: {' '.join(command[:3])} ...\n{tail}")
    return seconds, usage.ru_maxrss / 1024 / 1024  # ru_maxrss is in KiB on Linux


def _our_config(base_model: str, work: Path, steps: int, class_images: int, args, method: str = "full") -> dict:
    inversion = method == "textual_inversion"
    return {
        "shipped_config": args.config,
        "model": {"base": base_model, "resolution": args.resolution},
        "data": {"buckets": False},  # one square, as the reference scripts train by default
        "subject": {"class_noun": CLASS_NOUN, "identifier": NEW_TOKEN if inversion else IDENTIFIER, "min_image_size": 64, "name": "bench"},
        "priors": {
            "num_class_images": class_images,
            "sampler": {
                "scheduler": args.prior_scheduler,
                "num_inference_steps": args.prior_steps,
                "batch_size": args.prior_batch,
            },
        },
        "training": {
            "method": method,
            "max_steps": steps,
            "learning_rate": 5e-6 if method == "full" else 1e-4,
            "prior_loss_weight": 0.0 if inversion else 1.0,  # diffusers' textual inversion has no class images
            "textual_inversion": {"learning_rate": 5e-4},
            "batch_size": 1,
            "mixed_precision": "no",
            "optimizer": "adamw",
            "random_flip": False,
            "center_crop": True,
            "checkpoint_every": 1_000_000,
            "log_every": 1_000_000,
        },
        "samples": {"images_per_prompt": 2, "sampler": {"num_inference_steps": args.sample_steps}},
        "storage": {"work_dir": str(work)},
    }


CHILD = "--run-child"


def _child(mode: str, config_path: str, subject: str, out: str) -> None:
    """Runs inside the measured subprocess: our stages as plain functions, no KFP or MLflow."""
    from dreambooth.config import load_config
    from dreambooth.fine_tune import fine_tune
    from dreambooth.ingest.photos import ingest_subject
    from dreambooth.priors import generate_class_priors
    from dreambooth.samples import render_samples

    overrides = json.loads(Path(config_path).read_text())
    config = load_config(overrides.pop("shipped_config"), overrides)
    out_dir = Path(out)
    identifier = ingest_subject(Path(subject), out_dir / "subject", config).identifier.identifier
    generate_class_priors(config, out_dir / "classes")
    fine_tune(out_dir / "subject", out_dir / "classes", identifier, config, out_dir / "model")
    if mode == "job":
        render_samples(out_dir / "model", config, out_dir / "samples")


def _run_ours(mode: str, base_model: str, root: Path, steps: int, class_images: int, args, share_work: Path | None,
              method: str = "full"):
    """(wall seconds, peak RSS GB, bytes saved in the model folder) of one of our runs."""
    run_dir = Path(tempfile.mkdtemp(dir=root, prefix=f"ours-{method}-{mode}-{steps}-"))
    work = share_work or run_dir / "work"
    config_path = run_dir / "config.json"
    config_path.write_text(json.dumps(_our_config(base_model, work, steps, class_images, args, method)))
    # A fresh checkpoint folder each run: a benchmark must never resume.
    shutil.rmtree(work / "checkpoints", ignore_errors=True)
    command = [sys.executable, __file__, CHILD, mode, str(config_path), str(args.subject_dir), str(run_dir)]
    seconds, peak = _measure(command, run_dir / "log.txt")
    return seconds, peak, sum(p.stat().st_size for p in (run_dir / "model").rglob("*") if p.is_file())


def _run_reference(args, model_dir: str, root: Path, steps: int, class_dir: Path, resolution: int, method: str = "full"):
    out = Path(tempfile.mkdtemp(dir=root, prefix=f"reference-{method}-{steps}-"))
    if method == "textual_inversion":
        command = [
            args.reference_python, str(args.reference_ti_script),
            "--pretrained_model_name_or_path", model_dir, "--train_data_dir", str(args.subject_dir),
            "--learnable_property", "object", "--placeholder_token", NEW_TOKEN, "--initializer_token", CLASS_NOUN,
            "--output_dir", str(out / "model"), "--resolution", str(resolution), "--center_crop",
            "--train_batch_size", "1", "--learning_rate", "5e-4", "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
            "--max_train_steps", str(steps), "--checkpointing_steps", "1000000", "--save_steps", "1000000",
            "--mixed_precision", "no", "--seed", "0",
        ]
        return _measure(command, out / "log.txt")
    script, learning_rate = (args.reference_script, "5e-6") if method == "full" else (args.reference_lora_script, "1e-4")
    command = [
        args.reference_python, str(script),
        "--pretrained_model_name_or_path", model_dir,
        "--instance_data_dir", str(args.subject_dir),
        "--instance_prompt", f"a {IDENTIFIER} {CLASS_NOUN}",
        "--class_data_dir", str(class_dir),
        "--class_prompt", f"a {CLASS_NOUN}",
        "--with_prior_preservation", "--prior_loss_weight", "1.0",
        "--num_class_images", str(args.class_images),
        "--output_dir", str(out / "model"),
        "--resolution", str(resolution), "--center_crop",
        "--train_batch_size", "1", "--sample_batch_size", "4",
        "--learning_rate", learning_rate, "--lr_scheduler", "constant", "--lr_warmup_steps", "0",
        "--max_train_steps", str(steps), "--checkpointing_steps", "1000000",
        "--mixed_precision", "no", "--seed", "0",
    ] + (["--rank", "4"] if method == "lora" else []) + shlex.split(args.reference_extra)
    return _measure(command, out / "log.txt")



def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == CHILD:
        _child(*sys.argv[2:6])
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-model", default="tiny://sd-bench", help="diffusers folder or tiny:// model (default: 17.6M-param SD-layout UNet, 64 px)")
    parser.add_argument("--subject-dir", type=Path, default=DEFAULT_SUBJECT)
    parser.add_argument("--steps", type=int, default=200, help="fine-tune steps of the whole-job run")
    parser.add_argument("--short-steps", type=int, default=20, help="the short run of the differential steps/s measurement")
    parser.add_argument("--long-steps", type=int, default=220, help="the long run of the differential steps/s measurement")
    parser.add_argument("--class-images", type=int, default=50)
    parser.add_argument("--prior-scheduler", default="DPMSolverMultistepScheduler")
    parser.add_argument("--prior-steps", type=int, default=20)
    parser.add_argument("--prior-batch", type=int, default=10)
    parser.add_argument("--sample-steps", type=int, default=20)
    parser.add_argument("--reference-script", type=Path, help="diffusers' examples/dreambooth/train_dreambooth.py")
    parser.add_argument("--reference-lora-script", type=Path, help="diffusers' examples/dreambooth/train_dreambooth_lora.py")
    parser.add_argument("--reference-ti-script", type=Path, help="diffusers' examples/textual_inversion/textual_inversion.py")
    parser.add_argument("--reference-python", default=sys.executable, help="interpreter for the reference (it needs torchvision)")
    parser.add_argument("--config", default="tiny", help="the shipped config our runs start from (e.g. tiny-flux2-klein: "
                        "its samplers); --base-model and the bench's settings override it")
    parser.add_argument("--resolution", type=int, help="training resolution for both tools (default: the model's native)")
    parser.add_argument("--reference-extra", default="", help="more arguments for the reference script, e.g. a family "
                        "script's --text_encoder_out_layers for a tiny text encoder")
    parser.add_argument("--repeats", type=int, default=1, help="short/long pairs per tool; the median steps/s is reported")
    parser.add_argument("--skip-job", action="store_true", help="only the training-step measurement")
    parser.add_argument("--methods", default="full", help="training methods to measure, comma separated: full, lora, textual_inversion")
    args = parser.parse_args()
    args.subject_dir = args.subject_dir.resolve()

    from dreambooth.models.loading import load_pipeline, native_resolution, resolve_model_source

    model_dir = resolve_model_source(args.base_model)
    probe = load_pipeline(model_dir)
    resolution = args.resolution or native_resolution(probe)
    denoiser = getattr(probe, "unet", None) or probe.transformer
    denoiser_params = sum(p.numel() for p in denoiser.parameters()) / 1e6
    denoiser_name = type(denoiser).__name__
    del probe, denoiser
    import torch

    print(f"model: {args.base_model} ({denoiser_params:.1f}M-parameter {denoiser_name}, {resolution} px); torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    root = Path(tempfile.mkdtemp(prefix="dreambooth-bench-"))
    rows = []

    # 1. Training step: both tools train on the same, already generated class images.
    shared_work = root / "shared-work"
    _run_ours("finetune", model_dir, root, 1, args.class_images, args, shared_work, args.methods.split(",")[0])  # fills the prior cache
    def differential(run) -> tuple[float, float, float]:
        """(steps/s, peak GB, saved bytes): the median over --repeats pairs of a short and a long run."""
        pairs = [(run(args.short_steps), run(args.long_steps)) for _ in range(args.repeats)]
        rates = sorted((args.long_steps - args.short_steps) / (long[0] - short[0]) for short, long in pairs)
        return rates[len(rates) // 2], max(long[1] for _, long in pairs), pairs[-1][1][2] if len(pairs[-1][1]) > 2 else None

    for method in args.methods.split(","):
        rate, peak, saved = differential(lambda steps: _run_ours("finetune", model_dir, root, steps, args.class_images, args, shared_work, method))
        rows.append((f"ours ({method})", rate, peak, saved))
    references = {"full": args.reference_script, "lora": args.reference_lora_script, "textual_inversion": args.reference_ti_script}
    measured = [method for method in args.methods.split(",") if references.get(method)]
    reference_classes = root / "reference-classes"
    if any(method != "textual_inversion" for method in measured):
        class_dir = next((shared_work / "class-priors").iterdir())  # the same images, as files the reference reads
        shutil.copytree(class_dir, reference_classes)
    for method in measured:
        rate, peak, _ = differential(lambda steps: _run_reference(args, model_dir, root, steps, reference_classes, resolution, method))
        rows.append((f"diffusers ({method})", rate, peak, None))

    print(f"\nfine-tune step, steady state ({args.short_steps} vs {args.long_steps} steps, batch 1 subject + 1 class "
          f"(textual inversion: the subject only), fp32 AdamW)")
    print(f"{'':38}{'steps/s':>10}{'peak RSS GB':>14}{'saved MB':>12}")
    for name, rate, peak, saved in rows:
        print(f"{name:38}{rate:10.2f}{peak:14.2f}{saved / 1e6 if saved else float('nan'):12.3f}")
    by_name = {name: (rate, peak) for name, rate, peak, _ in rows}
    for method in measured:
        ours, reference = by_name[f"ours ({method})"], by_name[f"diffusers ({method})"]
        print(f"{f'ours / diffusers ({method})':38}{ours[0] / reference[0]:10.2f}x{ours[1] / reference[1]:13.2f}x")

    if args.skip_job:
        return
    # 2. The whole job for one subject, from nothing: class priors + fine-tune (+ samples for ours).
    ours_job = _run_ours("job", model_dir, root, args.steps, args.class_images, args, None, args.methods.split(",")[0])
    print(f"\nwhole job: {args.class_images} class images + {args.steps} steps"
          f" (ours: {args.prior_scheduler} {args.prior_steps} steps, batch {args.prior_batch}; + sample grid)")
    print(f"{'ours':22}{ours_job[0]:9.1f} s{ours_job[1]:13.2f} GB")
    if args.reference_script:
        empty_classes = root / "reference-job-classes"
        ref_job = _run_reference(args, model_dir, root, args.steps, empty_classes, resolution)
        print(f"{'diffusers reference':22}{ref_job[0]:9.1f} s{ref_job[1]:13.2f} GB")
        print(f"{'ours / reference':22}{ours_job[0] / ref_job[0]:9.2f}x")
    shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
