"""The one place that talks to MLflow: runs per stage, params/metrics/artifacts, and the model registry.

Stages call `tracker_from_cfg(cfg)` and use the returned tracker; `tracking=none` gives the
`NullTracker`, so no stage needs `if tracker:` branches. Secrets never reach MLflow or a log:
every param, tag and artifact goes through `arenaflow.redact`, and a tracking URI's password goes
to MLflow out of the URI.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import tempfile
import urllib.parse
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from arenaflow.config import REPO_ROOT
from arenaflow.redact import redact, redacted_yaml

log = logging.getLogger(__name__)

_MAX_PARAM_LEN = 6000


def flatten(obj: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in obj.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


def config_container(cfg: DictConfig) -> dict[str, Any]:
    """The resolved config as plain data, redacted: what MLflow params and artifacts record."""
    return redact(cfg)


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=5
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Run:
    """A handle on one MLflow run; the null tracker hands out `NullRun`, which records nothing."""

    run_id: str | None = None
    url: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None: ...
    def set_tags(self, tags: Mapping[str, Any]) -> None: ...
    def log_dict(self, obj: Any, artifact_file: str) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def log_figure(self, figure: Any, artifact_file: str) -> None: ...
    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None: ...
    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None: ...


class NullRun(Run):
    pass


@dataclass
class MlflowRun(Run):
    client: Any
    run_id: str
    url: str | None = None

    def log_params(self, params: Mapping[str, Any]) -> None:
        from mlflow.entities import Param

        items = [
            Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in flatten(redact(dict(params))).items()
        ]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        import time

        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        items = [
            Metric(k, float(v), ts, step or 0)
            for k, v in metrics.items()
            if v is not None and v == v  # skip None / NaN
        ]
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        for k, v in redact(dict(tags)).items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_dict(self, obj: Any, artifact_file: str) -> None:
        self.client.log_dict(self.run_id, redact(obj), artifact_file)

    def log_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, redact(text), artifact_file)

    def log_figure(self, figure: Any, artifact_file: str) -> None:
        self.client.log_figure(self.run_id, figure, artifact_file)

    def log_artifact(self, local_path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(local_path)
        if p.is_dir():
            self.client.log_artifacts(self.run_id, str(p), artifact_path)
        else:
            self.client.log_artifact(self.run_id, str(p), artifact_path)

    def log_table(self, rows: list[dict[str, Any]], artifact_file: str) -> None:
        import pandas as pd

        self.client.log_table(self.run_id, data=pd.DataFrame(rows), artifact_file=artifact_file)


@dataclass
class ModelVersionInfo:
    name: str
    version: str
    source: str
    run_id: str | None
    tags: dict[str, str] = field(default_factory=dict)
    aliases: list[str] = field(default_factory=list)


class Tracker:
    """Null tracker: every call succeeds and records nothing (tracking=none, or tests that do not track)."""

    enabled = False

    @contextmanager
    def start_run(
        self,
        stage: str,
        cfg: DictConfig | None = None,
        *,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
    ) -> Iterator[Run]:
        yield NullRun()

    def register_model(
        self, run: Run, local_dir: str | Path, name: str, tags: Mapping[str, Any] | None = None
    ) -> ModelVersionInfo | None:
        return None

    def get_version(self, name: str, *, alias: str | None = None, version: str | None = None):
        return None

    def latest_versions(self, name: str) -> list[ModelVersionInfo]:
        return []

    def set_alias(self, name: str, alias: str, version: str) -> None: ...

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None: ...

    def download_model(self, uri: str, dest: str | Path | None = None) -> Path:
        raise ValueError(
            f"cannot resolve {uri!r}: MLflow tracking is disabled (tracking=none); "
            "use a checkpoint folder or enable tracking=local"
        )


NullTracker = Tracker


class MlflowTracker(Tracker):
    """MLflow-backed tracker: one experiment per project, one run per stage materialization."""

    enabled = True

    def __init__(
        self,
        tracking_uri: str,
        experiment_name: str,
        artifact_location: str | None = None,
        ui_url: str | None = None,
    ) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        tracking_uri = credentials_out_of_uri(tracking_uri)
        self.tracking_uri = tracking_uri
        if tracking_uri.startswith("sqlite:///"):
            Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
        self._mlflow = mlflow
        self.ui_url = redact(ui_url.rstrip("/")) if ui_url else None  # run links land in metadata
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is None:
            location = artifact_location
            if location and "://" not in location:
                Path(location).mkdir(parents=True, exist_ok=True)
                location = Path(location).resolve().as_uri()
            exp_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self._active: list[str] = []

    def run_url(self, run_id: str) -> str | None:
        if not self.ui_url:
            return None
        return f"{self.ui_url}/#/experiments/{self.experiment_id}/runs/{run_id}"

    @contextmanager
    def start_run(
        self,
        stage: str,
        cfg: DictConfig | None = None,
        *,
        run_name: str | None = None,
        tags: Mapping[str, Any] | None = None,
        nested: bool = False,
    ) -> Iterator[Run]:
        from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME

        all_tags = {"arenaflow.stage": stage, MLFLOW_RUN_NAME: run_name or stage}
        commit = git_commit()
        if commit:
            all_tags["mlflow.source.git.commit"] = commit
        if nested and self._active:
            all_tags[MLFLOW_PARENT_RUN_ID] = self._active[-1]
        all_tags.update({k: str(v) for k, v in redact(dict(tags or {})).items()})
        created = self.client.create_run(
            self.experiment_id, tags=all_tags, run_name=run_name or stage
        )
        run = MlflowRun(self.client, created.info.run_id, self.run_url(created.info.run_id))
        self._active.append(run.run_id)
        status = "FINISHED"
        try:
            if cfg is not None:
                container = config_container(cfg)
                run.log_params(container)
                run.log_text(redacted_yaml(container), "config.yaml")
            yield run
        except BaseException:
            status = "FAILED"
            raise
        finally:
            self._active.pop()
            self.client.set_terminated(run.run_id, status=status)

    def register_model(
        self, run: Run, local_dir: str | Path, name: str, tags: Mapping[str, Any] | None = None
    ) -> ModelVersionInfo:
        """Log a checkpoint folder as the run's `model` artifact and register it as a new version."""
        from mlflow.exceptions import MlflowException

        run.log_artifact(local_dir, "model")
        with contextlib.suppress(MlflowException):  # already registered
            self.client.create_registered_model(name)
        source = f"{self.client.get_run(run.run_id).info.artifact_uri}/model"
        mv = self.client.create_model_version(
            name,
            source=source,
            run_id=run.run_id,
            tags={k: str(v) for k, v in (tags or {}).items()},
        )
        return self._info(mv)

    def _info(self, mv: Any) -> ModelVersionInfo:
        return ModelVersionInfo(
            name=mv.name,
            version=str(mv.version),
            source=mv.source,
            run_id=mv.run_id,
            tags=dict(mv.tags or {}),
            aliases=list(getattr(mv, "aliases", []) or []),
        )

    def get_version(
        self, name: str, *, alias: str | None = None, version: str | None = None
    ) -> ModelVersionInfo | None:
        from mlflow.exceptions import MlflowException

        try:
            if alias is not None:
                return self._info(self.client.get_model_version_by_alias(name, alias))
            return self._info(self.client.get_model_version(name, str(version)))
        except MlflowException:
            return None

    def latest_versions(self, name: str) -> list[ModelVersionInfo]:
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.search_model_versions(f"name='{name}'")
        except MlflowException:
            return []
        return sorted((self._info(m) for m in found), key=lambda m: int(m.version))

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, str(version))

    def set_version_tags(self, name: str, version: str, tags: Mapping[str, Any]) -> None:
        for k, v in redact(dict(tags)).items():
            self.client.set_model_version_tag(name, str(version), k, str(v))

    def require_version(self, uri: str) -> ModelVersionInfo:
        """The registry version a `models:/name/N` or `models:/name@alias` URI names now; raises
        ValueError saying which alias or version the registry lacks."""
        name, version, alias = parse_models_uri(uri)
        info = self.get_version(name, alias=alias, version=version)
        if info is None:
            what = f"alias @{alias}" if alias else f"version {version}"
            raise ValueError(
                f"the MLflow registry ({redact(self.tracking_uri)}) has no {what} of {name!r}"
            )
        return info

    def download_model(self, uri: str, dest: str | Path | None = None) -> Path:
        """Resolve `models:/name/version`, `models:/name@alias` or `runs:/<run id>/<path>` to a folder."""
        if uri.startswith("runs:/"):
            dest = Path(dest or tempfile.mkdtemp(prefix="arenaflow-model-"))
            dest.mkdir(parents=True, exist_ok=True)
            local = self._mlflow.artifacts.download_artifacts(
                artifact_uri=uri, dst_path=str(dest), tracking_uri=self.tracking_uri
            )
            return Path(local)
        info = self.require_version(uri)
        dest = Path(dest or tempfile.mkdtemp(prefix="arenaflow-model-"))
        dest.mkdir(parents=True, exist_ok=True)
        local = self._mlflow.artifacts.download_artifacts(
            artifact_uri=info.source, dst_path=str(dest), tracking_uri=self.tracking_uri
        )
        return Path(local)


def credentials_out_of_uri(uri: str) -> str:
    """`https://user:pw@host` -> `https://host`, the pair handed to MLflow the way it reads basic auth
    (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD): MLflow prints run links and raises
    errors with the URI it was given, so that URI must not hold the password."""
    parts = urllib.parse.urlsplit(uri)
    if parts.scheme not in ("http", "https") or parts.password is None:
        return uri
    os.environ["MLFLOW_TRACKING_USERNAME"] = urllib.parse.unquote(parts.username or "")
    os.environ["MLFLOW_TRACKING_PASSWORD"] = urllib.parse.unquote(parts.password)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl()


def parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """`models:/name/3` -> (name, "3", None); `models:/name@champion` -> (name, None, "champion")."""
    if not uri.startswith("models:/"):
        raise ValueError(
            f"not an MLflow model URI: {uri!r} (expected models:/name/version or models:/name@alias)"
        )
    rest = uri.removeprefix("models:/").strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        return name, version, None
    raise ValueError(f"MLflow model URI {uri!r} names no version or alias")


def tracker_from_cfg(cfg: DictConfig) -> Tracker:
    t = cfg.tracking
    if not t.enabled:
        return NullTracker()
    uri = os.environ.get("MLFLOW_TRACKING_URI") if t.tracking_uri is None else t.tracking_uri
    return MlflowTracker(uri, t.experiment_name, t.get("artifact_location"), t.get("ui_url"))
