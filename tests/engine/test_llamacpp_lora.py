"""LoRA adapters on llama.cpp: an adapter folder written as a GGUF LoRA file and applied over its
base's f16 export, on real llama.cpp, against the hf engine with peft on the same adapter."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("llama_cpp")

from arenaflow.engine import Engine, SamplingParams  # noqa: E402
from arenaflow.engine.backends import EngineSpec, load_engine  # noqa: E402
from arenaflow.engine.llamacpp import LlamaCppEngine  # noqa: E402
from arenaflow.export.lora import lora_scale, write_lora_gguf  # noqa: E402

QUESTION = "What is the capital of France?"
GREEDY = SamplingParams(max_new_tokens=12)


def greedy(engine: Engine) -> list[int]:
    prompt = engine.render_chat([{"role": "user", "content": QUESTION}])
    return engine.generate([prompt], GREEDY)[0].choices[0].token_ids


@pytest.fixture(scope="module")
def group(tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora-cache")
    engines = LlamaCppEngine.group(
        tiny_model_dir,
        {"base": None, **tiny_adapters},
        max_batch_size=2,
        n_ctx=256,
        n_threads=1,
        cache_dir=cache,
    )
    yield engines
    for e in engines.values():
        e.close()


def test_the_lora_file_holds_every_a_and_b_with_peft_scale(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    import gguf
    from safetensors.numpy import load_file
    from transformers import AutoConfig

    adapter = tiny_adapters["lora-a"]
    out = write_lora_gguf(adapter, AutoConfig.from_pretrained(tiny_model_dir), tmp_path / "a.gguf")
    reader = gguf.GGUFReader(str(out))
    fields = reader.fields
    assert bytes(fields["general.type"].parts[-1]).decode() == "adapter"
    assert bytes(fields["adapter.type"].parts[-1]).decode() == "lora"
    peft = json.loads((adapter / "adapter_config.json").read_text())
    alpha = float(fields["adapter.lora.alpha"].parts[-1][0])
    assert alpha / peft["r"] == pytest.approx(peft["lora_alpha"] / peft["r"])  # llama.cpp: alpha/r
    tensors = {t.name: t for t in reader.tensors}
    assert len(tensors) == len(load_file(str(adapter / "adapter_model.safetensors")))
    a, b = tensors["blk.0.attn_v.weight.lora_a"], tensors["blk.0.attn_v.weight.lora_b"]
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert list(a.shape) == [config.hidden_size, peft["r"]]  # GGUF order: [in, r]
    assert list(b.shape)[0] == peft["r"]


def test_what_llama_cpp_cannot_apply_is_refused() -> None:
    plain = {"peft_type": "LORA", "r": 8, "lora_alpha": 16}
    assert lora_scale(plain) == 2.0
    assert lora_scale({**plain, "use_rslora": True}) == pytest.approx(16 / 8**0.5)
    for extra, what in (
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"alpha_pattern": {"q_proj": 4}}, "alphas"),
    ):
        with pytest.raises(ValueError, match=what):
            lora_scale({**plain, **extra})
    with pytest.raises(ValueError, match="not LoRA"):
        lora_scale({"peft_type": "IA3"})


def test_each_adapter_answers_as_peft_does_over_one_copy_of_the_base(
    group: dict[str, LlamaCppEngine], tiny_model_dir: Path, tiny_adapters: dict[str, Path]
) -> None:
    expected = {"base": greedy(Engine.load(tiny_model_dir))}
    expected |= {n: greedy(Engine.load(p)) for n, p in tiny_adapters.items()}
    got = {n: greedy(e) for n, e in group.items()}
    assert got == expected
    assert len({tuple(t) for t in got.values()}) == 3  # each adapter changes the answer
    weights = {id(e.runtime.weights) for e in group.values()}
    assert len(weights) == 1 and group["base"].runtime.weights.users == 3  # one llama_model
    assert len({id(e.runtime) for e in group.values()}) == 3  # a context (KV cache) each
    assert group["base"].lora is None and group["lora-a"].lora.name == "lora-f32.gguf"


def test_an_adapter_reference_loads_on_llama_cpp(
    tiny_model_dir: Path, tiny_adapters: dict[str, Path], tmp_path: Path
) -> None:
    """What MT-bench answers and the local judge do with an adapter version: `load_engine` on
    llama.cpp, its base's export plus its LoRA file; the shared weights outlive a closed engine."""
    spec = EngineSpec(backend="llamacpp", cache_dir=str(tmp_path), llamacpp={"n_ctx": 256})
    engine = load_engine(tiny_adapters["lora-b"], spec, max_batch_size=2)
    assert isinstance(engine, LlamaCppEngine) and engine.lora is not None
    assert greedy(engine) == greedy(Engine.load(tiny_adapters["lora-b"]))
    weights = engine.runtime.weights
    engine.close()
    assert weights.model is None  # its last user closed: llama.cpp's model is freed

    dora = shutil.copytree(tiny_adapters["lora-a"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="DoRA"):
        load_engine(dora, spec, max_batch_size=2)
