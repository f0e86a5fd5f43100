"""The batch summary: one row per subject, read from the subject runs in MLflow.

The same rows become the batch run's MLflow table and Markdown, the KFP Markdown and HTML outputs
(the HTML shows each subject's sample grid inline), and the lines `dreambooth run` prints.
"""

from __future__ import annotations

import html
import math
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from dreambooth.catalogue.planning import BatchPlan
from dreambooth.reports.pages import inline_image, page, thumbnail_jpeg
from dreambooth.tracking.cost import ACCELERATOR_SECONDS, ESTIMATED
from dreambooth.tracking import (
    FAILED,
    TAG_CLASS_NOUN,
    TAG_ERROR,
    TAG_FAILED_STAGE,
    TAG_GATE,
    TAG_GATE_REASON,
    TAG_MODEL_LOCATION,
    TAG_REGISTERED,
    TAG_REGISTERED_VERSION,
    TAG_SELECTED_STEP,
    TAG_SUBJECT,
    TAG_SUBJECT_STATUS,
    TRAINED,
    client,
    close_subject_run,
    runs_by_id,
)

UP_TO_DATE = "up to date"
SUMMARY_TABLE = "batch_summary.json"  # the summary on the batch run: its table, Markdown and HTML page
SUMMARY_MARKDOWN, SUMMARY_PAGE = "batch_summary.md", "batch_summary.html"
METRICS = {
    "dino": "eval/dino", "clip_i": "eval/clip_i", "clip_t": "eval/clip_t", "pres": "eval/pres", "div": "eval/div",
    # The learning check: relative change of the denoising loss, fine-tuned vs base (negative: lower).
    "subject_loss_change": "learn/subject_loss_change", "class_loss_change": "learn/class_loss_change",
}
NUMBERS = ("steps", "selected_step", "training_seconds", "accelerator_seconds", "cost")  # numeric columns besides METRICS
GRID_ARTIFACT = "samples-grid.png"
THUMBNAIL_WIDTH = 640
# A catalogue's summary stays readable: its Markdown and HTML show pages of PAGE_ROWS rows (failed and
# rejected subjects first; the further pages logged under SUMMARY_PAGES, every row in SUMMARY_TABLE),
# and the page inlines the sample grids of at most GRIDS_SHOWN subjects (each subject's run has its own).
PAGE_ROWS = 200
GRIDS_SHOWN = 24
SUMMARY_PAGES = "batch_summary_pages"


@dataclass(frozen=True)
class SubjectRow:
    subject: str
    class_noun: str
    status: str  # trained, failed or up to date
    reason: str  # why it failed (stage: message), or why the gate rejected it
    steps: Optional[int]
    selected_step: Optional[int]  # evaluation.select: the step whose model was kept
    training_seconds: Optional[float]
    dino: Optional[float]
    clip_i: Optional[float]
    clip_t: Optional[float]
    pres: Optional[float]
    div: Optional[float]
    subject_loss_change: Optional[float]
    class_loss_change: Optional[float]
    gate: str  # passed, rejected, or "" when not evaluated
    registered: str  # "name@candidate (version N)" or ""
    registered_version: str
    mlflow_run: str
    model: str  # the fine-tuned folder (path or gs://)
    accelerator_seconds: Optional[float] = None  # what its stages took, summed (tracking.cost)
    cost: Optional[float] = None  # their estimated cost, from cost.prices


def row_from_run(run, status: str) -> SubjectRow:
    tags, metrics = run.data.tags, run.data.metrics
    reason = ""
    if status == FAILED:
        reason = f"{tags.get(TAG_FAILED_STAGE, '?')}: {tags.get(TAG_ERROR, 'unknown error')}"
    elif tags.get(TAG_GATE) == "rejected":
        reason = f"gate: {tags.get(TAG_GATE_REASON, '')}"
    steps = metrics.get("train_steps")
    return SubjectRow(
        subject=tags.get(TAG_SUBJECT, ""),
        class_noun=tags.get(TAG_CLASS_NOUN, ""),
        status=status,
        reason=reason,
        steps=int(steps) if steps is not None else None,
        selected_step=int(tags[TAG_SELECTED_STEP]) if TAG_SELECTED_STEP in tags else None,
        training_seconds=metrics.get("train_seconds"),
        **{name: metrics.get(key) for name, key in METRICS.items()},
        gate=tags.get(TAG_GATE, ""),
        registered=tags.get(TAG_REGISTERED, ""),
        registered_version=tags.get(TAG_REGISTERED_VERSION, ""),
        mlflow_run=run.info.run_id,
        model=tags.get(TAG_MODEL_LOCATION, ""),
        accelerator_seconds=metrics.get(ACCELERATOR_SECONDS),
        cost=metrics.get(ESTIMATED),
    )


def subject_row(tracking_uri: str, run_id: str, close: bool = False) -> SubjectRow:
    """A subject run's row; with close, the run is closed first (FINISHED, or FAILED with its reason)."""
    mlflow = client(tracking_uri)
    run = mlflow.get_run(run_id)
    status = close_subject_run(tracking_uri, run) if close else run.data.tags.get(TAG_SUBJECT_STATUS, "")
    return row_from_run(mlflow.get_run(run_id), status)


def collect_rows(tracking_uri: str, plan: BatchPlan, close_runs: bool = False, known_runs: Optional[dict] = None) -> list[SubjectRow]:
    """A row per planned subject, in the subjects file's order (close_runs: see subject_row; known_runs:
    {run id: run} already read, e.g. by the plan, and not read again)."""
    closed = {subject.subject_id: subject_row(tracking_uri, subject.subject_run_id, close=True)
              for subject in plan.subjects if close_runs and not subject.up_to_date}
    # The plan names each run (a sharded batch's subjects sit under their shards' batch runs): read in pages.
    runs = dict(known_runs or {})
    wanted = [run_id for subject in plan.subjects if subject.subject_id not in closed
              for run_id in [subject.up_to_date_run_id or subject.subject_run_id] if run_id not in runs]
    if wanted:
        runs.update(runs_by_id(tracking_uri, client(tracking_uri).get_run(plan.batch_run_id).info.experiment_id, wanted))
    rows = []
    for subject in plan.subjects:
        if subject.subject_id in closed:
            rows.append(closed[subject.subject_id])
        elif subject.up_to_date:
            rows.append(row_from_run(runs[subject.up_to_date_run_id], UP_TO_DATE))
        else:
            run = runs[subject.subject_run_id]
            rows.append(row_from_run(run, run.data.tags.get(TAG_SUBJECT_STATUS, "")))
    return rows


def as_table(rows: list[SubjectRow]) -> dict[str, list]:
    """Columns for mlflow log_table (missing numbers as NaN, so the columns stay numeric)."""
    columns: dict[str, list] = {name: [] for name in asdict(rows[0])} if rows else {}
    for row in rows:
        for name, value in asdict(row).items():
            columns[name].append(float("nan") if value is None and name in (*METRICS, *NUMBERS) else value)
    return columns


def _number(value: Optional[float], digits: int = 3) -> str:
    return "" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def counts(rows: list[SubjectRow]) -> dict[str, int]:
    tally = {"trained": 0, FAILED: 0, UP_TO_DATE: 0}
    for row in rows:
        tally[row.status] = tally.get(row.status, 0) + 1
    return tally


def headline(rows: list[SubjectRow]) -> str:
    tally = counts(rows)
    return f"{len(rows)} subjects: {tally['trained']} trained, {tally[UP_TO_DATE]} up to date, {tally[FAILED]} failed"


def steps_cell(steps, selected_step) -> str:
    """Steps trained, and the one kept when evaluation.select chose an earlier one: `400 of 1000`."""
    if selected_step is None or str(selected_step) == str(steps):
        return str(steps or "")
    return f"{selected_step} of {steps}"


def _percent(change: Optional[float]) -> str:
    return "" if change is None or math.isnan(change) else f"{100 * change:+.1f}%"


def summary_pages(rows: list[SubjectRow]) -> list[list[SubjectRow]]:
    """The rows in pages of PAGE_ROWS, the failed and rejected subjects first (what needs a look); one page
    keeps the file's order."""
    if len(rows) <= PAGE_ROWS:
        return [rows]
    attention = [row for row in rows if row.status == FAILED or row.gate == "rejected"]
    ordered = attention + [row for row in rows if not (row.status == FAILED or row.gate == "rejected")]
    return [ordered[start : start + PAGE_ROWS] for start in range(0, len(ordered), PAGE_ROWS)] or [[]]


def _page_note(number: int, count: int) -> str:
    if count == 1:
        return ""
    return (f"Page {number} of {count} ({PAGE_ROWS} subjects a page, failed and rejected first; pages 2-{count} are "
            f"{SUMMARY_PAGES}/page-NNN.md on the batch run, every row is in {SUMMARY_TABLE}).")


def as_markdown(rows: list[SubjectRow], title: str, shown: Optional[list[SubjectRow]] = None, note: str = "") -> str:
    """The headline of all `rows`, then a table of `shown` (default: all of them)."""
    lines = [
        f"# {title}", "", headline(rows), "", *([note, ""] if note else []),
        "| subject | class | status | steps | training s | accelerator s | cost | DINO | CLIP-I | CLIP-T | PRES | DIV | subject loss | class loss | registered | reason |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows if shown is None else shown:
        lines.append(
            f"| {row.subject} | {row.class_noun} | **{row.status}** | {steps_cell(row.steps, row.selected_step)} | {_number(row.training_seconds, 0)} | "
            f"{_number(row.accelerator_seconds, 0)} | {_number(row.cost, 2)} | "
            f"{_number(row.dino)} | {_number(row.clip_i)} | {_number(row.clip_t)} | {_number(row.pres)} | {_number(row.div)} | "
            f"{_percent(row.subject_loss_change)} | {_percent(row.class_loss_change)} | "
            f"{row.registered_version and 'v' + row.registered_version} | {row.reason.replace('|', '/')} |"
        )
    return "\n".join(lines) + "\n"


def sample_grids(tracking_uri: str, rows: list[SubjectRow]) -> dict[str, bytes]:
    """Sample grids as JPEG thumbnails (a page of many subjects stays small), where a run has one: of at most
    GRIDS_SHOWN subjects, those trained in this batch first."""
    mlflow = client(tracking_uri)
    grids = {}
    candidates = [row for row in rows if row.status == TRAINED] + [row for row in rows if row.status not in (TRAINED, FAILED)]
    candidates = candidates[: 2 * GRIDS_SHOWN]  # a run without a grid (no samples stage) costs a look, not a page of them
    with tempfile.TemporaryDirectory() as scratch:
        for row in candidates:
            if len(grids) == GRIDS_SHOWN:
                break
            try:
                path = mlflow.download_artifacts(row.mlflow_run, GRID_ARTIFACT, str(Path(scratch) / row.subject))
            except Exception:  # no samples stage ran for it (evaluated elsewhere, or a run from before grids)
                continue
            grids[row.subject] = thumbnail_jpeg(Path(path), THUMBNAIL_WIDTH)
    return grids


def as_html(rows: list[SubjectRow], title: str, grids: dict[str, bytes], shown: Optional[list[SubjectRow]] = None, note: str = "") -> str:
    """A self-contained page (images inline), which the KFP UI renders as an HTML output: the headline of all
    `rows`, a table of `shown` (default: all of them)."""
    cells = ("subject", "class_noun", "status", "steps", "dino", "clip_i", "clip_t", "pres", "div", "registered", "reason")
    header = "".join(f"<th>{html.escape(name)}</th>" for name in cells)
    body = []
    for row in rows if shown is None else shown:
        values = asdict(row)
        values["steps"] = steps_cell(row.steps, row.selected_step)
        rendered = [_number(values[name]) if name in METRICS else html.escape(str(values[name] or "")) for name in cells]
        body.append("<tr>" + "".join(f"<td>{value}</td>" for value in rendered) + "</tr>")
    sections = [
        f"<h3>{html.escape(row.subject)} ({html.escape(row.class_noun)})</h3>{inline_image(grids[row.subject], row.subject + ' samples')}"
        for row in rows if row.subject in grids
    ]
    notes = f"<p>{html.escape(headline(rows))}</p>" + (f"<p>{html.escape(note)}</p>" if note else "")
    return page(title, f"{notes}<table><tr>{header}</tr>{''.join(body)}</table>{''.join(sections)}")


def log_summary(tracking_uri: str, plan: BatchPlan, job_name: str, close_runs: bool = False,
                known_runs: Optional[dict] = None) -> tuple[list, str, str]:
    """The summary's rows, Markdown and HTML page (with the sample grids), logged on the batch run."""
    rows = collect_rows(tracking_uri, plan, close_runs=close_runs, known_runs=known_runs)
    title = f"DreamBooth batch {job_name}"
    pages = summary_pages(rows)
    first = _page_note(1, len(pages))
    markdown = as_markdown(rows, title, pages[0], first)
    page = as_html(rows, title, sample_grids(tracking_uri, pages[0]), pages[0], first)
    mlflow = client(tracking_uri)
    if rows:
        mlflow.log_table(plan.batch_run_id, data=as_table(rows), artifact_file=SUMMARY_TABLE)
    mlflow.log_text(plan.batch_run_id, markdown, SUMMARY_MARKDOWN)
    mlflow.log_text(plan.batch_run_id, page, SUMMARY_PAGE)
    for number, shown in enumerate(pages[1:], start=2):
        mlflow.log_text(plan.batch_run_id, as_markdown(rows, title, shown, _page_note(number, len(pages))), f"{SUMMARY_PAGES}/page-{number:03d}.md")
    return rows, markdown, page
