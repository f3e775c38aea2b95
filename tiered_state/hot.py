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
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from . import codec
from .catalog import RESERVED_PREFIX, Catalog
from .errors import (
    BackendError,
    BackendUnavailableError,
    BatchError,
    IntegrityError,
    PartialOutageError,
    TieredStateError,
)
from .record import STUB, TOMBSTONE, Entry, Metadata, checksum, make_metadata, make_stub
from .repositories.base import StateRepository

__all__ = ["FILL_DEADLINE", "HOT_KEYS", "PLACEHOLDER_SECONDS", "HotGuard", "PrivateHot", "SharedHot",
           "Ticket", "hot_guard"]

log = logging.getLogger(__name__)

#: The catalog key of the write-around marker: until when some process
#: wrote around a HOT it could not reach.
HOT_DIRTY = RESERVED_PREFIX + "hot-dirty"
#: The catalog key of the HOT epoch and the server it was started on.
HOT_EPOCH = RESERVED_PREFIX + "hot-epoch"
#: The guard's own catalog records (not user keys).
HOT_KEYS = (HOT_DIRTY, HOT_EPOCH)
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
#: The default trust window (TieringPolicy.hot_trust_window): how long a
#: process serves from a shared HOT after its last look at the marker, and
#: so how long a write that cannot reach HOT waits before it commits.
DEFAULT_TRUST_WINDOW = 0.1
#: How long one write around HOT keeps the marker in force: longer than one
#: attempt of a write takes from its marker to its commit (a write that
#: outlasts it marks again before it answers), and how long after the last
#: such write every process reads the catalog instead of HOT.
WRITE_AROUND_SECONDS = 5.0

Counter = Callable[[str], None]
_T = TypeVar("_T")


class _Partial:
    """What :meth:`SharedHot._guarded` answers when only some servers failed."""


PARTIAL = _Partial()


class Ticket:
    """One write as the guard saw it, from :meth:`HotGuard.before_write` to
    :meth:`HotGuard.after_write`."""

    __slots__ = ("around_until", "epoch", "placed", "versions")

    def __init__(self, versions: Mapping[str, int]) -> None:
        self.versions = versions
        #: When its placeholders went in (monotonic), and under which epoch.
        self.placed: float | None = None
        self.epoch: str | None = None
        #: Set if it went around HOT: until when the marker covers it.
        self.around_until: float | None = None


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

    def payload(self, key: str, encoding: str = codec.ENCODING) -> str | None:
        """The payload of a copy of ``key`` that may be served and was written
        in ``encoding`` (the reader's codec), or None: the fast form of
        :meth:`lookup` for a plain ``get``."""
        copy = self.lookup(key)
        if copy is None or copy.metadata["encoding"] != encoding:
            return None
        return copy.payload

    def token(self) -> float:
        """Taken before a catalog read whose result may be filled into HOT."""
        raise NotImplementedError

    def fill(self, entries: Mapping[str, Entry], token: float) -> int:
        """Copy catalog values into HOT if that is still safe; how many were copied."""
        raise NotImplementedError

    def before_write(self, versions: Mapping[str, int]) -> Ticket:
        """Before the catalog write of ``key -> new version``."""
        raise NotImplementedError

    def after_write(self, ticket: Ticket, copies: Mapping[str, Entry]) -> None:
        """After the catalog write (or its failure) of the ticket's versions;
        ``copies`` go into HOT."""
        raise NotImplementedError

    def drop(self, versions: Mapping[str, int]) -> None:
        """Remove the copies of ``key -> version`` (a demote: no copy above the target)."""
        raise NotImplementedError

    def refresh_if_old(self, ticket: Ticket) -> None:
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
        self._fetch_payload: Callable[[str, str], str | None] | None = getattr(repo, "fetch_payload", None)
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

    def payload(self, key: str, encoding: str = codec.ENCODING) -> str | None:
        fetch_payload = self._fetch_payload
        if fetch_payload is None:
            return super().payload(key, encoding)
        if self._changed():
            self._flush()
        try:
            return fetch_payload(key, encoding) or None  # "": a placeholder, or another codec
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

    def before_write(self, versions: Mapping[str, int]) -> Ticket:
        with self._lock:
            self._in_flight += 1
            self._generation += 1
            if len(versions) == 1:
                self.repo.delete(next(iter(versions)))
            else:
                self.repo.delete_many(versions)
        return Ticket(versions)

    def after_write(self, ticket: Ticket, copies: Mapping[str, Entry]) -> None:
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
        # Whatever version the copy has: one older than ``versions`` is stale
        # anyway (another process wrote), and the generation keeps a fill
        # that read before this from putting anything back.
        with self._lock:
            self._generation += 1
            self.repo.delete_many(versions)


class SharedHot(HotGuard):
    """The guard of a HOT shared by processes (redis://).

    Three mechanisms, each for one way a copy could go stale:

    * **Placeholders** (rule 2): a writer that reaches HOT blocks every fill
      of an older copy of its keys until its own copy replaces them.
    * **The write-around marker** (rule 3, partial partitions): a writer that
      cannot reach HOT records in the catalog that HOT is being written
      around, until ``until``, and waits out the trust window before its
      catalog write. Every process trusts HOT only for the trust window after
      its last look at the marker, so by the time that write commits no
      process serves a copy from HOT; they read the catalog until the marker
      has lapsed and whoever sees it lapsed has flushed HOT.
    * **The epoch** (rule 3, what happened to the server): every flush starts
      a new epoch; reads see the epoch with the copies and copies go in only
      under the epoch their reader checked; a server other than the one the
      epoch was checked on (a restart from a snapshot, a failover) or an
      epoch that vanished (FLUSHALL) means a flush before HOT is used again.
      Backends without epochs (any shared HOT but Redis) get the first two.

    A HOT call that fails -- unreachable, out of memory, read-only, any
    server error -- makes HOT skipped for :data:`RETRY_INTERVAL` from that
    failure; the next call after it tries again. Writes meanwhile go around
    HOT (above) and succeed on the catalog.
    """

    def __init__(self, repo: StateRepository, catalog: Catalog, hot_ttl: float | None,
                 count: Counter, trust_window: float = DEFAULT_TRUST_WINDOW) -> None:
        super().__init__(repo, catalog, hot_ttl, count)
        self.trust_window = trust_window
        self._lock = threading.Lock()
        #: Set by a failed HOT call: HOT is skipped until ``_retry_at``.
        self._down = False
        self._retry_at = 0.0
        #: HOT may serve copies until then (monotonic) without a new look at the marker.
        self._trusted_until = 0.0
        #: While the marker is in force: when to look at it again.
        self._next_look = 0.0
        #: The epoch this process checked; None: check before HOT is used.
        self._epoch: str | None = None
        self._fenced = callable(getattr(repo, "reset_epoch", None))
        #: The write-around marker as this process last wrote it: (since, until).
        self._marker: tuple[float, float] | None = None
        try:
            self._check()
        except TieredStateError as exc:
            self.failed(exc)

    # -- health
    @property
    def down(self) -> bool:
        return self._down

    def usable(self) -> bool:
        return not self._down or time.monotonic() >= self._retry_at

    def failed(self, exc: BaseException) -> None:
        """A HOT call failed: skip HOT for RETRY_INTERVAL from now, not from a later skip."""
        if not self._down:
            log.warning("tier hot failed, skipping it for %.1fs: %s", RETRY_INTERVAL, exc)
        self._down = True
        self._retry_at = time.monotonic() + RETRY_INTERVAL
        self._trusted_until = 0.0
        self._count("tier_errors")

    def _reached(self) -> None:
        if self._down:
            self._down = False
            log.warning("tier hot is reachable again")

    def _guarded(self, call: Callable[[], _T]) -> _T | _Partial | None:
        """``call()``; None if HOT failed (now skipped), :data:`PARTIAL` if only
        some of its servers did (their keys go without; the others are used)."""
        try:
            result = call()
        except PartialOutageError:
            return PARTIAL
        except TieredStateError as exc:
            if isinstance(exc, BatchError) and exc.failed and all(
                    isinstance(e, PartialOutageError) for e in exc.failed.values()):
                return PARTIAL
            self.failed(exc)
            return None
        self._reached()
        return result

    # -- trust: the marker and the epoch
    def _serving(self) -> bool:
        """May HOT serve copies now? Looks at the marker once per trust window."""
        now = time.monotonic()
        if now < self._trusted_until:
            return True
        if now < self._next_look or not self.usable():
            return False
        try:
            return self._check()
        except TieredStateError as exc:
            self.failed(exc)
            return False

    def _check(self) -> bool:
        """Look at the marker and the epoch; flush HOT if either says so."""
        started = time.monotonic()
        try:
            marker = self.catalog.repo.fetch_record(HOT_DIRTY)
        except TieredStateError:
            return False  # the catalog did not answer; the caller's read will say so
        with self._lock:
            if self._fenced and self._epoch is None:
                self._adopt_epoch()
            if marker is not None:
                if _marker_until(marker) > time.time():
                    # Still written around: read the catalog, look again in a window.
                    self._next_look = started + self.trust_window
                    return False
                self._flush("HOT was written around while a process could not reach it")
                self.catalog.repo.delete_if_version(HOT_DIRTY, marker.version)
        self._reached()
        self._trusted_until = started + self.trust_window
        return True

    def _adopt_epoch(self, flush: bool = False) -> None:
        """Make sure the server's copies are the ones every writer kept current.

        The catalog records the epoch and the server it was started on. Both
        match what the server says (and no ``flush`` is asked for): adopt it.
        Otherwise -- a restart, a failover, a FLUSHALL, a first run -- flush
        HOT and start a new epoch. Processes doing that at once agree through
        the conditional write of the record: a loser looks again.
        """
        repo: Any = self.repo
        catalog = self.catalog.repo
        for _ in range(5):
            recorded = catalog.fetch_record(HOT_EPOCH)
            server, stored = repo.epoch_state()
            repo.trust_server(server)
            if not flush and recorded is not None and stored is not None and recorded.live() \
                    and codec.decode(recorded.payload) == {"server": server, "epoch": stored}:
                self._epoch = stored
                return
            epoch = secrets.token_hex(8)
            flushed = repo.reset_epoch(epoch)
            self._count("hot_flushes")
            if recorded is not None and not flush:
                log.warning("tier hot: flushed %d copies that may have missed invalidations "
                            "(the server restarted or changed, or was flushed)", flushed)
            flush = False
            payload = codec.encode({"server": server, "epoch": epoch})
            if catalog.store_if_version(HOT_EPOCH, payload, _reserved_metadata(payload),
                                        recorded.version if recorded is not None else 0):
                self._epoch = epoch
                return
        raise BackendError("tier hot: processes kept flushing it at once; trying again later",
                           self.repo.backend)

    def _flush(self, why: str) -> None:
        log.warning("tier hot flushed: %s", why)
        if self._fenced:
            self._epoch = None
            self._adopt_epoch(flush=True)
        else:
            self.repo.clear()
            self._count("hot_flushes")

    def _moved_on(self) -> None:
        """A read or fill found another epoch: check again before the next use."""
        self._epoch = None
        self._trusted_until = 0.0

    # -- reads
    def lookup(self, key: str) -> Entry | None:
        if not self._serving():
            return None
        epoch = self._epoch
        repo: Any = self.repo
        try:
            if epoch is None:
                if self._fenced:
                    return None
                entry = repo.fetch_record(key)
            else:
                same, entry = repo.fetch_record_in_epoch(key, epoch)
                if not same:
                    self._moved_on()
                    return None
        except PartialOutageError:
            return None  # its server only: the catalog answers for this key
        except TieredStateError as exc:
            self.failed(exc)
            return None
        return self._usable_copy(entry)

    def lookup_many(self, keys: list[str]) -> dict[str, Entry]:
        if not self._serving():
            return {}
        epoch = self._epoch
        repo: Any = self.repo
        try:
            if epoch is None:
                if self._fenced:
                    return {}
                found = repo.fetch_many(keys)
            else:
                found = repo.fetch_many_in_epoch(keys, epoch)
                if found is None:
                    self._moved_on()
                    return {}
        except PartialOutageError as exc:
            found = exc.found  # the unreachable servers' keys are read from the catalog
        except TieredStateError as exc:
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
        if time.monotonic() - token > FILL_DEADLINE or not self.usable():
            return 0
        return self._put(self._copies(entries))

    def _put(self, items: dict[str, tuple[str, Metadata]]) -> int:
        """Store copies if newer, under the epoch this process checked."""
        epoch = self._epoch
        repo: Any = self.repo
        if epoch is None:
            if self._fenced:
                return 0
            stored = self._guarded(lambda: repo.store_many_if_newer(items))
            return len(stored) if isinstance(stored, set) else 0
        if len(items) == 1:  # one script call, not a pipeline
            (key, (payload, md)), = items.items()
            one = self._guarded(lambda: repo.store_if_newer_in_epoch(key, payload, md, epoch))
            stored = one if one is None or one is PARTIAL else ({key} if one else set())
        else:
            stored = self._guarded(lambda: repo.store_many_if_newer_in_epoch(items, epoch))
        if isinstance(stored, _Partial):
            return 0  # a fill is a bonus: the reachable servers' copies went in
        if stored is None:
            if not self._down:
                self._moved_on()
            return 0
        return len(stored)

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

    def _place(self, ticket: Ticket) -> bool:
        """Put the write's placeholders in; False if HOT failed (or is skipped)."""
        if not self.usable() or not self._block(ticket.versions):
            return False
        ticket.placed = time.monotonic()
        ticket.epoch = self._epoch
        return True

    def _block(self, versions: Mapping[str, int]) -> bool:
        """Store placeholders one below ``versions`` (unfenced: blocking is always
        safe); False if HOT failed."""
        items = self._placeholders(versions)
        try:
            if len(items) == 1:
                (key, (payload, md)), = items.items()
                self.repo.store_if_newer(key, payload, md)
            else:
                self.repo.store_many_if_newer(items)
        except TieredStateError as exc:
            self.failed(exc)
            return False
        self._reached()
        return True

    def before_write(self, versions: Mapping[str, int]) -> Ticket:
        ticket = Ticket(versions)
        if not self._place(ticket):
            self._write_around(ticket)
        return ticket

    def _write_around(self, ticket: Ticket) -> None:
        """HOT cannot be invalidated: make every process stop serving it first.

        Records (or extends) the marker in the catalog, then waits until
        every process's trust window that began before the marker was
        visible has ended. Raises if the catalog is down: the write then
        fails, as it must.
        """
        self._trusted_until = 0.0
        now = time.time()
        marker = self._marker
        if marker is None or marker[1] - now < WRITE_AROUND_SECONDS / 2:
            current = self.catalog.repo.fetch_record(HOT_DIRTY)
            since, until = now, now + WRITE_AROUND_SECONDS
            if current is not None and _marker_until(current) > now:
                # Still in force: keep its start (readers saw it from then).
                since = _marker_since(current)
                until = max(until, _marker_until(current))
            payload = codec.encode({"since": since, "until": until, "pid": os.getpid()})
            self.catalog.repo.store(HOT_DIRTY, payload, _reserved_metadata(payload))
            if since == now:
                since = time.time()  # visible from when the write returned
            marker = self._marker = (since, until)
            self._count("hot_write_arounds")
        ticket.around_until = marker[1]
        # Another process's clock may be a little off: the margin covers it.
        wait = marker[0] + self.trust_window * 1.5 - time.time()
        if wait > 0:
            time.sleep(min(wait, self.trust_window * 1.5))

    def refresh_if_old(self, ticket: Ticket) -> None:
        """Right before the catalog write: placeholders that may expire before
        the commit's readers are done, or that a flush since removed, go in again."""
        if ticket.placed is None:
            return
        if time.monotonic() - ticket.placed > _REPLACE_AFTER or ticket.epoch != self._epoch:
            if not self._place(ticket):
                self._write_around(ticket)

    def after_write(self, ticket: Ticket, copies: Mapping[str, Entry]) -> None:
        if ticket.around_until is not None:
            if time.time() > ticket.around_until:
                # The commit outlasted the marker: it may have lapsed and HOT
                # been flushed before the commit. Mark again before answering.
                self._marker = None
                self._write_around(ticket)
            return
        if not self.usable():
            return
        if copies:
            self._put(self._copies(copies))
        # The keys left without a copy get their placeholders again: a flush
        # (a restart, a FLUSHALL, the end of a write-around) between
        # before_write and the commit took the first ones, and a reader that
        # read the catalog before the commit may have filled an older copy
        # since; nothing else would ever replace it.
        rest = {k: v for k, v in ticket.versions.items() if k not in copies}
        if rest:
            self._block(rest)

    def drop(self, versions: Mapping[str, int]) -> None:
        """Replace the copies of ``key -> version`` by placeholders one version above.

        Never a delete: an empty slot would let a reader that read the
        catalog before the last write fill its older copy; the placeholder
        keeps blocking it (and any copy up to this version), and yields to
        any newer write.
        """
        if self.usable():
            self._block({k: v + 2 for k, v in versions.items()})


def _reserved_metadata(payload: str) -> Metadata:
    """Metadata for a record of the guard's own in the catalog: a version
    from the clock (these records are written unconditionally or compared
    by their own version, never ordered against user writes)."""
    now = time.time()
    return make_metadata(payload, (time.time_ns() // 1000) << 10, now=now)


def _marker_field(marker: Entry, name: str) -> float:
    try:
        value = codec.decode(marker.payload).get(name)
        return float(value) if value is not None else 0.0
    except (TieredStateError, AttributeError, TypeError, ValueError):
        return 0.0


def _marker_until(marker: Entry) -> float:
    """Until when the marker says HOT is written around (0.0: an older marker, lapsed)."""
    return _marker_field(marker, "until") if marker.live() else 0.0


def _marker_since(marker: Entry) -> float:
    return _marker_field(marker, "since")


#: Every PrivateHot of this process, for the fork hook (weakly: a guard goes
#: with its manager; os.register_at_fork cannot unregister a callback).
_PRIVATE: weakref.WeakSet[PrivateHot] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for guard in list(_PRIVATE):
        guard._after_fork()


if hasattr(os, "register_at_fork"):  # pragma: no branch - POSIX
    os.register_at_fork(after_in_child=_after_fork_in_child)


def hot_guard(repo: StateRepository, catalog: Catalog, hot_ttl: float | None,
              count: Counter, trust_window: float = DEFAULT_TRUST_WINDOW) -> HotGuard:
    """The guard for a HOT repository in front of ``catalog``."""
    if repo.shared:
        return SharedHot(repo, catalog, hot_ttl, count, trust_window)
    return PrivateHot(repo, catalog, hot_ttl, count)
