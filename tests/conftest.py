from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from .support import server_url


@pytest.fixture(autouse=True)
def _isolated_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Tests never see the developer's TIERED_STATE_* configuration or ./.tiered_state."""
    for name in list(os.environ):
        if name.startswith("TIERED_STATE_") and not name.startswith("TIERED_STATE_TEST_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    yield


@pytest.fixture(scope="session")
def redis_url() -> str:
    """Base URL of the real Redis (TIERED_STATE_TEST_REDIS_URL)."""
    return server_url("redis")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    """URL of the real PostgreSQL (TIERED_STATE_TEST_POSTGRES_URL)."""
    return server_url("postgres")


@pytest.fixture(scope="session")
def python() -> str:
    return sys.executable


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    """Under TIERED_STATE_TEST_REQUIRE_ALL=1 (set by .ci/run) a skip is a failure."""
    outcome = yield
    report = outcome.get_result()
    if report.skipped and os.environ.get("TIERED_STATE_TEST_REQUIRE_ALL") == "1":
        if not hasattr(report, "wasxfail"):
            report.outcome = "failed"
            report.longrepr = f"skipped, but CI requires every test to run: {report.longrepr}"
