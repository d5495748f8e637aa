"""LoRA adapter checkpoints in the engine: loaded alone (merged into their base) and several over one base.

The adapters are made with peft directly on the tiny Llama, with random A and B (peft's
`init_lora_weights=False`; B is zero by default), so each one changes the greedy tokens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from arenaflow.adapters import ADAPTER_META, is_adapter, read_adapter
from arenaflow.chat.backends import LocalChat
from arenaflow.engine import Engine, SamplingParams
from arenaflow.engine.adapters import load_shared
from arenaflow.models import load_model, local_checkpoint, model_identity
from arenaflow.tracking import tracker_from_cfg
from tests.adapter_checkpoints import make_adapter

GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def shared(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> tuple[Engine, dict[str, Engine]]:
    return load_shared(tiny_model_dir, tiny_adapters)


def greedy_ids(engine: Engine, question: str) -> list[int]:
    prompt = engine.render_chat([{"role": "user", "content": question}])
    return engine.generate([prompt], GREEDY)[0].choices[0].token_ids


def test_engine_loads_an_adapter_folder_as_the_merged_model(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tiny_engine: Engine
) -> None:
    from peft import PeftModel

    merged = PeftModel.from_pretrained(load_model(tiny_model_dir), str(tiny_adapters["lora-a"]))
    expected = Engine(merged.merge_and_unload(), tiny_engine.tokenizer, model_id="merged")
    engine = Engine.load(tiny_adapters["lora-a"])
    assert read_adapter(tiny_adapters["lora-a"]).base == str(tiny_model_dir)
    assert greedy_ids(engine, "Name a colour.") == greedy_ids(expected, "Name a colour.")
    assert greedy_ids(engine, "Name a colour.") != greedy_ids(tiny_engine, "Name a colour.")


def test_two_adapters_on_one_base_answer_with_their_own_weights(
    shared: tuple[Engine, dict[str, Engine]], tiny_adapters: dict[str, Path], tiny_engine: Engine
) -> None:
    base, views = shared
    q = "What is the capital of France?"
    alone = {name: greedy_ids(Engine.load(path), q) for name, path in tiny_adapters.items()}
    assert {name: greedy_ids(v, q) for name, v in views.items()} == alone
    assert alone["lora-a"] != alone["lora-b"]
    assert greedy_ids(base, q) == greedy_ids(tiny_engine, q)  # the base rows see no adapter
    # one copy of the base weights: every view decodes on the same model object
    assert all(v.model is base.model for v in views.values())
    lora = sum(p.numel() for n, p in base.model.named_parameters() if "lora_" in n)
    plain = sum(p.numel() for p in tiny_engine.model.parameters())
    assert sum(p.numel() for p in base.model.parameters()) == plain + lora


def test_a_mixed_batch_gives_every_row_its_own_adapter(
    shared: tuple[Engine, dict[str, Engine]],
) -> None:
    """Rows of both adapters and of the base decode in one running batch (peft's adapter_names)."""
    base, views = shared
    questions = ["Hi", "List three prime numbers.", "Explain gravity to a child.", "Hi"]
    engines = [views["lora-a"], views["lora-b"], base, views["lora-a"]]
    pairs = list(zip(engines, questions, strict=True))
    prompts = [e.render_chat([{"role": "user", "content": q}]) for e, q in pairs]
    alone = [
        e.generate([p], GREEDY)[0].choices[0].token_ids
        for (e, _), p in zip(pairs, prompts, strict=True)
    ]
    requests = [e.make_request(p, GREEDY) for (e, _), p in zip(pairs, prompts, strict=True)]
    batch = base.new_batch()
    batch.admit(requests)
    widest = len(batch)
    while len(batch):
        batch.step()
        widest = max(widest, batch.last_batch_size)
    assert widest == len(requests)
    assert [r.build_result().choices[0].token_ids for r in requests] == alone


def test_an_adapter_over_a_changed_base_is_refused(
    tmp_path: Path, tiny_adapters: dict[str, Path]
) -> None:
    moved = shutil.copytree(tiny_adapters["lora-a"], tmp_path / "lora-a")
    meta = json.loads((moved / ADAPTER_META).read_text())
    (moved / ADAPTER_META).write_text(json.dumps({**meta, "base_digest": "0123456789abcdef"}))
    with pytest.raises(ValueError, match="was trained on .* identity 0123456789abcdef"):
        Engine.load(moved)
    (moved / ADAPTER_META).write_text(json.dumps({"base": str(tiny_adapters["lora-b"])}))
    with pytest.raises(ValueError, match="not a full checkpoint folder"):
        Engine.load(moved)  # an adapter over an adapter
    (moved / ADAPTER_META).unlink()  # a plain peft folder: the base peft recorded
    assert (
        read_adapter(moved).base
        == json.loads((moved / "adapter_config.json").read_text())["base_model_name_or_path"]
    )


def test_a_registered_adapter_over_a_registered_base_loads(
    make_cfg, tmp_path: Path, tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    """The registry holds the base and the adapter (tags adapter=true, base_model=<base URI>)."""
    cfg = make_cfg()
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("test-register-base", cfg) as run:
        base = tracker.register_model(run, tiny_model_dir, "tiny-chat")
    base_uri = f"models:/tiny-chat/{base.version}"
    folder = make_adapter(tiny_model_dir, tmp_path / "lora", seed=1, base_ref=base_uri)
    tags = {"adapter": "true", "base_model": base_uri}
    with tracker.start_run("test-register-lora", cfg) as run:
        version = tracker.register_model(run, folder, "tiny-chat", tags=tags).version
    uri = f"models:/tiny-chat/{version}"
    path, info = local_checkpoint(uri, cfg)
    assert is_adapter(path) and info.tags["base_model"] == base_uri
    engine = Engine.load(uri, tracking_uri=cfg.tracking.tracking_uri)
    expected = Engine.load(tiny_adapters["lora-a"])
    assert greedy_ids(engine, "Hi") == greedy_ids(expected, "Hi")
    cfg.chat.model_uri = uri  # the terminal chat: its base is downloaded through the registry too
    messages = [{"role": "user", "content": "Hi"}]
    reply = "".join(LocalChat.from_cfg(cfg).stream(messages, temperature=0, max_tokens=8))
    assert reply == expected.tokenizer.decode(greedy_ids(expected, "Hi"), skip_special_tokens=True)


def test_an_adapter_without_a_base_digest_is_identified_with_its_base(
    tmp_path: Path, tiny_model_dir: Path
) -> None:
    """Cached answers and verdicts key on model_identity: a changed base must change it."""
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    folder = make_adapter(base, tmp_path / "lora", seed=1, base_ref=str(base))
    assert read_adapter(folder).base_digest is None
    before = model_identity(str(folder), None)
    (base / "config.json").write_text((base / "config.json").read_text() + "\n")
    assert model_identity(str(folder), None) != before
