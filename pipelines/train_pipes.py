"""The training process's reporter under Dagster Pipes (the lightweight `dagster_pipes` package).

`finetuned_model` launches `python -m arenaflow.train` with
`ARENAFLOW_TRAIN_REPORTER=pipelines.train_pipes:pipes_reporter`: progress lines go to the Dagster
run's log and the result comes back as materialization metadata.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

REPORTER = "pipelines.train_pipes:pipes_reporter"
SCALARS = (
    "final_loss",
    "val_loss",
    "steps",
    "tokens_per_s",
    "trained_tokens_per_s",
    "mfu",
    "train_time_s",
    "peak_tflops",
    "world_size",
    "n_params",
    "model_uri",
    "version",
    "run_id",
    "path",
    "resumed_from",
)


class PipesReporter:
    def __init__(self, context: Any) -> None:
        self.context = context

    def log(self, message: str) -> None:
        self.context.log.info(message)

    def report(self, result: dict[str, Any]) -> None:
        metadata = {k: result.get(k) for k in SCALARS if result.get(k) is not None}
        self.context.report_asset_materialization(metadata=metadata)


@contextmanager
def pipes_reporter() -> Iterator[PipesReporter]:
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as context:
        yield PipesReporter(context)
