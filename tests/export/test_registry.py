"""Registered versions carry their GGUF files: the base gets them at registration (a real MLflow
store in a temp home), an older base without them gets them on the next registration, and
`resolve_gguf` picks the file `model.quantization` names."""

from __future__ import annotations

import gguf

from arenaflow.export.registry import TAG_PREFIX, resolve_gguf
from arenaflow.tracking import tracker_from_cfg
from arenaflow.train import register_base, resolve_base


def test_base_version_carries_gguf_artifacts_with_its_lineage(make_cfg, tmp_path) -> None:
    cfg = make_cfg("model.gguf_export=[]")
    info = resolve_base(cfg)
    first = register_base(cfg, info)  # registered without GGUF files
    assert first["gguf"] == {}
    cfg = make_cfg("model.gguf_export=[f16]")
    again = register_base(cfg, info)  # same base: reused, and its missing file attached
    assert again["version"] == first["version"]
    uri = again["gguf"]["f16"]
    assert uri.startswith("runs:/") and uri.endswith("/gguf/model-f16.gguf")
    tracker = tracker_from_cfg(cfg)
    version = tracker.get_version("arenaflow-chat", version=again["version"])
    assert version.tags[f"{TAG_PREFIX}f16"] == uri
    path = resolve_gguf(info["path"], None, cfg.paths.cache_dir, version=version, tracker=tracker)
    reader = gguf.GGUFReader(str(path))
    meta = {k: reader.fields[k].contents() for k in reader.fields if k.startswith("arenaflow.")}
    assert meta["arenaflow.model_version"] == f"models:/arenaflow-chat/{again['version']}"
    assert meta["arenaflow.role"] == "base" and meta["arenaflow.base_model"] == "tiny-llama"
    assert register_base(cfg, info)["gguf"] == {"f16": uri}  # nothing exported twice
