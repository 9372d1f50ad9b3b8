"""Test classes: `slow` tests start real processes (downstairs, crucible-nbd,
NBD clients); the rest, unit and simulation tests, run in seconds
(`scripts/test --quick` runs only those). A test not marked slow that starts
a process fails, so the quick set stays quick. Process-level tests draw
their random choices from `rng`, whose seed is printed when one fails and
can be set with CRUCIBLE_TEST_SEED to replay it. Property tests explore new
examples on every run; a failure prints the `@reproduce_failure` line that
replays it."""

from __future__ import annotations

import os
import random
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import settings

settings.register_profile("crucible", print_blob=True)
settings.load_profile("crucible")

SEED_ENV = "CRUCIBLE_TEST_SEED"


@pytest.fixture(autouse=True)
def _quick_tests_start_no_process(
    request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError(f"{request.node.nodeid} starts a process: mark it slow")

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> Iterator[random.Random]:
    """A seeded random source; the seed is reported with a failure."""
    seed = int(os.environ.get(SEED_ENV) or random.randrange(1 << 32))
    request.node.user_properties.append(("seed", seed))
    yield random.Random(seed)


def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> None:
    if call.excinfo is None:
        return
    for name, value in item.user_properties:
        if name == "seed":
            item.add_report_section(
                call.when, "seed", f"random seed {value}: replay with {SEED_ENV}={value}"
            )
