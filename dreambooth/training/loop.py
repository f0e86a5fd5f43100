"""The one training loop, shared by every fine-tune stage.

A stage hands it the modules to optimise and a `compute_loss(modules, step, generator)` that builds
its own batch; the loop owns everything else: accelerate (CPU, CUDA, several GPUs, mixed
precision), the optimizer and schedule, gradient accumulation and clipping, checkpoints
with a retention limit, resume, the NaN/inf stop, a checkpoint on SIGTERM (preemption), the
progress bar and step logging.

Batches are drawn from a generator seeded by (seed, step, micro-batch), so a resumed run
draws exactly the batches the interrupted one would have: no data-loader state to save.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Iterator, Optional

import torch
from torch import nn
from tqdm.auto import tqdm

from dreambooth.config import TrainingSettings
from dreambooth.errors import InputError, Preempted, TrainingDiverged
from dreambooth.training.ema import WeightAverage
from dreambooth.training.losses import LossTerms

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "step-"
COMPLETE_MARKER = "checkpoint-complete"
WARMUP_STEPS_EXCLUDED = 3  # the first steps pay for allocation; throughput is measured after them

# (wrapped modules by name, step, generator) -> loss. Wrapped: under several GPUs they sync gradients.
ComputeLoss = Callable[[dict[str, nn.Module], int, torch.Generator], LossTerms]
OnLog = Callable[[int, dict[str, float]], None]
OnStep = Callable[[int], None]  # after each completed step, on the main process only


@dataclass
class TrainingResult:
    modules: dict[str, nn.Module]  # unwrapped, trained
    steps_completed: int  # optimizer updates applied, counted by the optimizer
    resumed_from_step: int  # 0 when the run started fresh
    resumed_from_run: str  # the tracking run whose checkpoint it resumed ("" when fresh or unknown)
    seconds: float
    steps_per_second: float  # steady state, after the first WARMUP_STEPS_EXCLUDED steps of this process
    final_loss: dict[str, float] = field(default_factory=dict)
    processes: int = 1
    embedding: dict = field(default_factory=dict)  # a learned token's embedding file's tensors (textual_inversion, pivotal)
    adapters: dict = field(default_factory=dict)  # the trained modules that carry LoRA adapters, by name
    prompts: dict = field(default_factory=dict)  # each subject prompt trained on, and how many examples had it


def process_state():
    """accelerate's view of this process; on machines without CUDA, several processes use gloo."""
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def fresh_accelerator(settings: TrainingSettings):
    """An Accelerator with these settings' precision and accumulation, even when this process trained before.

    accelerate keeps both in process-wide singletons that only its private `_reset_state` clears (a
    notebook, the benchmark and the tests train several times in one process); the process group is
    kept. tests/training/test_loop.py fails when accelerate changes that.
    """
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(
        cpu=not torch.cuda.is_available(),
        mixed_precision=settings.mixed_precision,
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
    )


def planned_processes(settings: TrainingSettings) -> int:
    return settings.num_processes or max(torch.cuda.device_count(), 1)


def split_batch(settings: TrainingSettings, processes: int) -> TrainingSettings:
    """Per-process settings that keep the configured effective batch across `processes`."""
    if processes == 1:
        return settings
    if settings.batch_size % processes == 0:
        return settings.model_copy(update={"batch_size": settings.batch_size // processes})
    if settings.gradient_accumulation_steps % processes == 0:
        return settings.model_copy(update={"gradient_accumulation_steps": settings.gradient_accumulation_steps // processes})
    raise InputError(
        f"training: batch_size {settings.batch_size} x gradient_accumulation_steps {settings.gradient_accumulation_steps} "
        f"cannot be shared by {processes} processes; make one of them divisible by {processes}"
    )


def _make_optimizer(settings: TrainingSettings, param_groups: list[dict], on_cuda: bool):
    kwargs = dict(
        betas=(settings.adam_beta1, settings.adam_beta2),
        weight_decay=settings.adam_weight_decay,
        eps=settings.adam_epsilon,
    )
    choice = settings.optimizer
    if choice == "prodigy":
        from prodigyopt import Prodigy

        prodigy = settings.prodigy
        return Prodigy(param_groups, d0=prodigy.d0, d_coef=prodigy.d_coef, use_bias_correction=prodigy.use_bias_correction,
                       safeguard_warmup=prodigy.safeguard_warmup, decouple=True, **kwargs)
    if choice in ("auto", "adamw_8bit"):
        try:
            import bitsandbytes as bnb  # noqa: F401
        except ImportError:
            bnb = None
        if bnb is not None and on_cuda:
            return bnb.optim.AdamW8bit(param_groups, **kwargs)
        if choice == "adamw_8bit":
            raise InputError("training.optimizer: adamw_8bit needs CUDA and the bitsandbytes package")
    try:
        # The fused kernel updates every parameter in one pass: ~13% faster CPU steps on SD's UNet.
        return torch.optim.AdamW(param_groups, fused=True, **kwargs)
    except (RuntimeError, TypeError):  # a device or dtype the fused kernel does not cover
        return torch.optim.AdamW(param_groups, **kwargs)


def _optimizer_steps(optimizer) -> int:
    """Updates the optimizer has applied, by its own count (kept in checkpoints, so resumes add up)."""
    counts = [state["step"] for state in optimizer.state.values() if "step" in state]
    return int(max(counts)) if counts else 0


def list_checkpoints(checkpoint_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first. A folder without the marker was interrupted mid-write."""
    if not checkpoint_dir.is_dir():
        return []
    found = [
        path
        for path in checkpoint_dir.glob(f"{CHECKPOINT_PREFIX}*")
        if (path / COMPLETE_MARKER).is_file() and path.name[len(CHECKPOINT_PREFIX) :].isdigit()
    ]
    return sorted(found, key=lambda path: int(path.name[len(CHECKPOINT_PREFIX) :]))


def checkpoint_owner(checkpoint: Path) -> str:
    """The tracking run that wrote the checkpoint ("" when it was not told)."""
    try:
        return json.loads((checkpoint / COMPLETE_MARKER).read_text()).get("run", "")
    except (ValueError, AttributeError):
        return ""


def _save_checkpoint(accelerator, checkpoint_dir: Path, step: int, keep: int, owner: str) -> Path:
    target = checkpoint_dir / f"{CHECKPOINT_PREFIX}{step:06d}"
    accelerator.save_state(str(target))
    if accelerator.is_main_process:
        (target / COMPLETE_MARKER).write_text(json.dumps({"step": step, "run": owner}))
        for stale in list_checkpoints(checkpoint_dir)[:-keep]:
            shutil.rmtree(stale, ignore_errors=True)
    return target


@contextmanager
def stop_requests() -> Iterator[threading.Event]:
    """An event set by SIGTERM (a preempted or drained node) while the loop runs; elsewhere the
    signal keeps its usual meaning. Only the main thread can take signals: elsewhere it never sets."""
    requested = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield requested
        return
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: requested.set())
    try:
        yield requested
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stop_agreed(requested: threading.Event, accelerator) -> bool:
    """Whether any process was asked to stop: all of them must checkpoint at the same step."""
    if accelerator.num_processes == 1:
        return requested.is_set()
    flag = torch.tensor([1.0 if requested.is_set() else 0.0], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def train(
    modules: dict[str, nn.Module],
    learning_rates: dict[str, float],
    compute_loss: ComputeLoss,
    settings: TrainingSettings,
    checkpoint_dir: Path,
    on_log: Optional[OnLog] = None,
    description: str = "fine-tune",
    on_step: Optional[OnStep] = None,
    owner: str = "",
    averaged_steps: Collection[int] = (),
) -> TrainingResult:
    """Optimise `modules` (name -> module; each gets its learning rate) for settings.max_steps steps.
    `owner`: the tracking run training, written into each checkpoint so a resume can name it. With
    training.ema, `on_step` sees the averaged weights at `averaged_steps`, and the result holds them."""
    from diffusers.optimization import get_scheduler

    accelerator = fresh_accelerator(settings)
    names = list(modules)
    for module in modules.values():
        module.train()
    param_groups = [
        {"params": [p for p in modules[name].parameters() if p.requires_grad], "lr": learning_rates[name]}
        for name in names
    ]
    optimizer = _make_optimizer(settings, param_groups, accelerator.device.type == "cuda")
    # accelerate steps a prepared scheduler once per process, so lengths scale with the process count.
    lr_schedule = get_scheduler(
        settings.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=settings.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=settings.max_steps * accelerator.num_processes,
    )
    prepared = accelerator.prepare(*[modules[name] for name in names], optimizer, lr_schedule)
    wrapped = dict(zip(names, prepared[: len(names)]))
    optimizer, lr_schedule = prepared[len(names) :]
    trainable_params = [p for group in optimizer.param_groups for p in group["params"]]
    average = WeightAverage(trainable_params, settings.ema) if settings.ema else None
    if average is not None:
        accelerator.register_for_checkpointing(average)

    start_step, resumed_from_run = 0, ""
    existing = list_checkpoints(checkpoint_dir)
    if existing:
        accelerator.load_state(str(existing[-1]))
        start_step, resumed_from_run = int(existing[-1].name[len(CHECKPOINT_PREFIX) :]), checkpoint_owner(existing[-1])
        log.info("resuming %s from %s (step %d)", description, existing[-1], start_step)

    progress = tqdm(
        total=settings.max_steps,
        initial=start_step,
        desc=description,
        # Only on a terminal: a pod's log or `run`'s view get progress lines from the stage (dreambooth.progress).
        disable=not (accelerator.is_local_main_process and sys.stderr.isatty()),
    )
    started = time.perf_counter()
    steady_started: Optional[float] = None
    last_terms: dict[str, float] = {}
    last_checkpoint = existing[-1] if existing else None
    step = start_step
    with stop_requests() as stop_requested:
        for step in range(start_step + 1, settings.max_steps + 1):
            if step - start_step == WARMUP_STEPS_EXCLUDED + 1:
                steady_started = time.perf_counter()
            for micro_step in range(settings.gradient_accumulation_steps):
                # Seeded by the micro-batch's place in the step's global batch: N processes draw what one
                # process accumulating N micro-batches draws, so both train the same model.
                micro_batch = micro_step * accelerator.num_processes + accelerator.process_index
                generator = torch.Generator(device="cpu").manual_seed(hash((settings.seed, step, micro_batch)) & 0x7FFF_FFFF)
                with accelerator.accumulate(*wrapped.values()):
                    with accelerator.autocast():
                        terms = compute_loss(wrapped, step, generator)
                    if not torch.isfinite(terms.total.detach()).all():
                        raise TrainingDiverged(
                            f"training stopped at step {step}: loss is {terms.total.item()} "
                            f"(last checkpoint: {last_checkpoint or 'none'}); lower training.learning_rate "
                            "or change training.mixed_precision"
                        )
                    accelerator.backward(terms.total)
                    if accelerator.sync_gradients:
                        accelerator.clip_grad_norm_(trainable_params, settings.max_grad_norm)
                    optimizer.step()
                    lr_schedule.step()
                    optimizer.zero_grad(set_to_none=True)
            if average is not None:
                average.update(step)
            last_terms = terms.as_floats()
            progress.update(1)
            progress.set_postfix(loss=f"{last_terms['loss']:.4f}")
            if on_log and accelerator.is_main_process and (step % settings.log_every == 0 or step == settings.max_steps):
                on_log(step, {**last_terms, "lr": lr_schedule.get_last_lr()[0]})
            if on_step and accelerator.is_main_process:
                with average.in_weights() if average is not None and step in averaged_steps else nullcontext():
                    on_step(step)
            if step % settings.checkpoint_every == 0 and step < settings.max_steps:
                last_checkpoint = _save_checkpoint(accelerator, checkpoint_dir, step, settings.checkpoints_total_limit, owner)
            if step < settings.max_steps and _stop_agreed(stop_requested, accelerator):  # the last step saves anyway
                if step % settings.checkpoint_every:
                    last_checkpoint = _save_checkpoint(accelerator, checkpoint_dir, step, settings.checkpoints_total_limit, owner)
                raise Preempted(
                    f"stopped by SIGTERM at step {step}/{settings.max_steps}; "
                    f"checkpoint {last_checkpoint or 'none'}: a retry resumes there"
                )
    progress.close()
    accelerator.wait_for_everyone()
    if average is not None:
        average.copy_to_weights()

    finished = time.perf_counter()
    steady_steps = settings.max_steps - start_step - WARMUP_STEPS_EXCLUDED
    if steady_started is not None and steady_steps > 0:
        steps_per_second = steady_steps / max(finished - steady_started, 1e-9)
    else:
        steps_per_second = (settings.max_steps - start_step) / max(finished - started, 1e-9)
    unwrapped = {name: accelerator.unwrap_model(module) for name, module in wrapped.items()}
    return TrainingResult(
        modules=unwrapped,
        steps_completed=_optimizer_steps(optimizer),
        resumed_from_step=start_step,
        resumed_from_run=resumed_from_run,
        seconds=finished - started,
        steps_per_second=steps_per_second if math.isfinite(steps_per_second) else 0.0,
        final_loss=last_terms,
        processes=accelerator.num_processes,
    )
