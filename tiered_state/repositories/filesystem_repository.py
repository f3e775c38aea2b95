"""``file:///path`` -- one file per key under a folder (the embedded COLD tier).

URL: ``file:///var/lib/app/cold`` (absolute) or ``file://cold`` /
``file://./cold`` (relative to the working directory): everything after
``file://`` is the path, percent-decoded. Query options:

``fsync``           ``true`` (default): fsync each file and its folder, so a
                    stored record survives a power loss; ``false`` skips both
``compress_above``  payloads larger than this many bytes are zlib-compressed
                    on disk (default 1024; ``none`` never compresses)
``compress_level``  zlib level 1..9 (default 6)

Layout: ``<root>/<fan>/<name>``. ``<fan>`` is two hex digits of the key's
SHA-256, so no folder grows past 1/256 of the keys. ``<name>`` is the key's
UTF-8 bytes with everything but ``a-z 0-9 _ -`` and a non-leading ``.``
percent-encoded (upper case too, so case-insensitive file systems cannot
merge two keys); a name that would exceed 200 bytes becomes ``~`` + the
key's SHA-256 instead, and the key is read back from the file. No name can be
``.``, ``..`` or contain ``/``, so no key reaches outside its fan-out folder.

File format: one line of JSON (the key, the metadata, ``body``: ``json`` or
``json+zlib``, and ``meta``: the SHA-256 of all of these, see
:func:`tiered_state.record.metadata_checksum`), a newline, then the payload
bytes. Metadata is returned as it was stored (``encoding`` is a value's
codec, ``json``, ``typed-json``..., or ``stub`` / ``tombstone``); ``body``
only says how the bytes on disk are packed. The payload's own checksum
covers the payload only, so ``meta`` is what keeps a damaged header from passing a wrong
version, expiry or key off as true: a header that does not parse, lacks a
field, has a field of the wrong type or fails ``meta`` makes the read raise
``IntegrityError`` (listings skip the file with a warning). Files written
before ``meta`` existed (the same header without it) are read as they are.
A compressed body is never inflated past the recorded ``size_bytes`` plus
:data:`~tiered_state.record.INFLATE_MARGIN` (a decompression bomb is an
``IntegrityError``, not an exhausted memory).

Values, stubs and tombstones are all stored this way, verbatim (a tombstone
is a header and an empty body); only :meth:`~FileSystemStateRepository.fetch`,
the listings and ``stats`` tell the kinds apart, from the header.

Writes go to ``.tmp-*`` in the same folder, are fsynced, renamed over the
target with ``os.replace`` and the folder is fsynced: a reader sees the old or
the new file, never half of one, and a crash leaves at most a ``.tmp-*``
file, which is never listed as a key (names starting with ``.`` are not
keys). Writers (also in other processes) serialise per key on
``fcntl`` byte-range locks of ``<root>/.lock``, which makes the conditional
writes atomic; a conditional write reads only the stored file's header under
the lock. The batch forms (``store_many_if_newer``, ``store_many_if_version``,
``delete_many_if_version``) take the same per-key lock for each key in turn,
never two at once, and fsync each folder once per batch. Files are created
0600 and folders 0700; paths are opened relative to the root's descriptor
with ``O_NOFOLLOW``, so a symlink planted in the tree is never followed.
POSIX only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from urllib.parse import unquote

from .. import codec
from ..config import parse_bool, parse_number, query_options, unknown_options
from ..errors import BackendError, BackendUnavailableError, ConfigurationError, IntegrityError
from ..keys import compile_pattern, is_literal, literal_prefix, validate_key, validate_pattern
from ..record import (
    TOMBSTONE,
    Entry,
    Metadata,
    body_text,
    live_value,
    metadata_checksum,
    stored_metadata,
)
from ..segments import SegmentStore, is_segment_name
from .base import Items, StateRepository

__all__ = ["FileSystemStateRepository"]

log = logging.getLogger(__name__)

_SAFE = frozenset(b"abcdefghijklmnopqrstuvwxyz0123456789_-.")
_MAX_NAME = 200  # bytes; file systems allow 255, temp names add a suffix
_STRIPES = 64  # lock stripes: writers of different keys rarely wait for each other
#: The URL's query options (see the module docstring).
_OPTIONS = frozenset({"fsync", "compress_above", "compress_level"})
_HEADER_READ = 4096
_FANS = tuple(f"{i:02x}" for i in range(256))
_UNAVAILABLE = {
    errno.EIO, errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.ESTALE,
    errno.EACCES, errno.EPERM, errno.ENOTCONN, errno.ETIMEDOUT, errno.ENOENT,
}
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)

#: The header of a stored file (the metadata, ``key``, ``body`` and ``meta``),
#: checked by :meth:`FileSystemStateRepository._parse_header`.
Header = dict[str, Any]
#: The fields of a header; ``meta`` (the metadata checksum) is absent in files
#: written before it existed.
_FIELDS = frozenset({"key", "checksum", "size_bytes", "version", "created_at", "updated_at",
                     "expires_at", "encoding", "body"})
_FIELDS_WITH_DIGEST = _FIELDS | {"meta"}
_PACKINGS = (codec.ENCODING, codec.ZLIB_ENCODING)
#: A conditional write's test, on the header of what is stored (None: nothing).
Condition = Callable[[Header | None], bool]


def encode_name(key: str) -> str:
    """The file name of ``key`` (see the module docstring); reversible unless it starts with ``~``."""
    data = key.encode("utf-8")
    out = []
    for i, byte in enumerate(data):
        if byte in _SAFE and not (byte == 0x2E and i == 0):
            out.append(chr(byte))
        else:
            out.append(f"%{byte:02X}")
    name = "".join(out)
    if len(name) > _MAX_NAME:
        return "~" + hashlib.sha256(data).hexdigest()
    return name


def decode_name(name: str) -> str | None:
    """The key a file name stands for; None for hashed names (read the file)."""
    if name.startswith("~"):
        return None
    return unquote(name, errors="strict")


def _locate(key: str) -> tuple[str, str, int]:
    """(fan-out folder, file name, lock stripe) of ``key``; the same in every process."""
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return f"{digest[0]:02x}", encode_name(key), digest[1] % _STRIPES


def _live(header: Header, now: float) -> bool:
    """True for an unexpired value or stub (see "Entries" in the contract)."""
    expires_at = header["expires_at"]
    return header["encoding"] != TOMBSTONE and (expires_at is None or expires_at > now)


def _if_newer(version: int) -> Condition:
    """store_if_newer's test: the stored version is below ``version``."""
    return lambda header: header is None or header["version"] < version


def _if_version(version: int, expected: int) -> Condition:
    """store_if_version's test: the live version is ``expected`` and the stored
    one is at most ``version``."""

    def condition(header: Header | None) -> bool:
        if header is None:
            return expected == 0
        live = header["version"] if _live(header, time.time()) else 0
        return live == expected and header["version"] <= version

    return condition


class FileSystemStateRepository(StateRepository):
    """One file per key under ``root``.

    :param root: the folder (created 0700 if missing).
    :param fsync: fsync files and folders on every write (default True).
    :param compress_above: zlib-compress payloads above this many bytes (None: never).
    :param compress_level: zlib level.
    """

    backend = "filesystem"

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        fsync: bool = True,
        compress_above: int | None = 1024,
        compress_level: int = 6,
    ) -> None:
        root = os.fspath(root)
        if not root:
            raise ConfigurationError("file:// needs a folder path")
        if compress_above is not None and (not isinstance(compress_above, int) or compress_above < 0):
            raise ConfigurationError("compress_above must be an int >= 0 or None")
        if not isinstance(compress_level, int) or not 0 <= compress_level <= 9:
            raise ConfigurationError("compress_level must be an int in 0..9")
        self.root = os.path.abspath(root)
        self.fsync = bool(fsync)
        self.compress_above = compress_above
        self.compress_level = compress_level
        self._state_lock = threading.Lock()
        self._root_fd: int | None = None
        self._lock_fd: int | None = None
        self._pid = -1
        self._stripes = [threading.Lock() for _ in range(_STRIPES)]

    @classmethod
    def from_url(cls, url: str, **options: Any) -> FileSystemStateRepository:
        _, query = query_options(url)
        query.update(options)
        unknown = set(query) - _OPTIONS
        if unknown:
            raise unknown_options("file", unknown, _OPTIONS)
        rest = url.split("?", 1)[0].partition("://")[2]
        path = unquote(rest)
        if not path:
            raise ConfigurationError("file URL must be file:///absolute/path or file://relative/path")
        kwargs: dict[str, Any] = {}
        if "fsync" in query:
            kwargs["fsync"] = parse_bool(query["fsync"], "fsync")
        if "compress_above" in query:
            above = parse_number(query["compress_above"], "compress_above")
            kwargs["compress_above"] = None if above is None else int(above)
        if "compress_level" in query:
            level = parse_number(query["compress_level"], "compress_level")
            kwargs["compress_level"] = 6 if level is None else int(level)
        return cls(path, **kwargs)

    # ------------------------------------------------------------ plumbing
    @contextlib.contextmanager
    def _errors(self) -> Iterator[None]:
        """The one place OS errors become tiered-state errors."""
        try:
            yield
        except OSError as exc:
            kind = BackendUnavailableError if exc.errno in _UNAVAILABLE else BackendError
            if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                message = "refusing to follow a symlink or non-folder inside the store"
            else:
                message = f"{type(exc).__name__}: {os.strerror(exc.errno or 0)}"
            raise kind(f"{message} ({self.root})", self.backend) from exc

    def _fds(self) -> tuple[int, int]:
        """(root folder fd, lock file fd), opened once per process."""
        root_fd, lock_fd = self._root_fd, self._lock_fd
        if root_fd is not None and lock_fd is not None and self._pid == os.getpid():
            return root_fd, lock_fd
        with self._state_lock:
            if self._pid != os.getpid():
                # After fork: the inherited descriptors still work (byte-range
                # locks belong to the process, so the child's are its own),
                # but a stripe lock held by a thread that did not survive the
                # fork would never be released.
                self._stripes = [threading.Lock() for _ in range(_STRIPES)]
            if self._root_fd is None:
                os.makedirs(self.root, mode=0o700, exist_ok=True)
                self._root_fd = os.open(self.root, _DIR_FLAGS & ~os.O_NOFOLLOW)
            if self._lock_fd is None:
                self._lock_fd = os.open(
                    ".lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                    dir_fd=self._root_fd,
                )
            self._pid = os.getpid()
            return self._root_fd, self._lock_fd

    @contextlib.contextmanager
    def _key_lock(self, stripe: int) -> Iterator[None]:
        _, lock_fd = self._fds()
        with self._stripes[stripe]:
            while True:
                try:
                    fcntl.lockf(lock_fd, fcntl.LOCK_EX, 1, stripe)
                    break
                except OSError as exc:
                    if exc.errno != errno.EDEADLK:
                        raise
                    # POSIX record locks belong to processes, not threads: a
                    # thread of A waiting for B while a thread of B waits for
                    # A looks like a deadlock to the kernel though none exists
                    # (a thread holds one stripe at most). Back off, retry.
                    time.sleep(0.0005 + secrets.randbelow(5000) / 1e6)
            try:
                yield
            finally:
                fcntl.lockf(lock_fd, fcntl.LOCK_UN, 1, stripe)

    def _open_fan(self, fan: str, create: bool) -> int | None:
        root_fd, _ = self._fds()
        try:
            return os.open(fan, _DIR_FLAGS, dir_fd=root_fd)
        except FileNotFoundError:
            if not create:
                return None
        with contextlib.suppress(FileExistsError):
            os.mkdir(fan, 0o700, dir_fd=root_fd)
        return os.open(fan, _DIR_FLAGS, dir_fd=root_fd)

    def _encode_file(self, key: str, value: str, metadata: Metadata) -> bytes:
        body = value.encode("utf-8")
        packing = codec.ENCODING
        if self.compress_above is not None and len(body) > self.compress_above:
            body = codec.compress(value, self.compress_level)
            packing = codec.ZLIB_ENCODING
        header = {
            "key": key,
            "checksum": metadata["checksum"],
            "size_bytes": metadata["size_bytes"],
            "version": metadata["version"],
            "created_at": metadata["created_at"],
            "updated_at": metadata["updated_at"],
            "expires_at": metadata["expires_at"],
            "encoding": metadata["encoding"],
            "body": packing,
            "meta": metadata_checksum(key, metadata, packing),
        }
        return json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8") + b"\n" + body

    @staticmethod
    def _parse_header(key: str | None, data: bytes) -> tuple[Header, int]:
        """The checked header of a stored file, and where its body starts.

        The one place a header is trusted: exactly the fields this module
        writes, each of its type, and the metadata checksum ``meta`` matching
        (when the file has one). ``key`` (None for a hashed name being listed)
        only names the file in the error.

        :raises IntegrityError: anything else -- never a KeyError or a
            TypeError from a damaged header further on.
        """
        end = data.find(b"\n")
        try:
            if end < 0:
                raise ValueError("no header line")
            header = json.loads(data[:end])
            if not isinstance(header, dict) or header.keys() not in (_FIELDS, _FIELDS_WITH_DIGEST):
                raise ValueError("not a header")
            stored_key, packing, digest = header["key"], header["body"], header.get("meta", None)
            if not isinstance(stored_key, str) or packing not in _PACKINGS \
                    or not isinstance(digest, (str, type(None))):
                raise ValueError("not a header")
            stored_metadata(stored_key, header, digest, packing)
        except (ValueError, IntegrityError) as exc:  # JSON and UTF-8 errors are ValueErrors
            raise IntegrityError(f"filesystem: unreadable file for {key!r}", key) from exc
        return header, end + 1

    def _read(self, fan_fd: int, name: str, limit: int | None = None) -> bytes | None:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=fan_fd)
        except FileNotFoundError:
            return None
        try:
            if limit is not None:
                return os.read(fd, limit)
            # Plain reads up to an empty one: a buffered file object would add
            # an ioctl, two lseeks and an fstat to every fetch.
            parts = [os.read(fd, os.fstat(fd).st_size + 1)]
            while parts[-1]:  # until EOF, in case the file is not what fstat said
                parts.append(os.read(fd, 1 << 16))
            return parts[0] if len(parts) <= 2 else b"".join(parts)
        finally:
            os.close(fd)

    def _load(self, key: str, fan_fd: int, name: str) -> Entry | None:
        data = self._read(fan_fd, name)
        if data is None:
            return None
        header, start = self._parse_header(key, data)
        if header["key"] != key:
            return None  # a hashed name's (astronomically unlikely) collision
        payload = body_text(data[start:], header["body"] == codec.ZLIB_ENCODING,
                            header["size_bytes"], key)
        metadata: Metadata = {
            "checksum": header["checksum"],
            "size_bytes": header["size_bytes"],
            "version": header["version"],
            "created_at": header["created_at"],
            "updated_at": header["updated_at"],
            "expires_at": header["expires_at"],
            "encoding": header["encoding"],
        }
        return Entry(key, payload, metadata)

    def _read_header(self, fan_fd: int, name: str, key: str | None) -> Header | None:
        """The header of file ``name``, or None if there is no such file.

        :raises IntegrityError: the header cannot be parsed.
        """
        data = self._read(fan_fd, name, _HEADER_READ)
        if data is None:
            return None
        if b"\n" not in data:  # a header longer than one read (huge key)
            data = self._read(fan_fd, name)
            if data is None:
                return None
        header, _ = self._parse_header(key, data)
        return header

    def _stored(self, fan_fd: int, name: str, key: str) -> Header | None:
        """The header of ``key``'s file, for a conditional write to test.

        Only the header: a condition needs the version and expiry, and reading
        (and inflating) a large body under the lock would only hold it longer.
        """
        header = self._read_header(fan_fd, name, key)
        if header is None or header["key"] != key:
            return None  # absent, or a hashed name's (astronomically unlikely) collision
        return header

    def _write_temp(self, fan_fd: int, data: bytes) -> str:
        tmp = f".tmp-{secrets.token_hex(8)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=fan_fd)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            if self.fsync:
                os.fsync(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=fan_fd)
            raise
        os.close(fd)
        return tmp

    def _put_locked(
        self, fan_fd: int, key: str, name: str, stripe: int, data: bytes,
        condition: Condition | None,
    ) -> bool:
        """Write ``data`` as ``key``'s file if ``condition`` holds: the one write
        routine of every store, single or batch. The folder is not fsynced."""
        # The temp file is written and fsynced before the lock, so the lock is
        # held for one header read and one rename, not for a disk flush.
        tmp = self._write_temp(fan_fd, data)
        installed = False
        try:
            with self._key_lock(stripe):
                if condition is None or condition(self._stored(fan_fd, name, key)):
                    # rename replaces a planted symlink itself, never its target
                    os.replace(tmp, name, src_dir_fd=fan_fd, dst_dir_fd=fan_fd)
                    installed = True
        finally:
            if not installed:  # refused, or the lock, read or rename failed
                with contextlib.suppress(OSError):
                    os.unlink(tmp, dir_fd=fan_fd)
        return installed

    def _unlink_locked(
        self, fan_fd: int, key: str, name: str, stripe: int, version: int | None
    ) -> bool:
        """Delete ``key``'s file (if its stored version is ``version``, unless
        None): the one delete routine. The folder is not fsynced."""
        with self._key_lock(stripe):
            if version is not None:
                header = self._stored(fan_fd, name, key)
                if header is None or header["version"] != version:
                    return False
            try:
                os.unlink(name, dir_fd=fan_fd)
            except FileNotFoundError:
                return False
        return True

    def _sync_dir(self, fan_fd: int) -> None:
        if self.fsync:
            os.fsync(fan_fd)

    # ------------------------------------------------------------ the contract
    def fetch_record(self, key: str) -> Entry | None:
        validate_key(key)
        fan, name, _ = _locate(key)
        with self._errors():
            fan_fd = self._open_fan(fan, create=False)
            if fan_fd is None:
                return None
            try:
                return self._load(key, fan_fd, name)
            finally:
                os.close(fan_fd)

    def fetch(self, key: str) -> Any | None:
        return live_value(self.fetch_record(key))

    def fetch_many(self, keys: Iterable[str]) -> dict[str, Entry]:
        keys = [validate_key(k) for k in keys]
        out: dict[str, Entry] = {}
        unreadable: dict[str, BaseException] = {}
        for key in keys:
            try:
                entry = self.fetch_record(key)
            except IntegrityError as exc:
                unreadable[key] = exc  # the other keys are still read
                continue
            if entry is not None:
                out[key] = entry
        if unreadable:
            raise self._batch_failed("fetch_many", unreadable, out)
        return out

    def _store_one(self, key: str, value: str, metadata: Metadata, condition: Condition | None) -> bool:
        fan, name, stripe = _locate(key)
        data = self._encode_file(key, value, metadata)
        with self._errors():
            fan_fd = self._open_fan(fan, create=True)
            assert fan_fd is not None
            try:
                if not self._put_locked(fan_fd, key, name, stripe, data, condition):
                    return False
                self._sync_dir(fan_fd)
            finally:
                os.close(fan_fd)
        return True

    def _batch(
        self, action: str, keys: Iterable[str], op: Callable[[int, str, str, int], bool], *,
        create: bool,
    ) -> list[str]:
        """Run ``op(fan fd, key, name, stripe)`` for every key; the keys it did.

        The one routine of every batch write. Grouped by fan-out folder: each
        folder is opened once and fsynced once, after its group, instead of
        once per key. A key that fails is reported in a BatchError while the
        others go ahead.
        """
        groups: dict[str, list[tuple[str, str, int]]] = {}
        for key in keys:
            fan, name, stripe = _locate(key)
            groups.setdefault(fan, []).append((key, name, stripe))
        succeeded: list[str] = []
        failed: dict[str, BaseException] = {}
        for fan, group in groups.items():
            done: list[str] = []
            try:
                with self._errors():
                    fan_fd = self._open_fan(fan, create=create)
                    if fan_fd is None:
                        continue  # no folder, so none of these keys exists
                    try:
                        for key, name, stripe in group:
                            try:
                                with self._errors():
                                    if op(fan_fd, key, name, stripe):
                                        done.append(key)
                            except (BackendError, IntegrityError) as exc:
                                failed[key] = exc
                        if done:
                            self._sync_dir(fan_fd)
                    finally:
                        os.close(fan_fd)
            except BackendError as exc:
                # The folder could not be opened or fsynced: nothing done in
                # it is known to be durable.
                failed.update((key, exc) for key, *_ in group if key not in failed)
                continue
            succeeded.extend(done)
        if failed:
            raise self._batch_failed(action, failed, succeeded)
        return succeeded

    def _store_batch(
        self, action: str, items: Items, conditions: Mapping[str, Condition] | None
    ) -> set[str]:
        # Encoded before any I/O, so an item that cannot be encoded touches nothing.
        files = {key: self._encode_file(key, value, metadata)
                 for key, (value, metadata) in items.items()}

        def put(fan_fd: int, key: str, name: str, stripe: int) -> bool:
            condition = None if conditions is None else conditions[key]
            return self._put_locked(fan_fd, key, name, stripe, files[key], condition)

        return set(self._batch(action, files, put, create=True))

    def store(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        return self._store_one(key, value, metadata, None)

    def store_if_version(self, key: str, value: str, metadata: Metadata, expected: int) -> bool:
        validate_key(key)
        return self._store_one(key, value, metadata, _if_version(metadata["version"], expected))

    def store_if_newer(self, key: str, value: str, metadata: Metadata) -> bool:
        validate_key(key)
        return self._store_one(key, value, metadata, _if_newer(metadata["version"]))

    def store_many(self, items: Items) -> set[str]:
        for key in items:
            validate_key(key)
        return self._store_batch("store_many", items, None)

    def store_many_if_newer(self, items: Items) -> set[str]:
        conditions = {validate_key(k): _if_newer(m["version"]) for k, (_, m) in items.items()}
        return self._store_batch("store_many_if_newer", items, conditions)

    def store_many_if_version(self, items: Items, expected: Mapping[str, int]) -> set[str]:
        conditions = {
            validate_key(k): _if_version(m["version"], expected[k]) for k, (_, m) in items.items()
        }
        return self._store_batch("store_many_if_version", items, conditions)

    def _delete_one(self, key: str, version: int | None) -> bool:
        fan, name, stripe = _locate(key)
        with self._errors():
            fan_fd = self._open_fan(fan, create=False)
            if fan_fd is None:
                return False
            try:
                if not self._unlink_locked(fan_fd, key, name, stripe, version):
                    return False
                self._sync_dir(fan_fd)
            finally:
                os.close(fan_fd)
        return True

    def delete(self, key: str) -> bool:
        validate_key(key)
        return self._delete_one(key, None)

    def delete_if_version(self, key: str, version: int) -> bool:
        validate_key(key)
        return self._delete_one(key, version)

    def _delete_batch(self, action: str, versions: Mapping[str, int | None]) -> list[str]:
        def unlink(fan_fd: int, key: str, name: str, stripe: int) -> bool:
            return self._unlink_locked(fan_fd, key, name, stripe, versions[key])

        return self._batch(action, versions, unlink, create=False)

    def delete_many(self, keys: Iterable[str]) -> int:
        unique: dict[str, int | None] = dict.fromkeys(validate_key(k) for k in keys)
        return len(self._delete_batch("delete_many", unique))

    def delete_many_if_version(self, versions: Mapping[str, int]) -> set[str]:
        for key in versions:
            validate_key(key)
        return set(self._delete_batch("delete_many_if_version", versions))

    # ------------------------------------------------------------ listing
    def _walk(self) -> Iterator[tuple[int, str, str | None]]:
        """(fan fd, file name, key or None if hashed) of every stored file, streamed."""
        with self._errors():
            for fan in _FANS:
                try:
                    fan_fd = self._open_fan(fan, create=False)
                except OSError as exc:
                    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
                        raise
                    log.warning("filesystem: skipping %s in %s: not a folder", fan, self.root)
                    continue
                if fan_fd is None:
                    continue
                try:
                    with os.scandir(fan_fd) as entries:
                        for item in entries:
                            name = item.name
                            # .tmp-* leftovers of a crash are never keys
                            if name.startswith(".") or not item.is_file(follow_symlinks=False):
                                continue
                            try:
                                key = decode_name(name)
                            except UnicodeDecodeError:
                                continue  # not a name this repository wrote
                            yield fan_fd, name, key
                finally:
                    os.close(fan_fd)

    def _header(self, fan_fd: int, name: str, key: str | None) -> Header | None:
        """The header of a listed file; None (with a warning) if it is unreadable."""
        try:
            header = self._read_header(fan_fd, name, key)
        except IntegrityError:
            log.warning("filesystem: skipping unreadable file %s in %s", name, self.root)
            return None
        if header is not None and key is not None and header["key"] != key:
            return None
        return header

    def _iter(self, pattern: str, live: bool) -> Iterator[str]:
        validate_pattern(pattern)
        if is_literal(pattern):
            key = literal_prefix(pattern)
            fan, name, _ = _locate(key)
            with self._errors():
                fan_fd = self._open_fan(fan, create=False)
                if fan_fd is None:
                    return
                try:
                    header = self._header(fan_fd, name, key)
                finally:
                    os.close(fan_fd)
            if header is not None and not (live and not _live(header, time.time())):
                yield key
            return
        match = compile_pattern(pattern).match
        now = time.time()
        for fan_fd, name, named in self._walk():
            if named is not None and not match(named):
                continue
            if named is not None and not live:
                yield named
                continue
            header = self._header(fan_fd, name, named)
            if header is None:
                continue
            found = header["key"]
            if named is None and not match(found):
                continue
            if live and not _live(header, now):
                continue
            yield found

    def keys(self, pattern: str = "*") -> list[str]:
        return list(self._iter(pattern, live=True))

    def iter_keys(self, pattern: str = "*") -> Iterator[str]:
        return self._iter(pattern, live=True)

    def iter_all_keys(self) -> Iterator[str]:
        # One folder at a time with os.scandir, so memory stays bounded however
        # many files there are; only hashed names cost a header read. The
        # generic clear() deletes in chunks while this walk goes on, which is
        # safe: a name already listed is ours to remove, and each folder is
        # listed once.
        return self._iter("*", live=False)

    def stats(self) -> dict[str, Any]:
        live = expired = tombstones = files_bytes = 0
        now = time.time()
        for fan_fd, name, key in self._walk():
            header = self._header(fan_fd, name, key)
            if header is None:
                continue
            if _live(header, now):
                live += 1
            elif header["encoding"] == TOMBSTONE:
                tombstones += 1
            else:
                expired += 1
            with contextlib.suppress(OSError):
                files_bytes += os.stat(name, dir_fd=fan_fd, follow_symlinks=False).st_size
        return {
            "backend": self.backend,
            "tier": str(self.tier) if self.tier else None,
            "key_count": live,
            "expired_count": expired,
            "tombstone_count": tombstones,
            "file_bytes": files_bytes,
            "root": self.root,
            "fsync": self.fsync,
            "compress_above": self.compress_above,
        }

    def close(self) -> None:
        with self._state_lock:
            fds = [fd for fd in (self._root_fd, self._lock_fd) if fd is not None]
            self._root_fd = self._lock_fd = None
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)

    def segments(self) -> SegmentStore:
        return _FileSegments(self)

    def __repr__(self) -> str:
        return f"<FileSystemStateRepository {self.root!r} tier={self.tier}>"


class _FileSegments:
    """Segments (:mod:`tiered_state.segments`) as files in ``<root>/segments``:
    a name no fan-out folder has, so segments are never listed as keys.

    Written like records (a fsynced ``.tmp-*`` renamed into place, the folder
    fsynced), read with ``pread`` of the span a stub names, opened relative
    to the folder's descriptor with ``O_NOFOLLOW``.
    """

    _FOLDER = "segments"

    def __init__(self, repo: FileSystemStateRepository) -> None:
        self._repo = repo

    def _folder(self, create: bool) -> int | None:
        root_fd, _ = self._repo._fds()
        try:
            return os.open(self._FOLDER, _DIR_FLAGS, dir_fd=root_fd)
        except FileNotFoundError:
            if not create:
                return None
        with contextlib.suppress(FileExistsError):
            os.mkdir(self._FOLDER, 0o700, dir_fd=root_fd)
        return os.open(self._FOLDER, _DIR_FLAGS, dir_fd=root_fd)

    def put(self, name: str, data: bytes) -> None:
        _checked(name)
        repo = self._repo
        with repo._errors():
            folder = self._folder(create=True)
            assert folder is not None
            try:
                tmp = repo._write_temp(folder, data)
                os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
                repo._sync_dir(folder)
            finally:
                os.close(folder)

    def read(self, name: str, offset: int, length: int) -> bytes | None:
        return self.read_many([(name, offset, length)])[0]

    def read_many(self, spans: list[tuple[str, int, int]]) -> list[bytes | None]:
        out: list[bytes | None] = []
        with self._repo._errors():
            folder = self._folder(create=False)
            if folder is None:
                return [None] * len(spans)
            try:
                for name, offset, length in spans:
                    out.append(self._pread(folder, _checked(name), offset, length))
            finally:
                os.close(folder)
        return out

    def read_tail(self, name: str, length: int) -> bytes | None:
        with self._repo._errors():
            folder = self._folder(create=False)
            if folder is None:
                return None
            try:
                return self._pread(folder, _checked(name), -length, length)
            finally:
                os.close(folder)

    @staticmethod
    def _pread(folder: int, name: str, offset: int, length: int) -> bytes | None:
        """``length`` bytes at ``offset`` (negative: from the end) of segment ``name``."""
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=folder)
        except FileNotFoundError:
            return None
        try:
            if offset < 0:
                offset = max(os.fstat(fd).st_size + offset, 0)
            parts = []
            while length > 0:
                part = os.pread(fd, length, offset)
                if not part:
                    break
                parts.append(part)
                offset += len(part)
                length -= len(part)
            return b"".join(parts)
        finally:
            os.close(fd)

    def delete(self, name: str) -> None:
        with self._repo._errors():
            folder = self._folder(create=False)
            if folder is None:
                return
            try:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(_checked(name), dir_fd=folder)
            finally:
                os.close(folder)

    def list(self) -> Iterator[tuple[str, int]]:
        with self._repo._errors():
            folder = self._folder(create=False)
            if folder is None:
                return
            try:
                with os.scandir(folder) as entries:
                    for item in entries:
                        if is_segment_name(item.name) and item.is_file(follow_symlinks=False):
                            yield item.name, item.stat(follow_symlinks=False).st_size
            finally:
                os.close(folder)


def _checked(name: str) -> str:
    """``name`` if it is a segment name: nothing else is ever opened in the folder."""
    if not is_segment_name(name):
        raise IntegrityError(f"not a segment name: {name!r}")
    return name
