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
``encoding``    the name of the codec that wrote the payload: ``json``,
                ``typed-json`` or a custom codec's (see :mod:`.codec`)
==============  =========================================================

A backend that compresses a payload says so in how it packs the body
(``json+zlib``), never in the ``encoding`` it returns: entries leave a
repository inflated, with the codec's name as written.

The payload checksum covers the payload only. A backend that keeps the
metadata apart from the payload (a cold file's header line, an S3 object's
headers) stores a checksum of the metadata too (:func:`metadata_checksum`)
and checks what it reads back with :func:`stored_metadata`, so damaged
metadata is an ``IntegrityError``, never a wrong version or expiry; a
compressed body is inflated with :func:`inflate`, bounded by ``size_bytes``.

A copy the manager puts in a *volatile* tier (memory, redis) may carry one
more key, ``hot_until`` (epoch seconds): the policy's ``hot_ttl`` for that
copy. A volatile backend drops the copy at ``min(expires_at, hot_until)`` but
reports ``expires_at`` unchanged, because that is the record's lifetime.
Durable backends never receive it.

Entries
    What a repository stores under a key is an :class:`Entry` of one of three
    kinds, told apart by ``encoding``:

    * a **value**: the payload is the encoded value (``encoding``: the
      name of its codec, ``json`` by default);
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
import json
import secrets
import threading
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, TypedDict

from .codec import Codec, decode_entry, decode_stored
from .errors import IntegrityError, SerializationError

__all__ = [
    "STUB",
    "TOMBSTONE",
    "Entry",
    "Metadata",
    "Record",
    "Tier",
    "VersionClock",
    "body_text",
    "checksum",
    "inflate",
    "is_value",
    "live_value",
    "make_metadata",
    "make_stub",
    "make_tombstone",
    "metadata_checksum",
    "stored_metadata",
]

#: ``metadata["encoding"]`` of the two kinds of entry that are not values.
STUB = "stub"
TOMBSTONE = "tombstone"
#: The payload checksum of an empty payload (placeholders and tombstones).
_EMPTY_CHECKSUM = hashlib.sha256(b"").hexdigest()


class Tier(str, Enum):
    """The three storage tiers, hottest first. A ``str``, so ``"hot"`` works too.

    >>> Tier.HOT == "hot", str(Tier.WARM)
    (True, 'warm')
    >>> Tier.parse("COLD")
    <Tier.COLD: 'cold'>
    """

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


def checksum(payload: str) -> str | None:
    """Hex SHA-256 of the payload's UTF-8 bytes.

    None for a payload that is not text at all -- bytes, or a string with a
    lone surrogate, which only a store edited behind the library's back can
    hold -- so that it matches no stored checksum and reads as corrupt.
    """
    try:
        return hashlib.sha256(payload.encode("utf-8")).hexdigest()
    except (AttributeError, UnicodeEncodeError):
        return None


def metadata_checksum(key: str, metadata: Metadata, packing: str) -> str:
    """Hex SHA-256 of ``key``, every field of ``metadata`` and ``packing``.

    For backends that keep the metadata apart from the payload (a file's
    header line, an S3 object's ``x-amz-meta-*`` headers): the payload
    checksum covers the payload only, so without this a damaged version,
    expiry or encoding would be served as if it were true. ``packing`` is how
    the body is stored (``json``, ``json+zlib``). Numbers are hashed in one
    canonical form, so metadata that went through text (S3 headers) and
    metadata that did not (JSON) give the same digest.

    :raises TypeError, ValueError: a field of the wrong type (see
        :func:`stored_metadata`, which checks them first).
    """
    expires_at = metadata["expires_at"]
    fields = [
        key,
        metadata["checksum"],
        int(metadata["size_bytes"]),
        int(metadata["version"]),
        float(metadata["created_at"]),
        float(metadata["updated_at"]),
        None if expires_at is None else float(expires_at),
        metadata["encoding"],
        packing,
    ]
    return hashlib.sha256(_CANONICAL.encode(fields).encode("utf-8")).hexdigest()


# Built once: json.dumps with options builds an encoder on every call.
_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def stored_metadata(key: str, fields: Mapping[str, Any], digest: str | None, packing: str
                    ) -> Metadata:
    """The metadata a backend read back for ``key``, checked.

    Every field must have its type (``bool`` is not an int here) and, when
    the record carries a metadata checksum (``digest``; records written
    before it existed have none), match it. This is the one test a backend
    that stores metadata apart from its payload applies before trusting it.

    :raises IntegrityError: a field is missing or of the wrong type, or the
        metadata fails its checksum. The message names no stored value.
    """
    try:
        metadata: Metadata = {
            "checksum": fields["checksum"],
            "size_bytes": fields["size_bytes"],
            "version": fields["version"],
            "created_at": fields["created_at"],
            "updated_at": fields["updated_at"],
            "expires_at": fields["expires_at"],
            "encoding": fields["encoding"],
        }
    except KeyError as exc:
        raise IntegrityError(f"unreadable metadata for {key!r}", key) from exc
    # Exact types (the ones JSON and int()/float() give): bool is no int.
    size, version, expires_at = metadata["size_bytes"], metadata["version"], metadata["expires_at"]
    if not (type(metadata["checksum"]) is str and type(metadata["encoding"]) is str
            and type(size) is int and size >= 0 and type(version) is int and version >= 0
            and type(metadata["created_at"]) in _NUMBERS
            and type(metadata["updated_at"]) in _NUMBERS
            and (expires_at is None or type(expires_at) in _NUMBERS)):
        raise IntegrityError(f"unreadable metadata for {key!r}", key)
    if digest is not None and digest != metadata_checksum(key, metadata, packing):
        raise IntegrityError(f"metadata checksum mismatch for {key!r}", key)
    return metadata


_NUMBERS = (float, int)


#: Bytes an inflated body may exceed its recorded ``size_bytes`` by before it
#: is refused. A value inflates to exactly its size; a stub's locator (whose
#: ``size_bytes`` is its value's) is at most a couple of KiB.
INFLATE_MARGIN = 64 * 1024


def inflate(body: bytes, size_bytes: int, key: str) -> str:
    """A zlib-packed body's text, never inflating more than ``size_bytes``
    plus :data:`INFLATE_MARGIN` bytes: a small body that claims to hold a
    huge payload (a decompression bomb, or damage) cannot exhaust memory.

    :raises IntegrityError: the body is not a complete zlib stream of UTF-8
        text within that bound.
    """
    limit = max(size_bytes, 0) + INFLATE_MARGIN
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(body, limit + 1)
        complete = inflater.eof and not inflater.unused_data
    except zlib.error as exc:
        raise IntegrityError(f"corrupt compressed payload for {key!r}", key) from exc
    if len(data) > limit:
        raise IntegrityError(f"compressed payload for {key!r} inflates past its recorded size", key)
    if not complete:
        raise IntegrityError(f"truncated or overlong compressed payload for {key!r}", key)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"corrupt compressed payload for {key!r}", key) from exc


def body_text(body: bytes, compressed: bool, size_bytes: int, key: str) -> str:
    """A stored payload's text: ``body`` inflated (within :func:`inflate`'s
    bound) if ``compressed``, else decoded.

    :raises IntegrityError: not UTF-8 text, or not a zlib stream of it.
    """
    if compressed:
        return inflate(body, size_bytes, key)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"the stored payload of {key!r} is not UTF-8 text", key) from exc


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


def live_value(entry: Entry | None, now: float | None = None, codec: Codec | None = None
               ) -> Any | None:
    """The decoded value of ``entry`` if it is a live value, else None.

    What every repository's ``fetch`` returns. The payload is decoded with
    the codec its ``encoding`` names (:func:`tiered_state.codec.decode_entry`
    with ``codec``; without one, a repository's view: the built-in codec of
    that name, see :func:`tiered_state.codec.decode_stored`).

    :raises IntegrityError: the payload fails its checksum.
    :raises SerializationError: the record's codec is not one this reader has.
    """
    if entry is None or not is_value(entry.metadata) or entry.expired(now):
        return None
    if not entry.valid():
        raise IntegrityError(f"checksum mismatch for {entry.key!r}", entry.key)
    encoding = entry.metadata["encoding"]
    if codec is None:
        return decode_stored(entry.payload, encoding)
    return decode_entry(entry.payload, encoding, codec)


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
    """A value with its metadata and the tier it was read from
    (:meth:`StateManager.get_record <tiered_state.StateManager.get_record>`,
    :meth:`~tiered_state.StateManager.iter_records`).

    :ivar key: the key.
    :ivar value: the decoded value.
    :ivar version: increases on every write of the key (a hybrid logical
        clock: later writes, even from other processes, get greater ones).
    :ivar checksum: hex SHA-256 of the stored payload, checked on every read.
    :ivar size_bytes: the payload's size in UTF-8 bytes.
    :ivar created_at: epoch seconds of the key's first write.
    :ivar updated_at: epoch seconds of this version's write.
    :ivar expires_at: epoch seconds at which the record is gone from every
        tier, or None for never.
    :ivar tier: the :class:`Tier` the value was read from.
    """

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
