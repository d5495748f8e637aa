"""Judge test fixtures: the scripted stand-in judge server, started per test and stopped after."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from judge_standin import StandIn, start_stand_in


@pytest.fixture
def stand_in() -> Iterator[StandIn]:
    state, server, thread = start_stand_in()
    yield state
    server.should_exit = True
    thread.join(timeout=5)
