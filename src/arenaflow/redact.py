"""The one redaction for everything the project logs or writes: credential-like keys, URL
passwords (`user:***@`), secret query parameters and `api_keys=[...]` inside messages. The live
config is never changed, only the copies that are shown."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf

REDACTED = "***"
_SECRET_WORDS = r"api_?keys?|secret|password|passwd|token|authorization|credentials?|private_key"
# a config key or override whose value is a secret (not `api_key_env`: that holds a variable's name)
_SECRET_KEY = re.compile(rf"({_SECRET_WORDS})$", re.IGNORECASE)
# the password of `scheme://user:password@host` ('/' allowed: hiding too much beats leaking)
_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.\-]*://[^\s:/?#@]*:)[^\s@]+(?=@)", re.IGNORECASE)
# `name=value` with a secret-like name: query strings (?token=, &api_key=, X-Amz-Signature=) and
# overrides quoted in messages (serve.api_keys=[...])
_SECRET_ASSIGNMENT = re.compile(
    rf"((?<![\w.\-])[\w.\-]*(?:{_SECRET_WORDS}|key|sig|signature)=)"
    r"(\[[^\]]*\]|\{[^}]*\}|[^\s&#,;'\"\])}]+)",
    re.IGNORECASE,
)


def redact(obj: Any, key: str = "") -> Any:
    """The one redaction for everything logged or written (MLflow, metadata, logs, config files).

    Values of credential-like keys (api_key, api_keys, token, password, ...) become '***'; in any
    string, a URL's password (`user:***@host`) and secret query parameters (`?token=***`) do too.
    Only copies are redacted: the live config keeps the secrets the process needs.
    """
    if isinstance(obj, DictConfig | ListConfig):
        obj = OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, Mapping):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if key and _SECRET_KEY.search(key) and obj not in (None, [], ""):
        return REDACTED
    if isinstance(obj, list | tuple):
        return [redact(v) for v in obj]
    if isinstance(obj, str):
        return _SECRET_ASSIGNMENT.sub(rf"\1{REDACTED}", _URL_PASSWORD.sub(rf"\1{REDACTED}", obj))
    return obj


def redact_overrides(overrides: Sequence[str]) -> list[str]:
    """Hydra overrides as `redact` shows them: `serve.api_keys=[sk-..]` -> `serve.api_keys=***`."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    parser = OverridesParser.create()
    out = []
    for o in overrides:
        key, sep, text = o.partition("=")
        leaf = key.lstrip("+~").rsplit(".", 1)[-1].split("@")[0]
        if not sep:
            out.append(redact(o))
        elif _SECRET_KEY.search(leaf) and text.strip() not in ("", "null", "[]"):
            out.append(f"{key}={REDACTED}")
        else:
            try:  # a dict value (`serve={api_keys:[..]}`) hides its secrets under its own keys
                value = parser.parse_overrides([o])[0].value()
            except OverrideParseException:
                value = text
            shown = redact(value)
            structured = isinstance(value, dict | list) and shown != value
            out.append(f"{key}={json.dumps(shown) if structured else redact(text)}")
    return out


def redacted_yaml(cfg: DictConfig | Mapping[str, Any]) -> str:
    """A config as YAML for a log line or a file a person reads, secrets redacted."""
    return OmegaConf.to_yaml(OmegaConf.create(redact(cfg)))
