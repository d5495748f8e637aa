"""Write the exploration notebooks in notebooks/ (outputs stripped). Re-run after editing the cells here."""

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

OUT = Path(__file__).resolve().parents[1] / "notebooks"

SETUP = """import os, shlex
from arenaflow.config import compose_config
# The same config the pipeline used: set ARENAFLOW_OVERRIDES (e.g. "experiment=demo") to explore another run.
cfg = compose_config(shlex.split(os.environ.get("ARENAFLOW_OVERRIDES", "experiment=demo")))
print("artifacts:", cfg.paths.artifact_root)"""

DATA = [
    new_markdown_cell(
        "# Data explorer\nDrop reasons of the ShareGPT cleaning, token lengths of the SFT dataset, "
        "and sample conversations before and after cleaning. Run `make run` (or "
        "`python -m arenaflow.data`) first."
    ),
    new_code_cell(SETUP),
    new_code_cell("""import pandas as pd
from arenaflow import io
stats = io.read_json(io.artifact_uri(cfg, "data/clean_stats.json"))
print(f"input {stats['input']}, kept {stats['kept']}")
drops = pd.Series(stats["dropped"], name="records").sort_values(ascending=False)
assert stats["kept"] + drops.sum() == stats["input"], "every record is accounted for"
drops.to_frame()"""),
    new_code_cell("""import matplotlib.pyplot as plt
ax = drops[drops > 0].plot.barh(figsize=(6, 3), title="dropped records by reason")
ax.invert_yaxis(); plt.show()"""),
    new_code_cell("""from datasets import load_from_disk
sft = load_from_disk(io.artifact_uri(cfg, "data/sft_dataset"))
lengths = pd.Series(sft["train"]["length"])
trainable = sum(sum(l != -100 for l in row) for row in sft["train"]["labels"]) / lengths.sum()
print(sft); print(f"trainable (assistant) token share: {trainable:.1%}")
lengths.plot.hist(bins=40, figsize=(6, 3), title="tokens per training sample"); plt.show()"""),
    new_code_cell("""raw = {r["id"]: r for r in io.read_jsonl(io.artifact_uri(cfg, "data/sharegpt_raw.jsonl"))}
clean = list(io.read_jsonl(io.artifact_uri(cfg, "data/sharegpt_clean.jsonl")))
changed = [c for c in clean if c["id"] in raw and raw[c["id"]]["conversations"] != c["conversations"]]
print(f"{len(changed)} of {len(clean)} kept conversations were rewritten by cleaning")
def show(conv, width=300):
    for t in conv["conversations"][:4]:
        print(f"[{t['from']}] {t['value'][:width]!r}")
for c in changed[:2]:
    print("=== before", c["id"]); show(raw[c["id"]])
    print("=== after"); show(c)"""),
]

BOARD = [
    new_markdown_cell(
        "# Leaderboard and MT-bench explorer\nReads the latest `scores` and `leaderboard` runs from "
        "MLflow: MT-bench per category (radar), ratings with their confidence intervals, win fractions."
    ),
    new_code_cell(SETUP),
    new_code_cell("""import json
from pathlib import Path
from mlflow.tracking import MlflowClient
client = MlflowClient(cfg.tracking.tracking_uri)
exp = client.get_experiment_by_name(cfg.tracking.experiment_name)
def latest(stage):
    runs = client.search_runs([exp.experiment_id], f"tags.`arenaflow.stage` = '{stage}' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"], max_results=1)
    assert runs, f"no finished {stage!r} run in {cfg.tracking.tracking_uri}: run the pipeline first"
    return runs[0]
def artifact(run, path):
    return json.loads(Path(client.download_artifacts(run.info.run_id, path)).read_text())
scores_run, board_run = latest("scores"), latest("leaderboard")
print("scores run", scores_run.info.run_id, "| leaderboard run", board_run.info.run_id)"""),
    new_code_cell("""import pandas as pd
def table(payload):  # mlflow log_table JSON: {"columns": [...], "data": [[...], ...]}
    return pd.DataFrame(payload["data"], columns=payload["columns"])
scores = table(artifact(scores_run, "mt_bench_scores.json")).set_index("model")
categories = table(artifact(scores_run, "mt_bench_categories.json")).set_index("model")
scores"""),
    new_code_cell("""import numpy as np
import matplotlib.pyplot as plt
cats = [c for c in categories.columns if categories[c].notna().any()]
angles = np.linspace(0, 2 * np.pi, len(cats), endpoint=False).tolist()
fig, ax = plt.subplots(figsize=(5, 5), subplot_kw={"polar": True})
for model, row in categories[cats].iterrows():
    vals = row.fillna(0).tolist()
    ax.plot(angles + angles[:1], vals + vals[:1], label=model)
    ax.fill(angles + angles[:1], vals + vals[:1], alpha=0.1)
ax.set_xticks(angles); ax.set_xticklabels(cats); ax.set_ylim(0, 10)
ax.legend(loc="upper right", bbox_to_anchor=(1.3, 1.1)); ax.set_title("MT-bench by category"); plt.show()"""),
    new_code_cell("""full = artifact(board_run, "leaderboard_full.json")
board = pd.DataFrame(full["rows"]).set_index("model").sort_values("rating", ascending=False)
print("scale:", full["scale"], "| battles:", full["battles"], "| bootstrap rounds:", full["bootstrap_rounds"])
board[["rank", "rating", "ci_lower", "ci_upper", "elo", "mt_bench", "battles", "win_rate"]]"""),
    new_code_cell("""fig, ax = plt.subplots(figsize=(6, 0.6 * len(board) + 1))
err = [board["rating"] - board["ci_lower"], board["ci_upper"] - board["rating"]]
ax.errorbar(board["rating"], board.index, xerr=err, fmt="o", capsize=4)
ax.invert_yaxis(); ax.set_xlabel("Bradley-Terry rating (95% CI)"); ax.grid(alpha=0.3); plt.show()
pd.DataFrame(full["win_fraction"])"""),
]


def write(name: str, cells: list) -> None:
    nb = new_notebook(
        cells=cells,
        metadata={
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}
        },
    )
    nbformat.write(nb, OUT / name)


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    write("data_explorer.ipynb", DATA)
    write("leaderboard_explorer.ipynb", BOARD)
    print("wrote", sorted(p.name for p in OUT.glob("*.ipynb")))
