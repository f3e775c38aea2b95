"""Access tracking: which keys were read, for the sweep's idle test.

Reads are not written back one by one. The tracker collects the keys a
manager served and records them in the catalog with one batched
``touch_many`` per :data:`FLUSH_ITEMS` distinct keys or :data:`FLUSH_SECONDS`
(and before every sweep and at close), so a working set read over and over
costs one write per key per interval.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable

from .errors import BackendError
from .repositories.base import StateRepository, chunked

__all__ = ["FLUSH_ITEMS", "FLUSH_SECONDS", "AccessTracker"]

log = logging.getLogger(__name__)

FLUSH_ITEMS = 50_000
FLUSH_SECONDS = 30.0


class AccessTracker:
    """Pending read times for one catalog.

    :param repo: the catalog repository (its ``touch_many`` keeps them).
    :param enabled: False when nothing ever goes idle (no ``cold_after``).
    """

    def __init__(self, repo: StateRepository, *, enabled: bool) -> None:
        self.repo = repo
        self.enabled = enabled
        self._keys: set[str] = set()
        self._lock = threading.Lock()
        self._last_read = 0.0
        self._flushed = time.time()

    def note(self, key: str) -> None:
        """Remember one read (the hot path: a set add and a clock read)."""
        if not self.enabled:
            return
        self._last_read = now = time.time()
        keys = self._keys
        keys.add(key)  # atomic under the GIL; flush swaps the set
        if len(keys) >= FLUSH_ITEMS or now - self._flushed > FLUSH_SECONDS:
            self.flush()

    def note_many(self, keys: Iterable[str]) -> None:
        if not self.enabled:
            return
        self._last_read = now = time.time()
        self._keys.update(keys)
        if len(self._keys) >= FLUSH_ITEMS or now - self._flushed > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write the pending read times in batched calls.

        The batch is stamped with the time of its latest read, so a key may
        look up to :data:`FLUSH_SECONDS` more recently read than it was --
        never less, so nothing goes COLD early.
        """
        with self._lock:
            keys, self._keys = self._keys, set()
            at = self._last_read
            self._flushed = time.time()
        if not keys:
            return
        try:
            for chunk in chunked(sorted(keys), 1000):
                self.repo.touch_many(chunk, at)
        except BackendError as exc:
            log.warning("could not record read times in the catalog: %s", exc)
