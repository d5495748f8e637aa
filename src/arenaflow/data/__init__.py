"""Data stage: load ShareGPT (streaming, truncation-tolerant), clean it, build the SFT dataset."""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig


def run(cfg: DictConfig) -> dict[str, Any]:
    raise NotImplementedError("data stage: being written")
