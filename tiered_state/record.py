"""Records, their metadata, checksums and the version clock.

A repository stores a *payload* (the encoded value, see :mod:`.codec`) with a
*metadata* dict. The metadata every backend persists with each record:

==============  =========================================================
``checksum``    hex SHA-256 of the payload's UTF-8 bytes
``size_bytes``  length of the payload's UTF-8 bytes
``version``     integer, increases on every write of the key
``created_at``  epoch seconds (float) of the key's first write
``updated_at``  epoch seconds (float) of this version's write
``expires_at``  epoch seconds (float) after which the record is gone, or None
``encoding``    ``json`` (``json+zlib`` where a backend compressed it)
==============  =========================================================

A copy the manager puts in a *volatile* tier (memory, redis) may carry one
more key, ``hot_until`` (epoch seconds): the policy's ``hot_ttl`` for that
copy. A volatile backend drops the copy at ``min(expires_at, hot_until)`` but
reports ``expires_at`` unchanged, because that is the record's lifetime.
Durable backends never receive it.

Entries
    What a repository stores under a key is an :class:`Entry` of one of three
    kinds, told apart by ``encoding``:

    * a **value**: the payload is the encoded value (``json``);
    * a **stub** (``stub``): the metadata of a value whose payload lives
      elsewhere. In the catalog the payload is a *locator* (where the bytes
      are); in HOT the payload is empty and means "ask the catalog" (a
      placeholder a writer leaves while it commits);
    * a **tombstone** (``tombstone``): a deleted key's last version. Its
      payload is empty and its ``expires_at`` is 0.0, so every backend already
      treats it as expired -- absent to reads, listings and counts -- while
      its version still orders later writes after the delete.

    ``checksum`` and ``size_bytes`` of a stub describe the value it stands
    for, not the locator.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypedDict

from . import codec
from .errors import IntegrityError, SerializationError

__all__ = [
    "STUB",
    "TOMBSTONE",
    "Entry",
    "Metadata",
    "Record",
    "Tier",
    "VersionClock",
    "checksum",
    "is_value",
    "live_value",
    "make_metadata",
    "make_stub",
    "make_tombstone",
]

#: ``metadata["encoding"]`` of the two kinds of entry that are not values.
STUB = "stub"
TOMBSTONE = "tombstone"
#: The payload checksum of an empty payload (placeholders and tombstones).
_EMPTY_CHECKSUM = hashlib.sha256(b"").hexdigest()


class Tier(str, Enum):
    """The three storage tiers, hottest first. A ``str``, so ``"hot"`` works too."""

    HOT = "hot"
    WARM = "warm"
    COLD = "cold"

    def __str__(self) -> str:
        return self.value

    @classmethod
    def parse(cls, tier: Tier | str) -> Tier:
        """Accept a :class:`Tier` or its name in any case."""
        if isinstance(tier, Tier):
            return tier
        found = _TIER_NAMES.get(tier) if isinstance(tier, str) else None
        if found is not None:
            return found
        try:
            return cls(str(tier).lower())
        except ValueError:
            from .errors import ConfigurationError

            raise ConfigurationError(
                f"unknown tier {tier!r}: use 'hot', 'warm' or 'cold'"
            ) from None


# Enum lookup by value costs a microsecond; writes name their tier every call.
_TIER_NAMES = {t.value: t for t in Tier}


class Metadata(TypedDict):
    """What a repository persists with each payload (see the module docstring)."""

    checksum: str
    size_bytes: int
    version: int
    created_at: float
    updated_at: float
    expires_at: float | None
    encoding: str


def checksum(payload: str) -> str:
    """Hex SHA-256 of the payload's UTF-8 bytes."""
    return hashlib.sha256(payload.encode("utf-8")).hexdigest()


def make_metadata(
    payload: str,
    version: int,
    *,
    now: float,
    created_at: float | None = None,
    ttl: float | None = None,
    encoding: str = "json",
) -> Metadata:
    """Build the metadata of a new version of a record.

    :raises SerializationError: the payload is not encodable as UTF-8 (a lone
        surrogate in a string value).
    """
    try:
        data = payload.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise SerializationError(f"value contains text that is not valid UTF-8: {exc}") from exc
    return {
        "checksum": hashlib.sha256(data).hexdigest(),
        "size_bytes": len(data),
        "version": version,
        "created_at": now if created_at is None else created_at,
        "updated_at": now,
        "expires_at": None if ttl is None else now + ttl,
        "encoding": encoding,
    }


def make_stub(metadata: Metadata, locator: str = "") -> tuple[str, Metadata]:
    """A stub standing for the value ``metadata`` describes: ``(locator, metadata)``.

    Same version, checksum, size and timestamps as the value; only
    ``encoding`` says that the payload is a locator (empty: a HOT placeholder).
    """
    stub = metadata.copy()
    stub["encoding"] = STUB
    return locator, stub


def make_tombstone(version: int, *, now: float, created_at: float | None = None) -> Metadata:
    """The metadata of a tombstone: a delete at ``version``, made at ``now``."""
    return {
        "checksum": _EMPTY_CHECKSUM,
        "size_bytes": 0,
        "version": version,
        "created_at": now if created_at is None else created_at,
        "updated_at": now,
        # Expired at any clock's "now": no host, however skewed, sees it live.
        "expires_at": 0.0,
        "encoding": TOMBSTONE,
    }


def is_value(metadata: Metadata) -> bool:
    """True if the entry with ``metadata`` holds its value (not a stub or tombstone)."""
    encoding = metadata["encoding"]
    return encoding != STUB and encoding != TOMBSTONE


def live_value(entry: Entry | None, now: float | None = None) -> Any | None:
    """The decoded value of ``entry`` if it is a live value, else None.

    What every repository's ``fetch`` returns.

    :raises IntegrityError: the payload fails its checksum.
    """
    if entry is None or not is_value(entry.metadata) or entry.expired(now):
        return None
    if not entry.valid():
        raise IntegrityError(f"checksum mismatch for {entry.key!r}", entry.key)
    return codec.decode(entry.payload)


@dataclass(slots=True)
class Entry:
    """A stored record as a repository returns it: the payload and its metadata.

    Treat it as read-only. It is not a frozen dataclass because batch reads
    build one per record and a frozen ``__init__`` costs three times as much.
    """

    key: str
    payload: str
    metadata: Metadata

    @property
    def version(self) -> int:
        return self.metadata["version"]

    @property
    def expires_at(self) -> float | None:
        return self.metadata["expires_at"]

    @property
    def kind(self) -> str:
        """``"value"``, ``"stub"`` or ``"tombstone"`` (see "Entries" above)."""
        encoding = self.metadata["encoding"]
        return encoding if encoding == STUB or encoding == TOMBSTONE else "value"

    def expired(self, now: float | None = None) -> bool:
        """True if the record's lifetime has run out (always, for a tombstone)."""
        expires_at = self.metadata["expires_at"]
        return expires_at is not None and expires_at <= (time.time() if now is None else now)

    def live(self, now: float | None = None) -> bool:
        """True for an unexpired value or stub: the key exists."""
        return self.metadata["encoding"] != TOMBSTONE and not self.expired(now)

    def valid(self) -> bool:
        """True if a value's payload matches its checksum (stubs and tombstones
        carry no payload of their own to check)."""
        if not is_value(self.metadata):
            return True
        return checksum(self.payload) == self.metadata["checksum"]


@dataclass(frozen=True, slots=True)
class Record:
    """A value with its metadata and the tier it was read from."""

    key: str
    value: Any
    version: int
    checksum: str
    size_bytes: int
    created_at: float
    updated_at: float
    expires_at: float | None
    tier: Tier


class VersionClock:
    """A hybrid logical clock: each version is ``microseconds << 10 | node``.

    Each call returns a number greater than every number this clock returned
    or observed before, so a key rewritten, or re-created after a delete, gets
    a greater version even if the wall clock steps back. The low 10 bits are a
    random per-clock node id, so two processes writing the same key in the
    same microsecond still produce different versions (a tie could let an old
    copy pass for the new one). Versions fit a signed 64-bit column until the
    year 2255. Across machines with skewed clocks the manager observes the
    stored version and moves past it, so every write still increases it.
    """

    NODE_BITS = 10

    def __init__(self, node: int | None = None) -> None:
        mask = (1 << self.NODE_BITS) - 1
        self.node = (secrets.randbits(self.NODE_BITS) if node is None else node) & mask
        self._last = 0
        self._lock = threading.Lock()

    def next(self, after: int = 0) -> int:
        """A new version greater than ``after`` and than every earlier one."""
        bits = self.NODE_BITS
        with self._lock:
            tick = max(time.time_ns() // 1000, (self._last >> bits) + 1, (after >> bits) + 1)
            version = (tick << bits) | self.node
            self._last = version
            return version

    def next_many(self, count: int, after: int = 0) -> list[int]:
        """``count`` new versions, increasing, each as :meth:`next` would give
        them one after the other -- under one lock (a batch's versions)."""
        bits = self.NODE_BITS
        with self._lock:
            tick = max(time.time_ns() // 1000, (self._last >> bits) + 1, (after >> bits) + 1)
            node = self.node
            versions = [((tick + i) << bits) | node for i in range(count)]
            if versions:
                self._last = versions[-1]
            return versions

    def observe(self, version: int) -> None:
        """Note a version seen elsewhere, so later versions exceed it."""
        if version > self._last:
            with self._lock:
                self._last = max(self._last, version)
