"""Model folders that are fetched or built survive a kill half-way: the next try starts over.

A real MLflow store in a temp dir; the fetch runs in a subprocess that is SIGKILLed while the
weights file is half copied (a hook in that process holds the copy there), then the server's
resolve runs again in this process.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from arenaflow.config import REPO_ROOT
from arenaflow.models import publish_dir
from arenaflow.serve.loading import ModelSpec, resolve_served_model
from arenaflow.tracking import tracker_from_cfg

# In the child: copy the first half of the weights, say so, then wait to be killed.
_CHILD = textwrap.dedent(
    """
    import sys, time
    from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
    from arenaflow.config import compose_config
    from arenaflow.serve.loading import ModelSpec, resolve_served_model

    copy = LocalArtifactRepository._download_file

    def half_then_hang(self, remote_file_path, local_path):
        if not remote_file_path.endswith("model.safetensors"):
            return copy(self, remote_file_path, local_path)
        data = open(self.artifact_dir + "/" + remote_file_path, "rb").read()
        with open(local_path, "wb") as f:
            f.write(data[: len(data) // 2])
        time.sleep(0.5)  # the small files, copied by other threads, are in place
        print("HALF", flush=True)
        time.sleep(120)

    LocalArtifactRepository._download_file = half_then_hang
    cfg = compose_config(sys.argv[2:])
    resolve_served_model(cfg, ModelSpec("chat", sys.argv[1], "test"))
    """
)


def _kill_mid_fetch(uri: str, overrides: list[str]) -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", _CHILD, uri, *overrides],
        cwd=REPO_ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    lines = []
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            lines.append(line)
            if line.rstrip().endswith("HALF") or not line:
                break
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert lines[-1].rstrip().endswith("HALF"), "".join(lines)


@pytest.mark.parametrize("kind", ["registry", "run"])
def test_a_fetch_killed_half_way_is_fetched_again(
    kind, make_cfg, af_home, model_cache, tiny_model_dir
) -> None:
    cfg = make_cfg()
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("train", cfg) as run:
        version = tracker.register_model(run, tiny_model_dir, "arenaflow-chat")
    uri = (
        f"models:/arenaflow-chat/{version.version}"
        if kind == "registry"
        else f"runs:/{run.run_id}/model"
    )
    _kill_mid_fetch(
        uri, ["experiment=test", f"paths.home={af_home}", f"paths.cache_dir={model_cache}"]
    )
    weights = (tiny_model_dir / "model.safetensors").read_bytes()
    left = list((model_cache / "serve").rglob("model.safetensors"))
    assert any(p.stat().st_size == len(weights) // 2 for p in left), left  # killed half-way

    served = resolve_served_model(cfg, ModelSpec("chat", uri, "test"))
    assert (served.path / "config.json").exists()
    assert (served.path / "model.safetensors").read_bytes() == weights
    assert not list((model_cache / "serve").glob(".*.partial"))  # the leftover was cleaned up


def test_publish_dir_builds_once_and_cleans_what_a_killed_build_left(tmp_path: Path) -> None:
    target = tmp_path / "models" / "m"
    (target.parent / ".m.partial").mkdir(parents=True)
    (target.parent / ".m.partial" / "config.json").write_text("{}")  # from a killed build
    calls = []

    def build(staging: Path) -> None:
        calls.append(staging)
        assert not (staging / "config.json").exists()  # starts from an empty folder
        (staging / "config.json").write_text('{"ok": true}')

    assert publish_dir(target, build) == target
    assert publish_dir(target, build) == target
    assert len(calls) == 1 and (target / "config.json").read_text() == '{"ok": true}'

    def failing(staging: Path) -> None:
        (staging / "config.json").write_text("{}")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_dir(tmp_path / "other", failing)
    assert not (tmp_path / "other").exists() and not (tmp_path / ".other.partial").exists()
