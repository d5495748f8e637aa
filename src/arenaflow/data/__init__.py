"""Data stage (entry point: `stage.py`): load ShareGPT, clean it, build the SFT dataset."""

from arenaflow.data.stage import run, run_clean, run_raw, run_sft

__all__ = ["run", "run_clean", "run_raw", "run_sft"]
