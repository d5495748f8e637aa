"""Dagster Pipes from inside the training process (the lightweight `dagster_pipes` package).

When Dagster launched this process through `PipesSubprocessClient`, progress lines go to the
Dagster run's log and the result comes back as materialization metadata; otherwise every call
is a no-op, so the CLI and torchrun launches need no branches.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

PIPES_ENV = "DAGSTER_PIPES_CONTEXT"
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


class PipesBridge:
    """Null object: logs locally and reports nothing."""

    def log(self, message: str) -> None:
        log.info(message)

    def report(self, result: dict[str, Any]) -> None: ...


class DagsterPipesBridge(PipesBridge):
    def __init__(self, context: Any) -> None:
        self.context = context

    def log(self, message: str) -> None:
        self.context.log.info(message)

    def report(self, result: dict[str, Any]) -> None:
        metadata = {k: result.get(k) for k in SCALARS if result.get(k) is not None}
        self.context.report_asset_materialization(metadata=metadata)


@contextmanager
def pipes_session() -> Iterator[PipesBridge]:
    """Open Dagster Pipes when this process runs under it (rank 0 only); else the null bridge."""
    if not os.environ.get(PIPES_ENV) or int(os.environ.get("RANK", 0)) != 0:
        yield PipesBridge()
        return
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as context:
        yield DagsterPipesBridge(context)
