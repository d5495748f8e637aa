"""Adapters served on llama.cpp: a real uvicorn server with `engine.backend=llamacpp`, the tiny base
and two LoRA adapters, all loaded in the app's lifespan. The base's f16 export is loaded once, each
adapter is its GGUF LoRA file in a context of its own, and every answer is the hf engine's with peft.
"""

from __future__ import annotations

from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

pytest.importorskip("llama_cpp")

from arenaflow.engine import Engine, SamplingParams  # noqa: E402
from arenaflow.engine.llamacpp import LlamaCppEngine  # noqa: E402
from arenaflow.serve import create_app  # noqa: E402
from tests.adapter_checkpoints import models_override  # noqa: E402
from tests.serve.conftest import LiveServer, live_server  # noqa: E402

NAMES = ["tiny-base", "lora-a", "lora-b"]
MAX_TOKENS = 12
QUESTION = "Write a short poem about the sea."


@pytest.fixture(scope="module")
def served(serve_cfg_factory, tiny_model_dir, tiny_adapters) -> Iterator[tuple[LiveServer, object]]:
    cfg = serve_cfg_factory(
        models_override(tiny_model_dir, tiny_adapters),
        "engine.backend=llamacpp",
        "engine.llamacpp.n_ctx=256",
        "engine.llamacpp.n_threads=1",
        "serve.max_batch_size=2",
    )
    app = create_app(cfg)
    with live_server(app, cfg) as srv:
        yield srv, app


def hf_answer(path: Path) -> str:
    engine = Engine.load(path)
    prompt = engine.render_chat([{"role": "user", "content": QUESTION}])
    return engine.generate([prompt], SamplingParams(max_new_tokens=MAX_TOKENS))[0].choices[0].text


def test_each_adapter_answers_with_its_own_weights_over_one_gguf(
    served, tiny_model_dir, tiny_adapters
) -> None:
    srv, app = served
    assert [m["id"] for m in httpx.get(f"{srv.v1}/models", timeout=30).json()["data"]] == NAMES

    def chat(name: str) -> str:
        body = {"model": name, "messages": [{"role": "user", "content": QUESTION}]}
        body |= {"temperature": 0, "max_tokens": MAX_TOKENS}
        r = httpx.post(f"{srv.v1}/chat/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with ThreadPoolExecutor(max_workers=len(NAMES)) as pool:
        answers = dict(zip(NAMES, pool.map(chat, NAMES), strict=True))
    paths = {"tiny-base": tiny_model_dir, **tiny_adapters}
    assert answers == {n: hf_answer(paths[n]) for n in NAMES}
    assert len(set(answers.values())) == 3

    engines = {n: app.state.serve.models[n].engine for n in NAMES}
    assert all(isinstance(e, LlamaCppEngine) for e in engines.values())
    assert len({id(e.runtime.weights) for e in engines.values()}) == 1  # one copy of the base
    assert engines["tiny-base"].lora is None and engines["lora-a"].lora != engines["lora-b"].lora


def test_the_memory_plan_counts_the_gguf_once_and_a_kv_cache_per_context(served) -> None:
    _, app = served
    plan = app.state.serve.memory
    by_name = {m.name: m for m in plan.models}
    base = by_name["tiny-base"]
    assert base.dtype == "llama.cpp f16" and base.context_length <= 256
    for name in ("lora-a", "lora-b"):
        m = by_name[name]
        assert m.kv_cache_bytes == base.kv_cache_bytes  # a context of its own
        assert 0 < m.weights_bytes < base.weights_bytes / 4  # only its f32 LoRA matrices
    assert any("share one copy" in note for note in plan.notes)
