"""Storage backends behind one contract (documented in :mod:`.base`).

Backend classes are re-exported lazily: ``from tiered_state.repositories
import RedisStateRepository`` imports redis-py only at that moment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .base import StateRepository

if TYPE_CHECKING:
    from .filesystem_repository import FileSystemStateRepository
    from .memory_repository import MemoryStateRepository
    from .postgres_repository import PostgresStateRepository
    from .redis_repository import RedisStateRepository
    from .s3_repository import S3StateRepository
    from .sqlite_repository import SQLiteStateRepository

__all__ = [
    "FileSystemStateRepository",
    "MemoryStateRepository",
    "PostgresStateRepository",
    "RedisStateRepository",
    "S3StateRepository",
    "SQLiteStateRepository",
    "StateRepository",
]

_LAZY = {
    "MemoryStateRepository": "memory_repository",
    "RedisStateRepository": "redis_repository",
    "SQLiteStateRepository": "sqlite_repository",
    "PostgresStateRepository": "postgres_repository",
    "FileSystemStateRepository": "filesystem_repository",
    "S3StateRepository": "s3_repository",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
