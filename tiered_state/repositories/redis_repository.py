"""``redis://`` -- Redis as the HOT tier (redis-py, ``pip install 'tiered-state[redis]'``).

URL: redis-py's own forms, plus this backend's query options::

    redis://[[user]:password@]host[:port][/db][?prefix=app:&default_ttl=3600]
    rediss://...                       (TLS; redis-py's ssl_* query options)
    unix:///path/to/redis.sock[?db=0&prefix=app:]
    redis+cluster://[[user]:password@]host:port[,host:port...][/0][?prefix=app:]
    redis+sentinel://[[user]:password@]host:port[,host:port...]/service[/db][?prefix=app:]

``redis+cluster://`` lists startup nodes of a Redis Cluster (any of its
nodes; the client learns the rest and follows ``MOVED``/``ASK`` during
resharding). ``redis+sentinel://`` lists Sentinels and names the monitored
service: the client asks them for the current primary, and again after a
failover. Both take the same options as ``redis://`` where they apply; the
password is the data servers' (``sentinel_password=`` is the Sentinels').

``prefix`` (default ``tiered_state:``) namespaces every key; ``default_ttl``
(seconds, default none) is how long a record *without* its own ``expires_at``
stays in Redis. Every other query option goes to redis-py unchanged
(``socket_timeout``, ``socket_connect_timeout``, ``max_connections``,
``health_check_interval``, ``ssl_cert_reqs``...). Timeouts default short
(0.5 s connect, 1 s socket) so a dead Redis costs a caller about a second,
not minutes; a lost connection (server restart) is retried once at once on a
fresh connection, so the next call after a restart just works.

Storage format 2 (what ``redis-cli`` shows). One string key per record,
``<prefix><key>``, holding a fixed 85-byte header and then the payload (the
JSON text of the value, byte for byte), so ``redis-cli GET`` shows the JSON
after the header and ``redis-cli --raw GETRANGE <prefix><key> 85 -1`` shows
the JSON alone. Big-endian throughout:

======  ====  =======  =====================================================
offset  size  type     field
======  ====  =======  =====================================================
0       3     bytes    magic and format: ``ts`` and the byte 0x02
3       1     u8       flags: 0x01 ``expires_at`` is set, 0x02 ``hot_until``
                       is set, 0x04 the checksum is not a SHA-256 hex digest
                       (it reads back as ``""``); other bits 0
4       1     u8       encoding: 1 ``json``, 2 ``typed-json``, 3 ``stub``,
                       4 ``tombstone``, 5 ``json+zlib``; 0: the name follows
                       the header (one length byte, then its UTF-8 bytes)
5       8     u64      version
13      32    bytes    checksum: the SHA-256 digest itself (zeros with 0x04)
45      8     u64      size_bytes
53      8     f64      created_at
61      8     f64      updated_at
69      8     f64      expires_at (0.0 when the flag is clear)
77      8     f64      hot_until (0.0 when the flag is clear)
85      rest  bytes    the payload, UTF-8 (after the name for encoding 0)
======  ====  =======  =====================================================

A stub's payload is its locator: empty for the placeholders the manager
leaves while it writes a key, so a placeholder is exactly 85 bytes. A value
that does not start with the magic and format byte (another tool wrote it,
or an earlier layout) reads as a corrupt record -- version 0, checksum ``""``
-- which the manager counts and replaces; a key of another type is not a
string to ``MGET`` and reads as absent. Either way the next conditional write
replaces it. The header has no checksum of its own: a Redis value is not a
medium that decays, and whoever can write one can write any header.

Two more keys live under the prefix, behind a control character that no
record key contains:

``<prefix>\\x1fformat``
    ``2``: the layout of the records under the prefix. A repository reads it
    before its first command; a prefix without it -- written by tiered-state
    0.1 (value and metadata as two keys, ``<prefix><key>`` and
    ``<prefix>\\x1fmeta:<key>``), or flushed -- is flushed (it is a cache) and
    marked, so no key of an earlier layout is ever read as a record. A
    higher number (a newer tiered-state wrote the prefix) is refused with a
    :class:`~tiered_state.errors.BackendError` and left untouched.
``<prefix>\\x1fepoch``
    The HOT epoch when the manager uses this store as a shared HOT (see
    "the HOT epoch" below).

Volatile: records expire natively at ``min(expires_at, hot_until)`` (``PX``),
and an already expired record is never stored (any older copy is deleted
instead) -- so a tombstone, born expired, leaves nothing here, and the
stored version of a key is also its live version.

Conditional writes are Lua scripts, atomic across all clients. Every script
call touches one record key and at most the epoch key (the shape Redis
Cluster will need), so a batch is a pipeline of script calls, one per
record, one round trip per :data:`PIPELINE_RECORDS` records; when part of it
fails, the :class:`~tiered_state.errors.BatchError` names the failed keys
(their outcome is unknown) and, as ``succeeded``, the keys written or
deleted. Scripts compare versions exactly: as the header's eight bytes, in
two 32-bit halves, never as one Lua number (a double: versions exceed 2**53).

Redis Cluster: a command or script may only touch keys of one hash slot,
so batches are split per slot (one ``MGET``/``UNLINK`` per slot's keys, one
``SET`` or script call per record), pipelined per node; ``keys``, ``stats``
and ``clear`` scan every primary. The HOT epoch is kept per slot, in
``<prefix>\x1fepoch{<tag>}``, where ``<tag>`` is the shortest decimal hash
tag of that slot, so that a fenced script's record and epoch keys share a
slot (a prefix holding a whole hash tag, ``{app}:``, keeps every key in one
slot and has one epoch key).
"""

from __future__ import annotations

import binascii
import contextlib
import inspect
import logging
import math
import re
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from types import TracebackType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, unquote, urlencode

from ..config import encode_userinfo, parse_number, redact, require, unknown_options
from ..errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    InvalidKeyError,
    PartialOutageError,
    SerializationError,
)
from ..keys import (
    compile_pattern,
    is_literal,
    literal_prefix,
    to_redis,
    validate_key,
    validate_pattern,
)
from ..record import Entry, Metadata, live_value
from .base import Items, StateRepository, chunked

if TYPE_CHECKING:
    import redis

__all__ = ["FORMAT", "HEADER_SIZE", "RedisStateRepository", "pack_record", "unpack_record"]

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "tiered_state:"
DEFAULT_SOCKET_TIMEOUT = 1.0
DEFAULT_CONNECT_TIMEOUT = 0.5
#: The storage format: the third byte of every record and the value of the
#: format key. 1 was tiered-state 0.1's two keys per record.
FORMAT = 2
#: Bytes before the payload (before the encoding's name, for encoding 0).
HEADER_SIZE = 85
#: The key (after the prefix) of the format marker and of the HOT epoch. A
#: control character: no record key starts with one.
FORMAT_MARK = "\x1fformat"
EPOCH_MARK = "\x1fepoch"
#: Where format 1 (tiered-state 0.1) kept a record's metadata:
#: ``<prefix>\x1fmeta:<key>``. Such a store is flushed on open (see
#: RedisStateRepository._check_format); nothing reads these keys.
META_MARK = "\x1fmeta:"
#: Keys per MGET / MSET / UNLINK, and per SCAN batch.
CHUNK = 500
SCAN_COUNT = 1000
#: Records per pipeline round trip of a batch write (bounds client memory).
PIPELINE_RECORDS = 10_000

# The scripts below spell these out too ('ts\2', 85 bytes, flags < 8,
# encodings < 6): change them together.
_MAGIC = b"ts" + bytes([FORMAT])
#: magic+format, flags, encoding, version, checksum, size_bytes, created_at,
#: updated_at, expires_at, hot_until.
_HEAD = struct.Struct(">3sBBQ32sQdddd")
assert _HEAD.size == HEADER_SIZE
_EXPIRES, _HOT_UNTIL, _NO_DIGEST = 0x01, 0x02, 0x04
_FLAGS = _EXPIRES | _HOT_UNTIL | _NO_DIGEST
#: Encoding codes. Never renumber: stored records carry them.
_CODES = {"json": 1, "typed-json": 2, "stub": 3, "tombstone": 4, "json+zlib": 5}
#: code -> name, None for 0 (the name follows the header) and unused codes.
_NAMES: tuple[str | None, ...] = tuple(
    {v: k for k, v in _CODES.items()}.get(code) for code in range(256))
_VERSION = struct.Struct(">Q")
_ZERO_DIGEST = bytes(32)
#: redis-py's per-command option for "hand me the reply's bytes": records are
#: not text, even for a client made with ``decode_responses=True``.
_RAW = {"NEVER_DECODE": True}

#: One command of a pipeline: (script, keys, args) for an EVALSHA of a
#: registered script, or (None, (), command) for a plain command.
_Call = tuple[Any, Sequence[bytes], Sequence[Any]]


def _digest(checksum: Any) -> bytes | None:
    """The 32 bytes of a SHA-256 hex digest; None for anything else (which
    matches no payload, and reads back as ``""``, which matches none either)."""
    if type(checksum) is not str or len(checksum) != 64:
        return None
    try:
        digest = bytes.fromhex(checksum)
    except ValueError:
        return None
    return digest if digest.hex() == checksum else None  # lowercase only


def pack_record(payload: str, metadata: Metadata) -> bytes:
    """The stored bytes of a record: the format 2 header, then the payload.

    :raises SerializationError: a field does not fit the header (a version or
        size outside 0..2**64-1, a timestamp that is not a number, an
        encoding name over 255 bytes), or the payload is not UTF-8 text.
    """
    expires_at = metadata["expires_at"]
    hot_until: float | None = metadata.get("hot_until")  # type: ignore[assignment]
    encoding = metadata["encoding"]
    digest = _digest(metadata["checksum"])
    flags = 0 if digest is not None else _NO_DIGEST
    if expires_at is not None:
        flags |= _EXPIRES
    if hot_until is not None:
        flags |= _HOT_UNTIL
    try:
        code = _CODES.get(encoding, 0)
        head = _HEAD.pack(_MAGIC, flags, code, metadata["version"], digest or _ZERO_DIGEST,
                          metadata["size_bytes"], metadata["created_at"], metadata["updated_at"],
                          expires_at or 0.0, hot_until or 0.0)
        if not code:
            name = encoding.encode("utf-8")
            if not 0 < len(name) < 256:
                raise ValueError("an encoding name is 1 to 255 bytes")
            head += bytes((len(name),)) + name
        return head + payload.encode("utf-8")
    except (struct.error, TypeError, ValueError, AttributeError) as exc:
        # Not the values: a message never quotes stored data.
        raise SerializationError(
            f"cannot store this record in Redis ({type(exc).__name__}: metadata of the wrong "
            "type or range, or a payload that is not UTF-8 text)") from None


def unpack_record(data: bytes) -> tuple[str, Metadata] | None:
    """``(payload, metadata)`` of stored bytes; None if they are not a record of
    this format. The payload is decoded with ``replace``: damaged bytes fail
    the checksum instead of raising."""
    try:
        (magic, flags, code, version, digest, size, created_at, updated_at, expires_at,
         hot_until) = _HEAD.unpack_from(data)
    except (struct.error, TypeError):
        return None
    if magic != _MAGIC or flags & ~_FLAGS:
        return None
    start = HEADER_SIZE
    encoding = _NAMES[code]
    if code == 0:
        length = data[start] if len(data) > start else 0
        end = start + 1 + length
        if not length or len(data) < end:
            return None
        # "replace": the scripts take any name too (a wrong one fails to decode).
        encoding = data[start + 1:end].decode("utf-8", "replace")
        start = end
    elif encoding is None:
        return None
    metadata: Metadata = {
        "checksum": "" if flags & _NO_DIGEST else digest.hex(),
        "size_bytes": size,
        "version": version,
        "created_at": created_at,
        "updated_at": updated_at,
        "expires_at": expires_at if flags & _EXPIRES else None,
        "encoding": encoding,
    }
    if flags & _HOT_UNTIL:
        metadata["hot_until"] = hot_until  # type: ignore[typeddict-unknown-key]
    return data[start:].decode("utf-8", "replace"), metadata


def _version_bytes(version: Any) -> bytes | None:
    """A version as the scripts compare it; None if no record can have it."""
    try:
        return _VERSION.pack(version)
    except struct.error:
        return None


# Lua: each script call works on ONE record key (KEYS[1]) and, fenced, the
# epoch key (KEYS[2]); a batch is a pipeline of calls. The new record is
# ARGV[1] (header and payload, as pack_record made it) and ARGV[2] its PX.
#
# Versions are microseconds << 10 | node, about 1.8e18: far beyond 2**53,
# where Lua's numbers (doubles) stop being exact and two versions 256 apart
# compare equal. So a version is never one number here: it stays the eight
# big-endian bytes of the header (GETRANGE 5..12 of the stored record,
# bytes 6..13 of ARGV[1]; Python sends the expected versions the same way),
# compared for equality as strings and ordered as two 32-bit halves, each
# exact in a double. Not with Lua's '<' on the strings, which follows the
# server's collation locale.
_LUA_LIB = r"""
local ZERO = '\0\0\0\0\0\0\0\0'
local function vcmp(a, b)
  if a == b then return 0 end
  local ah, al = struct.unpack('>I4I4', a)
  local bh, bl = struct.unpack('>I4I4', b)
  if ah ~= bh then return ah < bh and -1 or 1 end
  return al < bl and -1 or 1
end
-- The stored version of KEYS[1]; ZERO if there is no record of this format
-- (absent, another type -- the error pcall returns --, or a value without
-- our whole header: the magic and format 2, known flags and encoding, all
-- 85 bytes and the encoding's name), just as unpack_record decides, so the
-- next write replaces it.
local function stored()
  local h = redis.pcall('GETRANGE', KEYS[1], 0, 85)
  if type(h) ~= 'string' or #h < 85 or string.sub(h, 1, 3) ~= 'ts\2'
      or string.byte(h, 4) > 7 or string.byte(h, 5) > 5 then
    return ZERO
  end
  if string.byte(h, 5) == 0 then  -- the encoding's name follows: all of it?
    local n = string.byte(h, 86)
    if not n or n == 0 or redis.call('STRLEN', KEYS[1]) < 86 + n then return ZERO end
  end
  return string.sub(h, 6, 13)
end
-- px: "0" no expiry, "-1" already expired (the write leaves nothing), else ms.
local function put()
  local px = tonumber(ARGV[2])
  if px > 0 then
    redis.call('SET', KEYS[1], ARGV[1], 'PX', px)
  elseif px == 0 then
    redis.call('SET', KEYS[1], ARGV[1])
  else
    redis.call('UNLINK', KEYS[1])
  end
end
local function newer()
  return vcmp(stored(), string.sub(ARGV[1], 6, 13)) < 0
end
"""
# Each returns 1 if it wrote (or deleted), 0 if the condition refused.
_LUA_STORE_IF_NEWER = _LUA_LIB + r"""
if newer() then put() return 1 end
return 0
"""
# Fenced by the HOT epoch: KEYS[2] is the epoch key and ARGV[3] the epoch the
# caller read under; another epoch (HOT was flushed since, or this server is
# not the one the caller checked) writes nothing and returns -1.
_LUA_STORE_IF_NEWER_IN_EPOCH = _LUA_LIB + r"""
if redis.call('GET', KEYS[2]) ~= ARGV[3] then return -1 end
if newer() then put() return 1 end
return 0
"""
# ARGV[3] = the expected version. Redis drops an expired record itself and a
# tombstone is never kept (it is born expired), so the stored version is
# also the live one.
_LUA_STORE_IF_VERSION = _LUA_LIB + r"""
local current = stored()
if current == ARGV[3] and vcmp(current, string.sub(ARGV[1], 6, 13)) <= 0 then
  put()
  return 1
end
return 0
"""
# ARGV[1] = the version.
_LUA_DELETE_IF_VERSION = _LUA_LIB + r"""
local current = stored()
if current ~= ZERO and current == ARGV[1] then
  redis.call('UNLINK', KEYS[1])
  return 1
end
return 0
"""

#: How long a cluster node that failed is not tried again (its keys fail at once).
NODE_RETRY = 1.0
#: The URL schemes of the topologies other than one server.
CLUSTER_SCHEME = "redis+cluster"
SENTINEL_SCHEME = "redis+sentinel"
#: Redis Cluster's hash slots.
SLOTS = 16384
_slot_tags: list[bytes] = []


def slot_tags() -> list[bytes]:
    """For every hash slot, the shortest decimal hash tag that maps to it.

    Redis Cluster puts a key in slot ``CRC16-XMODEM(tag) mod 16384``, where
    the tag is the part between the first ``{`` and the next ``}`` (if not
    empty), else the whole key; ``binascii.crc_hqx`` is that CRC. Computed
    once per process (about 110,000 candidates, tens of milliseconds).
    """
    if not _slot_tags:
        tags: list[bytes | None] = [None] * SLOTS
        missing, n = SLOTS, 0
        while missing:
            tag = str(n).encode("ascii")
            slot = binascii.crc_hqx(tag, 0) % SLOTS
            if tags[slot] is None:
                tags[slot] = tag
                missing -= 1
            n += 1
        _slot_tags[:] = [t for t in tags if t is not None]
    return _slot_tags


def key_slot(name: bytes) -> int:
    """The hash slot of the key ``name`` (Redis Cluster's rule, hash tags included)."""
    start = name.find(b"{")
    if start >= 0:
        end = name.find(b"}", start + 1)
        if end > start + 1:
            name = name[start + 1:end]
    return binascii.crc_hqx(name, 0) % SLOTS


def _hosts(netloc: str, scheme: str) -> tuple[str, list[tuple[str, int]]]:
    """``(userinfo, [(host, port)...])`` of a comma-separated host list."""
    userinfo, _, hosts = netloc.rpartition("@")
    found: list[tuple[str, int]] = []
    for item in hosts.split(","):
        host, sep, port = item.strip().rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ConfigurationError(f"{scheme}:// takes host:port[,host:port...], not {item!r}")
        found.append((host.strip("[]"), int(port)))
    return userinfo, found


# The epoch keys of all the slots a cluster node serves, in one call each:
# KEYS[1] is one of them (declared keys must share a slot), ARGV[1] the
# value to set (or ""), ARGV[2..] the others, which Redis 7 lets a script
# flagged allow-cross-slot-keys reach on its own node.
_CROSS_SLOT = "#!lua flags=allow-cross-slot-keys\n"
# The epoch if every key holds the same one, else nil.
_LUA_EPOCH_SAME = _CROSS_SLOT + r"""
local first = redis.call('GET', KEYS[1])
for i = 2, #ARGV do
  if redis.call('GET', ARGV[i]) ~= first then return false end
end
return first
"""
_LUA_EPOCH_SET = _CROSS_SLOT + r"""
redis.call('SET', KEYS[1], ARGV[1])
for i = 2, #ARGV do redis.call('SET', ARGV[i], ARGV[1]) end
return #ARGV
"""
_LUA_EPOCH_DEL = _CROSS_SLOT + r"""
local n = redis.call('DEL', KEYS[1])
for i = 2, #ARGV do n = n + redis.call('DEL', ARGV[i]) end
return n
"""
# A cluster's batches, one call per node over every key it holds (ARGV; the
# declared KEYS[1] is one of them): GET each (nil for a missing key or one
# of another type, as MGET answers), SET each (name, record, px) triplet as
# the pipeline would, UNLINK each.
_LUA_GET_ALL = _CROSS_SLOT + r"""
local out = {}
for i = 1, #ARGV do
  local v = redis.pcall('GET', ARGV[i])
  if type(v) ~= 'string' then v = false end
  out[i] = v
end
return out
"""
_LUA_SET_ALL = _CROSS_SLOT + r"""
for i = 1, #ARGV, 3 do
  local px = tonumber(ARGV[i + 2])
  if px > 0 then
    redis.call('SET', ARGV[i], ARGV[i + 1], 'PX', px)
  elseif px == 0 then
    redis.call('SET', ARGV[i], ARGV[i + 1])
  else
    redis.call('UNLINK', ARGV[i])
  end
end
return #ARGV / 3
"""
_LUA_UNLINK_ALL = _CROSS_SLOT + r"""
local n = 0
for i = 1, #ARGV do n = n + redis.call('UNLINK', ARGV[i]) end
return n
"""
#: The same on one server (one key; no script: any Redis version).
_EPOCH_COMMANDS = {_LUA_EPOCH_SAME: "GET", _LUA_EPOCH_SET: "SET", _LUA_EPOCH_DEL: "DEL"}

_GLOB_SPECIAL = re.compile(r"([*?\[\]\\])")
_ESCAPED = re.compile(r"\\.", re.DOTALL)


def _escape_glob(text: str) -> str:
    """``text`` as a Redis MATCH glob that matches exactly itself."""
    return _GLOB_SPECIAL.sub(r"\\\1", text)


class _EpochChanged(Exception):
    """A fenced script found another HOT epoch than its caller's."""


_RUN_ID = re.compile(rb"run_id:([0-9a-fA-F]+)")


def _run_id(info: bytes | str) -> str:
    """The ``run_id`` in the text of ``INFO server``."""
    found = _RUN_ID.search(info if isinstance(info, bytes) else info.encode("utf-8"))
    return found.group(1).decode("ascii") if found else ""


def _corrupt_metadata() -> Metadata:
    """Metadata for a value that is not a record of this format: no payload
    matches its checksum, and its version is below every real one."""
    return {"checksum": "", "size_bytes": 0, "version": 0, "created_at": 0.0,
            "updated_at": 0.0, "expires_at": None, "encoding": "json"}


def _same_epoch(stored: bytes | str | None, epoch: str) -> bool:
    if stored is None:
        return False
    return (stored.decode("utf-8", "replace") if isinstance(stored, bytes) else stored) == epoch


def _valid(key: str) -> bool:
    try:
        validate_key(key)
    except InvalidKeyError:
        return False
    return True


def _as_bytes(name: bytes | str) -> bytes:
    return name if isinstance(name, bytes) else name.encode("utf-8")


class _Translate:
    """The one place redis-py errors become tiered-state errors (a context manager).

    Connection loss and timeouts mean "cannot reach the server" (the manager
    may skip the tier); anything else -- a refused password, a read-only
    replica, a script error -- is a :class:`BackendError`. Messages carry the
    driver's error class and a redacted text, never a value or a password.

    Every command of the repository runs inside one, so entering it is also
    where the storage format is checked, once, before the first command
    (``check``; the check's own commands pass ``check=False``).
    """

    __slots__ = ("action", "check", "repo")

    def __init__(self, repo: RedisStateRepository, action: str, check: bool = True) -> None:
        self.repo = repo
        self.action = action
        self.check = check

    def __enter__(self) -> None:
        if self.check and not self.repo._format_checked:
            self.repo._check_format()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is None:
            return
        errors = self.repo._redis.exceptions
        if not isinstance(exc, errors.RedisError):
            return
        where = self.repo._location
        if isinstance(exc, (errors.AuthenticationError, errors.AuthorizationError)):
            raise BackendError(
                f"{self.action}: Redis at {where} refused the credentials "
                f"({type(exc).__name__})", "redis"
            ) from exc
        if isinstance(exc, (errors.ConnectionError, errors.TimeoutError)):
            log.debug("redis %s: cannot reach %s: %s", self.action, where, type(exc).__name__)
            raise BackendUnavailableError(
                f"{self.action}: cannot reach Redis at {where} "
                f"({type(exc).__name__}: {redact(str(exc))[:200]})", "redis"
            ) from exc
        raise BackendError(
            f"{self.action} failed on Redis at {where} "
            f"({type(exc).__name__}: {redact(str(exc))[:200]})", "redis"
        ) from exc


class RedisStateRepository(StateRepository):
    """Records in Redis under a key prefix; see the module docstring for the format.

    :param client: a URL (``redis://``, ``rediss://``, ``unix://``,
        ``redis+cluster://``, ``redis+sentinel://``) or a ready ``redis.Redis``
        or ``redis.cluster.RedisCluster`` client (used as is; this repository
        will not close it).
    :param prefix: namespace for every key (``tiered_state:`` by default).
    :param default_ttl: seconds a record without ``expires_at`` stays in Redis
        (None: until deleted).
    :param socket_timeout: seconds to wait for a reply (URL clients only).
    :param socket_connect_timeout: seconds to wait for a connection (URL clients only).
    :param redis_options: further ``redis.Redis.from_url`` keyword arguments.
    """

    backend = "redis"
    volatile = True
    shared = True

    def __init__(
        self,
        client: str | redis.Redis = "redis://127.0.0.1:6379/0",
        *,
        prefix: str = DEFAULT_PREFIX,
        default_ttl: float | None = None,
        socket_timeout: float = DEFAULT_SOCKET_TIMEOUT,
        socket_connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
        **redis_options: Any,
    ) -> None:
        self._redis = require("redis", extra="redis")
        if not isinstance(prefix, str) or (prefix and not _valid(prefix)):
            raise ConfigurationError("prefix must be a str of valid key characters")
        if default_ttl is not None and (
            isinstance(default_ttl, bool) or not isinstance(default_ttl, (int, float))
            or not default_ttl > 0
        ):
            raise ConfigurationError(
                f"default_ttl must be a positive number or None, not {default_ttl!r}"
            )
        self.prefix = prefix
        self.default_ttl = default_ttl
        self._value_prefix = prefix.encode("utf-8")
        self._epoch_key = (prefix + EPOCH_MARK).encode("utf-8")
        #: Which servers: "server" (one), "cluster" or "sentinel".
        self.topology = "server"
        self._sentinel: Any = None
        self._service = ""
        #: The run ids of the servers the HOT guard checked its epoch on
        #: (empty: no guard uses this repository as a shared HOT).
        self._trusted: frozenset[str] = frozenset()
        self._format_key = (prefix + FORMAT_MARK).encode("utf-8")
        #: Set once the format key said this format (see _check_format).
        self._format_checked = False
        self._format_lock = threading.Lock()
        #: Set once this repository emptied the prefix (a flush of another
        #: layout, or clear()): a missing format key then needs no flush.
        self._layout_flushed = False
        #: Record keys of another layout the format check flushed (for
        #: ``tiered-state upgrade``'s report).
        self.flushed_on_open = 0
        self._glob_prefix = _escape_glob(prefix)
        self._owns_client = isinstance(client, str)
        # Any: redis-py's command methods are untyped.
        self._client: Any
        self._location = ""
        if isinstance(client, str):
            redis_options.setdefault("redis_connect_func", self._on_connect)
            self._client = self._connect(
                client, socket_timeout, socket_connect_timeout, redis_options
            )
        else:
            if redis_options:
                raise ConfigurationError("redis options only apply when opening from a URL")
            self._client = client
            if isinstance(client, self._redis.cluster.RedisCluster):
                self.topology = "cluster"
                if client.user_on_connect_func is None:
                    client.user_on_connect_func = self._on_connect
                self._location = self._describe_cluster(
                    [(n.host, int(n.port)) for n in client.get_nodes()])
            else:
                client.connection_pool.connection_kwargs.setdefault("redis_connect_func",
                                                                    self._on_connect)
        self._location = self._location or self._describe(self._client)
        self._cluster = self.topology == "cluster"
        #: The epoch key of every hash slot (a cluster), built on first use;
        #: None: one epoch key (one server, or a prefix pinned to one slot).
        self._per_slot: bool = self._cluster and self._pins_no_slot(prefix)
        self._epoch_names: list[bytes] = []
        #: Cluster nodes that failed, by name: not tried again until then (monotonic).
        self._down: dict[str, float] = {}
        self._guards: dict[str, _Translate] = {}
        register = self._client.register_script
        self._store_if_newer_script = register(_LUA_STORE_IF_NEWER)
        self._store_if_newer_in_epoch_script = register(_LUA_STORE_IF_NEWER_IN_EPOCH)
        self._store_if_version_script = register(_LUA_STORE_IF_VERSION)
        self._delete_if_version_script = register(_LUA_DELETE_IF_VERSION)
        self._closed = False

    # ------------------------------------------------------------ opening
    @classmethod
    def from_url(cls, url: str, **options: Any) -> RedisStateRepository:
        # Not config.query_options: urlunsplit turns unix:///path into unix:/path.
        base, _, qs = encode_userinfo(url).partition("?")
        query: dict[str, Any] = dict(parse_qsl(qs, keep_blank_values=True))
        query.update(options)
        prefix = query.pop("prefix", DEFAULT_PREFIX)
        ttl = parse_number(query.pop("default_ttl", None), "default_ttl", minimum=0.001)
        timeouts = {}
        for name, default in (("socket_timeout", DEFAULT_SOCKET_TIMEOUT),
                              ("socket_connect_timeout", DEFAULT_CONNECT_TIMEOUT)):
            value = parse_number(query.pop(name, default), name, minimum=0.001)
            timeouts[name] = default if value is None else value
        # Everything else is redis-py's own query option; hand it back in the URL.
        rest = urlencode({k: v for k, v in query.items() if isinstance(v, str)})
        extra = {k: v for k, v in query.items() if not isinstance(v, str)}
        return cls(base + ("?" + rest if rest else ""), prefix=str(prefix), default_ttl=ttl,
                   **timeouts, **extra)

    def _connect(
        self, url: str, socket_timeout: float, connect_timeout: float, options: dict[str, Any]
    ) -> Any:
        redis = self._redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        # One immediate retry on a *connection* error only: after a server
        # restart the pooled socket is dead and the retry reconnects, so the
        # caller's next call works. A timeout is not retried (redis-py's
        # default backoff would stall a caller for seconds on a dead server).
        options.setdefault("retry", Retry(NoBackoff(), 1, supported_errors=(
            redis.exceptions.ConnectionError,)))
        scheme = url.split("://", 1)[0].lower()
        self._check_options(url, scheme, options)
        options.update(socket_timeout=socket_timeout, socket_connect_timeout=connect_timeout)
        try:
            if scheme == CLUSTER_SCHEME:
                return self._connect_cluster(url, options)
            if scheme == SENTINEL_SCHEME:
                return self._connect_sentinel(url, options)
            return redis.Redis.from_url(url, **options)
        except (ValueError, TypeError, redis.exceptions.RedisClusterException) as exc:
            if isinstance(exc, ConfigurationError):
                raise
            # Not the driver's message: it may quote pieces of the URL.
            raise ConfigurationError(
                f"bad Redis URL {redact(url)!r} ({type(exc).__name__})") from None

    def _connect_cluster(self, url: str, options: dict[str, Any]) -> Any:
        """A ``RedisCluster`` on the listed startup nodes (redis-py's URL options
        apply to every node)."""
        from redis.cluster import ClusterNode, RedisCluster

        base, _, query = url.partition("?")
        netloc, _, path = base.split("://", 1)[1].partition("/")
        userinfo, hosts = _hosts(netloc, CLUSTER_SCHEME)
        if path.strip("/") not in ("", "0"):
            raise ConfigurationError("Redis Cluster has only database 0: "
                                     f"{CLUSTER_SCHEME}://host:port[,host:port...][/0]")
        self.topology = "cluster"
        self._location = self._describe_cluster(hosts)
        # redis-py reads the options (and the user info) from a one-node URL;
        # the list is the startup nodes. MOVED and ASK are followed by the client.
        host, port = hosts[0]
        one = f"redis://{userinfo + '@' if userinfo else ''}{host}:{port}/0"
        return RedisCluster.from_url(one + ("?" + query if query else ""),
                                     startup_nodes=[ClusterNode(h, p)  # type: ignore[no-untyped-call]
                                                    for h, p in hosts],
                                     **options)

    def _connect_sentinel(self, url: str, options: dict[str, Any]) -> Any:
        """The current primary of a Sentinel-monitored service (asked again
        after a failover, when its connection fails)."""
        from redis.connection import parse_url
        from redis.sentinel import Sentinel

        base, _, query = url.partition("?")
        netloc, _, path = base.split("://", 1)[1].partition("/")
        userinfo, hosts = _hosts(netloc, SENTINEL_SCHEME)
        parts = [unquote(p) for p in path.split("/") if p]
        if not parts or len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
            raise ConfigurationError(f"{SENTINEL_SCHEME}://host:port[,host:port...]"
                                     "/service_name[/db] names the monitored service")
        service, db = parts[0], int(parts[1]) if len(parts) == 2 else 0
        settings = dict(parse_qsl(query, keep_blank_values=True))
        sentinel_kwargs = {"socket_timeout": options["socket_timeout"],
                           "socket_connect_timeout": options["socket_connect_timeout"]}
        for name in ("sentinel_password", "sentinel_username"):
            if name in settings:
                sentinel_kwargs[name.split("_", 1)[1]] = settings.pop(name)
        # redis-py's own typed parsing of the remaining options (and user info).
        parsed = parse_url(f"redis://{userinfo + '@' if userinfo else ''}sentinel/{db}"
                           + ("?" + urlencode(settings) if settings else ""))  # type: ignore[no-untyped-call]
        for name in ("host", "port", "path", "connection_class"):
            parsed.pop(name, None)
        self.topology = "sentinel"
        self._service = service
        self._location = (f"{SENTINEL_SCHEME}://{','.join(f'{h}:{p}' for h, p in hosts)}"
                          f"/{service}/{db}")
        self._sentinel = Sentinel(hosts, sentinel_kwargs=sentinel_kwargs)  # type: ignore[no-untyped-call]
        return self._sentinel.master_for(service, **parsed, **options)

    @staticmethod
    def _check_options(url: str, scheme: str, options: Iterable[str]) -> None:
        """Refuse options neither this backend nor redis-py takes, before
        connecting: redis-py reads them when it first connects (a TypeError
        at the first command), and its cluster client drops unknown ones."""
        from redis.cluster import RedisCluster
        from redis.connection import (
            URL_QUERY_ARGUMENT_PARSERS,
            AbstractConnection,
            Connection,
            SSLConnection,
            UnixDomainSocketConnection,
        )

        query = url.partition("?")[2]
        given = {name for name, _ in parse_qsl(query, keep_blank_values=True)} | set(options)
        valid = {*URL_QUERY_ARGUMENT_PARSERS, "prefix", "default_ttl", "sentinel_password",
                 "sentinel_username"}
        kinds: tuple[Any, ...] = (AbstractConnection, Connection, SSLConnection,
                                  UnixDomainSocketConnection)
        if scheme == CLUSTER_SCHEME:
            kinds += (RedisCluster,)
        for cls in kinds:
            valid |= {p for p in inspect.signature(cls.__init__).parameters
                      if p not in ("self", "args", "kwargs") and not p.startswith("_")}
        stale = given & {"read_from_replicas", "load_balancing_strategy"}
        if stale:
            raise ConfigurationError(
                f"{scheme}:// does not take {sorted(stale)[0]!r}: a replica may lag its "
                "primary, and HOT must never serve an older value")
        unknown = given - valid
        if unknown:
            raise unknown_options(scheme, unknown, valid, more="(redis-py's connection options)")

    @staticmethod
    def _describe_cluster(hosts: Iterable[tuple[str, int]]) -> str:
        return f"{CLUSTER_SCHEME}://{','.join(f'{h}:{p}' for h, p in hosts)}"

    @staticmethod
    def _pins_no_slot(prefix: str) -> bool:
        """Whether keys under ``prefix`` spread over the slots of a cluster.

        A prefix with a whole hash tag (``{app}:``) puts every key in that
        tag's slot; one with a ``{`` that it does not close would make the
        slot depend on where a key's first ``}`` is, and is refused.
        """
        start = prefix.find("{")
        if start < 0:
            return True
        if prefix.find("}", start + 1) > start + 1:
            return False
        raise ConfigurationError(
            f"a Redis Cluster prefix with '{{' must hold a whole hash tag, like '{{app}}:', "
            f"not {prefix!r}")

    @staticmethod
    def _describe(client: redis.Redis) -> str:
        """Where the client points, for messages: never a password."""
        kwargs = client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return f"unix://{kwargs['path']}?db={kwargs.get('db', 0)}"
        scheme = "rediss" if "ssl_cert_reqs" in kwargs else "redis"
        host, port = kwargs.get("host", "localhost"), kwargs.get("port", 6379)
        return f"{scheme}://{host}:{port}/{kwargs.get('db', 0)}"

    # ------------------------------------------------------------ the format
    def _check_format(self) -> None:
        """Make sure the prefix holds records of this format before the first command.

        The format key says ``2``: nothing to do. It is missing (a store of
        tiered-state 0.1, with its two keys per record; a new prefix; a flushed
        server) or unreadable: flush the prefix -- the epoch key first, so
        every process using it as a shared HOT flushes again before trusting
        it, as after a FLUSHALL -- and write the key (without a prefix, only
        write it: the flush would take the whole database). A newer format is
        left alone and refused.
        """
        with self._format_lock:
            if self._format_checked:
                return
            guard = _Translate(self, "open", check=False)
            with guard:
                # MGET, not GET: a key of another type reads as nil, not WRONGTYPE.
                found, = self._client.execute_command("MGET", self._format_key, **_RAW)
            marker = str(FORMAT).encode("ascii")
            if found != marker:
                if isinstance(found, bytes) and found.isdigit() and int(found) > FORMAT:
                    raise BackendError(
                        f"the store under prefix {self.prefix!r} at {self._location} has storage "
                        f"format {int(found)}, written by a newer tiered-state; this one writes "
                        f"format {FORMAT}: upgrade tiered-state, or give this store another "
                        "prefix", "redis")
                if not self._layout_flushed and not self.prefix:
                    # No prefix: the flush would be the whole database. Values of
                    # another layout still never pass for records (no header).
                    log.warning("redis: no format %d marker in %s, which this store shares "
                                "without a prefix: nothing is flushed", FORMAT, self._location)
                elif not self._layout_flushed:
                    self._on_every_epoch(guard, _LUA_EPOCH_DEL)  # fence every fill first
                    flushed = self._delete_prefix(guard)
                    self.flushed_on_open += flushed
                    self._layout_flushed = True
                    if flushed:
                        log.warning("redis: the store under prefix %r at %s had no format %d "
                                    "marker (tiered-state 0.1's layout, or a lost marker): "
                                    "flushed %d keys", self.prefix, self._location, FORMAT,
                                    flushed)
                with guard:
                    self._client.execute_command("SET", self._format_key, marker)
            self._format_checked = True

    def _delete_prefix(self, guard: _Translate) -> int:
        """UNLINK every key under the prefix; returns how many record keys went
        (not the store's own keys behind a control character)."""
        start = len(self._value_prefix)
        total = 0
        for chunk in chunked(self._scan(self._glob_prefix + "*", guard), SCAN_COUNT):
            records = [r for r in chunk if r[start:start + 1] != b"\x1f"]
            own = [r for r in chunk if r[start:start + 1] == b"\x1f"]
            calls = [["UNLINK", *(names[i] for i in group)]
                     for names in (records, own) for group in self._groups(names)]
            with guard:
                pipe = self._client.pipeline(transaction=False)
                for call in calls:
                    pipe.execute_command(*call)
                replies = pipe.execute()
            total += sum(int(r) for r, call in zip(replies, calls)
                         if call[1][start:start + 1] != b"\x1f")
        return total

    # ------------------------------------------------------------ commands
    def _run(self, script: Any, keys: Sequence[bytes], args: Sequence[Any] = ()) -> Any:
        """EVALSHA a registered script; load it if the server lost it (a restart).

        Called directly rather than through ``Script.__call__``, which costs a
        noticeable share of a single store's time.
        """
        try:
            return self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)
        except self._redis.exceptions.NoScriptError:
            script.sha = self._client.script_load(script.script)
            return self._client.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    def _send(self, action: str, calls: Sequence[_Call]) -> list[Any]:
        """Send ``calls`` in one pipeline round trip; return the replies in order,
        a failed command's exception in its place.

        A call is ``(script, keys, args)`` for an EVALSHA, or ``(None, (), command)``.
        EVALSHA rather than redis-py's pipeline scripts, which first ask
        ``SCRIPT EXISTS`` (a second round trip on every batch). A call the server
        answered NOSCRIPT (it restarted) did nothing, so it is sent once more
        after its script is loaded.

        :raises BackendError: the round trip itself failed (nothing is known).
        """
        def commands(indexes: Iterable[int]) -> list[Sequence[Any]]:
            out: list[Sequence[Any]] = []
            for i in indexes:
                script, keys, args = calls[i]
                out.append(args if script is None
                           else ("EVALSHA", script.sha, len(keys), *keys, *args))
            return out

        guard = self._errors(action)
        replies = self._pipelined(guard, commands(range(len(calls))))
        lost = [i for i, reply in enumerate(replies)
                if isinstance(reply, self._redis.exceptions.NoScriptError)]
        if lost:
            try:
                with guard:
                    for script in {id(calls[i][0]): calls[i][0] for i in lost}.values():
                        script.sha = self._client.script_load(script.script)
                again = self._pipelined(guard, commands(lost))
            except BackendError as exc:
                again = [exc] * len(lost)
            for i, reply in zip(lost, again):
                replies[i] = reply
        return replies

    def _pipelined(self, guard: _Translate, commands: Sequence[Sequence[Any]],
                   **options: Any) -> list[Any]:
        """Send ``commands`` pipelined; the replies in order, a failed command's
        exception in its place.

        In a cluster each command -- keys of one slot, the first key right
        after the command name (after the script and key count for EVALSHA)
        -- goes to its slot's primary, one plain pipeline per node: redis-py's
        cluster pipeline costs several times more per command. Commands a
        node answers MOVED or ASK (a resharding) go again through the
        cluster client, which follows redirections; a node that cannot be
        reached fails its own commands only.

        :raises BackendError: nothing could be sent at all.
        """
        client = self._client
        if not self._cluster:
            with guard:
                pipe = client.pipeline(transaction=False)
                for command in commands:
                    pipe.execute_command(*command, **options)
                return list(pipe.execute(raise_on_error=False))
        errors = self._redis.exceptions
        by_node: dict[str, tuple[Any, list[int]]] = {}
        replies: list[Any] = [None] * len(commands)
        with guard:
            slot_owner = client.nodes_manager.get_node_from_slot
            for i, command in enumerate(commands):
                key = command[3] if command[0] == "EVALSHA" else command[1]
                node = slot_owner(key_slot(_as_bytes(key)))
                by_node.setdefault(node.name, (node, []))[1].append(i)
        unreachable: list[BaseException] = []
        now = time.monotonic()
        for node, indexes in by_node.values():
            down: BaseException | None = None
            if self._down.get(node.name, 0.0) > now:
                down = PartialOutageError(f"redis: cluster node {node.name} is down "
                                          f"(retried after {NODE_RETRY:g}s)", backend="redis")
            else:
                try:
                    with guard:
                        pipe = client.get_redis_connection(node).pipeline(transaction=False)
                        for i in indexes:
                            pipe.execute_command(*commands[i], **options)
                        got = pipe.execute(raise_on_error=False)
                except BackendUnavailableError as exc:
                    self._down[node.name] = now + NODE_RETRY
                    down = PartialOutageError(str(exc), backend="redis")
                    down.__cause__ = exc
                    with contextlib.suppress(errors.RedisError):
                        client.nodes_manager.initialize()  # learn the new layout (a failover)
            if down is not None:
                unreachable.append(down)
                got = [down] * len(indexes)
            for i, reply in zip(indexes, got):
                replies[i] = reply
        if unreachable and len(unreachable) == len(by_node):
            raise unreachable[0]
        redirected = [i for i, reply in enumerate(replies)
                      if isinstance(reply, (errors.MovedError, errors.AskError,
                                            errors.TryAgainError))]
        if redirected:
            with guard:
                pipe = client.pipeline(transaction=False)
                for i in redirected:
                    pipe.execute_command(*commands[i], **options)
                for i, reply in zip(redirected, pipe.execute(raise_on_error=False)):
                    replies[i] = reply
        return replies

    def _on_each_node(self, guard: _Translate, script: str, names: Sequence[bytes],
                      argv: Callable[[list[int]], list[Any]], slots: Sequence[int] = (),
                      **options: Any) -> list[tuple[list[int], Any]] | None:
        """A cluster batch in one script call per primary: ``names`` grouped by
        the node serving each one's slot, ``argv(indexes)`` the ARGV of a
        node's share. Returns ``(indexes, reply)`` per node, or None when any
        node refused or failed (a slot moving, a node down): the caller then
        takes the per-slot path, which follows redirections and fails only
        the keys of a node that is down.
        """
        client = self._client
        errors = self._redis.exceptions
        try:
            with guard:
                # The slot map as the client last learned it (its primary
                # first); redis-py's lookup method costs more than the rest.
                owners = client.nodes_manager.slots_cache
                by_node: dict[str, tuple[Any, list[int]]] = {}
                now = time.monotonic()
                for i, slot in enumerate(slots or [key_slot(name) for name in names]):
                    node = owners[slot][0]
                    if self._down.get(node.name, 0.0) > now:
                        return None  # key by key: the others are answered
                    share = by_node.get(node.name)
                    if share is None:
                        share = by_node[node.name] = (node, [])
                    share[1].append(i)
                # Sent to every node before any reply is read: the nodes work
                # at the same time, as one pipeline's round trip would.
                taken: list[tuple[Any, Any, list[int]]] = []
                try:
                    for node, indexes in by_node.values():
                        pool = client.get_redis_connection(node).connection_pool
                        connection = pool.get_connection()
                        taken.append((pool, connection, indexes))
                        connection.send_command("EVAL", script, 1, names[indexes[0]],
                                                *argv(indexes))
                    raw = bool(options.get("NEVER_DECODE"))
                    replies = [(indexes, connection.read_response(disable_decoding=raw))
                               for _, connection, indexes in taken]
                except BaseException:
                    for _, connection, _ in taken:
                        connection.disconnect()  # a reply may still be on its way
                    raise
                finally:
                    for pool, connection, _ in taken:
                        pool.release(connection)
                return replies
        except (BackendError, KeyError, IndexError):  # a slot not covered: the slow path says so
            return None
        except errors.RedisError:  # pragma: no cover - translated by the guard
            return None

    def _errors(self, action: str) -> _Translate:
        guard = self._guards.get(action)
        if guard is None:
            guard = self._guards[action] = _Translate(self, action)
        return guard

    # ------------------------------------------------------------ topology
    def _groups(self, names: Sequence[bytes]) -> list[list[int]]:
        """The indexes of ``names`` in the groups one multi-key command may take:
        CHUNK at a time, and in a cluster each group within one hash slot."""
        if not self._cluster:
            return [list(range(i, min(i + CHUNK, len(names)))) for i in range(0, len(names), CHUNK)]
        by_slot: dict[int, list[int]] = {}
        for i, name in enumerate(names):
            by_slot.setdefault(key_slot(name), []).append(i)
        return [group[i:i + CHUNK] for group in by_slot.values()
                for i in range(0, len(group), CHUNK)]

    def _epochs(self) -> list[bytes]:
        """Every epoch key: one per hash slot in a cluster, else the one."""
        if not self._per_slot:
            return [self._epoch_key]
        if not self._epoch_names:
            base = self._epoch_key + b"{"
            self._epoch_names = [base + tag + b"}" for tag in slot_tags()]
        return self._epoch_names

    def _fence(self, name: bytes) -> bytes:
        """The epoch key that fences the record key ``name`` (in its slot)."""
        return self._epochs()[key_slot(name)] if self._per_slot else self._epoch_key

    @contextlib.contextmanager
    def _node_of(self, name: bytes, key: str) -> Iterator[None]:
        """Around one command on the record ``name`` (of ``key``): in a cluster,
        the failure of its node alone is a :class:`PartialOutageError`, and a
        node that failed less than :data:`NODE_RETRY` ago is not tried."""
        if not self._cluster:
            yield
            return
        node = self._owner(key_slot(name))
        if node is not None and self._down.get(node, 0.0) > time.monotonic():
            raise PartialOutageError(f"redis: the cluster node holding {key!r} is down "
                                     f"(retried after {NODE_RETRY:g}s)", [key], backend="redis")
        try:
            yield
        except BackendUnavailableError as exc:
            if node is not None:
                self._down[node] = time.monotonic() + NODE_RETRY
            raise PartialOutageError(str(exc), [key], backend="redis") from exc

    def _owner(self, slot: int) -> str | None:
        """The name of the primary serving ``slot``, as the client last learned it."""
        try:
            return str(self._client.nodes_manager.slots_cache[slot][0].name)
        except (KeyError, IndexError):
            return None

    def _scan(self, glob: str, guard: _Translate) -> Iterator[bytes]:
        """The names matching ``glob`` on the server, or on every primary of a cluster."""
        client = self._client
        if not self._cluster:
            cursor = 0
            while True:
                with guard:
                    cursor, batch = client.scan(cursor, match=glob, count=SCAN_COUNT)
                for name in batch:
                    yield _as_bytes(name)
                if not cursor:
                    return
        with guard:
            primaries = client.get_primaries()
        for node in primaries:
            cursor = 0
            while True:
                with guard:
                    cursors, batch = client.scan(cursor, match=glob, count=SCAN_COUNT,
                                                 target_nodes=node)
                cursor = cursors[node.name]
                for name in batch:
                    yield _as_bytes(name)
                if not cursor:
                    break

    def _on_every_epoch(self, guard: _Translate, script: str, *argv: Any) -> list[Any]:
        """Run ``script`` on every epoch key: one EVAL per primary of a cluster,
        its KEYS the epoch keys of the slots it serves (the scripts may touch
        several slots of their node: Redis 7's ``allow-cross-slot-keys``); one
        plain command on one server. The replies, one per EVAL."""
        client = self._client
        with guard:
            if not self._per_slot:
                return [client.execute_command(_EPOCH_COMMANDS[script], self._epoch_key, *argv)]
            names = self._epochs()
            by_node: dict[str, tuple[Any, list[bytes]]] = {}
            for slot in range(SLOTS):
                node = client.nodes_manager.get_node_from_slot(slot)
                by_node.setdefault(node.name, (node, []))[1].append(names[slot])
            return [client.get_redis_connection(node).execute_command(
                        "EVAL", script, 1, keys[0], argv[0] if argv else "", *keys[1:])
                    for node, keys in by_node.values()]

    # ------------------------------------------------------------ encoding
    def _px(self, metadata: Metadata, now: float) -> int:
        """PX for a record: 0 none, -1 already expired, else milliseconds left.

        The copy goes at ``min(expires_at, hot_until)`` (``hot_until``: the
        manager's hot_ttl for a HOT copy), else after ``default_ttl``.
        """
        deadline = metadata["expires_at"]
        hot_until: float | None = metadata.get("hot_until")  # type: ignore[assignment]
        if hot_until is not None and (deadline is None or hot_until < deadline):
            deadline = hot_until
        if deadline is None:
            return 0 if self.default_ttl is None else max(1, math.ceil(self.default_ttl * 1000))
        left = deadline - now
        # Round up: Redis must not drop a record before its expires_at.
        return -1 if left <= 0 else max(1, math.ceil(left * 1000))

    def _entry(self, key: str, data: Any) -> Entry | None:
        """The entry stored as ``data`` (None: absent); a value that is not a
        record of this format is a corrupt entry, not an absent one: it fails
        its checksum, so the manager counts it, uses the catalog and replaces
        this copy (version 0 yields to any write)."""
        if data is None:
            return None
        if isinstance(data, str):  # a client that decodes anyway
            data = data.encode("utf-8", "surrogateescape")
        found = unpack_record(data)
        if found is None:
            log.warning("redis: a value under prefix %r is not a record of format %d",
                        self.prefix, FORMAT)
            return Entry(key, data.decode("utf-8", "replace"), _corrupt_metadata())
        return Entry(key, *found)

    # ------------------------------------------------------------ the seven
    def fetch_record(self, key: str) -> Entry | None:
        raw = validate_key(key).encode("utf-8")
        with self._errors("fetch"):
            # MGET, not GET: a key of another type is nil (absent), not WRONGTYPE.
            data, = self._client.execute_command("MGET", self._value_prefix + raw, **_RAW)
        return self._entry(key, data)

    def fetch(self, key: str) -> Any | None:
        return live_value(self.fetch_record(key))

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        name = self._value_prefix + validate_key(key).encode("utf-8")
        record = pack_record(value, metadata)
        px = self._px(metadata, time.time())
        with self._errors("store"):
            if px == 0:
                # A plain SET also clears any TTL an older copy had.
                self._client.execute_command("SET", name, record)
            elif px < 0:
                self._client.execute_command("UNLINK", name)
            else:
                self._client.execute_command("SET", name, record, "PX", px)
        return True

    def delete(self, key: str) -> bool:
        raw = validate_key(key).encode("utf-8")
        with self._errors("delete"):
            count = self._client.execute_command("UNLINK", self._value_prefix + raw)
        return bool(count)

    def keys(self, pattern: str = "*") -> list[str]:
        # SCAN may return a key twice while Redis rehashes; the set drops that.
        return list(dict.fromkeys(self.iter_keys(pattern)))

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        validate_pattern(pattern)
        if is_literal(pattern):
            return self._literal_key(literal_prefix(pattern))
        return self._scan_keys(pattern)

    def _literal_key(self, key: str) -> Iterator[str]:
        try:
            raw = validate_key(key).encode("utf-8")
        except ValueError:
            return
        with self._errors("keys"):
            found = self._client.execute_command("EXISTS", self._value_prefix + raw)
        if found:
            yield key

    def _match_glob(self, pattern: str) -> str:
        """The SCAN MATCH glob: never narrower than ``pattern``, usually exact.

        Redis globs match bytes, so ``?`` and ``[...]`` would miss a multi-byte
        UTF-8 character; such patterns scan the literal prefix and the
        reference matcher filters.
        """
        body = to_redis(pattern)
        bare = _ESCAPED.sub("", body)
        if "?" in bare or "[" in bare:
            body = _escape_glob(literal_prefix(pattern)) + "*"
        if body == "*":
            # Keys are never empty and never start with a control character,
            # so this skips the store's own keys on the server side.
            body = "[^\x1f]*"
        return self._glob_prefix + body

    def _scan_keys(self, pattern: str) -> Iterator[str]:
        match = compile_pattern(pattern).match
        start = len(self._value_prefix)
        for name in self._scan(self._match_glob(pattern), self._errors("keys")):
            try:
                # The store's own keys start with a control character: invalid.
                key = validate_key(name[start:].decode("utf-8"))
            except (UnicodeDecodeError, ValueError):
                continue  # not a key this library could have written
            if match(key):
                yield key

    def stats(self) -> dict[str, Any]:
        guard = self._errors("stats")
        count = sum(1 for _ in self._scan(self._glob_prefix + "[^\x1f]*", guard))
        with guard:
            if self._cluster:
                # Per node; the first primary's answers stand for the server's.
                first = self._client.get_primaries()[0]
                memory = self._client.info("memory", target_nodes=first)
                server = self._client.info("server", target_nodes=first)
            else:
                memory = self._client.info("memory")
                server = self._client.info("server")
            dbsize = self._client.dbsize()
        return {
            "topology": self.topology,
            "primaries": self.primaries(),
            "backend": self.backend,
            "tier": str(self.tier) if self.tier else None,
            "key_count": count,
            "prefix": self.prefix,
            "default_ttl": self.default_ttl,
            "format": FORMAT,
            "server": self._location,
            "redis_version": server.get("redis_version"),
            "used_memory": memory.get("used_memory"),
            "used_memory_human": memory.get("used_memory_human"),
            "maxmemory": memory.get("maxmemory"),
            "maxmemory_policy": memory.get("maxmemory_policy"),
            "db_keys": dbsize,
        }

    def store_many(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        # Every record packed before anything is sent: one that cannot be
        # stored raises and nothing is written.
        now = time.time()
        prefix = self._value_prefix
        rows = [(key, prefix + key.encode("utf-8"), pack_record(payload, md), self._px(md, now))
                for key, (payload, md) in items.items()]
        succeeded: list[str] = []
        failed: dict[str, BaseException] = {}
        if self._cluster and len(rows) > 1 and self._on_each_node(
                self._errors("store_many"), _LUA_SET_ALL, [row[1] for row in rows],
                lambda indexes: [v for i in indexes for v in rows[i][1:]]) is not None:
            return set(items)
        parts = list(chunked(rows, PIPELINE_RECORDS))
        for n, part in enumerate(parts):
            try:
                failed.update(self._store_pipeline(part, succeeded))
            except BackendError as exc:
                if not n:
                    raise  # nothing happened: Redis is down, say so plainly
                for later in parts[n:]:
                    failed.update((row[0], exc) for row in later)
                break
        if failed:
            raise self._batch_failed("store_many", failed, succeeded)
        return set(items)

    def _store_pipeline(
        self, part: list[tuple[str, bytes, bytes, int]], succeeded: list[str]
    ) -> dict[str, BaseException]:
        """Store up to PIPELINE_RECORDS records in one round trip, grouped by TTL.

        ``MSET`` per CHUNK records without expiry, one ``SET ... PX`` per
        record with one, ``UNLINK`` per CHUNK records already expired.
        Appends the stored keys to ``succeeded`` and returns the failed ones.
        """
        plain: list[tuple[str, bytes, bytes]] = []
        calls: list[_Call] = []
        groups: list[list[str]] = []
        expired: list[tuple[str, bytes]] = []
        for key, name, record, px in part:
            if px == 0:
                plain.append((key, name, record))
            elif px > 0:
                calls.append((None, (), ("SET", name, record, "PX", px)))
                groups.append([key])
            else:
                expired.append((key, name))
        for group in self._groups([name for _, name, _ in plain]):
            args: list[bytes | str] = ["MSET"]
            for i in group:
                args += plain[i][1:]
            calls.append((None, (), args))
            groups.append([plain[i][0] for i in group])
        for group in self._groups([name for _, name in expired]):
            calls.append((None, (), ["UNLINK", *(expired[i][1] for i in group)]))
            groups.append([expired[i][0] for i in group])
        failed: dict[str, BaseException] = {}
        for keys_of, result in zip(groups, self._send("store_many", calls)):
            if isinstance(result, Exception):
                failed.update((k, result) for k in keys_of)
            else:
                succeeded.extend(keys_of)
        return failed

    def delete_many(self, keys: Iterable[str]) -> int:
        unique = list(dict.fromkeys(validate_key(k) for k in keys))
        prefix = self._value_prefix
        names = [prefix + k.encode("utf-8") for k in unique]
        if self._cluster and len(names) > 1:
            done_by_node = self._on_each_node(self._errors("delete_many"), _LUA_UNLINK_ALL, names,
                                              lambda indexes: [names[i] for i in indexes])
            if done_by_node is not None:
                return sum(int(count) for _, count in done_by_node)
        groups = self._groups(names)
        chunks = [[unique[i] for i in group] for group in groups]
        calls: list[_Call] = [(None, (), ["UNLINK", *(names[i] for i in group)])
                              for group in groups]
        total = 0
        done: list[str] = []
        failed: dict[str, BaseException] = {}
        for chunk, reply in zip(chunks, self._send("delete_many", calls) if calls else ()):
            if isinstance(reply, Exception):
                failed.update((k, reply) for k in chunk)
            else:
                total += reply
                done.extend(chunk)
        if failed:
            raise self._batch_failed("delete_many", failed, done)
        return total

    # ------------------------------------------------------------ native extras
    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        found = self._fetch_many(keys, None)
        assert found is not None  # unfenced reads always answer
        return found

    def _fetch_many(self, keys: Iterable[str], epoch: str | None) -> dict[str, Entry] | None:
        """MGET the records, CHUNK keys per MGET, one round trip; with ``epoch``,
        each MGET also reads the epoch key, and the answer is None if any of
        them found another epoch."""
        unique = list(dict.fromkeys(validate_key(k) for k in keys))
        if not unique:
            return {}
        prefix = self._value_prefix
        wanted = [prefix + k.encode("utf-8") for k in unique]
        fenced = epoch is not None
        guard = self._errors("fetch_many")
        unreachable: set[str] = set()
        by_node = self._fetch_by_node(guard, wanted, fenced) \
            if self._cluster and len(wanted) > 1 else None
        commands: list[list[bytes | str]] = []
        if by_node is None:
            groups = self._groups(wanted)
            chunks = [[unique[i] for i in group] for group in groups]
            commands = [["MGET", *((self._fence(wanted[group[0]]),) if fenced else ()),
                         *(wanted[i] for i in group)] for group in groups]
        if by_node is not None:
            chunks, replies = by_node
        elif len(commands) == 1 and not self._cluster:
            with guard:
                replies = [self._client.execute_command(*commands[0], **_RAW)]
        else:
            replies = self._pipelined(guard, commands, **_RAW)
            for n, reply in enumerate(replies):
                if isinstance(reply, PartialOutageError) and fenced:
                    # A HOT read: the other nodes' copies still count.
                    unreachable.update(chunks[n])
                    replies[n] = [epoch, *([None] * len(chunks[n]))]
                elif isinstance(reply, BaseException):
                    with guard:
                        raise reply
        if epoch is not None:
            if any(not _same_epoch(values[0], epoch) for values in replies):
                return None
            replies = [values[1:] for values in replies]
        out: dict[str, Entry] = {}
        # The common case inline (this loop is the cost of a batch read): a
        # known encoding, no unusual flag. Anything else goes through _entry.
        unpack, names, magic, size = _HEAD.unpack_from, _NAMES, _MAGIC, HEADER_SIZE
        for chunk, values in zip(chunks, replies):
            for key, data in zip(chunk, values):
                if data is None:
                    continue
                try:
                    (head, flags, code, version, digest, size_bytes, created_at, updated_at,
                     expires_at, hot_until) = unpack(data)
                except (struct.error, TypeError):
                    head = None
                encoding = names[code] if head == magic and flags < _NO_DIGEST else None
                if encoding is None:
                    entry = self._entry(key, data)
                    if entry is not None:
                        out[key] = entry
                    continue
                metadata: Metadata = {
                    "checksum": digest.hex(), "size_bytes": size_bytes, "version": version,
                    "created_at": created_at, "updated_at": updated_at,
                    "expires_at": expires_at if flags & _EXPIRES else None,
                    "encoding": encoding,
                }
                if flags & _HOT_UNTIL:
                    metadata["hot_until"] = hot_until  # type: ignore[typeddict-unknown-key]
                out[key] = Entry(key, data[size:].decode("utf-8", "replace"), metadata)
        if unreachable:
            raise PartialOutageError(f"redis: {len(unreachable)} key(s) on cluster nodes that "
                                     "cannot be reached", unreachable, out, backend="redis")
        return out

    # A single conditional write runs its script as a plain EVALSHA: a
    # pipeline would cost it more than the script.
    def _fetch_by_node(self, guard: _Translate, wanted: list[bytes], fenced: bool
                       ) -> tuple[list[list[str]], list[list[Any]]] | None:
        """:meth:`_fetch_many`'s reads as one script call per node: each node's
        share of the records, after the epoch keys of their slots when
        ``fenced``. Returns ``(chunks of keys, replies)`` in the shape of the
        per-slot MGETs (each reply led by one epoch value when fenced), or None
        (take the per-slot path)."""
        start = len(self._value_prefix)
        epochs = self._epochs() if fenced else []
        slots = [key_slot(name) for name in wanted]
        shares: list[tuple[list[int], list[bytes]]] = []

        def argv(indexes: list[int]) -> list[bytes]:
            fences = list(dict.fromkeys(epochs[slots[i]] for i in indexes)) if fenced else []
            names = [*fences, *(wanted[i] for i in indexes)]
            shares.append((indexes, fences))
            return names

        done = self._on_each_node(guard, _LUA_GET_ALL, wanted, argv, slots, **_RAW)
        if done is None:
            return None
        chunks: list[list[str]] = []
        replies: list[list[Any]] = []
        for (indexes, fences), (_, values) in zip(shares, done):
            keys = [wanted[i][start:].decode("utf-8") for i in indexes]
            # One leading epoch value per node, as an MGET would carry it: the
            # first fence stands for all when they agree, else a mismatch.
            head = values[:len(fences)]
            lead = [head[0] if all(v == head[0] for v in head) else None] if fenced else []
            chunks.append(keys)
            replies.append([*lead, *values[len(fences):]])
        return chunks, replies

    def _conditional(self, action: str, script: Any, key: str, args: tuple[Any, ...]) -> bool:
        raw = validate_key(key).encode("utf-8")
        with self._errors(action):
            done = self._run(script, (self._value_prefix + raw,), args)
        return bool(done)

    def _store_args(self, value: str, metadata: Metadata, now: float) -> tuple[bytes, int]:
        """The ARGV of one record for the conditional store scripts."""
        return pack_record(value, metadata), self._px(metadata, now)

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        args = self._store_args(value, metadata, time.time())
        return self._conditional("store_if_newer", self._store_if_newer_script, key, args)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        validate_key(key)
        want = _version_bytes(expected)
        args = self._store_args(value, metadata, time.time())
        if want is None:
            return False  # no record has that version
        return self._conditional("store_if_version", self._store_if_version_script, key,
                                 (*args, want))

    def delete_if_version(self, key: str, version: int) -> bool:
        validate_key(key)
        want = _version_bytes(version)
        if want is None:
            return False
        return self._conditional("delete_if_version", self._delete_if_version_script, key,
                                 (want,))

    def store_many_if_newer(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        now = time.time()
        rows = [(key, self._store_args(payload, md, now)) for key, (payload, md) in items.items()]
        return self._conditional_many("store_many_if_newer", self._store_if_newer_script, rows)

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        for key in items:
            validate_key(key)
        now = time.time()
        rows: list[tuple[str, tuple[Any, ...]]] = []
        for key, (payload, md) in items.items():
            args = self._store_args(payload, md, now)
            want = _version_bytes(expected[key])
            if want is not None:
                rows.append((key, (*args, want)))
        return self._conditional_many("store_many_if_version", self._store_if_version_script,
                                      rows)

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        rows: list[tuple[str, tuple[Any, ...]]] = []
        for key, version in versions.items():
            validate_key(key)
            want = _version_bytes(version)
            if want is not None:
                rows.append((key, (want,)))
        return self._conditional_many("delete_many_if_version", self._delete_if_version_script,
                                      rows)

    def _conditional_many(
        self, action: str, script: Any, rows: Sequence[tuple[str, tuple[Any, ...]]],
        epoch: str | None = None,
    ) -> set[str]:
        """Run a conditional script once per ``(key, its ARGV)`` row, pipelined:
        PIPELINE_RECORDS calls per round trip (one, for any batch the manager
        sends). Returns the keys the script wrote or deleted.

        With ``epoch`` (a fenced script), a call that found another epoch
        answers -1 and its record is refused (:class:`_EpochChanged`).

        :raises BatchError: some calls failed; ``.failed`` names their keys,
            ``.succeeded`` the keys written or deleted (a refused key is in neither).
        """
        prefix = self._value_prefix
        fence = self._fence
        fence_args: tuple[str, ...] = () if epoch is None else (epoch,)
        moved_on = False
        done: set[str] = set()
        failed: dict[str, BaseException] = {}
        parts = list(chunked(rows, PIPELINE_RECORDS))
        for n, part in enumerate(parts):
            names = [prefix + key.encode("utf-8") for key, _ in part]
            calls: list[_Call] = [
                (script, (name, fence(name)) if fence_args else (name,), (*argv, *fence_args))
                for name, (_, argv) in zip(names, part)]
            try:
                replies = self._send(action, calls)
            except BackendError as exc:
                if not n:
                    raise  # the first round trip failed: say so as a single call would
                for later in parts[n:]:
                    failed.update((k, exc) for k, _ in later)
                break
            for (key, _), reply in zip(part, replies):
                if reply == 1:
                    done.add(key)
                elif reply == -1:
                    moved_on = True
                elif isinstance(reply, Exception):
                    failed[key] = reply
        if failed:
            raise self._batch_failed(action, failed, done)
        if moved_on:
            raise _EpochChanged
        return done

    # ------------------------------------------------------------ the HOT epoch
    # A shared HOT must never serve or take in a copy that may have missed an
    # invalidation: after a flush (FLUSHALL, or the guard's own after an
    # outage), a server restarted from an old snapshot, a failover to a
    # replica. The guard keeps an *epoch*: a random token stored under the
    # prefix and recorded, with the server's run id, in the catalog. Reads
    # fetch the epoch key with the records, copies go in only under the epoch
    # their reader checked, and a flush deletes the epoch key first. A new
    # connection to a server other than the one the guard checked deletes
    # the epoch key before it carries any command (:meth:`_on_connect`), so a
    # restored snapshot's epoch key -- the right token, on the wrong data --
    # is never believed.
    def _on_connect(self, connection: Any) -> None:
        if self.topology != "cluster":
            connection.on_connect()  # RedisCluster runs it before this hook
        trusted = self._trusted
        if not trusted:
            return
        connection.send_command("INFO", "server")
        server = _run_id(connection.read_response())
        if server in trusted:
            return
        log.warning("redis at %s: a server other than before (a restart or a failover): "
                    "its copies are not trusted until the next check", self._location)
        if self._per_slot:
            names = self._served_epochs(connection)
            if not names:
                return  # a node that serves no slot holds no epoch key
            command: tuple[Any, ...] = ("EVAL", _LUA_EPOCH_DEL, 1, names[0], "", *names[1:])
        else:
            names, command = [self._epoch_key], ("DEL", self._epoch_key)
        connection.send_command(*command)
        try:
            connection.read_response()
        except self._redis.exceptions.ResponseError as exc:  # a replica: READONLY
            raise self._redis.exceptions.ConnectionError(
                f"cannot reset the HOT epoch on a changed server ({type(exc).__name__})") from None

    def _served_epochs(self, connection: Any) -> list[bytes]:
        """The epoch keys of the slots the cluster node behind ``connection`` serves."""
        connection.send_command("CLUSTER", "MYID")
        me = _as_bytes(connection.read_response())
        connection.send_command("CLUSTER", "SLOTS")
        names = self._epochs()
        served: list[bytes] = []
        for start, end, primary, *_ in connection.read_response():
            if _as_bytes(primary[2]) == me:
                served.extend(names[int(start):int(end) + 1])
        return served

    def epoch_state(self) -> tuple[str, str | None]:
        """The servers' run ids (comma-separated: a cluster's primaries, sorted)
        and the epoch stored under the prefix (None: none, or not the same in
        every slot of a cluster)."""
        guard = self._errors("epoch")
        with guard:
            if self._cluster:
                servers = sorted(str(self._client.info("server", target_nodes=node).get("run_id"))
                                 for node in self._client.get_primaries())
            else:
                servers = [str(self._client.info("server").get("run_id", ""))]
        stored = self._on_every_epoch(guard, _LUA_EPOCH_SAME)
        first = stored[0]
        epoch = None
        if isinstance(first, bytes) and all(value == first for value in stored):
            epoch = first.decode("utf-8", "replace")
        return ",".join(servers), epoch

    def trust_server(self, server: str) -> None:
        """From now on, a new connection to a server not in ``server`` (as
        :meth:`epoch_state` gave it) resets the epoch of the slots it serves."""
        self._trusted = frozenset(server.split(","))

    def reset_epoch(self, epoch: str) -> int:
        """Flush the prefix and start ``epoch``; returns how many records went.

        The old epoch keys go first, so every fenced write still under way
        is refused from that moment, before any record is deleted.
        """
        guard = self._errors("reset_epoch")
        self._on_every_epoch(guard, _LUA_EPOCH_DEL)
        flushed = self.clear()
        self._on_every_epoch(guard, _LUA_EPOCH_SET, epoch)
        return flushed

    def fetch_record_in_epoch(self, key: str, epoch: str) -> tuple[bool, Entry | None]:
        """``(True, fetch_record(key))`` if the stored epoch is ``epoch``, else ``(False, None)``."""
        name = self._value_prefix + validate_key(key).encode("utf-8")
        with self._node_of(name, key), self._errors("fetch"):
            stored, data = self._client.execute_command("MGET", self._fence(name), name, **_RAW)
        if not _same_epoch(stored, epoch):
            return False, None
        return True, self._entry(key, data)

    def fetch_many_in_epoch(self, keys: Iterable[str], epoch: str) -> dict[str, Entry] | None:
        """``fetch_many(keys)`` if the stored epoch is ``epoch``, else None."""
        return self._fetch_many(keys, epoch)

    def store_if_newer_in_epoch(self, key: str, value: str, metadata: Metadata,
                                epoch: str) -> bool | None:
        """``store_if_newer`` if the stored epoch is ``epoch``, else None (one EVALSHA)."""
        name = self._value_prefix + validate_key(key).encode("utf-8")
        args = (*self._store_args(value, metadata, time.time()), epoch)
        with self._node_of(name, key), self._errors("store_if_newer"):
            done = self._run(self._store_if_newer_in_epoch_script, (name, self._fence(name)), args)
        return None if done == -1 else bool(done)

    def store_many_if_newer_in_epoch(self, items: Items, epoch: str) -> set[str] | None:
        """``store_many_if_newer(items)`` if the stored epoch is ``epoch``, else None
        (records sent before the epoch moved on may have gone in: whatever moved
        it flushed them, or will)."""
        for key in items:
            validate_key(key)
        now = time.time()
        rows = [(key, self._store_args(payload, md, now)) for key, (payload, md) in items.items()]
        try:
            return self._conditional_many("store_many_if_newer",
                                          self._store_if_newer_in_epoch_script, rows, epoch)
        except _EpochChanged:
            return None

    def clear(self) -> int:
        """Delete every key under this prefix (other prefixes are untouched):
        the records, the HOT epoch and the format key, which this repository
        writes again before its next command (without a flush: it knows the
        prefix holds nothing else)."""
        flushed = self._delete_prefix(self._errors("clear"))
        with self._format_lock:
            self._format_checked = False
            self._layout_flushed = True
        return flushed

    def primaries(self) -> list[str]:
        """The primaries serving the store now, as ``host:port``: every primary
        of a cluster, the Sentinels' current primary, or the one server."""
        with self._errors("primaries"):
            if self._cluster:
                return sorted(node.name for node in self._client.get_primaries())
            if self._sentinel is not None:
                host, port = self._sentinel.discover_master(self._service)
                return [f"{host}:{port}"]
        kwargs = self._client.connection_pool.connection_kwargs
        if kwargs.get("path"):
            return [str(kwargs["path"])]
        return [f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"]

    def ping(self) -> float:
        start = time.perf_counter()
        with self._errors("ping"):
            self._client.ping()
        return (time.perf_counter() - start) * 1000.0

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._owns_client:
            self._client.close()
            for sentinel in self._sentinel.sentinels if self._sentinel is not None else ():
                sentinel.close()

    @property
    def client(self) -> redis.Redis:
        """The underlying ``redis.Redis`` client (for direct access)."""
        client: redis.Redis = self._client
        return client

    def __repr__(self) -> str:
        return f"<RedisStateRepository {self._location} prefix={self.prefix!r} tier={self.tier}>"
