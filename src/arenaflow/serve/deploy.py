"""Blue/green deployment of the serving app as a detached uvicorn process, with a smoke test.

A deployment starts the new server next to the old one on a free port, waits for `/ready`, and
compares its greedy HTTP answers on a few MT-bench questions with the engine's greedy answers for
the same checkpoint (catching train/serve template drift). Only then does the recorded endpoint
switch and the old server stop; a new server that fails leaves the old one serving. The current
deployment lives in `<paths.home>/serve/deployment.json`, so the next materialization finds it.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
from omegaconf import DictConfig, OmegaConf

from arenaflow.tracking import config_container, parse_models_uri, tracker_from_cfg

log = logging.getLogger(__name__)


class DeploymentError(RuntimeError):
    """The new server could not be started or failed its smoke test (the old one keeps serving)."""


@dataclass
class Deployment:
    """One running server process, as recorded in the state file."""

    url: str  # OpenAI base URL, http://host:port/v1
    pid: int
    port: int
    model_uri: str
    version: str | None
    started_at: float
    config_path: str
    log_path: str

    @property
    def base(self) -> str:
        return self.url.removesuffix("/v1")


def state_path(cfg: DictConfig) -> Path:
    return Path(cfg.paths.home) / "serve" / "deployment.json"


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
    path.parent.mkdir(parents=True, exist_ok=True)
    if deployment is None:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(deployment), indent=2))
    tmp.replace(path)  # atomic: a reader never sees half a state
    with (path.parent / "history.jsonl").open("a") as f:
        f.write(json.dumps({**asdict(deployment), "recorded_at": time.time()}) + "\n")


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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


def _alive(pid: int) -> bool:
    try:
        done, _ = os.waitpid(pid, os.WNOHANG)  # reap it when it is our own child
        if done == pid:
            return False
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_ours(dep: Deployment) -> bool:
    """Guard against pid reuse: the process must still be this deployment's launcher."""
    try:
        cmdline = Path(f"/proc/{dep.pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return _alive(dep.pid)
    return dep.config_path in cmdline


def is_serving(dep: Deployment) -> bool:
    if not (_alive(dep.pid) and _is_ours(dep)):
        return False
    try:
        return httpx.get(f"{dep.base}/ready", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def stop_server(dep: Deployment, timeout_s: float = 20.0) -> None:
    """SIGTERM the server's process group (uvicorn drains), SIGKILL after `timeout_s`."""
    if not _alive(dep.pid) or not _is_ours(dep):
        return
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(dep.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if not _alive(dep.pid):
                log.info("stopped server pid %d (%s)", dep.pid, dep.url)
                return
            time.sleep(0.1)
    log.warning("server pid %d did not stop", dep.pid)


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
    models = [{"name": s.name, "uri": s.uri} for s in ordered]
    return {"models": models, "models_from": None, "aliases": aliases}


def start_server(cfg: DictConfig, model_uri: str) -> Deployment:
    """Launch `python -m arenaflow.serve.launch <config>` detached and wait until it is ready."""
    from arenaflow.serve.app import api_keys_from_cfg

    d = cfg.serve.deploy
    host = str(d.host)
    port = int(d.port) if d.port else free_port(host)
    run_dir = (
        Path(cfg.paths.home) / "serve" / "deployments" / f"{time.strftime('%Y%m%d-%H%M%S')}-{port}"
    )
    run_dir.mkdir(parents=True, exist_ok=True)
    container = OmegaConf.to_container(cfg, resolve=True)
    assert isinstance(container, dict)
    container["serve"].update({"model_uri": model_uri, "host": host, "port": port, "api_keys": []})
    container["serve"].update(served_set(cfg, model_uri))
    config_path = run_dir / "config.yaml"
    # secrets stay out of the file: keys reach the server through its environment
    config_path.write_text(
        OmegaConf.to_yaml(OmegaConf.create(config_container(OmegaConf.create(container))))
    )
    env = dict(os.environ)
    keys = api_keys_from_cfg(cfg)
    if keys:
        env[str(cfg.serve.api_keys_env or "ARENAFLOW_API_KEYS")] = ",".join(keys)
    log_path = run_dir / "server.log"
    with log_path.open("ab") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "arenaflow.serve.launch", str(config_path)],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # detached: outlives the Dagster run that started it
        )
    dep = Deployment(
        url=f"http://{host}:{port}/v1",
        pid=proc.pid,
        port=port,
        model_uri=model_uri,
        version=None,
        started_at=time.time(),
        config_path=str(config_path),
        log_path=str(log_path),
    )
    log.info("started server pid %d on %s for %s; waiting for /ready", proc.pid, dep.url, model_uri)
    deadline = time.time() + float(d.ready_timeout_s)
    while True:
        if proc.poll() is not None:
            raise DeploymentError(
                f"the new server for {model_uri} exited with code {proc.returncode} before it was "
                f"ready; its log ({log_path}) ends with:\n{_log_tail(str(log_path))}"
            )
        try:
            resp = httpx.get(f"{dep.base}/ready", timeout=2)
            if resp.status_code == 200:
                dep.version = resp.json().get("version")
                return dep
        except httpx.HTTPError:
            pass
        if time.time() > deadline:
            stop_server(dep, float(d.stop_timeout_s))
            raise DeploymentError(
                f"the new server for {model_uri} was not ready after {d.ready_timeout_s} s "
                f"(serve.deploy.ready_timeout_s); log: {log_path}"
            )
        time.sleep(0.25)


def smoke_questions(cfg: DictConfig) -> list[dict[str, Any]]:
    from arenaflow.evaluate.questions import load_questions, question_source, select_questions

    questions, _ = load_questions(question_source(cfg))
    chosen = select_questions(questions, cfg.eval.get("question_ids"))
    return chosen[: int(cfg.serve.deploy.smoke_questions)]


def smoke_test(cfg: DictConfig, dep: Deployment) -> list[dict[str, Any]]:
    """Greedy answers over HTTP vs. the engine's own greedy answers for the same checkpoint."""
    from arenaflow.engine import SamplingParams
    from arenaflow.serve.loading import load_engine, resolve_served_model

    served_cfg = OmegaConf.load(dep.config_path)
    assert isinstance(served_cfg, DictConfig)
    engine = load_engine(served_cfg, resolve_served_model(served_cfg))
    max_tokens = int(cfg.serve.deploy.smoke_max_tokens)
    rows = []
    with httpx.Client(timeout=120, headers=_auth(cfg)) as client:
        for q in smoke_questions(cfg):
            messages = [{"role": "user", "content": q["turns"][0]}]
            resp = client.post(
                f"{dep.url}/chat/completions",
                json={
                    "model": str(cfg.serve.served_model_name),
                    "messages": messages,
                    "temperature": 0,
                    "max_tokens": max_tokens,
                },
            )
            if resp.status_code != 200:
                raise DeploymentError(
                    f"smoke test question {q['question_id']}: HTTP {resp.status_code} {resp.text[:500]}"
                )
            http_text = resp.json()["choices"][0]["message"]["content"]
            engine_text = engine.chat([messages], SamplingParams(max_new_tokens=max_tokens))[0]
            expected = engine_text.choices[0].text
            rows.append(
                {
                    "question_id": q["question_id"],
                    "category": q["category"],
                    "http": http_text,
                    "engine": expected,
                    "match": http_text == expected,
                }
            )
    return rows


def deploy(cfg: DictConfig, model_uri: str) -> dict[str, Any]:
    """Roll to `model_uri`: start + smoke-test the new server, switch the state, stop the old one."""
    old = read_state(cfg)
    if old is not None and not is_serving(old):
        log.warning("recorded server pid %d (%s) is not serving; replacing it", old.pid, old.url)
        stop_server(old, float(cfg.serve.deploy.stop_timeout_s))
        old = None
    new = start_server(cfg, model_uri)
    try:
        smoke = smoke_test(cfg, new)
        bad = [r for r in smoke if not r["match"]]
        if bad:
            raise DeploymentError(
                f"smoke test failed on {len(bad)}/{len(smoke)} questions: the server's greedy "
                f"answers differ from the engine's (train/serve template drift?); first: "
                f"question {bad[0]['question_id']}: http={bad[0]['http']!r} engine={bad[0]['engine']!r}"
            )
        if not smoke:
            raise DeploymentError("smoke test ran no questions; check serve.deploy.smoke_questions")
    except BaseException:
        stop_server(new, float(cfg.serve.deploy.stop_timeout_s))
        raise
    write_state(cfg, new)
    if old is not None:
        stop_server(old, float(cfg.serve.deploy.stop_timeout_s))
    cards = httpx.get(f"{new.url}/models", timeout=10, headers=_auth(cfg)).json()["data"]
    name = str(cfg.serve.served_model_name)
    card = next((c for c in cards if c["id"] == name), cards[0])
    return {
        **asdict(new),
        "previous": asdict(old) if old else None,
        "smoke": smoke,
        "card": card,
        "models": [
            {"id": c["id"], "root": c.get("root"), "alias_of": c.get("parent")} for c in cards
        ],
    }


def _auth(cfg: DictConfig) -> dict[str, str]:
    from arenaflow.serve.app import api_keys_from_cfg

    keys = api_keys_from_cfg(cfg)
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def undeploy(cfg: DictConfig) -> Deployment | None:
    """Stop the recorded server and forget it."""
    dep = read_state(cfg)
    if dep is not None:
        stop_server(dep, float(cfg.serve.deploy.stop_timeout_s))
        write_state(cfg, None)
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
