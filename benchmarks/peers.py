"""What the other side of a comparison runs: values, stdlib stores, raw schemas.

Shared by the benchmark scripts so that every script stores the same values
and a raw SQLite table has one definition.
"""

from __future__ import annotations

import itertools
import json
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

#: json.dumps as a user calls it (the peers' serialisation; tiered-state's
#: codec also sorts keys and drops spaces, so its payloads are deterministic).
dumps = json.dumps
loads = json.loads


def value(i: int, salt: int = 0) -> dict[str, Any]:
    """The value stored under the i-th key; a new salt gives a different value.

    Every timed write stores a value different from the key's previous one:
    an identical rewrite would let some stores skip work.
    """
    return {"i": i, "salt": salt, "qty": 1.5 * i, "side": "buy", "note": "x" * 64}


class Values:
    """The values each side writes, built before any timing: each side cycles
    through the same lists on its own, so both store the same values and every
    write changes the key's value (an identical rewrite could be skipped)."""

    def __init__(self, n: int, variants: int = 4) -> None:
        self.pools = [[value(i, salt) for i in range(n)] for salt in range(1, variants + 1)]
        self.cycles: dict[str, Iterator[list[dict[str, Any]]]] = {}

    def next(self, side: str) -> list[dict[str, Any]]:
        """The next list of ``side``'s cycle."""
        return next(self.cycles.setdefault(side, itertools.cycle(self.pools)))


def writer(write: Callable[[str, Any], object], keys: list[str], values: Values, side: str
           ) -> Callable[[], None]:
    """A timed case: ``write(key, value)`` for every key, with ``side``'s next values."""

    def run() -> None:
        for k, v in zip(keys, values.next(side)):
            write(k, v)

    return run


def sqlite_connect(path: str | os.PathLike[str], synchronous: str = "NORMAL") -> sqlite3.Connection:
    """A sqlite3 connection set up as tiered-state's SQLite backend sets up its
    own: autocommit (one transaction per statement), WAL, ``synchronous``."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute(f"PRAGMA synchronous = {synchronous}")
    return conn


# ---------------------------------------------------------------- a plain key/value table
#: The table a user would write to keep JSON values in SQLite.
KV_SCHEMA = "CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY NOT NULL, value TEXT NOT NULL)"
KV_UPSERT = "INSERT INTO kv (key, value) VALUES (?, ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value"
KV_SELECT = "SELECT value FROM kv WHERE key = ?"


# ---------------------------------------------------------------- the library's row shape
#: A table with the ten columns of tiered-state's SQLite backend (key, payload,
#: checksum, size, version, three timestamps, expiry, encoding), for the
#: comparisons that write the same rows as the backend.
RECORD_SCHEMA = """
CREATE TABLE IF NOT EXISTS raw (
    key TEXT PRIMARY KEY NOT NULL, payload TEXT NOT NULL, checksum TEXT NOT NULL,
    size_bytes INTEGER NOT NULL, version INTEGER NOT NULL, created_at REAL NOT NULL,
    updated_at REAL NOT NULL, last_accessed REAL NOT NULL, expires_at REAL, encoding TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS raw_expires ON raw (expires_at, key) WHERE expires_at IS NOT NULL;
"""
RECORD_UPSERT = (
    "INSERT INTO raw (key, payload, checksum, size_bytes, version, created_at, updated_at,"
    " last_accessed, expires_at, encoding) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT(key) DO UPDATE SET"
    " payload=excluded.payload, checksum=excluded.checksum, size_bytes=excluded.size_bytes,"
    " version=excluded.version, created_at=excluded.created_at, updated_at=excluded.updated_at,"
    " last_accessed=excluded.last_accessed, expires_at=excluded.expires_at, encoding=excluded.encoding"
)
RECORD_SELECT = "SELECT payload, checksum, expires_at FROM raw WHERE key = ?"


def record_params(key: str, payload: str, md: Any) -> tuple[Any, ...]:
    """RECORD_UPSERT's parameters for a payload and its metadata."""
    return (key, payload, md["checksum"], md["size_bytes"], md["version"], md["created_at"],
            md["updated_at"], md["updated_at"], md["expires_at"], md["encoding"])


# ---------------------------------------------------------------- plain files
class Files:
    """One file per key, written durably: temporary file, fsync, rename, fsync
    of the folder -- what tiered-state's file backend does by default."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True)
        self.fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)

    def write(self, key: str, text: str) -> None:
        tmp = self.root / (".tmp-" + key)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, text.encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, self.root / key)
        os.fsync(self.fd)

    def read(self, key: str) -> bytes:
        with open(self.root / key, "rb") as handle:
            return handle.read()

    def close(self) -> None:
        os.close(self.fd)
