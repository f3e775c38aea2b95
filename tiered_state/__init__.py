"""tiered-state: application state across HOT, WARM and COLD storage tiers."""

from __future__ import annotations

import logging

from .cache import LocalCache
from .codec import Codec, JSONCodec, TypedJSONCodec
from .config import register_backend
from .errors import (
    BackendError,
    BackendUnavailableError,
    BatchError,
    ClosedError,
    ConfigurationError,
    ConflictError,
    IntegrityError,
    InvalidKeyError,
    MissingDependencyError,
    PartialOutageError,
    SerializationError,
    StoreFormatError,
    TieredStateError,
    ValueTypeError,
)
from .factory import open, probe
from .inspection import CopyInfo
from .manager import RestoreReport, StateManager
from .operations import Memoized
from .policy import TieringPolicy
from .record import Record, Tier
from .sweep import SweepReport
from .upgrade import UpgradeReport, upgrade

logging.getLogger("tiered_state").addHandler(logging.NullHandler())

__version__ = "0.2.0.dev0"

__all__ = [
    "BackendError",
    "BackendUnavailableError",
    "BatchError",
    "ClosedError",
    "Codec",
    "ConfigurationError",
    "ConflictError",
    "CopyInfo",
    "IntegrityError",
    "InvalidKeyError",
    "JSONCodec",
    "LocalCache",
    "Memoized",
    "MissingDependencyError",
    "PartialOutageError",
    "Record",
    "RestoreReport",
    "SerializationError",
    "StateManager",
    "StoreFormatError",
    "SweepReport",
    "Tier",
    "TieredStateError",
    "TieringPolicy",
    "TypedJSONCodec",
    "UpgradeReport",
    "ValueTypeError",
    "open",
    "probe",
    "register_backend",
    "upgrade",
]
