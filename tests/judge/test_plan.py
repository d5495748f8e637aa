"""Planning judge calls: prompt choice per category and turn, references, pairs, bad records, cache keys."""

from __future__ import annotations

from collections import Counter

import pytest

from arenaflow.judge.backends import JudgeConfigError
from arenaflow.judge.mtbench import build_plan, load_answers
from arenaflow.judge.prompts import load_judge_prompts, load_reference_answers

QUESTIONS = [
    {"question_id": 81, "category": "writing", "turns": ["Write a poem.", "Make it shorter."]},
    {"question_id": 111, "category": "math", "turns": ["Area of a triangle?", "And the circle?"]},
]


def answer(qid: int, turns: list[str]) -> dict:
    return {"question_id": qid, "model_id": "m", "choices": [{"index": 0, "turns": turns}]}


@pytest.fixture(scope="module")
def prompts() -> dict:
    return load_judge_prompts()


@pytest.fixture(scope="module")
def refs() -> dict:
    return load_reference_answers("package")


def test_package_prompts_and_references(prompts: dict, refs: dict) -> None:
    assert {"single-v1", "single-math-v1-multi-turn", "pair-v2", "pair-math-v1"} <= set(prompts)
    assert prompts["pair-v2"]["output_format"] == "[[A]]"
    assert len(refs) == 30 and len(refs[111]) == 2  # math, reasoning and coding questions


def test_bad_and_missing_answers_are_counted(prompts: dict, refs: dict) -> None:
    skipped: Counter = Counter()
    rows = [answer(81, ["a", "b"]), {"question_id": 111}, answer(999, [1, 2])]
    good = load_answers(rows, "base", skipped)
    assert list(good) == [81]
    assert skipped["bad answer record (base)"] == 2
    plan = build_plan(
        QUESTIONS,
        {"finetuned": {81: ["x", "y"], 111: ["p", "q"]}, "base": good},
        prompts,
        refs,
        judge_model="j",
        modes=["single", "pairwise"],
        skipped=skipped,
    )
    # base has no answer to question 111: 2 single turns and 2 pairwise turns are skipped, counted
    assert skipped["missing answer (base)"] == 2
    assert skipped["missing answer (finetuned vs base)"] == 2
    assert len(plan.singles) == 6 and len(plan.pairs) == 2 and len(plan.items) == 6 + 4


def test_math_uses_reference_and_keys_depend_on_order(prompts: dict, refs: dict) -> None:
    answers = {"a": {111: ["1", "2"]}, "b": {111: ["3", "4"]}}
    plan = build_plan(QUESTIONS[1:], answers, prompts, refs, judge_model="j", modes=["pairwise"])
    assert [p["judge"][1] for p in plan.pairs] == ["pair-math-v1", "pair-math-v1-multi-turn"]
    assert refs[111][0] in plan.pairs[0]["g1_user_prompt"]
    keys = [k for p in plan.pairs for k in p["_keys"]]
    assert len(set(keys)) == 4  # (A,B) and (B,A) are different calls
    again = build_plan(QUESTIONS[1:], answers, prompts, refs, judge_model="j", modes=["pairwise"])
    assert [k for p in again.pairs for k in p["_keys"]] == keys  # stable across runs
    other = build_plan(QUESTIONS[1:], answers, prompts, refs, judge_model="k", modes=["pairwise"])
    assert not set(keys) & {k for p in other.pairs for k in p["_keys"]}  # judge model is in the key


def test_pairwise_baseline(prompts: dict, refs: dict) -> None:
    answers = {m: {81: ["x", "y"]} for m in ("a", "b", "c")}
    plan = build_plan(
        QUESTIONS[:1],
        answers,
        prompts,
        refs,
        judge_model="j",
        modes=["pairwise"],
        pairwise="baseline",
        baseline="c",
    )
    assert {(p["model_1"], p["model_2"]) for p in plan.pairs} == {("a", "c"), ("b", "c")}
    with pytest.raises(JudgeConfigError, match="judge.baseline"):
        build_plan(
            QUESTIONS[:1],
            answers,
            prompts,
            refs,
            judge_model="j",
            modes=["pairwise"],
            pairwise="baseline",
            baseline="gpt-3.5-turbo",
        )


def test_two_judge_runs_share_one_cache_file(tmp_path) -> None:
    """WAL and a busy timeout: concurrent writers on one cache file wait, they do not fail."""
    import threading

    from arenaflow.judge.cache import JudgmentCache

    path = tmp_path / "cache.sqlite"
    caches = [JudgmentCache(path), JudgmentCache(path)]
    errors: list[Exception] = []

    def write(n: int) -> None:
        try:
            for i in range(150):
                caches[n].put(f"{n}-{i}", "j", {"judgment": "x", "score": 5})
        except Exception as e:  # noqa: BLE001 - the failure under test
            errors.append(e)

    threads = [threading.Thread(target=write, args=(n,)) for n in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(caches[0]) == 300
    mode = caches[0]._db.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"
    for c in caches:
        c.close()


def test_checkpoint_identity_follows_the_content(tmp_path) -> None:
    from arenaflow.models import checkpoint_identity

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text('{"model_type": "llama"}')
    (ckpt / "model.safetensors").write_bytes(b"\0" * 4096)
    first = checkpoint_identity(ckpt)
    assert checkpoint_identity(ckpt) == first
    (ckpt / "model.safetensors").write_bytes(b"\1" + b"\0" * 4095)  # same size, new weights
    assert checkpoint_identity(ckpt) != first


def test_the_local_judges_identity_names_its_engine(make_cfg, tiny_model_dir) -> None:
    """Verdicts from another engine or precision are other judgments: another cache key. The
    judge's KV cache is judge.kv_cache (f16 by default), else engine.llamacpp.kv_cache; its f16
    weights are read as bf16 where llama.cpp runs bf16 in hardware (AVX512_BF16 in the CPU's
    flags), and a model.quantization stays as it is."""
    from arenaflow.engine.llamacpp_runtime import cpu_has_bf16
    from arenaflow.judge.backends import JudgeConfigError
    from arenaflow.judge.local import judge_identity

    with open("/proc/cpuinfo") as f:
        flags = f.read()
    assert cpu_has_bf16() == ("avx512_bf16" in flags)  # llama.cpp's probe and the CPU agree
    weights = "bf16" if cpu_has_bf16() else "f16"
    cases = {
        "hf:float32": ["engine.backend=hf"],
        "hf:float32:q8_0": ["engine.backend=hf", "model.quantization=q8_0"],
        f"llamacpp:{weights}:kv-f16": ["engine.backend=llamacpp"],
        f"llamacpp:{weights}:kv-f32": ["engine.backend=llamacpp", "judge.kv_cache=null"],
        "llamacpp:q4_k_m:kv-f32": [
            "engine.backend=llamacpp",
            "model.quantization=q4_k_m",
            "judge.kv_cache=f32",
            "engine.llamacpp.kv_cache=f16",
        ],
    }
    for engine, overrides in cases.items():
        assert judge_identity(make_cfg(*overrides), tiny_model_dir)["engine"] == engine, overrides
    with pytest.raises(JudgeConfigError, match="judge.kv_cache='q8' is not one of f32, f16"):
        judge_identity(make_cfg("engine.backend=llamacpp", "judge.kv_cache=q8"), tiny_model_dir)
