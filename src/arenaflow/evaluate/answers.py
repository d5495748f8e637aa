"""MT-bench answer generation for one competitor: two turns, FastChat answer JSONL, resumable.

Turn 2 sees the competitor's own turn-1 answer. Every answer carries `gen_hash` (model fingerprint +
settings + question), so a re-run keeps answers made with the same model/settings and produces only
the missing or stale ones. A question that still fails after retries goes to
`model_answer_failures/<name>.jsonl` with its error and is counted, never silently missing.
Each answer also keeps `style`: the style counts of its first choice's turns (length, markdown;
`arenaflow.rating.style`), which the ratings use for style control.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from typing import Any

from omegaconf import DictConfig
from tqdm.auto import tqdm

from arenaflow import io
from arenaflow.answer_style import answer_style
from arenaflow.engine import SamplingParams
from arenaflow.evaluate.competitors import Backend, find_competitor, make_backend
from arenaflow.evaluate.questions import bench_uri, load_questions

log = logging.getLogger(__name__)


def answer_uri(cfg: DictConfig, model_id: str) -> str:
    return bench_uri(cfg, "model_answer", f"{model_id}.jsonl")


def failures_uri(cfg: DictConfig, model_id: str) -> str:
    return bench_uri(cfg, "model_answer_failures", f"{model_id}.jsonl")


def temperature_for(cfg: DictConfig, category: str) -> float:
    """The MT-bench paper's temperature for a category (evaluate.category_temperature)."""
    return float(cfg.evaluate.category_temperature.get(category, cfg.evaluate.default_temperature))


def gen_hash(cfg: DictConfig, fingerprint: str, question: dict[str, Any]) -> str:
    e = cfg.evaluate
    payload = {
        "model": fingerprint,
        "turns": question["turns"],
        "temperature": temperature_for(cfg, question["category"]),
        "max_new_tokens": int(e.max_new_tokens),
        "num_choices": int(e.num_choices),
        "seed": int(e.seed),
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def _read_existing(uri: str) -> list[dict[str, Any]]:
    if not io.exists(uri):
        return []
    rows = []
    for line in io.read_text(uri).splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s: an unreadable answer line is dropped and will be regenerated", uri)
    return rows


def generate_all(
    cfg: DictConfig,
    backend: Backend,
    questions: list[dict[str, Any]],
    model_id: str,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Answer every question (all choices, both turns); returns answers, failures, tokens generated."""
    e = cfg.evaluate
    n_choices, n_turns = int(e.num_choices), max(len(q["turns"]) for q in questions)
    turns: dict[tuple[int, int], list[str]] = {}
    errors: dict[int, str] = {}
    tokens = 0
    bar = tqdm(total=len(questions) * n_choices * n_turns, desc=f"answers {model_id}", leave=False)
    for choice in range(n_choices):
        for t in range(n_turns):
            todo = [q for q in questions if t < len(q["turns"]) and q["question_id"] not in errors]
            chats, params = [], []
            for q in todo:
                qid = q["question_id"]
                chat: list[dict[str, str]] = []
                for k in range(t):
                    chat += [
                        {"role": "user", "content": q["turns"][k]},
                        {"role": "assistant", "content": turns[(qid, choice)][k]},
                    ]
                chat.append({"role": "user", "content": q["turns"][t]})
                chats.append(chat)
                params.append(
                    SamplingParams(
                        max_new_tokens=int(e.max_new_tokens),
                        temperature=temperature_for(cfg, q["category"]),
                        seed=int(e.seed) + 1000 * choice + qid,
                    )
                )
            outputs = backend.generate(chats, params, progress=bar.update)
            for q, out in zip(todo, outputs, strict=True):
                qid = q["question_id"]
                tokens += out.completion_tokens
                if out.text is None:
                    errors[qid] = f"turn {t + 1}, choice {choice}: {out.error}"
                else:
                    turns.setdefault((qid, choice), []).append(out.text.strip())
    bar.close()
    now = time.time()
    answers, failures = [], []
    for q in questions:
        qid = q["question_id"]
        if qid in errors:
            failures.append(
                {"question_id": qid, "model_id": model_id, "error": errors[qid], "tstamp": now}
            )
            continue
        answers.append(
            {
                "question_id": qid,
                "answer_id": uuid.uuid4().hex[:22],
                "model_id": model_id,
                "choices": [{"index": c, "turns": turns[(qid, c)]} for c in range(n_choices)],
                "style": [answer_style(text) for text in turns[(qid, 0)]],
                "tstamp": now,
            }
        )
    return answers, failures, tokens


def answer_competitor(
    cfg: DictConfig,
    name: str,
    *,
    model_ref: str | None = None,
    questions_file: str | None = None,
) -> dict[str, Any]:
    """Answers of one competitor to the selected questions, reusing valid earlier answers.

    `model_ref` overrides a `local: finetuned | base` competitor with a concrete checkpoint folder or
    models:/ URI (the Dagster asset passes its upstream model assets' values here).
    """
    from arenaflow.evaluate.questions import questions_uri, write_questions

    competitor = find_competitor(cfg, name)
    qfile = questions_file or questions_uri(cfg)
    if not io.exists(qfile):
        qfile = write_questions(cfg)["uri"]
    questions, _ = load_questions(qfile)
    backend = make_backend(cfg, competitor, model_ref)
    hashes = {q["question_id"]: gen_hash(cfg, backend.fingerprint, q) for q in questions}
    out_uri, fail_uri = answer_uri(cfg, name), failures_uri(cfg, name)

    kept, stale = _reusable(out_uri, hashes)
    have = {r["question_id"] for r in kept}
    missing = [q for q in questions if q["question_id"] not in have]
    log.info(
        "%s: %d answers reused, %d stale, %d to generate",
        name,
        len(have & set(hashes)),
        stale,
        len(missing),
    )
    new, failures, tokens, seconds = [], [], 0, 0.0
    try:
        if missing:
            backend.prepare()
            started = time.perf_counter()
            new, failures, tokens = generate_all(cfg, backend, missing, name)
            seconds = time.perf_counter() - started
    finally:
        backend.close()
    for row in new:
        row["gen_hash"] = hashes[row["question_id"]]
    rows = sorted(kept + new, key=lambda r: r["question_id"])
    io.write_jsonl(out_uri, rows)
    io.write_jsonl(fail_uri, failures)
    for f in failures:
        log.error("%s: question %s failed: %s", name, f["question_id"], f["error"])
    samples = _samples(rows, questions, int(cfg.evaluate.get("samples_in_metadata", 5)))
    result = {
        "uri": out_uri,
        "failures_uri": fail_uri,
        "model_id": name,
        "model": model_ref or competitor.local or f"{competitor.base_url} {competitor.model}",
        "questions": len(questions),
        "answered": sum(1 for r in rows if r["question_id"] in hashes),
        "generated": len(new),
        "reused": len(have & set(hashes)),
        "stale_regenerated": stale,
        "failed": len(failures),
        "failures": failures,
        "tokens_generated": tokens,
        "seconds": round(seconds, 3),
        "tokens_per_s": round(tokens / seconds, 2) if tokens and seconds > 0 else 0.0,
        "samples": samples,
    }
    result.update(_track(cfg, name, result))
    return result


def _reusable(uri: str, hashes: dict[Any, str]) -> tuple[list[dict[str, Any]], int]:
    """Earlier answers still valid for these settings, and how many went stale."""
    kept, stale = [], 0
    for row in _read_existing(uri):
        qid = row.get("question_id")
        if qid in hashes and row.get("gen_hash") != hashes[qid]:
            stale += 1
        else:
            kept.append(row)
    return kept, stale


def _samples(
    rows: list[dict[str, Any]], questions: list[dict[str, Any]], n: int
) -> list[dict[str, Any]]:
    """The first answers, cut short, for a person to look at (asset metadata)."""
    by_id = {q["question_id"]: q for q in questions}
    return [
        {
            "question_id": r["question_id"],
            "category": by_id[r["question_id"]]["category"],
            "turn_1": r["choices"][0]["turns"][0][:300],
            "turn_2": r["choices"][0]["turns"][-1][:300]
            if len(r["choices"][0]["turns"]) > 1
            else "",
        }
        for r in rows
        if r["question_id"] in by_id
    ][:n]


def _track(cfg: DictConfig, name: str, result: dict[str, Any]) -> dict[str, Any]:
    """One MLflow run per competitor: counts, throughput, sample answers and the answer file."""
    from arenaflow.tracking import tracker_from_cfg

    tracker = tracker_from_cfg(cfg)
    keys = ("answered", "generated", "reused", "failed", "tokens_generated", "tokens_per_s")
    with tracker.start_run(
        "mt_bench_answers", cfg, run_name=f"mt_bench_answers/{name}", tags={"competitor": name}
    ) as run:
        run.log_metrics({k: float(result[k]) for k in keys})
        run.log_table(result["samples"] or [{"question_id": None}], "sample_answers.json")
        if result["failures"]:
            run.log_dict(result["failures"], "failures.json")
        local = io.local_path(result["uri"])
        if local is not None and local.exists():
            run.log_artifact(local, "model_answer")
    return {"mlflow_run_id": run.run_id, "mlflow_url": run.url}
