"""Adapters served through an engine process: the `engine: vllm` entries over one base become one
`vllm serve <base> --enable-lora --lora-modules name=folder ...` child, each name routed to it.

vLLM needs a GPU, so here the `vllm` on PATH is a stand-in that takes vLLM's command line and serves
it with our own server (the base under its first served name, each LoRA module under its name, one
copy of the base, keyed with $VLLM_API_KEY as vLLM is). What is tested is the gateway's side against
a real OpenAI-compatible process: one child per base, its command line, routing by name, the keys.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from omegaconf import OmegaConf

from arenaflow.engine import Engine, SamplingParams
from arenaflow.engine.vllm import lora_options
from arenaflow.serve import ServeConfigError, create_app
from arenaflow.serve.engine_process import launch_vllm, vllm_command
from tests.serve.conftest import LiveServer, live_server

NAMES = ["tiny-base", "lora-a", "lora-b"]
GATEWAY_KEY = "gateway-key-7c2"
STAND_IN = '''#!{python}
"""A stand-in for `vllm serve` (tests only): vLLM's flags, served by arenaflow's own server."""
import argparse, json, os, sys
from omegaconf import OmegaConf

ap = argparse.ArgumentParser()
ap.add_argument("command")
ap.add_argument("model")
ap.add_argument("--served-model-name", nargs="+", required=True)
ap.add_argument("--host", required=True)
ap.add_argument("--port", type=int, required=True)
ap.add_argument("--lora-modules", nargs="*", default=[])
args, _ = ap.parse_known_args()
with open(os.environ["VLLM_STANDIN_CALLS"], "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\\n")
cfg = OmegaConf.load(os.environ["VLLM_STANDIN_CONFIG"])
models = [{{"name": args.served_model_name[0], "uri": args.model}}]
models += [{{"name": n, "uri": p}} for n, p in (m.split("=", 1) for m in args.lora_modules)]
OmegaConf.update(cfg, "serve.models", models, merge=False)
cfg.serve.host, cfg.serve.port = args.host, args.port
cfg.serve.api_keys, cfg.serve.api_keys_env = [], "VLLM_API_KEY"
path = os.environ["VLLM_STANDIN_CONFIG"] + f".{{args.port}}.yaml"
OmegaConf.save(cfg, path)
os.execv(sys.executable, [sys.executable, "-m", "arenaflow.serve.launch", path])
'''


@pytest.fixture(scope="module")
def stand_in(tmp_path_factory, serve_cfg_factory) -> Iterator[Path]:
    """PATH holds the stand-in `vllm`; returns the file it logs its command lines to."""
    where = tmp_path_factory.mktemp("vllm-standin")
    binary = where / "vllm"
    binary.write_text(STAND_IN.format(python=sys.executable))
    binary.chmod(binary.stat().st_mode | stat.S_IEXEC)
    base = serve_cfg_factory("serve.arena.enabled=false", "serve.log_level=warning")
    (where / "engine.yaml").write_text(OmegaConf.to_yaml(base, resolve=True))
    calls = where / "calls.jsonl"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("PATH", f"{where}{os.pathsep}{os.environ['PATH']}")
        mp.setenv("VLLM_STANDIN_CONFIG", str(where / "engine.yaml"))
        mp.setenv("VLLM_STANDIN_CALLS", str(calls))
        yield calls


@pytest.fixture(scope="module")
def gateway(stand_in, serve_cfg_factory, tiny_model_dir, tiny_adapters) -> Iterator[LiveServer]:
    cfg = serve_cfg_factory(f"serve.api_keys=[{GATEWAY_KEY}]", "serve.arena.enabled=false")
    entries = [{"name": "tiny-base", "uri": str(tiny_model_dir), "engine": "vllm"}]
    entries += [{"name": n, "uri": str(p), "engine": "vllm"} for n, p in tiny_adapters.items()]
    OmegaConf.update(cfg, "serve.models", entries, merge=False)
    with live_server(create_app(cfg), cfg) as srv:
        yield srv


def chat(srv: LiveServer, model: str, content: str) -> str:
    body = {"model": model, "messages": [{"role": "user", "content": content}]}
    body |= {"temperature": 0, "max_tokens": 12}
    r = httpx.post(
        f"{srv.v1}/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {GATEWAY_KEY}"},
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["model"] == model
    return r.json()["choices"][0]["message"]["content"]


def test_adapters_over_one_base_share_one_engine_process_and_answer_with_their_own_weights(
    gateway, stand_in, tiny_model_dir, tiny_adapters
) -> None:
    calls = [json.loads(line) for line in stand_in.read_text().splitlines()]
    assert len(calls) == 1  # one `vllm serve` for the base and both adapters
    argv = calls[0]
    assert argv[:2] == ["serve", str(tiny_model_dir.resolve())]
    assert argv[argv.index("--served-model-name") + 1] == "tiny-base"
    assert "--enable-lora" in argv and argv[argv.index("--max-loras") + 1] == "2"
    modules = argv[argv.index("--lora-modules") + 1 :][:2]
    assert modules == [f"{n}={p}" for n, p in tiny_adapters.items()]
    assert not any(GATEWAY_KEY in a for a in argv)  # the keys travel in the environment only

    question = "Name a colour."
    paths = {"tiny-base": tiny_model_dir, **tiny_adapters}
    answers = {n: chat(gateway, n, question) for n in NAMES}
    for name in NAMES:
        engine = Engine.load(paths[name])  # an adapter: merged into its base
        prompt = engine.render_chat([{"role": "user", "content": question}])
        alone = engine.generate([prompt], SamplingParams(max_new_tokens=12))[0].choices[0].text
        assert answers[name] == alone, name
    assert len(set(answers.values())) == 3
    listed = httpx.get(
        f"{gateway.v1}/models", headers={"Authorization": f"Bearer {GATEWAY_KEY}"}, timeout=30
    ).json()["data"]
    assert [m["id"] for m in listed] == NAMES
    assert all(m["lineage"]["engine"] == "vllm" for m in listed)


def test_the_lora_flags_vllm_gets(tiny_adapters, tmp_path: Path) -> None:
    argv = vllm_command(
        "vllm",
        Path("/base"),
        ["b"],
        host="127.0.0.1",
        port=9,
        dtype="bfloat16",
        max_num_seqs=16,
        loras=tiny_adapters,
    )
    rank = json.loads((tiny_adapters["lora-a"] / "adapter_config.json").read_text())["r"]
    assert rank == 4  # vLLM takes 1, 8, 16, ...: 8 holds it
    flags = argv[argv.index("--enable-lora") :]
    assert flags[:5] == ["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"]
    assert "--lora-modules" not in vllm_command(
        "vllm", Path("/base"), "b", host="h", port=9, dtype="bfloat16", max_num_seqs=16
    )
    # max_lora_rank: the smallest value vLLM accepts that holds the largest rank
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "adapter_config.json").write_text(json.dumps({"r": 12, "rank_pattern": {"q": 40}}))
    assert lora_options({"odd": odd})["max_lora_rank"] == 64
    (odd / "adapter_config.json").write_text(json.dumps({"r": 8, "use_dora": True}))
    with pytest.raises(ValueError, match="odd.*DoRA.*train.lora.merge=true"):
        lora_options({"odd": odd})


def test_an_adapter_vllm_cannot_apply_is_refused_before_its_engine_starts(
    stand_in, serve_cfg_factory, tiny_model_dir, tiny_adapters, tmp_path: Path
) -> None:
    dora = shutil.copytree(tiny_adapters["lora-a"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    cfg = serve_cfg_factory("serve.arena.enabled=false")
    with pytest.raises(ServeConfigError, match=r"serve\.models\[1\] \(b, dora\).*DoRA"):
        launch_vllm(cfg, ["b"], tiny_model_dir, "serve.models[1]", {"dora": dora})
    assert not stand_in.exists() or "dora" not in stand_in.read_text()  # nothing was started
