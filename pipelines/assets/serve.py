"""Dagster assets of the `serve` group: the deployed OpenAI-compatible endpoint and the sensor that rolls it."""

import json
import time
from typing import Any

import dagster as dg

from arenaflow.report import Markdown, Path, Table, Url
from arenaflow.serve.deploy import deploy_champion
from arenaflow.serve.security import api_keys_from_cfg
from arenaflow.tracking import parse_models_uri, tracker_from_cfg
from pipelines.metadata import output
from pipelines.resources import HydraConfigResource, StageConfig, stage_config
from pipelines.versions import source_version

OWNERS = ["team:arenaflow"]
TAGS = {"stage": "serve"}
CODE_VERSION = source_version(__file__)


@dg.asset(
    group_name="serve",
    owners=OWNERS,
    tags=TAGS,
    code_version=CODE_VERSION,
    description="The champion served on an OpenAI-compatible endpoint (blue/green, smoke-tested).",
)
def serving_deployment(
    context: dg.AssetExecutionContext,
    hydra: HydraConfigResource,
    config: StageConfig,
    champion_model: dict[str, Any],
) -> dg.Output[dict[str, Any]]:
    """The champion served on an OpenAI-compatible endpoint (blue/green, smoke-tested)."""
    cfg, meta = stage_config(context, hydra, config)
    out = deploy_champion(cfg, champion_model)
    context.log.info("serving %s (version %s) at %s", out["model_uri"], out["version"], out["url"])
    value = {k: out[k] for k in ("url", "pid", "model_uri", "version", "models")}
    plain = _deployment_metadata(out, cfg.serve.served_model_name, bool(api_keys_from_cfg(cfg)))
    return output(value, meta, plain, mlflow_url=out["run_url"])


def _deployment_metadata(out: dict[str, Any], model_name: str, auth: bool) -> dict[str, Any]:
    """Where it serves, what it replaced, the smoke test, and a command to try it."""
    previous = out["previous"]
    return {
        "url": Url(out["url"]),
        "pid": out["pid"],
        "model_uri": str(out["model_uri"]),
        "version": str(out["version"]),
        "previous": Table(
            [{k: previous[k] for k in ("url", "pid", "version")}] if previous else [],
            empty="_first deployment_",
        ),
        "smoke_test": Table(out["smoke"], ["question_id", "category", "match", "http", "rendered"]),
        "strays_stopped": len(out["strays"]),
        "model_card": out["card"],
        "served_models": Table(out["models"], ["id", "alias_of", "root"]),
        "server_log": Path(out["log_path"]),
        "try_it": Markdown(f"```bash\n{curl_example(out['url'], model_name, auth)}\n```"),
    }


def curl_example(url: str, model_name: str, auth: bool = False) -> str:
    """A curl command that chats with the endpoint (`$API_KEY` when it requires a key)."""
    return (
        f"curl {url.rstrip('/')}/chat/completions -H 'Content-Type: application/json' "
        + ('-H "Authorization: Bearer $API_KEY" ' if auth else "")
        + f'-d \'{{"model": "{model_name}", "messages": [{{"role": "user", "content": "Hello!"}}]}}\''
    )


@dg.sensor(
    target=serving_deployment,
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Rolls serving_deployment when the registry's `champion` alias moves to another version.",
)
def champion_alias_sensor(
    context: dg.SensorEvaluationContext, hydra: HydraConfigResource
) -> dg.RunRequest | dg.SkipReason:
    """Rolls serving_deployment when the registry's `champion` alias moves to another version."""
    cfg = hydra.compose()
    uri = str(cfg.serve.model_uri)
    if not uri.startswith("models:/"):
        return dg.SkipReason(f"serve.model_uri={uri} is not a registry alias; nothing to watch")
    name, _, alias = parse_models_uri(uri)
    if alias is None:
        return dg.SkipReason(f"serve.model_uri={uri} pins a version; nothing to watch")
    info = tracker_from_cfg(cfg).get_version(name, alias=alias)
    if info is None:
        return dg.SkipReason(f"the registry has no {name}@{alias} yet")
    version, epoch, changes = _read_cursor(context.cursor)
    if version == info.version:
        return dg.SkipReason(f"{name}@{alias} is still version {info.version}")
    # the run key counts alias moves, so a rollback to a version deployed before is a new run (a
    # key seen before would make Dagster skip it); the epoch (when this cursor began) keeps keys
    # new after a cursor reset, and a re-evaluated tick (same cursor) still repeats its key
    changes += 1
    cursor = {"version": info.version, "epoch": epoch, "changes": changes}
    context.update_cursor(json.dumps(cursor))
    return dg.RunRequest(
        run_key=f"{name}@{alias}-v{info.version}-{epoch}.{changes}",
        tags={"arenaflow/champion_version": info.version},
    )


def _read_cursor(cursor: str | None) -> tuple[str | None, int, int]:
    """(version last seen, cursor epoch in ms, alias moves seen); a cursor from before the count
    is the bare version."""
    try:
        state = json.loads(cursor or "")
        return str(state["version"]), int(state["epoch"]), int(state["changes"])
    except (ValueError, TypeError, KeyError):
        return cursor or None, time.time_ns() // 1_000_000, 0


sensors = [champion_alias_sensor]
