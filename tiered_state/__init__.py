"""tiered-state: application state across HOT, WARM and COLD storage tiers."""

from __future__ import annotations

import logging

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
from .manager import LocalCache, StateManager, open
from .policy import SweepReport, TieringPolicy
from .record import Record, Tier

logging.getLogger("tiered_state").addHandler(logging.NullHandler())

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "BatchError",
    "ConfigurationError",
    "ConflictError",
    "IntegrityError",
    "InvalidKeyError",
    "LocalCache",
    "MissingDependencyError",
    "Record",
    "SerializationError",
    "StateManager",
    "SweepReport",
    "Tier",
    "TieredStateError",
    "TieringPolicy",
    "open",
]
