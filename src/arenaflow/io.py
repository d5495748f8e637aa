"""fsspec helpers: every artifact path is a URI under `paths.artifact_root`, local or remote.

Writes are atomic: a file is written under a temporary name beside its target and renamed over it
when complete, so a reader (or a rerun after a kill) sees the previous version or the new one,
never half a file.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import fsspec
from omegaconf import DictConfig


def join(root: str, *parts: str) -> str:
    """Join URI segments with '/', keeping the protocol of `root`."""
    out = str(root).rstrip("/")
    for p in parts:
        out = f"{out}/{str(p).strip('/')}"
    return out


def artifact_uri(cfg: DictConfig, *parts: str) -> str:
    return join(cfg.paths.artifact_root, *parts)


def fs_for(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    fs, path = fsspec.core.url_to_fs(uri)
    return fs, path


def exists(uri: str) -> bool:
    fs, path = fs_for(uri)
    return fs.exists(path)


def makedirs(uri: str) -> None:
    fs, path = fs_for(uri)
    fs.makedirs(path, exist_ok=True)


@contextlib.contextmanager
def open_atomic(uri: str, mode: str = "w") -> Iterator[Any]:
    """Open `uri` for writing ("w" text as UTF-8, or "wb"); it appears only when the block ends.

    The data goes to `<name>.tmp-<random>` and is renamed over the target on success (os.replace
    on local disk, after an fsync; `fs.mv` elsewhere); on an exception the temporary file is
    removed and the target is left as it was.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"open_atomic mode={mode!r}: use 'w' or 'wb'")
    fs, path = fs_for(uri)
    parent = path.rsplit("/", 1)[0]
    if parent:
        fs.makedirs(parent, exist_ok=True)
    tmp = f"{path}.tmp-{secrets.token_hex(6)}"
    local = local_path(uri) is not None
    try:
        with fs.open(tmp, mode, **({} if mode == "wb" else {"encoding": "utf-8"})) as f:
            yield f
            if local:
                f.flush()
                os.fsync(f.fileno())
        if local:
            os.replace(tmp, path)
        else:
            fs.mv(tmp, path)
    except BaseException:
        with contextlib.suppress(Exception):
            fs.rm(tmp)
        raise


def write_text(uri: str, text: str) -> None:
    with open_atomic(uri) as f:
        f.write(text)


def read_text(uri: str) -> str:
    with fsspec.open(uri, "r", encoding="utf-8") as f:
        return f.read()


def write_json(uri: str, obj: Any) -> None:
    write_text(uri, json.dumps(obj, indent=2, ensure_ascii=False))


def read_json(uri: str) -> Any:
    return json.loads(read_text(uri))


def write_jsonl(uri: str, rows: Iterable[dict[str, Any]]) -> int:
    n = 0
    with open_atomic(uri) as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def read_jsonl(uri: str) -> Iterator[dict[str, Any]]:
    with fsspec.open(uri, "r", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                yield json.loads(line)


def local_path(uri: str) -> Path | None:
    """The local filesystem path behind a URI, or None when it is remote."""
    fs, path = fs_for(uri)
    if "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        return Path(path)
    return None


def download_dir(uri: str, dest: Path) -> Path:
    """Materialize a (possibly remote) folder locally; local folders are returned as they are."""
    lp = local_path(uri)
    if lp is not None:
        return lp
    fs, path = fs_for(uri)
    dest.mkdir(parents=True, exist_ok=True)
    fs.get(path.rstrip("/") + "/", str(dest), recursive=True)
    return dest


def upload_dir(src: Path, uri: str) -> str:
    """Copy a local folder to a (possibly remote) URI; a no-op when the URI is that folder."""
    lp = local_path(uri)
    if lp is not None and lp.resolve() == Path(src).resolve():
        return uri
    fs, path = fs_for(uri)
    fs.makedirs(path, exist_ok=True)
    fs.put(str(src).rstrip("/") + "/", path, recursive=True)
    return uri
