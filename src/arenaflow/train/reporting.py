"""Where the training process reports its progress and its result.

By default, to the log. Whoever launches `python -m arenaflow.train` can plug in its own reporter
without the library knowing about it: `ARENAFLOW_TRAIN_REPORTER=module:factory` names a factory
returning a context manager that yields an object with `log(message)` and `report(result)`. The
Dagster asset sets it to the Dagster Pipes reporter in `pipelines/train_pipes.py`. Only rank 0
reports; ranks started by `launch_ranks` report through their parent.
"""

from __future__ import annotations

import importlib
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

log = logging.getLogger(__name__)

REPORTER_ENV = "ARENAFLOW_TRAIN_REPORTER"


class Reporter:
    """The default: progress to the log, the result stays in result.json."""

    def log(self, message: str) -> None:
        log.info(message)

    def report(self, result: dict[str, Any]) -> None: ...


@contextmanager
def reporter_session() -> Iterator[Reporter]:
    """The reporter named by $ARENAFLOW_TRAIN_REPORTER (rank 0 only), else the log."""
    spec = os.environ.get(REPORTER_ENV)
    if not spec or int(os.environ.get("RANK", 0)) != 0:
        yield Reporter()
        return
    module, _, name = spec.partition(":")
    if not module or not name:
        raise ValueError(f"{REPORTER_ENV}={spec!r} must name a factory as module:function")
    factory = getattr(importlib.import_module(module), name)
    with factory() as reporter:
        yield reporter
