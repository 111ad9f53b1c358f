"""Notifications: the automations in infra/prefect/automations.yaml, applied by `ddcolor automations apply` to a real
`prefect server` on 127.0.0.1, send a failed and a not-promoted train-ddcolor run to a webhook receiver on 127.0.0.1.

The failed run is the real flow (a missing params file fails it before any work); the not-promoted and promoted
runs are stand-in flows named ``train-ddcolor`` that only end with the flow's final messages (the pipeline itself is
tested elsewhere; what is tested here is the automation's trigger on the flow name and state message).
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ddcolor.automations import AutomationsError, load_automations
from tests.helpers.servers import PrefectServer

ROOT = Path(__file__).resolve().parents[2]
FILE = ROOT / "infra" / "prefect" / "automations.yaml"


def test_the_file_is_valid_and_errors_name_what_to_fix(tmp_path):
    data = load_automations(FILE)
    assert [a["name"] for a in data["automations"]] == ["ddcolor-run-failed", "train-ddcolor-not-promoted"]
    assert data["notification_block"]["url_env"] == "DDCOLOR_NOTIFY_WEBHOOK_URL"
    bad = tmp_path / "a.yaml"
    bad.write_text(FILE.read_text().replace("expect: [prefect.flow-run.Completed]", "expect: 7"))
    with pytest.raises(AutomationsError, match=r"automations\[1\] \(train-ddcolor-not-promoted\)"):
        load_automations(bad)
    with pytest.raises(AutomationsError, match="no such file"):
        load_automations(tmp_path / "missing.yaml")


class _Receiver:
    """An HTTP server on 127.0.0.1 that records every POSTed JSON body."""

    def __init__(self) -> None:
        received = self.received = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.append(json.loads(body or b"{}"))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.25)
        return list(self.received)


STAND_IN = """
from prefect import flow
from prefect.states import Completed

@flow(name="train-ddcolor")
def train_ddcolor():
    return Completed(message={message!r})

train_ddcolor()
"""


@pytest.mark.slow
def test_failed_and_not_promoted_runs_notify_the_webhook(tmp_path):
    server = PrefectServer(tmp_path / "prefect-home")
    server.start()
    receiver = _Receiver()
    try:
        env = {**server.env(), "DDCOLOR_NOTIFY_WEBHOOK_URL": receiver.url}
        ddcolor = str(Path(sys.executable).with_name("ddcolor"))
        for _ in range(2):  # applying twice replaces, never duplicates
            applied = subprocess.run(
                [ddcolor, "automations", "apply", "--file", str(FILE)], env=env, capture_output=True, text=True
            )
            assert applied.returncode == 0, applied.stderr
        assert "automation applied: train-ddcolor-not-promoted" in applied.stdout
        names = [a["name"] for a in server.api("/automations/filter", {})]
        assert sorted(names) == ["ddcolor-run-failed", "train-ddcolor-not-promoted"]

        def run(code: str) -> subprocess.CompletedProcess:
            return subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True, text=True)

        run(STAND_IN.format(message="promoted: ddcolor v3 is the new @champion"))  # must not notify
        failed = run("from flows.train_ddcolor import train_ddcolor; train_ddcolor(config_path='no-such-params.yaml')")
        assert failed.returncode != 0 and "no-such-params.yaml" in failed.stderr
        run(STAND_IN.format(message="not promoted: gate failed for ddcolor v4 (psnr 20.1 < 21)"))

        messages = receiver.wait(2, timeout=90)
        time.sleep(3)  # anything else (the promoted run) would have arrived by now
        messages = receiver.received
        assert len(messages) == 2, messages
        by_subject = {m["subject"]: m["body"] for m in messages}
        failed_msg = next(body for subject, body in by_subject.items() if subject.endswith("Failed"))
        assert "train-ddcolor flow run" in failed_msg and "no-such-params.yaml" in failed_msg  # {{ flow.name }}
        rejected = next(body for subject, body in by_subject.items() if subject.endswith("not promoted"))
        assert "psnr 20.1 < 21" in rejected and "champion is unchanged" in rejected
    finally:
        receiver.server.shutdown()
        server.stop()
