"""The training reporter plug-in: the log by default, a named factory when the launcher sets one."""

from contextlib import contextmanager

import pytest

from arenaflow.train.reporting import REPORTER_ENV, Reporter, reporter_session

EVENTS: list[tuple[str, object]] = []


class Recording:
    def log(self, message: str) -> None:
        EVENTS.append(("log", message))

    def report(self, result: dict) -> None:
        EVENTS.append(("report", result))


@contextmanager
def recording():
    EVENTS.append(("open", None))
    yield Recording()
    EVENTS.append(("close", None))


def test_default_reporter_logs(monkeypatch, caplog) -> None:
    monkeypatch.delenv(REPORTER_ENV, raising=False)
    with caplog.at_level("INFO"), reporter_session() as reporter:
        assert type(reporter) is Reporter
        reporter.log("step 1/2")
        reporter.report({"final_loss": 1.0})
    assert "step 1/2" in caplog.text


def test_named_factory_is_used_on_rank_0_only(monkeypatch) -> None:
    monkeypatch.setenv(REPORTER_ENV, f"{__name__}:recording")
    EVENTS.clear()
    with reporter_session() as reporter:
        reporter.log("hello")
        reporter.report({"final_loss": 1.5})
    assert EVENTS == [
        ("open", None),
        ("log", "hello"),
        ("report", {"final_loss": 1.5}),
        ("close", None),
    ]
    EVENTS.clear()
    monkeypatch.setenv("RANK", "1")
    with reporter_session() as reporter:
        assert type(reporter) is Reporter
    assert EVENTS == []


def test_a_malformed_reporter_name_is_refused(monkeypatch) -> None:
    monkeypatch.setenv(REPORTER_ENV, "no_function_here")
    with (
        pytest.raises(ValueError, match="must name a factory as module:function"),
        reporter_session(),
    ):
        pass
