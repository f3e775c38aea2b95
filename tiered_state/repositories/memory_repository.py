"""``memory://`` -- an in-process, thread-safe LRU (the embedded HOT tier).

URL: ``memory://?max_items=10000&max_bytes=67108864`` (both optional; no limit
by default). Volatile and private to the process. Payloads are stored as
immutable ``str`` and metadata is copied on the way in and out, so a caller
can never mutate what is stored. Expired records are dropped when read or when
the LRU needs room; eviction removes the least recently used records until both
limits hold.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from typing import Any

from .. import codec
from ..config import parse_number, query_options
from ..errors import ConfigurationError, IntegrityError
from ..keys import compile_pattern, is_literal, literal_prefix, validate_key, validate_pattern
from ..record import Entry, Metadata, checksum
from .base import Items, StateRepository

__all__ = ["MemoryStateRepository"]


class MemoryStateRepository(StateRepository):
    """Thread-safe LRU of ``key -> (payload, metadata)``.

    :param max_items: evict least recently used records beyond this count.
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
        # key -> (payload, metadata, bytes charged); OrderedDict order = LRU order
        self._data: OrderedDict[str, tuple[str, Metadata, int]] = OrderedDict()
        self._bytes = 0
        self._evictions = 0
        self._lock = threading.RLock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> MemoryStateRepository:
        _, query = query_options(url)
        query.update(options)
        unknown = set(query) - {"max_items", "max_bytes"}
        if unknown:
            raise ConfigurationError(f"memory:// does not take {sorted(unknown)}")
        limits = {}
        for name in ("max_items", "max_bytes"):
            value = parse_number(query.get(name), name, minimum=1)
            limits[name] = None if value is None else int(value)
        return cls(**limits)

    # -- internals (caller holds the lock)
    def _get_live(self, key: str, now: float) -> tuple[str, Metadata, int] | None:
        item = self._data.get(key)
        if item is None:
            return None
        metadata = item[1]
        expires_at = metadata["expires_at"]
        if (expires_at is not None and expires_at <= now) or (
            "hot_until" in metadata and metadata["hot_until"] <= now  # type: ignore[typeddict-item]
        ):
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

    def _put(self, key: str, payload: str, metadata: Metadata) -> None:
        charge = metadata["size_bytes"] + len(key)
        self._remove(key)
        self._data[key] = (payload, metadata.copy(), charge)
        self._bytes += charge
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

    # -- the contract
    def fetch_record(self, key: str) -> Entry | None:
        validate_key(key)
        with self._lock:
            item = self._get_live(key, time.time())
        if item is None:
            return None
        return Entry(key, item[0], dict(item[1]))  # type: ignore[arg-type]

    def fetch_payload(self, key: str) -> str | None:
        validate_key(key)
        with self._lock:
            item = self._get_live(key, time.time())
        if item is None:
            return None
        # No Entry and no metadata copy: only the payload leaves the lock.
        payload = item[0]
        if checksum(payload) != item[1]["checksum"]:
            raise IntegrityError(f"memory: checksum mismatch for {key!r}", key)
        return payload

    def fetch(self, key: str) -> Any | None:
        payload = self.fetch_payload(key)
        return None if payload is None else codec.decode(payload)

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = [validate_key(k) for k in keys]
        now = time.time()
        out: dict[str, Entry] = {}
        with self._lock:
            for key in keys:
                item = self._get_live(key, now)
                if item is not None:
                    out[key] = Entry(key, item[0], dict(item[1]))  # type: ignore[arg-type]
        return out

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        with self._lock:
            self._put(key, value, metadata)
        return True

    def store_many(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        with self._lock:
            for key, (payload, metadata) in items.items():
                self._put(key, payload, metadata)
        return set(items)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        validate_key(key)
        with self._lock:
            item = self._get_live(key, time.time())
            if (0 if item is None else item[1]["version"]) != expected:
                return False
            self._put(key, value, metadata)
            return True

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        with self._lock:
            item = self._data.get(key)
            if item is not None and item[1]["version"] >= metadata["version"]:
                return False
            self._put(key, value, metadata)
            return True

    def delete(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return self._remove(key)

    def delete_if_version(self, key: str, version: int) -> bool:
        validate_key(key)
        with self._lock:
            item = self._data.get(key)
            if item is None or item[1]["version"] != version:
                return False
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
            return [k for k, (_, md, _) in self._data.items() if _live(md, now) and match(k)]

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        return iter(self.keys(pattern))

    def clear(self) -> int:
        with self._lock:
            count = len(self._data)
            self._data.clear()
            self._bytes = 0
            return count

    def stats(self) -> dict[str, Any]:
        now = time.time()
        with self._lock:
            live = sum(1 for _, md, _ in self._data.values() if _live(md, now))
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


def _live(metadata: Metadata, now: float) -> bool:
    expires_at = metadata["expires_at"]
    hot_until: float | None = metadata.get("hot_until")  # type: ignore[assignment]
    return (expires_at is None or expires_at > now) and (hot_until is None or hot_until > now)
