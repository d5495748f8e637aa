"""Several adapters over one base in one engine: one copy of the base weights, one running batch.

peft loads every adapter into the base model under its own name; each adapter gets an engine view
(`Engine.with_adapter`) with its own checkpoint's tokenizer (chat template), and the running batch
hands the forward each row's adapter (peft's mixed-batch `adapter_names`), so rows of different
adapters and of the plain base decode together in one batch.
"""

from __future__ import annotations

import logging
from pathlib import Path

from arenaflow.engine.engine import Engine

log = logging.getLogger(__name__)


def load_shared(
    base: str | Path,
    adapters: dict[str, str | Path],
    *,
    dtype: str = "float32",
    device: str = "cpu",
    max_batch_size: int = 16,
) -> tuple[Engine, dict[str, Engine]]:
    """(the base's engine, {adapter name: its engine}) over one copy of the base checkpoint `base`.

    Each adapter folder brings its tokenizer; it must have the base's vocabulary (LoRA leaves the
    embeddings alone, and the batch decodes every row with one tokenizer), else ValueError."""
    from arenaflow.adapters import apply_adapters
    from arenaflow.models import load_model, load_tokenizer

    if not adapters:
        raise ValueError("load_shared needs at least one adapter")
    paths = {name: Path(p) for name, p in adapters.items()}
    model = apply_adapters(load_model(base, dtype=dtype, device=device), paths)
    tokenizer = load_tokenizer(base)
    engine = Engine(model, tokenizer, model_id=str(base), max_batch_size=max_batch_size)
    views: dict[str, Engine] = {}
    for name, path in paths.items():
        tok = load_tokenizer(path)
        if not tok.chat_template:
            raise ValueError(f"adapter {path} has no chat template; save one with its tokenizer")
        if tok.get_vocab() != tokenizer.get_vocab():
            raise ValueError(
                f"adapter {path} has another vocabulary than its base {base}; an adapter that "
                "changes the tokenizer cannot share a base with others, serve it merged instead"
            )
        views[name] = engine.with_adapter(name, tok, model_id=str(path))
    log.info("engine over %s with %d adapter(s): %s", base, len(views), ", ".join(views))
    return engine, views
