from __future__ import annotations

from collections.abc import Iterator

import pytest

from tiered_state.config import open_repository
from tiered_state.errors import ConfigurationError, IntegrityError
from tiered_state.repositories.memory_repository import MemoryStateRepository

from .conformance import RepositoryConformance, make


class TestMemoryConformance(RepositoryConformance):
    @pytest.fixture
    def repository(self) -> Iterator[MemoryStateRepository]:
        with MemoryStateRepository() as repo:
            yield repo


def test_lru_evicts_least_recently_used_items() -> None:
    repo = MemoryStateRepository(max_items=3)
    for key in "abc":
        repo.store(key, *make(key))
    assert repo.fetch("a") == "a"  # a is now the most recently used
    repo.store("d", *make("d"))
    assert sorted(repo.keys()) == ["a", "c", "d"]
    assert repo.stats()["evictions"] == 1


def test_lru_respects_max_bytes() -> None:
    repo = MemoryStateRepository(max_bytes=1000)
    for i in range(50):
        repo.store(f"k{i}", *make("x" * 90))
    assert repo.stats()["bytes"] <= 1000
    assert repo.fetch("k49") == "x" * 90
    assert repo.fetch("k0") is None


def test_callers_cannot_mutate_stored_state() -> None:
    repo = MemoryStateRepository()
    value = {"qty": 1}
    payload, metadata = make(value)
    repo.store("k", payload, metadata)
    value["qty"] = 2
    metadata["version"] = 99
    got = repo.fetch("k")
    got["qty"] = 3
    entry = repo.fetch_record("k")
    assert entry is not None
    entry.metadata["version"] = 42
    assert repo.fetch("k") == {"qty": 1}
    assert repo.fetch_record("k").version == 1  # type: ignore[union-attr]


def test_corrupt_payload_raises_integrity_error() -> None:
    repo = MemoryStateRepository()
    _, metadata = make({"a": 1})
    repo.store("k", '{"a":2}', metadata)
    with pytest.raises(IntegrityError):
        repo.fetch("k")


def test_from_url_options() -> None:
    repo = open_repository("memory://?max_items=5&max_bytes=100")
    assert isinstance(repo, MemoryStateRepository)
    assert (repo.max_items, repo.max_bytes) == (5, 100)
    with pytest.raises(ConfigurationError):
        open_repository("memory://?max_items=-1")
    with pytest.raises(ConfigurationError):
        open_repository("memory://?bogus=1")
