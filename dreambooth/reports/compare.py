"""`dreambooth compare`: evaluated subject runs side by side, from MLflow.

Writes, and logs to an MLflow run of its own: a table (Markdown and CSV) of DINO, CLIP-I, CLIP-T,
PRES, DIV, steps, learning rate, method and training time with the paper's rows for orientation;
a DINO-against-CLIP-T plot, one labelled point per run; each metric per subject across runs; and
a sheet of the same sample prompt and seed from every run. Runs evaluated under different
protocols (prompts, seeds, encoders, resolution, images per prompt) are refused unless forced,
and then each row is marked with its protocol.
"""

from __future__ import annotations

import csv
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dreambooth.errors import InputError
from dreambooth.reports.summary import steps_cell
from dreambooth.tracking.cost import ACCELERATOR_SECONDS, ESTIMATED
from dreambooth.tracking import (
    STAGE_BATCH,
    STAGE_COMPARE,
    STAGE_SUBJECT,
    TAG_CLASS_NOUN,
    TAG_COMPARED_RUNS,
    TAG_COMPARED_SUBJECTS,
    TAG_EVAL_PROTOCOL,
    TAG_JOB_NAME,
    TAG_PARENT,
    TAG_RUN_NAME,
    TAG_SELECTED_STEP,
    TAG_STAGE,
    TAG_SUBJECT,
    client,
    compare_run_name,
    stage_runs,
)

METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T"), ("pres", "PRES"), ("div", "DIV"))
# The paper's Stable Diffusion figures (Table 1) and its real-image upper bound.
REFERENCE_ROWS = (
    ("paper: DreamBooth (Stable Diffusion)", {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}),
    ("paper: real images", {"dino": 0.774, "clip_i": 0.885}),
)
RUN_COLOUR = "#d62728"  # every run's marker; nothing else in the plots uses it
REFERENCE_COLOUR = "#7f7f7f"
# A catalogue's comparison stays readable: past this many runs (subjects in the per-subject plot) the plots
# show distributions instead of labelled points, the sample sheet the best and worst by DINO, and the
# printed table its first rows (the files hold every run).
LABELLED_POINTS = 40
SHEET_RUNS = 24
PRINTED_ROWS = 40
TABLE_MD, TABLE_CSV = "comparison.md", "comparison.csv"
SCATTER_PNG, PER_SUBJECT_PNG, SHEET_PNG = "dino_vs_clip_t.png", "metrics_per_subject.png", "sample_sheet.png"
COST_PNG = "dino_vs_cost.png"


@dataclass(frozen=True)
class ComparedRun:
    run_id: str
    subject: str
    class_noun: str
    batch: str  # the KFP job it ran in
    started: int
    metrics: dict[str, float]
    steps: str  # trained, or `400 of 1000` when evaluation.select kept an earlier step
    learning_rate: str
    method: str
    training_seconds: Optional[float]
    protocol: str  # JSON of the evaluation protocol
    sample_prompts: list[str]
    accelerator_seconds: Optional[float] = None  # what its stages took (tracking.cost)
    cost: Optional[float] = None  # their estimated cost, from cost.prices

    @property
    def label(self) -> str:
        return f"{self.subject} {self.run_id[:6]}"


def _compared(run) -> ComparedRun:
    tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
    return ComparedRun(
        run_id=run.info.run_id,
        subject=tags.get(TAG_SUBJECT) or tags.get(TAG_RUN_NAME, run.info.run_id[:8]),
        class_noun=tags.get(TAG_CLASS_NOUN, ""),
        batch=tags.get(TAG_JOB_NAME, ""),
        started=run.info.start_time,
        metrics={name: metrics[f"eval/{name}"] for name, _ in METRICS if f"eval/{name}" in metrics},
        steps=steps_cell(params.get("training.max_steps", ""), tags.get(TAG_SELECTED_STEP)),
        learning_rate=params.get("training.learning_rate", ""),
        method=params.get("training.method", "full"),
        training_seconds=metrics.get("train_seconds"),
        protocol=tags.get(TAG_EVAL_PROTOCOL, ""),
        sample_prompts=json.loads(params.get("samples.prompts", "[]")),
        accelerator_seconds=metrics.get(ACCELERATOR_SECONDS),
        cost=metrics.get(ESTIMATED),
    )


def select_runs(tracking_uri: str, batch_run: Optional[str] = None, experiment: Optional[str] = None,
                run_ids: Optional[list[str]] = None) -> list[ComparedRun]:
    """Evaluated subject runs: a batch's (including the up-to-date subjects' earlier runs), an experiment's, or the ones named."""
    mlflow = client(tracking_uri)
    if batch_run:
        from dreambooth.catalogue.planning import read_plan

        try:
            batch = mlflow.get_run(batch_run)
        except Exception:
            raise InputError(f"--batch-run: {batch_run}: no such MLflow run in {tracking_uri}") from None
        if batch.data.tags.get(TAG_STAGE) != STAGE_BATCH:
            raise InputError(f"--batch-run: {batch_run} is a {batch.data.tags.get(TAG_STAGE, 'non-pipeline')} run; "
                             "name a batch run (the one a `run` or `submit` printed)")
        plan = read_plan(tracking_uri, batch_run)  # a sharded batch's: every shard's subjects
        run_ids = [subject.up_to_date_run_id or subject.subject_run_id for subject in plan.subjects]
        runs = [mlflow.get_run(run_id) for run_id in run_ids if run_id]
    elif experiment:
        found = mlflow.get_experiment_by_name(experiment)
        if found is None:
            raise InputError(f"--experiment: no MLflow experiment named {experiment!r}")
        runs = stage_runs(tracking_uri, experiment, STAGE_SUBJECT)
    else:
        runs = []
        for run_id in run_ids or []:
            try:
                run = mlflow.get_run(run_id)
            except Exception:
                raise InputError(f"--runs: {run_id}: no such MLflow run") from None
            if run.data.tags.get(TAG_STAGE) != STAGE_SUBJECT:
                raise InputError(f"--runs: {run_id} is a {run.data.tags.get(TAG_STAGE, 'non-pipeline')} run; name subject runs")
            runs.append(run)
    compared = [_compared(run) for run in runs if "eval/dino" in run.data.metrics]
    return sorted(compared, key=lambda run: (run.subject, run.started))


def protocol_differences(runs: list[ComparedRun]) -> dict[str, list]:
    """{protocol field: the distinct values among the runs} for every field that is not the same everywhere."""
    protocols = [json.loads(run.protocol) if run.protocol else {} for run in runs]
    fields = sorted({key for protocol in protocols for key in protocol})
    differences = {}
    for key in fields:
        values = sorted({json.dumps(protocol.get(key)) for protocol in protocols})
        if len(values) > 1:
            differences[key] = [json.loads(value) for value in values]
    return differences


def _number(value) -> str:
    return "" if value is None else f"{value:.3f}"


def write_table(runs: list[ComparedRun], protocol_ids: dict[str, str], output_dir: Path) -> tuple[Path, Path]:
    header = ["run", "subject", "class", "batch", *[title for _, title in METRICS], "steps", "learning rate", "method", "training s",
              "accelerator s", "cost", "protocol"]
    rows = [
        [run.run_id, run.subject, run.class_noun, run.batch, *[_number(run.metrics.get(name)) for name, _ in METRICS],
         run.steps, run.learning_rate, run.method, "" if run.training_seconds is None else f"{run.training_seconds:.0f}",
         "" if run.accelerator_seconds is None else f"{run.accelerator_seconds:.0f}", "" if run.cost is None else f"{run.cost:.2f}",
         protocol_ids[run.protocol]]
        for run in runs
    ]
    references = [["", label, "", "", *[_number(values.get(name)) for name, _ in METRICS], "", "", "", "", "", "", "reference"]
                  for label, values in REFERENCE_ROWS]
    with open(output_dir / TABLE_CSV, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows + references)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"`{cell[:8]}`" if i == 0 and cell else cell for i, cell in enumerate(row)) + " |" for row in rows]
    lines += ["| " + " | ".join(f"*{cell}*" if cell else "" for cell in row) + " |" for row in references]
    if len(protocol_ids) > 1:
        lines += ["", "Evaluation protocols (compared with --force):", ""]
        lines += [f"- **{letter}**: `{protocol}`" for protocol, letter in protocol_ids.items()]
    (output_dir / TABLE_MD).write_text("# Run comparison\n\n" + "\n".join(lines) + "\n")
    return output_dir / TABLE_MD, output_dir / TABLE_CSV


def _dino_scatter(runs: list[ComparedRun], x_of, xlabel: str, title: str, path: Path, reference: Optional[tuple] = None) -> Path:
    """DINO (subject fidelity) against x_of(run), one labelled point per run; `reference`: (x, dino, label)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5), dpi=100)
    if len(runs) > LABELLED_POINTS:  # a catalogue: where the runs lie, not thousands of overlapping labels
        shown = axes.hexbin([x_of(run) for run in runs], [run.metrics["dino"] for run in runs], gridsize=30, mincnt=1, cmap="Blues")
        figure.colorbar(shown, ax=axes, label="runs")
        title = f"{title.split(',')[0]}, {len(runs)} runs"
    for run in runs if len(runs) <= LABELLED_POINTS else []:
        axes.scatter(x_of(run), run.metrics["dino"], s=90, color=RUN_COLOUR, zorder=3)
        axes.annotate(run.label, (x_of(run), run.metrics["dino"]), textcoords="offset points", xytext=(7, 5), fontsize=8)
    if reference:
        axes.scatter(reference[0], reference[1], marker="*", s=140, color=REFERENCE_COLOUR, zorder=2)
        axes.annotate(reference[2], reference[:2], textcoords="offset points", xytext=(7, -10), fontsize=8)
    axes.set_xlabel(xlabel)
    axes.set_ylabel("DINO (subject fidelity)")
    axes.set_title(title)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def plot_scatter(runs: list[ComparedRun], path: Path) -> Path:
    """DINO (subject fidelity) against CLIP-T (prompt fidelity): up and right is better."""
    paper = REFERENCE_ROWS[0][1]
    return _dino_scatter(runs, lambda run: run.metrics["clip_t"], "CLIP-T (prompt fidelity)", "DINO against CLIP-T, one point per run",
                         path, (paper["clip_t"], paper["dino"], "paper (SD)"))


def plot_quality_against_cost(runs: list[ComparedRun], path: Path) -> Path:
    """DINO against what the run cost (its estimate where every run has one, else its accelerator-seconds):
    up and left is better."""
    priced = all(run.cost is not None for run in runs)
    return _dino_scatter(runs, lambda run: run.cost if priced else (run.accelerator_seconds or 0.0),
                         "estimated cost (cost.prices)" if priced else "accelerator-seconds",
                         "Subject fidelity against cost, one point per run", path)


def plot_per_subject(runs: list[ComparedRun], path: Path) -> Path:
    """One panel per metric; x: the subjects, one point per run of that subject (earlier runs to the left)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subjects = sorted({run.subject for run in runs})
    by_subject = {subject: [run for run in runs if run.subject == subject] for subject in subjects}
    figure, panels = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.6), dpi=100)
    if len(subjects) > LABELLED_POINTS:  # a catalogue: each metric's distribution over the runs
        for panel, (name, title) in zip(panels, METRICS):
            panel.hist([run.metrics[name] for run in runs if name in run.metrics], bins=30, color=RUN_COLOUR)
            panel.set_title(f"{title} over {len(runs)} runs" + (" (lower is better)" if name == "pres" else ""), fontsize=9)
            panel.set_ylabel("runs")
            panel.grid(alpha=0.3)
        subjects = []
    for panel, (name, title) in zip(panels, METRICS) if subjects else []:
        for x, subject in enumerate(subjects):
            members = [run for run in by_subject[subject] if name in run.metrics]
            for i, run in enumerate(members):
                offset = (i - (len(members) - 1) / 2) * 0.18
                panel.scatter(x + offset, run.metrics[name], s=40, color=RUN_COLOUR, zorder=3)
        panel.set_xticks(range(len(subjects)), subjects, rotation=45, ha="right", fontsize=8)
        panel.set_xlim(-0.7, len(subjects) - 0.3)
        panel.set_title(title + (" (lower is better)" if name == "pres" else ""), fontsize=9)
        panel.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return path


def _sample_file(files: list[str], prompt_index: int) -> Optional[str]:
    """The fine-tuned sample of prompt p with the lowest seed, e.g. samples/fine-tuned-p00-s1234.png."""
    prefix = f"fine-tuned-p{prompt_index:02d}-s"
    matches = [name for name in files if Path(name).name.startswith(prefix)]
    return min(matches, key=lambda name: int(Path(name).stem.rsplit("-s", 1)[-1])) if matches else None


def sample_sheet(tracking_uri: str, runs: list[ComparedRun], path: Path) -> tuple[Path, int]:
    """Rows: runs; columns: the sample prompts; each tile the same prompt and seed. Returns (path, tiles)."""
    from PIL import Image

    from dreambooth.images import labelled_grid

    mlflow = client(tracking_uri)
    prompts = max((run.sample_prompts for run in runs), key=len, default=[])
    rows, tiles = [], 0
    if len(runs) > SHEET_RUNS:  # the best and the worst by DINO: what a reviewer of a catalogue looks at
        ranked = sorted(runs, key=lambda run: run.metrics.get("dino", 0.0), reverse=True)
        runs = ranked[: SHEET_RUNS // 2] + ranked[-(SHEET_RUNS // 2):]
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            files = [artifact.path for artifact in mlflow.list_artifacts(run.run_id, "samples")]
            cells, seeds = [], set()
            for p, template in enumerate(prompts):
                name = _sample_file(files, p)
                label = template.replace("{identifier}", "[V]").replace("{class_noun}", run.class_noun)
                if name is None:
                    cells.append((f"{label}: no sample", Image.new("RGB", (64, 64), "lightgray")))
                    continue
                local = mlflow.download_artifacts(run.run_id, name, scratch)
                with Image.open(local) as image:
                    cells.append((label, image.convert("RGB")))
                seeds.add(Path(name).stem.rsplit("-s", 1)[-1])
                tiles += 1
            if cells:
                rows.append((f"{run.subject} ({run.class_noun}), run {run.run_id[:8]}, {run.batch}, seed {'/'.join(sorted(seeds))}", cells))
        if not rows:
            raise InputError("compare: none of the runs has sample prompts to show")
        labelled_grid(rows).save(path)
    return path, tiles


def _log_comparison(tracking_uri: str, runs: list[ComparedRun], files: list[Path], batch_run: Optional[str]) -> str:
    """An MLflow run of its own for the comparison (a child of the batch run when comparing one)."""
    mlflow = client(tracking_uri)
    first = mlflow.get_run(runs[0].run_id)
    tags = {
        TAG_STAGE: STAGE_COMPARE, TAG_RUN_NAME: compare_run_name(len(runs)),
        TAG_COMPARED_RUNS: ",".join(r.run_id for r in runs),
        TAG_COMPARED_SUBJECTS: ",".join(sorted({r.subject for r in runs})),
    }
    if batch_run:
        tags[TAG_PARENT] = batch_run
    run = mlflow.create_run(first.info.experiment_id, tags=tags)
    for path in files:
        mlflow.log_artifact(run.info.run_id, str(path))
    mlflow.set_terminated(run.info.run_id, "FINISHED")
    return run.info.run_id


def _experiment_tables(tracking_uri: str, batch_run: str, output_dir: Path) -> list[Path]:
    """An experiment batch's paper tables, rendered again from its runs (none for a plain batch)."""
    from dreambooth.reports.paper_tables import experiment_runs, fill_tables, write_tables
    from dreambooth.catalogue.planning import read_plan

    plan = read_plan(tracking_uri, batch_run)
    if not any(subject.experiment for subject in plan.subjects):
        return []
    return write_tables(fill_tables(experiment_runs(tracking_uri, plan)), f"Experiment (batch run {batch_run})", output_dir / "experiment")


def compare_runs(tracking_uri: str, output_dir: Path, batch_run: Optional[str] = None, experiment: Optional[str] = None,
                 run_ids: Optional[list[str]] = None, force: bool = False) -> int:
    runs = select_runs(tracking_uri, batch_run, experiment, run_ids)
    if not runs:
        raise InputError("compare: no evaluated subject runs found there (runs need the evaluate stage's eval/* metrics)")
    differences = protocol_differences(runs)
    if differences and not force:
        described = "; ".join(f"{key} ({', '.join(map(str, values))})" for key, values in differences.items())
        raise InputError(f"compare: the runs were evaluated under different protocols: {described}; "
                         "use --force to compare them anyway, each row marked with its protocol")
    protocol_ids = {protocol: chr(ord("A") + i) for i, protocol in enumerate(sorted({run.protocol for run in runs}))}
    output_dir.mkdir(parents=True, exist_ok=True)
    table_md, table_csv = write_table(runs, protocol_ids, output_dir)
    scatter = plot_scatter(runs, output_dir / SCATTER_PNG)
    per_subject = plot_per_subject(runs, output_dir / PER_SUBJECT_PNG)
    costed = plot_quality_against_cost(runs, output_dir / COST_PNG) if all(run.accelerator_seconds is not None for run in runs) else None
    sheet, tiles = sample_sheet(tracking_uri, runs, output_dir / SHEET_PNG)
    experiment_files = _experiment_tables(tracking_uri, batch_run, output_dir) if batch_run else []
    plots = [scatter, per_subject, *([costed] if costed else [])]
    comparison_run = _log_comparison(tracking_uri, runs, [table_md, table_csv, *plots, sheet, *experiment_files], batch_run)
    table = table_md.read_text().splitlines()
    print("\n".join(table[: PRINTED_ROWS + 4]))  # the title and header, then the first rows
    if len(table) > PRINTED_ROWS + 4:
        print(f"... {len(table) - PRINTED_ROWS - 4} more rows in {table_md}")
    if experiment_files:
        print(experiment_files[0].read_text())
        print(f"{'experiment:':<14}{experiment_files[0].parent} (the paper's tables as Markdown, CSV and PNG)")
    if differences:
        print(f"warning: compared across {len(protocol_ids)} evaluation protocols (--force); rows are marked A, B, ...")
    shown = (("table", table_md), ("csv", table_csv), ("scatter", scatter), ("per subject", per_subject), ("vs cost", costed), ("sample sheet", sheet))
    for label, path in [(label, path) for label, path in shown if path]:
        print(f"{label + ':':<14}{path}")
    if len(runs) > SHEET_RUNS:
        print(f"{'sample sheet:':<14}{SHEET_RUNS} of {len(runs)} runs (the {SHEET_RUNS // 2} best and the {SHEET_RUNS // 2} worst by DINO)")
    print(f"{'mlflow run:':<14}{comparison_run} ({len(runs)} runs, {tiles} sample tiles)")
    return 0
