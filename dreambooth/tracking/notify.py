"""Tell people a batch ended: one POST to each webhook of `tracking.notify`, Slack's format or plain JSON.

The exit handler sends it once the runs are closed. A webhook that is down, slow or refuses is
logged, naming only its host (a webhook URL is a secret), and never changes the run's outcome.
"""

from __future__ import annotations

import json
import logging
import os
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass, field
from typing import Optional
from urllib.parse import urlsplit

from dreambooth.config import Webhook

log = logging.getLogger(__name__)

TIMEOUT_SECONDS = 10.0
EVENT = "dreambooth.batch_finished"


@dataclass(frozen=True)
class SubjectOutcome:
    subject: str
    class_noun: str
    status: str  # trained, up to date, failed
    reason: str
    gate: str  # passed, rejected, or "" when not evaluated
    registered: str
    metrics: dict[str, float]  # dino, clip_i, clip_t, pres where measured
    mlflow_run: str


@dataclass(frozen=True)
class BatchReport:
    state: str  # the pipeline's final state: SUCCEEDED, FAILED, ...
    job_id: str
    job_name: str
    experiment: str
    counts: dict[str, int]  # trained, up to date, failed
    subjects: list[SubjectOutcome]
    mlflow_url: str = ""
    kfp_url: str = ""
    error: str = ""  # why the batch did not get to its subjects, when it did not
    event: str = field(default=EVENT)

    @property
    def succeeded(self) -> bool:
        return self.state.upper() in ("SUCCEEDED", "SUCCESS")

    def text(self) -> str:
        """One line: what happened, for a chat message's first line and a log."""
        tally = ", ".join(f"{count} {status}" for status, count in self.counts.items())
        outcome = "succeeded" if self.succeeded else f"ended {self.state}"
        return f"DreamBooth batch {self.job_name} {outcome}: {len(self.subjects)} subjects ({tally})" + (
            f"; {self.error}" if self.error else "")

    def as_json(self) -> dict:
        return {**asdict(self), "succeeded": self.succeeded, "text": self.text()}


def _subject_line(outcome: SubjectOutcome) -> str:
    figures = " ".join(f"{name.upper().replace('_', '-')} {value:.3f}" for name, value in outcome.metrics.items())
    if outcome.status == "failed":
        return f"• {outcome.subject} ({outcome.class_noun}): failed at {outcome.reason}"
    gate = {"passed": f"gate passed, {outcome.registered}", "rejected": f"gate rejected ({outcome.reason})"}.get(outcome.gate, "")
    return f"• {outcome.subject} ({outcome.class_noun}): {outcome.status}" + "".join(f"; {part}" for part in (figures, gate) if part)


def slack_body(report: BatchReport) -> dict:
    """Slack's incoming-webhook message: mrkdwn text with a line per subject and the links."""
    links = " · ".join(f"<{url}|{label}>" for label, url in (("MLflow", report.mlflow_url), ("KFP run", report.kfp_url)) if url)
    icon = ":white_check_mark:" if report.succeeded else ":x:"
    lines = [f"{icon} {report.text()}", *(_subject_line(outcome) for outcome in report.subjects)]
    if links:
        lines.append(links)
    return {"text": "\n".join(lines)}


def webhook_url(webhook: Webhook) -> Optional[str]:
    return webhook.url or os.environ.get(webhook.url_env) or None


def send(webhooks: list[Webhook], report: BatchReport, timeout: float = TIMEOUT_SECONDS) -> list[str]:
    """POST the report to each webhook; returns what happened to each ("sent to host", or why not)."""
    outcomes = []
    for webhook in webhooks:
        url = webhook_url(webhook)
        if url is None:
            outcomes.append(f"not sent: ${webhook.url_env} is not set")
            log.warning("notify: %s", outcomes[-1])
            continue
        host = urlsplit(url).netloc.rsplit("@", 1)[-1] or "?"
        body = slack_body(report) if webhook.format == "slack" else report.as_json()
        request = urllib.request.Request(
            url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                response.read()
            outcomes.append(f"sent to {host}")
        except (urllib.error.URLError, OSError, ValueError) as error:
            reason = getattr(error, "reason", None) or error
            outcomes.append(f"not sent to {host}: {reason}")
            log.warning("notify: %s", outcomes[-1])
    return outcomes
