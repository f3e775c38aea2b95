"""Segments: many COLD payloads in one file or object, each readable alone.

One file or object per record makes COLD the dearest tier for small records:
a file allocates a whole disk block for a 500-byte record, S3 bills an
infrequent-access object as at least 128 KiB and charges a request for each.
So the sweep writes each batch it moves to COLD as one *segment* -- as
Haystack, Bitcask and WiscKey pack small values into large files and keep the
index elsewhere. Here the index is the catalog: the stub of each record names
``(segment, offset, length)`` (:class:`Location`), and reading a record is one
ranged read of that span.

Layout of a segment (all integers big-endian)::

    header   b"TSG1" + segment id (16 bytes)
    frames   one per record, at the offsets the stubs name
    footer   per frame: key length (u16), key, version (u64), offset (u64), length (u32)
    trailer  footer offset (u64), footer length (u32), frame count (u32),
             CRC-32 of the footer (u32), b"TSGEND1\\n"

A frame holds one payload and the metadata a read needs::

    b"TF", flags (u8: 1 = zlib body), version (u64), size_bytes (u64),
    created_at (f64), updated_at (f64), segment id (16 bytes),
    lengths of the checksum (u8), key (u16), encoding (u8) and body (u32),
    checksum, key, encoding, body, CRC-32 of all the above (u32)

A read checks the frame's CRC, that it belongs to the segment and the key
the stub named, and (in the catalog) that its version and payload checksum
are the stub's: a stray, stale or damaged span is never served. The footer
lets the sweep find a segment's records without reading their payloads.

Segments are written once and never changed; a record overwritten or
deleted leaves dead bytes in its segment until the sweep compacts it
(:mod:`tiered_state.sweep`).
"""

from __future__ import annotations

import re
import secrets
import struct
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from . import codec
from .errors import IntegrityError
from .record import Entry, Metadata, body_text

__all__ = [
    "Footer",
    "Location",
    "SegmentStore",
    "build",
    "created_at",
    "is_segment_name",
    "new_name",
    "read_frame",
    "read_footer",
    "TRAILER_BYTES",
]

_HEADER_MAGIC = b"TSG1"
_FRAME_MAGIC = b"TF"
_TRAILER_MAGIC = b"TSGEND1\n"
_FRAME = struct.Struct(">2sBQQdd16sBHBI")
_TRAILER = struct.Struct(">QIII8s")
_INDEX = struct.Struct(">QQI")
_CRC = struct.Struct(">I")
_ZLIB = 1
#: Bytes at the end of every segment that locate its footer.
TRAILER_BYTES = _TRAILER.size
#: Smallest payload worth compressing inside a frame.
_COMPRESS_MIN = 128
_NAME = re.compile(r"seg-([0-9a-f]{16})-([0-9a-f]{16})\Z")


def new_name(now: float | None = None) -> str:
    """A fresh segment name: its creation time (microseconds) and 64 random bits."""
    micros = int((time.time() if now is None else now) * 1e6)
    return f"seg-{micros:016x}-{secrets.token_hex(8)}"


def is_segment_name(name: object) -> bool:
    """True for a name :func:`new_name` could have made (nothing else is ever opened)."""
    return isinstance(name, str) and _NAME.match(name) is not None


def created_at(name: str) -> float:
    """When the segment ``name`` was made, from its name."""
    found = _NAME.match(name)
    if found is None:
        raise ValueError(f"not a segment name: {name!r}")
    return int(found.group(1), 16) / 1e6


def _segment_id(name: str) -> bytes:
    found = _NAME.match(name)
    if found is None:
        raise ValueError(f"not a segment name: {name!r}")
    return bytes.fromhex(found.group(1) + found.group(2))


@dataclass(frozen=True, slots=True)
class Location:
    """Where a payload is: ``length`` bytes at ``offset`` of segment ``segment``."""

    segment: str
    offset: int
    length: int

    def as_dict(self) -> dict[str, Any]:
        return {"segment": self.segment, "offset": self.offset, "length": self.length}

    @classmethod
    def parse(cls, data: object) -> Location | None:
        """The location a stub's locator holds, or None if it holds none."""
        if not isinstance(data, dict):
            return None
        segment, offset, length = data.get("segment"), data.get("offset"), data.get("length")
        if (is_segment_name(segment) and type(offset) is int and type(length) is int
                and offset >= 0 and length > 0):
            assert isinstance(segment, str)
            return cls(segment, offset, length)
        return None


@dataclass(frozen=True, slots=True)
class Footer:
    """A segment's index: ``key -> (version, offset, length)`` of every frame."""

    frames: dict[str, tuple[int, int, int]]
    frame_bytes: int

    def location(self, segment: str, key: str) -> Location:
        _, offset, length = self.frames[key]
        return Location(segment, offset, length)


class SegmentStore(Protocol):
    """What a COLD backend offers to hold segments (files, S3 objects).

    Names are always :func:`is_segment_name` names, checked by the caller
    before they reach a store. A segment is written whole and atomically
    (a reader never sees part of one) and never rewritten.
    """

    def put(self, name: str, data: bytes) -> None:
        """Store segment ``name`` (a new name) durably."""

    def read(self, name: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset``, fewer if the segment is shorter;
        None if there is no such segment."""

    def read_many(self, spans: list[tuple[str, int, int]]) -> list[bytes | None]:
        """:meth:`read` of several spans (in parallel where the store allows)."""

    def read_tail(self, name: str, length: int) -> bytes | None:
        """The last ``length`` bytes of the segment; None if there is no such segment."""

    def delete(self, name: str) -> None:
        """Delete the segment (absent is fine)."""

    def list(self) -> Iterator[tuple[str, int]]:
        """``(name, size in bytes)`` of every segment, streamed."""


def build(name: str, items: Mapping[str, tuple[str, Metadata]]) -> tuple[bytes, dict[str, Location]]:
    """The bytes of segment ``name`` holding ``items`` (key -> (payload, metadata)),
    and where each payload lies in it.

    A payload of at least :data:`_COMPRESS_MIN` bytes is zlib-compressed when
    that makes it smaller.
    """
    seg_id = _segment_id(name)
    parts = [_HEADER_MAGIC, seg_id]
    offset = len(_HEADER_MAGIC) + len(seg_id)
    index = []
    locations: dict[str, Location] = {}
    for key, (payload, md) in items.items():
        frame = _frame(seg_id, key, payload, md)
        parts.append(frame)
        locations[key] = Location(name, offset, len(frame))
        kb = key.encode("utf-8")
        index.append(struct.pack(">H", len(kb)) + kb + _INDEX.pack(md["version"], offset, len(frame)))
        offset += len(frame)
    footer = b"".join(index)
    parts.append(footer)
    parts.append(_TRAILER.pack(offset, len(footer), len(index), zlib.crc32(footer), _TRAILER_MAGIC))
    return b"".join(parts), locations


def _frame(seg_id: bytes, key: str, payload: str, md: Metadata) -> bytes:
    body = payload.encode("utf-8")
    flags = 0
    if len(body) >= _COMPRESS_MIN:
        packed = codec.compress(payload, 6)
        if len(packed) < len(body):
            body, flags = packed, _ZLIB
    checksum = md["checksum"].encode("ascii")
    kb = key.encode("utf-8")
    enc = md["encoding"].encode("ascii")
    head = _FRAME.pack(_FRAME_MAGIC, flags, md["version"], md["size_bytes"], md["created_at"],
                       md["updated_at"], seg_id, len(checksum), len(kb), len(enc), len(body))
    data = b"".join((head, checksum, kb, enc, body))
    return data + _CRC.pack(zlib.crc32(data))


def read_frame(data: bytes, where: Location, key: str) -> Entry:
    """The payload entry in ``data``, the span of segment ``where`` a stub of
    ``key`` named: its metadata is the payload's (no expiry: the catalog decides).

    :raises IntegrityError: the span is short, damaged, of another segment or
        of another key.
    """
    if len(data) != where.length or len(data) < _FRAME.size + _CRC.size:
        raise IntegrityError(f"segment {where.segment}: short read for {key!r}", key)
    (crc,) = _CRC.unpack_from(data, len(data) - _CRC.size)
    if zlib.crc32(memoryview(data)[:-_CRC.size]) != crc:
        raise IntegrityError(f"segment {where.segment}: damaged frame for {key!r}", key)
    (magic, flags, version, size, created, updated, seg_id,
     n_sum, n_key, n_enc, n_body) = _FRAME.unpack_from(data)
    pos = _FRAME.size
    if (magic != _FRAME_MAGIC or seg_id != _segment_id(where.segment)
            or pos + n_sum + n_key + n_enc + n_body + _CRC.size != len(data)):
        raise IntegrityError(f"segment {where.segment}: the span named for {key!r} is no frame of it",
                             key)
    try:
        checksum = data[pos:pos + n_sum].decode("ascii")
        pos += n_sum
        found = data[pos:pos + n_key].decode("utf-8")
        pos += n_key
        encoding = data[pos:pos + n_enc].decode("ascii")
        pos += n_enc
    except UnicodeDecodeError as exc:
        raise IntegrityError(f"segment {where.segment}: damaged frame for {key!r}", key) from exc
    if found != key:
        raise IntegrityError(f"segment {where.segment}: the span named for {key!r} holds {found!r}", key)
    payload = body_text(data[pos:pos + n_body], bool(flags & _ZLIB), size, key)
    metadata: Metadata = {
        "checksum": checksum,
        "size_bytes": size,
        "version": version,
        "created_at": created,
        "updated_at": updated,
        "expires_at": None,
        "encoding": encoding,
    }
    return Entry(key, payload, metadata)


def footer_span(tail: bytes, name: str, size: int) -> tuple[int, int]:
    """``(offset, length)`` of the footer, from the segment's last :data:`TRAILER_BYTES`.

    :raises IntegrityError: not the trailer of a segment of ``size`` bytes.
    """
    if len(tail) != _TRAILER.size:
        raise IntegrityError(f"segment {name}: no trailer")
    offset, length, _, _, magic = _TRAILER.unpack(tail)
    if magic != _TRAILER_MAGIC or offset + length + _TRAILER.size != size:
        raise IntegrityError(f"segment {name}: damaged trailer")
    return offset, length


def read_footer(data: bytes, tail: bytes, name: str) -> Footer:
    """The index of segment ``name`` from its footer bytes and trailer.

    :raises IntegrityError: the footer is damaged.
    """
    _, length, count, crc, _ = _TRAILER.unpack(tail)
    if len(data) != length or zlib.crc32(data) != crc:
        raise IntegrityError(f"segment {name}: damaged footer")
    frames: dict[str, tuple[int, int, int]] = {}
    pos = 0
    total = 0
    try:
        for _ in range(count):
            (n,) = struct.unpack_from(">H", data, pos)
            key = data[pos + 2:pos + 2 + n].decode("utf-8")
            version, offset, size = _INDEX.unpack_from(data, pos + 2 + n)
            pos += 2 + n + _INDEX.size
            frames[key] = (version, offset, size)
            total += size
    except (struct.error, UnicodeDecodeError) as exc:
        raise IntegrityError(f"segment {name}: damaged footer") from exc
    if pos != len(data):
        raise IntegrityError(f"segment {name}: damaged footer")
    return Footer(frames, total)
