"""Notifications: the report a webhook gets, in Slack's format and as plain JSON, sent over real HTTP;
a webhook that is down or unset is reported, never raised."""

from conftest import _free_port
from dreambooth.config import Webhook
from dreambooth.tracking.notify import BatchReport, SubjectOutcome, send

REPORT = BatchReport(
    state="FAILED", job_id="job-7", job_name="nightly-7", experiment="dreambooth",
    counts={"trained": 1, "failed": 1, "up to date": 0},
    subjects=[
        SubjectOutcome("dog", "dog", "trained", "", "passed", "dreambooth-dog@candidate (version 3)", {"dino": 0.61, "clip_t": 0.29}, "r1"),
        SubjectOutcome("cat", "cat", "failed", "fine-tune: training stopped at step 12 (loss is nan)", "", "", {}, "r2"),
    ],
    mlflow_url="http://mlflow.example/#/experiments/1/runs/b", kfp_url="https://kfp.example/pipeline/#/runs/details/job-7",
)


def test_each_webhook_gets_the_report_in_its_format(webhooks, monkeypatch):
    base, received = webhooks
    monkeypatch.setenv("TEAM_HOOK", f"{base}/from-secret")
    outcomes = send([Webhook(url=f"{base}/plain"), Webhook(url_env="TEAM_HOOK", format="slack")], REPORT)
    host = base.split("/")[2]
    assert outcomes == [f"sent to {host}", f"sent to {host}"]
    bodies = dict(received)
    plain = bodies["/plain"]
    assert plain["succeeded"] is False and plain["counts"]["failed"] == 1 and plain["event"] == "dreambooth.batch_finished"
    assert [s["subject"] for s in plain["subjects"]] == ["dog", "cat"] and plain["kfp_url"].endswith("/job-7")
    assert plain["text"] == "DreamBooth batch nightly-7 ended FAILED: 2 subjects (1 trained, 1 failed, 0 up to date)"
    assert bodies["/from-secret"]["text"].splitlines() == [
        ":x: DreamBooth batch nightly-7 ended FAILED: 2 subjects (1 trained, 1 failed, 0 up to date)",
        "• dog (dog): trained; DINO 0.610 CLIP-T 0.290; gate passed, dreambooth-dog@candidate (version 3)",
        "• cat (cat): failed at fine-tune: training stopped at step 12 (loss is nan)",
        "<http://mlflow.example/#/experiments/1/runs/b|MLflow> · <https://kfp.example/pipeline/#/runs/details/job-7|KFP run>",
    ]


def test_a_dead_or_missing_webhook_is_reported_by_host_only_and_the_others_still_get_it(webhooks, monkeypatch):
    base, received = webhooks
    monkeypatch.delenv("UNSET_HOOK", raising=False)
    dead = f"http://127.0.0.1:{_free_port()}/secret-token-path"
    outcomes = send([Webhook(url=dead), Webhook(url_env="UNSET_HOOK"), Webhook(url=f"{base}/alive")], REPORT, timeout=5)
    assert outcomes[0].startswith(f"not sent to 127.0.0.1:{dead.split(':')[2].split('/')[0]}: ") and "secret-token" not in outcomes[0]
    assert outcomes[1] == "not sent: $UNSET_HOOK is not set"
    assert outcomes[2].startswith("sent to ") and [path for path, _ in received] == ["/alive"]
