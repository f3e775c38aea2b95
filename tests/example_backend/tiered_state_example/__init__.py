"""``example://`` -- a third-party tiered-state backend: every record in a dict.

URL: ``example://`` (no options). Volatile and private to the repository
object, like ``memory://``: an expired entry -- a tombstone is born expired
-- is dropped when it is next touched, and is never returned, listed or
counted. One re-entrant lock makes every call, batches included, one
critical section, so the conditional writes are atomic.

Its distribution declares it in ``pyproject.toml``::

    [project.entry-points."tiered_state.backends"]
    example = "tiered_state_example:ExampleStateRepository"

The contract it implements is documented in
:mod:`tiered_state.repositories.base`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from tiered_state.config import query_options, unknown_options
from tiered_state.keys import compile_pattern, validate_key, validate_keys, validate_pattern
from tiered_state.record import Entry, Metadata, live_value
from tiered_state.repositories.base import Items, StateRepository

__all__ = ["ExampleStateRepository"]


class ExampleStateRepository(StateRepository):
    """``key -> (payload, metadata)`` in a dict."""

    backend = "example"
    volatile = True
    shared = False

    def __init__(self) -> None:
        self._data: dict[str, tuple[str, Metadata]] = {}
        self._lock = threading.RLock()

    @classmethod
    def from_url(cls, url: str, **options: Any) -> ExampleStateRepository:
        _, query = query_options(url)
        query.update(options)
        if query:
            raise unknown_options("example", query, [])
        return cls()

    # -- internals (the caller holds the lock)
    def _get(self, key: str) -> tuple[str, Metadata] | None:
        """The entry of ``key``; an expired one is dropped first."""
        item = self._data.get(key)
        if item is not None:
            expires_at = item[1]["expires_at"]
            if expires_at is not None and expires_at <= time.time():
                del self._data[key]
                return None
        return item

    def _version(self, key: str) -> int:
        item = self._get(key)
        return 0 if item is None else item[1]["version"]

    def _put(self, key: str, payload: str, metadata: Metadata) -> None:
        expires_at = metadata["expires_at"]
        if expires_at is not None and expires_at <= time.time():
            self._data.pop(key, None)  # born expired: nothing to keep
        else:
            self._data[key] = (payload, metadata.copy())

    # -- reads
    def fetch_record(self, key: str) -> Entry | None:
        validate_key(key)
        with self._lock:
            item = self._get(key)
        return None if item is None else Entry(key, item[0], item[1].copy())

    def fetch(self, key: str) -> Any | None:
        return live_value(self.fetch_record(key))

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        wanted = validate_keys(keys)
        out = {}
        with self._lock:
            for key in wanted:
                item = self._get(key)
                if item is not None:
                    out[key] = Entry(key, item[0], item[1].copy())
        return out

    # -- writes
    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        with self._lock:
            self._put(key, value, metadata)
        return True

    def store_many(self, items: Items) -> set[str]:
        validate_keys(items)
        with self._lock:
            for key, (payload, metadata) in items.items():
                self._put(key, payload, metadata)
        return set(items)

    def delete(self, key: str) -> bool:
        validate_key(key)
        with self._lock:
            return self._get(key) is not None and self._data.pop(key, None) is not None

    def delete_many(self, keys: Iterable[str]) -> int:
        wanted = validate_keys(keys)
        with self._lock:
            return sum(1 for key in dict.fromkeys(wanted)
                       if self._get(key) is not None and self._data.pop(key, None) is not None)

    # -- conditional writes (stored version == live version: expired entries are dropped)
    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        return key in self.store_many_if_newer({key: (value, metadata)})

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        return key in self.store_many_if_version({key: (value, metadata)}, {key: expected})

    def delete_if_version(self, key: str, version: int) -> bool:
        return key in self.delete_many_if_version({key: version})

    def store_many_if_newer(self, items: Items) -> set[str]:
        validate_keys(items)
        done = set()
        with self._lock:
            for key, (payload, metadata) in items.items():
                if self._version(key) < metadata["version"]:
                    self._put(key, payload, metadata)
                    done.add(key)
        return done

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        validate_keys(items)
        done = set()
        with self._lock:
            for key, (payload, metadata) in items.items():
                current = self._version(key)
                if current == expected[key] and current <= metadata["version"]:
                    self._put(key, payload, metadata)
                    done.add(key)
        return done

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        validate_keys(versions)
        done = set()
        with self._lock:
            for key, version in versions.items():
                if self._get(key) is not None and self._version(key) == version:
                    del self._data[key]
                    done.add(key)
        return done

    # -- listing
    def keys(self, pattern: str = "*") -> list[str]:
        regex = compile_pattern(validate_pattern(pattern))
        with self._lock:
            return [key for key in list(self._data)
                    if regex.match(key) and self._get(key) is not None]

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        return iter(self.keys(pattern))

    def stats(self) -> dict[str, Any]:
        return {"backend": self.backend, "tier": self.tier, "key_count": len(self.keys())}
