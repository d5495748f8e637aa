"""Secrets never reach a log or a written file: planted keys and URL credentials are grepped for in
every output (logs, the MLflow store and its artifacts, the Dagster event log, launch's config)."""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import dagster as dg
import pytest

from arenaflow.redact import redact, redact_overrides
from arenaflow.tracking import MlflowTracker, tracker_from_cfg

# one planted secret per way a secret travels: a key named like a secret, a URL's password, a
# secret query parameter
PLANTED = {
    "serve.api_keys=[sk-planted-key]": "sk-planted-key",
    "serve.arena.db_url=postgresql://arena:planted-db-pw@db.example/votes": "planted-db-pw",
    "tracking.ui_url=https://ui:planted-ui-pw@mlflow.example": "planted-ui-pw",
    "+judge.extra_url='https://judge.example/v1?api_key=planted-query-key'": "planted-query-key",
}
SOURCE_USER, SOURCE_PW, SOURCE_TOKEN = "reader", "planted-source-pw", "planted-source-token"
TRACKING_USER, TRACKING_PW = "tracker", "planted-tracking-pw"
SECRETS = [*PLANTED.values(), SOURCE_PW, SOURCE_TOKEN, TRACKING_PW]


def leaks_in(root: Path, shown: str = "arena:***@db.example") -> list[str]:
    """Every file under `root` that holds a planted secret (SQLite stores and artifacts included);
    `shown`, the redacted form, must be found somewhere, so the grep is known to reach the records."""
    found, seen = [], False
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        data = path.read_bytes()
        seen = seen or shown.encode() in data
        found += [f"{path.relative_to(root)}: {s}" for s in SECRETS if s.encode() in data]
    assert seen, f"{shown!r} is nowhere under {root}: the grep missed the records"
    return found


def leaks_in_text(text: str) -> list[str]:
    return [s for s in SECRETS if s in text]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("postgresql://user:pw@host/db", "postgresql://user:***@host/db"),
        ("https://user:tok/en@mlflow.example/x", "https://user:***@mlflow.example/x"),
        ("redis://:pw@cache:6379/0", "redis://:***@cache:6379/0"),
        ("https://h/x.json?token=abc&limit=3", "https://h/x.json?token=***&limit=3"),
        ("https://h/v1?api_key=abc#top", "https://h/v1?api_key=***#top"),
        (
            "s3://b/k?X-Amz-Signature=abc&X-Amz-Credential=d",
            "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***",
        ),
        ("use +serve.api_keys=[sk-a,sk-b] here", "use +serve.api_keys=*** here"),
        # no credentials: left as they are
        ("sqlite:///home/votes.db", "sqlite:///home/votes.db"),
        ("http://127.0.0.1:5000/#/experiments/1", "http://127.0.0.1:5000/#/experiments/1"),
        ("models:/arenaflow-chat@champion", "models:/arenaflow-chat@champion"),
        ("https://h/q?page=2&sort=name", "https://h/q?page=2&sort=name"),
    ],
)
def test_redact_hides_url_credentials_and_secret_parameters(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_redact_walks_configs_and_overrides(make_cfg) -> None:
    cfg = make_cfg(*PLANTED)
    shown = redact(cfg)
    assert not leaks_in_text(str(shown))
    assert shown["serve"]["api_keys"] == "***"
    assert shown["serve"]["arena"]["db_url"] == "postgresql://arena:***@db.example/votes"
    assert shown["serve"]["api_keys_env"] == cfg.serve.api_keys_env  # a variable's name
    assert cfg.serve.api_keys == ["sk-planted-key"]  # the live config keeps what the process needs
    # a command line too (finetuned_model logs `python -m arenaflow.train <overrides>`)
    assert redact_overrides(
        [
            "-m",
            *PLANTED,
            "serve={api_keys:[sk-planted-key]}",
            "experiment=test",
            "serve.api_keys=[]",
        ]
    ) == [
        "-m",
        "serve.api_keys=***",
        "serve.arena.db_url=postgresql://arena:***@db.example/votes",
        "tracking.ui_url=https://ui:***@mlflow.example",
        "+judge.extra_url='https://judge.example/v1?api_key=***'",
        'serve={"api_keys": "***"}',
        "experiment=test",
        "serve.api_keys=[]",
    ]


def test_mlflow_store_and_artifacts_hold_no_secret(make_cfg, af_home, caplog) -> None:
    cfg = make_cfg(*PLANTED)
    tracker = tracker_from_cfg(cfg)
    caplog.set_level(logging.DEBUG)
    with tracker.start_run("data", cfg, tags={"source": cfg.serve.arena.db_url}) as run:
        run.log_dict({"db": cfg.serve.arena.db_url, "judge": cfg.judge.extra_url}, "result.json")
        run.log_params({"vote_db": cfg.serve.arena.db_url})
    assert run.url and run.url.startswith("https://ui:***@mlflow.example/")
    assert (af_home / "mlflow.db").is_file() and any(af_home.rglob("result.json"))
    assert leaks_in(af_home) == []
    assert leaks_in_text(caplog.text) == []


MLFLOW_ENV = (
    "MLFLOW_TRACKING_URI",
    "MLFLOW_REGISTRY_URI",
    "MLFLOW_TRACKING_USERNAME",
    "MLFLOW_TRACKING_PASSWORD",
)


@pytest.fixture
def mlflow_server(tmp_path, monkeypatch) -> Iterator[tuple[str, list[str | None]]]:
    """A real MLflow tracking server (its Flask app) on a loopback port that wants basic auth."""
    root = tmp_path / "server"
    monkeypatch.setenv("_MLFLOW_SERVER_FILE_STORE", f"sqlite:///{root}/mlflow.db")
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_ROOT", "mlflow-artifacts:/")
    monkeypatch.setenv("_MLFLOW_SERVER_SERVE_ARTIFACTS", "true")
    monkeypatch.setenv("_MLFLOW_SERVER_ARTIFACT_DESTINATION", str(root / "artifacts"))
    root.mkdir()
    from mlflow.server import app, handlers
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils
    from werkzeug.serving import make_server

    # the server's handlers cache their stores and set this process's default URIs: keep it local
    for module, name in [
        (handlers, "_tracking_store"),
        (handlers, "_model_registry_store"),
        (tracking_utils, "_tracking_uri"),
        (registry_utils, "_registry_uri"),
    ]:
        monkeypatch.setattr(module, name, None, raising=False)
    saved = {v: os.environ.get(v) for v in MLFLOW_ENV}
    auth = "Basic " + base64.b64encode(f"{TRACKING_USER}:{TRACKING_PW}".encode()).decode()
    seen: list[str | None] = []

    def guarded(environ, start_response):
        seen.append(environ.get("HTTP_AUTHORIZATION"))
        if environ.get("HTTP_AUTHORIZATION") != auth:
            start_response("401 Unauthorized", [("Content-Length", "0")])
            return [b""]
        return app(environ, start_response)

    server = make_server("127.0.0.1", 0, guarded, threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://{TRACKING_USER}:{TRACKING_PW}@127.0.0.1:{server.server_port}", seen
    server.shutdown()
    for var, value in saved.items():
        if value is None:
            os.environ.pop(var, None)
        else:
            os.environ[var] = value


def test_tracking_server_credentials_are_used_but_never_shown(
    mlflow_server, tmp_path, monkeypatch, capfd, caplog
) -> None:
    """MLflow prints run links and raises with the URI it holds: that URI must carry no password."""
    from mlflow.exceptions import MlflowException

    uri, seen = mlflow_server
    caplog.set_level(logging.INFO)
    tracker = MlflowTracker(uri, "arenaflow")
    with tracker.start_run("data", tags={"tracking": uri}) as run:
        run.log_metrics({"loss": 1.0})
        run.log_dict({"tracking": uri}, "result.json")
    assert tracker.client.get_run(run.run_id).info.status == "FINISHED"
    assert seen and all(seen)  # every request carried the credentials (else the server says 401)

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    with pytest.raises(MlflowException, match=f"127.0.0.1:{closed}") as err:
        MlflowTracker(f"http://{TRACKING_USER}:{TRACKING_PW}@127.0.0.1:{closed}", "arenaflow")
    assert TRACKING_PW not in str(err.value)
    out = capfd.readouterr()
    assert leaks_in_text(out.out + out.err + caplog.text) == []
    assert leaks_in(tmp_path / "server", shown=f"{TRACKING_USER}:***@") == []


def test_launch_writes_a_redacted_config_and_hands_ranks_the_live_one(
    make_cfg, tmp_path, monkeypatch
) -> None:
    from arenaflow.train.launch import CONFIG_ENV, rank_config, stage_rank_config

    cfg = make_cfg(*PLANTED)
    path, env = stage_rank_config(cfg, tmp_path / "run")
    assert path.read_text().count("***") >= 4
    assert leaks_in(tmp_path) == []
    monkeypatch.setenv(CONFIG_ENV, env[CONFIG_ENV])
    live = rank_config(path)
    assert live.serve.api_keys == ["sk-planted-key"]
    assert live.serve.arena.db_url == cfg.serve.arena.db_url
    assert CONFIG_ENV not in os.environ  # a rank's own children do not inherit it
    assert rank_config(path).serve.api_keys == "***"  # a rank started by hand reads the file


@pytest.fixture
def private_source() -> Iterator[str]:
    """ShareGPT records behind basic auth and a token, on a loopback HTTP server: a data.source
    whose secrets the run must use (it reads the records) and must not show."""
    records = [
        {
            "id": f"r{i}",
            "conversations": [
                {"from": "human", "value": f"question {i} " * 4},
                {"from": "gpt", "value": f"answer {i} " * 4},
            ],
        }
        for i in range(5)
    ]
    body = json.dumps(records).encode()
    auth = "Basic " + base64.b64encode(f"{SOURCE_USER}:{SOURCE_PW}".encode()).decode()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            ok = self.headers.get("Authorization") == auth and f"token={SOURCE_TOKEN}" in self.path
            self.send_response(200 if ok else 401)
            self.send_header("Content-Length", str(len(body) if ok else 0))
            self.end_headers()
            if ok and self.command == "GET":
                self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, *args: object) -> None: ...

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address[:2]
    yield f"http://{SOURCE_USER}:{SOURCE_PW}@{host}:{port}/raw.json?token={SOURCE_TOKEN}"
    server.shutdown()


def test_dagster_event_log_and_metadata_hold_no_secret(
    tmp_path, af_home, model_cache, monkeypatch, caplog, private_source
) -> None:
    """A real materialization through the `make run` driver with secrets in its overrides."""
    from pipelines import run as driver
    from pipelines.assets.data import sharegpt_raw
    from pipelines.resources import HydraConfigResource

    monkeypatch.setattr(
        driver,
        "build_definitions",
        lambda: dg.Definitions(assets=[sharegpt_raw], resources={"hydra": HydraConfigResource()}),
    )
    overrides = [
        "experiment=test",
        f"paths.home={af_home}",
        f"paths.cache_dir={model_cache}",
        "data.limit=5",
        "tracking=none",  # the MLflow store is grepped above; this keeps the test to seconds
        f"data.source='{private_source}'",
        *PLANTED,
    ]
    dagster_home = tmp_path / "dagster_home"
    dagster_home.mkdir()
    caplog.set_level(logging.INFO)  # what a run logs; fsspec's DEBUG lines name the URL as given
    with dg.instance_for_test(temp_dir=str(dagster_home)) as instance:
        driver.materialize_all(overrides, instance)
        (run,) = instance.get_runs()
        events = instance.all_logs(run.run_id)
        assert any(e.is_dagster_event and e.dagster_event.is_step_materialization for e in events)
        value = driver.build_definitions().load_asset_value("sharegpt_raw", instance=instance)
        assert value["count"] == 5  # the live config kept the source's credentials
        meta = instance.get_latest_materialization_event(dg.AssetKey("sharegpt_raw"))
        shown = meta.asset_materialization.metadata["hydra_overrides"].value
        assert "serve.arena.db_url=postgresql://arena:***@db.example/votes" in shown
        assert leaks_in_text(" ".join(str(e) for e in events)) == []
        assert leaks_in_text(str(run.tags)) == []
    assert leaks_in(dagster_home) == []  # event log, run storage, captured compute logs
    assert leaks_in_text(caplog.text) == []
