"""The judge stage: `judge(cfg)` writes FastChat single/pairwise judgment files, `score(cfg)` turns
them into MT-bench scores; `run(cfg)` does both (`python -m arenaflow.judge`).

Inputs default to the FastChat artifact layout under `paths.artifact_root`
(mt_bench/<bench>/question.jsonl, model_answer/<competitor>.jsonl); the Dagster assets pass the
URIs their upstream assets returned instead.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from arenaflow import io
from arenaflow.judge.backends import JudgeBackend, JudgeConfigError, build_backend
from arenaflow.judge.cache import JudgmentCache
from arenaflow.judge.calibration import (
    CalibrationPlan,
    build_calibration,
    calibration_figures,
    calibration_records,
    judge_calibration,
)
from arenaflow.judge.local import judge_identity
from arenaflow.judge.mtbench import Plan, build_plan, load_answers, pair_records, single_records
from arenaflow.judge.prompts import (
    load_judge_prompts,
    load_reference_answers,
    structured_prompts,
)
from arenaflow.judge.runner import Budget, ItemResult, JudgeItem, RunStats, run_items
from arenaflow.judge.scores import (
    category_scores,
    judge_health,
    pairwise_results,
    radar_figure,
    single_scores,
)
from arenaflow.plots import write_png
from arenaflow.redact import redacted_yaml
from arenaflow.tracking import tracker_from_cfg

log = logging.getLogger(__name__)


def bench_uri(cfg: DictConfig, *parts: str) -> str:
    return io.artifact_uri(cfg, "mt_bench", cfg.evaluate.bench_name, *parts)


def file_stem(judge_model: str) -> str:
    """A judge model name made safe for a file name (`org/model` -> `org_model`)."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", judge_model)


def judgment_uris(cfg: DictConfig) -> tuple[str, str]:
    stem = file_stem(str(cfg.judge.model_name))
    return (
        bench_uri(cfg, "model_judgment", f"{stem}_single.jsonl"),
        bench_uri(cfg, "model_judgment", f"{stem}_pair.jsonl"),
    )


def calibration_uris(cfg: DictConfig) -> tuple[str, str]:
    """The calibration calls (JSONL) and the pass/fail summary (JSON) next to the judgments."""
    stem = file_stem(str(cfg.judge.model_name))
    return (
        bench_uri(cfg, "model_judgment", f"{stem}_calibration.jsonl"),
        bench_uri(cfg, "model_judgment", f"{stem}_calibration.json"),
    )


def calibration_questions(cfg: DictConfig) -> list[dict[str, Any]]:
    """Calibration draws on the whole question file, whatever subset this run evaluates."""
    from arenaflow.evaluate.questions import load_questions as load_bench_questions
    from arenaflow.evaluate.questions import question_source

    return load_bench_questions(question_source(cfg))[0]


class MissingInputError(FileNotFoundError):
    """An input the judge reads (questions, answers) is not written yet; the message says how."""


def _require(uri: str, what: str, fix: str) -> str:
    if not io.exists(uri):
        raise MissingInputError(f"{what} not found at {uri}; {fix}")
    return uri


def default_answer_uris(cfg: DictConfig) -> dict[str, str]:
    """Each competitor's answer file in the FastChat layout (competitor names from conf/evaluate)."""
    return {
        c.name: _require(
            bench_uri(cfg, "model_answer", f"{c.name}.jsonl"),
            f"answers of competitor {c.name!r}",
            "generate them first (python -m arenaflow.evaluate, or materialize mt_bench_answers)",
        )
        for c in cfg.evaluate.competitors
    }


def load_questions(uri: str, skipped: Counter) -> list[dict[str, Any]]:
    """MT-bench questions; records without an id or turns are counted and left out."""
    questions = []
    for row in io.read_jsonl(uri):
        turns = row.get("turns")
        if "question_id" not in row or not isinstance(turns, list) or not turns:
            skipped["bad question record"] += 1
            continue
        questions.append(row)
    return questions


def _cost(price: Any, prompt_tokens: int, completion_tokens: int) -> float | None:
    """USD at `judge.price_per_1k_tokens` (prompt / completion), None without a price."""
    if not price:
        return None
    return (prompt_tokens * price.prompt + completion_tokens * price.completion) / 1000.0


def _log_files(run: Any, uris: list[str], artifact_path: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for uri in uris:
            local = Path(tmp) / uri.rsplit("/", 1)[-1]
            local.write_text(io.read_text(uri), encoding="utf-8")
            run.log_artifact(local, artifact_path)


def competitor_order(answer_uris: Mapping[str, str], competitors: list[str]) -> list[str]:
    """The answer files' models in conf/evaluate's competitor order, any others after them by name."""
    n = len(competitors)
    return sorted(answer_uris, key=lambda m: (competitors.index(m) if m in competitors else n, m))


def plan_judgments(
    j: Any,
    bench: str,
    questions: list[dict[str, Any]],
    answers: dict[str, dict[int, list[str]]],
    calibration_questions: list[dict[str, Any]],
    settings: dict[str, Any],
    skipped: Counter,
) -> tuple[Plan, CalibrationPlan]:
    """The MT-bench plan (`judge.mode`, `judge.pairwise`) and the calibration plan beside it."""
    prompts = load_judge_prompts(str(j.prompt_file))
    if j.structured:
        prompts = structured_prompts(prompts)
    references = load_reference_answers(str(j.reference_file), bench)
    plan = build_plan(
        questions,
        answers,
        prompts,
        references,
        judge_model=str(j.model_name),
        modes=list(j.mode),
        pairwise=str(j.pairwise),
        baseline=j.get("baseline"),
        settings=settings,
        skipped=skipped,
    )
    calibration_plan = build_calibration(
        calibration_questions,
        references,
        prompts,
        judge_model=str(j.model_name),
        settings=settings,
        per_category=int(j.calibration.per_category),
    )
    log.info(
        "judging %d questions x %d competitors: %d single, %d pairwise records, %d calls planned "
        "(+%d calibration calls)",
        len(questions),
        len(answers),
        len(plan.singles),
        len(plan.pairs),
        len(plan.items),
        len(calibration_plan.items),
    )
    return plan, calibration_plan


def judge_items(
    j: Any, items: list[JudgeItem], make_backend: Callable[[], JudgeBackend]
) -> tuple[dict[str, ItemResult], RunStats]:
    """Every item judged once, through the cache at `judge.cache_path` and within the budget
    (`judge.max_calls`, `judge.max_tokens_budget`)."""
    cache = JudgmentCache(str(j.cache_path))
    budget = Budget(j.get("max_calls"), j.get("max_tokens_budget"))
    try:
        return run_items(
            items, make_backend, cache, budget, logprob_recovery=bool(j.logprob_recovery)
        )
    finally:
        cache.close()


def write_calibration(
    j: Any,
    plan: CalibrationPlan,
    results: dict[str, ItemResult],
    calibration_uri: str,
    summary_uri: str,
) -> dict[str, Any]:
    """The calibration calls (JSONL) and the pass/fail summary against `judge.calibration`."""
    calibration = judge_calibration(
        calibration_figures(plan, results), j.calibration, str(j.model_name)
    )
    io.write_jsonl(calibration_uri, calibration_records(plan, results))
    calibration["uri"] = calibration_uri
    io.write_json(summary_uri, calibration)
    log.info("calibration: %s", calibration["summary"])
    return calibration


def run_counts(singles: int, pairs: int, calibration_calls: int, stats: RunStats) -> dict[str, int]:
    """What the judging cost and how its verdicts came out, for the result and MLflow."""
    return {
        "single": singles,
        "pair": pairs,
        "calls_made": stats.calls,
        "calls_cached": stats.cached,
        "requests": stats.requests,
        "retries": stats.retries,
        "calibration_calls": calibration_calls,
        "prompt_tokens": stats.prompt_tokens,
        "completion_tokens": stats.completion_tokens,
        **{f"verdict_{k}": v for k, v in sorted(stats.outcomes.items())},
    }


def log_judge_run(
    run: Any,
    counts: dict[str, int],
    health: dict[str, Any],
    cost: float | None,
    info: dict[str, Any],
    calibration: dict[str, Any],
    files: list[str],
) -> None:
    run.log_metrics({f"judge/{k}": v for k, v in counts.items()})
    run.log_metrics({f"judge/{k}": v for k, v in health.items() if isinstance(v, int | float)})
    if cost is not None:
        run.log_metrics({"judge/cost_usd": cost})
    run.log_dict(info, "judge/info.json")
    figures = calibration["figures"]
    run.log_metrics(
        {f"calibration/{k}": v for k, v in figures.items() if isinstance(v, int | float)}
    )
    run.log_metrics({"calibration/passed": float(calibration["passed"])})
    run.set_tags({"arenaflow.judge_calibrated": calibration["passed"]})
    run.log_table(calibration["checks"], "calibration/checks.json")
    run.log_dict(calibration, "calibration/summary.json")
    _log_files(run, files, "judgments")


def judge(
    cfg: DictConfig,
    *,
    question_uri: str | None = None,
    answer_uris: Mapping[str, str] | None = None,
    base_model_path: str | Path | None = None,
    backend: JudgeBackend | None = None,
) -> dict[str, Any]:
    """Judge every competitor's MT-bench answers; returns judgment URIs, counts and judge health."""
    j = cfg.judge
    skipped: Counter = Counter()
    question_uri = question_uri or _require(
        bench_uri(cfg, "question.jsonl"),
        "MT-bench questions",
        "write them first (python -m arenaflow.evaluate, or materialize mt_bench_questions)",
    )
    answer_uris = dict(answer_uris or default_answer_uris(cfg))
    names = competitor_order(answer_uris, [c.name for c in cfg.evaluate.competitors])
    single_uri, pair_uri = judgment_uris(cfg)
    calibration_uri, summary_uri = calibration_uris(cfg)
    questions = load_questions(question_uri, skipped)
    answers = {n: load_answers(list(io.read_jsonl(answer_uris[n])), n, skipped) for n in names}
    settings = {"temperature": float(j.temperature), "max_tokens": int(j.max_tokens)}
    settings |= {"backend": str(j.backend), "model": str(j.model)}
    if j.structured:  # a JSON verdict is another request; unstructured keys stay as they were
        settings["structured"] = True
    settings |= judge_identity(cfg, base_model_path)
    plan, calibration_plan = plan_judgments(
        j,
        str(cfg.evaluate.bench_name),
        questions,
        answers,
        calibration_questions(cfg),
        settings,
        skipped,
    )
    results, stats = judge_items(
        j,
        calibration_plan.items + plan.items,
        lambda: backend or build_backend(cfg, base_model_path),
    )
    singles, pairs = single_records(plan, results), pair_records(plan, results)
    io.write_jsonl(single_uri, singles)
    io.write_jsonl(pair_uri, pairs)
    health = judge_health(singles, pairs)
    calibration = write_calibration(j, calibration_plan, results, calibration_uri, summary_uri)
    counts = run_counts(len(singles), len(pairs), len(calibration_plan.items), stats)
    cost = _cost(j.get("price_per_1k_tokens"), stats.prompt_tokens, stats.completion_tokens)
    info = {
        "skipped": dict(skipped),
        "budget": stats.budget_message,
        "parse_errors": dict(stats.parse_errors),
    }
    with tracker_from_cfg(cfg).start_run("judge", cfg) as run:
        files = [single_uri, pair_uri, calibration_uri]
        log_judge_run(run, counts, health, cost, info, calibration, files)
    return {
        "single_uri": single_uri,
        "pair_uri": pair_uri,
        "judge_model": str(j.model_name),
        "competitors": names,
        "counts": counts,
        "skipped": dict(skipped),
        "parse_errors": dict(stats.parse_errors),
        "health": health,
        "calibration": calibration,
        "cost_usd": cost,
        "budget_message": stats.budget_message,
        "run_id": run.run_id,
        "mlflow_url": run.url,
    }


def score(
    cfg: DictConfig, *, single_uri: str | None = None, pair_uri: str | None = None
) -> dict[str, Any]:
    """MT-bench scores per model (turn 1, turn 2, average), per category, pairwise win rates."""
    default_single, default_pair = judgment_uris(cfg)
    fix = "judge first (python -m arenaflow.judge, or materialize mt_bench_judgments)"
    single_uri = _require(single_uri or default_single, "single judgments", fix)
    pair_uri = _require(pair_uri or default_pair, "pairwise judgments", fix)
    singles, pairs = list(io.read_jsonl(single_uri)), list(io.read_jsonl(pair_uri))
    table = single_scores(singles)
    categories = category_scores(singles)
    pairwise = pairwise_results(pairs)
    health = judge_health(singles, pairs)
    stem = file_stem(str(cfg.judge.model_name))
    uri = bench_uri(cfg, "scores", f"{stem}_scores.json")
    radar_uri = bench_uri(cfg, "scores", f"{stem}_radar.png")
    fig = radar_figure(categories, f"MT-bench by category (judge: {cfg.judge.model_name})")
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("scores", cfg) as run:
        for model, s in table.items():
            run.log_metrics({f"mt_bench/{model}/{k}": v for k, v in s.items() if v is not None})
        for model, s in pairwise.items():
            run.log_metrics({f"pairwise/{model}/{k}": v for k, v in s.items() if v is not None})
        run.log_metrics({f"judge/{k}": v for k, v in health.items() if isinstance(v, int | float)})
        run.log_table([{"model": m, **s} for m, s in table.items()], "mt_bench_scores.json")
        run.log_table(
            [{"model": m, **c} for m, c in categories.items()], "mt_bench_categories.json"
        )
        run.log_table([{"model": m, **s} for m, s in pairwise.items()], "pairwise.json")
        run.log_figure(fig, "mt_bench_radar.png")
    write_png(radar_uri, fig)
    result = {
        "uri": uri,
        "radar_uri": radar_uri,
        "judge_model": str(cfg.judge.model_name),
        "scores": {
            m: {k: s[k] for k in ("turn1", "turn2", "average", "expected")}
            for m, s in table.items()
        },
        "unparsed": {m: s["unparsed"] for m, s in table.items()},
        "categories": categories,
        "pairwise": pairwise,
        "health": health,
    }
    io.write_json(uri, result)
    return {**result, "run_id": run.run_id, "mlflow_url": run.url}


def run(cfg: DictConfig) -> dict[str, Any]:
    """The Hydra CLI stage: judge, then score."""
    log.info("judge config:\n%s", redacted_yaml(cfg.judge))
    judged = judge(cfg)
    scored = score(cfg, single_uri=judged["single_uri"], pair_uri=judged["pair_uri"])
    return {"judgments": judged, "scores": scored}


def run_cli(cfg: DictConfig) -> dict[str, Any]:
    """`run` for command lines: a judge it cannot set up (a bad judge setting, inputs not written
    yet) exits non-zero with its message and the fix, no traceback."""
    try:
        return run(cfg)
    except (JudgeConfigError, MissingInputError) as e:
        raise SystemExit(f"arenaflow.judge: {e}") from None
