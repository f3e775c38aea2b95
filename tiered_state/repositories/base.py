"""The repository contract: one storage backend behind a small synchronous API.

This module is the one place the contract is written down. Every backend
(memory, redis, sqlite, postgres, filesystem, s3, and any registered with
:func:`tiered_state.register_backend`) subclasses :class:`StateRepository`
and is held to it by the shared conformance suite,
:class:`tiered_state.testing.RepositoryContract`, which a backend's test
module subclasses.

Entries
    A repository stores, under each key, one :class:`~tiered_state.record.Entry`:
    a *payload* (text) and a :class:`~tiered_state.record.Metadata` dict
    (checksum, size_bytes, version, created_at, updated_at, expires_at,
    encoding). It persists both and returns them unchanged; it never decides
    versions or checksums itself, the manager does. An entry is a *value*, a
    *stub* or a *tombstone* (``metadata["encoding"]``, see
    :mod:`tiered_state.record`). A repository stores all three verbatim; the
    kinds differ only in what the convenience reads show:

    * :meth:`~StateRepository.fetch` returns the value of a live *value*
      only (None for a stub or a tombstone: this repository does not hold
      that value);
    * :meth:`~StateRepository.keys`, :meth:`~StateRepository.iter_keys` and
      ``stats()["key_count"]`` count *live* entries: values and stubs that
      have not expired. A tombstone's ``expires_at`` is 0.0, so it is never
      live;
    * :meth:`~StateRepository.scan` offers expired entries (tombstones
      included) and, when asked, idle *values* (never stubs: their payload
      already moved).

Keys
    Every method validates its keys with :func:`tiered_state.keys.validate_key`
    before any I/O, so an invalid key raises
    :class:`~tiered_state.errors.InvalidKeyError` and nothing is touched.

Expiry
    ``metadata["expires_at"]`` is the entry's end of life.
    :meth:`~StateRepository.fetch`, :meth:`~StateRepository.keys` and
    :meth:`~StateRepository.stats` never show an expired entry.
    :meth:`~StateRepository.fetch_record` / :meth:`~StateRepository.fetch_many`
    are lower level: a backend that expires natively (memory, redis) returns
    nothing, a durable backend keeps returning the expired entry until it is
    deleted.

Conditional writes
    The manager decides everything about a key with one of these, so each is
    atomic against every other writer of the store -- other threads and other
    processes -- and compares versions exactly (they exceed 2**53). Two
    numbers are involved:

    * the *stored version*: the version of whatever entry is stored (any
      kind, expired or not); 0 if none;
    * the *live version*: the stored version if the entry is live (an
      unexpired value or stub), else 0.

    ==========================================  ===========================================
    :meth:`~StateRepository.store_if_newer`     store iff stored version < new version
    :meth:`~StateRepository.store_if_version`   store iff live version == ``expected`` and
                                                stored version <= new version (``expected``
                                                0: the key is absent, expired or a
                                                tombstone; ``expected`` equal to the new
                                                version: replace an entry by another of the
                                                same version, as a migration does)
    :meth:`~StateRepository.delete_if_version`  delete iff stored version == ``version``
    ==========================================  ===========================================

    Each has a batch form (``store_many_if_newer``, ``store_many_if_version``,
    ``delete_many_if_version``) that decides key by key, atomically per key,
    with the store's bulk primitive: one round trip or one transaction per
    batch on servers. A batch returns the keys it wrote or deleted; a key the
    condition refused is simply left out.

Errors
    Absent keys are not errors (``None``, ``False``, ``0``). A driver error is
    translated, in one place per backend, into
    :class:`~tiered_state.errors.BackendUnavailableError` (cannot reach the
    server: connect failure, timeout, lost connection -- the manager may skip
    the tier) or :class:`~tiered_state.errors.BackendError` (anything else),
    with the driver's exception as ``__cause__``. A batch that fails part-way
    raises :class:`~tiered_state.errors.BatchError` naming the failed and the
    succeeded keys. No message contains a value or a password.

Optional: fetch_payload
    A backend may add ``fetch_payload(key, encoding="json") -> str | None``,
    the cheap read the manager uses for a plain ``get`` when it has one: the
    verified payload of the live value stored under ``key`` in ``encoding``
    (the reader's codec); ``""`` if an entry is stored but is not such a
    value here (a stub, a tombstone, expired, another codec's); None if
    nothing is stored. It raises ``IntegrityError`` for a payload that
    fails its checksum. memory and sqlite have it.

Threads
    A repository may be shared by threads. Connections lost to a server
    restart are re-established on the next call.

The seven core methods (fetch, store, delete, keys, stats, store_many,
delete_many), the conditional writes, :meth:`~StateRepository.fetch_record`
and :meth:`~StateRepository.iter_keys` are abstract. The rest have generic
implementations built on them; a backend overrides them where its store has
a native, faster way.
"""

from __future__ import annotations

import abc
import logging
import time
from collections.abc import Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from ..errors import BatchError, IntegrityError
from ..record import Entry, Metadata, is_value

if TYPE_CHECKING:
    from ..record import Tier
    from ..segments import SegmentStore

__all__ = ["Items", "StateRepository", "chunked"]

log = logging.getLogger(__name__)

Items = Mapping[str, "tuple[str, Metadata]"]
_R = TypeVar("_R", bound="StateRepository")
_T = TypeVar("_T")


def chunked(iterable: Iterable[_T], size: int) -> Iterator[list[_T]]:
    """Yield lists of at most ``size`` items, holding one chunk at a time."""
    chunk: list[_T] = []
    for item in iterable:
        chunk.append(item)
        if len(chunk) >= size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


class StateRepository(abc.ABC):
    """One storage backend. See the module docstring for the contract."""

    #: The backend's one name: URL scheme, module, extra, metrics segment.
    backend: ClassVar[str] = "base"
    #: True if the data does not survive a restart (memory, redis as a cache).
    #: The manager writes through from a volatile tier to a durable one.
    volatile: ClassVar[bool] = False
    #: True if other processes see the same data (everything but memory).
    shared: ClassVar[bool] = True

    #: The tier the manager assigned (None for a repository used on its own).
    tier: Tier | None = None

    @classmethod
    def from_url(cls: type[_R], url: str, **options: Any) -> _R:
        """Open from a URL; each backend documents its form and query options."""
        raise NotImplementedError(f"{cls.__name__} cannot be opened from a URL")

    # ------------------------------------------------------------------ reads
    @abc.abstractmethod
    def fetch_record(self, key: str) -> Entry | None:
        """The stored entry of ``key`` (any kind), or ``None`` if absent.

        The checksum is not verified here (:meth:`Entry.valid` does that); an
        expired entry may be returned by a durable backend (see "Expiry").
        """

    @abc.abstractmethod
    def fetch(self, key: str) -> Any | None:
        """The decoded value of ``key``; ``None`` if absent, expired, a stub or a tombstone.

        :func:`tiered_state.record.live_value` of :meth:`fetch_record` is a
        correct implementation; backends with a cheaper query use it.

        :raises IntegrityError: the stored payload fails its checksum.
        """

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        """:meth:`fetch_record` for many keys; absent keys are left out."""
        out: dict[str, Entry] = {}
        for key in keys:
            entry = self.fetch_record(key)
            if entry is not None:
                out[key] = entry
        return out

    # ------------------------------------------------------------------ writes
    @abc.abstractmethod
    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        """Store payload ``value`` with ``metadata`` under ``key``, replacing any entry.

        Durable once it returns (for a durable backend). Honours
        ``metadata["expires_at"]``, natively where the store can.

        :returns: True.
        """

    @abc.abstractmethod
    def store_many(self, items: Items) -> set[str]:
        """Store every ``key -> (payload, metadata)`` with the store's bulk primitive.

        :returns: the keys stored (all of them).
        :raises BatchError: some keys failed; ``.failed`` and ``.succeeded`` say which.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``'s entry. Idempotent.

        :returns: True if an entry existed (expired ones count as existing).
        """

    @abc.abstractmethod
    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete every key with the store's bulk primitive.

        :returns: how many entries existed.
        """

    # ------------------------------------------------------- conditional writes
    @abc.abstractmethod
    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        """Store iff the stored version is below ``metadata["version"]``.

        :returns: whether it stored.
        """

    @abc.abstractmethod
    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        """Store iff the live version is ``expected`` and the stored version is
        at most ``metadata["version"]`` (see "Conditional writes").

        :returns: whether it stored.
        """

    @abc.abstractmethod
    def delete_if_version(self, key: str, version: int) -> bool:
        """Delete iff the stored version is ``version``.

        :returns: whether it deleted.
        """

    @abc.abstractmethod
    def store_many_if_newer(self, items: Items) -> set[str]:
        """:meth:`store_if_newer` for every item, with the store's bulk primitive.

        :returns: the keys stored.
        :raises BatchError: some keys could not be tried (not: refused).
        """

    @abc.abstractmethod
    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        """:meth:`store_if_version` for every item, ``expected[key]`` each.

        :returns: the keys stored.
        :raises BatchError: some keys could not be tried (not: refused).
        """

    @abc.abstractmethod
    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        """:meth:`delete_if_version` for many keys (``key -> version``).

        :returns: the keys deleted.
        """

    # ------------------------------------------------------------------ listing
    @abc.abstractmethod
    def keys(self, pattern: str = "*") -> list[str]:
        """Live keys matching the glob ``pattern``, each once, any order.

        Glob dialect and reference matcher: :mod:`tiered_state.keys`.
        """

    @abc.abstractmethod
    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        """Like :meth:`keys`, streamed in bounded memory. Backends that can
        yield keys in key order (sqlite, postgres) do; callers may write
        while iterating."""

    def iter_all_keys(self) -> Iterator[str]:
        """Every stored key, expired entries and tombstones included.

        What :meth:`scan`, :meth:`clear` and the manager's garbage collection
        walk. The default, :meth:`iter_keys`, is right for backends that drop
        expired entries themselves (memory, redis); durable backends override.
        """
        return self.iter_keys("*")

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """At least ``backend``, ``tier`` and ``key_count`` (live keys)."""

    # ------------------------------------------------------------------ sweep
    def scan(
        self, batch_size: int = 500, *, now: float | None = None, idle_before: float | None = None
    ) -> Iterator[list[Entry]]:
        """Yield batches of sweep candidates: entries expired at ``now``
        (tombstones included) and, if ``idle_before`` is given, live values
        neither written nor read since then (:meth:`touch_many`).

        Each batch holds at most ``batch_size`` entries; the caller may delete
        or rewrite them before asking for the next batch.
        """
        now = time.time() if now is None else now
        for chunk in chunked(self.iter_all_keys(), batch_size):
            batch = []
            for entry in self._readable_many(chunk).values():
                if entry.expired(now):
                    batch.append(entry)
                elif (idle_before is not None and is_value(entry.metadata)
                      and entry.metadata["updated_at"] < idle_before):
                    batch.append(entry)
            if batch:
                yield batch

    def _readable_many(self, keys: list[str]) -> dict[str, Entry]:
        """``fetch_many(keys)`` without the records that cannot be read (corrupt:
        logged and left for a read to report); any other failure raises."""
        try:
            return self.fetch_many(keys)
        except BatchError as exc:
            if not all(isinstance(e, IntegrityError) for e in exc.failed.values()):
                raise
            log.warning("%s: %d unreadable records skipped by the scan", self.backend,
                        len(exc.failed))
            rest = [k for k in keys if k not in exc.failed]
            return self.fetch_many(rest) if rest else {}

    def touch_many(self, keys: Iterable[str], at: float) -> None:
        """Record that ``keys`` were read at ``at`` (for the sweep's idle test).

        Called in batches by the manager, never once per read. The generic
        version does nothing: idle then means "not written". WARM backends
        (sqlite, postgres) keep a ``last_accessed`` column.
        """

    def reclaim_space(self, min_free_fraction: float = 0.25) -> int:
        """Give space that deletes left unused back to the file system, if at
        least ``min_free_fraction`` of the store is unused. Called by the sweep.

        :returns: bytes given back. The default does nothing and returns 0:
            most stores free space as they delete (files, objects, Redis) or
            reclaim it themselves (PostgreSQL's autovacuum).
        """
        return 0

    def segments(self) -> SegmentStore | None:
        """Where this store keeps segments (many payloads in one file or
        object, see :mod:`tiered_state.segments`), or None if it keeps none.

        Only COLD backends offer it (files, S3): there a file or object per
        record costs a disk block or a request each. Under a catalog, the
        sweep then moves records down a batch at a time into one segment.
        """
        return None

    def clear(self) -> int:
        """Delete every entry of this repository (its namespace only).

        :returns: how many entries were deleted (its segments go too, uncounted).
        """
        total = 0
        for chunk in chunked(self.iter_all_keys(), 1000):
            total += self.delete_many(chunk)
        store = self.segments()
        if store is not None:
            for name, _ in list(store.list()):
                store.delete(name)
        return total

    # ------------------------------------------------------------------ signals
    def changed_by_others(self) -> bool:
        """True if someone else may have written since the previous call in this process.

        Lets a process-private HOT tier notice writes it did not make. "Someone
        else" is another process or another connection; a call from a thread
        that has not asked before answers True unless the store provably did
        not change since any thread last got False, so a new thread or a forked
        child never trusts copies made before a write it did not see. The
        generic answer is False (no cheap signal); sqlite answers from its
        WAL index and ``PRAGMA data_version``.
        """
        return False

    def ping(self) -> float:
        """Reach the store once; return the round trip in milliseconds."""
        start = time.perf_counter()
        self.fetch_record("__tiered_state_ping__")
        return (time.perf_counter() - start) * 1000.0

    def close(self) -> None:
        """Release connections and files. Idempotent; the default does nothing."""

    def __enter__(self: _R) -> _R:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} tier={self.tier}>"

    # ------------------------------------------------------------ for backends
    def _batch_failed(
        self, action: str, failed: Mapping[str, BaseException], succeeded: Iterable[str]
    ) -> BatchError:
        return BatchError(f"{action} failed for some keys", failed, succeeded, self.backend)
