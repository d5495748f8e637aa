"""The local chat model from the MLflow registry (`models:/name@alias`, `models:/name/N`) and from a
run's artifacts (`runs:/<run id>/model`), resolved like the server resolves `serve.model_uri`."""

from __future__ import annotations

from pathlib import Path

from arenaflow.chat import LocalChat
from arenaflow.engine import Engine, SamplingParams
from arenaflow.tracking import tracker_from_cfg


def test_registry_and_run_uris_load_the_same_model(
    make_cfg, tiny_model_dir: Path, serve_engine: Engine
) -> None:
    cfg = make_cfg("tracking=local")
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("chat-test") as run:
        info = tracker.register_model(run, tiny_model_dir, "chat-tiny")
    tracker.set_alias("chat-tiny", "champion", info.version)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
    expected = serve_engine.chat([messages], SamplingParams(max_new_tokens=8))[0].choices[0].text
    assert expected.strip()

    uris = ["models:/chat-tiny@champion", f"models:/chat-tiny/{info.version}"]
    uris.append(f"runs:/{info.run_id}/model")
    for uri in uris:
        cfg.chat.model_uri = uri
        chat = LocalChat.from_cfg(cfg)
        assert chat.name == uri
        assert Path(chat.where).is_relative_to(Path(cfg.paths.cache_dir)), chat.where
        assert "".join(chat.stream(messages, temperature=0, max_tokens=8)) == expected
