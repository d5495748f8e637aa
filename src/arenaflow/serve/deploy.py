"""Blue/green deployment of the serving app as a detached uvicorn process, with a smoke test.

A deployment starts the new server next to the old one on a free port, waits for `/ready`, and
smoke-tests it over HTTP (`smoke_test`). Only then does the recorded endpoint switch and the old
server stop; a new server that fails leaves the old one serving. The current deployment lives in
`<paths.home>/serve/deployment.json`, so the next materialization finds it; every process started
is recorded as it starts (`arenaflow.serve.process`), so one a killed run left behind is stopped
by the next deployment. The server's config file holds no secret: its API keys come through its
environment, which holds only what a server needs.
"""

from __future__ import annotations

import json
import logging
import subprocess
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import httpx
from omegaconf import DictConfig, OmegaConf

from arenaflow.serve.process import (
    Deployment,
    alive,
    child_config,
    deploy_lock,
    free_port,
    is_ours,
    listens,
    spawn,
    stop_server,
    stop_strays,
    write_json,
)
from arenaflow.tracking import parse_models_uri, tracker_from_cfg

log = logging.getLogger(__name__)

__all__ = ["Deployment", "DeploymentError", "deploy", "deploy_champion", "read_state", "undeploy"]

_BIND_ATTEMPTS = 3  # fresh ports tried when another process takes the free one first


class DeploymentError(RuntimeError):
    """The new server could not be started or failed its smoke test (the old one keeps serving)."""


class _PortTaken(DeploymentError):
    """The port `free_port` chose was bound by someone else before the new server could bind it."""


def serve_dir(cfg: DictConfig) -> Path:
    return Path(cfg.paths.home) / "serve"


def state_path(cfg: DictConfig) -> Path:
    return serve_dir(cfg) / "deployment.json"


def read_state(cfg: DictConfig) -> Deployment | None:
    path = state_path(cfg)
    if not path.exists():
        return None
    try:
        return Deployment(**json.loads(path.read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        log.warning("deployment state %s is unreadable (%s); treating it as no deployment", path, e)
        return None


def write_state(cfg: DictConfig, deployment: Deployment | None) -> None:
    path = state_path(cfg)
    if deployment is None:
        path.unlink(missing_ok=True)
        return
    write_json(path, asdict(deployment))
    with (path.parent / "history.jsonl").open("a") as f:
        f.write(json.dumps({**asdict(deployment), "recorded_at": time.time()}) + "\n")


def pin_model_uri(cfg: DictConfig, champion: dict[str, Any] | None) -> str:
    """The registry version to serve: what `serve.model_uri`'s alias names now, else the champion value.

    Pinning a version (not the alias) means a server keeps serving what it was tested with even
    when the alias moves; the sensor then rolls a new deployment.
    """
    uri = str(cfg.serve.model_uri)
    if uri.startswith("models:/"):
        name, version, alias = parse_models_uri(uri)
        if alias is None:
            return uri
        info = tracker_from_cfg(cfg).get_version(name, alias=alias)
        if info is not None:
            return f"models:/{name}/{info.version}"
    fallback = (champion or {}).get("model_uri")
    if fallback:
        return str(fallback)
    if uri.startswith("models:/"):
        raise DeploymentError(
            f"nothing to serve: the registry has no {uri} and champion_model recorded no model_uri; "
            "materialize champion_model first (or set serve.model_uri to a checkpoint folder)"
        )
    return uri


def is_serving(dep: Deployment) -> bool:
    if not (alive(dep.pid) and is_ours(dep)):
        return False
    try:
        return httpx.get(f"{dep.base}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def _log_tail(path: str, chars: int = 3000) -> str:
    try:
        return Path(path).read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def served_set(cfg: DictConfig, model_uri: str) -> dict[str, Any]:
    """With `serve.models` / `serve.models_from`, the models the deployed server hosts beside the champion.

    The set is resolved here, once (`models_from: competitors` becomes a fixed `serve.models`
    list, so a version registered later does not slip in on a restart), with the champion first
    under `serve.served_model_name` (its `/ready` version is the deployment's version). When a
    listed model is the champion itself (same URI), the champion name becomes an alias of it
    and the weights load once. Without a model set the server hosts the champion alone ({}).
    """
    from arenaflow.serve.loading import ModelSpec, model_aliases, model_specs

    if not (cfg.serve.get("models") or cfg.serve.get("models_from")):
        return {}
    name = str(cfg.serve.served_model_name)
    specs = model_specs(cfg)
    if any(s.name == name for s in specs):
        raise DeploymentError(
            f"serve.served_model_name={name!r} is also the name of a model in the served set "
            f"({[s.name for s in specs]}); the deployment serves the champion under that name, "
            "so give it another one"
        )
    aliases = model_aliases(cfg, specs)
    champion = next((s for s in specs if s.uri == model_uri), None)
    if champion is None:
        champion = ModelSpec(name, model_uri, "champion")
    else:
        aliases[name] = champion.name
    ordered = [champion, *(s for s in specs if s is not champion)]
    models = [s.entry() for s in ordered]
    return {"models": models, "models_from": None, "aliases": aliases}


def server_config(
    cfg: DictConfig, model_uri: str, host: str, port: int, keys: list[str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The deployed server's config file (redacted) and environment (`child_config`)."""
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container["serve"].update({"model_uri": model_uri, "host": host, "port": port})
    container["serve"].update(served_set(cfg, model_uri))
    return child_config(container, keys)


def start_server(cfg: DictConfig, model_uri: str) -> Deployment:
    """Launch the server detached and wait until it is ready; a free port someone else binds
    first (the gap between `free_port` and the server's bind) is retried on a fresh one."""
    d = cfg.serve.deploy
    host = str(d.host)
    attempts = 1 if d.port else _BIND_ATTEMPTS
    for attempt in range(1, attempts + 1):
        port = int(d.port) if d.port else free_port(host)
        try:
            return _start_on(cfg, model_uri, host, port)
        except _PortTaken as e:
            if attempt == attempts:
                raise
            log.warning("%s; retrying on another port (%d/%d)", e, attempt, attempts)
    raise AssertionError("unreachable")


def _start_on(cfg: DictConfig, model_uri: str, host: str, port: int) -> Deployment:
    from arenaflow.serve.security import api_keys_from_cfg

    d = cfg.serve.deploy
    run_dir = serve_dir(cfg) / "deployments" / f"{time.strftime('%Y%m%d-%H%M%S')}-{port}"
    run_dir.mkdir(parents=True, exist_ok=True)
    config, env = server_config(cfg, model_uri, host, port, api_keys_from_cfg(cfg))
    config_path = run_dir / "config.yaml"
    config_path.write_text(OmegaConf.to_yaml(OmegaConf.create(config)))
    proc, dep = spawn(
        config_path, run_dir / "server.log", env, host=host, port=port, model_uri=model_uri
    )
    log.info("started server pid %d on %s for %s; waiting for /ready", proc.pid, dep.url, model_uri)
    try:
        _wait_ready(cfg, proc, dep)
    except BaseException:  # not ready, or this run interrupted: the process goes with it
        stop_server(dep, float(d.stop_timeout_s))
        raise
    return dep


def _wait_ready(cfg: DictConfig, proc: subprocess.Popen, dep: Deployment) -> None:
    d = cfg.serve.deploy
    deadline = time.time() + float(d.ready_timeout_s)
    while True:
        if proc.poll() is not None:
            tail = _log_tail(dep.log_path)
            if "address already in use" in tail.lower():
                fix = "" if not d.port else f"; free it or change serve.deploy.port={d.port}"
                raise _PortTaken(f"port {dep.port} was taken before the new server bound it{fix}")
            raise DeploymentError(
                f"the new server for {dep.model_uri} exited with code {proc.returncode} before "
                f"it was ready; its log ({dep.log_path}) ends with:\n{tail}"
            )
        try:
            resp = httpx.get(f"{dep.base}/ready", timeout=2, headers=_auth(cfg))
            if resp.status_code == 200 and listens(proc.pid, dep.port):
                dep.version = resp.json().get("version")
                write_json(dep.record_path, asdict(dep))
                return
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            raise DeploymentError(
                f"the new server for {dep.model_uri} was not ready after {d.ready_timeout_s} s "
                f"(serve.deploy.ready_timeout_s); log: {dep.log_path}"
            )
        time.sleep(0.25)


def smoke_questions(cfg: DictConfig) -> list[dict[str, Any]]:
    from arenaflow.evaluate.questions import load_questions, question_source, select_questions

    questions, _ = load_questions(question_source(cfg))
    chosen = select_questions(questions, cfg.evaluate.get("question_ids"))
    return chosen[: int(cfg.serve.deploy.smoke_questions)]


def smoke_test(cfg: DictConfig, dep: Deployment) -> list[dict[str, Any]]:
    """The server's greedy chat answers vs. its greedy completions of the same chats rendered
    here with the checkpoint's own tokenizer (the `apply_chat_template` call training made).

    Both answers come from the new server over HTTP, so no third copy of the model loads while
    the old and new servers are both up (only the tokenizer does). This catches a served chat
    template that is not the checkpoint's (the card's `chat_template_hash` is compared too) and
    a chat path that renders, encodes or decodes a conversation differently from training;
    which checkpoint answers is what /ready's version and the card's root say.
    """
    from arenaflow.models import chat_template_hash, load_tokenizer
    from arenaflow.serve.loading import ModelSpec, resolve_served_model

    name = str(cfg.serve.served_model_name)
    served = resolve_served_model(cfg, ModelSpec(name, dep.model_uri, "serve.model_uri"))
    tokenizer = load_tokenizer(served.path)  # what the server downloaded: cached, no second copy
    max_tokens = int(cfg.serve.deploy.smoke_max_tokens)
    greedy = {"model": name, "temperature": 0, "max_tokens": max_tokens}
    with httpx.Client(timeout=120, headers=_auth(cfg)) as client:
        card = _ok(client.get(f"{dep.url}/models/{name}"), "the model card").json()
        if card.get("chat_template_hash") != chat_template_hash(tokenizer):
            raise DeploymentError(
                f"the server's chat template (hash {card.get('chat_template_hash')}) is not the "
                f"checkpoint's ({chat_template_hash(tokenizer)}) for {dep.model_uri}"
            )
        rows = []
        for q in smoke_questions(cfg):
            messages = [{"role": "user", "content": q["turns"][0]}]
            what = f"smoke test question {q['question_id']}"
            chat = _ok(
                client.post(f"{dep.url}/chat/completions", json={**greedy, "messages": messages}),
                what,
            )
            prompt = tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
            plain = _ok(
                client.post(f"{dep.url}/completions", json={**greedy, "prompt": prompt}), what
            )
            http_text = chat.json()["choices"][0]["message"]["content"]
            rendered = plain.json()["choices"][0]["text"]
            rows.append(
                {
                    "question_id": q["question_id"],
                    "category": q["category"],
                    "http": http_text,
                    "rendered": rendered,
                    "match": http_text == rendered,
                }
            )
    return rows


def _ok(resp: httpx.Response, what: str) -> httpx.Response:
    if resp.status_code != 200:
        raise DeploymentError(f"{what}: HTTP {resp.status_code} {resp.text[:500]}")
    return resp


def deploy(cfg: DictConfig, model_uri: str) -> dict[str, Any]:
    """Roll to `model_uri`: start + smoke-test the new server, switch the state, stop the old one."""
    stop_s = float(cfg.serve.deploy.stop_timeout_s)
    with deploy_lock(serve_dir(cfg)):
        old = read_state(cfg)
        if old is not None and not is_serving(old):
            log.warning(
                "recorded server pid %d (%s) is not serving; replacing it", old.pid, old.url
            )
            stop_server(old, stop_s)
            old = None
        strays = stop_strays(serve_dir(cfg) / "deployments", old, stop_s)
        new = start_server(cfg, model_uri)
        try:
            smoke = smoke_test(cfg, new)
            bad = [r for r in smoke if not r["match"]]
            if bad:
                raise DeploymentError(
                    f"smoke test failed on {len(bad)}/{len(smoke)} questions: the server's greedy "
                    "chat answers differ from its completions of the chat rendered with the "
                    f"checkpoint's tokenizer (train/serve template drift?); first: question "
                    f"{bad[0]['question_id']}: chat={bad[0]['http']!r} "
                    f"rendered={bad[0]['rendered']!r}"
                )
            if not smoke:
                raise DeploymentError(
                    "smoke test ran no questions; check serve.deploy.smoke_questions"
                )
        except BaseException:
            stop_server(new, stop_s)
            raise
        write_state(cfg, new)
        if old is not None:
            stop_server(old, stop_s)
    cards = httpx.get(f"{new.url}/models", timeout=10, headers=_auth(cfg)).json()["data"]
    name = str(cfg.serve.served_model_name)
    card = next((c for c in cards if c["id"] == name), cards[0])
    return {
        **asdict(new),
        "previous": asdict(old) if old else None,
        "strays": [asdict(s) for s in strays],
        "smoke": smoke,
        "card": card,
        "models": [
            {"id": c["id"], "root": c.get("root"), "alias_of": c.get("parent")} for c in cards
        ],
    }


def _auth(cfg: DictConfig) -> dict[str, str]:
    from arenaflow.serve.security import api_keys_from_cfg

    keys = api_keys_from_cfg(cfg)
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def undeploy(cfg: DictConfig) -> Deployment | None:
    """Stop the recorded server (and any stray a killed deployment left) and forget it."""
    stop_s = float(cfg.serve.deploy.stop_timeout_s)
    with deploy_lock(serve_dir(cfg)):
        dep = read_state(cfg)
        if dep is not None:
            stop_server(dep, stop_s)
            write_state(cfg, None)
        stop_strays(serve_dir(cfg) / "deployments", None, stop_s)
    return dep


def deploy_champion(cfg: DictConfig, champion: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `serving_deployment` stage: pin the champion, roll to it, record the roll in MLflow."""
    model_uri = pin_model_uri(cfg, champion)
    tracker = tracker_from_cfg(cfg)
    with tracker.start_run("serve", cfg, tags={"model_uri": model_uri}) as run:
        result = deploy(cfg, model_uri)
        matched = sum(r["match"] for r in result["smoke"])
        run.log_metrics({"smoke_questions": len(result["smoke"]), "smoke_matched": matched})
        run.log_dict({k: v for k, v in result.items() if k != "card"}, "deployment.json")
        run.set_tags({"serving.url": result["url"], "serving.version": result["version"]})
    if model_uri.startswith("models:/") and result["version"]:
        name, _, _ = parse_models_uri(model_uri)
        tracker.set_version_tags(name, result["version"], {"serving.url": result["url"]})
    return {**result, "run_id": run.run_id, "run_url": run.url}
