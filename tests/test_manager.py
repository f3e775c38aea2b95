"""The StateManager's semantics, on the real embedded tiers: read-through,
write-through, promotion, demotion, batches, TTL and integrity.

Each test names the promise it holds. Server-backed variants of the same
promises live in the backends' fault tests.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import (
    BackendUnavailableError,
    BatchError,
    ConfigurationError,
    ConflictError,
    IntegrityError,
    InvalidKeyError,
    LocalCache,
    Record,
    SerializationError,
    StateManager,
    SweepReport,
    Tier,
    TieringPolicy,
    codec,
)
from tiered_state.catalog import RESERVED_PREFIX, Catalog, payload_name
from tiered_state.metrics import InMemoryMetrics
from tiered_state.record import Metadata, make_metadata
from tiered_state.repositories.base import StateRepository
from tiered_state.repositories.memory_repository import MemoryStateRepository
from tiered_state.testing import make

HOT, WARM, COLD = Tier.HOT, Tier.WARM, Tier.COLD


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateManager]:
    with tiered_state.open(tmp_path / "store") as manager:
        yield manager


def copies(state: StateManager, key: str) -> dict[str, Any]:
    """key's value in each tier that holds a valid copy of its current version.

    HOT: a value copy. The catalog (WARM): the entry, if it holds the value.
    COLD: the payload of the current version, referenced by a stub or kept
    from an earlier move (a promote copies up; the lower copy stays).
    """
    out: dict[str, Any] = {}
    repos = state.repositories
    catalog = repos[state.catalog_tier]
    entry = catalog.fetch_record(key)
    if entry is None or not entry.live():
        return out
    hot = repos.get(HOT)
    if hot is not None and hot is not catalog:
        copy = hot.fetch_record(key)
        if copy is not None and copy.live() and copy.kind == "value":
            assert copy.version == entry.version, "HOT holds another version than the catalog"
            out["hot"] = codec.decode(copy.payload)
    if entry.kind == "value":
        out[state.catalog_tier.value] = codec.decode(entry.payload)
    cold = repos.get(COLD)
    if cold is not None and cold is not catalog:
        payload = cold.fetch_record(payload_name(key, entry.version))
        span = Catalog.located_span(entry) if entry.kind == "stub" else None
        if span is not None:  # a batch moved down lies in a segment
            payload = Catalog(COLD, cold, (COLD, cold)).fetch_frames({key: span}).get(key)
        if payload is not None and payload.valid():
            out["cold"] = codec.decode(payload.payload)
    return out


def corrupt(repo: StateRepository, key: str, value: Any) -> None:
    """Overwrite key's payload in repo, keeping the old metadata (so the checksum fails)."""
    entry = repo.fetch_record(key)
    assert entry is not None
    repo.store(key, codec.encode(value), entry.metadata)


# ---------------------------------------------------------------- open()
def test_open_defaults_to_embedded_tiers_under_dot_folder(tmp_path: Path) -> None:
    with tiered_state.open() as state:  # cwd is tmp_path (conftest)
        backends = {t: r.backend for t, r in state.repositories.items()}
        assert backends == {HOT: "memory", WARM: "sqlite", COLD: "filesystem"}
        state.set("k", 1)
    assert (tmp_path / ".tiered_state" / "warm.db").exists()
    assert stat.S_IMODE((tmp_path / ".tiered_state").stat().st_mode) == 0o700


def test_open_path_env_and_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TIERED_STATE_PATH", str(tmp_path / "envpath"))
    monkeypatch.setenv("TIERED_STATE_COLD", "none")
    with tiered_state.open() as state:
        assert set(state.repositories) == {HOT, WARM}
        state.set("k", 1)
    assert (tmp_path / "envpath" / "warm.db").exists()
    # An explicit argument beats the environment; a path and URLs combine.
    with tiered_state.open(tmp_path / "p", hot="none", cold="none") as state:
        assert set(state.repositories) == {WARM}
        assert state.set("k", 2, tier="hot") > 0  # HOT is off: the next tier down takes it
        assert state.get("k") == 2
    assert (tmp_path / "p" / "warm.db").exists()


def test_open_rejects_bad_configuration(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError):
        tiered_state.open(tmp_path, hot="nosuch://x")
    with pytest.raises(ConfigurationError):
        tiered_state.open(tmp_path, hot="none", warm="none", cold="none")
    with pytest.raises(ConfigurationError):
        TieringPolicy(hot_ttl=-1)
    with pytest.raises(ConfigurationError):
        TieringPolicy(promote_to="cold")


def test_import_loads_no_driver_and_missing_driver_names_extra() -> None:
    code = (
        "import sys, tiered_state\n"
        "drivers = {'redis', 'psycopg2', 'boto3', 'botocore', 'statsd'}\n"
        "assert not drivers & {m.split('.')[0] for m in sys.modules}, sys.modules.keys()\n"
        "sys.modules['redis'] = None\n"
        "try:\n"
        "    tiered_state.open(hot='redis://127.0.0.1:1/0', warm='none', cold='memory://')\n"
        "except tiered_state.MissingDependencyError as exc:\n"
        "    assert \"pip install 'tiered-state[redis]'\" in str(exc), exc\n"
        "    assert isinstance(exc, ImportError)\n"
        "else:\n"
        "    raise SystemExit('no MissingDependencyError')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_public_names() -> None:
    assert tiered_state.__all__ == sorted(tiered_state.__all__)
    for name in ("open", "StateManager", "Tier", "Record", "TieringPolicy", "SweepReport"):
        assert name in tiered_state.__all__
    from tiered_state import errors

    for name in errors.__all__:
        assert getattr(tiered_state, name) is getattr(errors, name)
    assert TieringPolicy() == TieringPolicy(
        hot_ttl=3600, promote_to="hot", cold_after=7 * 86400, hot_max_items=None,
        hot_max_bytes=None, batch_size=500,
    )


# ---------------------------------------------------------------- basics
def test_set_get_record_and_defaults(state: StateManager) -> None:
    version = state.set("position:BTC", {"qty": 1.5})
    assert state.get("position:BTC") == {"qty": 1.5}
    record = state.get_record("position:BTC")
    assert isinstance(record, Record)
    assert record.value == {"qty": 1.5} and record.version == version
    assert record.tier is HOT and isinstance(record.tier, str)
    assert record.size_bytes == len(b'{"qty":1.5}') and len(record.checksum) == 64
    assert record.expires_at is None and record.created_at <= record.updated_at
    assert state.get("absent") is None and state.get("absent", "dflt") == "dflt"
    state.set("none", None)
    assert state.get("none", "dflt") is None
    assert state.get_record("absent") is None


def test_values_are_copies(state: StateManager) -> None:
    value = {"list": [1]}
    state.set("k", value)
    value["list"].append(2)
    got = state.get("k")
    got["list"].append(3)
    assert state.get("k") == {"list": [1]}


@pytest.mark.parametrize("tier", ["hot", "warm", "cold", HOT, WARM, COLD, "HOT"])
def test_tier_names(state: StateManager, tier: Any) -> None:
    state.set("k", tier if isinstance(tier, str) else 1, tier=tier)
    assert state.get("k") is not None


def test_bad_input_raises_before_anything_is_written(state: StateManager) -> None:
    for key in ["", "a\x00b", "x" * 1025, 5, "lone\ud800", "__tiered_state__:x"]:
        with pytest.raises(InvalidKeyError):
            state.set(key, 1)  # type: ignore[arg-type]
        with pytest.raises(InvalidKeyError):
            state.get(key)  # type: ignore[arg-type]
    for value in [{1, 2}, b"bytes", float("nan"), object(), {"s": "lone\ud800"}, {1: "x"}]:
        with pytest.raises(SerializationError):
            state.set("k", value)
    with pytest.raises(ConfigurationError):
        state.set("k", 1, tier="lukewarm")
    with pytest.raises(ConfigurationError):
        state.set("k", 1, ttl=0)
    with pytest.raises(InvalidKeyError):
        state.set_many({"good": 1, "bad\n": 2})
    with pytest.raises(SerializationError):
        state.set_many({"good": 1, "bad": {1, 2}})
    assert state.keys() == []
    for repo in state.repositories.values():
        assert [k for k in repo.keys() if not k.startswith(RESERVED_PREFIX)] == []


# ---------------------------------------------------------------- read-through
def test_read_through_promotes_a_copy(state: StateManager) -> None:
    state.set("k", "v", tier="cold")
    assert copies(state, "k") == {"cold": "v"}
    record = state.get_record("k")
    assert record is not None and record.tier is COLD
    assert copies(state, "k") == {"hot": "v", "cold": "v"}  # copied, never moved
    record = state.get_record("k")
    assert record is not None and record.tier is HOT
    assert state.stats()["manager"]["promotions"] == 1


def test_promote_to_warm_and_never(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path / "a", policy=TieringPolicy(promote_to="warm")) as state:
        state.set("k", 1, tier="cold")
        state.get("k")
        assert copies(state, "k") == {"warm": 1, "cold": 1}
    with tiered_state.open(tmp_path / "b", policy=TieringPolicy(promote_to=None)) as state:
        state.set("k", 1, tier="cold")
        state.get("k")
        assert copies(state, "k") == {"cold": 1}


# ---------------------------------------------------------------- durability
def test_write_through_survives_losing_the_volatile_tier(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path) as state:
        version = state.set("k", {"v": 1}, tier="hot")
        assert copies(state, "k") == {"hot": {"v": 1}, "warm": {"v": 1}}
    with tiered_state.open(tmp_path) as fresh:  # a new process: empty memory tier
        record = fresh.get_record("k")
        assert record is not None and record.value == {"v": 1} and record.version == version


def test_durable_tier_down_fails_the_write(state: StateManager) -> None:
    warm = state.repositories[WARM]
    warm.close()
    broken = _Failing(warm, unavailable=True)
    manager = StateManager(MemoryStateRepository(), broken)
    with pytest.raises(BackendUnavailableError):
        manager.set("k", 1)
    assert manager.repositories[HOT].keys() == []  # nothing reported as stored


# ---------------------------------------------------------------- no shadowing
def test_new_value_not_shadowed_after_its_ttl(state: StateManager) -> None:
    state.set("k", "old", tier="cold")
    state.set("k", "new", tier="warm", ttl=0.4)
    assert state.get("k") == "new"
    time.sleep(0.6)
    assert state.get("k") is None  # never "old" again
    assert "k" not in state.keys()
    assert state.get_many(["k"]) == {}


def test_write_to_lower_tier_removes_upper_copies(state: StateManager) -> None:
    state.set("k", "v1")
    state.get("k")
    state.set("k", "v2", tier="cold")
    assert copies(state, "k") == {"cold": "v2"}
    assert state.get("k") == "v2"


def test_no_old_value_after_promotion_demotion_and_sweep(tmp_path: Path) -> None:
    policy = TieringPolicy(cold_after=0.2, purge_after=0)
    with tiered_state.open(tmp_path, policy=policy) as state:
        state.set("k", 1, tier="cold")
        assert state.promote("k", to="hot") is True
        state.set("k", 2)
        assert state.get("k") == 2
        assert state.demote("k", to="cold") is True
        assert copies(state, "k") == {"cold": 2}
        state.set("k", 3, tier="warm")
        time.sleep(0.3)
        report = state.sweep()
        assert report.moved == 1
        assert state.get("k") == 3
        state.set("k", 4, ttl=0.2)
        time.sleep(0.3)
        assert state.get("k") is None
        state.sweep()
        assert state.get("k") is None
        assert copies(state, "k") == {}
        warm = state.repositories[WARM]
        assert warm.fetch_record("k") is None  # purged: not even a tombstone is left
        # ... and no payload of any version of it stays in COLD.
        assert [n for n in state.repositories[COLD].iter_all_keys() if n.startswith("k@")] == []


# ---------------------------------------------------------------- TTL
def test_ttl_is_the_record_lifetime_in_every_tier(state: StateManager) -> None:
    state.set("k", 1, ttl=0.3)
    state.set("c", 1, tier="cold", ttl=0.3)
    record = state.get_record("k")
    assert record is not None and record.expires_at is not None
    assert abs(record.expires_at - (record.updated_at + 0.3)) < 0.01
    time.sleep(0.45)
    assert state.get("k") is None and state.get("c") is None
    assert state.keys() == []
    for repo in state.repositories.values():
        assert repo.fetch("k") is None and repo.fetch("c") is None


def test_hot_ttl_is_how_long_a_copy_stays_hot(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path, policy=TieringPolicy(hot_ttl=0.3)) as state:
        state.set("k", 1, ttl=100)
        assert copies(state, "k") == {"hot": 1, "warm": 1}
        record = state.get_record("k")
        assert record is not None and record.tier is HOT
        assert record.expires_at is not None and record.expires_at > time.time() + 90
        time.sleep(0.4)
        assert copies(state, "k") == {"warm": 1}
        assert state.get("k") == 1  # the record lives on below


# ---------------------------------------------------------------- integrity
def test_corrupt_hot_copy_is_skipped_for_the_warm_one(state: StateManager) -> None:
    state.set("k", {"v": 1})
    corrupt(state.repositories[HOT], "k", {"v": 666})
    assert state.get("k") == {"v": 1}
    assert state.stats()["manager"]["integrity_errors"] == 1
    assert state.get("k") == {"v": 1}


def test_corrupt_durable_copy_uses_a_valid_copy_below_or_raises(state: StateManager) -> None:
    state.set("k", "good", tier="cold")
    state.get("k")  # now in hot and cold
    state.promote("k", to="warm")
    state.repositories[HOT].delete("k")
    corrupt(state.repositories[WARM], "k", "evil")
    assert state.get("k") == "good"  # same version, valid, from COLD
    assert state.get("k") == "good"
    # No valid copy anywhere: never the corrupt data.
    state.set("only", "data", tier="warm")
    state.repositories[HOT].delete("only")
    corrupt(state.repositories[WARM], "only", "evil")
    with pytest.raises(IntegrityError):
        state.get("only")
    with pytest.raises(IntegrityError):
        state.get_many(["only"])


def test_corrupt_copy_is_not_replaced_by_an_older_one(state: StateManager) -> None:
    state.set("k", "old", tier="cold")
    state.set("k", "new", tier="warm")
    state.repositories[HOT].delete("k")
    corrupt(state.repositories[WARM], "k", "evil")
    with pytest.raises(IntegrityError):
        state.get("k")


# ---------------------------------------------------------------- versions
def test_versions_increase_and_survive_migration(state: StateManager) -> None:
    v1 = state.set("k", 1)
    v2 = state.set("k", 2)
    assert v2 > v1
    state.demote("k", to="cold")
    record = state.get_record("k")
    assert record is not None and record.version == v2
    state.delete("k")
    v3 = state.set("k", 3)
    assert v3 > v2


def test_compare_and_set(state: StateManager) -> None:
    v1 = state.set("k", "a", if_version=0)
    with pytest.raises(ConflictError) as info:
        state.set("k", "b", if_version=0)
    assert info.value.actual == v1
    with pytest.raises(ConflictError):
        state.set("k", "b", if_version=v1 - 1)
    v2 = state.set("k", "b", if_version=v1)
    assert state.get("k") == "b" and v2 > v1
    # The current version may live in COLD only.
    state.demote("k", to="cold")
    v3 = state.set("k", "c", if_version=v2)
    assert state.get("k") == "c" and v3 > v2
    with pytest.raises(ConflictError):
        state.set("cold-only", 1, tier="cold") and state.set("cold-only", 2, if_version=0)
    # An expired record counts as absent.
    state.set("ttl", 1, ttl=0.2)
    time.sleep(0.3)
    assert state.set("ttl", 2, if_version=0) > 0


def test_compare_and_set_is_atomic_across_threads(state: StateManager) -> None:
    import threading

    base = state.set("counter", 0)
    wins: list[int] = []

    def attempt() -> None:
        try:
            wins.append(state.set("counter", 1, if_version=base))
        except ConflictError:
            pass

    threads = [threading.Thread(target=attempt) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(wins) == 1


# ---------------------------------------------------------------- batches
def test_batches(state: StateManager) -> None:
    versions = state.set_many({"a": 1, "b": [2], "c": None}, tier="warm")
    assert set(versions) == {"a", "b", "c"}
    assert state.get_many(["a", "b", "c", "zz"]) == {"a": 1, "b": [2], "c": None}
    state.set_many({f"k{i}": i for i in range(1200)}, tier="cold", ttl=3600)
    got = state.get_many([f"k{i}" for i in range(1200)])
    assert got == {f"k{i}": i for i in range(1200)}
    assert state.delete_many(["a", "b", "zz"]) == 2
    assert state.delete_many([f"k{i}" for i in range(1200)]) == 1200
    assert state.keys() == ["c"]
    assert state.set_many({}) == {} and state.delete_many([]) == 0 and state.get_many([]) == {}


class _Failing(StateRepository):
    """A real repository with injected failures: for error paths a real store won't produce."""

    def __init__(self, inner: StateRepository, *, fail_keys: set[str] | None = None,
                 unavailable: bool = False) -> None:
        self.inner = inner
        self.fail_keys = fail_keys or set()
        self.unavailable = unavailable
        self.backend = inner.backend  # type: ignore[misc]
        self.volatile = inner.volatile  # type: ignore[misc]
        self.shared = inner.shared  # type: ignore[misc]

    def _gate(self) -> None:
        if self.unavailable:
            raise BackendUnavailableError("injected outage", self.backend)

    def fetch_record(self, key: str) -> Any:
        self._gate()
        return self.inner.fetch_record(key)

    def fetch_many(self, keys: Any) -> Any:
        self._gate()
        return self.inner.fetch_many(keys)

    def fetch(self, key: str) -> Any:
        self._gate()
        return self.inner.fetch(key)

    def iter_keys(self, pattern: str = "*") -> Any:
        self._gate()
        return self.inner.iter_keys(pattern)

    def iter_all_keys(self) -> Any:
        self._gate()
        return self.inner.iter_all_keys()

    def changed_by_others(self) -> bool:
        return self.inner.changed_by_others()

    def _split(self, items: Any) -> tuple[dict[str, Any], dict[str, BaseException]]:
        good = {k: v for k, v in items.items() if k not in self.fail_keys}
        failed: dict[str, BaseException] = {
            k: BackendUnavailableError("injected", self.backend) for k in items if k in self.fail_keys}
        return good, failed

    def store_many_if_newer(self, items: Any) -> set[str]:
        self._gate()
        good, failed = self._split(items)
        stored = self.inner.store_many_if_newer(good)
        if failed:
            raise self._batch_failed("store_many_if_newer", failed, stored)
        return stored

    def store_many_if_version(self, items: Any, expected: Any) -> set[str]:
        self._gate()
        good, failed = self._split(items)
        stored = self.inner.store_many_if_version(good, expected)
        if failed:
            raise self._batch_failed("store_many_if_version", failed, stored)
        return stored

    def delete_many_if_version(self, versions: Any) -> set[str]:
        self._gate()
        return self.inner.delete_many_if_version(versions)

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        self._gate()
        return self.inner.store(key, value, metadata)

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        self._gate()
        return self.inner.store_if_newer(key, value, metadata)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        self._gate()
        return self.inner.store_if_version(key, value, metadata, expected)

    def delete(self, key: str) -> bool:
        self._gate()
        return self.inner.delete(key)

    def delete_if_version(self, key: str, version: int) -> bool:
        self._gate()
        return self.inner.delete_if_version(key, version)

    def keys(self, pattern: str = "*") -> list[str]:
        self._gate()
        return self.inner.keys(pattern)

    def stats(self) -> dict[str, Any]:
        self._gate()
        return self.inner.stats()

    def store_many(self, items: Any) -> set[str]:
        self._gate()
        good, failed = self._split(items)
        stored = self.inner.store_many(good)
        if failed:
            raise self._batch_failed("store_many", failed, stored)
        return stored

    def delete_many(self, keys: Any) -> int:
        self._gate()
        return self.inner.delete_many(keys)

    def clear(self) -> int:
        self._gate()
        return self.inner.clear()


def test_batch_failure_reports_per_key(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path) as base:
        warm = _Failing(base.repositories[WARM], fail_keys={"b"})
        state = StateManager(MemoryStateRepository(), warm)
        with pytest.raises(BatchError) as info:
            state.set_many({"a": 1, "b": 2, "c": 3})
        assert set(info.value.failed) == {"b"}
        assert sorted(info.value.succeeded) == ["a", "c"]
        assert state.get_many(["a", "b", "c"]) == {"a": 1, "c": 3}
        assert state.repositories[HOT].fetch("b") is None  # a failed key is not cached either


# ---------------------------------------------------------------- HOT outage
def test_hot_outage_degrades_and_never_serves_stale_afterwards(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path) as base:
        shared_hot = _Failing(MemoryStateRepository())
        shared_hot.shared = True  # behaves like redis: shared, volatile  # type: ignore[misc]
        state = StateManager(shared_hot, base.repositories[WARM])
        state.set("k", "v1")
        state.set("gone", "x")
        shared_hot.unavailable = True
        state.set("k", "v2")  # HOT cannot be invalidated: the write still succeeds
        assert state.delete("gone") is True
        assert state.get("k") == "v2"
        shared_hot.unavailable = False
        # HOT still holds v1 and "gone"; a new process must not trust it...
        fresh = StateManager(shared_hot, base.repositories[WARM])
        assert fresh.get("k") == "v2" and fresh.get("gone") is None
        # ...and neither must this one once HOT answers again.
        time.sleep(1.05)
        assert state.get("k") == "v2" and state.get("gone") is None
        assert state.stats()["manager"]["tier_errors"] >= 1


# ---------------------------------------------------------------- delete, keys
def test_delete_removes_every_copy(state: StateManager) -> None:
    state.set("k", 1, tier="cold")
    state.get("k")
    state.promote("k", to="warm")
    assert len(copies(state, "k")) == 3
    assert state.delete("k") is True
    assert copies(state, "k") == {} and state.get("k") is None
    assert state.delete("k") is False


def test_keys_sorted_unique_across_tiers(state: StateManager) -> None:
    state.set("b", 1)
    state.set("a", 1, tier="cold")
    state.set("c:1", 1, tier="warm")
    state.get("a")
    assert state.keys() == ["a", "b", "c:1"]
    assert state.keys("c:*") == ["c:1"]
    assert state.keys("[ab]") == ["a", "b"]


# ---------------------------------------------------------------- sweep
def test_sweep_moves_idle_records_and_purges_expired(tmp_path: Path) -> None:
    policy = TieringPolicy(cold_after=0.3, batch_size=7, purge_after=0)
    with tiered_state.open(tmp_path, policy=policy) as state:
        state.set_many({f"idle{i}": i for i in range(20)}, tier="warm")
        state.set("read", "r", tier="warm")
        state.set("expiring", "e", tier="warm", ttl=0.2)
        state.set("old-copy", "old", tier="cold")
        state.set("old-copy", "new", tier="warm", ttl=0.2)
        time.sleep(0.35)
        state.repositories[HOT].clear()
        assert state.get("read") == "r"  # a read keeps it warm
        reports: list[int] = []
        report = state.sweep(progress=lambda r: reports.append(r.scanned))
        assert isinstance(report, SweepReport)
        assert report.moved == 20 and report.failed == 0
        assert report.purged == 2
        assert reports and reports == sorted(reports)
        for i in range(20):
            assert copies(state, f"idle{i}") == {"cold": i}
        assert "cold" not in copies(state, "read")
        assert state.get("old-copy") is None  # the older copy below went too
        assert report.collected == 1
        assert [n for n in state.repositories[COLD].iter_all_keys()
                if n.startswith("old-copy@")] == []
        assert state.get("idle3") == 3
        assert state.sweep().moved == 0


def test_sweep_never_deletes_a_newer_write(tmp_path: Path) -> None:
    policy = TieringPolicy(cold_after=0.1)
    with tiered_state.open(tmp_path, policy=policy) as state:
        state.set("k", "old", tier="warm")
        time.sleep(0.2)
        warm = state.repositories[WARM]
        original_scan = warm.scan

        def racing_scan(*args: Any, **kwargs: Any) -> Any:
            for batch in original_scan(*args, **kwargs):
                state.set("k", "new", tier="warm")  # a set racing the sweep
                yield batch

        warm.scan = racing_scan  # type: ignore[method-assign]
        report = state.sweep()
        assert report.moved == 0 and report.skipped == 1
        assert state.get("k") == "new"


def test_dead_entries_stay_for_purge_after(tmp_path: Path) -> None:
    """A tombstone orders every later write of its key after the delete, even a
    write that was under way before it; so it stays purge_after seconds."""
    policy = TieringPolicy(purge_after=0.5)
    with tiered_state.open(tmp_path, policy=policy) as state:
        state.set("k", 1)
        deleted = state.delete("k")
        state.set("t", 1, ttl=0.01)
        time.sleep(0.05)
        assert deleted and state.sweep().purged == 0
        warm = state.repositories[WARM]
        tomb = warm.fetch_record("k")
        assert tomb is not None and tomb.kind == "tombstone"
        assert state.set("k", 2) > tomb.version  # a later write goes past it
        state.delete("k")
        time.sleep(0.55)
        assert state.sweep().purged == 2  # the tombstone and the expired record
        assert warm.fetch_record("k") is None and warm.fetch_record("t") is None


# ---------------------------------------------------------------- stats, metrics, cache
def test_stats(state: StateManager) -> None:
    state.set("k", 1)
    state.get("k")
    state.get("absent")
    stats = state.stats()
    assert set(stats["tiers"]) == {"hot", "warm", "cold"}
    assert stats["tiers"]["warm"]["backend"] == "sqlite"
    assert stats["tiers"]["hot"]["key_count"] == 1
    assert stats["manager"]["hit_hot"] == 1 and stats["manager"]["miss"] == 1
    assert stats["manager"]["hit_ratio"]["hot"] == 0.5


def test_metrics_are_recorded_when_attached(tmp_path: Path) -> None:
    metrics = InMemoryMetrics()
    with tiered_state.open(tmp_path, metrics=metrics) as state:
        state.set("k", 1, tier="cold")
        state.get("k")
        state.get("k")
        counters = state.stats()["manager"]["metrics"]["counters"]
    assert counters["state.manager.hit_cold"] == 1
    assert counters["state.manager.hit_hot"] == 1
    assert counters["state.manager.promotions"] == 1
    assert counters["state.repository.sqlite.operations.fetch_total"] >= 1  # looked for copies above
    assert counters["state.repository.filesystem.operations.store_total"] == 1


def test_local_cache_is_invalidated_by_own_writes(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path, cache=LocalCache(max_items=2, ttl=60)) as state:
        state.set("k", 1)
        assert state.get("k") == 1
        state.set("k", 2)
        assert state.get("k") == 2
        state.delete("k")
        assert state.get("k") is None
        state.set_many({"a": 1, "b": 2, "c": 3})
        assert state.get_many(["a", "b", "c"]) == {"a": 1, "b": 2, "c": 3}


def test_a_second_process_sees_writes_at_once(tmp_path: Path) -> None:
    """The per-process memory tier notices another process's writes."""
    with tiered_state.open(tmp_path) as state:
        state.set("k", "mine")
        assert state.get("k") == "mine"  # now cached in this process's memory tier
        code = (
            "import sys, tiered_state\n"
            "with tiered_state.open(sys.argv[1]) as s:\n"
            "    s.set('k', 'theirs')\n"
            "    s.delete('mine-only')\n"
        )
        state.set("mine-only", 1)
        subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True)
        assert state.get("k") == "theirs"
        assert state.get("mine-only") is None


def test_closing_twice_and_context_manager(tmp_path: Path) -> None:
    state = tiered_state.open(tmp_path)
    state.set("k", 1)
    state.close()
    state.close()
    with tiered_state.open(tmp_path) as again:
        assert again.get("k") == 1


def test_repr_hides_nothing_secret(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path) as state:
        assert "memory" in repr(state) and "sqlite" in repr(state)


def test_metadata_helpers() -> None:
    payload, metadata = make({"a": 1}, version=3, ttl=5)
    assert metadata == make_metadata(payload, 3, now=metadata["updated_at"], ttl=5)
    assert os.environ.get("TIERED_STATE_HOT") is None


def test_hot_only_store_reports_an_outage() -> None:
    hot = _Failing(MemoryStateRepository(), unavailable=True)
    state = StateManager(hot)
    with pytest.raises(BackendUnavailableError):
        state.set("k", 1)
    with pytest.raises(BackendUnavailableError):
        state.delete("k")


def test_a_demote_never_reopens_the_door_to_a_stale_fill(tmp_path: Path) -> None:
    """A reader that read the catalog before a write may try to copy what it
    read into a shared HOT afterwards; the writer's placeholder or copy blocks
    it. A demote that then removes the HOT copy must keep blocking it."""
    with tiered_state.open(tmp_path) as base:
        shared = _Failing(MemoryStateRepository())
        shared.shared = True  # behaves like redis: shared, volatile  # type: ignore[misc]
        reader = StateManager(shared, base.repositories[WARM])
        writer = StateManager(shared, base.repositories[WARM])
        writer.set("k", "old", tier="warm")
        guard = reader._hot
        assert guard is not None
        token = guard.token()
        stale = base.repositories[WARM].fetch_record("k")  # the reader's catalog read
        assert stale is not None
        writer.set("k", "new")  # placeholder, commit, copy in HOT
        assert writer.demote("k", to="warm") is True  # no copy above WARM now
        assert guard.fill({"k": stale}, token) == 0  # the late fill is refused...
        assert reader.get("k") == "new" and writer.get("k") == "new"  # ...so nobody sees "old"


def test_partial_partition_a_write_around_hot_is_seen_at_once(tmp_path: Path) -> None:
    """A process that cannot reach a shared HOT (while another can) writes
    around it: once its set or delete returns, the other process serves the
    new state -- through get and get_many, not after some delay."""
    policy = TieringPolicy(hot_trust_window=0.05)
    with tiered_state.open(tmp_path) as base:
        shared = MemoryStateRepository()
        for_a = _Failing(shared)
        for_b = _Failing(shared)
        for_a.shared = for_b.shared = True  # type: ignore[misc]
        a = StateManager(for_a, base.repositories[WARM], policy=policy)
        b = StateManager(for_b, base.repositories[WARM], policy=policy)
        a.set("k", "v1")
        a.set("j", "j1")
        assert b.get("k") == "v1" and b.get_many(["k", "j"]) == {"k": "v1", "j": "j1"}
        for_a.unavailable = True  # only A loses HOT
        started = time.monotonic()
        a.set("k", "v2")
        assert time.monotonic() - started >= 0.05  # it waited out B's trust window
        assert b.get("k") == "v2"
        assert b.get_many(["k", "j"]) == {"k": "v2", "j": "j1"}
        a.delete("j")
        assert b.get("j") is None and b.get_many(["k", "j"]) == {"k": "v2"}
        assert a.stats()["manager"]["hot_write_arounds"] >= 1


def test_sweep_dry_run_changes_nothing(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path, policy=TieringPolicy(cold_after=0.2, purge_after=0)) as state:
        state.set_many({f"k{i}": i for i in range(5)}, tier="warm")
        state.set("exp", 1, tier="warm", ttl=0.1)
        time.sleep(0.3)
        report = state.sweep(dry_run=True)
        assert (report.moved, report.purged) == (5, 1)
        assert state.keys() == [f"k{i}" for i in range(5)]
        assert all(copies(state, f"k{i}") == {"warm": i} for i in range(5))
        assert state.repositories[COLD].keys() == []
        real = state.sweep()
        assert (real.moved, real.purged) == (5, 1)


def test_a_closed_manager_refuses_every_call(tmp_path: Path) -> None:
    state = tiered_state.open(tmp_path)
    state.set("k", 1)
    state.close()
    state.close()  # twice is fine
    calls = {
        "get": lambda: state.get("k"), "get_record": lambda: state.get_record("k"),
        "get_many": lambda: state.get_many(["k"]), "keys": lambda: state.keys(),
        "iter_keys": lambda: list(state.iter_keys()),
        "iter_records": lambda: list(state.iter_records()),
        "set": lambda: state.set("k", 2), "set_many": lambda: state.set_many({"k": 2}),
        "delete": lambda: state.delete("k"), "delete_many": lambda: state.delete_many(["k"]),
        "restore": lambda: state.restore([]), "promote": lambda: state.promote("k"),
        "demote": lambda: state.demote("k"), "sweep": lambda: state.sweep(),
        "flush_access": lambda: state.flush_access(), "stats": lambda: state.stats(),
        "check": lambda: state.check(),
    }
    for name, call in calls.items():
        with pytest.raises(tiered_state.ClosedError, match=f"{name}\\(\\) on a closed"):
            call()
    assert issubclass(tiered_state.ClosedError, tiered_state.TieredStateError)
    with tiered_state.open(tmp_path) as again:  # the store itself is untouched
        assert again.get("k") == 1
