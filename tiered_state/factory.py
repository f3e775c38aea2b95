"""``open()``: from a path, URLs and environment variables to a :class:`StateManager`."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .cache import LocalCache
from .codec import Codec, resolve_codec
from .config import ENV_COLD, ENV_HOT, ENV_PATH, ENV_WARM, environ, open_repository, redact
from .errors import BackendUnavailableError, MissingDependencyError, TieredStateError
from .manager import StateManager
from .metrics import MetricsCollector, metrics_from_env
from .policy import TieringPolicy
from .record import Tier
from .repositories.base import StateRepository

__all__ = ["check_repositories", "open", "open_repositories", "probe", "tier_specs"]

log = logging.getLogger(__name__)

_ENV = {Tier.HOT: ENV_HOT, Tier.WARM: ENV_WARM, Tier.COLD: ENV_COLD}


def _url(given: str | None, env: str, default: str) -> str | None:
    value = given if given is not None else environ(env, default)
    if value is None or value.strip().lower() in ("none", "off", ""):
        return None
    return value


def open_repositories(
    path: str | os.PathLike[str] | None = None,
    *,
    hot: str | StateRepository | None = None,
    warm: str | StateRepository | None = None,
    cold: str | StateRepository | None = None,
    policy: TieringPolicy | None = None,
) -> dict[Tier, StateRepository]:
    """The repositories :func:`open` would use, opened (the caller closes them).

    Per tier: the argument, else ``TIERED_STATE_HOT`` / ``_WARM`` / ``_COLD``,
    else the embedded default under ``path`` (else ``TIERED_STATE_PATH``,
    else ``./.tiered_state``); ``"none"`` switches a tier off.
    """
    policy = policy or TieringPolicy()
    opened: dict[Tier, StateRepository] = {}
    try:
        for tier, spec in tier_specs(path, hot=hot, warm=warm, cold=cold, policy=policy).items():
            if isinstance(spec, StateRepository):
                opened[tier] = spec
                continue
            log.debug("opening %s tier at %s", tier.value, redact(spec))
            opened[tier] = open_repository(spec)
    except BaseException:
        for repo in opened.values():
            repo.close()
        raise
    return opened


def tier_specs(
    path: str | os.PathLike[str] | None = None,
    *,
    hot: str | StateRepository | None = None,
    warm: str | StateRepository | None = None,
    cold: str | StateRepository | None = None,
    policy: TieringPolicy | None = None,
) -> dict[Tier, str | StateRepository]:
    """The URL (or ready repository) of each configured tier, as :func:`open` resolves them.

    Creates the folder of the embedded tiers (0700) when one of them is used.
    """
    policy = policy or TieringPolicy()
    root = Path(path if path is not None else environ(ENV_PATH, ".tiered_state") or ".tiered_state")
    limits = []
    if policy.hot_max_items is not None:
        limits.append(f"max_items={policy.hot_max_items}")
    if policy.hot_max_bytes is not None:
        limits.append(f"max_bytes={policy.hot_max_bytes}")
    given = {Tier.HOT: hot, Tier.WARM: warm, Tier.COLD: cold}
    out: dict[Tier, str | StateRepository] = {}
    for tier in (Tier.HOT, Tier.WARM, Tier.COLD):
        spec = given[tier]
        if isinstance(spec, StateRepository):
            out[tier] = spec
            continue
        if tier is Tier.HOT:
            default = "memory://" + ("?" + "&".join(limits) if limits else "")
        else:
            # The embedded WARM and COLD tiers live under the path.
            default = (f"sqlite:///{(root / 'warm.db').resolve()}" if tier is Tier.WARM
                       else (root / "cold").resolve().as_uri())
        url = _url(spec, _ENV[tier], default)
        if url is None:
            continue
        if tier is not Tier.HOT and url == default:
            root.mkdir(mode=0o700, parents=True, exist_ok=True)
        out[tier] = url
    return out


def open(
    path: str | os.PathLike[str] | None = None,
    *,
    hot: str | StateRepository | None = None,
    warm: str | StateRepository | None = None,
    cold: str | StateRepository | None = None,
    policy: TieringPolicy | None = None,
    metrics: MetricsCollector | None = None,
    cache: LocalCache | None = None,
    codec: Codec | str | None = None,
    check: bool = False,
) -> StateManager:
    """Open a tiered store.

    With no arguments: memory + SQLite + files under ``./.tiered_state`` (or
    ``TIERED_STATE_PATH``). ``path`` puts the embedded tiers elsewhere; each
    tier may instead be a URL (``redis://``, ``postgresql://``, ``s3://``, ...,
    or the scheme of a third-party backend: see
    :func:`~tiered_state.config.register_backend`) or a ready repository, or
    ``"none"`` to switch it off. Unset tiers come
    from ``TIERED_STATE_HOT`` / ``_WARM`` / ``_COLD``; metrics from
    ``TIERED_STATE_STATSD=host:port`` when ``metrics`` is not given.

    By default nothing is reached before the first call but the catalog (to
    check the store's format), and a catalog that cannot be reached then is
    only logged: the store opens, and calls fail until it is back. With
    ``check=True`` every configured tier is reached first (see
    :func:`check_repositories`) and ``open`` raises if one cannot be used;
    nothing has been stored when it does, and everything opened is closed.

    :param codec: how values become payloads: ``"json"`` (the default,
        :class:`~tiered_state.codec.JSONCodec`), ``"typed-json"`` or a
        :class:`~tiered_state.codec.TypedJSONCodec` (datetimes, Decimals,
        sets, registered Enum/dataclass/pydantic classes...), or any
        :class:`~tiered_state.codec.Codec`. Each record remembers its codec.
    :param check: reach every configured tier before returning.
    :raises ConfigurationError: bad URL, unknown scheme or option, or a store
        written by tiered-state 0.1 (run ``tiered-state upgrade`` once); with
        ``check=True`` also a tier that refuses the configuration (wrong
        credentials or role, no such database or bucket, missing privileges).
    :raises MissingDependencyError: a URL's driver is not installed.
    :raises BackendUnavailableError: with ``check=True``, a tier cannot be
        reached (down, connection refused, timed out).
    """
    policy = policy or TieringPolicy()
    # A bad codec is a ConfigurationError before anything is opened.
    chosen = resolve_codec(codec)
    opened = open_repositories(path, hot=hot, warm=warm, cold=cold, policy=policy)
    try:
        if check:
            check_repositories(opened)
        owns_metrics = metrics is None
        if metrics is None:
            metrics = metrics_from_env()
        manager = StateManager(
            opened.get(Tier.HOT), opened.get(Tier.WARM), opened.get(Tier.COLD),
            policy=policy, metrics=metrics, cache=cache, codec=chosen,
        )
        manager.owns_metrics = owns_metrics and metrics is not None
        return manager
    except BaseException:
        for repo in opened.values():
            repo.close()
        raise


def check_repositories(repositories: Mapping[Tier, StateRepository]) -> None:
    """Reach each repository once (HOT, then WARM, then COLD) with its ``ping``.

    A ping stores no record (a backend may create its table or file on
    first contact, empty), so a failed check leaves no data anywhere.

    :raises BackendUnavailableError: a tier cannot be reached.
    :raises ConfigurationError: a tier refuses the configuration.
    :raises BackendError: a tier failed otherwise.
    """
    for tier in (Tier.HOT, Tier.WARM, Tier.COLD):
        repo = repositories.get(tier)
        if repo is None:
            continue
        try:
            elapsed = repo.ping()
        except TieredStateError as exc:
            log.warning("%s tier (%s) failed its check at open: %s", tier.value, repo.backend, exc)
            raise
        log.debug("%s tier (%s) reached in %.1f ms", tier.value, repo.backend, elapsed)


def probe(
    path: str | os.PathLike[str] | None = None,
    *,
    hot: str | None = None,
    warm: str | None = None,
    cold: str | None = None,
) -> dict[Tier, dict[str, Any]]:
    """Open each configured tier on its own and reach it; what ``tiered-state doctor`` shows.

    Nothing is written and no manager is built, so a tier that is down, a
    missing driver or a store in an older format are all reported, tier by
    tier, instead of failing as a whole. Per tier: ``status`` ("ok",
    "unreachable", "error", "missing driver" or "off"), ``url`` (redacted),
    ``backend``, ``connect_ms`` (first round trip, connecting included),
    ``latency_ms`` (median of three more) and ``error`` (the exception or None).
    """
    given = {Tier.HOT: hot, Tier.WARM: warm, Tier.COLD: cold}
    out: dict[Tier, dict[str, Any]] = {}
    for tier in (Tier.HOT, Tier.WARM, Tier.COLD):
        only = {t: (given[t] if t is tier else "none") for t in given}
        row: dict[str, Any] = {"status": "off", "url": None, "backend": None, "connect_ms": None,
                               "latency_ms": None, "error": None}
        out[tier] = row
        try:
            specs = tier_specs(path, hot=only[Tier.HOT], warm=only[Tier.WARM], cold=only[Tier.COLD])
            spec = specs.get(tier)
            if spec is None:
                continue
            row["url"] = redact(spec) if isinstance(spec, str) else repr(spec)
            repos = open_repositories(path, hot=only[Tier.HOT], warm=only[Tier.WARM],
                                      cold=only[Tier.COLD])
        except (TieredStateError, OSError, ImportError) as exc:  # reported: the point of a probe
            row.update(status="missing driver" if isinstance(exc, MissingDependencyError)
                       else "error", error=exc)
            continue
        repo = repos.get(tier)
        if repo is None:
            continue
        try:
            row["backend"] = repo.backend
            start = time.perf_counter()
            repo.ping()
            row["connect_ms"] = (time.perf_counter() - start) * 1000.0
            times = sorted(repo.ping() for _ in range(3))
            # A read exercises what a ping may not: the table, the bucket, the grants.
            repo.fetch_record("__tiered_state__:probe")
            row.update(status="ok", latency_ms=times[1])
        except (TieredStateError, OSError) as exc:  # reported, not raised
            row.update(status="unreachable" if isinstance(exc, BackendUnavailableError) else "error",
                       error=exc)
        finally:
            repo.close()
    return out
