"""The gateway in front of an engine process (serve/upstream.py, serve/engine_process.py).

The engine is a real OpenAI-compatible server process: our own `python -m arenaflow.serve.launch`
on the tiny model, started with `start_engine` the way the app starts `vllm serve`, behind its own
key. The gateway runs on another loopback port with its own keys and forwards to it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import psutil
import pytest
from omegaconf import DictConfig, OmegaConf

from arenaflow.serve import ServeConfigError, create_app
from arenaflow.serve.deploy import server_config
from arenaflow.serve.engine_process import (
    VLLM_KEY_ENV,
    EngineProcess,
    EngineProcessError,
    engine_env,
    launch_vllm,
    start_engine,
    vllm_binary,
    vllm_command,
)
from arenaflow.serve.errors import APIError
from arenaflow.serve.loading import UpstreamSpec, model_specs
from arenaflow.serve.process import child_config
from arenaflow.serve.upstream import Upstream
from tests.serve.conftest import LiveServer, free_port, live_server

UPSTREAM_KEY = "engine-secret-5b1f0c9e"  # the engine's own key: never shown by the gateway
GATEWAY_KEY = "gateway-key-a41"
KEY_ENV = "AF_TEST_UPSTREAM_KEY"
CHAT = [{"role": "user", "content": "Name three colours."}]


@pytest.fixture(scope="module")
def engine(serve_cfg_factory, tmp_path_factory) -> Iterator[EngineProcess]:
    """The tiny model's arenaflow server as a child process, keyed with UPSTREAM_KEY."""
    run_dir = tmp_path_factory.mktemp("engine")
    port = free_port()
    cfg = serve_cfg_factory("serve.arena.enabled=false", "serve.log_level=warning")
    container = OmegaConf.to_container(cfg, resolve=True)
    container["serve"].update({"host": "127.0.0.1", "port": port})
    config, env = child_config(container, [UPSTREAM_KEY])  # what a deployment hands its server
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    argv = [sys.executable, "-m", "arenaflow.serve.launch", str(run_dir / "config.yaml")]
    proc = start_engine(
        "tiny-chat",
        argv,
        env,
        url=f"http://127.0.0.1:{port}/v1",
        api_key=UPSTREAM_KEY,
        log_path=run_dir / "engine.log",
        ready_timeout_s=240,
    )
    yield proc
    proc.stop(20)


def gateway_cfg(serve_cfg_factory, upstream: dict) -> DictConfig:
    cfg = serve_cfg_factory(f"serve.api_keys=[{GATEWAY_KEY}]", "serve.arena.enabled=false")
    OmegaConf.update(cfg, "serve.models", [{"name": "gw-tiny", "upstream": upstream}], merge=False)
    return cfg


@pytest.fixture(scope="module")
def gateway(engine: EngineProcess, serve_cfg_factory) -> Iterator[LiveServer]:
    upstream = {"url": engine.url, "model": "tiny-chat", "api_key_env": KEY_ENV}
    cfg = gateway_cfg(serve_cfg_factory, upstream)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(KEY_ENV, UPSTREAM_KEY)
        with live_server(create_app(cfg), cfg) as srv:
            yield srv


def client(base_url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=120)


def metric(srv: LiveServer, name: str, model: str, key: str = GATEWAY_KEY) -> float:
    text = httpx.get(f"{srv.url}/metrics", headers=_auth(key), timeout=10).text
    label = f'model="{model}"'
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and label in line
    )


def _auth(key: str = GATEWAY_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_chat_stream_and_completions_give_the_engines_greedy_tokens(gateway, engine) -> None:
    via, direct = client(gateway.v1, GATEWAY_KEY), client(engine.url, UPSTREAM_KEY)
    greedy = {"temperature": 0, "max_tokens": 12}
    want = direct.chat.completions.create(model="tiny-chat", messages=CHAT, **greedy)
    got = via.chat.completions.create(model="gw-tiny", messages=CHAT, **greedy)
    assert got.choices[0].message.content == want.choices[0].message.content
    assert got.model == "gw-tiny" and got.usage.model_dump() == want.usage.model_dump()

    chunks = list(
        via.chat.completions.create(model="gw-tiny", messages=CHAT, stream=True, **greedy)
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == want.choices[0].message.content
    assert {c.model for c in chunks} == {"gw-tiny"}
    assert all(c.usage is None for c in chunks)  # the gateway asked for usage, the client did not

    chunks = list(
        via.chat.completions.create(
            model="gw-tiny",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": True},
            **greedy,
        )
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12

    plain = direct.completions.create(model="tiny-chat", prompt="Once upon a time", **greedy)
    routed = via.completions.create(model="gw-tiny", prompt="Once upon a time", **greedy)
    assert routed.choices[0].text == plain.choices[0].text and routed.model == "gw-tiny"


def test_penalties_and_logit_bias_go_to_the_engine_as_sent(gateway, engine) -> None:
    via, direct = client(gateway.v1, GATEWAY_KEY), client(engine.url, UPSTREAM_KEY)
    ask = {"messages": CHAT, "temperature": 0, "max_tokens": 6}
    plain = direct.chat.completions.create(model="tiny-chat", **ask).choices[0].message.content
    ask |= {"presence_penalty": 1.0, "logit_bias": {"1000": 100}}
    want = direct.chat.completions.create(model="tiny-chat", **ask).choices[0].message.content
    got = via.chat.completions.create(model="gw-tiny", **ask).choices[0].message.content
    assert got == want != plain


def test_models_list_the_engines_model_under_the_gateways_name(gateway, engine) -> None:
    cards = client(gateway.v1, GATEWAY_KEY).models.list().data
    assert [c.id for c in cards] == ["gw-tiny"]
    card = cards[0].model_dump()
    engine_card = httpx.get(f"{engine.url}/models/tiny-chat", headers=_auth(UPSTREAM_KEY)).json()
    assert card["chat_template_hash"] == engine_card["chat_template_hash"]
    assert card["context_length"] == engine_card["context_length"]
    assert card["lineage"]["upstream_model"] == "tiny-chat"
    assert card["lineage"]["upstream_url"] == engine.url
    ready = httpx.get(f"{gateway.url}/ready", headers=_auth()).json()
    assert ready["status"] == "ready" and ready["models"][0]["id"] == "gw-tiny"


def test_the_engines_400_is_the_gateways_400(gateway, engine) -> None:
    ask = {"messages": CHAT, "max_tokens": 100_000}
    with pytest.raises(openai.BadRequestError) as direct:
        client(engine.url, UPSTREAM_KEY).chat.completions.create(model="tiny-chat", **ask)
    with pytest.raises(openai.BadRequestError) as via:
        client(gateway.v1, GATEWAY_KEY).chat.completions.create(model="gw-tiny", **ask)
    assert via.value.body["message"] == direct.value.body["message"]
    assert "context window" in via.value.body["message"]
    assert via.value.body["code"] == "context_length_exceeded"
    assert via.value.body["param"] == "max_tokens"


def test_gateway_keys_guard_and_the_engine_key_stays_hidden(gateway, engine, caplog) -> None:
    caplog.set_level(logging.DEBUG)
    body = {"model": "gw-tiny", "messages": CHAT, "max_tokens": 2}
    url = f"{gateway.v1}/chat/completions"
    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers=_auth(UPSTREAM_KEY)).status_code == 401
    assert httpx.post(url, json=body, headers=_auth()).status_code == 200
    shown = [
        httpx.get(f"{gateway.v1}/models", headers=_auth()).text,
        httpx.get(f"{gateway.url}/ready", headers=_auth()).text,
        httpx.get(f"{gateway.url}/metrics", headers=_auth()).text,
    ]
    assert all(UPSTREAM_KEY not in text for text in shown)
    assert UPSTREAM_KEY not in caplog.text
    assert UPSTREAM_KEY not in Path(engine.log_path).read_text()
    assert GATEWAY_KEY not in Path(engine.log_path).read_text()


def test_metrics_count_the_engines_requests(gateway) -> None:
    before = metric(gateway, "arenaflow_scheduler_completed_total", "gw-tiny")
    tokens = metric(gateway, "arenaflow_generation_tokens_total", "gw-tiny")
    via = client(gateway.v1, GATEWAY_KEY)
    via.chat.completions.create(model="gw-tiny", messages=CHAT, max_tokens=5, temperature=0)
    list(via.chat.completions.create(model="gw-tiny", messages=CHAT, max_tokens=3, stream=True))
    assert metric(gateway, "arenaflow_scheduler_completed_total", "gw-tiny") == before + 2
    assert metric(gateway, "arenaflow_generation_tokens_total", "gw-tiny") == tokens + 8
    assert metric(gateway, "arenaflow_time_to_first_token_seconds_count", "gw-tiny") >= 2


def test_a_client_that_leaves_a_stream_frees_the_engines_rows(gateway, engine) -> None:
    engine_srv = LiveServer(engine.url.removesuffix("/v1"), gateway.cfg)
    before = metric(engine_srv, "arenaflow_scheduler_cancelled_total", "tiny-chat", UPSTREAM_KEY)
    body = {"model": "gw-tiny", "messages": CHAT, "max_tokens": 400, "stream": True}
    with httpx.stream("POST", f"{gateway.v1}/chat/completions", json=body, headers=_auth()) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data:")  # the stream runs; then the client goes
    deadline = time.time() + 30
    while (
        metric(engine_srv, "arenaflow_scheduler_cancelled_total", "tiny-chat", UPSTREAM_KEY)
        == before
    ):
        assert time.time() < deadline, "the engine kept decoding for a client that left"
        time.sleep(0.2)
    assert metric(gateway, "arenaflow_scheduler_cancelled_total", "gw-tiny") >= 1


def test_an_engine_that_is_down_is_a_503_and_ready_says_so(serve_cfg_factory) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    cfg = gateway_cfg(serve_cfg_factory, {"url": dead, "model": "tiny-chat"})
    with live_server(create_app(cfg), cfg) as srv:
        body = {"model": "gw-tiny", "messages": CHAT, "max_tokens": 2}
        for stream in (False, True):
            payload = {**body, "stream": stream}
            r = httpx.post(f"{srv.v1}/chat/completions", json=payload, headers=_auth())
            assert r.status_code == 503, r.text
            error = r.json()["error"]
            assert "unreachable" in error["message"] and dead in error["message"]
            assert error["code"] == "engine_unavailable" and error["type"] == "server_error"
        bare = httpx.get(f"{srv.url}/ready")
        assert bare.status_code == 503 and bare.json() == {"status": "engine_unavailable"}
        detailed = httpx.get(f"{srv.url}/ready", headers=_auth()).json()
        assert "unreachable" in detailed["models"]["gw-tiny"]
        assert metric(srv, "arenaflow_scheduler_failed_total", "gw-tiny") == 2


def test_the_arena_battles_only_models_served_in_process(serve_cfg_factory, serve_engine) -> None:
    cfg = serve_cfg_factory()
    dead = {"url": f"http://127.0.0.1:{free_port()}/v1", "model": "m"}
    entries = [{"name": "local", "uri": cfg.serve.model_uri}, {"name": "remote", "upstream": dead}]
    OmegaConf.update(cfg, "serve.models", entries, merge=False)
    with live_server(create_app(cfg, engines={"local": serve_engine}), cfg) as srv:
        assert httpx.get(f"{srv.url}/arena/api/models").json() == {"models": ["local"]}
        models = httpx.get(f"{srv.v1}/models").json()["data"]
        assert [m["id"] for m in models] == ["local", "remote"]


def test_engine_errors_map_to_the_gateways() -> None:
    up = Upstream("m", UpstreamSpec("http://e:1/v1", "x"), None, timeout_s=5, max_in_flight=0)
    busy = up.error(
        429, b'{"error": {"message": "queue full"}}', httpx.Headers({"retry-after": "7"})
    )
    assert (busy.status, busy.message, busy.headers) == (429, "queue full", {"Retry-After": "7"})
    key = up.error(401, b'{"error": "Unauthorized"}', httpx.Headers())
    assert key.status == 502 and "api_key_env" in key.message
    assert up.error(500, b"boom", httpx.Headers()).status == 502
    assert up.error(422, b'{"detail": "bad"}', httpx.Headers()).status == 400
    with pytest.raises(APIError) as full:  # the gateway's own bound on requests in flight
        asyncio.run(up.submit("chat/completions", {}))
    assert full.value.status == 429 and up.stats()["rejected"] == 1


def test_serve_models_entries_for_engine_processes(serve_cfg_factory) -> None:
    base = serve_cfg_factory()

    def specs(entries: list) -> list:
        cfg = base.copy()
        OmegaConf.update(cfg, "serve.models", entries, merge=False)
        return model_specs(cfg)

    up = {"url": "http://h:8001/v1/", "model": "m", "api_key_env": "K"}
    remote, vllm = specs(
        [{"name": "a", "upstream": up}, {"name": "b", "uri": "/c", "engine": "vllm"}]
    )
    assert remote.upstream == UpstreamSpec("http://h:8001/v1", "m", "K") and not remote.in_process
    assert vllm.engine == "vllm" and vllm.uri == "/c" and not vllm.in_process
    assert remote.entry() == {"name": "a", "upstream": {**up, "url": "http://h:8001/v1"}}
    bad = [
        {"name": "a", "uri": "/c", "upstream": up},
        {"name": "a", "upstream": {"url": "http://h/v1"}},
        {"name": "a", "uri": "/c", "engine": "sglang"},
        {"name": "a", "upstream": {**up, "key": "sk-1"}},
    ]
    for entry in bad:
        with pytest.raises(ServeConfigError, match=r"serve\.models\[0\]"):
            specs([entry])


def test_a_deployment_carries_engine_entries_and_their_key_variable(
    serve_cfg_factory, tiny_model_dir, monkeypatch
) -> None:
    cfg = serve_cfg_factory()
    remote = {
        "name": "remote",
        "upstream": {"url": "http://h:1/v1", "model": "m", "api_key_env": KEY_ENV},
    }
    OmegaConf.update(cfg, "serve.models", [remote], merge=False)
    monkeypatch.setenv(KEY_ENV, UPSTREAM_KEY)
    config, env = server_config(cfg, str(tiny_model_dir), "127.0.0.1", 8000, [])
    assert config["serve"]["models"] == [{"name": "tiny-chat", "uri": str(tiny_model_dir)}, remote]
    assert env[KEY_ENV] == UPSTREAM_KEY and UPSTREAM_KEY not in json.dumps(config)


def test_the_vllm_command_line_and_environment(monkeypatch) -> None:
    argv = vllm_command(
        "/venv/bin/vllm",
        Path("/ckpt/v3"),
        "chat",
        host="127.0.0.1",
        port=8123,
        dtype="bfloat16",
        max_num_seqs=16,
        extra_args=["--gpu-memory-utilization", "0.45"],
    )
    assert argv[:3] == ["/venv/bin/vllm", "serve", "/ckpt/v3"]
    flags = dict(zip(argv[3::2], argv[4::2], strict=True))
    assert flags == {
        "--served-model-name": "chat",
        "--host": "127.0.0.1",
        "--port": "8123",
        "--dtype": "bfloat16",
        "--max-num-seqs": "16",
        "--generation-config": "vllm",
        "--gpu-memory-utilization": "0.45",
    }
    monkeypatch.setenv("VLLM_USE_V1", "1")
    monkeypatch.setenv("VLLM_API_KEY", "parents-key")
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    env = engine_env(VLLM_KEY_ENV, "made-for-it", prefixes=("VLLM_",))
    assert env[VLLM_KEY_ENV] == "made-for-it" and env["VLLM_USE_V1"] == "1"
    assert "HF_TOKEN" not in env and not any("made-for-it" in a for a in argv)


def test_what_no_engine_process_can_serve_with_is_refused_at_start(
    serve_cfg_factory, tiny_model_dir, monkeypatch
) -> None:
    if vllm_binary() is not None:
        pytest.skip("vLLM is installed here")
    cfg = serve_cfg_factory()
    entry = {"name": "v", "uri": str(tiny_model_dir), "engine": "vllm"}
    OmegaConf.update(cfg, "serve.models", [entry], merge=False)
    with pytest.raises(ServeConfigError, match=r"serve\.models\[0\] \(v\).*pip install vllm"):
        create_app(cfg)
    with pytest.raises(ServeConfigError, match="pip install vllm"):
        launch_vllm(cfg, "v", tiny_model_dir, "serve.models[0]")
    monkeypatch.delenv(KEY_ENV, raising=False)
    up = {"url": "http://127.0.0.1:9/v1", "model": "m", "api_key_env": KEY_ENV}
    OmegaConf.update(cfg, "serve.models", [{"name": "r", "upstream": up}], merge=False)
    with pytest.raises(ServeConfigError, match=rf"\${KEY_ENV} is not set"):
        create_app(cfg)


def test_an_engine_that_exits_is_reported_with_its_log(tmp_path: Path) -> None:
    argv = [sys.executable, "-c", "print('no GPU found', flush=True); raise SystemExit(3)"]
    with pytest.raises(EngineProcessError, match=r"(?s)exited with code 3.*no GPU found"):
        start_engine(
            "chat",
            argv,
            dict(os.environ),
            url=f"http://127.0.0.1:{free_port()}/v1",
            api_key="k",
            log_path=tmp_path / "engine.log",
            ready_timeout_s=60,
        )


def test_stopping_the_engine_ends_its_process(engine: EngineProcess, gateway) -> None:
    """Runs last in this module: the gateway then answers 503 for the model, /ready too."""
    pid = engine.proc.pid
    engine.stop(20)
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    r = httpx.post(
        f"{gateway.v1}/chat/completions",
        json={"model": "gw-tiny", "messages": CHAT, "max_tokens": 2},
        headers=_auth(),
    )
    assert r.status_code == 503 and "unreachable" in r.json()["error"]["message"]
    assert httpx.get(f"{gateway.url}/ready").status_code == 503


@pytest.mark.gpu
@pytest.mark.skipif(vllm_binary() is None, reason="vLLM is not installed")
def test_vllm_serves_behind_the_gateway(serve_cfg_factory, tiny_model_dir) -> None:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("vLLM needs a GPU")
    cfg = serve_cfg_factory("hardware=gpu_1x", "serve.arena.enabled=false")
    entry = {"name": "v", "uri": str(tiny_model_dir), "engine": "vllm"}
    OmegaConf.update(cfg, "serve.models", [entry], merge=False)
    with live_server(create_app(cfg), cfg) as srv:
        reply = client(srv.v1, "none").chat.completions.create(
            model="v", messages=CHAT, max_tokens=8, temperature=0
        )
        assert reply.model == "v" and reply.usage.completion_tokens > 0
