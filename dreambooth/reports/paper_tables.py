"""The DreamBooth paper's four tables, filled from an experiment's runs, with the paper's figures beside ours.

Each cell is the mean over the experiment's subjects of one figure of one variant's runs, with its
spread (standard deviation) and how many subjects it covers; a row whose variant the experiment
does not have, or whose runs all failed, says `missing`, never zero. Which variant fills a row is
decided by what it tests (dreambooth.catalogue.experiments roles); the real-images row is the evaluation's own
figure (photos against each other); the number-of-photos table has a row per photo count trained
with. Written as Markdown, CSV and one PNG per table.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from PIL import Image, ImageDraw, ImageFont

from dreambooth.catalogue.experiments import BASELINE, NO_CLASS, NO_PRIOR, PHOTOS, TEXTUAL_INVERSION, WRONG_CLASS

TITLES = {"dino": "DINO", "clip_i": "CLIP-I", "clip_t": "CLIP-T", "pres": "PRES", "div": "DIV"}
REAL_IMAGES = "real images"  # a row source: the photos' own figures, not a variant


@dataclass(frozen=True)
class TableRow:
    label: str
    source: str  # a role, BASELINE, REAL_IMAGES or f"{PHOTOS}:{k}"
    paper: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PaperTable:
    name: str
    title: str
    metrics: tuple[str, ...]
    rows: tuple[TableRow, ...]
    paper_columns: tuple[str, ...] = ()  # the paper's figures, when they are not ours' metric names (per-subject)


# The DreamBooth paper's figures (Stable Diffusion, DreamBench: 30 subjects, 25 prompts, 4 images each).
TABLES = (
    PaperTable("method", "Method comparison", ("dino", "clip_i", "clip_t"), (
        TableRow("Real images", REAL_IMAGES, {"dino": 0.774, "clip_i": 0.885}),
        TableRow("DreamBooth (Stable Diffusion)", BASELINE, {"dino": 0.668, "clip_i": 0.803, "clip_t": 0.305}),
        TableRow("Textual Inversion (Stable Diffusion)", TEXTUAL_INVERSION, {"dino": 0.569, "clip_i": 0.780, "clip_t": 0.255}),
    )),
    PaperTable("class_noun", "Class noun", ("dino", "clip_i"), (
        TableRow("correct class", BASELINE, {"dino": 0.744, "clip_i": 0.853}),
        TableRow("no class noun", NO_CLASS, {"dino": 0.303, "clip_i": 0.607}),
        TableRow("wrong class", WRONG_CLASS, {"dino": 0.454, "clip_i": 0.728}),
    )),
    PaperTable("prior_preservation", "Prior preservation", ("pres", "div", "dino", "clip_i"), (
        TableRow("with prior preservation", BASELINE, {"pres": 0.493, "div": 0.391, "dino": 0.684, "clip_i": 0.815}),
        TableRow("without prior preservation", NO_PRIOR, {"pres": 0.664, "div": 0.371, "dino": 0.712, "clip_i": 0.828}),
    )),
    # Rows: the photo counts the experiment trained with (photos_limit variants, and the baseline's own count).
    PaperTable("photos", "Number of photos (DINO)", ("dino",), (), paper_columns=("backpack", "dog")),
)
PAPER_PHOTOS = {1: (0.494, 0.798), 2: (0.515, 0.851), 3: (0.596, 0.871), 4: (0.604, 0.876), 5: (0.597, 0.864)}  # backpack, dog


@dataclass(frozen=True)
class ExperimentRun:
    """One (subject, variant) of the experiment, with its evaluation figures (empty: it did not finish)."""

    subject: str
    variant: str
    roles: tuple[str, ...]
    photos_limit: Optional[int]
    figures: dict[str, float]
    photos: Optional[int] = None  # the photos it trained on (ingest's count), when it got that far


@dataclass(frozen=True)
class Cell:
    mean: Optional[float]  # None: missing
    spread: float = 0.0
    subjects: int = 0
    applies: bool = True  # false: the figure means nothing for this row (the photos' CLIP-T): n/a

    def text(self) -> str:
        if not self.applies:
            return "n/a"
        if self.mean is None:
            return "missing"
        return f"{self.mean:.3f} ± {self.spread:.3f} (n={self.subjects})" if self.subjects > 1 else f"{self.mean:.3f} (n=1)"


def _cell(values: list[float]) -> Cell:
    values = [value for value in values if value is not None and not math.isnan(value)]
    if not values:
        return Cell(None)
    mean = sum(values) / len(values)
    spread = math.sqrt(sum((value - mean) ** 2 for value in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return Cell(mean, spread, len(values))


def _runs_for(source: str, runs: list[ExperimentRun]) -> tuple[list[ExperimentRun], str]:
    """The runs a row draws on (one variant: the first that tests it), and which variant that is."""
    chosen = BASELINE if source in (BASELINE, REAL_IMAGES) else next((run.variant for run in runs if source in run.roles), "")
    return [run for run in runs if chosen and run.variant == chosen], chosen


def _photo_rows(runs: list[ExperimentRun]) -> list[tuple[TableRow, str, dict[str, "Cell"]]]:
    """A row per photo count trained with: the photos_limit variants, and the baseline at its own count
    (a subject with both at one count: the variant's figure)."""
    by_count: dict[int, dict[str, ExperimentRun]] = {}
    for run in runs:
        if run.variant != BASELINE and PHOTOS not in run.roles:
            continue
        count = run.photos or run.photos_limit
        if count is None:
            continue  # a baseline that never got its photos in: the method table says it is missing
        chosen = by_count.setdefault(count, {})
        if run.subject not in chosen or chosen[run.subject].variant == BASELINE:
            chosen[run.subject] = run
    rows = []
    for count, members in sorted(by_count.items()):
        paper = dict(zip(("backpack", "dog"), PAPER_PHOTOS[count])) if count in PAPER_PHOTOS else {}
        variants = ", ".join(sorted({run.variant for run in members.values()}))
        row = TableRow(f"{count} photo{'s' if count > 1 else ''}", f"{PHOTOS}:{count}", paper)
        rows.append((row, variants, {"dino": _cell([run.figures.get("dino") for run in members.values()])}))
    return rows


@dataclass(frozen=True)
class FilledTable:
    table: PaperTable
    rows: list[tuple[TableRow, str, dict[str, Cell]]]  # (row, the variant that filled it, cells by metric)

    def header(self) -> list[str]:
        paper = self.table.paper_columns or self.table.metrics
        return ["", "variant", *[f"{TITLES[m]} (ours)" for m in self.table.metrics],
                *[f"{TITLES.get(m, m)} (paper)" for m in paper]]

    def lines(self) -> list[list[str]]:
        paper = self.table.paper_columns or self.table.metrics
        return [[row.label, variant or "missing", *[cells[m].text() for m in self.table.metrics],
                 *[f"{row.paper[m]:.3f}" if m in row.paper else "" for m in paper]]
                for row, variant, cells in self.rows]


def experiment_runs(tracking_uri: str, plan) -> list[ExperimentRun]:
    """The experiment's (subject, variant) runs of a batch plan with their evaluation figures (up-to-date ones: their earlier run's)."""
    from dreambooth.tracking import client

    mlflow, runs = client(tracking_uri), []
    for planned in plan.subjects:
        if not planned.experiment:
            continue
        metrics = mlflow.get_run(planned.subject_run_id or planned.up_to_date_run_id).data.metrics
        figures = {key.removeprefix("eval/"): value for key, value in metrics.items() if key.startswith("eval/") and key.count("/") == 1}
        experiment = planned.experiment
        photos = metrics.get("subject_images")
        runs.append(ExperimentRun(experiment["subject"], experiment["variant"], tuple(experiment["roles"]),
                                  experiment.get("photos_limit"), figures, int(photos) if photos is not None else None))
    return runs


def fill_tables(runs: list[ExperimentRun]) -> list[FilledTable]:
    """The four tables, as far as the experiment's variants cover them."""
    filled = []
    for table in TABLES:
        if table.name == "photos":
            filled.append(FilledTable(table, _photo_rows(runs)))
            continue
        rows = []
        for row in table.rows:
            members, variant = _runs_for(row.source, runs)
            if row.source == REAL_IMAGES:  # the photos against each other, as the baseline's evaluation measured them
                cells = {metric: _cell([run.figures.get(f"real_images_{metric}") for run in members])
                         if metric in ("dino", "clip_i") else Cell(None, applies=False) for metric in table.metrics}
                variant = "the photos" if members else ""
            else:
                cells = {metric: _cell([run.figures.get(metric) for run in members]) for metric in table.metrics}
            rows.append((row, variant, cells))
        filled.append(FilledTable(table, rows))
    return filled


def as_markdown(tables: list[FilledTable], title: str) -> str:
    lines = [f"# {title}", "",
             "Each cell: the mean over subjects ± its standard deviation (n: subjects). The paper's figures are over "
             "DreamBench's 30 subjects with 25 prompts and 4 images each; ours follow this run's protocol.", ""]
    for filled in tables:
        header = filled.header()
        lines += [f"## {filled.table.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(line) + " |" for line in filled.lines()]
        lines.append("")
    return "\n".join(lines)


def as_csv(tables: list[FilledTable]) -> str:
    """One line per (table, row, metric): our mean, spread and subject count, and the paper's figure."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["table", "row", "variant", "metric", "ours_mean", "ours_std", "subjects", "paper"])
    for filled in tables:
        for row, variant, cells in filled.rows:
            for metric, cell in cells.items():
                # The paper's figure for this metric; per subject where the paper gives it so (backpack=..;dog=..).
                paper = ";".join(f"{key}={value}" for key, value in row.paper.items()) if filled.table.paper_columns \
                    else row.paper.get(metric, "")
                ours = ("", "") if cell.mean is None else (f"{cell.mean:.4f}", f"{cell.spread:.4f}")
                writer.writerow([filled.table.name, row.label, variant, metric, *ours, cell.subjects, paper])
    return buffer.getvalue()


def as_image(filled: FilledTable) -> Image.Image:
    """The table drawn as a PNG (a figure for a report)."""
    font = ImageFont.load_default()
    grid = [filled.header(), *filled.lines()]
    widths = [max(int(font.getlength(line[c])) for line in grid) + 16 for c in range(len(grid[0]))]
    line_height, top = 18, 26
    image = Image.new("RGB", (sum(widths) + 8, top + line_height * len(grid) + 8), "white")
    draw = ImageDraw.Draw(image)
    draw.text((6, 6), filled.table.title, fill="black", font=font)
    for r, line in enumerate(grid):
        y = top + r * line_height
        if r == 1:
            draw.line((4, y - 2, image.width - 4, y - 2), fill="gray")
        x = 6
        for c, text in enumerate(line):
            draw.text((x, y), text, fill="black" if text != "missing" else "firebrick", font=font)
            x += widths[c]
    return image


def write_tables(tables: list[FilledTable], title: str, folder: Path) -> list[Path]:
    """tables.md, tables.csv and table-<name>.png in `folder`; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tables.md").write_text(as_markdown(tables, title))
    (folder / "tables.csv").write_text(as_csv(tables))
    for filled in tables:
        as_image(filled).save(folder / f"table-{filled.table.name}.png")
    return [folder / "tables.md", folder / "tables.csv", *[folder / f"table-{f.table.name}.png" for f in tables]]
