"""serving_deployment end to end: real Dagster runs, a real MLflow registry, detached uvicorn processes.

A test-local `champion_model` asset stands in for the rating group: it registers a checkpoint in
the temp registry, moves the `champion` alias to it and returns the documented value.
"""

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import dagster as dg
import httpx
import pytest
from omegaconf import OmegaConf
from openai import OpenAI

import arenaflow.serve.deploy as deploy_module
from arenaflow.config import compose_config
from arenaflow.engine import Engine
from arenaflow.serve.deploy import read_state, serve_dir, server_config, undeploy
from arenaflow.serve.process import alive, spawn, write_json
from arenaflow.tracking import tracker_from_cfg
from pipelines.assets.serve import champion_alias_sensor, sensors, serving_deployment
from pipelines.resources import HydraConfigResource

KEY = "sk-test-deploy-4242"


class ChampionConfig(dg.Config):
    checkpoint: str


@dg.asset(key="champion_model", group_name="rating")
def champion_model(config: ChampionConfig, hydra: HydraConfigResource) -> dict[str, Any]:
    """Register a checkpoint and make it the champion (stands in for the rating group)."""
    cfg = hydra.compose()
    tracker = tracker_from_cfg(cfg)
    name = cfg.tracking.registered_model_name
    with tracker.start_run("champion_test", cfg) as run:
        tags = {  # the tags the rating stage writes
            "arenaflow.mt_bench_score": "6.250",
            "arenaflow.rating": "1042.50",
            "arenaflow.base_model": "tiny-llama",
        }
        info = tracker.register_model(run, config.checkpoint, name, tags=tags)
    tracker.set_alias(name, "champion", info.version)
    return {
        "model_uri": f"models:/{name}/{info.version}",
        "version": info.version,
        "promoted": True,
        "reason": "test",
    }


@pytest.fixture
def overrides(tmp_path: Path, model_cache: Path) -> list[str]:
    return [
        "experiment=test",
        f"paths.home={tmp_path / 'home'}",
        f"paths.cache_dir={model_cache}",
        "serve.deploy.smoke_questions=2",
        "serve.deploy.smoke_max_tokens=8",
        "serve.deploy.ready_timeout_s=120",
    ]


@pytest.fixture
def broken_checkpoint(tmp_path: Path) -> Path:
    """A folder that looks like a checkpoint but cannot be loaded."""
    path = tmp_path / "broken"
    path.mkdir()
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return path


def _roll(overrides: list[str], instance: dg.DagsterInstance, checkpoint: Path):
    return dg.materialize(
        [champion_model, serving_deployment],
        resources={"hydra": HydraConfigResource(overrides=overrides)},
        instance=instance,
        run_config={"ops": {"champion_model": {"config": {"checkpoint": str(checkpoint)}}}},
        raise_on_error=False,
    )


def _chat(url: str) -> str:
    out = OpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=60).chat.completions.create(
        model="arenaflow-chat",
        messages=[{"role": "user", "content": "Hello!"}],
        max_tokens=4,
        temperature=0,
    )
    return out.choices[0].message.content


def _gone(pid: int, timeout: float = 30) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if not alive(pid):
            return True
        time.sleep(0.2)
    return False


def test_deploy_rolls_to_new_champion_and_keeps_old_on_failure(
    overrides: list[str], tiny_model_dir: Path, broken_checkpoint: Path, monkeypatch
) -> None:
    monkeypatch.setenv("ARENAFLOW_API_KEYS", KEY)  # serve.api_keys_env: keys never enter config

    def no_third_copy(*args, **kwargs):
        raise AssertionError("the deploying process must not load a copy of the model")

    monkeypatch.setattr(Engine, "load", classmethod(no_third_copy))  # the smoke test goes by HTTP
    cfg = compose_config(overrides)
    instance = dg.DagsterInstance.ephemeral()
    pids: list[int] = []
    try:
        first = _roll(overrides, instance, tiny_model_dir)
        assert first.success
        v1 = first.output_for_node("serving_deployment")
        pids.append(v1["pid"])
        assert v1["version"] == "1" and v1["model_uri"] == "models:/arenaflow-chat/1"
        assert v1["url"].startswith("http://127.0.0.1:") and v1["url"].endswith("/v1")
        assert _chat(v1["url"])
        assert httpx.get(f"{v1['url']}/models").status_code == 401
        auth = {"Authorization": f"Bearer {KEY}"}
        card = httpx.get(f"{v1['url']}/models", headers=auth).json()["data"][0]
        assert card["version"] == "1"
        assert card["results"] == {"arenaflow.mt_bench_score": 6.25, "arenaflow.rating": 1042.5}
        assert card["lineage"]["arenaflow.base_model"] == "tiny-llama" and card["lineage"]["run_id"]
        assert "champion" in card["lineage"]["aliases"]
        meta = first.asset_materializations_for_node("serving_deployment")[0].metadata
        assert "| True |" in meta["smoke_test"].value
        assert meta["pid"].value == v1["pid"]
        state = read_state(cfg)
        for written in (state.config_path, state.log_path):
            assert KEY not in Path(written).read_text(), f"API key leaked into {written}"
        assert all(KEY not in str(v.value) for v in meta.values()), "API key leaked into metadata"

        second = _roll(overrides, instance, tiny_model_dir)
        assert second.success
        v2 = second.output_for_node("serving_deployment")
        pids.append(v2["pid"])
        assert v2["version"] == "2" and v2["pid"] != v1["pid"] and v2["url"] != v1["url"]
        assert _gone(v1["pid"]), "the old (blue) server must stop after the switch"
        assert _chat(v2["url"])
        assert read_state(cfg).pid == v2["pid"]
        meta = second.asset_materializations_for_node("serving_deployment")[0].metadata
        assert str(v1["pid"]) in meta["previous"].value

        failed = _roll(overrides, instance, broken_checkpoint)
        assert not failed.success
        error = failed.get_step_failure_events()[0].event_specific_data.error
        text = error.to_string()
        assert "exited with code" in text and "before it was ready" in text
        state = read_state(cfg)
        assert state.pid == v2["pid"] and state.version == "2"
        assert httpx.get(f"{v2['url'].removesuffix('/v1')}/ready").status_code == 200
        assert _chat(v2["url"]), "the old server keeps serving when the new one fails"
    finally:
        undeploy(cfg)
        for pid in pids:
            assert _gone(pid), f"server pid {pid} still running after undeploy"
    assert read_state(cfg) is None


def test_sensor_requests_a_roll_when_the_champion_alias_moves(
    overrides: list[str], tiny_model_dir: Path
) -> None:
    assert champion_alias_sensor in sensors
    cfg = compose_config(overrides)
    resources = {"hydra": HydraConfigResource(overrides=overrides)}

    def evaluate(cursor: str | None):
        ctx = dg.build_sensor_context(cursor=cursor, resources=resources)
        return champion_alias_sensor(ctx), ctx.cursor

    result, _ = evaluate(None)
    assert isinstance(result, dg.SkipReason) and "no arenaflow-chat@champion" in result.skip_message

    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("register", cfg) as run:
        v1 = tracker.register_model(run, tiny_model_dir, "arenaflow-chat").version
        v2 = tracker.register_model(run, tiny_model_dir, "arenaflow-chat").version
    tracker.set_alias("arenaflow-chat", "champion", v1)
    result, cursor = evaluate(None)
    assert isinstance(result, dg.RunRequest) and result.run_key.startswith(
        "arenaflow-chat@champion-v1"
    )
    first_key = result.run_key
    result, _ = evaluate(cursor)
    assert isinstance(result, dg.SkipReason)
    tracker.set_alias("arenaflow-chat", "champion", v2)
    result, cursor = evaluate(cursor)
    assert isinstance(result, dg.RunRequest) and result.tags["arenaflow/champion_version"] == v2
    second_key = result.run_key
    # a rollback to v1 is a new run: Dagster skips a run key it has seen
    tracker.set_alias("arenaflow-chat", "champion", v1)
    result, cursor = evaluate(cursor)
    assert isinstance(result, dg.RunRequest) and result.tags["arenaflow/champion_version"] == v1
    keys = {first_key, second_key, result.run_key}
    assert len(keys) == 3
    assert isinstance(evaluate(cursor)[0], dg.SkipReason)
    # a reset cursor starts a new epoch: its first key is new too
    result, _ = evaluate(None)
    assert isinstance(result, dg.RunRequest) and result.run_key not in keys
    # a cursor written before the count (the bare version) still reads
    assert isinstance(evaluate(v1)[0], dg.SkipReason)


def test_deployment_serves_the_competitors_beside_the_champion(
    overrides: list[str], tiny_model_dir: Path
) -> None:
    """serve.models_from=competitors: the champion (registered = `finetuned`) loads once, as an
    alias, next to `base`, so the deployed server's /arena has two models to pit."""
    overrides = [*overrides, "serve.models_from=competitors"]
    cfg = compose_config(overrides)
    result = _roll(overrides, dg.DagsterInstance.ephemeral(), tiny_model_dir)
    try:
        assert result.success
        dep = result.output_for_node("serving_deployment")
        assert dep["version"] == "1"
        assert dep["models"] == [
            {"id": "finetuned", "root": "models:/arenaflow-chat/1", "alias_of": None},
            {"id": "base", "root": dep["models"][1]["root"], "alias_of": None},
            {"id": "arenaflow-chat", "root": "models:/arenaflow-chat/1", "alias_of": "finetuned"},
        ]
        served = OmegaConf.to_container(OmegaConf.load(read_state(cfg).config_path))
        assert served["serve"]["models_from"] is None, "the set is fixed at deployment time"
        assert [m["name"] for m in served["serve"]["models"]] == ["finetuned", "base"]
        assert _chat(dep["url"])  # the champion's name answers
        base = dep["url"].removesuffix("/v1")
        ready = httpx.get(f"{base}/ready").json()
        assert ready["model"] == "finetuned" and ready["version"] == "1"
        assert [m["id"] for m in ready["models"]] == ["finetuned", "base"]
        page = httpx.get(f"{base}/arena")
        assert page.status_code == 200 and '"n_models": 2' in page.text
        meta = result.asset_materializations_for_node("serving_deployment")[0].metadata
        assert "| arenaflow-chat | finetuned |" in meta["served_models"].value
    finally:
        undeploy(cfg)


def test_deployment_refuses_a_served_set_that_reuses_the_champion_name(
    overrides: list[str], tiny_model_dir: Path
) -> None:
    overrides = [*overrides, f"serve.models=[{{name: arenaflow-chat, uri: {tiny_model_dir}}}]"]
    result = _roll(overrides, dg.DagsterInstance.ephemeral(), tiny_model_dir)
    assert not result.success
    text = result.get_step_failure_events()[0].event_specific_data.error.to_string()
    assert "served_model_name='arenaflow-chat' is also the name of a model" in text
    assert read_state(compose_config(overrides)) is None, "nothing was started"


def _environ(pid: int) -> dict[str, str]:
    raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    return dict(item.decode().partition("=")[::2] for item in raw if item)


def test_deployment_enforces_its_keys_sheds_secrets_strays_and_taken_ports(
    overrides: list[str], tiny_model_dir: Path, monkeypatch
) -> None:
    """Keys from serve.api_keys are enforced in the deployed process (without serve.api_keys_env);
    the child's environment holds none of the parent's secrets; a server a killed run left
    (recorded, never made the deployment) is stopped, a foreign process never; a port taken
    between free_port and the child's bind is retried on another."""
    overrides = [*overrides, "serve.api_keys_env=null", f"serve.api_keys=[{KEY}]"]
    cfg = compose_config(overrides)
    for name in ("OPENAI_API_KEY", "FOO_SECRET", "HF_TOKEN"):
        monkeypatch.setenv(name, f"planted-{name.lower()}")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    # a run killed after starting its server: the process and its record, no state
    runs = serve_dir(cfg) / "deployments"
    stray_dir = runs / "killed-run"
    stray_dir.mkdir(parents=True)
    port = deploy_module.free_port("127.0.0.1")
    stray_config, env = server_config(cfg, str(tiny_model_dir), "127.0.0.1", port, [])
    (stray_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(stray_config)))
    _, stray = spawn(
        stray_dir / "config.yaml",
        stray_dir / "server.log",
        env,
        host="127.0.0.1",
        port=port,
        model_uri=str(tiny_model_dir),
    )
    # a record whose pid now belongs to someone else
    foreign = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    write_json(
        runs / "reused-pid" / "process.json",
        {**asdict(stray), "pid": foreign.pid, "config_path": str(runs / "reused-pid" / "c.yaml")},
    )
    # a port someone binds between free_port and the server's bind
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    ports = iter([taken.getsockname()[1]])
    real_free_port = deploy_module.free_port
    monkeypatch.setattr(
        deploy_module, "free_port", lambda host: next(ports, None) or real_free_port(host)
    )
    try:
        result = _roll(overrides, dg.DagsterInstance.ephemeral(), tiny_model_dir)
        assert result.success
        dep = result.output_for_node("serving_deployment")
        assert dep["url"] != f"http://127.0.0.1:{taken.getsockname()[1]}/v1"
        first_try = next(runs.glob(f"*-{taken.getsockname()[1]}"))
        assert "address already in use" in (first_try / "server.log").read_text().lower()

        assert httpx.get(f"{dep['url']}/models").status_code == 401
        assert _chat(dep["url"])  # with KEY
        meta = result.asset_materializations_for_node("serving_deployment")[0].metadata
        assert "| True |" in meta["smoke_test"].value  # the smoke test used the key

        child = _environ(dep["pid"])
        assert "PATH" in child and child["HF_HUB_OFFLINE"] == "1"
        assert not {"OPENAI_API_KEY", "FOO_SECRET", "HF_TOKEN", "ARENAFLOW_API_KEYS"} & set(child)
        served = Path(read_state(cfg).config_path).read_text()
        assert KEY not in served and "planted" not in served

        assert _gone(stray.pid), "the stray server must be stopped"
        assert meta["strays_stopped"].value == 1
        assert not (stray_dir / "process.json").exists()
        assert foreign.poll() is None, "a process that is not ours is never signalled"
        assert not (runs / "reused-pid" / "process.json").exists()
    finally:
        taken.close()
        foreign.kill()
        foreign.wait()
        undeploy(cfg)
        assert _gone(stray.pid)
    assert not list(runs.glob("*/process.json")), "undeploy leaves no recorded process"


def test_secrets_the_server_needs_travel_by_env_not_in_its_config(
    overrides: list[str], monkeypatch
) -> None:
    from arenaflow.serve.launch import restore_secrets

    url = "postgresql://arena:pw-8731@db.internal/arena"
    monkeypatch.setenv("ARENA_COOKIE_SECRET", "s" * 32)
    monkeypatch.setenv("OPENAI_API_KEY", "planted")
    cfg = compose_config(
        [
            *overrides,
            f"serve.arena.db_url='{url}'",
            "serve.arena.client_secret_env=ARENA_COOKIE_SECRET",
            "tracking=none",
        ]
    )
    config, env = server_config(cfg, "/ckpt", "127.0.0.1", 8123, [KEY])
    assert env["ARENA_COOKIE_SECRET"] == "s" * 32, "a variable the server's config names"
    assert "OPENAI_API_KEY" not in env
    text = OmegaConf.to_yaml(OmegaConf.create(config))
    assert "pw-8731" not in text and KEY not in text
    assert config["serve"]["api_keys_env"] == "ARENAFLOW_DEPLOY_API_KEYS"
    assert env["ARENAFLOW_DEPLOY_API_KEYS"] == KEY
    child_cfg = OmegaConf.create(text)
    restore_secrets(child_cfg, env)
    assert child_cfg.serve.arena.db_url == url
    assert "ARENAFLOW_DEPLOY_SECRETS" not in env
    assert os.environ.get("ARENAFLOW_DEPLOY_SECRETS") is None
