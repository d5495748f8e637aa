"""LLM-as-a-judge for MT-bench: judge prompts, backends (OpenAI, OpenAI-compatible, the local engine),
a persistent judgment cache, single and pairwise protocols, verdict parsing, scores and judge health."""

from arenaflow.judge.stage import judge, run, score

__all__ = ["judge", "run", "score"]
