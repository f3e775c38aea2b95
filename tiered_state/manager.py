"""StateManager: tiered reads and writes, promotion, loss-free migration.

The invariants this module keeps, and how:

* **Durable writes.** A ``set`` to a volatile tier (memory, redis) is written
  to the first durable tier below it before ``set`` returns. The order is:
  invalidate the volatile copies, store the durable copy, then delete stale
  copies in tiers above it, then store the volatile copy. A crash at any
  point leaves the newest successfully stored value readable.
* **No shadowing.** Copies are only ever written with ``store_if_newer``, so a
  slow promotion never overwrites a newer write; a promotion re-reads its
  source afterwards and withdraws the copy if the source changed meanwhile.
  An expired record in a durable tier is a tombstone: reads stop there
  instead of falling through to an older copy below, until a sweep purges
  both.
* **Migration copies, verifies, then deletes** the source only if it still
  holds the version that was copied (``delete_if_version``), so a ``set``
  racing a sweep wins.
* **A dead HOT tier degrades** to the tiers below. A write that could not
  invalidate HOT persists a marker in the durable tier *before* writing;
  whoever reconnects to HOT (this process, or a new one at ``open``) sees the
  marker and flushes HOT before serving from it again.
* **A process-local HOT tier** (memory) asks the WARM backend whether another
  connection wrote (SQLite's ``PRAGMA data_version``) before serving a copy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any

from . import codec
from .config import ENV_COLD, ENV_HOT, ENV_PATH, ENV_WARM, environ, open_repository, redact
from .errors import (
    BackendError,
    BackendUnavailableError,
    BatchError,
    ConfigurationError,
    ConflictError,
    IntegrityError,
    InvalidKeyError,
)
from .keys import validate_key, validate_keys, validate_pattern
from .metrics import MetricsCollector, as_collector, metrics_from_env
from .policy import SweepReport, TieringPolicy
from .record import Entry, Metadata, Record, Tier, VersionClock, make_metadata
from .metrics import InstrumentedRepository
from .repositories.base import StateRepository, chunked

__all__ = ["LocalCache", "StateManager", "open"]

log = logging.getLogger(__name__)

_MISSING: Any = object()
_ORDER = (Tier.HOT, Tier.WARM, Tier.COLD)

#: Keys under this prefix are the manager's own bookkeeping (never listed,
#: refused as user keys).
RESERVED_PREFIX = "__tiered_state__:"
_HOT_DIRTY = RESERVED_PREFIX + "hot-dirty"
_CHANGED = RESERVED_PREFIX + "changed"

#: How long a tier that failed with BackendUnavailableError is skipped before
#: the next attempt; a dead Redis then costs one timeout per interval, not one
#: per call.
RETRY_INTERVAL = 1.0
#: How often a process that sees HOT healthy checks for another process's
#: "HOT is stale" marker: the staleness bound when processes disagree on
#: whether HOT is reachable (a partial partition).
MARKER_CHECK_INTERVAL = 1.0
#: Reads tracked for the sweep's idle test are flushed in batched writes when
#: this many distinct keys are pending or FLUSH_SECONDS have passed (the set
#: deduplicates, so a working set read over and over costs one write per key
#: per FLUSH_SECONDS).
FLUSH_ITEMS = 50_000
FLUSH_SECONDS = 30.0


@dataclass(frozen=True)
class LocalCache:
    """The optional in-process cache in front of every tier (off by default).

    It holds decoded-on-read payloads for ``ttl`` seconds. This process's own
    writes and deletes invalidate it at once; writes by *other* processes are
    seen after at most ``ttl`` seconds -- that is its staleness bound, so keep
    ``ttl`` short, or leave the cache off where several processes write.

    :param max_items: most entries kept (least recently used evicted).
    :param max_bytes: most payload bytes kept.
    :param ttl: seconds an entry is trusted.
    """

    max_items: int = 1024
    max_bytes: int | None = 16 * 1024 * 1024
    ttl: float = 1.0

    def __post_init__(self) -> None:
        if self.max_items < 1 or (self.max_bytes is not None and self.max_bytes < 1):
            raise ConfigurationError("LocalCache limits must be positive")
        if not self.ttl > 0:
            raise ConfigurationError("LocalCache ttl must be positive")


class _Cache:
    """The LocalCache store: key -> (entry, tier, trusted until)."""

    def __init__(self, options: LocalCache) -> None:
        self.options = options
        self._data: OrderedDict[str, tuple[Entry, Tier, float]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: str) -> tuple[Entry, Tier] | None:
        now = time.monotonic()
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[2] <= now or item[0].expired():
                self._drop(key)
                return None
            self._data.move_to_end(key)
            return item[0], item[1]

    def put(self, entry: Entry, tier: Tier) -> None:
        with self._lock:
            self._drop(entry.key)
            self._data[entry.key] = (entry, tier, time.monotonic() + self.options.ttl)
            self._bytes += entry.metadata["size_bytes"]
            limit_items, limit_bytes = self.options.max_items, self.options.max_bytes
            while self._data and (
                len(self._data) > limit_items
                or (limit_bytes is not None and self._bytes > limit_bytes)
            ):
                _, (old, _, _) = self._data.popitem(last=False)
                self._bytes -= old.metadata["size_bytes"]

    def _drop(self, key: str) -> None:
        item = self._data.pop(key, None)
        if item is not None:
            self._bytes -= item[0].metadata["size_bytes"]

    def discard(self, keys: Iterable[str]) -> None:
        with self._lock:
            for key in keys:
                self._drop(key)

    def clear(self) -> None:
        with self._lock:
            self._data.clear()
            self._bytes = 0


def _check_ttl(ttl: float | None) -> float | None:
    if ttl is None:
        return None
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not ttl > 0:
        raise ConfigurationError(f"ttl must be a positive number of seconds or None, not {ttl!r}")
    return float(ttl)


def _user_key(key: object) -> str:
    key = validate_key(key)
    if key[:1] == "_" and key.startswith(RESERVED_PREFIX):
        raise InvalidKeyError(f"keys starting with {RESERVED_PREFIX!r} are reserved")
    return key


def _to_record(entry: Entry, tier: Tier) -> Record:
    md = entry.metadata
    return Record(
        key=entry.key,
        value=codec.decode(entry.payload),
        version=md["version"],
        checksum=md["checksum"],
        size_bytes=md["size_bytes"],
        created_at=md["created_at"],
        updated_at=md["updated_at"],
        expires_at=md["expires_at"],
        tier=tier,
    )


class StateManager:
    """Application state across HOT, WARM and COLD tiers. Build it with :func:`open`.

    :param hot: the HOT repository, or None.
    :param warm: the WARM repository, or None.
    :param cold: the COLD repository, or None.
    :param policy: the :class:`TieringPolicy` (defaults as documented there).
    :param metrics: a :class:`~tiered_state.metrics.MetricsCollector` (or a
        ``statsd.StatsClient``); None records nothing.
    :param cache: a :class:`LocalCache` to enable the in-process cache.
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
    ) -> None:
        self.policy = policy or TieringPolicy()
        # A raw statsd.StatsClient is wrapped so it has histogram() and never raises.
        metrics = as_collector(metrics)
        self.metrics = metrics
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
        self._tiers: list[tuple[Tier, StateRepository]] = [(t, repos[t]) for t in _ORDER if t in repos]
        self._durable_for = {t: self._find_durable_below(t) for t in _ORDER}
        self._hot = repos.get(Tier.HOT)
        #: HOT has a durable tier below it, so a HOT failure can be degraded around.
        self._hot_backed = self._durable_below(Tier.HOT) is not None
        self._clock = VersionClock()
        self._cache = _Cache(cache) if cache is not None else None
        self._counters = dict.fromkeys(
            ("hit_hot", "hit_warm", "hit_cold", "miss", "promotions", "demotions",
             "integrity_errors", "tier_errors", "hot_flushes"), 0
        )
        # Counter handles: one C call per count on the read path.
        self._ticks = (
            {n: metrics.ticker("state.manager." + n).tick for n in self._counters}
            if metrics is not None else {}
        )
        self._down_until: dict[Tier, float] = {}
        self._next_marker_check = 0.0
        self._access: set[str] = set()
        self._access_lock = threading.Lock()
        self._access_at = 0.0
        self._access_flushed = time.time()
        self._closed = False
        self._warm_watch = self._watch_repository()
        if Tier.HOT in repos and repos[Tier.HOT].shared:
            # A shared HOT tier (redis) may hold copies made stale while it was
            # unreachable by a process that is gone now: honour its marker.
            try:
                self._recover_hot()
            except BackendUnavailableError as exc:
                self._mark_down(Tier.HOT, exc)

    # ------------------------------------------------------------ properties
    @property
    def repositories(self) -> Mapping[Tier, StateRepository]:
        """The configured repositories by tier, for direct access (read-only mapping)."""
        return MappingProxyType(self._repos)

    def __repr__(self) -> str:
        tiers = ", ".join(f"{t.value}={r.backend}" for t, r in self._tiers)
        return f"<StateManager {tiers}>"

    # ------------------------------------------------------------ plumbing
    def _count(self, name: str, n: int = 1) -> None:
        self._counters[name] += n
        if self.metrics is not None:
            try:
                if n == 1:
                    self._ticks[name]()
                elif n:
                    self.metrics.incr("state.manager." + name, n)
            except Exception:
                log.debug("metrics collector failed", exc_info=True)

    def _watch_repository(self) -> StateRepository | None:
        """The durable repository whose change signal guards a process-local HOT."""
        hot = self._repos.get(Tier.HOT)
        if hot is None or hot.shared:
            return None
        for tier, repo in self._tiers:
            if tier is not Tier.HOT and not repo.volatile:
                return repo
        return None

    def _usable(self, tier: Tier) -> bool:
        until = self._down_until.get(tier)
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        # Time to try again. HOT must be brought back to a state that cannot
        # serve stale copies before it is used.
        if tier is Tier.HOT and self._repos[Tier.HOT].shared:
            try:
                self._recover_hot()
            except BackendUnavailableError as exc:
                self._mark_down(tier, exc)
                return False
        self._down_until.pop(tier, None)
        log.warning("tier %s is reachable again", tier.value)
        return True

    def _mark_down(self, tier: Tier, exc: BaseException) -> None:
        if tier not in self._down_until:
            log.warning("tier %s unreachable, skipping it for %.1fs: %s", tier.value,
                        RETRY_INTERVAL, exc)
        self._down_until[tier] = time.monotonic() + RETRY_INTERVAL
        self._count("tier_errors")

    def _durable_below(self, tier: Tier) -> tuple[Tier, StateRepository] | None:
        """The first durable tier at or below ``tier`` (fixed once the tiers are)."""
        return self._durable_for[tier]

    def _find_durable_below(self, tier: Tier) -> tuple[Tier, StateRepository] | None:
        seen = False
        for t, repo in self._tiers:
            seen = seen or t is tier
            if seen and not repo.volatile:
                return t, repo
        return None

    def _target(self, tier: Tier | str) -> Tier:
        """The configured tier a write aimed at ``tier`` goes to (the next one down if off)."""
        wanted = Tier.parse(tier)
        if wanted in self._repos:
            return wanted
        for t in _ORDER[_ORDER.index(wanted):]:
            if t in self._repos:
                return t
        raise ConfigurationError(f"no tier is configured at or below {wanted.value!r}")

    def _hot_failed(self, exc: BackendUnavailableError) -> None:
        """HOT could not be invalidated: persist the marker so no one trusts it later."""
        self._mark_down(Tier.HOT, exc)
        hot = self._repos[Tier.HOT]
        if not hot.shared:
            return
        durable = self._durable_below(Tier.WARM)
        if durable is None:
            return
        # Written for every write that skips HOT, not once per outage: another
        # process may have flushed HOT and removed an earlier marker meanwhile.
        payload = codec.encode({"since": time.time(), "pid": os.getpid()})
        # Raises if the durable tier is down too: then the write fails as it must.
        durable[1].store(_HOT_DIRTY, payload, make_metadata(payload, self._clock.next(), now=time.time()))

    def _recover_hot(self) -> None:
        """Flush HOT if some process marked it stale while it was unreachable."""
        durable = self._durable_below(Tier.WARM)
        if durable is None:
            return
        marker = durable[1].fetch_record(_HOT_DIRTY)
        if marker is None:
            return
        flushed = self._repos[Tier.HOT].clear()
        self._count("hot_flushes")
        log.warning("HOT tier was written around during an outage: flushed %d copies", flushed)
        durable[1].delete_if_version(_HOT_DIRTY, marker.version)

    def _hot_call(self, fn: Callable[[], Any], *, invalidation: bool) -> Any:
        """Run a HOT operation; on unavailability degrade instead of failing.

        With no durable tier configured, HOT holds the only copy: then its
        failure is the operation's failure and is raised.
        """
        if not self._hot_backed:
            return fn()
        if self._down_until and not self._usable(Tier.HOT):
            if invalidation:
                self._hot_failed(BackendUnavailableError("skipped while unreachable", "hot"))
            return None
        try:
            return fn()
        except BackendUnavailableError as exc:
            if invalidation:
                self._hot_failed(exc)
            else:
                self._mark_down(Tier.HOT, exc)
            return None

    def _hot_copy(self, metadata: Metadata, now: float) -> Metadata:
        if self.policy.hot_ttl is None:
            return metadata
        copy = dict(metadata)
        copy["hot_until"] = now + self.policy.hot_ttl
        return copy  # type: ignore[return-value]

    def _copy_metadata(self, tier: Tier, metadata: Metadata, now: float) -> Metadata:
        repo = self._repos[tier]
        if repo.volatile:
            return self._hot_copy(metadata, now)
        return {k: v for k, v in metadata.items() if k != "hot_until"}  # type: ignore[return-value]

    def _note_access(self, keys: Iterable[str]) -> None:
        """Remember reads for the sweep's idle test; flushed in batches, never per read."""
        if self.policy.cold_after is None:
            return
        self._access_at = now = time.time()
        access = self._access
        access.update(keys)  # a set update is atomic under the GIL; flush swaps the set
        if len(access) >= FLUSH_ITEMS or now - self._access_flushed > FLUSH_SECONDS:
            self.flush_access()

    def flush_access(self) -> None:
        """Write the pending read times to WARM in one batched call.

        The batch is stamped with the time of its latest read, so a key may
        look up to ``FLUSH_SECONDS`` more recently read than it was -- never
        less, so nothing goes COLD early.
        """
        with self._access_lock:
            keys, self._access = self._access, set()
            at = self._access_at
            self._access_flushed = time.time()
        warm = self._repos.get(Tier.WARM)
        if not keys or warm is None:
            return
        try:
            for chunk in chunked(sorted(keys), 1000):
                warm.touch_many(chunk, at)
        except BackendError as exc:
            log.warning("could not record read times in WARM: %s", exc)

    def _check_foreign_writes(self) -> None:
        watch = self._warm_watch
        if watch is not None and watch.changed_by_others():
            self._foreign_write_seen()

    def _foreign_write_seen(self) -> None:
        # Another process (or another thread's connection) wrote the store
        # this private HOT copies; which keys is unknown, so drop them all.
        self._repos[Tier.HOT].clear()
        if self._cache is not None:
            self._cache.clear()

    # ------------------------------------------------------------ reads
    def _guard_hot(self) -> None:
        """Before trusting HOT: drop a private HOT's copies if another process
        wrote; look for another process's "HOT is stale" marker once a second."""
        watch = self._warm_watch
        if watch is not None:
            if watch.changed_by_others():
                self._foreign_write_seen()
        elif self._hot is not None and self._hot.shared and time.monotonic() >= self._next_marker_check:
            # A process that could not reach HOT (while this one can) leaves
            # a marker in the durable tier.
            self._next_marker_check = time.monotonic() + MARKER_CHECK_INTERVAL
            self._recover_hot()

    def _lookup(
        self, key: str, promote: bool, hot_checked: bool = False
    ) -> tuple[Entry, Tier] | None:
        """Read-through HOT -> WARM -> COLD; the first live, valid copy wins.

        :param hot_checked: the caller already asked HOT and found nothing.
        """
        if self._cache is not None:
            cached = self._cache.get(key)
            if cached is not None:
                return cached
        hot = self._hot
        if hot is not None and not hot_checked and (not self._down_until or self._usable(Tier.HOT)):
            hot_checked = True
            try:
                self._guard_hot()
                entry = hot.fetch_record(key)
            except BackendUnavailableError as exc:
                self._mark_down(Tier.HOT, exc)
                entry = None
            if entry is not None and not entry.expired():
                if entry.valid():
                    self._count("hit_hot")
                    if self._cache is not None:
                        self._cache.put(entry, Tier.HOT)
                    return entry, Tier.HOT
                self._count("integrity_errors")
                log.error("checksum mismatch for a copy in tier hot (key %r)", key)
                self._discard_copy(Tier.HOT, hot, key, entry.version)
        corrupt: Entry | None = None
        corrupt_tier: Tier | None = None
        for tier, repo in self._tiers:
            if repo is hot and (hot_checked or not self._usable(tier)):
                continue
            entry = repo.fetch_record(key)
            if entry is None:
                continue
            if entry.expired():
                if repo.volatile:
                    continue
                break  # a tombstone: older copies below must not resurface
            if corrupt is not None and entry.version < corrupt.version:
                break  # only an older copy is left: not a substitute
            if not entry.valid():
                self._count("integrity_errors")
                log.error("checksum mismatch for a copy in tier %s (key %r)", tier.value, key)
                if repo.volatile:
                    self._discard_copy(tier, repo, key, entry.version)
                elif corrupt is None:
                    corrupt, corrupt_tier = entry, tier
                continue
            if corrupt is not None and corrupt_tier is not None:
                self._repair(corrupt_tier, entry)
            self._count("hit_" + tier.value)
            if promote:
                self._promote_on_read(entry, tier)
            if self._cache is not None:
                self._cache.put(entry, tier)
            return entry, tier
        if corrupt is not None:
            raise IntegrityError(f"every copy of {key!r} fails its checksum", key)
        self._count("miss")
        return None

    def _discard_copy(self, tier: Tier, repo: StateRepository, key: str, version: int) -> None:
        try:
            repo.delete_if_version(key, version)
        except BackendUnavailableError as exc:
            self._mark_down(tier, exc)

    def _repair(self, tier: Tier, good: Entry) -> None:
        """Replace a corrupt durable copy by a valid one of at least its version."""
        try:
            repo = self._repos[tier]
            repo.store(good.key, good.payload, self._copy_metadata(tier, good.metadata, time.time()))
            log.warning("replaced a corrupt copy in tier %s", tier.value)
        except BackendError as exc:
            log.warning("could not repair a corrupt copy in tier %s: %s", tier.value, exc)

    def _promote_on_read(self, entry: Entry, found: Tier) -> None:
        target = self.policy.promote_to
        if target is None or found is Tier.HOT:
            return
        target = Tier(target)
        if target not in self._repos or _ORDER.index(target) >= _ORDER.index(found):
            return
        self._copy_up(entry, found, target)

    def _copy_up(self, entry: Entry, source: Tier, target: Tier) -> bool:
        """Copy ``entry`` from ``source`` up into ``target``; the source copy stays."""
        repo = self._repos[target]
        now = time.time()
        metadata = self._copy_metadata(target, entry.metadata, now)
        key, version = entry.key, entry.version

        def copy() -> bool:
            if not repo.store_if_newer(key, entry.payload, metadata):
                # Refused: the target already holds this version (done) or a newer one.
                held = repo.fetch_record(key)
                return held is not None and held.version == version
            # A write or delete may have replaced the source while we copied;
            # if so, withdraw the copy so it cannot shadow the newer state.
            current = self._repos[source].fetch_record(key)
            if current is None or current.version != version:
                repo.delete_if_version(key, version)
                return False
            return True

        if target is Tier.HOT:
            done = bool(self._hot_call(copy, invalidation=False))
        else:
            try:
                done = copy()
            except BackendUnavailableError as exc:
                log.warning("promotion to %s skipped: %s", target.value, exc)
                return False
        if done:
            self._count("promotions")
        return done

    def get(self, key: str, default: Any = None) -> Any:
        """The value of ``key``, read through HOT -> WARM -> COLD; ``default`` if absent.

        A hit below HOT is promoted (copied) per the policy. A stored ``None``
        is returned as ``None``.

        :raises InvalidKeyError: the key is invalid (before any I/O).
        :raises IntegrityError: every copy fails its checksum.
        :raises BackendUnavailableError: a durable tier needed for the answer is down.
        """
        key = _user_key(key)
        hot = self._hot
        hot_checked = False
        if hot is not None and self._cache is None and (not self._down_until or self._usable(Tier.HOT)):
            # Fast path: the verified payload straight from a healthy HOT tier.
            try:
                self._guard_hot()
                payload = hot.fetch_payload(key)
            except BackendUnavailableError as exc:
                self._mark_down(Tier.HOT, exc)
            except IntegrityError:
                pass  # the general path below discards the corrupt copy
            else:
                if payload is not None:
                    # _count and _note_access, inlined: this is the hottest path.
                    self._counters["hit_hot"] += 1
                    if self._ticks:
                        try:
                            self._ticks["hit_hot"]()
                        except Exception:  # metrics never break state operations
                            log.debug("metrics collector failed", exc_info=True)
                    if self.policy.cold_after is not None:
                        self._access_at = now = time.time()
                        self._access.add(key)
                        if now - self._access_flushed > FLUSH_SECONDS or len(self._access) >= FLUSH_ITEMS:
                            self.flush_access()
                    return codec.decode(payload)
                hot_checked = True
        found = self._lookup(key, promote=True, hot_checked=hot_checked)
        if found is None:
            return default
        self._note_access((key,))
        return codec.decode(found[0].payload)

    def get_record(self, key: str) -> Record | None:
        """The value with its metadata and the tier it came from, or None."""
        key = _user_key(key)
        found = self._lookup(key, promote=True)
        if found is None:
            return None
        self._note_access((key,))
        return _to_record(*found)

    def get_many(self, keys: Iterable[str]) -> dict[str, Any]:
        """Values of the keys found (missing keys omitted), one bulk read per tier."""
        wanted = [_user_key(k) for k in validate_keys(keys)]
        out: dict[str, Any] = {}
        remaining: list[str] = list(dict.fromkeys(wanted))
        if self._cache is not None:
            still = []
            for key in remaining:
                cached = self._cache.get(key)
                if cached is None:
                    still.append(key)
                else:
                    out[key] = codec.decode(cached[0].payload)
            remaining = still
        corrupt: dict[str, Entry] = {}
        for tier, repo in self._tiers:
            if not remaining:
                break
            if tier is Tier.HOT:
                if not self._usable(tier):
                    continue
                try:
                    self._check_foreign_writes()
                    found = repo.fetch_many(remaining)
                except BackendUnavailableError as exc:
                    self._mark_down(tier, exc)
                    continue
            else:
                found = repo.fetch_many(remaining)
            resolved: set[str] = set()
            for key, entry in found.items():
                if entry.expired():
                    if not repo.volatile:
                        resolved.add(key)  # tombstone
                    continue
                bad = corrupt.get(key)
                if bad is not None and entry.version < bad.version:
                    resolved.add(key)
                    continue
                if not entry.valid():
                    self._count("integrity_errors")
                    if repo.volatile:
                        self._discard_copy(tier, repo, key, entry.version)
                    else:
                        corrupt.setdefault(key, entry)
                    continue
                resolved.add(key)
                corrupt.pop(key, None)
                out[key] = codec.decode(entry.payload)
                self._count("hit_" + tier.value)
                self._promote_on_read(entry, tier)
                if self._cache is not None:
                    self._cache.put(entry, tier)
            remaining = [k for k in remaining if k not in resolved]
        if corrupt:
            raise IntegrityError(
                f"every copy of {len(corrupt)} key(s) fails its checksum: {sorted(corrupt)[:5]}"
            )
        self._count("miss", len([k for k in remaining if k not in out]))
        self._note_access(out)
        return out

    def keys(self, pattern: str = "*") -> list[str]:
        """Sorted unique keys matching the glob ``pattern`` across every tier."""
        validate_pattern(pattern)
        seen: set[str] = set()
        upper_durable: list[StateRepository] = []
        for tier, repo in self._tiers:
            if tier is Tier.HOT:
                if not self._usable(tier):
                    continue
                try:
                    self._check_foreign_writes()
                    seen.update(repo.iter_keys(pattern))
                except BackendUnavailableError as exc:
                    self._mark_down(tier, exc)
                continue
            found = set(repo.iter_keys(pattern)) - seen
            # A key live only below a durable tier that holds its tombstone is gone.
            for upper in upper_durable:
                for chunk in chunked(sorted(found), 1000):
                    hidden = {k for k, e in upper.fetch_many(chunk).items() if e.expired()}
                    found -= hidden
            seen |= found
            if not repo.volatile:
                upper_durable.append(repo)
        return sorted(k for k in seen if not k.startswith(RESERVED_PREFIX))

    # ------------------------------------------------------------ writes
    def set(
        self,
        key: str,
        value: Any,
        tier: Tier | str = Tier.HOT,
        ttl: float | None = None,
        *,
        if_version: int | None = None,
    ) -> int:
        """Store ``value`` under ``key``; durable when it returns.

        :param tier: where the copy goes; a volatile tier is written through
            to the first durable tier below it.
        :param ttl: the record's lifetime in seconds, in every tier (None: forever).
        :param if_version: compare-and-set: store only if the current version
            is this (0: only if absent now), atomically in the durable tier.
        :returns: the new version.
        :raises InvalidKeyError: bad key; :raises SerializationError: value not
            encodable (nothing written in either case).
        :raises ConflictError: ``if_version`` did not match.
        :raises BackendUnavailableError: the durable tier is down (nothing stored).
        """
        key = _user_key(key)
        ttl = _check_ttl(ttl)
        if if_version is not None and (
            isinstance(if_version, bool) or not isinstance(if_version, int) or if_version < 0
        ):
            raise ConfigurationError(f"if_version must be an int >= 0, not {if_version!r}")
        payload = codec.encode(value)
        target = self._target(tier)
        now = time.time()
        metadata = make_metadata(payload, self._clock.next(after=if_version or 0), now=now, ttl=ttl)
        durable = self._durable_below(target)
        if self._cache is not None:
            self._cache.discard((key,))

        # 1. Invalidate shared volatile copies (redis) above the durable tier
        #    before writing it: if this process dies between the durable write
        #    and step 4, no old copy may be left above the new one. A private
        #    memory tier dies with the process, so it needs no such step.
        for t, repo in self._tiers:
            if durable is not None and t is durable[0]:
                break
            if repo.volatile and (repo.shared or durable is None or t is not target):
                self._delete_volatile(t, repo, key)

        # 2. The durable copy.
        if durable is not None:
            d_tier, d_repo = durable
            if if_version is not None:
                metadata = self._store_conditional(d_repo, key, payload, metadata, if_version)
            else:
                metadata = self._store_newest(d_repo, key, payload, metadata)
            # 3. Durable copies above it are older now: remove them (only if
            #    older -- a concurrent write above may be newer and stays).
            for t, repo in self._tiers:
                if t is d_tier:
                    break
                if not repo.volatile:
                    above = repo.fetch_record(key)
                    if above is not None and above.version < metadata["version"]:
                        repo.delete_if_version(key, above.version)
                elif t is not target:
                    self._delete_volatile(t, repo, key)
            if d_repo is not self._warm_watch:
                self._signal_change()

        # 4. The volatile copy, if the write was aimed at one.
        t_repo = self._repos[target]
        if t_repo.volatile:
            copy = self._copy_metadata(target, metadata, now)
            if target is Tier.HOT:
                self._hot_call(lambda: t_repo.store_if_newer(key, payload, copy), invalidation=True)
            else:
                t_repo.store_if_newer(key, payload, copy)
        return metadata["version"]

    def _delete_volatile(self, tier: Tier, repo: StateRepository, key: str) -> None:
        if tier is Tier.HOT:
            self._hot_call(partial(repo.delete, key), invalidation=True)
        else:
            repo.delete(key)

    def _store_newest(self, repo: StateRepository, key: str, payload: str, metadata: Metadata) -> Metadata:
        """Store with a version greater than the stored one, whatever the clocks say."""
        for _ in range(5):
            if repo.store_if_newer(key, payload, metadata):
                return metadata
            # Another writer (or a host with a faster clock) stored a greater
            # version: go past it, so this write is the latest.
            current = repo.fetch_record(key)
            if current is not None:
                self._clock.observe(current.version)
            metadata = {**metadata, "version": self._clock.next()}  # type: ignore[typeddict-item]
        repo.store(key, payload, metadata)
        return metadata

    def _store_conditional(
        self, repo: StateRepository, key: str, payload: str, metadata: Metadata, expected: int,
    ) -> Metadata:
        """Compare-and-set: atomic in ``repo``, the durable tier the write goes to.

        The current version is the one a read would see, which may live in
        another durable tier (a record swept to COLD, or a write aimed below
        the tier holding it); the store itself is conditional on what ``repo``
        holds, so two racing writers cannot both win.
        """
        current: int | None = None
        stored: int | None = None
        for tier_repo in [r for _, r in self._tiers if not r.volatile]:
            entry = tier_repo.fetch_record(key)
            version = 0 if entry is None or entry.expired() else entry.version
            if tier_repo is repo:
                stored = version
            if current is None and entry is not None:
                current = version
            if current is not None and stored is not None:
                break
        current, stored = current or 0, stored or 0
        # One read of `repo` gives both numbers, so racing writers compare
        # against the same state; a copy in `repo` newer than `expected`
        # means another write got there first.
        if current != expected or stored > expected:
            raise ConflictError(key, expected, max(current, stored))
        if not repo.store_if_version(key, payload, metadata, stored):
            raise ConflictError(key, expected, self._current_version(key))
        return metadata

    def _current_version(self, key: str) -> int:
        """The version a read would find (0: absent), from the durable tiers."""
        durable = [r for _, r in self._tiers if not r.volatile] or [r for _, r in self._tiers]
        for repo in durable:
            entry = repo.fetch_record(key)
            if entry is not None:
                return 0 if entry.expired() else entry.version
        return 0

    def _signal_change(self) -> None:
        """Make the watched WARM store commit, so other processes' private HOT
        tiers notice a write or delete that changed only other tiers."""
        watch = self._warm_watch
        if watch is None:
            return
        payload = codec.encode(self._clock.next())
        watch.store(_CHANGED, payload, make_metadata(payload, self._clock.next(), now=time.time()))

    def set_many(
        self, items: Mapping[str, Any], tier: Tier | str = Tier.HOT, ttl: float | None = None
    ) -> dict[str, int]:
        """Store many values with one bulk write per tier.

        Every key is validated and every value encoded first: one bad input
        raises and nothing is written.

        :returns: ``key -> version``.
        :raises BatchError: a backend failed part-way; ``.failed`` /
            ``.succeeded`` say which keys.
        """
        if not isinstance(items, Mapping):
            raise ConfigurationError("set_many takes a mapping of key -> value")
        ttl = _check_ttl(ttl)
        target = self._target(tier)
        now = time.time()
        prepared: dict[str, tuple[str, Metadata]] = {}
        for key, value in items.items():
            key = _user_key(key)
            payload = codec.encode(value)
            prepared[key] = (payload, make_metadata(payload, self._clock.next(), now=now, ttl=ttl))
        if not prepared:
            return {}
        keys = list(prepared)
        if self._cache is not None:
            self._cache.discard(keys)
        durable = self._durable_below(target)
        failed: dict[str, BaseException] = {}
        stored = set(keys)
        for t, repo in self._tiers:
            if durable is not None and t is durable[0]:
                break
            if repo.volatile:
                self._delete_volatile_many(t, repo, keys)
        if durable is not None:
            d_tier, d_repo = durable
            try:
                stored = d_repo.store_many(prepared)
            except BatchError as exc:
                failed.update(exc.failed)
                stored = set(exc.succeeded)
            except BackendError as exc:
                raise BatchError("set_many failed", dict.fromkeys(keys, exc), [], d_repo.backend) from exc
            done = sorted(stored)
            for t, repo in self._tiers:
                if t is d_tier:
                    break
                if not repo.volatile:
                    older = {k: e.version for k, e in repo.fetch_many(done).items()
                             if e.version < prepared[k][1]["version"]}
                    if older:
                        repo.delete_many_if_version(older)
                elif t is not target:
                    self._delete_volatile_many(t, repo, done)
            if d_repo is not self._warm_watch:
                self._signal_change()
        t_repo = self._repos[target]
        if t_repo.volatile:
            copies = {k: (prepared[k][0], self._copy_metadata(target, prepared[k][1], now)) for k in stored}
            if target is Tier.HOT:
                self._hot_call(lambda: t_repo.store_many(copies), invalidation=True)
            else:
                t_repo.store_many(copies)
        if failed:
            raise BatchError("set_many failed for some keys", failed, sorted(stored))
        return {k: prepared[k][1]["version"] for k in keys}

    def _delete_volatile_many(self, tier: Tier, repo: StateRepository, keys: list[str]) -> None:
        if tier is Tier.HOT:
            self._hot_call(lambda: repo.delete_many(keys), invalidation=True)
        else:
            repo.delete_many(keys)

    def delete(self, key: str) -> bool:
        """Delete ``key`` from every tier (lowest first). True if a copy existed."""
        key = _user_key(key)
        if self._cache is not None:
            self._cache.discard((key,))
        existed = False
        committed = False
        # Lowest tier first: if this is interrupted, what is left is the
        # newest copy, never an older one uncovered.
        for tier, repo in reversed(self._tiers):
            if tier is Tier.HOT:
                existed = bool(self._hot_call(partial(repo.delete, key), invalidation=True)) or existed
            else:
                deleted = repo.delete(key)
                existed = deleted or existed
                committed = committed or (deleted and repo is self._warm_watch)
        if existed and not committed:
            self._signal_change()
        return existed

    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete many keys, one bulk call per tier; returns how many existed."""
        wanted = list(dict.fromkeys(_user_key(k) for k in validate_keys(keys)))
        if not wanted:
            return 0
        if self._cache is not None:
            self._cache.discard(wanted)
        # Count what a read would have found: per key, the first durable
        # tier holding it decides (an expired copy there hides older ones).
        decided: dict[str, bool] = {}
        durable = [r for _, r in self._tiers if not r.volatile]
        for repo in durable:
            undecided = [k for k in wanted if k not in decided]
            if not undecided:
                break
            for key, entry in repo.fetch_many(undecided).items():
                decided[key] = not entry.expired()
        # Lowest tier first, as in delete().
        hot_count = 0
        committed = False
        for tier, repo in reversed(self._tiers):
            if tier is Tier.HOT:
                hot_count = int(self._hot_call(partial(repo.delete_many, wanted), invalidation=True) or 0)
            else:
                n = repo.delete_many(wanted)
                committed = committed or (n > 0 and repo is self._warm_watch)
        if not durable:
            return hot_count
        if decided and not committed:
            self._signal_change()
        return sum(decided.values())

    # ------------------------------------------------------------ migration
    def promote(self, key: str, to: Tier | str = Tier.HOT) -> bool:
        """Copy ``key`` into tier ``to``; every other copy stays.

        :returns: True if ``to`` now holds the current version, False if the
            key is absent (or a newer write replaced it meanwhile).
        """
        key = _user_key(key)
        target = Tier.parse(to)
        if target not in self._repos:
            raise ConfigurationError(f"tier {target.value!r} is not configured")
        found = self._lookup(key, promote=False)
        if found is None:
            return False
        entry, tier = found
        if tier is target:
            return True
        return self._copy_up(entry, tier, target)

    def demote(self, key: str, to: Tier | str = Tier.COLD) -> bool:
        """Move ``key`` down into tier ``to``: copy, verify, then remove every
        copy above it that still holds the copied version.

        :returns: True if moved (or already only at or below ``to``), False if absent.
        """
        key = _user_key(key)
        target = Tier.parse(to)
        repo = self._repos.get(target)
        if repo is None:
            raise ConfigurationError(f"tier {target.value!r} is not configured")
        if repo.volatile:
            raise ConfigurationError("demote needs a durable target tier")
        found = self._lookup(key, promote=False)
        if found is None:
            return False
        entry, tier = found
        if self._cache is not None:
            self._cache.discard((key,))
        if _ORDER.index(tier) < _ORDER.index(target):
            metadata = self._copy_metadata(target, entry.metadata, time.time())
            repo.store_if_newer(key, entry.payload, metadata)
            check = repo.fetch_record(key)
            if check is None or not check.valid() or check.version < entry.version:
                raise IntegrityError(f"copy of {key!r} in {target.value} did not verify", key)
            self._count("demotions")
        # Remove copies above the target that hold the copied version (a newer
        # write in the meantime wins and stays).
        for t, upper in self._tiers:
            if t is target:
                break
            if t is Tier.HOT:
                self._hot_call(partial(upper.delete_if_version, key, entry.version), invalidation=True)
            else:
                upper.delete_if_version(key, entry.version)
        return True

    def sweep(
        self, progress: Callable[[SweepReport], None] | None = None, *, dry_run: bool = False
    ) -> SweepReport:
        """Run the tiering policy once.

        Moves WARM records idle longer than ``cold_after`` to COLD (copy,
        verify, delete the source only if unchanged) and purges expired
        records with their older copies below, in batches of
        ``policy.batch_size`` so memory stays flat.

        :param progress: called with the running report after every batch.
        :param dry_run: only count what would be moved and purged; nothing
            is written except the pending read times the idle test needs.
        """
        started = time.monotonic()
        report = SweepReport()
        self.flush_access()
        now = time.time()
        cold_after = self.policy.cold_after
        size = self.policy.batch_size
        warm = self._repos.get(Tier.WARM)
        cold = self._repos.get(Tier.COLD)
        durable = [(t, r) for t, r in self._tiers if not r.volatile]
        for index, (tier, repo) in enumerate(durable):
            below = [r for _, r in durable[index + 1:]]
            idle_before = None
            if tier is Tier.WARM and cold is not None and warm is repo and cold_after is not None:
                idle_before = now - cold_after
            for batch in repo.scan(size, now=now, idle_before=idle_before):
                batch = [e for e in batch if not e.key.startswith(RESERVED_PREFIX)]
                report.scanned += len(batch)
                expired = [e for e in batch if e.expired(now)]
                idle = [e for e in batch if not e.expired(now)]
                if dry_run:
                    report.purged += len(expired)
                    report.moved += len(idle) if cold is not None and idle_before is not None else 0
                    if progress is not None:
                        progress(report)
                    continue
                if expired:
                    self._purge(repo, below, expired, report)
                if idle and cold is not None:
                    self._move(repo, cold, idle, report)
                if progress is not None:
                    progress(report)
        report.seconds = time.monotonic() - started
        if self.metrics is not None:
            for name in ("scanned", "moved", "purged", "skipped", "failed"):
                try:
                    self.metrics.gauge("state.manager.sweep." + name, getattr(report, name))
                except Exception:
                    log.debug("metrics collector failed", exc_info=True)
        return report

    def _purge(
        self, repo: StateRepository, below: list[StateRepository], expired: list[Entry],
        report: SweepReport,
    ) -> None:
        """Delete expired records, older copies below them first."""
        versions = {e.key: e.version for e in expired}
        try:
            for lower in below:
                stale = {k: e.version for k, e in lower.fetch_many(list(versions)).items()
                         if e.version <= versions[k]}
                if stale:
                    lower.delete_many_if_version(stale)
            deleted = repo.delete_many_if_version(versions)
        except BackendError as exc:
            report.failed += len(versions)
            for key in versions:
                report.errors[key] = str(exc)
            return
        report.purged += len(deleted)
        report.skipped += len(versions) - len(deleted)

    def _move(
        self, source: StateRepository, cold: StateRepository, idle: list[Entry], report: SweepReport
    ) -> None:
        """Copy idle records to COLD, verify the copies, then delete the sources."""
        valid = [e for e in idle if e.valid()]
        for entry in idle:
            if not entry.valid():
                report.failed += 1
                report.errors[entry.key] = "checksum mismatch in source; not moved"
                self._count("integrity_errors")
        if not valid:
            return
        now = time.time()
        items = {e.key: (e.payload, self._copy_metadata(Tier.COLD, e.metadata, now)) for e in valid}
        try:
            cold.store_many(items)
        except BatchError as exc:
            for key, err in exc.failed.items():
                report.failed += 1
                report.errors[key] = str(err)
                items.pop(key, None)
        except BackendError as exc:
            report.failed += len(items)
            for key in items:
                report.errors[key] = str(exc)
            return
        try:
            copies = cold.fetch_many(list(items))
        except BackendError as exc:
            report.failed += len(items)
            for key in items:
                report.errors[key] = f"copy not verified: {exc}"
            return
        verified: dict[str, int] = {}
        for entry in valid:
            copy = copies.get(entry.key)
            if entry.key not in items:
                continue
            if copy is None or not copy.valid() or copy.version < entry.version:
                report.failed += 1
                report.errors[entry.key] = "copy did not verify; source kept"
                continue
            verified[entry.key] = entry.version
        try:
            deleted = source.delete_many_if_version(verified)
        except BackendError as exc:
            report.failed += len(verified)
            for key in verified:
                report.errors[key] = f"source not deleted: {exc}"
            return
        report.moved += len(deleted)
        report.skipped += len(verified) - len(deleted)
        self._count("demotions", len(deleted))

    # ------------------------------------------------------------ introspection
    def stats(self) -> dict[str, Any]:
        """Per-tier backend stats and the manager's counters (and hit ratios)."""
        tiers: dict[str, Any] = {}
        for tier, repo in self._tiers:
            try:
                tiers[tier.value] = repo.stats()
            except BackendError as exc:
                tiers[tier.value] = {"backend": repo.backend, "tier": tier.value, "error": str(exc)}
        counters = dict(self._counters)
        reads = sum(counters[k] for k in ("hit_hot", "hit_warm", "hit_cold", "miss"))
        manager: dict[str, Any] = {
            **counters,
            "hit_ratio": {
                k: (counters[f"hit_{k}"] / reads if reads else 0.0) for k in ("hot", "warm", "cold")
            },
            "down": sorted(t.value for t in self._down_until),
        }
        snapshot = getattr(self.metrics, "snapshot", None)
        if callable(snapshot):
            manager["metrics"] = snapshot()
        return {"tiers": tiers, "manager": manager}

    def iter_records(self, pattern: str = "*") -> Iterator[Record]:
        """Every live record matching ``pattern`` (as :meth:`get_record` sees it), streamed."""
        for key in self.keys(pattern):
            found = self._lookup(key, promote=False)  # a listing must not fill HOT
            if found is not None:
                yield _to_record(*found)

    # ------------------------------------------------------------ lifecycle
    def close(self) -> None:
        """Flush pending read times and close every repository. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.flush_access()
        finally:
            for _, repo in self._tiers:
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


# ---------------------------------------------------------------- open()
def _resolve(url: str | None, env: str, default: str | None) -> str | None:
    value = url if url is not None else environ(env, default)
    if value is None or value.strip().lower() in ("none", "off", ""):
        return None
    return value


def open(
    path: str | os.PathLike[str] | None = None,
    *,
    hot: str | StateRepository | None = None,
    warm: str | StateRepository | None = None,
    cold: str | StateRepository | None = None,
    policy: TieringPolicy | None = None,
    metrics: MetricsCollector | None = None,
    cache: LocalCache | None = None,
) -> StateManager:
    """Open a tiered store.

    With no arguments: memory + SQLite + files under ``./.tiered_state`` (or
    ``TIERED_STATE_PATH``). ``path`` puts the embedded tiers elsewhere; each
    tier may instead be a URL (``redis://``, ``postgresql://``, ``s3://``, ...)
    or a ready repository, or ``"none"`` to switch it off. Unset tiers come
    from ``TIERED_STATE_HOT`` / ``_WARM`` / ``_COLD``; metrics from
    ``TIERED_STATE_STATSD=host:port`` when ``metrics`` is not given.

    :raises ConfigurationError: bad URL, unknown scheme or option.
    :raises MissingDependencyError: a URL's driver is not installed.
    """
    policy = policy or TieringPolicy()
    root = Path(path if path is not None else environ(ENV_PATH, ".tiered_state") or ".tiered_state")
    hot_query = []
    if policy.hot_max_items is not None:
        hot_query.append(f"max_items={policy.hot_max_items}")
    if policy.hot_max_bytes is not None:
        hot_query.append(f"max_bytes={policy.hot_max_bytes}")
    defaults = {
        Tier.HOT: "memory://" + ("?" + "&".join(hot_query) if hot_query else ""),
        Tier.WARM: None,
        Tier.COLD: None,
    }
    given = {Tier.HOT: hot, Tier.WARM: warm, Tier.COLD: cold}
    envs = {Tier.HOT: ENV_HOT, Tier.WARM: ENV_WARM, Tier.COLD: ENV_COLD}
    opened: dict[Tier, StateRepository] = {}
    try:
        for tier in _ORDER:
            spec = given[tier]
            if isinstance(spec, StateRepository):
                opened[tier] = spec
                continue
            default = defaults[tier]
            if default is None:  # embedded WARM / COLD live under the path
                root.mkdir(mode=0o700, parents=True, exist_ok=True)
                default = (
                    f"sqlite:///{(root / 'warm.db').resolve()}"
                    if tier is Tier.WARM
                    else (root / "cold").resolve().as_uri()
                )
            url = _resolve(spec, envs[tier], default)
            if url is None:
                continue
            log.debug("opening %s tier at %s", tier.value, redact(url))
            opened[tier] = open_repository(url)
        owns_metrics = metrics is None
        if metrics is None:
            metrics = metrics_from_env()
        manager = StateManager(
            opened.get(Tier.HOT), opened.get(Tier.WARM), opened.get(Tier.COLD),
            policy=policy, metrics=metrics, cache=cache,
        )
        manager.owns_metrics = owns_metrics and metrics is not None
        return manager
    except BaseException:
        for repo in opened.values():
            repo.close()
        raise
