"""Model-based test of the StateManager on the embedded tiers.

A hypothesis state machine drives random ``set`` (any tier, with or without a
TTL, sometimes compare-and-set with the right or a wrong version), ``get``,
``get_record``, ``get_many``, ``keys``, ``delete``, ``set_many``,
``delete_many``, ``promote``, ``demote``, ``sweep``, a restart (the memory tier
is lost) and clock advances against a plain dict, on memory + SQLite + files in
a temporary folder, and asserts the store never disagrees with the dict:
values, absent keys, versions (strictly increasing per key, also across a
delete) and the key listing.

Two managers share the store, like two processes would, and each step picks
one: a value one of them overwrote must never be served by the other.

The same machine runs on the embedded layout and, when the test URLs are set,
on Redis + PostgreSQL + S3 (fewer examples: every step is a few round trips).

The clock is virtual: every ``tiered_state`` module's ``time`` is replaced by
a proxy whose ``time()`` returns the test's clock (everything else, such as
``monotonic`` and ``time_ns``, stays real), so TTLs, ``hot_ttl`` and
``cold_after`` run out exactly when the test says, without sleeping.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time as real_time
import uuid
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
)

import tiered_state
from tiered_state import ConflictError, StateManager, Tier, TieringPolicy

#: Few keys, so operations collide on the same key often.
KEYS = ("a", "b", "c", "user:1", "user:2", "ü/ß key")
#: Virtual seconds. TTLs and advances share values, so a record is often
#: checked exactly at its expiry instant (expired when ``expires_at <= now``).
TTLS = (1.0, 5.0, 60.0)
ADVANCES = (0.5, 1.0, 4.0, 30.0, 200.0)
POLICY = TieringPolicy(hot_ttl=20.0, cold_after=100.0, batch_size=2)
START = 1_700_000_000.0

values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
keys = st.sampled_from(KEYS)
key_lists = st.lists(keys, max_size=4)
tiers = st.sampled_from([Tier.HOT, Tier.WARM, Tier.COLD, "hot", "warm", "cold"])
ttls = st.none() | st.sampled_from(TTLS)


class VirtualClock(ModuleType):
    """Stands in for the ``time`` module: ``time()`` is virtual, the rest real."""

    def __init__(self, start: float) -> None:
        super().__init__("time")
        self.now = start

    def time(self) -> float:
        return self.now

    def __getattr__(self, name: str) -> Any:
        return getattr(real_time, name)


def _patch_time(clock: VirtualClock) -> list[tuple[ModuleType, Any]]:
    """Point every loaded tiered_state module's ``time`` at the clock; return the undo list."""
    undo = []
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "tiered_state" and getattr(module, "time", None) is real_time:
            undo.append((module, real_time))
            module.time = clock  # type: ignore[attr-defined]
    return undo


@dataclass
class Item:
    value: Any
    version: int
    expires_at: float | None


class ManagerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.folder = tempfile.mkdtemp(prefix="ts-stateful-")
        self.clock = VirtualClock(START)
        # Open once so every backend module is imported, then patch them all.
        self._open().close()
        self.undo = _patch_time(self.clock)
        self.managers = [self._open(), self._open()]
        self.model: dict[str, Item] = {}
        #: Highest version ever seen per key (survives deletes).
        self.high: dict[str, int] = {}

    def _open(self) -> StateManager:
        # The embedded default layout, but COLD without fsync: durability is
        # the crash test's subject, and an fsync per write would make each
        # example ten times slower.
        cold = Path(self.folder, "cold").as_uri() + "?fsync=false"
        return tiered_state.open(self.folder, cold=cold, policy=POLICY)

    def teardown(self) -> None:
        for manager in self.managers:
            manager.close()
        for module, original in self.undo:
            module.time = original  # type: ignore[attr-defined]
        shutil.rmtree(self.folder, ignore_errors=True)

    # ------------------------------------------------------------ the model
    def live(self, key: str) -> Item | None:
        item = self.model.get(key)
        if item is None:
            return None
        if item.expires_at is not None and item.expires_at <= self.clock.now:
            return None
        return item

    def current_version(self, key: str) -> int:
        item = self.live(key)
        return 0 if item is None else item.version

    def wrote(self, key: str, value: Any, version: int, ttl: float | None) -> None:
        assert version > self.high.get(key, 0), (key, version, self.high.get(key))
        self.high[key] = version
        self.model[key] = Item(value, version, None if ttl is None else self.clock.now + ttl)

    def pick(self, which: int) -> StateManager:
        return self.managers[which]

    # ------------------------------------------------------------ rules
    @initialize(key=keys, value=values)
    def seed(self, key: str, value: Any) -> None:
        version = self.managers[0].set(key, value)
        self.wrote(key, value, version, None)

    @rule(which=st.integers(0, 1), key=keys, value=values, tier=tiers, ttl=ttls)
    def set(self, which: int, key: str, value: Any, tier: Tier | str, ttl: float | None) -> None:
        version = self.pick(which).set(key, value, tier=tier, ttl=ttl)
        self.wrote(key, value, version, ttl)

    @rule(which=st.integers(0, 1), key=keys, value=values, tier=tiers, ttl=ttls,
          right=st.booleans(), wrong_by=st.sampled_from([-1, 1, 7]))
    def set_if_version(
        self, which: int, key: str, value: Any, tier: Tier | str, ttl: float | None,
        right: bool, wrong_by: int,
    ) -> None:
        current = self.current_version(key)
        expected = current if right else max(0, current + wrong_by)
        if expected == current:
            version = self.pick(which).set(key, value, tier=tier, ttl=ttl, if_version=expected)
            self.wrote(key, value, version, ttl)
        else:
            with pytest.raises(ConflictError):
                self.pick(which).set(key, value, tier=tier, ttl=ttl, if_version=expected)

    @rule(which=st.integers(0, 1),
          items=st.dictionaries(keys, values, max_size=4), tier=tiers, ttl=ttls)
    def set_many(self, which: int, items: dict[str, Any], tier: Tier | str, ttl: float | None) -> None:
        versions = self.pick(which).set_many(items, tier=tier, ttl=ttl)
        assert set(versions) == set(items)
        for key, value in items.items():
            self.wrote(key, value, versions[key], ttl)

    @rule(which=st.integers(0, 1), key=keys)
    def get(self, which: int, key: str) -> None:
        item = self.live(key)
        missing = object()
        got = self.pick(which).get(key, missing)
        if item is None:
            assert got is missing, f"{key!r} should be absent, got {got!r}"
        else:
            assert got == item.value, f"{key!r}: got {got!r}, model has {item.value!r}"

    @rule(which=st.integers(0, 1), key=keys)
    def get_record(self, which: int, key: str) -> None:
        item = self.live(key)
        record = self.pick(which).get_record(key)
        if item is None:
            assert record is None, f"{key!r} should be absent, got {record!r}"
            return
        assert record is not None, f"{key!r} missing, model has {item!r}"
        assert (record.value, record.version, record.expires_at) == (
            item.value, item.version, item.expires_at
        ), (record, item)
        assert isinstance(record.tier, Tier)

    @rule(which=st.integers(0, 1), wanted=key_lists)
    def get_many(self, which: int, wanted: list[str]) -> None:
        expected = {}
        for key in wanted:
            item = self.live(key)
            if item is not None:
                expected[key] = item.value
        assert self.pick(which).get_many(wanted) == expected

    @rule(which=st.integers(0, 1), key=keys)
    def delete(self, which: int, key: str) -> None:
        item = self.live(key)
        existed = self.pick(which).delete(key)
        if item is not None:
            assert existed, f"{key!r} was live, delete said it did not exist"
        elif key not in self.high:
            assert not existed, f"{key!r} was never written, delete said it existed"
        # Otherwise either answer is fair: an expired copy not yet purged (or
        # the other manager's memory copy of a key deleted by this one) is a
        # copy that existed.
        self.model.pop(key, None)

    @rule(which=st.integers(0, 1), wanted=key_lists)
    def delete_many(self, which: int, wanted: list[str]) -> None:
        live = {k for k in wanted if self.live(k) is not None}
        deleted = self.pick(which).delete_many(wanted)
        assert deleted == len(live), f"delete_many({wanted}) said {deleted}, live were {sorted(live)}"
        for key in wanted:
            self.model.pop(key, None)

    @rule(which=st.integers(0, 1), key=keys, to=st.sampled_from(["hot", "warm"]))
    def promote(self, which: int, key: str, to: str) -> None:
        item = self.live(key)
        manager = self.pick(which)
        promoted = manager.promote(key, to=to)
        if item is None or promoted:
            assert promoted == (item is not None)
            return
        # A shared HOT refuses a copy of the version a demote (or touch) just
        # dropped: its placeholder, one version above, keeps out every copy
        # a reader may have read before the drop -- this one too.
        assert to == "hot", (key, to)
        hot = manager.repositories[Tier.HOT].fetch_record(key)
        assert hot is not None and hot.kind == "stub" and hot.version > item.version, (key, hot)

    @rule(which=st.integers(0, 1), key=keys, to=st.sampled_from(["warm", "cold"]))
    def demote(self, which: int, key: str, to: str) -> None:
        item = self.live(key)
        manager = self.pick(which)
        moved = manager.demote(key, to=to)
        assert item is not None or not moved  # an absent key never moves
        if item is not None:
            # Moved or not, no copy of the value is left above ``to`` (False:
            # there was none to move).
            hot = manager.repositories[Tier.HOT].fetch_record(key)
            assert hot is None or hot.kind != "value", (key, hot)
        if item is not None and to == "cold":
            # Moved: no copy of the value is left above COLD -- HOT holds none
            # and the catalog (WARM) holds a stub pointing at the payload below.
            hot = manager.repositories[Tier.HOT].fetch_record(key)
            assert hot is None or hot.kind != "value", (key, hot)
            entry = manager.repositories[Tier.WARM].fetch_record(key)
            assert entry is not None and entry.kind == "stub", (key, entry)
            assert manager.get_record(key).tier is Tier.COLD  # type: ignore[union-attr]

    @rule(which=st.integers(0, 1))
    def sweep(self, which: int) -> None:
        report = self.pick(which).sweep()
        assert report.failed == 0, report.errors
        # Purged records are gone for good: an expired key now never existed.
        for key in [k for k in self.model if self.live(k) is None]:
            del self.model[key]

    @rule(seconds=st.sampled_from(ADVANCES))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule(which=st.integers(0, 1))
    def restart(self, which: int) -> None:
        """Close and reopen one manager: its memory tier is lost, nothing else."""
        self.managers[which].close()
        self.managers[which] = self._open()

    @precondition(lambda self: bool(self.model))
    @rule(which=st.integers(0, 1), data=st.data())
    def record_matches_model(self, which: int, data: st.DataObject) -> None:
        key = data.draw(st.sampled_from(sorted(self.model)))
        self.get_record(which, key)

    # ------------------------------------------------------------ invariants
    @invariant()
    def listing_matches(self) -> None:
        expected = sorted(k for k in KEYS if self.live(k) is not None)
        for manager in self.managers:
            assert manager.keys() == expected

    @rule(which=st.integers(0, 1), pattern=st.sampled_from(["user:*", "?", "[ab]*", "a"]))
    def keys_matching(self, which: int, pattern: str) -> None:
        expected = sorted(k for k in KEYS if self.live(k) is not None and fnmatchcase(k, pattern))
        assert self.pick(which).keys(pattern) == expected


ManagerMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=35,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
TestManagerMachine = ManagerMachine.TestCase


class ServerManagerMachine(ManagerMachine):
    """The same rules on Redis + PostgreSQL + S3, each example in its own namespace."""

    def __init__(self) -> None:
        name = "sm_" + uuid.uuid4().hex[:10]
        redis, postgres, s3 = (os.environ[f"TIERED_STATE_TEST_{k}_URL"] for k in ("REDIS", "POSTGRES", "S3"))
        base, _, query = s3.partition("?")
        self.urls = {
            "hot": f"{redis}{'&' if '?' in redis else '?'}prefix={name}:",
            "warm": f"{postgres}{'&' if '?' in postgres else '?'}table={name}",
            "cold": f"{base.rstrip('/')}/{name}?{query}&create_bucket=true",
        }
        super().__init__()

    def _open(self) -> StateManager:
        return tiered_state.open(self.folder, policy=POLICY, **self.urls)

    def teardown(self) -> None:
        try:
            with self._open() as manager:
                for tier in (Tier.HOT, Tier.COLD):
                    manager.repositories[tier].clear()
                warm = manager.repositories[Tier.WARM]
                warm.clear()
        finally:
            import psycopg2

            table = self.urls["warm"].rsplit("table=", 1)[1]
            with psycopg2.connect(os.environ["TIERED_STATE_TEST_POSTGRES_URL"]) as conn, \
                    conn.cursor() as cur:
                cur.execute(f'DROP TABLE IF EXISTS "{table}"')
            super().teardown()


ServerManagerMachine.TestCase.settings = settings(
    max_examples=int(os.environ.get("TIERED_STATE_STATEFUL_SERVER_EXAMPLES", "60")),
    stateful_step_count=30,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_server_layout_state_machine() -> None:
    """The state machine on Redis + PostgreSQL + S3 (skipped without the test URLs)."""
    from .support import server_url

    for kind in ("redis", "postgres", "s3"):
        server_url(kind)
    ServerManagerMachine.TestCase("runTest").runTest()
