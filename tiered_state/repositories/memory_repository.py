"""``memory://`` -- an in-process, thread-safe LRU (the embedded HOT tier).

URL: ``memory://?max_items=10000&max_bytes=67108864`` (both optional; no limit
by default). Volatile and private to the process. Payloads are stored as
immutable ``str`` and metadata is copied on the way in and out, so a caller
can never mutate what is stored. Eviction removes the least recently used
entries until both limits hold; a stub is charged for its payload (empty for
a placeholder), not for the size of the value it stands for.

Expiry is native: an entry is gone at ``min(expires_at, hot_until)``. An
expired entry is dropped when it is next touched and is never returned,
listed or counted; it has no stored version either, so the conditional
writes treat it as absent. Storing an entry that has already expired stores
nothing and drops any older copy -- a tombstone (``expires_at`` 0.0)
therefore vanishes at once and never takes an LRU slot from a live entry.

Every method, batches included, is one critical section under one lock, so
the conditional writes are atomic against the other threads of the process
(the only writers there can be). Versions are Python ints: exact at any size.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from .. import codec
from ..config import parse_number, query_options, unknown_options
from ..errors import ConfigurationError, IntegrityError
from ..keys import compile_pattern, is_literal, literal_prefix, validate_key, validate_pattern
from ..record import STUB, TOMBSTONE, Entry, Metadata, checksum, live_value
from .base import Items, StateRepository

__all__ = ["MemoryStateRepository"]

#: What is kept per key: payload, metadata (a private copy), bytes charged
#: against max_bytes, the deadline min(expires_at, hot_until) (inf: none) and
#: whether the entry is a plain ``json`` value (what fetch_payload may return).
#: The last two are worked out once on store so that reads, listings and counts
#: test one float and one bool.
_Item = tuple[str, Metadata, int, float, bool]

_FOREVER = math.inf
#: The URL's query options (see the module docstring).
_OPTIONS = frozenset({"max_items", "max_bytes"})
_NOT_VALUES = frozenset((STUB, TOMBSTONE))


class MemoryStateRepository(StateRepository):
    """Thread-safe LRU of ``key -> (payload, metadata)``.

    :param max_items: evict least recently used entries beyond this count.
    :param max_bytes: evict beyond this many payload + key bytes.
    """

    backend = "memory"
    volatile = True
    shared = False

    def __init__(self, max_items: int | None = None, max_bytes: int | None = None) -> None:
        for name, limit in (("max_items", max_items), ("max_bytes", max_bytes)):
            if limit is not None and (not isinstance(limit, int) or limit < 1):
                raise ConfigurationError(f"{name} must be a positive int or None, not {limit!r}")
        self.max_items = max_items
        self.max_bytes = max_bytes
        # OrderedDict order = LRU order, least recently used first.
        self._data: OrderedDict[str, _Item] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        # Not re-entrant: no method takes it twice, and Lock is the cheaper one.
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStateRepository:
        _, query = query_options(url)
        query.update(options)
        unknown = set(query) - _OPTIONS
        if unknown:
            raise unknown_options("memory", unknown, _OPTIONS)
        limits = {}
        for name in ("max_items", "max_bytes"):
            value = parse_number(query.get(name), name, minimum=1)
            limits[name] = None if value is None else int(value)
        return cls(**limits)

    # -- internals (caller holds the lock)
    def _get_live(self, key: str, now: float) -> _Item | None:
        """The live item of ``key``, marked as just used; drops an expired one."""
        item = self._data.get(key)
        if item is None:
            return None
        if item[3] <= now:
            self._remove(key)
            return None
        self._data.move_to_end(key)
        return item

    def _remove(self, key: str) -> bool:
        item = self._data.pop(key, None)
        if item is None:
            return False
        self._bytes -= item[2]
        return True

    def _put(self, key: str, payload: str, metadata: Metadata, now: float | None = None) -> None:
        # Every store goes through here, so the removal, the deadline and the
        # kind are worked out inline (each helper call would add a tenth).
        old = self._data.pop(key, None)
        if old is not None:
            self._bytes -= old[2]
        hot_until: float | None = metadata.get("hot_until")  # type: ignore[assignment]
        deadline = _FOREVER if hot_until is None else hot_until
        expires_at = metadata["expires_at"]
        if expires_at is not None and expires_at < deadline:
            deadline = expires_at
        if deadline != _FOREVER and deadline <= (time.time() if now is None else now):
            return  # already gone: the write leaves nothing, not even the older copy
        value = metadata["encoding"] not in _NOT_VALUES
        # A value's size_bytes is its payload; a stub's describes the value it
        # stands for, which is not here.
        charge = (metadata["size_bytes"] if value else len(payload)) + len(key)
        self._data[key] = (payload, metadata.copy(), charge, deadline,
                           metadata["encoding"] == codec.ENCODING)
        self._bytes += charge
        if self.max_items is not None or self.max_bytes is not None:
            self._evict()

    def _evict(self) -> None:
        data = self._data
        while data and (
            (self.max_items is not None and len(data) > self.max_items)
            or (self.max_bytes is not None and self._bytes > self.max_bytes)
        ):
            _, item = data.popitem(last=False)
            self._bytes -= item[2]
            self._evictions += 1

    # The conditional writes, one key each; single calls and batches share them.
    # An expired entry counts as absent (it is gone, just not dropped yet),
    # and tombstones never stay, so the stored version is also the live one.
    def _store_if_newer(self, key: str, payload: str, metadata: Metadata, now: float) -> bool:
        item = self._data.get(key)
        if item is not None and item[3] > now and item[1]["version"] >= metadata["version"]:
            return False
        self._put(key, payload, metadata, now)
        return True

    def _store_if_version(
        self, key: str, payload: str, metadata: Metadata, expected: int, now: float
    ) -> bool:
        item = self._data.get(key)
        current = 0 if item is None or item[3] <= now else item[1]["version"]
        if current != expected or current > metadata["version"]:
            return False
        self._put(key, payload, metadata, now)
        return True

    def _delete_if_version(self, key: str, version: int, now: float) -> bool:
        item = self._data.get(key)
        if item is None or item[3] <= now or item[1]["version"] != version:
            return False
        return self._remove(key)

    # -- the contract
    def fetch_record(self, key: str) -> Entry | None:
        validate_key(key)
        # The manager's hottest read: _get_live spelled out (a call costs ~10%).
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[3] <= time.time():
                self._remove(key)
                return None
            self._data.move_to_end(key)
        return Entry(key, item[0], item[1].copy())

    def fetch_payload(self, key: str, encoding: str = codec.ENCODING) -> str | None:
        # What fetch returns before decoding, without an Entry or a metadata
        # copy: only the payload leaves the lock (see "Optional: fetch_payload").
        validate_key(key)
        with self._lock:
            item = self._data.get(key)
            if item is None:
                return None
            if item[3] <= time.time():
                self._remove(key)
                return None
            self._data.move_to_end(key)
        if not (item[4] if encoding == codec.ENCODING else item[1]["encoding"] == encoding):
            # A stub (the value is elsewhere), or a value of a codec the
            # caller did not name, which only a caller that sees its encoding
            # may decode.
            return ""
        payload = item[0]
        if checksum(payload) != item[1]["checksum"]:
            raise IntegrityError(f"memory: checksum mismatch for {key!r}", key)
        return payload

    def fetch(self, key: str) -> Any | None:
        payload = self.fetch_payload(key)
        if payload == "":  # a stub, or a value of another codec: read as the contract says
            return live_value(self.fetch_record(key))
        return codec.decode(payload) if payload else None

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = [validate_key(k) for k in keys]
        now = time.time()
        out: dict[str, Entry] = {}
        with self._lock:
            for key in keys:
                item = self._get_live(key, now)
                if item is not None:
                    out[key] = Entry(key, item[0], item[1].copy())
        return out

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        with self._lock:
            self._put(key, value, metadata)
        return True

    def store_many(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        now = time.time()
        with self._lock:
            for key, (payload, metadata) in items.items():
                self._put(key, payload, metadata, now)
        return set(items)

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        now = time.time()
        with self._lock:
            return self._store_if_newer(key, value, metadata, now)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        validate_key(key)
        now = time.time()
        with self._lock:
            return self._store_if_version(key, value, metadata, expected, now)

    def delete_if_version(self, key: str, version: int) -> bool:
        validate_key(key)
        now = time.time()
        with self._lock:
            return self._delete_if_version(key, version, now)

    def store_many_if_newer(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        now = time.time()
        put = self._store_if_newer
        with self._lock:
            return {key for key, (payload, md) in items.items() if put(key, payload, md, now)}

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        # Every key and its expected version checked before anything is written.
        rows = [(validate_key(key), payload, md, expected[key])
                for key, (payload, md) in items.items()]
        now = time.time()
        put = self._store_if_version
        with self._lock:
            return {row[0] for row in rows if put(*row, now)}

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        for key in versions:
            validate_key(key)
        now = time.time()
        delete = self._delete_if_version
        with self._lock:
            return {key for key, version in versions.items() if delete(key, version, now)}

    def delete(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return self._remove(key)

    def delete_many(self, keys: Iterable[str]) -> int:
        keys = [validate_key(k) for k in keys]
        with self._lock:
            return sum(self._remove(k) for k in keys)

    def keys(self, pattern: str = "*") -> list[str]:
        validate_pattern(pattern)
        now = time.time()
        with self._lock:
            if is_literal(pattern):
                key = literal_prefix(pattern)
                return [key] if self._get_live(key, now) else []
            match = compile_pattern(pattern).match
            return [k for k, item in self._data.items() if item[3] > now and match(k)]

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        return iter(self.keys(pattern))

    def iter_all_keys(self) -> Iterator[str]:
        # A snapshot of every key held, expired ones included: scan's
        # fetch_many then drops those, so a sweep also frees the memory of
        # entries nobody reads again.
        with self._lock:
            return iter(list(self._data))

    def clear(self) -> int:
        with self._lock:
            count = len(self._data)
            self._data.clear()
            self._bytes = 0
            return count

    def stats(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            live = sum(1 for item in self._data.values() if item[3] > now)
            return {
                "backend": self.backend,
                "tier": str(self.tier) if self.tier else None,
                "key_count": live,
                "bytes": self._bytes,
                "max_items": self.max_items,
                "max_bytes": self.max_bytes,
                "evictions": self._evictions,
            }

    def __len__(self) -> int:
        return len(self._data)
