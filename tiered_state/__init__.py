"""tiered-state: application state across HOT, WARM and COLD storage tiers."""

from __future__ import annotations

from .errors import (
    BackendError,
    BackendUnavailableError,
    BatchError,
    ConfigurationError,
    ConflictError,
    IntegrityError,
    InvalidKeyError,
    MissingDependencyError,
    SerializationError,
    TieredStateError,
)
from .record import Record, Tier

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "BatchError",
    "ConfigurationError",
    "ConflictError",
    "IntegrityError",
    "InvalidKeyError",
    "MissingDependencyError",
    "Record",
    "SerializationError",
    "Tier",
    "TieredStateError",
]
