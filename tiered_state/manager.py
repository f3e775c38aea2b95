"""StateManager: one authority per key, one write path, one read path.

The invariants, and the one place each is kept:

* **The catalog decides.** The first durable tier holds an entry for every
  key: its value, a stub pointing at the payload below, or a tombstone
  (:mod:`tiered_state.catalog`). Existence, the current version, and every
  change of a key are read from and made to that entry, with one
  conditional write each -- so two writers never both win, whatever tier
  they aim at and whatever their clocks say.
* **One write path** (:meth:`StateManager._commit`, single keys and batches,
  values and deletes): new versions exceed the entry's (a refused write
  observes the entry and retries above it); HOT is invalidated first, the
  payload goes below the catalog before the entry that points at it, the
  entry is written conditionally, HOT is filled last. A process killed at
  any instant leaves the last committed entry and, at worst, garbage.
* **One read path** (:meth:`StateManager._resolve`): a HOT copy is served
  only under the HOT guard's rules (:mod:`tiered_state.hot`); anything else
  is read from the catalog -- a miss is one catalog lookup, never a request
  to COLD. Copies made on the way (promotions) are conditional and lose to
  any write.
* **Migration** copies the payload, verifies it, then turns the entry into a
  stub of the same version with one conditional write
  (:class:`tiered_state.sweep.Sweeper`); a write that raced it wins and the
  copy is garbage.
"""

from __future__ import annotations

import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from types import MappingProxyType, TracebackType
from typing import Any

from .access import AccessTracker
from .cache import CacheStore, LocalCache
from .catalog import RESERVED_PREFIX, Catalog, Resolved, SegmentCollected, user_key
from .codec import Codec, decode_entry, resolve_codec
from .errors import (
    BackendError,
    BackendUnavailableError,
    BatchError,
    ClosedError,
    ConfigurationError,
    ConflictError,
    IntegrityError,
    InvalidKeyError,
    SerializationError,
)
from .hot import HotGuard, SharedHot, hot_guard
from .inspection import CopyInfo, inspect_key
from .keys import validate_keys, validate_pattern
from .metrics import Counters, InstrumentedRepository, MetricsCollector, as_collector
from .operations import Operations, TierLike
from .policy import Seconds, TieringPolicy, seconds, seconds_of
from .record import (
    STUB,
    TOMBSTONE,
    Entry,
    Metadata,
    Record,
    Tier,
    VersionClock,
    checksum,
    make_metadata,
    make_tombstone,
)
from .repositories.base import StateRepository, chunked
from .sweep import GARBAGE_GRACE, Sweeper, SweepReport
from .upgrade import check_format

__all__ = ["RestoreReport", "StateManager"]

log = logging.getLogger(__name__)

_ORDER = (Tier.HOT, Tier.WARM, Tier.COLD)
#: Keys per round trip when a call streams (iter_records, restore).
CHUNK = 500
#: A write refused because the entry moved past its version retries above it;
#: after a few such losses it backs off a little (randomly, so that writers
#: racing on one key spread out), and gives up after this many seconds.
_GIVE_UP = 10.0
_HIT = {Tier.HOT: "hit_hot", Tier.WARM: "hit_warm", Tier.COLD: "hit_cold"}
#: ``set`` is a method name here, so annotations inside the class say this.
KeySet = set[str]


def _check_ttl(ttl: Seconds | None) -> float | None:
    return seconds("ttl", ttl)


class _TooSlow(Exception):
    """A write's payloads took so long that it must start over with a new version."""


@dataclass(slots=True)
class _Intent:
    """One key's write: a value (``payload``) or a delete (``payload`` None).

    ``expected`` makes it conditional on the live version (compare-and-set,
    or a delete of the version read); ``fixed`` carries the metadata of a
    restored record, whose version is kept and which only goes in if newer.
    """

    key: str
    payload: str | None
    expected: int | None = None
    fixed: Metadata | None = None
    after: int = 0  # a version the new one must exceed (observed in the catalog)
    version: int = 0
    #: A delete of exactly ``expected`` (pop): refused, not retried, if the
    #: live version moved on -- deleting a newer one would lose it unread.
    pinned: bool = False


@dataclass
class RestoreReport:
    """What :meth:`StateManager.restore` did.

    :ivar restored: records written.
    :ivar unchanged: records skipped because the store already held that key
        at the same version (a backup restored twice).
    :ivar newer: records skipped because the store held that key at a newer
        version.
    :ivar expired: records skipped because their TTL had run out.
    """

    restored: int = 0
    unchanged: int = 0
    newer: int = 0
    expired: int = 0


#: The calls a closed manager refuses (``close`` stays idempotent).
_CALLS = ("get", "get_record", "get_many", "keys", "iter_keys", "iter_records", "set",
          "set_many", "delete", "delete_many", "restore", "promote", "demote", "sweep",
          "flush_access", "stats", "check", "health", "inspect", "touch", "add", "get_or_set",
          "memoize", "incr", "decr", "pop")


def _refusal(name: str) -> Callable[..., Any]:
    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise ClosedError(f"{name}() on a closed StateManager")
    return refuse


class StateManager(Operations):
    """Application state across HOT, WARM and COLD tiers. Build it with :func:`tiered_state.open`.

    It is also a mapping of keys to values -- ``state[key]``, ``state[key] =
    value``, ``del state[key]``, ``key in state``, ``iter(state)`` -- except
    for ``len()``: counting would take a full scan of the catalog on most
    backends (``stats()`` reports counts).

    >>> state["config:risk"] = {"max_qty": 5}
    >>> state["config:risk"], "config:risk" in state
    ({'max_qty': 5}, True)
    >>> del state["config:risk"]
    >>> state.get("config:risk", "gone")
    'gone'

    It is a context manager too: ``with tiered_state.open(path) as state:``
    closes it on the way out.

    :param hot: the HOT repository, or None.
    :param warm: the WARM repository, or None.
    :param cold: the COLD repository, or None.
    :param policy: the :class:`TieringPolicy` (defaults as documented there).
    :param metrics: a :class:`~tiered_state.metrics.MetricsCollector` (or a
        ``statsd.StatsClient``); None records nothing.
    :param cache: a :class:`LocalCache` to enable the in-process cache.
    :param codec: a :class:`~tiered_state.codec.Codec`, or ``"json"`` (the
        default) / ``"typed-json"``.
    :raises ConfigurationError: no tier, or a store in an older format (run
        ``tiered-state upgrade``).
    """

    def __init__(
        self,
        hot: StateRepository | None = None,
        warm: StateRepository | None = None,
        cold: StateRepository | None = None,
        *,
        policy: TieringPolicy | None = None,
        metrics: MetricsCollector | None = None,
        cache: LocalCache | None = None,
        codec: Codec | str | None = None,
    ) -> None:
        self.policy = policy or TieringPolicy()
        #: How values become payloads (see :mod:`tiered_state.codec`); a
        #: record written by another codec is decoded by the codec that wrote
        #: it, or refused -- never misread.
        self.codec = resolve_codec(codec)
        self._encoding = self.codec.name
        # A raw statsd.StatsClient is wrapped so it has histogram() and never raises.
        self.metrics = metrics = as_collector(metrics)
        #: Close the collector with the manager (open() sets it for one it built).
        self.owns_metrics = False
        repos: dict[Tier, StateRepository] = {}
        for tier, repo in ((Tier.HOT, hot), (Tier.WARM, warm), (Tier.COLD, cold)):
            if repo is None:
                continue
            if metrics is not None and not isinstance(repo, InstrumentedRepository):
                repo = InstrumentedRepository(repo, metrics)
            repo.tier = tier
            repos[tier] = repo
        if not repos:
            raise ConfigurationError("at least one tier must be configured")
        self._repos = repos
        self._counters = Counters(
            ("hit_hot", "hit_warm", "hit_cold", "miss", "promotions", "demotions",
             "integrity_errors", "tier_errors", "hot_flushes", "hot_write_arounds"), metrics)
        self._tick, self._count = self._counters.tick, self._counters.add
        durable = [t for t in _ORDER if t in repos and not repos[t].volatile]
        catalog_tier = durable[0] if durable else next(t for t in _ORDER if t in repos)
        payloads = (Tier.COLD, repos[Tier.COLD]) if (
            catalog_tier is Tier.WARM and Tier.COLD in repos) else None
        self._catalog = catalog = Catalog(catalog_tier, repos[catalog_tier], payloads)
        self._hot: HotGuard | None = None
        if Tier.HOT in repos and catalog_tier is not Tier.HOT:
            self._hot = hot_guard(repos[Tier.HOT], catalog, seconds_of(self.policy.hot_ttl),
                                  self._count, seconds_of(self.policy.hot_trust_window))
        self._clock = VersionClock()
        self._catalog_hit = _HIT[catalog_tier]
        #: Where a read promotes what it finds below HOT, by the ``promote``
        #: argument of the read (None: the policy's).
        policy_target = None if self.policy.promote_to is None else Tier.parse(self.policy.promote_to)
        self._promote_to: dict[bool | None, Tier | None] = {
            None: policy_target, False: None, True: policy_target or Tier.HOT}
        #: How long a write's versions stay good: a tombstone outlives them.
        purge_after = seconds_of(self.policy.purge_after)
        self._fresh_for = min(60.0, purge_after / 2) if purge_after > 0 else float("inf")
        self._cache = CacheStore(cache) if cache is not None else None
        self._access = AccessTracker(catalog.repo, enabled=self.policy.cold_after is not None)
        self._sweeper = Sweeper(catalog, self.policy, self._count, metrics)
        self._closed = False
        #: The store format is checked before the catalog is first used; a
        #: catalog unreachable now does not stop the manager from being built.
        self._unchecked = True
        self._direct_hot: HotGuard | None = None
        self._direct_catalog: Callable[[str, str], str | None] | None = None
        try:
            self._ready()
        except BackendUnavailableError as exc:
            log.warning("catalog (%s) unreachable at open: %s", catalog_tier.value, exc)

    # ------------------------------------------------------------ properties
    @property
    def repositories(self) -> Mapping[Tier, StateRepository]:
        """The configured repositories by tier, for direct access (read-only mapping)."""
        return MappingProxyType(self._repos)

    @property
    def catalog_tier(self) -> Tier:
        """The tier that holds the catalog (the first durable tier)."""
        return self._catalog.tier

    def __repr__(self) -> str:
        tiers = ", ".join(f"{t.value}={self._repos[t].backend}" for t in _ORDER if t in self._repos)
        return f"<StateManager {tiers}>"

    def _ready(self) -> None:
        """Check the store's format once (see :func:`tiered_state.upgrade.check_format`)."""
        check_format(self._catalog)
        self._unchecked = False
        #: HOT when ``get`` may ask it directly (no local cache in front of it).
        self._direct_hot = self._hot if self._cache is None else None
        #: The catalog's payload-only read, when ``get`` may use it: no local
        #: cache, no HOT to fill, and a backend that has one.
        self._direct_catalog = (getattr(self._catalog.repo, "fetch_payload", None)
                                if self._cache is None and self._hot is None else None)

    def _target(self, tier: Tier | str) -> Tier:
        """The configured tier a write aimed at ``tier`` goes to (the next one down if off)."""
        wanted = Tier.parse(tier)
        for t in _ORDER[_ORDER.index(wanted):]:
            if t in self._repos:
                return t
        raise ConfigurationError(f"no tier is configured at or below {wanted.value!r}")

    # ------------------------------------------------------------ the read path
    def _resolve(self, keys: list[str], promote: Tier | None) -> dict[str, Resolved]:
        """The current value of each key that exists: the one read routine.

        Order: the local cache, HOT under its guard, then the catalog (stubs
        read from below it). Copies made on the way are conditional fills.

        :raises IntegrityError: a key's every copy fails its checksum.
        """
        if self._unchecked:
            self._ready()
        found: dict[str, Resolved] = {}
        rest = keys
        cache = self._cache
        if cache is not None:
            rest = []
            for key in keys:
                hit = cache.get(key)
                if hit is None:
                    rest.append(key)
                else:
                    found[key] = Resolved(*hit)
            if not rest:
                return found
        hot = self._hot
        token = 0.0
        if hot is not None:
            copies = ({} if (copy := hot.lookup(rest[0])) is None else {rest[0]: copy}) \
                if len(rest) == 1 else hot.lookup_many(rest)
            if copies:
                self._count("hit_hot", len(copies))
                for key, copy in copies.items():
                    found[key] = Resolved(copy, Tier.HOT)
                rest = [k for k in rest if k not in copies]
                if not rest:
                    self._cache_put(found)
                    return found
            if promote is not None:
                token = hot.token()
        catalog = self._catalog
        if len(rest) == 1:
            entry = catalog.repo.fetch_record(rest[0])
            entries = {} if entry is None else {rest[0]: entry}
        else:
            entries = catalog.repo.fetch_many(rest)
        now = time.time()
        one = next(iter(entries.values())) if len(entries) == 1 else None
        resolved: dict[str, Resolved]
        corrupt: list[str]
        if one is not None and one.kind == "value" and one.live(now) and one.valid():
            resolved, corrupt = {one.key: Resolved(one, catalog.tier)}, []  # the common case, inline
        else:
            resolved, corrupt = catalog.resolve(entries, now)
        if corrupt:
            self._count("integrity_errors", len(corrupt))
            raise IntegrityError(
                f"every copy of {len(corrupt)} key(s) fails its checksum: {sorted(corrupt)[:5]}",
                corrupt[0] if len(corrupt) == 1 else None,
            )
        for found_at in resolved.values():
            self._count("hit_" + found_at.tier.value)
        self._count("miss", len(rest) - len(resolved))
        if promote is not None and resolved:
            self._promote_on_read(resolved, token, promote)
        found.update(resolved)
        self._cache_put(resolved)
        return found

    def _resolve_one(self, key: str, promote: Tier | None, hot_missed: bool = False
                     ) -> Resolved | None:
        """:meth:`_resolve` for one key, without a batch's lists and dicts.

        The same order and the same rules; the common cases -- a HOT copy, a
        value in the catalog -- are decided inline.
        """
        if self._unchecked:
            self._ready()
        cache = self._cache
        if cache is not None:
            hit = cache.get(key)
            if hit is not None:
                return Resolved(*hit)
        hot = self._hot
        token = 0.0
        if hot is not None:
            copy = None if hot_missed else hot.lookup(key)
            if copy is not None:
                self._tick("hit_hot")
                found = Resolved(copy, Tier.HOT)
                if cache is not None:
                    cache.put(copy, Tier.HOT)
                return found
            if promote is not None:
                token = hot.token()
        catalog = self._catalog
        entry = catalog.repo.fetch_record(key)
        if entry is None:
            self._tick("miss")
            return None
        md = entry.metadata
        encoding, expires_at = md["encoding"], md["expires_at"]
        if (encoding != STUB and encoding != TOMBSTONE
                and (expires_at is None or expires_at > time.time())
                and checksum(entry.payload) == md["checksum"]):
            # The common case: a valid value in the catalog.
            found = Resolved(entry, catalog.tier)
            self._tick(self._catalog_hit)
            if promote is Tier.HOT and hot is not None:
                self._promote_on_read({key: found}, token, promote)
            if cache is not None:
                cache.put(entry, found.tier)
            return found
        else:
            resolved, corrupt = catalog.resolve({key: entry}, time.time())
            if corrupt:
                self._count("integrity_errors")
                raise IntegrityError(f"every copy of {key!r} fails its checksum", key)
            if key not in resolved:
                self._tick("miss")
                return None
            found = resolved[key]
        self._tick(_HIT[found.tier])
        if promote is not None:
            self._promote_on_read({key: found}, token, promote)
        if cache is not None:
            cache.put(found.entry, found.tier)
        return found

    def _cache_put(self, found: Mapping[str, Resolved]) -> None:
        if self._cache is not None:
            for item in found.values():
                self._cache.put(item.entry, item.tier)

    def _promote_on_read(self, found: Mapping[str, Resolved], token: float, target: Tier) -> None:
        """Copy what a read found below HOT up to ``target`` (the copy loses to any write)."""
        if target is Tier.HOT and self._hot is not None:
            n = self._hot.fill({k: r.entry for k, r in found.items()}, token)
            self._count("promotions", n)
        elif target is Tier.WARM and self._catalog.payload_tier is not None:
            below = {k: r.entry for k, r in found.items() if r.tier is self._catalog.payload_tier}
            self._count("promotions", len(self._catalog.lift(below)))

    # ------------------------------------------------------------ the write path
    def _commit(self, intents: list[_Intent], target: Tier, ttl: float | None
                ) -> tuple[dict[str, int], dict[str, Entry | None], dict[str, BaseException]]:
        """Write ``intents``: the one write routine.

        :returns: ``(key -> committed version, key -> the entry that refused a
            conditional intent, key -> error)``. A plain write is never
            refused: it retries above whatever version it met.
        """
        if self._unchecked:
            self._ready()
        catalog = self._catalog
        below = target is catalog.payload_tier
        hot, cache = self._hot, self._cache
        copy_up = target is Tier.HOT and hot is not None
        committed: dict[str, int] = {}
        refused: dict[str, Entry | None] = {}
        failed: dict[str, BaseException] = {}
        pending = self._unless_held(intents, refused) if below else intents
        next_version, next_many = self._clock.next, self._clock.next_many
        give_up = 0.0
        attempt = 0
        while pending:
            attempt += 1
            if attempt > 1:
                if not give_up:
                    give_up = time.monotonic() + _GIVE_UP
                elif time.monotonic() > give_up:
                    break
                if attempt > 3:
                    time.sleep(random.uniform(0.0, min(0.05, 0.0002 * 2 ** attempt)))
            now, started = time.time(), time.monotonic()
            versions: dict[str, int] = {}
            entries: dict[str, tuple[str, Metadata]] = {}
            payloads: dict[str, tuple[str, Metadata]] = {}
            # A batch of fresh writes takes its versions under one lock.
            fresh = iter(next_many(len(pending))) if len(pending) > 1 and all(
                it.fixed is None and not it.after and not it.expected for it in pending) else None
            for it in pending:
                payload = it.payload
                if it.fixed is not None:
                    version, md = it.fixed["version"], it.fixed
                else:
                    if fresh is not None:
                        version = next(fresh)
                    else:
                        floor = it.after if it.expected is None or it.after > it.expected else it.expected
                        version = next_version(floor)
                    md = (make_tombstone(version, now=now) if payload is None
                          else make_metadata(payload, version, now=now, ttl=ttl,
                                             encoding=self._encoding))
                it.version = versions[it.key] = version
                if payload is None:
                    entries[it.key] = ("", md)
                elif below:
                    payloads[it.key] = (payload, md)
                    entries[it.key] = catalog.stub_for(it.key, md)
                else:
                    entries[it.key] = (payload, md)
            if cache is not None:
                cache.discard(versions)
            copies: dict[str, Entry] = {}
            done: KeySet = set()
            errors: dict[str, BaseException] = {}
            ticket = hot.before_write(versions) if hot is not None else None
            try:
                if payloads:
                    errors = self._store_below(payloads, entries, fresh=all(
                        it.fixed is None for it in pending if it.key in payloads))
                    if time.monotonic() - started > GARBAGE_GRACE / 2:
                        raise _TooSlow  # the sweep may count these payloads as garbage already
                if ticket is not None:
                    hot.refresh_if_old(ticket)  # type: ignore[union-attr]
                if time.monotonic() - started > self._fresh_for:
                    # The key may have been deleted and its tombstone purged
                    # since these versions were made: they could go backwards.
                    raise _TooSlow
                done, more = self._conditional(
                    [it for it in pending if it.key not in errors] if errors else pending, entries)
                errors.update(more)
                for key in done:
                    committed[key] = versions[key]
                    if copy_up:
                        payload, md = entries[key]
                        if md["encoding"] != TOMBSTONE:
                            copies[key] = Entry(key, payload, md)
            except _TooSlow:
                continue
            finally:
                if ticket is not None:
                    hot.after_write(ticket, copies)  # type: ignore[union-attr]
                if cache is not None:
                    cache.discard(versions)
            if len(done) == len(pending):
                return committed, refused, failed
            failed.update(errors)
            lost = [it for it in pending if it.key not in done and it.key not in errors]
            if payloads:
                # Only versions this call made are unreferenced for sure; a kept
                # (restored) version may be one the catalog points at.
                catalog.drop_payloads({it.key: it.version for it in lost
                                       if it.key in payloads and it.fixed is None})
            pending = self._retry(lost, refused)
        else:
            return committed, refused, failed
        for it in pending:  # still losing to other writers
            failed[it.key] = BackendError(
                    f"gave up writing {it.key!r} after {attempt} attempts in {_GIVE_UP:.0f}s: "
                "other writers kept writing it with newer versions")
        return committed, refused, failed

    def _unless_held(self, intents: list[_Intent], refused: dict[str, Entry | None]) -> list[_Intent]:
        """Drop restored records whose version the catalog holds already.

        A kept version names its payload like the one the catalog may point
        at: writing it again could replace those bytes with others.
        """
        fixed = [it.key for it in intents if it.fixed is not None]
        if not fixed:
            return intents
        held = self._catalog.repo.fetch_many(fixed)
        keep = []
        for it in intents:
            entry = held.get(it.key)
            if it.fixed is not None and entry is not None and entry.version >= it.fixed["version"]:
                refused[it.key] = entry
            else:
                keep.append(it)
        return keep

    def _store_below(self, payloads: dict[str, tuple[str, Metadata]],
                     entries: dict[str, tuple[str, Metadata]], *, fresh: bool
                     ) -> dict[str, BaseException]:
        """Store the payloads of a write aimed below the catalog as one segment
        where the tier keeps segments (its stubs then replace the ones in
        ``entries``), otherwise one object each.

        A single payload of a version this write made (``fresh``) is one
        object, as cheap as a one-record segment: its name, from key and
        version, was never used. A restored version may have been below
        before, and an object of it could be deleted by a sweep retiring the
        old one; a segment's name is always new.

        :returns: ``key -> error`` for the payloads not stored.
        """
        catalog = self._catalog
        if catalog.segments is None or (len(payloads) == 1 and fresh):
            return catalog.store_payloads(payloads)
        try:
            _, stubs = catalog.store_segment(payloads)
        except SegmentCollected:
            # Only possible once these versions are older than the sweep's
            # grace: the write starts over with new ones.
            raise _TooSlow from None
        except BackendError as exc:
            return dict.fromkeys(payloads, exc)
        entries.update(stubs)
        return {}

    def _conditional(self, pending: list[_Intent], entries: dict[str, tuple[str, Metadata]]
                     ) -> tuple[KeySet, dict[str, BaseException]]:
        """One conditional catalog write per group: "if newer" and "if version"."""
        repo = self._catalog.repo
        if len(pending) == 1:  # one key: the single-key statement; errors raised as they are
            it = pending[0]
            payload, md = entries[it.key]
            ok = (repo.store_if_newer(it.key, payload, md) if it.expected is None
                  else repo.store_if_version(it.key, payload, md, it.expected))
            return ({it.key} if ok else set()), {}
        newer = {it.key: entries[it.key] for it in pending if it.expected is None}
        exact = {it.key: entries[it.key] for it in pending if it.expected is not None}
        expected = {it.key: it.expected for it in pending if it.expected is not None}
        done: KeySet = set()
        errors: dict[str, BaseException] = {}
        for group in (newer, exact):
            if not group:
                continue
            try:
                done |= (repo.store_many_if_newer(group) if group is newer
                         else repo.store_many_if_version(group, expected))
            except BatchError as exc:
                done |= set(exc.succeeded)
                errors.update(exc.failed)
            except BackendError as exc:
                errors.update(dict.fromkeys(group, exc))
        return done, errors

    def _retry(self, lost: list[_Intent], refused: dict[str, Entry | None]) -> list[_Intent]:
        """Decide, from the entries that refused them, which intents to try again.

        A plain write met a version at least its own (a writer with a faster
        clock): it retries above it. A compare-and-set or a delete whose
        expected version is no longer the live one is done: refused. A
        restored record met a newer one: refused.
        """
        if not lost:
            return []
        repo = self._catalog.repo
        now = time.time()
        keys = [it.key for it in lost]
        current = ({} if (e := repo.fetch_record(keys[0])) is None else {keys[0]: e}) \
            if len(keys) == 1 else repo.fetch_many(keys)
        again = []
        for it in lost:
            entry = current.get(it.key)
            live = 0 if entry is None or not entry.live(now) else entry.version
            stored = 0 if entry is None else entry.version
            self._clock.observe(stored)
            if it.fixed is not None:
                refused[it.key] = entry
            elif it.expected is None:
                it.after = stored
                again.append(it)
            elif it.payload is None:  # a delete: of whatever version is live now
                if live and not it.pinned:
                    it.expected, it.after = live, stored
                    again.append(it)
                else:
                    refused[it.key] = entry
            elif live == it.expected:  # a compare-and-set that met a newer tombstone
                it.after = stored
                again.append(it)
            else:
                refused[it.key] = entry
        return again

    # ------------------------------------------------------------ reads
    def get(self, key: str, default: Any = None, *, promote: bool | None = None) -> Any:
        """The value of ``key``; ``default`` if absent. A stored ``None`` is returned as ``None``.

        Reads HOT (when its copy may be served), else the catalog; a value
        found below HOT is copied up to ``policy.promote_to``.

        >>> version = state.set("position:BTC", {"qty": 1.5})
        >>> state.get("position:BTC")
        {'qty': 1.5}
        >>> state.get("position:ETH") is None, state.get("position:ETH", {"qty": 0})
        (True, {'qty': 0})

        :param promote: False: copy nothing up; True: copy up even if the
            policy says never (to HOT then); None: as the policy says.

        :raises InvalidKeyError: the key is invalid (before any I/O).
        :raises IntegrityError: no copy passes its checksum.
        :raises BackendUnavailableError: the catalog is down (and HOT had no copy).
        """
        key = user_key(key)
        read_catalog = self._direct_catalog
        if read_catalog is not None:
            # No HOT to fill: the catalog's payload-only read answers a value
            # or a miss at once; anything else takes the routine below.
            try:
                payload = read_catalog(key, self._encoding)
            except IntegrityError:
                payload = ""  # the routine looks for a valid copy below
            if payload:
                self._tick(self._catalog_hit)
                if self._access.enabled:
                    self._access.note(key)
                return self.codec.decode(payload)
            if payload is None:
                self._tick("miss")
                return default
        hot = self._direct_hot
        if hot is not None:
            # The hottest path: a copy HOT may serve, answered without the
            # generic routine's objects (counted and noted inline, too). A
            # miss goes on without asking HOT again.
            payload = hot.payload(key, self._encoding)
            if payload is not None:
                self._tick("hit_hot")
                if self._access.enabled:
                    self._access.note(key)
                return self.codec.decode(payload)
            found = self._resolve_one(key, self._promote_to[promote], hot_missed=True)
        else:
            found = self._resolve_one(key, self._promote_to[promote])
        if found is None:
            return default
        self._access.note(key)
        return self._decode(found.entry)

    def get_record(self, key: str, *, promote: bool | None = None) -> Record | None:
        """The value with its metadata and the tier it came from, or None
        (``promote`` as for :meth:`get`).

        >>> version = state.set("position:BTC", {"qty": 1.5})
        >>> record = state.get_record("position:BTC")
        >>> record.value, record.version == version, record.tier
        ({'qty': 1.5}, True, <Tier.HOT: 'hot'>)
        >>> state.get_record("position:ETH") is None
        True
        """
        key = user_key(key)
        found = self._resolve_one(key, self._promote_to[promote])
        if found is None:
            return None
        self._access.note(key)
        return found.record(self.codec)

    def _decode(self, entry: Entry) -> Any:
        """The value of a resolved entry, by the codec that wrote it."""
        return decode_entry(entry.payload, entry.metadata["encoding"], self.codec)

    def get_many(self, keys: Iterable[str], *, promote: bool | None = None) -> dict[str, Any]:
        """Values of the keys found (missing keys omitted), one bulk read per
        tier (``promote`` as for :meth:`get`).

        >>> versions = state.set_many({"order:1": {"px": 100}, "order:2": {"px": 101}})
        >>> state.get_many(["order:1", "order:2", "order:3"])
        {'order:1': {'px': 100}, 'order:2': {'px': 101}}
        """
        wanted = list(dict.fromkeys(user_key(k) for k in validate_keys(keys)))
        if not wanted:
            return {}
        found = self._resolve(wanted, self._promote_to[promote])
        self._access.note_many(found)
        return {k: self._decode(found[k].entry) for k in wanted if k in found}

    def keys(self, pattern: str = "*") -> list[str]:
        """Sorted keys matching the glob ``pattern``: a listing of the catalog.

        >>> versions = state.set_many({"order:2": 2, "order:1": 1, "fill:1": 3})
        >>> state.keys("order:*")
        ['order:1', 'order:2']
        """
        return sorted(set(self.iter_keys(pattern)))

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        """Keys matching ``pattern``, streamed from the catalog in bounded memory
        (in key order where the catalog lists in order: sqlite, postgres).

        >>> versions = state.set_many({"order:2": 2, "order:1": 1, "fill:1": 3})
        >>> sorted(state.iter_keys("order:*"))
        ['order:1', 'order:2']
        """
        validate_pattern(pattern)
        if self._unchecked:
            self._ready()
        return (k for k in self._catalog.repo.iter_keys(pattern) if not k.startswith(RESERVED_PREFIX))

    def iter_records(
        self, pattern: str = "*", *,
        on_error: Callable[[str, IntegrityError], None] | None = None,
    ) -> Iterator[Record]:
        """Every live record matching ``pattern``, streamed from the catalog in
        pages of :data:`CHUNK` (key order where the catalog lists in order).

        A listing never fills HOT and never counts as a read.

        >>> version = state.set("order:1", {"px": 100})
        >>> [(record.key, record.value) for record in state.iter_records("order:*")]
        [('order:1', {'px': 100})]

        :param on_error: called with (key, error) for a record that fails its
            checksum, which is then left out; without it the error is raised.
        """
        validate_pattern(pattern)
        if self._unchecked:
            self._ready()
        catalog = self._catalog
        listed = (k for k in catalog.repo.iter_keys(pattern) if not k.startswith(RESERVED_PREFIX))
        for chunk in chunked(listed, CHUNK):
            found, corrupt = catalog.resolve(catalog.repo.fetch_many(chunk), time.time())
            for key in corrupt:
                error = IntegrityError(f"every copy of {key!r} fails its checksum", key)
                if on_error is None:
                    raise error
                on_error(key, error)
            for key in chunk:
                if key in found:
                    yield found[key].record(self.codec)

    # ------------------------------------------------------------ writes
    def set(
        self,
        key: str,
        value: Any,
        tier: TierLike = Tier.HOT,
        ttl: Seconds | None = None,
        *,
        if_version: int | None = None,
    ) -> int:
        """Store ``value`` under ``key``; durable when it returns.

        >>> v1 = state.set("order:7", {"status": "new"})
        >>> v2 = state.set("order:7", {"status": "filled"}, if_version=v1)  # compare-and-set
        >>> v2 > v1
        True
        >>> state.set("order:7", {"status": "cancelled"}, if_version=v1)
        Traceback (most recent call last):
          ...
        tiered_state.errors.ConflictError: version conflict on 'order:7': expected ..., found ...
        >>> session = state.set("session:42", {"user": 7}, tier="warm", ttl=3600)

        :param tier: where the value is kept: HOT (a copy, written through to
            the catalog), WARM (the catalog) or COLD (a payload below the
            catalog); an unconfigured tier means the next one down.
        :param ttl: the record's lifetime in seconds, in every tier (None: forever).
        :param if_version: compare-and-set: store only if the current version
            is this (0: only if absent now), decided by the catalog.
        :returns: the new version.
        :raises InvalidKeyError: bad key; :raises SerializationError: value not
            encodable (nothing written in either case).
        :raises ConflictError: ``if_version`` did not match.
        :raises BackendUnavailableError: the catalog is down (nothing stored).
        """
        key = user_key(key)
        ttl = _check_ttl(ttl)
        if if_version is not None and (
            isinstance(if_version, bool) or not isinstance(if_version, int) or if_version < 0
        ):
            raise ConfigurationError(f"if_version must be an int >= 0, not {if_version!r}")
        intent = _Intent(key, self.codec.encode(value), expected=if_version)
        committed, refused, failed = self._commit([intent], self._target(tier), ttl)
        if key in committed:
            return committed[key]
        if key in failed:
            raise failed[key]
        entry = refused.get(key)
        raise ConflictError(key, if_version or 0, entry.version if entry is not None and entry.live() else 0)

    def set_many(
        self, items: Mapping[str, Any], tier: TierLike = Tier.HOT, ttl: Seconds | None = None
    ) -> dict[str, int]:
        """Store many values with one conditional bulk write.

        Every key is validated and every value encoded first: one bad input
        raises and nothing is written.

        >>> versions = state.set_many({"order:1": {"px": 100}, "order:2": {"px": 101}}, tier="warm")
        >>> sorted(versions)
        ['order:1', 'order:2']

        :returns: ``key -> version``.
        :raises BatchError: a backend failed part-way; ``.failed`` /
            ``.succeeded`` say which keys.
        """
        if not isinstance(items, Mapping):
            raise ConfigurationError("set_many takes a mapping of key -> value")
        ttl = _check_ttl(ttl)
        target = self._target(tier)
        encode = self.codec.encode
        intents = [_Intent(user_key(k), encode(v)) for k, v in items.items()]
        committed: dict[str, int] = {}
        failed: dict[str, BaseException] = {}
        # Everything is validated and encoded above; the writes go in chunks
        # (as restore's do): a smaller working set per conditional write, and
        # a failure part-way still reports every key.
        for start in range(0, len(intents), CHUNK):
            chunk = intents[start:start + CHUNK]
            try:
                done, _, errors = self._commit(chunk, target, ttl)
            except BatchError as exc:
                done, errors = {}, dict(exc.failed)
            except BackendError as exc:
                done, errors = {}, dict.fromkeys((i.key for i in chunk), exc)
            committed.update(done)
            failed.update(errors)
        if failed:
            raise BatchError("set_many failed for some keys", failed, sorted(committed))
        return committed

    def delete(self, key: str) -> bool:
        """Delete ``key``. True if this call deleted it (it existed and no one else deleted it first).

        >>> version = state.set("order:1", {"px": 100})
        >>> state.delete("order:1"), state.delete("order:1")
        (True, False)
        """
        key = user_key(key)
        return key in self._delete([key])

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete many keys with one conditional bulk write; how many this call deleted.

        >>> versions = state.set_many({"order:1": 1, "order:2": 2})
        >>> state.delete_many(["order:1", "order:2", "order:3"])
        2
        """
        wanted = list(dict.fromkeys(user_key(k) for k in validate_keys(keys)))
        return len(self._delete(wanted)) if wanted else 0

    def _delete(self, keys: list[str], versions: Mapping[str, int] | None = None) -> KeySet:
        """Turn the live entries of ``keys`` into tombstones; the keys this call deleted.

        :param versions: delete a key only while its live version is this one.
        """
        if self._unchecked:
            self._ready()
        repo = self._catalog.repo
        now = time.time()
        entries = ({} if (e := repo.fetch_record(keys[0])) is None else {keys[0]: e}) \
            if len(keys) == 1 else repo.fetch_many(keys)
        pinned = versions is not None
        intents = [_Intent(k, None, expected=e.version, after=e.version, pinned=pinned)
                   for k, e in entries.items()
                   if e.live(now) and (versions is None or versions.get(k) == e.version)]
        if self._cache is not None:
            self._cache.discard(keys)
        if not intents:
            return set()
        committed, _, failed = self._commit(intents, self._catalog.tier, None)
        # The payloads of deleted stubs: superseded, never referenced again.
        self._catalog.drop_payloads({k: e.version for k, e in entries.items()
                                     if k in committed and e.kind == "stub"})
        if failed:
            if len(keys) == 1:
                raise next(iter(failed.values()))
            raise BatchError("delete_many failed for some keys", failed, sorted(committed))
        return set(committed)

    def touch(self, key: str, ttl: Seconds | None) -> bool:
        """Give ``key`` a new lifetime in every tier: ``ttl`` from now (None:
        no expiry). Its value and version stay as they are.

        The catalog entry is rewritten with one conditional write; a record
        in COLD comes back into the catalog's tier, as with ``promote(key,
        to="warm")``. Copies in HOT are dropped rather than rewritten -- one
        with the old expiry must never outlive the record -- so the next
        reads come from the catalog (and, with Redis as HOT, keep doing so
        until the key's next write or for at most five minutes).

        >>> version = state.set("session:42", {"user": 7}, ttl=60)
        >>> state.touch("session:42", 3600), state.touch("session:43", 3600)
        (True, False)
        >>> state.touch("session:42", None)  # no expiry any more
        True
        >>> state.get_record("session:42").expires_at is None
        True

        :returns: True if the key exists, False if it is absent (or expired).
        """
        key = user_key(key)
        expires_in = _check_ttl(ttl)
        if self._unchecked:
            self._ready()
        catalog = self._catalog
        repo = catalog.repo
        entry = repo.fetch_record(key)
        now = time.time()
        if entry is None or not entry.live(now):
            return False
        if entry.kind == STUB:
            # The value goes into the catalog rather than the stub back: a stub
            # written again could name a segment or object the sweep retired
            # since the read (compacted or packed at the same version).
            found, corrupt = catalog.resolve({key: entry}, now)
            if corrupt:
                self._count("integrity_errors")
                raise IntegrityError(f"every copy of {key!r} fails its checksum", key)
            if key not in found:
                return False
            entry = found[key].entry
        metadata = entry.metadata.copy()
        metadata["expires_at"] = None if expires_in is None else now + expires_in
        # Refused only if a write or delete came in since the read: the touch
        # then happened just before it, and was superseded by it.
        repo.store_if_version(key, entry.payload, metadata, entry.version)
        if self._cache is not None:
            self._cache.discard((key,))
        if self._hot is not None:
            self._hot.drop({key: entry.version})
        return True

    def _claim(self, name: str, seconds: float, held: int = 0) -> int:
        """Take (``held`` 0) or renew (``held``: its version) the lease ``name``
        for ``seconds``, with one conditional catalog write.

        :returns: the lease's new version, or 0 if someone else holds it.
        """
        payload = f'{{"pid":{os.getpid()},"thread":{threading.get_ident()}}}'
        intent = _Intent(name, payload, expected=held)
        committed, _, failed = self._commit([intent], self._catalog.tier, seconds)
        if name in failed:
            raise failed[name]
        return committed.get(name, 0)

    def _release(self, name: str, version: int) -> None:
        """Give up the lease ``name`` if it is still at ``version``."""
        self._delete([name], {name: version})

    def restore(
        self, records: Iterable[Record], *,
        on_error: Callable[[Record, Exception], None] | None = None,
    ) -> RestoreReport:
        """Write records as exported (``iter_records``), keeping their versions and timestamps.

        A record goes in only if the store holds no newer version of its key,
        so restoring an old backup never overwrites newer state; expired
        records are skipped. Each record goes to its own tier (the catalog if
        that tier is HOT or not configured). Records are written in batches
        of :data:`CHUNK` through the same conditional write as ``set_many``.

        >>> version = state.set("order:1", {"px": 100})
        >>> copy = tiered_state.open(folder / "copy")
        >>> copy.restore(state.iter_records())
        RestoreReport(restored=1, unchanged=0, newer=0, expired=0)
        >>> copy.get_record("order:1").version == version
        True
        >>> copy.restore(state.iter_records()).unchanged  # restored twice: nothing to do
        1
        >>> copy.close()

        :param on_error: called with (record, error) for a record that cannot
            be written as it is -- an invalid or reserved key, a value that
            does not match its checksum -- which is then left out; without it
            the error is raised before anything of the record's batch is written.
        """
        report = RestoreReport()
        for chunk in chunked(records, CHUNK):
            now = time.time()
            by_tier: dict[Tier, list[_Intent]] = {}
            for record in chunk:
                try:
                    key = user_key(record.key)
                    payload = self.codec.encode(record.value)
                    md = make_metadata(payload, int(record.version), now=record.updated_at,
                                       created_at=record.created_at, encoding=self._encoding)
                    if md["checksum"] != record.checksum:
                        raise IntegrityError(f"the value of {key!r} does not match its checksum", key)
                except (InvalidKeyError, IntegrityError, SerializationError) as exc:
                    if on_error is None:
                        raise
                    on_error(record, exc)
                    continue
                md["expires_at"] = record.expires_at
                if record.expires_at is not None and record.expires_at <= now:
                    report.expired += 1
                    continue
                tier = Tier.parse(record.tier)
                target = tier if tier in self._repos and tier is not Tier.HOT else self._catalog.tier
                by_tier.setdefault(target, []).append(_Intent(key, payload, fixed=md))
            for target, intents in by_tier.items():
                committed, refused, failed = self._commit(intents, target, None)
                if failed:
                    raise BatchError("restore failed for some keys", failed, sorted(committed))
                report.restored += len(committed)
                kept = {it.key: it.fixed["version"] for it in intents if it.fixed is not None}
                same = sum(1 for key, entry in refused.items()
                           if entry is not None and entry.version == kept[key])
                report.unchanged += same
                report.newer += len(refused) - same
        return report

    # ------------------------------------------------------------ migration
    def promote(self, key: str, to: TierLike = Tier.HOT) -> bool:
        """Copy ``key`` up into tier ``to``; every other copy stays.

        >>> version = state.set("order:1", {"px": 100}, tier="cold")
        >>> state.get_record("order:1", promote=False).tier
        <Tier.COLD: 'cold'>
        >>> state.promote("order:1", to="warm")
        True
        >>> state.get_record("order:1", promote=False).tier
        <Tier.WARM: 'warm'>

        :returns: True if ``to`` now holds the current version, False if the
            key is absent (or a write replaced it meanwhile).
        """
        key = user_key(key)
        target = Tier.parse(to)
        if target not in self._repos:
            raise ConfigurationError(f"tier {target.value!r} is not configured")
        hot = self._hot
        token = hot.token() if hot is not None else 0.0
        found = self._resolve_one(key, None)
        if found is None:
            return False
        if target is Tier.HOT:
            if found.tier is Tier.HOT or hot is None:
                return True
            if hot.fill({key: found.entry}, token):
                self._count("promotions")
                return True
            copy = hot.lookup(key)
            return copy is not None and copy.version == found.entry.version
        if target is not self._catalog.tier:
            return True  # at or above the payload tier already: nothing to copy
        entry = self._catalog.repo.fetch_record(key)
        if entry is None or entry.version != found.entry.version:
            return False  # a write came in meanwhile
        if entry.kind == "value":
            return True
        if self._catalog.lift({key: found.entry}):
            self._count("promotions")
            return True
        return False

    def demote(self, key: str, to: TierLike = Tier.COLD) -> bool:
        """Move ``key`` down into tier ``to``: afterwards no copy remains above it.

        Into COLD under a WARM catalog: copy the payload, verify it, turn the
        entry into a stub of the same version; a write racing the move wins.

        >>> version = state.set("position:BTC", {"qty": 1.5})
        >>> state.demote("position:BTC", to="cold")
        True
        >>> [(copy.tier, copy.role) for copy in state.inspect("position:BTC")]
        [('warm', 'stub'), ('cold', 'payload')]
        >>> state.demote("position:BTC", to="cold")  # nothing left to move
        False

        :returns: True if something moved: the value went down to ``to``, or a
            copy above ``to`` was removed. False if nothing did: the key is
            absent, lives at or below ``to`` already with no copy above it,
            or a newer write came in meanwhile.
        """
        key = user_key(key)
        target = Tier.parse(to)
        repo = self._repos.get(target)
        if repo is None:
            raise ConfigurationError(f"tier {target.value!r} is not configured")
        if repo.volatile:
            raise ConfigurationError("demote needs a durable target tier")
        if self._unchecked:
            self._ready()
        catalog = self._catalog
        entry = catalog.repo.fetch_record(key)
        if entry is None or not entry.live():
            return False
        if self._cache is not None:
            self._cache.discard((key,))
        moved = False  # a key below ``to`` already is never moved up; a HOT copy goes
        if target is catalog.payload_tier and entry.kind == "value":
            report = SweepReport()
            if not self._sweeper.move([entry], report):
                if report.failed:
                    raise IntegrityError(f"{key!r} was not moved: {report.errors.get(key)}", key)
                return False
            moved = True
        if self._hot is not None:
            copy = self._hot_copy(key)
            if copy is not None:
                self._hot.drop({key: max(copy.version, entry.version)})
                moved = True
            elif moved:
                self._hot.drop({key: entry.version})
        return moved

    def _hot_copy(self, key: str) -> Entry | None:
        """The copy of ``key`` stored in HOT as it is (not a placeholder), or None."""
        try:
            copy = self._repos[Tier.HOT].fetch_record(key)
        except (BackendError, IntegrityError):
            return None
        return copy if copy is not None and copy.kind == "value" else None

    def sweep(
        self, progress: Callable[[SweepReport], None] | None = None, *, dry_run: bool = False
    ) -> SweepReport:
        """Run the tiering policy once (see :mod:`tiered_state.sweep`).

        Moves WARM records idle longer than ``cold_after`` to COLD, purges dead
        entries and collects unreferenced payloads, in batches of
        ``policy.batch_size`` so memory stays flat.

        >>> from tiered_state import TieringPolicy
        >>> bot = tiered_state.open(folder / "bot", policy=TieringPolicy(cold_after=0))
        >>> versions = bot.set_many({"fill:1": {"qty": 1}, "fill:2": {"qty": 2}}, tier="warm")
        >>> bot.sweep(dry_run=True).moved  # what would move; nothing does
        2
        >>> report = bot.sweep()
        >>> report.moved, report.failed
        (2, 0)
        >>> bot.get_record("fill:1", promote=False).tier
        <Tier.COLD: 'cold'>
        >>> bot.close()

        :param progress: called with the running report after every batch.
        :param dry_run: only count what would be moved and purged; nothing is
            written except the pending read times the idle test needs.
        """
        if self._unchecked:
            self._ready()
        self._access.flush()
        return self._sweeper.run(progress, dry_run=dry_run)

    def flush_access(self) -> None:
        """Write the pending read times to the catalog now (the sweep and close do it too)."""
        self._access.flush()

    # ------------------------------------------------------------ introspection
    def _cost(self, tier: Tier, found: dict[str, Any]) -> dict[str, Any]:
        """What a tier's records cost to keep: ``records``, ``live_bytes``
        (their payloads), ``allocated_bytes`` (what the store takes),
        ``segments`` and ``dead_fraction`` (of the bytes allocated to records,
        the part no live record uses: free pages, dead segment frames).
        None where the backend does not tell."""
        allocated = found.get("file_bytes")
        free = found.get("free_bytes")
        cost: dict[str, Any] = {
            "records": found.get("key_count"),
            "live_bytes": found.get("payload_bytes"),
            "allocated_bytes": allocated,
            "segments": 0,
            "dead_fraction": free / allocated if free is not None and allocated else None,
        }
        catalog = self._catalog
        if tier is catalog.payload_tier and catalog.segments is not None:
            count = size = frames = live = records = 0
            for segment in catalog.scan_segments(time.time()):
                count += 1
                size += segment.size
                frames += segment.footer.frame_bytes
                live += segment.live_bytes
                records += len(segment.live)
            # Objects of their own (a single COLD write, an older store) count
            # as live: the sweep collects the ones no entry refers to.
            objects = allocated or 0
            cost.update(records=(cost["records"] or 0) + records, live_bytes=objects + live,
                        allocated_bytes=objects + size, segments=count,
                        dead_fraction=1 - live / frames if frames else 0.0)
        return cost

    def stats(self) -> dict[str, Any]:
        """Per-tier backend stats and the manager's counters (and hit ratios).

        ``tiers`` maps each configured tier's name to its backend's own
        figures (``key_count``, then sizes and settings by backend; an
        ``error`` text instead when the tier cannot be reached); ``manager``
        holds the counters -- ``hit_hot``, ``hit_warm``, ``hit_cold``,
        ``miss``, ``promotions``, ``demotions``, ``integrity_errors``,
        ``tier_errors``... -- ``hit_ratio`` per tier, the ``catalog`` tier
        and the tiers ``down`` now (and ``metrics``, an
        :class:`~tiered_state.metrics.InMemoryMetrics` snapshot, when that is
        the collector).

        >>> versions = state.set_many({"order:1": 1, "order:2": 2}, tier="warm")
        >>> state.get("order:1"), state.get("order:1")  # from WARM, then from the copy it promoted
        (1, 1)
        >>> stats = state.stats()
        >>> stats["tiers"]["warm"]["key_count"], stats["manager"]["catalog"]
        (2, 'warm')
        >>> stats["manager"]["hit_warm"], stats["manager"]["hit_hot"], stats["manager"]["promotions"]
        (1, 1, 1)
        """
        tiers: dict[str, Any] = {}
        for tier in _ORDER:
            repo = self._repos.get(tier)
            if repo is None:
                continue
            try:
                tiers[tier.value] = repo.stats()
            except BackendError as exc:
                tiers[tier.value] = {"backend": repo.backend, "tier": tier.value, "error": str(exc)}
        for name, found in tiers.items():
            if isinstance(found.get("key_count"), int):
                # The library's own records (format, HOT marker and epoch, leases).
                repo = self._repos[Tier(name)]
                try:
                    found["key_count"] -= sum(1 for _ in repo.iter_keys(RESERVED_PREFIX + "*"))
                except BackendError as exc:
                    found["error"] = str(exc)
        for name, found in tiers.items():
            if "error" not in found:
                try:
                    found["cost"] = self._cost(Tier(name), found)
                except BackendError as exc:
                    found["error"] = str(exc)
        counters = dict(self._counters.values)
        reads = sum(counters[k] for k in ("hit_hot", "hit_warm", "hit_cold", "miss"))
        hot = self._hot
        manager: dict[str, Any] = {
            **counters,
            "hit_ratio": {
                k: (counters[f"hit_{k}"] / reads if reads else 0.0) for k in ("hot", "warm", "cold")
            },
            "catalog": self._catalog.tier.value,
            "down": ["hot"] if isinstance(hot, SharedHot) and hot.down else [],
        }
        snapshot = getattr(self.metrics, "snapshot", None)
        if callable(snapshot):
            manager["metrics"] = snapshot()
        return {"tiers": tiers, "manager": manager}

    def health(self) -> dict[str, dict[str, Any]]:
        """Reach every configured tier once.

        :returns: ``tier name -> {"backend", "ok", "latency_ms", "error"}``,
            ``error`` being the reason a tier could not be reached (text) or
            None; a backend with several servers (Redis Cluster, Sentinel)
            adds ``"topology"`` and ``"primaries"`` (``host:port`` of each
            primary serving it now).

        >>> {tier: row["ok"] for tier, row in state.health().items()}
        {'hot': True, 'warm': True, 'cold': True}
        """
        out: dict[str, dict[str, Any]] = {}
        for tier, info in self.check().items():
            row = out[tier.value] = {**info, "error": None if info["error"] is None
                                     else str(info["error"])}
            repo = getattr(self._repos[tier], "inner", self._repos[tier])
            primaries = getattr(repo, "primaries", None)
            if row["ok"] and callable(primaries):
                try:
                    row.update(topology=getattr(repo, "topology", None), primaries=primaries())
                except BackendError as exc:
                    row.update(ok=False, error=str(exc))
        return out

    def inspect(self, key: str) -> list[CopyInfo]:
        """Every stored copy and catalog entry of ``key``, tier by tier, as stored.

        Never promotes, never repairs, never counts as a read: it shows what
        a read would choose from (see :class:`~tiered_state.CopyInfo`).

        >>> version = state.set("position:BTC", {"qty": 1.5})
        >>> for copy in state.inspect("position:BTC"):
        ...     print(copy.tier, copy.role, copy.location, copy.current, copy.checksum_ok)
        hot copy memory:position:BTC True True
        warm value sqlite:position:BTC True True
        """
        key = user_key(key)
        if self._unchecked:
            self._ready()
        return inspect_key(key, self._catalog, self._repos.get(Tier.HOT) if self._hot else None)

    def check(self) -> dict[Tier, dict[str, Any]]:
        """Reach every configured tier once: ``tier -> {backend, ok, latency_ms, error}``.

        Like :meth:`health`, keyed by :class:`~tiered_state.Tier`, with the
        exception itself as ``error``.
        """
        out: dict[Tier, dict[str, Any]] = {}
        for tier in _ORDER:
            repo = self._repos.get(tier)
            if repo is None:
                continue
            try:
                out[tier] = {"backend": repo.backend, "ok": True, "latency_ms": repo.ping(),
                             "error": None}
            except (BackendError, ConfigurationError) as exc:  # unreachable, or misconfigured
                out[tier] = {"backend": repo.backend, "ok": False, "latency_ms": None,
                             "error": exc}
        return out

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Flush pending read times and close every repository. Idempotent;
        every other call afterwards raises :class:`~tiered_state.ClosedError`.

        >>> state.close()
        >>> state.close()  # again: nothing happens
        >>> state.get("position:BTC")
        Traceback (most recent call last):
          ...
        tiered_state.errors.ClosedError: get() on a closed StateManager
        """
        if self._closed:
            return
        self._closed = True
        # Instance attributes shadow the methods: an open manager's calls pay
        # nothing for this, a closed one's fail with a clear error instead of
        # whatever a closed connection would say.
        for name in _CALLS:
            setattr(self, name, _refusal(name))
        try:
            self._access.flush()
        finally:
            for repo in self._repos.values():
                try:
                    repo.close()
                except BackendError:
                    log.warning("error closing %s", repo.backend, exc_info=True)
            if self.owns_metrics and self.metrics is not None:
                self.metrics.close()  # sends what is still buffered

    def __enter__(self) -> StateManager:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
