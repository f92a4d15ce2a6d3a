"""The nightly deployment as an operator runs it (README: Nightly deployment): a real Prefect server,
the deployment of infra/prefect.yaml on a process work pool served by a real `prefect worker`, a
run with a parameter override driven to Completed, and the failed-nightly automation of
infra/prefect-automation.yaml created on the server and seen to notify (a custom-webhook block
posting to a listener here) when a nightly fails at a later stage, which leaves the champion byte
for byte as it was. `diffpipe serve` registering its own deployment on the same server is checked
on the side."""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.config import SHORT_NIGHT, tiny_overrides
from tests.support.paths import REPO
from tests.support.s3 import free_port

pytestmark = pytest.mark.slow
BIN = Path(sys.executable).parent
PREFECT_YAML = yaml.safe_load((REPO / "infra" / "prefect.yaml").read_text())
POOL = PREFECT_YAML["deployments"][0]["work_pool"]["name"]


def _api(url: str, method: str = "GET", body: Any = None) -> Any:
    """One REST call to the Prefect server. A 503 (SQLite busy while the server's scheduler writes
    runs) is retried, as Prefect's own client does."""
    data = None if body is None else json.dumps(body).encode()
    for attempt in range(10):
        request = urllib.request.Request(
            url, data=data, method=method, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=10) as r:
                text = r.read()
            return json.loads(text) if text else None
        except urllib.error.HTTPError as err:
            if err.code != 503 or attempt == 9:
                raise
            time.sleep(1 + attempt)
    raise AssertionError("unreachable")


def _wait_healthy(api: str, proc: subprocess.Popen[bytes], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"prefect server exited with {proc.returncode}"
        try:
            _api(f"{api}/health")
            return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(f"Prefect server at {api} not healthy after {timeout}s")


class _Webhook(ThreadingHTTPServer):
    """Where the notification block posts: each request body lands in `received`."""

    def __init__(self) -> None:
        self.received: queue.Queue[dict[str, Any]] = queue.Queue()
        received = self.received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["Content-Length"]))
                received.put(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/notify"


@pytest.fixture
def webhook() -> Iterator[_Webhook]:
    server = _Webhook()
    yield server
    server.shutdown()


def test_nightly_deployment_on_a_work_pool(tmp_path, webhook):
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    # A short TMPDIR of its own (Ray's socket paths below it must stay under 108 bytes): the runs'
    # `ray.init()` must not find and join some other local Ray cluster through /tmp/ray.
    tmpdir = Path(tempfile.mkdtemp(prefix="dpd-", dir="/tmp"))
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "PREFECT_"))},
        "TMPDIR": str(tmpdir),
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": api,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
        "PREFECT_WORKER_QUERY_SECONDS": "1",  # pick the run up at once, not within 10 s
        # The server's scheduler makes serve-check's 02:00 runs within seconds of its
        # registration, not at its next once-a-minute loop.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5",
    }
    env.pop("DIFFPIPE_HOME", None)
    logs = tmp_path / "logs"
    logs.mkdir()
    procs: list[subprocess.Popen[bytes]] = []

    def start(name: str, *argv: str, **kw: Any) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            argv,
            env=env,
            stdout=open(logs / f"{name}.log", "w"),  # noqa: SIM115 (lives as long as the process)
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own group: ended with everything it started
            **kw,
        )
        procs.append(proc)
        return proc

    def run(*argv: str, timeout: float = 300, **kw: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv, env=kw.pop("env", env), capture_output=True, text=True, timeout=timeout, **kw
        )

    def tail(*names: str) -> str:
        return "\n".join(f"--- {n}\n" + (logs / f"{n}.log").read_text()[-4000:] for n in names)

    prefect = str(BIN / "prefect")
    server = start("server", prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port))
    try:
        _wait_healthy(api, server)
        # -- what the README's Nightly deployment section runs, in the same order --
        created = run(prefect, "work-pool", "create", POOL, "--type", "process")
        assert created.returncode == 0, created.stdout + created.stderr
        deployed = run(
            prefect,
            "deploy",
            "--prefect-file",
            "infra/prefect.yaml",
            "--all",
            cwd=REPO,
            env={**env, "DIFFPIPE_HOME": str(REPO)},
        )
        assert deployed.returncode == 0, deployed.stdout + deployed.stderr
        # The worker runs elsewhere: the pull step, not its working directory, finds the code.
        start("worker", prefect, "worker", "start", "--pool", POOL, cwd=tmp_path)
        # `diffpipe serve` (the deployment without a work pool) registers on the same server.
        start("serve", str(BIN / "diffpipe"), "serve", "--name", "serve-check", cwd=REPO)

        deployment = _api(f"{api}/deployments/name/nightly/nightly")
        assert deployment["work_pool_name"] == POOL
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        (schedule,) = deployment["schedules"]
        assert schedule["schedule"]["cron"] == "0 2 * * *"
        assert schedule["schedule"]["timezone"] == "UTC"
        # No 02:00 run during the test: it would use the cluster config.
        _api(
            f"{api}/deployments/{deployment['id']}/schedules/{schedule['id']}",
            "PATCH",
            {"active": False},
        )

        # The failed-nightly automation, notifying through a block that posts to `webhook`.
        from prefect.blocks.notifications import CustomWebhookNotificationBlock
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings({PREFECT_API_URL: api}):
            CustomWebhookNotificationBlock(
                name="nightly-alerts",
                url=webhook.url,
                json_data={"subject": "{{subject}}", "body": "{{body}}"},
            ).save("nightly-alerts")
        automation_file = tmp_path / "nightly-failed.yaml"
        rendered = run(
            sys.executable,
            "-m",
            "flows.deploy",
            "automation",
            "--notify",
            "custom-webhook/nightly-alerts",
            cwd=REPO,
        )
        assert rendered.returncode == 0, rendered.stderr
        automation_file.write_text(rendered.stdout)
        made = run(prefect, "automation", "create", "--from-file", str(automation_file))
        assert made.returncode == 0, made.stdout + made.stderr
        automations = _api(f"{api}/automations/filter", "POST", {})
        assert [a["name"] for a in automations] == ["diffusion-pipeline nightly failed"]

        # -- a run with a parameter override: the tiny config (its first night 2 steps long, one
        # evaluation of FID only, as the Jobs API test runs it), a store under tmp --
        store = tmp_path / "artifacts"
        overrides = [
            f"storage.root={store}",
            *tiny_overrides(SHORT_NIGHT),
            "train.workers=1",
            "ray.num_cpus=2",
        ]
        params = json.dumps({"config_path": None, "overrides": overrides})
        done = run(
            prefect,
            "deployment",
            "run",
            "nightly/nightly",
            "--params",
            params,
            "--watch",
            timeout=600,
        )
        detail = done.stdout[-3000:] + done.stderr[-3000:] + tail("worker")
        assert done.returncode == 0 and "Completed" in done.stdout, detail
        latest = json.loads((store / "runs" / "nightly" / "nightly" / "latest.json").read_text())
        assert latest["step"] == 2 and (store / latest["report_key"]).is_file()
        champion = store / "models" / "default" / "current.json"
        before = champion.read_bytes()

        # -- a nightly that fails after sharding: training asks for a GPU, which Ray here lacks --
        failing = [*overrides, "train.use_gpu=true"]
        failed = run(
            prefect,
            "deployment",
            "run",
            "nightly/nightly",
            "--params",
            json.dumps({"config_path": None, "overrides": failing}),
            "--watch",
            timeout=300,
        )
        detail = failed.stdout[-3000:] + failed.stderr[-3000:] + tail("worker")
        assert failed.returncode != 0 and "Failed" in failed.stdout, detail
        (last,) = _api(
            f"{api}/flow_runs/filter",
            "POST",
            {
                "flow_runs": {"state": {"type": {"any_": ["FAILED"]}}},
                "sort": "EXPECTED_START_TIME_DESC",
                "limit": 1,
            },
        )
        # "training (train.workers=1) asks for 1 x {CPU: 1, GPU: 1}, but the Ray cluster has ..."
        message = last["state"]["message"]
        assert "asks for" in message and "GPU" in message, detail
        assert champion.read_bytes() == before, "a failed nightly changed the champion"

        # The automation noticed the failure and notified.
        note = webhook.received.get(timeout=60)
        assert "nightly run" in note["subject"] and "Failed" in note["subject"], note
        assert message in note["body"], note

        deadline = time.monotonic() + 120  # registered long ago, unless the machine is crawling
        while True:
            try:
                serve_check = _api(f"{api}/deployments/name/nightly/serve-check")
                break
            except urllib.error.HTTPError as err:
                assert err.code == 404 and time.monotonic() < deadline, tail("serve")
                time.sleep(2)
        assert serve_check["schedules"][0]["schedule"]["cron"] == "0 2 * * *", tail("serve")
        # The server's scheduler makes the cron's coming 02:00 UTC runs (on SQLAlchemy 2.1 it
        # failed every minute and a scheduled nightly never ran). Its loop runs every 5 s here.
        deadline = time.monotonic() + 90
        while True:
            scheduled = _api(
                f"{api}/flow_runs/filter",
                "POST",
                {"flow_runs": {"deployment_id": {"any_": [serve_check["id"]]}}},
            )
            starts = [r["expected_start_time"] for r in scheduled if r["auto_scheduled"]]
            if starts or time.monotonic() > deadline:
                break
            time.sleep(3)
        assert starts and all("T02:00:00" in t for t in starts), tail("server")
    finally:
        for proc in reversed(procs):  # each with the processes it started (its group)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=20)
            except ProcessLookupError:
                continue
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        shutil.rmtree(tmpdir, ignore_errors=True)
