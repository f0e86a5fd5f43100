"""What `run` shows: progress lines as tasks print them, and the console that turns kfp.local's
stream (threads of tasks writing at once) into task logs and one line per stage state change."""

import io
import threading

from dreambooth.progress import DONE, FAILED, RUNNING, ProgressEvent, StageProgress, parse
from dreambooth.commands.run_console import Board, PlainView, Row, TaskOutput


def test_a_progress_line_reads_back_even_after_a_progress_bar():
    event = ProgressEvent("dog", "fine-tune", RUNNING, 120, 1000, "steps", "loss 0.1234 · 3.21 steps/s")
    assert event.line() == "[progress] dog fine-tune running 120/1000 steps · loss 0.1234 · 3.21 steps/s"
    assert parse("    fine-tune:  12%|█▎   | 120/1000 [00:37<04:34]" + event.line()) == event
    assert parse("[progress] class:dog class-priors done · 61.0 s") == ProgressEvent("class:dog", "class-priors", DONE, detail="61.0 s")
    assert parse("progress: something else") is None
    assert event.counted() == "step 120/1000 · loss 0.1234 · 3.21 steps/s"


def test_a_stage_prints_its_counts_at_most_once_an_interval_but_always_the_last(monkeypatch):
    monkeypatch.setenv("DREAMBOOTH_PROGRESS_SECONDS", "3600")
    printed = []
    progress = StageProgress("dog", "evaluate", printed.append)
    progress.state(RUNNING)
    for done in range(1, 11):
        progress.update(done, 10, "images")
    progress.state(DONE)
    states = [parse(line) for line in printed]
    assert [(event.state, event.done) for event in states] == [(RUNNING, None), (RUNNING, 1), (RUNNING, 10), (DONE, None)]
    assert states[2].detail.endswith("images/s")  # the rate since the line before


def _kfp_task(output: TaskOutput, task: str, lines: list[str], status: str, ready: threading.Barrier, announced=True) -> None:
    """What kfp.local prints for one task, from the thread that runs it (its own announcement can be lost)."""
    if announced:
        print(f"12:00:00.000 - INFO - Executing task \x1b[96m'{task}'\x1b[0m", file=output)
    print(f"    [KFP Executor 2026-11-26 12:00:00,001 INFO]: Looking for component `{task.replace('-', '_')}` in --component_module_path `/tmp/x.py`",
          file=output)
    ready.wait()  # both tasks started: their lines interleave from here
    for line in lines:
        print(f"    {line}", file=output)
    if status:
        print(f"12:00:01.000 - INFO - Task \x1b[96m'{task}'\x1b[0m finished with status \x1b[92m{status}\x1b[0m", file=output)


def test_a_task_that_ends_before_the_job_folder_exists_keeps_its_log_and_reports_where_it_is(tmp_path):
    job_dir = tmp_path / "dreambooth-job"
    shown = io.StringIO()
    board = Board([Row("cat", "ingest"), Row("dog", "ingest")], PlainView(shown))
    output = TaskOutput(lambda: job_dir if job_dir.exists() else None, board, echo=None)
    _kfp_task(output, "ingest", ["[progress] cat ingest running", "cat line", "[progress] cat ingest failed · not an image"],
              "SUCCESS", threading.Barrier(1))
    job_dir.mkdir()  # a busy machine: kfp.local's folder appears after the task's last line
    _kfp_task(output, "ingest", ["[progress] dog ingest running", "[progress] dog ingest done · 1.0 s"], "SUCCESS", threading.Barrier(1))
    output.close()
    board.close()
    log = job_dir / "logs" / "cat" / "ingest.log"
    assert "cat line" in log.read_text()
    printed = shown.getvalue().splitlines()
    assert printed.index("--- cat ingest failed; the last lines of its log:") < printed.index(f"--- full log: {log}")


def test_lines_of_tasks_running_at_once_go_to_each_task_log_and_a_failure_shows_its_tail(tmp_path):
    job_dir = tmp_path / "dreambooth-job"
    shown = io.StringIO()
    board = Board([Row("dog", "fine-tune"), Row("cat", "ingest"), Row("cat", "fine-tune")], PlainView(shown))
    output = TaskOutput(lambda: job_dir if job_dir.exists() else None, board, echo=None)
    dog = ["[progress] dog fine-tune running"] + [f"dog step {i}" for i in range(50)] + [
        "[progress] dog fine-tune running 8/8 steps · loss 0.5000", "[progress] dog fine-tune done · 2.0 s"]
    cat = ["[progress] cat ingest running"] + [f"cat line {i}" for i in range(50)] + [
        "[progress] cat ingest failed · scan.jpg: not an image Pillow can read", "error: ingest: scan.jpg: not an image"]
    ready = threading.Barrier(2)
    threads = [threading.Thread(target=_kfp_task, args=(output, "fine-tune", dog, "SUCCESS", ready)),
               threading.Thread(target=_kfp_task, args=(output, "ingest", cat, "SUCCESS", ready))]
    for thread in threads:
        thread.start()
    job_dir.mkdir()  # kfp.local creates the job folder once tasks run: earlier lines wait in memory
    for thread in threads:
        thread.join()
    def one_thread_two_tasks():  # the second one's "Executing task" line lost; its executor's first line tells
        _kfp_task(output, "samples", ["[progress] dog samples running", "[progress] dog samples done · 1.0 s"], "", threading.Barrier(1))
        _kfp_task(output, "fine-tune", ["[progress] cat fine-tune running", "Traceback"], "", threading.Barrier(1), announced=False)

    crashed = threading.Thread(target=one_thread_two_tasks)
    crashed.start()
    crashed.join()
    output.close()  # the pipeline returned: the task that never finished failed
    board.close()

    dog_log = (job_dir / "logs" / "dog" / "fine-tune.log").read_text()
    assert dog_log.count("dog step") == 50 and "cat line" not in dog_log and "Executing task 'fine-tune'" in dog_log
    cat_log = (job_dir / "logs" / "cat" / "ingest.log").read_text()
    assert cat_log.count("cat line") == 50 and "dog step" not in cat_log
    assert (job_dir / "logs" / "pipeline.log").read_text().count("step") >= 50
    assert {key: row.state for key, row in board.rows.items()} == {
        ("dog", "fine-tune"): DONE, ("cat", "ingest"): FAILED, ("cat", "fine-tune"): FAILED, ("dog", "samples"): DONE}
    assert "Traceback" not in (job_dir / "logs" / "dog" / "samples.log").read_text()
    assert "Traceback" in (job_dir / "logs" / "cat" / "fine-tune.log").read_text()

    printed = shown.getvalue().splitlines()
    states = [line.split()[1:4] for line in printed if line[:2].isdigit() and len(line.split()) > 3 and line.split()[3] in ("running", "done", "failed")]
    assert sorted(map(tuple, states)) == sorted([("dog", "fine-tune", "running"), ("dog", "fine-tune", "done"), ("cat", "ingest", "running"),
                                                 ("cat", "ingest", "failed"), ("cat", "fine-tune", "running"), ("cat", "fine-tune", "failed"),
                                                 ("dog", "samples", "running"), ("dog", "samples", "done")])
    tail = printed.index("--- cat ingest failed; the last lines of its log:")
    full = printed.index(f"--- full log: {job_dir / 'logs' / 'cat' / 'ingest.log'}")
    assert full - tail - 1 == 15 and "        error: ingest: scan.jpg: not an image" in printed[tail:full]  # the last 15 lines
    assert output.log_of("fine-tune") == job_dir / "logs" / "cat" / "fine-tune.log"


def test_on_a_terminal_each_subject_is_one_line_on_the_stage_it_is_at():
    """The live view of a batch: a line per subject (and for the batch and each class's priors), however many stages."""
    from rich.console import Console

    from dreambooth.commands.run_console import LiveView, planned_rows

    screen = io.StringIO()
    view = LiveView(screen)
    view.console = Console(file=screen, force_terminal=True, width=120, color_system=None)
    board = Board(planned_rows(["dog", "cat", "bag"], ["dog", "cat", "backpack"], superres=True), view)
    view.board = board
    for event in ("batch plan-batch running", "batch plan-batch done", "dog ingest running", "dog ingest done", "dog fine-tune running",
                  "dog fine-tune running 120/1000 steps · loss 0.1234", "cat ingest running", "cat ingest failed · scan.jpg: not an image"):
        board.apply(parse(f"[progress] {event}"))
    view.console.print(view._table())
    lines = [line.split() for line in screen.getvalue().splitlines()]
    by_scope = {words[0]: words[1:] for words in lines}
    assert len(lines) == 7  # batch, three classes' priors, three subjects: not 3 x 6 stage rows
    assert by_scope["dog"][:4] == ["1/6", "fine-tune", "running", "0s"] and " ".join(by_scope["dog"][4:]) == "step 120/1000 · loss 0.1234"
    assert by_scope["cat"][:3] == ["1/6", "ingest", "failed"] and by_scope["bag"][:3] == ["0/6", "ingest", "waiting"]
    assert by_scope["batch"][:3] == ["1/2", "summarize", "waiting"]


def test_a_failure_shows_the_stages_own_last_lines_not_kfp_executor_json_or_library_info(tmp_path):
    """The lines as kfp.local, its executor and MLflow printed them for a failed ingest on this machine."""
    job_dir = tmp_path / "dreambooth-job"
    job_dir.mkdir()
    shown = io.StringIO()
    board = Board([Row("bad", "ingest")], PlainView(shown))
    output = TaskOutput(lambda: job_dir, board, echo=None)
    printed_by_the_task = [
        "{",
        '    "outputs": {',
        '        "outputFile": "/tmp/outputs/kfp/dreambooth-job/for-loop-4-iteration-0/ingest/executor_output.json"',
        "    }",
        "}",
        "[progress] bad ingest running",
        "2026/12/08 00:35:30 INFO mlflow.system_metrics.system_metrics_monitor: Started monitoring system metrics.",
        "2026/12/08 00:35:35 INFO mlflow.system_metrics.system_metrics_monitor: Successfully terminated system metrics monitoring!",
        "[progress] bad ingest failed · /tmp/bad/01.jpg: not an image Pillow can read",
        "error: ingest: /tmp/bad/01.jpg: not an image Pillow can read",
        "[KFP Executor 2026-12-08 00:35:35,311 INFO]: Wrote executor output file to /tmp/outputs/.../executor_output.json.",
        "",
    ]
    _kfp_task(output, "ingest", printed_by_the_task, "SUCCESS", threading.Barrier(1))
    output.close()
    board.close()
    printed = shown.getvalue().splitlines()
    start = printed.index("--- bad ingest failed; the last lines of its log:")
    end = printed.index(f"--- full log: {job_dir / 'logs' / 'bad' / 'ingest.log'}")
    assert [line.strip() for line in printed[start + 1:end]] == [
        "[progress] bad ingest running",
        "[progress] bad ingest failed · /tmp/bad/01.jpg: not an image Pillow can read",
        "error: ingest: /tmp/bad/01.jpg: not an image Pillow can read",
    ]
    log = (job_dir / "logs" / "bad" / "ingest.log").read_text()
    assert "outputFile" in log and "finished with status SUCCESS" in log  # the log keeps everything
