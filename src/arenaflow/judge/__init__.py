"""`python -m arenaflow.judge`: the judge stage's Hydra CLI (the library lives in arenaflow.judging)."""

from arenaflow.judging import judge, run, score

__all__ = ["judge", "run", "score"]
