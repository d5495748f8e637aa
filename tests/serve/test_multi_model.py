"""Several models in one app: two tiny Llamas with different weights behind real uvicorn, plus the start-up checks.

The second model is the tiny Llama built with another seed, so the two give different logprobs for
the same prompt; each answer must equal its own engine's greedy answer.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from omegaconf import DictConfig
from openai import OpenAI

from arenaflow.config import compose_config
from arenaflow.engine import Engine, SamplingParams
from arenaflow.serve import ModelsDoNotFitError, ModelSlot, ServeConfigError, create_app, preflight
from arenaflow.serve.loading import model_specs
from tests.serve.conftest import LiveServer, live_server

QUESTION = "Name a colour."
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_dir_b(model_cache: Path) -> Path:
    from arenaflow.models import resolve_model

    cfg = compose_config(["model=tiny_llama", "model.seed=4321", f"paths.cache_dir={model_cache}"])
    return resolve_model(cfg.model, cfg.paths.cache_dir)


@pytest.fixture(scope="session")
def engine_b(tiny_model_dir_b: Path) -> Engine:
    return Engine.load(tiny_model_dir_b, max_batch_size=16)


def two_models(a: Path, b: Path) -> str:
    return f"serve.models=[{{name: tiny-a, uri: {a}}}, {{name: tiny-b, uri: {b}}}]"


@pytest.fixture(scope="module")
def multi(serve_cfg_factory, tiny_model_dir, tiny_model_dir_b, serve_engine, engine_b):
    """(server, app) serving tiny-a (the shared engine) and tiny-b (another seed)."""
    cfg = serve_cfg_factory(
        two_models(tiny_model_dir, tiny_model_dir_b), "serve.aliases={house: tiny-b}"
    )
    app = create_app(cfg, engines={"tiny-a": serve_engine, "tiny-b": engine_b})
    with live_server(app, cfg) as srv:
        yield srv, app


@pytest.fixture(scope="module")
def client(multi) -> OpenAI:
    return OpenAI(base_url=multi[0].v1, api_key="unused", max_retries=0, timeout=60)


def greedy(engine: Engine, content: str, max_tokens: int) -> str:
    prompt = engine.render_chat([{"role": "user", "content": content}])
    return engine.generate([prompt], SamplingParams(max_new_tokens=max_tokens))[0].choices[0].text


def test_models_lists_every_model_with_its_card(client: OpenAI, tiny_model_dir_b: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == ["tiny-a", "tiny-b", "house"]
    card = client.models.retrieve("tiny-b").model_dump()
    assert card["id"] == "tiny-b" and card["lineage"] == {"checkpoint": str(tiny_model_dir_b)}
    # the checkpoint folder is an alias of the model
    assert client.models.retrieve(str(tiny_model_dir_b)).id == "tiny-b"
    # so is serve.aliases' `house`, listed with its parent
    house = client.models.retrieve("house").model_dump()
    assert house["id"] == "house" and house["parent"] == "tiny-b"
    assert house["lineage"] == card["lineage"]


def test_state_exposes_one_slot_per_model(multi, serve_engine: Engine, engine_b: Engine) -> None:
    state = multi[1].state.serve
    assert list(state.models) == ["tiny-a", "tiny-b"]
    a, b = state.slot("tiny-a"), state.slot("tiny-b")
    assert isinstance(a, ModelSlot) and a.engine is serve_engine and b.engine is engine_b
    assert a.scheduler is not b.scheduler


def test_each_model_answers_with_its_own_weights_and_batcher(
    multi, client: OpenAI, serve_engine: Engine, engine_b: Engine
) -> None:
    srv, app = multi
    state = app.state.serve
    before = {n: s.scheduler.stats()["completed"] for n, s in state.models.items()}
    outs = {}
    for name in ("tiny-a", "tiny-b"):
        outs[name] = client.chat.completions.create(
            model=name,
            messages=[{"role": "user", "content": QUESTION}],
            temperature=0,
            max_tokens=6,
            logprobs=True,
        )
        assert outs[name].model == name
    assert outs["tiny-a"].choices[0].message.content == greedy(serve_engine, QUESTION, 6)
    aliased = client.chat.completions.create(
        model="house", messages=[{"role": "user", "content": QUESTION}], temperature=0, max_tokens=6
    )
    assert aliased.choices[0].message.content == greedy(engine_b, QUESTION, 6)
    assert outs["tiny-b"].choices[0].message.content == greedy(engine_b, QUESTION, 6)
    first = {n: o.choices[0].logprobs.content[0] for n, o in outs.items()}
    assert (first["tiny-a"].token, first["tiny-a"].logprob) != (
        first["tiny-b"].token,
        first["tiny-b"].logprob,
    ), "different weights must give different first-token distributions"
    assert state.models["tiny-a"].scheduler.stats()["completed"] == before["tiny-a"] + 1
    assert state.models["tiny-b"].scheduler.stats()["completed"] == before["tiny-b"] + 2
    text = srv.metrics()
    assert 'arenaflow_scheduler_completed_total{model="tiny-b"}' in text
    assert 'arenaflow_generation_tokens_total{model="tiny-a"}' in text


def test_concurrent_requests_to_both_models(multi) -> None:
    srv, app = multi
    state = app.state.serve
    before = {n: s.scheduler.stats()["completed"] for n, s in state.models.items()}

    def ask(name: str) -> str:
        r = httpx.post(
            f"{srv.v1}/completions",
            json={"model": name, "prompt": "Once upon a time", "max_tokens": 8},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        return r.json()["model"]

    names = ["tiny-a", "tiny-b"] * 6
    with ThreadPoolExecutor(max_workers=12) as pool:
        assert sorted(pool.map(ask, names)) == sorted(names)
    for name in ("tiny-a", "tiny-b"):
        assert state.models[name].scheduler.stats()["completed"] == before[name] + 6
    assert srv.metric("arenaflow_scheduler_queue_depth") == 0


def test_unknown_model_is_404_listing_the_names(multi) -> None:
    srv, _ = multi
    r = httpx.post(
        f"{srv.v1}/chat/completions",
        json={"model": "gpt-7", "messages": [{"role": "user", "content": "hi"}]},
        timeout=10,
    )
    assert r.status_code == 404
    err = r.json()["error"]
    assert err["code"] == "model_not_found" and err["param"] == "model"
    assert "'gpt-7'" in err["message"]
    assert "'tiny-a'" in err["message"] and "'tiny-b'" in err["message"]
    assert httpx.get(f"{srv.v1}/models/gpt-7", timeout=10).status_code == 404


def test_ready_and_metrics_report_memory_per_model(multi, serve_engine: Engine) -> None:
    srv, _ = multi
    ready = httpx.get(f"{srv.url}/ready", timeout=10).json()
    assert ready["status"] == "ready" and ready["model"] == "tiny-a"
    assert [m["id"] for m in ready["models"]] == ["tiny-a", "tiny-b"]
    mem = ready["memory"]
    # the formula of estimate_model_memory, from the loaded model: fp32 weights + full KV cache
    c = serve_engine.model.config
    weights = sum(p.numel() for p in serve_engine.model.parameters()) * 4
    kv = 2 * c.num_hidden_layers * c.num_key_value_heads * c.head_dim * 2048 * 16 * 4
    a = mem["models"]["tiny-a"]
    assert (a["weights_bytes"], a["kv_cache_bytes"]) == (weights, kv)
    assert ready["models"][0]["memory_estimate_bytes"] == weights + kv
    assert mem["total_estimate_bytes"] == sum(m["total_bytes"] for m in mem["models"].values())
    assert mem["budget_bytes"] == int(mem["available_bytes"] * 0.9) > 0
    assert srv.metric("arenaflow_memory_estimate_total_bytes") == mem["total_estimate_bytes"]
    per_model = 'arenaflow_model_memory_estimate_bytes{model="tiny-b"}'
    assert srv.metric(per_model) == mem["models"]["tiny-b"]["total_bytes"]


# -- start-up refusals ----------------------------------------------------------------------------
def test_a_set_that_does_not_fit_is_refused_before_loading(
    serve_cfg_factory, tiny_model_dir, tiny_model_dir_b, monkeypatch
) -> None:
    # each tiny model needs ~28 MiB (12 MiB weights + 16 MiB KV cache); allow 40 MiB
    cfg = serve_cfg_factory(
        two_models(tiny_model_dir, tiny_model_dir_b), f"serve.memory_budget_bytes={40 * 2**20}"
    )
    loads: list[str] = []
    monkeypatch.setattr("arenaflow.serve.app.load_engine", lambda c, s: loads.append(s.path))
    with pytest.raises(ModelsDoNotFitError) as exc:
        preflight(cfg)
    message = str(exc.value)
    assert "do not fit" in message and "'tiny-a' 28.3 MiB" in message and "'tiny-b'" in message
    assert "56.6 MiB" in message and "36.0 MiB = 0.9 x 40.0 MiB" in message

    app = create_app(cfg)

    async def start() -> None:
        async with app.router.lifespan_context(app):
            pytest.fail("the app started although the models do not fit")

    with pytest.raises(ModelsDoNotFitError):
        asyncio.run(start())
    assert loads == [], "weights were loaded before the memory check"

    one = serve_cfg_factory(f"serve.memory_budget_bytes={40 * 2**20}")
    assert preflight(one)[1].fits  # one model fits in the same budget


def serve_cli(home: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m arenaflow.serve` on the test experiment (port 9: it must refuse before binding)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "arenaflow.serve",
            "experiment=test",
            f"paths.home={home}",
            "tracking=none",
            *overrides,
            "serve.port=9",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )


def test_cli_refuses_a_set_that_does_not_fit(tiny_model_dir, tiny_model_dir_b, tmp_path) -> None:
    models = two_models(tiny_model_dir, tiny_model_dir_b)
    proc = serve_cli(tmp_path, models, "serve.memory_headroom=0.000001")
    assert proc.returncode != 0
    assert "refusing to serve: the served models do not fit" in proc.stderr
    assert "'tiny-a'" in proc.stderr and "'tiny-b'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.quantization=q3", "model.quantization='q3' is not one of q8_0, q4_k_m or null"),
        ("engine.llamacpp.kv_cache=q8", "engine.llamacpp.kv_cache='q8' is not one of f32, f16"),
    ],
)
def test_cli_refuses_an_unknown_weight_or_cache_type(
    override: str, message: str, tiny_model_dir, tmp_path
) -> None:
    proc = serve_cli(tmp_path, f"serve.model_uri={tiny_model_dir}", override)
    assert proc.returncode != 0
    assert f"arenaflow.serve: refusing to serve: {message}" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_duplicate_and_malformed_models_are_refused(
    serve_cfg_factory, tiny_model_dir, serve_engine
) -> None:
    dup = serve_cfg_factory(
        f"serve.models=[{{name: m, uri: {tiny_model_dir}}}, {{name: m, uri: {tiny_model_dir}}}]"
    )
    with pytest.raises(ServeConfigError, match=r"'m' is used twice \(serve.models\[0\] and"):
        create_app(dup)
    no_uri = serve_cfg_factory("serve.models=[{name: m}]")
    with pytest.raises(ServeConfigError, match=r"serve.models\[0\] must be a mapping"):
        create_app(no_uri)
    one = serve_cfg_factory(f"serve.models=[{{name: m, uri: {tiny_model_dir}}}]")
    with pytest.raises(ServeConfigError, match="not served models"):
        create_app(one, engines={"other": serve_engine})
    models = two_models(tiny_model_dir, tiny_model_dir)
    for aliases, message in [
        ("{tiny-a: tiny-b}", "'tiny-a' is already a served model name"),
        ("{house: tiny-c}", "'house' points to 'tiny-c', which is not served"),
    ]:
        with pytest.raises(ServeConfigError, match=message):
            create_app(serve_cfg_factory(models, f"serve.aliases={aliases}"))
    bad = serve_cfg_factory("serve.memory_headroom=1.5")
    with pytest.raises(ServeConfigError, match="memory_headroom must be in"):
        preflight(bad)


def test_models_from_competitors(serve_cfg_factory, tiny_model_dir, tiny_model_dir_b) -> None:
    cfg: DictConfig = serve_cfg_factory(
        "serve.models_from=competitors",
        f"evaluate.competitors=[{{name: a, local: {tiny_model_dir}}}, {{name: b, local: "
        f"{tiny_model_dir_b}}}, {{name: gpt, openai_compatible: {{base_url: "
        "'http://127.0.0.1:9/v1', model: gpt}}]",
    )
    specs = model_specs(cfg)
    assert [(s.name, s.uri) for s in specs] == [
        ("a", str(tiny_model_dir)),
        ("b", str(tiny_model_dir_b)),
    ]


@pytest.fixture
def registry_cfg(tmp_path: Path, model_cache: Path, tiny_model_dir_b: Path) -> Iterator[DictConfig]:
    """A temp MLflow registry (SQLite) holding tiny-b as version 1 with the alias `champion`."""
    from arenaflow.tracking import tracker_from_cfg

    cfg = compose_config(
        ["experiment=test", f"paths.home={tmp_path / 'home'}", f"paths.cache_dir={model_cache}"]
    )
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("register_tiny_b", cfg) as run:
        info = tracker.register_model(run, str(tiny_model_dir_b), "tiny-b-reg")
    tracker.set_alias("tiny-b-reg", "champion", info.version)
    yield cfg


def test_a_registry_model_next_to_a_folder(
    registry_cfg: DictConfig, tiny_model_dir: Path, serve_engine: Engine, engine_b: Engine
) -> None:
    registry_cfg.serve.models = [
        {"name": "tiny-a", "uri": str(tiny_model_dir)},
        {"name": "champ", "uri": "models:/tiny-b-reg@champion"},
    ]
    app = create_app(registry_cfg, engines={"tiny-a": serve_engine})
    with live_server(app, registry_cfg) as srv:
        srv: LiveServer
        cards = httpx.get(f"{srv.v1}/models", timeout=10).json()["data"]
        assert [c["id"] for c in cards] == ["tiny-a", "champ"]
        assert cards[1]["version"] == "1" and "champion" in cards[1]["lineage"]["aliases"]
        out = httpx.post(
            f"{srv.v1}/chat/completions",
            json={
                "model": "models:/tiny-b-reg/1",  # the pinned version is an alias of `champ`
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 6,
                "temperature": 0,
            },
            timeout=60,
        ).json()
        assert out["model"] == "champ"
        assert out["choices"][0]["message"]["content"] == greedy(engine_b, QUESTION, 6)


def test_estimate_follows_dtype_and_batch(tiny_model_dir: Path) -> None:
    from arenaflow.serve.memory import estimate_model_memory

    fp32 = estimate_model_memory("m", tiny_model_dir, dtype="float32", max_batch_size=16)
    bf16 = estimate_model_memory("m", tiny_model_dir, dtype="bfloat16", max_batch_size=4)
    assert bf16.weights_bytes * 2 == fp32.weights_bytes
    assert bf16.kv_cache_bytes * 8 == fp32.kv_cache_bytes  # half the bytes, a quarter of the rows
    with pytest.raises(ServeConfigError, match="unknown serving dtype"):
        estimate_model_memory("m", tiny_model_dir, dtype="float7", max_batch_size=1)
