"""Adapters served on a shared base: a real uvicorn server with the tiny base and two LoRA adapters.

All three load from their folders in the app's lifespan (nothing preloaded), so the server's own
resolution, grouping by base, memory plan and shared batch are what the answers go through.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from arenaflow.adapters import ADAPTER_META
from arenaflow.engine import Engine, SamplingParams
from arenaflow.serve import ServeConfigError, create_app, preflight
from arenaflow.serve.adapters import AdapterScheduler
from tests.adapter_checkpoints import make_adapter, models_override
from tests.serve.conftest import LiveServer, live_server

NAMES = ["tiny-base", "lora-a", "lora-b"]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def served(serve_cfg_factory, tiny_model_dir, tiny_adapters) -> Iterator[tuple[LiveServer, object]]:
    cfg = serve_cfg_factory(models_override(tiny_model_dir, tiny_adapters))
    app = create_app(cfg)
    with live_server(app, cfg) as srv:
        yield srv, app


def chat(srv: LiveServer, model: str, content: str) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    body |= {"temperature": 0, "max_tokens": MAX_TOKENS}
    r = httpx.post(f"{srv.v1}/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()


def alone(path: Path, content: str) -> str:
    """The greedy answer of the checkpoint loaded on its own (an adapter: merged into its base)."""
    engine = Engine.load(path)
    prompt = engine.render_chat([{"role": "user", "content": content}])
    params = SamplingParams(max_new_tokens=MAX_TOKENS)
    return engine.generate([prompt], params)[0].choices[0].text


def test_models_lists_every_adapter_with_its_base(served, tiny_adapters, tiny_model_dir) -> None:
    srv, app = served
    listed = httpx.get(f"{srv.v1}/models", timeout=30).json()["data"]
    assert [m["id"] for m in listed] == NAMES
    card = httpx.get(f"{srv.v1}/models/lora-b", timeout=30).json()
    assert card["lineage"]["checkpoint"] == str(tiny_adapters["lora-b"])
    assert card["lineage"]["base_model"] == str(tiny_model_dir)
    slots = app.state.serve.models
    # one copy of the base: the three names decode on one model object, in one scheduler
    assert (
        slots["lora-a"].engine.model
        is slots["lora-b"].engine.model
        is slots["tiny-base"].engine.model
    )
    assert all(isinstance(slots[n].scheduler, AdapterScheduler) for n in NAMES)
    assert slots["lora-a"].scheduler.shared is slots["tiny-base"].scheduler.shared


def test_a_mixed_concurrent_batch_gives_each_request_its_own_adapter(
    served, tiny_adapters, tiny_model_dir
) -> None:
    srv, app = served
    question = "Write a short poem about the sea."
    shared = app.state.serve.models["tiny-base"].scheduler.shared
    steps_before = shared.stats()["steps"]
    before = scheduler_series(srv)
    with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
        replies = dict(zip(NAMES, pool.map(lambda n: chat(srv, n, question), NAMES), strict=True))
    paths = {"tiny-base": tiny_model_dir, **tiny_adapters}
    answers = {n: r["choices"][0]["message"]["content"] for n, r in replies.items()}
    assert answers == {n: alone(paths[n], question) for n in NAMES}
    assert answers["lora-a"] != answers["lora-b"] != answers["tiny-base"]
    tokens = sum(r["usage"]["completion_tokens"] for r in replies.values())
    # one request per model: fewer decode steps than tokens means rows of different models shared steps
    assert shared.stats()["steps"] - steps_before < tokens

    # /metrics: each model's own requests and tokens, which add up to the shared batch's
    after = scheduler_series(srv)
    for name, reply in replies.items():
        assert after["completed", name] - before["completed", name] == 1
        generated = after["tokens_generated", name] - before["tokens_generated", name]
        assert generated == reply["usage"]["completion_tokens"]
    assert sum(after["tokens_generated", n] for n in NAMES) == shared.stats()["tokens_generated"]
    assert after["steps", "lora-a"] == after["steps", "tiny-base"]  # the one batch's steps


def scheduler_series(srv: LiveServer) -> dict[tuple[str, str], float]:
    """{(counter, model): value} of the arenaflow_scheduler_* counters on /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(srv.metrics()):
        for sample in family.samples:
            if sample.name.startswith("arenaflow_scheduler_") and sample.name.endswith("_total"):
                key = sample.name.removeprefix("arenaflow_scheduler_").removesuffix("_total")
                out[key, sample.labels["model"]] = sample.value
    return out


def test_the_memory_plan_counts_the_shared_base_once(served, tiny_adapters) -> None:
    srv, app = served
    plan = app.state.serve.memory
    by_name = {m.name: m for m in plan.models}
    base = by_name["tiny-base"]
    assert base.kv_cache_bytes > 0 and base.weights_bytes > 0
    for name in ("lora-a", "lora-b"):
        lora = sum(p.numel() for n, p in slots_params(app) if f"{name}" in n and "lora_" in n)
        assert (by_name[name].weights_bytes, by_name[name].kv_cache_bytes) == (lora * 4, 0)
    assert plan.total_bytes < 2 * base.total_bytes
    assert any("share one copy" in note for note in plan.notes)


def slots_params(app) -> list:
    return list(app.state.serve.models["lora-a"].engine.model.named_parameters())


def test_an_adapter_over_another_base_is_refused_before_loading(
    serve_cfg_factory, tmp_path: Path, tiny_adapters, tiny_model_dir
) -> None:
    moved = shutil.copytree(tiny_adapters["lora-a"], tmp_path / "lora-a")
    meta = json.loads((moved / ADAPTER_META).read_text())
    (moved / ADAPTER_META).write_text(json.dumps({**meta, "base_digest": "0123456789abcdef"}))
    cfg = serve_cfg_factory(models_override(tiny_model_dir, {"lora-a": moved}))
    with pytest.raises(ServeConfigError, match=r"serve.models\[1\].*was trained on"):
        preflight(cfg)


def test_a_streamed_adapter_answer_equals_its_plain_answer(served) -> None:
    srv, _ = served
    question = "Name a colour."
    plain = chat(srv, "lora-b", question)["choices"][0]["message"]["content"]
    body = {"model": "lora-b", "messages": [{"role": "user", "content": question}]}
    body |= {"temperature": 0, "max_tokens": MAX_TOKENS, "stream": True}
    text = ""
    with httpx.stream("POST", f"{srv.v1}/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: {"):
                delta = json.loads(line[6:])["choices"][0]["delta"]
                text += delta.get("content") or ""
    assert text == plain


def test_a_registered_adapter_is_served_over_its_registered_base(
    serve_cfg_factory, tmp_path: Path, tiny_model_dir: Path, tiny_adapters
) -> None:
    """A registry version tagged adapter=true whose base is a registry version: both resolve (the
    base downloaded once into the cache), the card carries the lineage, the plan one base."""
    from arenaflow.tracking import tracker_from_cfg

    cfg = serve_cfg_factory("tracking=local", f"paths.home={tmp_path}")
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("base", cfg) as run:
        base = tracker.register_model(run, tiny_model_dir, "tiny-chat")
    base_uri = f"models:/tiny-chat/{base.version}"
    folder = make_adapter(tiny_model_dir, tmp_path / "lora", seed=1, base_ref=base_uri)
    with tracker.start_run("lora", cfg) as run:
        tags = {"adapter": "true", "base_model": base_uri}
        version = tracker.register_model(run, folder, "tiny-chat", tags=tags).version
    entries = f"serve.models=[{{name: lora, uri: 'models:/tiny-chat/{version}'}}]"
    resolved, plan = preflight(
        serve_cfg_factory("tracking=local", f"paths.home={tmp_path}", entries)
    )
    card = resolved["lora"].card
    assert card["version"] == version and card["lineage"]["base_model"] == base_uri
    assert card["lineage"]["adapter"] == "true"
    cache = Path(cfg.paths.cache_dir) / "serve"  # the base downloaded like any served model
    assert (
        resolved["lora"].base.relative_to(cache).parts[0].startswith(f"tiny-chat-v{base.version}-")
    )
    assert plan.models[0].name == "lora"
    assert plan.models[0].kv_cache_bytes > 0  # the base (and its KV cache) under the adapter's name
