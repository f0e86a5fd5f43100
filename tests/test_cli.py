"""The command line as a new user meets it: every subcommand, given one bad input, ends in one line
naming the thing and the fix, exit 2, within 30 s, with no traceback and nothing new in the folder it
was started from (no empty mlflow.db, no half-made output folder, no MLflow run for a refused command)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from conftest import REPO, SAMPLE_SUBJECT

# {subcommand: (its arguments with one bad input, what the one line must name)}. Every subcommand has one.
BAD_INPUTS = {
    "compile": (["--config", "tiny", "--output", "missing/pipeline.yaml"], "--output: missing is not a folder here"),
    "run": (["--config", "tiny", "--subject-dir", "missing-photos", "--class-noun", "dog"], "missing-photos"),
    "ingest": (["--config", "tiny", "--subject-dir", "missing-photos", "--class-noun", "dog", "--output-dir", "out"],
               "missing-photos: subject folder not found"),
    "evaluate": (["--config", "tiny", "--model", "./missing-model", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog"],
                 "--model: './missing-model' is not a folder here"),
    "experiment": (["missing-experiment.yaml", "--config", "tiny"], "missing-experiment.yaml: file not found"),
    "preflight": (["--config", "tiny", "--subjects-uri", "s3://bucket/subjects.yaml"], "--subjects-uri: 's3://bucket/subjects.yaml': s3://"),
    "warm-cache": (["--config", "sd16"], "--config sd16: no shipped config of that name; did you mean sd15?"),
    "submit": (["--config", "tiny", "--host", "http://127.0.0.1:9", "--subjects-uri", "gs://bucket/subjects.yaml"],
               "config 'tiny': no `cluster` section"),
    "schedule": (["--config", "gke-sd15", "--host", "http://127.0.0.1:9", "--subjects-uri", "gs://bucket/subjects.yaml",
                  "--cron", "0 2 * * *"], "--cron: '0 2 * * *' has 5 fields"),
    "schedules": (["pause", "--host", "http://127.0.0.1:9"], "schedules pause: give --name NAME"),
    "sync-tracking": (["--config", "tiny", "--output-dir", "s3://bucket/x"], "--output-dir: 's3://bucket/x': s3://"),
    "models": (["--tracking-uri", "http://127.0.0.1:9"], "tracking: the MLflow server at http://127.0.0.1:9 does not answer"),
    "promote": (["--model", "dreambooth-dog", "--version", "1", "--to", "champion"], "tracking: no MLflow store at"),
    "compare": (["--batch-run", "0123456789abcdef"], "tracking: no MLflow store at"),
    "forget": (["--subject", "dog"], "tracking: no MLflow store at"),
    "configs": (["--bogus"], "unrecognized arguments: --bogus"),
    "config": (["show", "--config", "sd16"], "--config sd16: no shipped config of that name"),
    "watermark": (["check", "missing.png"], "missing.png: no such image file"),
    "components": (["--output", "a-file.txt"], "--output: a-file.txt is a file; give a folder"),
}


def _every_subcommand() -> set[str]:
    from dreambooth.cli import _parser

    (commands,) = [action for action in _parser()._actions if action.dest == "command"]
    return set(commands.choices)


def _files(folder) -> set[str]:
    return {str(path.relative_to(folder)) for path in folder.rglob("*")}


def test_every_subcommand_has_a_bad_input_case():
    assert set(BAD_INPUTS) == _every_subcommand()


def test_every_subcommand_refuses_bad_input_in_one_line_and_leaves_nothing_behind(tmp_path):
    (tmp_path / "a-file.txt").write_text("not a folder\n")
    before = _files(tmp_path)
    env = {key: value for key, value in os.environ.items() if key != "MLFLOW_TRACKING_URI"}
    # Side by side: each is an interpreter start (seconds); one at a time they would take a minute.
    started = time.monotonic()
    running = {command: subprocess.Popen([sys.executable, str(REPO / "pipeline.py"), command, *arguments], cwd=tmp_path, env=env,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
               for command, (arguments, _) in BAD_INPUTS.items()}
    problems = []
    for command, process in running.items():
        stdout, stderr = process.communicate(timeout=120)
        lines = stderr.strip().splitlines()
        expected = BAD_INPUTS[command][1]
        if process.returncode != 2 or len(lines) != 1 or not lines[0].startswith("error: ") or expected not in lines[0] or stdout.strip():
            problems.append(f"{command}: exit {process.returncode}, stdout {stdout.strip()[:200]!r}, stderr {stderr.strip()[-400:]!r}")
    elapsed = time.monotonic() - started
    assert problems == []
    assert _files(tmp_path) == before, "a refused command left files behind"
    assert elapsed < 60  # 18 interpreters on 2 cores; each command alone answers in a few seconds


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the refusal is for machines without CUDA")
def test_run_without_a_config_on_a_machine_without_cuda_names_the_tiny_and_the_gpu_configs(tmp_path):
    result = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "run", "--subject-dir", str(SAMPLE_SUBJECT), "--class-noun", "dog"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --config: not given, and this machine has no CUDA GPU for the default (sd15)")
    assert "--config tiny" in line and "sd15, sdxl-lora" in line
    assert list(tmp_path.iterdir()) == []  # no store, no outputs, nothing downloaded


def test_a_subjects_file_naming_photos_that_are_not_there_is_refused_before_any_class_image_is_drawn(tmp_path):
    (tmp_path / "subjects.yaml").write_text(f"subjects:\n  - {{id: rex, photos: {tmp_path / 'rex'}, class_noun: dog}}\n"
                                            f"  - {{id: dog, photos: {SAMPLE_SUBJECT}, class_noun: dog}}\n")
    started = time.monotonic()
    result = subprocess.run([sys.executable, str(REPO / "pipeline.py"), "run", "--config", "tiny", "--subjects", "subjects.yaml"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr == f"error: subjects: no photos at {tmp_path / 'rex'}\n"
    assert time.monotonic() - started < 30
    assert sorted(path.name for path in tmp_path.iterdir()) == ["subjects.yaml"]  # no priors, outputs or store
