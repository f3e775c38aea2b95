"""URL -> repository: the backend registry, driver imports and environment config.

Each backend registers its URL schemes in :data:`_REGISTRY` as a
``"module:Class"`` string, imported on first use, so ``import tiered_state``
imports no driver. A backend gets its driver through :func:`require`, whose
error names the extra to install.

Options ride in the URL's query string (``redis://host/0?prefix=app:``); each
backend's ``from_url`` documents its own. :func:`redact` hides passwords
wherever a URL is shown.
"""

from __future__ import annotations

import importlib
import os
import re
from collections.abc import Mapping
from types import MappingProxyType, ModuleType
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from .errors import ConfigurationError, MissingDependencyError

if TYPE_CHECKING:
    from .repositories.base import StateRepository

__all__ = [
    "ENV_COLD",
    "ENV_HOT",
    "ENV_PATH",
    "ENV_STATSD",
    "ENV_WARM",
    "open_repository",
    "query_options",
    "redact",
    "registry",
    "require",
]

ENV_HOT = "TIERED_STATE_HOT"
ENV_WARM = "TIERED_STATE_WARM"
ENV_COLD = "TIERED_STATE_COLD"
ENV_PATH = "TIERED_STATE_PATH"
ENV_STATSD = "TIERED_STATE_STATSD"

_PKG = "tiered_state.repositories."

# scheme -> "module:Class". One line per scheme; adding a backend adds a line.
_REGISTRY: dict[str, str] = {
    "memory": _PKG + "memory_repository:MemoryStateRepository",
    "redis": _PKG + "redis_repository:RedisStateRepository",
    "rediss": _PKG + "redis_repository:RedisStateRepository",
    "unix": _PKG + "redis_repository:RedisStateRepository",
    "sqlite": _PKG + "sqlite_repository:SQLiteStateRepository",
    "postgresql": _PKG + "postgres_repository:PostgresStateRepository",
    "postgres": _PKG + "postgres_repository:PostgresStateRepository",
    "file": _PKG + "filesystem_repository:FileSystemStateRepository",
    "s3": _PKG + "s3_repository:S3StateRepository",
}

#: Read-only view of the registry: scheme -> "module:Class".
registry: Mapping[str, str] = MappingProxyType(_REGISTRY)


def require(module: str, extra: str) -> ModuleType:
    """Import a driver, or raise :class:`MissingDependencyError` naming the extra.

    :param module: the import name (``"redis"``, ``"psycopg2"``, ``"boto3"``).
    :param extra: the tiered-state extra that installs it.
    """
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(module.split(".")[0], extra) from exc


_PASSWORD = re.compile(r"(?<=://)([^:/@\s]*):([^@/\s]*)@")


def redact(url: str) -> str:
    """``url`` with any password replaced by ``***`` (also in query options)."""
    url = _PASSWORD.sub(lambda m: f"{m.group(1)}:***@", url)
    return re.sub(
        r"((?:password|secret|token|aws_secret_access_key|aws_session_token)=)[^&\s]*",
        r"\1***",
        url,
        flags=re.IGNORECASE,
    )


def scheme_of(url: str) -> str:
    """The URL's scheme, lower-cased (``postgresql+psycopg2`` -> ``postgresql``)."""
    if "://" not in url:
        raise ConfigurationError(f"not a URL (no scheme://): {redact(url)!r}")
    return url.split("://", 1)[0].split("+", 1)[0].lower()


def query_options(url: str) -> tuple[str, dict[str, str]]:
    """Split ``url`` into the URL without its query and the query as a dict."""
    parts = urlsplit(url)
    options = dict(parse_qsl(parts.query, keep_blank_values=True))
    return urlunsplit(parts._replace(query="")), options


def backend_class(scheme: str) -> type[StateRepository]:
    """The repository class registered for ``scheme`` (imports its module)."""
    try:
        target = _REGISTRY[scheme]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise ConfigurationError(f"unknown URL scheme {scheme!r}; known: {known}") from None
    module_name, _, class_name = target.partition(":")
    module = importlib.import_module(module_name)
    cls: type[StateRepository] = getattr(module, class_name)
    return cls


def open_repository(url: str, **options: Any) -> StateRepository:
    """Open the repository a URL names; ``options`` override query options.

    :raises ConfigurationError: unknown scheme or bad option.
    :raises MissingDependencyError: the backend's driver is not installed.
    """
    return backend_class(scheme_of(url)).from_url(url, **options)


def parse_bool(value: str | bool, name: str) -> bool:
    """Parse a URL option as a boolean (1/0, true/false, yes/no, on/off)."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ConfigurationError(f"option {name!r} must be a boolean, not {value!r}")


def parse_number(value: str | float | int | None, name: str, *, minimum: float = 0) -> float | None:
    """Parse a URL option as a non-negative number; empty or ``none`` is None."""
    if value is None or (isinstance(value, str) and value.strip().lower() in ("", "none")):
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"option {name!r} must be a number, not {value!r}") from None
    if number < minimum or number != number:
        raise ConfigurationError(f"option {name!r} must be >= {minimum}, not {value!r}")
    return number


def environ(name: str, default: str | None = None) -> str | None:
    """A ``TIERED_STATE_*`` variable; blank counts as unset."""
    value = os.environ.get(name, "").strip()
    return value or default
