"""Deployment processes outlive the run that starts them: a run killed while its new server is
still starting leaves a recorded process, which the next deployment (or undeploy) stops."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from arenaflow.config import compose_config
from arenaflow.serve.deploy import read_state, serve_dir, undeploy
from arenaflow.serve.process import alive

STARTER = """
import sys
from arenaflow.config import compose_config
from arenaflow.serve.deploy import start_server
start_server(compose_config(sys.argv[2:]), sys.argv[1])
"""


def _wait(predicate, timeout: float = 120) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return False


def test_a_run_killed_while_its_server_starts_leaves_a_recorded_stray_that_is_stopped(
    af_home: Path, model_cache: Path, tiny_model_dir: Path
) -> None:
    overrides = ["experiment=test", f"paths.home={af_home}", f"paths.cache_dir={model_cache}"]
    overrides += ["tracking=none"]
    cfg = compose_config(overrides)
    runs = serve_dir(cfg) / "deployments"
    starter = subprocess.Popen(
        [sys.executable, "-c", STARTER, str(tiny_model_dir), *overrides],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server_pid = None
    try:
        # the worst moment: the server exists, the run is still waiting for /ready
        assert _wait(lambda: any(runs.glob("*/process.json")) or starter.poll() is not None)
        assert starter.poll() is None, starter.stderr.read().decode()[-2000:]
        record = json.loads(next(runs.glob("*/process.json")).read_text())
        server_pid = record["pid"]
        starter.send_signal(signal.SIGKILL)
        starter.wait()
        assert alive(server_pid), "the detached server outlives its run"
        assert read_state(cfg) is None, "it never became the deployment"

        undeploy(cfg)  # what the next deployment also does first
        assert _wait(lambda: not alive(server_pid), 30), "the stray must be stopped"
        assert not any(runs.glob("*/process.json"))
    finally:
        if starter.poll() is None:
            starter.kill()
        if server_pid is not None and alive(server_pid):
            os.killpg(server_pid, signal.SIGKILL)
