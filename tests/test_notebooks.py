"""The notebooks run top to bottom (nbclient, a real kernel) on tiny artifacts made by the real stages."""

import os
import shlex
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

from arenaflow import io
from arenaflow.judge.stage import judgment_uris, score
from arenaflow.rating import run as rate

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"


def execute(name: str, overrides: list[str], monkeypatch) -> nbformat.NotebookNode:
    monkeypatch.setenv("ARENAFLOW_OVERRIDES", shlex.join(overrides))
    nb = nbformat.read(NOTEBOOKS / name, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), (
        "outputs must be stripped in git"
    )
    NotebookClient(
        nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    ).execute()
    return nb


def text_of(nb: nbformat.NotebookNode) -> str:
    out = []
    for cell in nb.cells:
        for o in cell.get("outputs", []):
            out.append(o.get("text", "") + str(o.get("data", {}).get("text/plain", "")))
    return "\n".join(out)


def test_data_explorer(make_cfg, af_home, model_cache, monkeypatch) -> None:
    from arenaflow.data import run as data_run

    overrides = [
        "experiment=test",
        f"paths.home={af_home}",
        f"paths.cache_dir={model_cache}",
        "data.limit=60",
    ]
    data_run(make_cfg("data.limit=60"))
    nb = execute("data_explorer.ipynb", overrides, monkeypatch)
    text = text_of(nb)
    assert "input 60" in text and "trainable (assistant) token share" in text
    assert any(o.get("data", {}).get("image/png") for c in nb.cells for o in c.get("outputs", []))


def test_leaderboard_explorer(make_cfg, af_home, model_cache, monkeypatch) -> None:
    cfg = make_cfg("rating.bootstrap_rounds=20")
    single_uri, pair_uri = judgment_uris(cfg)
    singles, pairs = [], []
    for q, cat in ((81, "writing"), (111, "math"), (121, "coding")):
        for turn in (1, 2):
            winner = "model_1" if q != 121 else "model_2"
            pairs.append(
                {
                    "question_id": q,
                    "model_1": "finetuned",
                    "model_2": "base",
                    "g1_winner": winner,
                    "g2_winner": winner,
                    "judge": ["j", "pair-v2"],
                    "turn": turn,
                    "tstamp": float(q + turn),
                }
            )
            for model, s in (("finetuned", 7), ("base", 4)):
                singles.append(
                    {
                        "question_id": q,
                        "model": model,
                        "category": cat,
                        "judge": ["j", "single-v1"],
                        "score": s + turn,
                        "turn": turn,
                        "tstamp": 1.0,
                    }
                )
    io.write_jsonl(single_uri, singles)
    io.write_jsonl(pair_uri, pairs)
    score(cfg)
    rate(cfg)
    nb = execute(
        "leaderboard_explorer.ipynb", ["experiment=test", f"paths.home={af_home}"], monkeypatch
    )
    text = text_of(nb)
    assert "finetuned" in text and "base" in text and "bootstrap rounds: 20" in text
    pngs = [o for c in nb.cells for o in c.get("outputs", []) if o.get("data", {}).get("image/png")]
    assert len(pngs) >= 2  # the radar and the rating CI plot


@pytest.fixture(autouse=True)
def _no_inherited_overrides():
    os.environ.pop("ARENAFLOW_OVERRIDES", None)
