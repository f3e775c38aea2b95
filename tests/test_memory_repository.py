from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tiered_state.config import open_repository
from tiered_state.errors import ConfigurationError, IntegrityError
from tiered_state.record import Metadata, make_stub, make_tombstone
from tiered_state.repositories.memory_repository import MemoryStateRepository
from tiered_state.testing import RepositoryContract, make


class TestMemoryConformance(RepositoryContract):
    takes_no_secret = "memory:// has no credentials: the store is this process's own"
    cannot_break_keys = "a dict under one lock: no store that could refuse one key"

    @pytest.fixture
    def repository(self) -> Iterator[MemoryStateRepository]:
        with MemoryStateRepository() as repo:
            yield repo

    @pytest.fixture
    def repository_url(self) -> str:
        return "memory://"

    def test_tombstone_vanishes_at_once(self, repository: MemoryStateRepository) -> None:
        repository.store("t", *make("t", 2))
        repository.store_if_version("t", "", make_tombstone(9, now=time.time()), expected=2)
        assert repository.fetch_record("t") is None  # volatile: expired entries are gone


def hot_copy(value: Any, version: int = 1, hot_for: float = 60.0) -> tuple[str, Metadata]:
    """A copy as the manager puts it in HOT: a value with ``hot_until``."""
    payload, metadata = make(value, version)
    metadata["hot_until"] = time.time() + hot_for  # type: ignore[typeddict-unknown-key]
    return payload, metadata


def placeholder(version: int) -> tuple[str, Metadata]:
    """What the manager leaves in HOT while it writes: a stub with an empty payload."""
    return make_stub(hot_copy("pending", version)[1])


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


# ---------------------------------------------------------------- entry kinds in HOT
def test_placeholder_is_live_but_fetch_says_ask_elsewhere() -> None:
    repo = MemoryStateRepository()
    assert repo.store_if_newer("k", *placeholder(5)) is True
    entry = repo.fetch_record("k")
    assert entry is not None and entry.kind == "stub" and entry.payload == ""
    assert repo.fetch("k") is None
    assert repo.keys() == ["k"] and repo.stats()["key_count"] == 1
    assert set(repo.fetch_many(["k", "absent"])) == {"k"}
    # An older copy read from the catalog cannot replace the placeholder ...
    assert repo.store_if_newer("k", *hot_copy("old", 4)) is False
    assert repo.store_many_if_newer({"k": hot_copy("old", 5)}) == set()
    # ... the write's own version can.
    assert repo.store_many_if_newer({"k": hot_copy("new", 6)}) == {"k"}
    assert repo.fetch("k") == "new"


def test_stub_is_charged_for_its_payload_not_its_value() -> None:
    repo = MemoryStateRepository(max_bytes=100)
    _, metadata = make("x" * 10_000, 3)
    repo.store("k", *make_stub(metadata))
    assert repo.stats()["bytes"] == len("k")
    assert repo.fetch_record("k") is not None  # not evicted for a size it does not hold


def test_tombstone_vanishes_at_once_and_takes_no_lru_slot() -> None:
    repo = MemoryStateRepository(max_items=1)
    repo.store("live", *make("v", 1))
    assert repo.store("dead", "", make_tombstone(2, now=time.time())) is True
    assert len(repo) == 1 and repo.fetch("live") == "v"
    assert repo.stats()["evictions"] == 0


def test_expired_copy_has_no_stored_version() -> None:
    # hot_until ended the copy's life in HOT: it is gone, not a version to beat.
    repo = MemoryStateRepository()
    assert repo.store("gone", *hot_copy("old", 9, hot_for=-1)) is True
    assert len(repo) == 0  # already expired: nothing was kept
    repo.store_many({k: hot_copy("old", 9, hot_for=0.05) for k in ("k", "e", "d")})
    time.sleep(0.1)  # expired while stored
    assert repo.store_if_newer("k", *hot_copy("new", 2)) is True
    assert repo.store_if_version("e", *hot_copy("new", 3), expected=0) is True
    assert repo.delete_if_version("d", 9) is False
    assert sorted(repo.keys()) == ["e", "k"] and repo.stats()["key_count"] == 2


def test_hot_until_limits_listing_and_counts() -> None:
    repo = MemoryStateRepository()
    repo.store("short", *hot_copy("s", hot_for=0.05))
    repo.store("long", *hot_copy("l"))
    repo.store("plain", *make("p"))
    assert sorted(repo.keys()) == ["long", "plain", "short"]
    time.sleep(0.1)
    assert sorted(repo.keys()) == ["long", "plain"]
    assert sorted(repo.iter_keys("*")) == ["long", "plain"]
    assert repo.keys("short") == [] and repo.stats()["key_count"] == 2


def test_sweep_scan_frees_expired_entries_nobody_reads() -> None:
    repo = MemoryStateRepository()
    now = time.time()
    repo.store_many({f"x{i}": hot_copy(i, hot_for=0.05) for i in range(10)})
    repo.store("idle", *make("i", now=now - 100))
    time.sleep(0.1)
    assert len(repo) == 11  # expired, but nothing touched them yet
    assert set(repo.iter_all_keys()) == {f"x{i}" for i in range(10)} | {"idle"}
    seen = [e.key for batch in repo.scan(batch_size=4, idle_before=now - 50) for e in batch]
    assert seen == ["idle"]
    assert len(repo) == 1


def test_same_version_replace_and_no_downgrade() -> None:
    repo = MemoryStateRepository()
    payload, metadata = make({"x": 1}, 9)
    repo.store("k", payload, metadata)
    assert repo.store_many_if_version({"k": make_stub(metadata, "there")}, {"k": 9}) == {"k"}
    assert repo.fetch_record("k").kind == "stub"  # type: ignore[union-attr]
    assert repo.store_many_if_version({"k": make("older", 8)}, {"k": 9}) == set()
    assert repo.store_many_if_version({"k": (payload, metadata)}, {"k": 9}) == {"k"}
    assert repo.fetch("k") == {"x": 1}


def test_store_many_if_version_needs_every_expected_version_first() -> None:
    repo = MemoryStateRepository()
    with pytest.raises(KeyError):
        repo.store_many_if_version({"a": make(1, 1), "b": make(2, 1)}, {"a": 0})
    assert repo.keys() == []  # nothing written: the missing one was found first


def test_versions_are_exact_ints() -> None:
    repo = MemoryStateRepository()
    base = 1 << 60
    assert repo.store_many_if_newer({"k": make("a", base + 1)}) == {"k"}
    assert repo.store_many_if_newer({"k": make("b", base)}) == set()
    assert repo.store_many_if_version({"k": make("c", base + 2)}, {"k": base}) == set()
    assert repo.delete_many_if_version({"k": base + 2}) == set()
    assert repo.delete_many_if_version({"k": base + 1}) == {"k"}


def test_batch_conditionals_are_atomic_per_key_across_threads() -> None:
    repo = MemoryStateRepository()
    keys = [f"k{i}" for i in range(50)]
    repo.store_many({k: make(0, 1) for k in keys})
    wins: dict[str, list[int]] = {k: [] for k in keys}
    lock = threading.Lock()

    def work(t: int) -> None:
        for _ in range(40):
            seen = repo.fetch_many(keys)
            expected = {k: e.version for k, e in seen.items()}
            stored = repo.store_many_if_version(
                {k: make(t, v + 1) for k, v in expected.items()}, expected)
            with lock:
                for k in stored:
                    wins[k].append(expected[k] + 1)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for key in keys:  # every version was won exactly once: no lost update
        assert sorted(wins[key]) == list(range(2, repo.fetch_record(key).version + 1))  # type: ignore[union-attr]
