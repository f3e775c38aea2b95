"""The repository contract: one storage backend behind a small synchronous API.

This module is the one place the contract is written down. Every backend
(memory, redis, sqlite, postgres, filesystem, s3) subclasses
:class:`StateRepository` and is held to it by the shared conformance suite in
``tests/conformance/``.

Payloads and metadata
    A repository stores a *payload* -- the value already encoded as JSON text
    by :mod:`tiered_state.codec` -- together with a :class:`~tiered_state.record.Metadata`
    dict (checksum, size_bytes, version, created_at, updated_at, expires_at,
    encoding). It persists both and returns them unchanged. It never decides
    versions or checksums itself; the manager does.

Keys
    Every method validates its keys with :func:`tiered_state.keys.validate_key`
    before any I/O, so an invalid key raises
    :class:`~tiered_state.errors.InvalidKeyError` and nothing is touched.

Expiry
    ``metadata["expires_at"]`` is the record's end of life. :meth:`fetch`,
    :meth:`keys` and :meth:`stats` never show an expired record.
    :meth:`fetch_record` / :meth:`fetch_many` are lower level: a backend that
    expires natively (memory, redis) returns nothing, a durable backend keeps
    returning the expired entry until it is deleted. The manager relies on
    that: an expired copy in a durable tier is a tombstone hiding older copies
    below it until a sweep purges both.

Errors
    Absent keys are not errors (``None``, ``False``, ``0``). A driver error is
    translated, in one place per backend, into
    :class:`~tiered_state.errors.BackendUnavailableError` (cannot reach the
    server: connect failure, timeout, lost connection -- the manager may skip
    the tier) or :class:`~tiered_state.errors.BackendError` (anything else),
    with the driver's exception as ``__cause__``. A batch that fails part-way
    raises :class:`~tiered_state.errors.BatchError` naming the failed and the
    succeeded keys. No message contains a value or a password.

Threads
    A repository may be shared by threads. Connections lost to a server
    restart are re-established on the next call.

The seven methods of the seed design are abstract below (with
:meth:`fetch_record` as the primitive that :meth:`fetch` is built on). The rest
have generic implementations built on those seven; a backend overrides them
where its store has a native, faster or atomic way.
"""

from __future__ import annotations

import abc
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from .. import codec
from ..errors import BatchError, IntegrityError
from ..keys import validate_key
from ..record import Entry, Metadata

if TYPE_CHECKING:
    from ..metrics import MetricsCollector
    from ..record import Tier

__all__ = ["InstrumentedRepository", "StateRepository", "Items", "chunked"]

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

    # ------------------------------------------------------------------ the seven
    @abc.abstractmethod
    def fetch_record(self, key: str) -> Entry | None:
        """The stored payload and metadata of ``key``, or ``None`` if absent.

        The checksum is not verified here (:meth:`Entry.valid` does that); an
        expired entry may be returned by a durable backend (see "Expiry").
        """

    def fetch(self, key: str) -> Any | None:
        """The decoded value of ``key``; ``None`` if absent or expired.

        :raises IntegrityError: the stored payload fails its checksum.
        """
        payload = self.fetch_payload(key)
        return None if payload is None else codec.decode(payload)

    def fetch_payload(self, key: str) -> str | None:
        """The verified payload of the live record ``key``; None if absent or expired.

        What :meth:`fetch` returns before decoding: the manager's read path,
        which needs no metadata for a plain ``get``.

        :raises IntegrityError: the stored payload fails its checksum.
        """
        entry = self.fetch_record(key)
        if entry is None or entry.expired():
            return None
        if not entry.valid():
            raise IntegrityError(f"{self.backend}: checksum mismatch for {key!r}", key)
        return entry.payload

    @abc.abstractmethod
    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        """Store payload ``value`` with ``metadata`` under ``key``, replacing any copy.

        Durable once it returns (for a durable backend). Honours
        ``metadata["expires_at"]``, natively where the store can.

        :returns: True.
        """

    @abc.abstractmethod
    def delete(self, key: str) -> bool:
        """Delete ``key``. Idempotent.

        :returns: True if a copy existed (expired copies count as existing).
        """

    @abc.abstractmethod
    def keys(self, pattern: str = "*") -> list[str]:
        """Live (unexpired) keys matching the glob ``pattern``, each once, any order.

        Glob dialect and reference matcher: :mod:`tiered_state.keys`.
        """

    @abc.abstractmethod
    def stats(self) -> dict[str, Any]:
        """At least ``backend``, ``tier`` and ``key_count`` (live keys)."""

    @abc.abstractmethod
    def store_many(self, items: Items) -> set[str]:
        """Store every ``key -> (payload, metadata)`` with the store's bulk primitive.

        :returns: the keys stored (all of them).
        :raises BatchError: some keys failed; ``.failed`` and ``.succeeded`` say which.
        """

    @abc.abstractmethod
    def delete_many(self, keys: Iterable[str]) -> int:
        """Delete every key with the store's bulk primitive.

        :returns: how many existed.
        """

    # ---------------------------------------------------------- generic extras
    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        """:meth:`fetch_record` for many keys; absent keys are left out."""
        out: dict[str, Entry] = {}
        for key in keys:
            entry = self.fetch_record(key)
            if entry is not None:
                out[key] = entry
        return out

    def _generic_lock(self) -> threading.RLock:
        lock: threading.RLock | None = self.__dict__.get("_generic_lock")
        if lock is None:
            lock = self.__dict__.setdefault("_generic_lock", threading.RLock())
        return lock

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        """Store only if the current live version is ``expected`` (0: absent or expired).

        Atomic in backends that override it (sqlite, postgres, redis, memory);
        the generic version is atomic only within this process.

        :returns: whether it stored.
        """
        with self._generic_lock():
            entry = self.fetch_record(key)
            current = 0 if entry is None or entry.expired() else entry.version
            if current != expected:
                return False
            return self.store(key, value, metadata)

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        """Store unless a copy with a version >= ``metadata["version"]`` is there.

        Used for promotions and migration copies, so a slow copy never
        overwrites a newer write.

        :returns: whether it stored.
        """
        with self._generic_lock():
            entry = self.fetch_record(key)
            if entry is not None and entry.version >= metadata["version"]:
                return False
            return self.store(key, value, metadata)

    def delete_if_version(self, key: str, version: int) -> bool:
        """Delete ``key`` only if its stored version is ``version``.

        :returns: whether it deleted.
        """
        with self._generic_lock():
            entry = self.fetch_record(key)
            if entry is None or entry.version != version:
                return False
            return self.delete(key)

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        """:meth:`delete_if_version` for many keys (``key -> version``).

        Used by the sweep to drop source copies after a verified copy; sqlite
        and postgres do it in one transaction.

        :returns: the keys deleted.
        """
        return {key for key, version in versions.items() if self.delete_if_version(key, version)}

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        """Like :meth:`keys`, but streamed in bounded memory where the backend can."""
        return iter(self.keys(pattern))

    def scan(
        self, batch_size: int = 500, *, now: float | None = None, idle_before: float | None = None
    ) -> Iterator[list[Entry]]:
        """Yield batches of sweep candidates: entries expired at ``now``, and
        (if ``idle_before`` is given) entries neither written nor read since.

        Each batch holds at most ``batch_size`` entries; the caller may delete
        or move them before asking for the next batch.
        """
        now = time.time() if now is None else now
        # The generic scan must see expired entries too, which keys() hides;
        # fetch_many returns them from durable backends.
        for chunk in chunked(self._all_keys(), batch_size):
            batch = []
            for entry in self.fetch_many(chunk).values():
                if entry.expired(now):
                    batch.append(entry)
                elif idle_before is not None and entry.metadata["updated_at"] < idle_before:
                    batch.append(entry)
            if batch:
                yield batch

    def _all_keys(self) -> Iterator[str]:
        """Every stored key including expired ones; backends with tombstones override."""
        return self.iter_keys("*")

    def touch_many(self, keys: Iterable[str], at: float) -> None:
        """Record that ``keys`` were read at ``at`` (for the sweep's idle test).

        Called in batches by the manager, never once per read. The generic
        version does nothing: idle then means "not written". WARM backends
        (sqlite, postgres) keep a ``last_accessed`` column.
        """

    def clear(self) -> int:
        """Delete every key of this repository (its namespace only).

        :returns: how many keys were deleted.
        """
        total = 0
        for chunk in chunked(self._all_keys(), 1000):
            total += self.delete_many(chunk)
        return total

    def changed_by_others(self) -> bool:
        """True if another connection or process wrote since this thread last asked.

        Lets a process-local HOT tier notice writes it did not make. The
        generic answer is False (no cheap signal); sqlite answers from
        ``PRAGMA data_version``.
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
    @staticmethod
    def _check(key: str) -> str:
        return validate_key(key)

    def _batch_failed(
        self, action: str, failed: Mapping[str, BaseException], succeeded: Iterable[str]
    ) -> BatchError:
        return BatchError(f"{action} failed for some keys", failed, succeeded, self.backend)


# Which counter each method bumps; extras count with the seed operation they refine.
_OPERATION = {
    "fetch": "fetch",
    "fetch_record": "fetch",
    "fetch_payload": "fetch",
    "fetch_many": "fetch_many",
    "store": "store",
    "store_if_version": "store",
    "store_if_newer": "store",
    "store_many": "store_many",
    "delete": "delete",
    "delete_if_version": "delete",
    "delete_many": "delete_many",
    "delete_many_if_version": "delete_many",
    "keys": "keys",
    "touch_many": "touch_many",
}


class InstrumentedRepository(StateRepository):
    """Wraps a repository and records metrics for every operation.

    The single hook point for metrics: the manager wraps each repository in
    one of these only when a collector is configured, so ``metrics=None``
    costs nothing. Names:
    ``state.repository.{backend}.operations.{op}_total`` (counter, every
    attempt), ``...{op}_latency_ms`` (timer), ``...errors_total`` (counter,
    every exception an operation raises) and ``...batch_size`` (histogram,
    for the batch operations). ``metrics`` may also be a ``statsd.StatsClient``.
    """

    def __init__(self, inner: StateRepository, metrics: MetricsCollector) -> None:
        from ..metrics import as_collector

        collector = as_collector(metrics)
        assert collector is not None
        self.inner = inner
        self.metrics = collector
        prefix = f"state.repository.{inner.backend}.operations."
        self._prefix = prefix
        # Counter handles and names made once: building names per call would
        # cost as much as a memory-tier read.
        self._ops = {
            op: (collector.ticker(prefix + op + "_total"), prefix + op + "_latency_ms")
            for op in set(_OPERATION.values())
        }
        self._fetch_op = self._ops["fetch"]
        self._errors_name = prefix + "errors_total"
        self._batch_name = prefix + "batch_size"
        self._sampled = collector.sampled_timing
        self._incr = collector.incr

    # Attributes the manager reads from the wrapped repository.
    @property  # type: ignore[override]
    def backend(self) -> str:  # type: ignore[override]
        return self.inner.backend

    @property  # type: ignore[override]
    def volatile(self) -> bool:  # type: ignore[override]
        return self.inner.volatile

    @property  # type: ignore[override]
    def shared(self) -> bool:  # type: ignore[override]
        return self.inner.shared

    @property  # type: ignore[override]
    def tier(self) -> Tier | None:  # type: ignore[override]
        return self.inner.tier

    @tier.setter
    def tier(self, value: Tier | None) -> None:
        self.inner.tier = value

    def _call(self, method: str, size: int | None, *args: Any) -> Any:
        ticker, latency = self._ops[_OPERATION[method]]
        if size is not None:
            self.metrics.histogram(self._batch_name, size)
        ticker.tick()
        rate = ticker.rate
        start = time.perf_counter()
        try:
            return getattr(self.inner, method)(*args)
        except Exception:
            self._incr(self._errors_name)
            raise
        finally:
            if rate >= 1.0 or random.random() < rate:
                self._sampled(latency, (time.perf_counter() - start) * 1000.0, rate)

    # The hot path of every read, spelled out to skip _call's dispatch and,
    # when this call is not picked for timing, the clock reads.
    def _read(self, read: Callable[[str], _T], key: str) -> _T:
        ticker, latency = self._fetch_op
        ticker.tick()
        rate = ticker.rate
        if rate < 1.0 and random.random() >= rate:
            try:
                return read(key)
            except Exception:
                self._incr(self._errors_name)
                raise
        start = time.perf_counter()
        try:
            return read(key)
        except Exception:
            self._incr(self._errors_name)
            raise
        finally:
            self._sampled(latency, (time.perf_counter() - start) * 1000.0, rate)

    def fetch_record(self, key: str) -> Entry | None:
        return self._read(self.inner.fetch_record, key)

    def fetch_payload(self, key: str) -> str | None:
        return self._read(self.inner.fetch_payload, key)

    def fetch(self, key: str) -> Any | None:
        return self._call("fetch", None, key)

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        return self._call("store", None, key, value, metadata)  # type: ignore[no-any-return]

    def delete(self, key: str) -> bool:
        return self._call("delete", None, key)  # type: ignore[no-any-return]

    def keys(self, pattern: str = "*") -> list[str]:
        return self._call("keys", None, pattern)  # type: ignore[no-any-return]

    def stats(self) -> dict[str, Any]:
        return self.inner.stats()

    def store_many(self, items: Items) -> set[str]:
        return self._call("store_many", len(items), items)  # type: ignore[no-any-return]

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = list(keys)
        return self._call("delete_many", len(keys), keys)  # type: ignore[no-any-return]

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = list(keys)
        return self._call("fetch_many", len(keys), keys)  # type: ignore[no-any-return]

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        return self._call("store_if_version", None, key, value, metadata, expected)  # type: ignore[no-any-return]

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        return self._call("store_if_newer", None, key, value, metadata)  # type: ignore[no-any-return]

    def delete_if_version(self, key: str, version: int) -> bool:
        return self._call("delete_if_version", None, key, version)  # type: ignore[no-any-return]

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        return self._call("delete_many_if_version", len(versions), versions)  # type: ignore[no-any-return]

    def touch_many(self, keys: Iterable[str], at: float) -> None:
        keys = list(keys)
        self._call("touch_many", len(keys), keys, at)

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        return self.inner.iter_keys(pattern)

    def scan(
        self, batch_size: int = 500, *, now: float | None = None, idle_before: float | None = None
    ) -> Iterator[list[Entry]]:
        return self.inner.scan(batch_size, now=now, idle_before=idle_before)

    def clear(self) -> int:
        return self.inner.clear()

    def changed_by_others(self) -> bool:
        return self.inner.changed_by_others()

    def ping(self) -> float:
        return self.inner.ping()

    def close(self) -> None:
        self.inner.close()

    def __repr__(self) -> str:
        return repr(self.inner)
