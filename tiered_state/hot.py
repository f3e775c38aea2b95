"""The HOT guard: when a copy in HOT may be served, and how HOT is kept from going stale.

HOT is a cache of catalog entries with their versions. Three rules keep every
copy it serves current:

1. A writer *invalidates* HOT before its catalog write and fills it after
   (:meth:`HotGuard.before_write`, :meth:`HotGuard.after_write`).
2. A reader that missed HOT may copy what it read from the catalog into HOT
   only if no write of that key can have committed since it read
   (:meth:`HotGuard.fill`, conditional on a :meth:`HotGuard.token` taken
   before the catalog read).
3. A HOT that may have missed invalidations -- unreachable while someone
   wrote, or changed behind this process's back -- is flushed before it is
   trusted again.

How each rule is kept depends on who shares HOT:

* :class:`SharedHot` (Redis, shared by processes): a writer leaves a
  *placeholder* (a stub one version below its own) that makes every fill of
  an older copy fail, and a writer that cannot reach HOT records a marker in
  the catalog that makes whoever reaches HOT next flush it.
* :class:`PrivateHot` (the in-process memory tier): writers and fills of this
  process serialise on one lock, with a generation that any write or flush
  moves on; other processes' writes are noticed through the catalog's change
  signal (SQLite's WAL index), which drops every copy.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping

from . import codec
from .catalog import RESERVED_PREFIX, Catalog
from .errors import BackendUnavailableError, IntegrityError
from .record import STUB, TOMBSTONE, Entry, Metadata, checksum, make_metadata, make_stub
from .repositories.base import StateRepository

__all__ = ["FILL_DEADLINE", "PLACEHOLDER_SECONDS", "HotGuard", "PrivateHot", "SharedHot", "hot_guard"]

log = logging.getLogger(__name__)

#: The catalog key of the "HOT may be stale" marker.
HOT_DIRTY = RESERVED_PREFIX + "hot-dirty"
#: How long a shared HOT keeps a writer's placeholder. It must outlive the
#: writer's catalog write plus :data:`FILL_DEADLINE`: a reader that read the
#: catalog before the write committed could otherwise fill its older copy.
PLACEHOLDER_SECONDS = 300.0
#: A reader abandons its fill if its catalog read started longer ago than
#: this (a stalled reader must not outlive the placeholders that guard it).
FILL_DEADLINE = 30.0
#: A writer whose catalog write comes later than this after its placeholders
#: refreshes them first, so they still stand FILL_DEADLINE after the commit.
_REPLACE_AFTER = PLACEHOLDER_SECONDS - 2 * FILL_DEADLINE
#: How long a HOT that failed with BackendUnavailableError is skipped before
#: the next attempt: a dead Redis costs one timeout per interval, not per call.
RETRY_INTERVAL = 1.0
#: How often a process that sees a shared HOT healthy looks for another
#: process's "HOT is stale" marker: the staleness bound when processes
#: disagree on whether HOT is reachable (a partial partition).
MARKER_CHECK_INTERVAL = 1.0

Counter = Callable[[str], None]


class HotGuard:
    """What the manager asks before serving from HOT or writing around it."""

    def __init__(self, repo: StateRepository, catalog: Catalog, hot_ttl: float | None,
                 count: Counter) -> None:
        self.repo = repo
        self.catalog = catalog
        self.hot_ttl = hot_ttl
        self._count = count

    # -- copies
    def copy_metadata(self, metadata: Metadata, now: float) -> Metadata:
        """A catalog entry's metadata as a HOT copy carries it (with its ``hot_until``)."""
        if self.hot_ttl is None:
            return metadata
        copy = metadata.copy()
        copy["hot_until"] = now + self.hot_ttl  # type: ignore[typeddict-unknown-key]
        return copy

    def _copies(self, entries: Mapping[str, Entry]) -> dict[str, tuple[str, Metadata]]:
        now = time.time()
        return {k: (e.payload, self.copy_metadata(e.metadata, now)) for k, e in entries.items()}

    # -- the protocol (see the module docstring)
    def usable(self) -> bool:
        return True

    def lookup(self, key: str) -> Entry | None:
        """A copy of ``key`` that may be served, or None (ask the catalog)."""
        raise NotImplementedError

    def lookup_many(self, keys: list[str]) -> dict[str, Entry]:
        raise NotImplementedError

    def payload(self, key: str) -> str | None:
        """The payload of a copy of ``key`` that may be served, or None: the
        fast form of :meth:`lookup` for a plain ``get``."""
        copy = self.lookup(key)
        return None if copy is None else copy.payload

    def token(self) -> float:
        """Taken before a catalog read whose result may be filled into HOT."""
        raise NotImplementedError

    def fill(self, entries: Mapping[str, Entry], token: float) -> int:
        """Copy catalog values into HOT if that is still safe; how many were copied."""
        raise NotImplementedError

    def before_write(self, versions: Mapping[str, int]) -> None:
        """Before the catalog write of ``key -> new version``."""
        raise NotImplementedError

    def after_write(self, versions: Mapping[str, int], copies: Mapping[str, Entry]) -> None:
        """After the catalog write (or its failure) of ``versions``; ``copies`` go into HOT."""
        raise NotImplementedError

    def drop(self, versions: Mapping[str, int]) -> None:
        """Remove the copies of ``key -> version`` (a demote: no copy above the target)."""
        raise NotImplementedError

    def refresh_if_old(self, versions: Mapping[str, int]) -> None:
        """Called right before the catalog write (see :class:`SharedHot`)."""

    def _usable_copy(self, entry: Entry | None) -> Entry | None:
        """``entry`` if it is a value that may be served; corrupt copies are dropped."""
        if entry is None:
            return None
        md = entry.metadata
        encoding, expires_at = md["encoding"], md["expires_at"]
        if encoding == STUB or encoding == TOMBSTONE or (
                expires_at is not None and expires_at <= time.time()):
            return None  # a placeholder, or expired: ask the catalog
        if checksum(entry.payload) == md["checksum"]:
            return entry
        self._count("integrity_errors")
        log.error("checksum mismatch for a copy in tier hot (key %r); dropped", entry.key)
        try:
            self.drop({entry.key: entry.version})
        except BackendUnavailableError:
            pass
        return None


class PrivateHot(HotGuard):
    """The guard of a process-private HOT (memory://).

    One lock orders this process's writes and fills; ``_generation`` moves on
    at every write start, write end and flush, and a fill is made only if it
    did not move since the filler's token and no write is in flight, so a
    fill can never put back a copy a write of this process replaced. Other
    processes' writes reach the catalog only; ``changed_by_others`` on the
    catalog (SQLite) notices them and the whole tier is flushed.
    """

    def __init__(self, repo: StateRepository, catalog: Catalog, hot_ttl: float | None,
                 count: Counter) -> None:
        super().__init__(repo, catalog, hot_ttl, count)
        self._lock = threading.Lock()
        self._generation = 0
        self._in_flight = 0
        self._changed = catalog.repo.changed_by_others
        #: The memory tier's payload-only read, when the backend has one.
        self._fetch_payload: Callable[[str], str | None] | None = getattr(repo, "fetch_payload", None)
        # The baseline: the tier is empty now, so nothing it holds can be stale.
        self._changed()
        _PRIVATE.add(self)

    def _after_fork(self) -> None:
        # A thread of the parent may have held the lock, or been mid-write.
        self._lock = threading.Lock()
        self._in_flight = 0

    def _check(self) -> None:
        """Flush every copy if another process (or connection) wrote the catalog."""
        if self._changed():
            self._flush()

    def _flush(self) -> None:
        with self._lock:
            self.repo.clear()
            self._generation += 1
        self._count("hot_flushes")

    def lookup(self, key: str) -> Entry | None:
        self._check()
        return self._usable_copy(self.repo.fetch_record(key))

    def payload(self, key: str) -> str | None:
        fetch_payload = self._fetch_payload
        if fetch_payload is None:
            return super().payload(key)
        if self._changed():
            self._flush()
        try:
            return fetch_payload(key) or None  # "": a placeholder
        except IntegrityError:
            self._usable_copy(self.repo.fetch_record(key))  # drops it, counts it
            return None

    def lookup_many(self, keys: list[str]) -> dict[str, Entry]:
        self._check()
        out = {}
        for key, entry in self.repo.fetch_many(keys).items():
            usable = self._usable_copy(entry)
            if usable is not None:
                out[key] = usable
        return out

    def token(self) -> float:
        self._check()
        return float(self._generation)

    def fill(self, entries: Mapping[str, Entry], token: float) -> int:
        copies = self._copies(entries)
        with self._lock:
            if self._in_flight or self._generation != token:
                return 0
            if len(copies) == 1:
                (key, (payload, md)), = copies.items()
                return int(self.repo.store_if_newer(key, payload, md))
            return len(self.repo.store_many_if_newer(copies))

    def before_write(self, versions: Mapping[str, int]) -> None:
        with self._lock:
            self._in_flight += 1
            self._generation += 1
            if len(versions) == 1:
                self.repo.delete(next(iter(versions)))
            else:
                self.repo.delete_many(versions)

    def after_write(self, versions: Mapping[str, int], copies: Mapping[str, Entry]) -> None:
        stored = self._copies(copies) if copies else None
        with self._lock:
            self._in_flight -= 1
            self._generation += 1
            if stored is None:
                return
            if len(stored) == 1:
                (key, (payload, md)), = stored.items()
                self.repo.store_if_newer(key, payload, md)
            else:
                self.repo.store_many_if_newer(stored)

    def drop(self, versions: Mapping[str, int]) -> None:
        with self._lock:
            self._generation += 1
            self.repo.delete_many_if_version(versions)


class SharedHot(HotGuard):
    """The guard of a HOT shared by processes (redis://).

    Placeholders make rule 2 hold across processes; the marker in the catalog
    makes rule 3 hold after an outage, for this process and for processes
    started later. A HOT that fails with :class:`BackendUnavailableError` is
    skipped for :data:`RETRY_INTERVAL`: reads go to the catalog, writes still
    succeed there.
    """

    def __init__(self, repo: StateRepository, catalog: Catalog, hot_ttl: float | None,
                 count: Counter) -> None:
        super().__init__(repo, catalog, hot_ttl, count)
        self._down_until: float | None = None
        self._next_marker_check = 0.0
        self._placed: dict[str, float] = {}
        try:
            self._recover()
        except BackendUnavailableError as exc:
            self.failed(exc)

    # -- health
    @property
    def down(self) -> bool:
        return self._down_until is not None

    def usable(self) -> bool:
        until = self._down_until
        if until is None:
            return True
        if time.monotonic() < until:
            return False
        # Time to try again: HOT must first be brought to a state that cannot
        # serve stale copies.
        try:
            self._recover()
        except BackendUnavailableError as exc:
            self.failed(exc)
            return False
        self._down_until = None
        log.warning("tier hot is reachable again")
        return True

    def failed(self, exc: BaseException) -> None:
        if self._down_until is None:
            log.warning("tier hot unreachable, skipping it for %.1fs: %s", RETRY_INTERVAL, exc)
        self._down_until = time.monotonic() + RETRY_INTERVAL
        self._count("tier_errors")

    def _guarded(self, call: Callable[[], object]) -> object | None:
        try:
            return call()
        except BackendUnavailableError as exc:
            self.failed(exc)
            return None

    # -- the marker
    def _recover(self) -> None:
        """Flush HOT if some process marked it stale while it was unreachable."""
        repo = self.catalog.repo
        marker = repo.fetch_record(HOT_DIRTY)
        self._next_marker_check = time.monotonic() + MARKER_CHECK_INTERVAL
        if marker is None:
            return
        flushed = self.repo.clear()
        self._count("hot_flushes")
        log.warning("tier hot was written around during an outage: flushed %d copies", flushed)
        repo.delete_if_version(HOT_DIRTY, marker.version)

    def _mark_stale(self, exc: BaseException) -> None:
        """HOT could not be invalidated: record it in the catalog before the write.

        Recorded for every write that skips HOT, not once per outage: another
        process may have flushed HOT and removed an earlier marker meanwhile.
        Raises if the catalog is down too; the write then fails, as it must.
        """
        self.failed(exc)
        payload = codec.encode({"since": time.time(), "pid": os.getpid()})
        version = (time.time_ns() // 1000) << 10
        self.catalog.repo.store(HOT_DIRTY, payload, make_metadata(payload, version, now=time.time()))

    # -- reads
    def _fresh(self) -> bool:
        if self._down_until is not None and not self.usable():
            return False
        if time.monotonic() >= self._next_marker_check:
            # A process that could not reach HOT (while this one can) leaves
            # a marker in the catalog.
            try:
                self._recover()
            except BackendUnavailableError as exc:
                self.failed(exc)
                return False
        return True

    def lookup(self, key: str) -> Entry | None:
        if not self._fresh():
            return None
        try:
            entry = self.repo.fetch_record(key)
        except BackendUnavailableError as exc:
            self.failed(exc)
            return None
        return self._usable_copy(entry)

    def lookup_many(self, keys: list[str]) -> dict[str, Entry]:
        if not self._fresh():
            return {}
        try:
            found = self.repo.fetch_many(keys)
        except BackendUnavailableError as exc:
            self.failed(exc)
            return {}
        out = {}
        for key, entry in found.items():
            usable = self._usable_copy(entry)
            if usable is not None:
                out[key] = usable
        return out

    def token(self) -> float:
        return time.monotonic()

    def fill(self, entries: Mapping[str, Entry], token: float) -> int:
        if time.monotonic() - token > FILL_DEADLINE or (self._down_until is not None
                                                         and not self.usable()):
            return 0
        copies = self._copies(entries)
        if len(copies) == 1:
            (key, (payload, md)), = copies.items()
            return int(bool(self._guarded(lambda: self.repo.store_if_newer(key, payload, md))))
        stored = self._guarded(lambda: self.repo.store_many_if_newer(copies))
        return len(stored) if isinstance(stored, set) else 0

    # -- writes
    def _placeholders(self, versions: Mapping[str, int]) -> dict[str, tuple[str, Metadata]]:
        now = time.time()
        out = {}
        for key, version in versions.items():
            # One below the version given: it blocks every older copy and
            # yields to the write's own copy (and to any newer write).
            md = make_metadata("", version - 1, now=now)
            md["hot_until"] = now + PLACEHOLDER_SECONDS  # type: ignore[typeddict-unknown-key]
            out[key] = make_stub(md)
        return out

    def before_write(self, versions: Mapping[str, int]) -> None:
        if self._down_until is not None and not self.usable():
            self._mark_stale(BackendUnavailableError("skipped while unreachable", "hot"))
            return
        items = self._placeholders(versions)
        try:
            if len(items) == 1:
                (key, (payload, md)), = items.items()
                self.repo.store_if_newer(key, payload, md)
            else:
                self.repo.store_many_if_newer(items)
        except BackendUnavailableError as exc:
            self._mark_stale(exc)
            return
        placed = time.monotonic()
        for key in versions:
            self._placed[key] = placed

    def refresh_if_old(self, versions: Mapping[str, int]) -> None:
        """Re-place placeholders that may expire before the commit's readers are done."""
        now = time.monotonic()
        old = {k: v for k, v in versions.items() if now - self._placed.get(k, now) > _REPLACE_AFTER}
        if old:
            self.before_write(old)

    def after_write(self, versions: Mapping[str, int], copies: Mapping[str, Entry]) -> None:
        for key in versions:
            self._placed.pop(key, None)
        if not copies or (self._down_until is not None and not self.usable()):
            return
        items = self._copies(copies)
        if len(items) == 1:
            (key, (payload, md)), = items.items()
            self._guarded(lambda: self.repo.store_if_newer(key, payload, md))
        else:
            self._guarded(lambda: self.repo.store_many_if_newer(items))

    def drop(self, versions: Mapping[str, int]) -> None:
        """Replace the copies of ``key -> version`` by placeholders one version above.

        Never a delete: an empty slot would let a reader that read the
        catalog before the last write fill its older copy; the placeholder
        keeps blocking it (and any copy up to this version), and yields to
        any newer write.
        """
        if self._down_until is not None and not self.usable():
            return
        items = self._placeholders({k: v + 2 for k, v in versions.items()})
        self._guarded(lambda: self.repo.store_many_if_newer(items))


#: Every PrivateHot of this process, for the fork hook (weakly: a guard goes
#: with its manager; os.register_at_fork cannot unregister a callback).
_PRIVATE: weakref.WeakSet[PrivateHot] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for guard in list(_PRIVATE):
        guard._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def hot_guard(repo: StateRepository, catalog: Catalog, hot_ttl: float | None,
              count: Counter) -> HotGuard:
    """The guard for a HOT repository in front of ``catalog``."""
    if repo.shared:
        return SharedHot(repo, catalog, hot_ttl, count)
    return PrivateHot(repo, catalog, hot_ttl, count)
