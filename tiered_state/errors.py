"""The exceptions tiered-state raises.

Every error derives from :class:`TieredStateError`, so one ``except`` clause
catches them all::

    TieredStateError
    ├── ConfigurationError (also ValueError)   bad URL, unknown scheme, bad option
    │   ├── MissingDependencyError (also ImportError)
    │   └── StoreFormatError                   the store needs `tiered-state upgrade`
    ├── InvalidKeyError (also ValueError)
    ├── SerializationError (also TypeError)
    ├── ValueTypeError (also TypeError)        incr of a value that is not a number
    ├── IntegrityError                         checksum mismatch, no valid copy left
    ├── ConflictError                          if_version did not match
    ├── ClosedError                            a call on a closed StateManager
    └── BackendError                           .backend, __cause__ = driver error
        ├── BackendUnavailableError            connect / timeout: the manager may skip the tier
        │   └── PartialOutageError             some of its servers only (a cluster node)
        └── BatchError                         .failed: {key: exception}

Driver exceptions never leave a repository raw: each backend translates them in
one place into :class:`BackendError` or :class:`BackendUnavailableError`, with
the driver's exception kept as ``__cause__``. Messages never contain values or
passwords.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "BatchError",
    "ClosedError",
    "ConfigurationError",
    "ConflictError",
    "IntegrityError",
    "InvalidKeyError",
    "MissingDependencyError",
    "PartialOutageError",
    "SerializationError",
    "StoreFormatError",
    "TieredStateError",
    "ValueTypeError",
]


class TieredStateError(Exception):
    """Base class of every error raised by tiered-state."""


class ConfigurationError(TieredStateError, ValueError):
    """A URL, scheme or option is wrong."""


class MissingDependencyError(ConfigurationError, ImportError):
    """A backend's driver is not installed; the message names the extra."""

    def __init__(self, package: str, extra: str) -> None:
        self.package = package
        self.extra = extra
        super().__init__(
            f"the {package!r} package is required for this backend: "
            f"pip install 'tiered-state[{extra}]'"
        )


class StoreFormatError(ConfigurationError):
    """The store is in a format this version does not open as it is.

    :ivar found: the format the store records (None: written by 0.1, which
        recorded none).
    """

    def __init__(self, message: str, found: int | None = None) -> None:
        super().__init__(message)
        self.found = found


class InvalidKeyError(TieredStateError, ValueError):
    """A key is not a str of 1..1024 UTF-8 bytes free of control characters."""


class SerializationError(TieredStateError, TypeError):
    """A value cannot be encoded (or a stored payload cannot be decoded)."""


class ValueTypeError(TieredStateError, TypeError):
    """A stored value is not of the type an operation needs (``incr`` of a string)."""


class IntegrityError(TieredStateError):
    """A stored copy failed its checksum and no valid copy was left."""

    def __init__(self, message: str, key: str | None = None) -> None:
        super().__init__(message)
        self.key = key


class ConflictError(TieredStateError):
    """``if_version`` did not match the stored version."""

    def __init__(self, key: str, expected: int, actual: int) -> None:
        super().__init__(
            f"version conflict on {key!r}: expected {expected}, found {actual}"
        )
        self.key = key
        self.expected = expected
        self.actual = actual


class ClosedError(TieredStateError):
    """A call on a :class:`~tiered_state.StateManager` after its ``close()``."""


class BackendError(TieredStateError):
    """A backend operation failed; ``__cause__`` holds the driver's error."""

    def __init__(self, message: str, backend: str = "") -> None:
        super().__init__(f"{backend}: {message}" if backend else message)
        self.backend = backend


class BackendUnavailableError(BackendError):
    """The backend cannot be reached (connect failure, timeout, lost connection)."""


class PartialOutageError(BackendUnavailableError):
    """Some of a backend's servers cannot be reached -- a Redis Cluster
    primary -- so the keys they hold failed; the others were answered.

    :ivar keys: the keys that could not be reached.
    :ivar found: what a read found among the other keys (key -> entry).
    """

    def __init__(self, message: str, keys: Iterable[str] = (), found: Mapping[str, Any] | None = None,
                 backend: str = "") -> None:
        super().__init__(message, backend)
        self.keys: set[str] = set(keys)
        self.found: dict[str, Any] = dict(found or {})


class BatchError(BackendError):
    """Part of a batch failed.

    :ivar failed: ``{key: exception}`` for every key that was not handled.
    :ivar succeeded: the keys that were handled before or despite the failure.
    """

    def __init__(
        self,
        message: str,
        failed: Mapping[str, BaseException],
        succeeded: Iterable[str] = (),
        backend: str = "",
    ) -> None:
        super().__init__(f"{message} ({len(failed)} failed)", backend)
        self.failed: dict[str, BaseException] = dict(failed)
        self.succeeded: list[str] = list(succeeded)
