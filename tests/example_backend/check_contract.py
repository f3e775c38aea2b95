"""The example backend's own tests, as its distribution would ship them.

Run by ``tests/test_plugins.py`` in a virtual environment where the
``tiered-state-example`` distribution is installed (never in the project's
own test run: the name does not match ``test_*.py``).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

import tiered_state
from tiered_state import Tier
from tiered_state.config import open_repository, registry
from tiered_state.repositories.base import StateRepository
from tiered_state.testing import RepositoryContract


def test_the_scheme_comes_from_the_entry_point() -> None:
    """Nothing registered ``example`` in this process: opening a URL finds the
    entry point, and registers it from then on. (First in the file: the
    contract's tests below open it too.)"""
    assert "example" not in registry
    with open_repository("example://") as repo:
        assert type(repo).__module__ == "tiered_state_example"
        assert repo.backend == "example"
    assert registry["example"] == "tiered_state_example:ExampleStateRepository"


def test_a_store_with_the_example_as_hot(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path, hot="example://", cold="none") as state:
        assert state.repositories[Tier.HOT].backend == "example"
        state.set("position:BTC", {"qty": 1.5})
        assert state.get("position:BTC") == {"qty": 1.5}
        assert state.get_record("position:BTC").tier is Tier.HOT  # type: ignore[union-attr]


class TestExampleContract(RepositoryContract):
    takes_no_secret = "example:// has no credentials: the store is a dict in the process"
    cannot_break_keys = "a dict under one lock: no store that could refuse one key"

    @pytest.fixture
    def repository(self) -> Iterator[StateRepository]:
        with open_repository("example://") as repo:
            yield repo

    @pytest.fixture
    def repository_url(self) -> str:
        return "example://"
