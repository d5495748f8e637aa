"""`python -m arenaflow.judge`: the Hydra CLI judges answers found in the FastChat layout and scores them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from judge_standin import StandIn, api_overrides, write_inputs

from arenaflow.config import REPO_ROOT


def judge_cli(af_home: Path, model_cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    """`python -m arenaflow.judge` on the test experiment, over answers to question 81 written
    where MT-bench answers go (the FastChat layout)."""
    bench = af_home / "artifacts" / "mt_bench" / "mt_bench"
    inputs = write_inputs(bench, question_ids=(81,))
    (bench / "model_answer").mkdir()
    for name, uri in inputs["answer_uris"].items():
        Path(uri).rename(bench / "model_answer" / f"{name}.jsonl")
    cmd = [
        sys.executable,
        "-m",
        "arenaflow.judge",
        "experiment=test",
        f"paths.home={af_home}",
        f"paths.cache_dir={model_cache}",
        "tracking=none",
        *overrides,
    ]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    env.pop("ARENAFLOW_OVERRIDES", None)
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=180)


def test_cli_judges_and_scores(stand_in: StandIn, af_home: Path, model_cache: Path) -> None:
    """The stage also logs its judge config, with the password of the judge's URL redacted."""
    bench = af_home / "artifacts" / "mt_bench" / "mt_bench"
    url = stand_in.url.replace("http://", "http://judge:s3cret-pw@")
    proc = judge_cli(af_home, model_cache, *api_overrides(url))
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = bench / "model_judgment" / "stand-in-judge_single.jsonl"
    assert len(single.read_text().splitlines()) == 4
    scores = json.loads((bench / "scores" / "stand-in-judge_scores.json").read_text())
    assert scores["scores"]["finetuned"]["average"] == 8.0
    assert scores["scores"]["base"]["average"] == 3.0
    assert len(stand_in.hits) == 8
    assert "calls_made: 8" in proc.stdout
    logged = proc.stdout + proc.stderr
    assert "base_url: http://judge:***@127.0.0.1" in logged
    assert "s3cret-pw" not in logged  # nor in httpx's request lines (EndpointClient's log filter)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["judge=openai_compatible"], "judge=openai_compatible needs judge.base_url="),
        (["judge.kv_cache=f8"], "judge.kv_cache='f8' is not one of f32, f16"),
        (["model.quantization=q3"], "model.quantization='q3' is not one of q8_0, q4_k_m or null"),
        (["evaluate.bench_name=nowhere"], "MT-bench questions not found at"),
    ],
)
def test_cli_refuses_a_judge_it_cannot_set_up(
    overrides: list[str], message: str, af_home: Path, model_cache: Path
) -> None:
    """A bad judge setting, or inputs not written yet: one line with the fix, no traceback."""
    proc = judge_cli(af_home, model_cache, *overrides)
    assert proc.returncode != 0
    assert f"arenaflow.judge: {message}" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr + proc.stdout
