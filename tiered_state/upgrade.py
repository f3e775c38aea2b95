"""The store format, and the upgrade of a store written by tiered-state 0.1.

The catalog records the format its store is in under a reserved key. A new
store gets it when first opened. A store that holds data but no format record
was written by 0.1, where every tier kept an independent copy of a record and
COLD named its objects after the key alone; opening it refuses with a message
naming ``tiered-state upgrade``, which runs :func:`upgrade`:

1. a shared HOT tier (Redis) is flushed: it only ever held copies;
2. every 0.1 object in COLD (under a WARM catalog) becomes a payload of the
   catalog -- copied under its payload name and referenced by a stub -- if it
   is newer than what the catalog holds for its key, and is deleted either way;
3. the format record is written.

Each object is handled on its own with conditional writes, so the upgrade is
idempotent and can be interrupted and run again at any point.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass

from . import codec
from .catalog import RESERVED_PREFIX, Catalog, is_payload_name
from .errors import ConfigurationError, SerializationError, StoreFormatError
from .policy import TieringPolicy
from .record import Tier, make_metadata
from .repositories.base import StateRepository, chunked
from .sweep import Sweeper, SweepReport

__all__ = ["FORMAT", "FORMAT_KEY", "UpgradeReport", "check_format", "upgrade"]

log = logging.getLogger(__name__)

#: The store format this version writes.
FORMAT = 2
FORMAT_KEY = RESERVED_PREFIX + "format"
#: 0.1's change signal row: replaced by the catalog's own commits.
_OLD_SIGNAL = RESERVED_PREFIX + "changed"


def _stored_format(catalog: Catalog) -> int | None:
    entry = catalog.repo.fetch_record(FORMAT_KEY)
    if entry is None or not entry.live() or not entry.valid():
        return None
    try:
        data = codec.decode(entry.payload)
    except SerializationError:
        return None
    found = data.get("format") if isinstance(data, dict) else None
    return found if isinstance(found, int) else None


def _holds_data(repo: StateRepository | None) -> bool:
    if repo is None:
        return False
    return any(not k.startswith(RESERVED_PREFIX) for k in _first(repo))


def _first(repo: StateRepository) -> list[str]:
    keys = []
    for key in repo.iter_all_keys():
        keys.append(key)
        if len(keys) >= 16:
            break
    return keys


def _mark(catalog: Catalog) -> None:
    payload = codec.encode({"format": FORMAT})
    metadata = make_metadata(payload, FORMAT, now=time.time())
    if not catalog.repo.store_if_version(FORMAT_KEY, payload, metadata, 0):
        if _stored_format(catalog) != FORMAT:  # a live record of another format
            raise ConfigurationError("the store's format record changed while it was being opened")


def check_format(catalog: Catalog) -> None:
    """Make sure the store is in :data:`FORMAT`; mark a new, empty store.

    :raises StoreFormatError: written by 0.1 (run ``tiered-state upgrade``)
        or by a newer tiered-state.
    """
    found = _stored_format(catalog)
    if found == FORMAT:
        return
    if found is not None and found > FORMAT:
        raise StoreFormatError(
            f"this store is in format {found}, written by a newer tiered-state; upgrade tiered-state",
            found,
        )
    if found is None and (_holds_data(catalog.repo) or _holds_data(catalog.payload_repo)):
        # This version records the format before it writes any data, so data
        # seen now with no record seen a moment ago may be another process
        # opening the same new store: read the record again after the data.
        found = _stored_format(catalog)
        if found == FORMAT:
            return
        raise StoreFormatError(
            "this store was written by tiered-state 0.1 and must be upgraded once: "
            "run `tiered-state upgrade` with the same --path/--hot/--warm/--cold "
            "(it is safe to interrupt and run again)",
            found,
        )
    if found is not None:
        raise StoreFormatError(f"this store records an unknown format {found!r}", found)
    _mark(catalog)


@dataclass
class UpgradeReport:
    """What :func:`upgrade` did.

    :ivar moved: 0.1 COLD objects that became catalog payloads.
    :ivar dropped: 0.1 COLD objects deleted because the catalog held a newer
        version of the key (or they had expired).
    :ivar corrupt: 0.1 COLD objects left in place because they fail their checksum.
    :ivar hot_flushed: copies removed from a shared HOT tier.
    :ivar packed: COLD records moved from an object of their own into segments
        (``pack=True``).
    :ivar already: the store was in the current format already.
    """

    moved: int = 0
    dropped: int = 0
    corrupt: int = 0
    hot_flushed: int = 0
    packed: int = 0
    already: bool = False


def upgrade(
    path: str | os.PathLike[str] | None = None,
    *,
    hot: str | StateRepository | None = None,
    warm: str | StateRepository | None = None,
    cold: str | StateRepository | None = None,
    pack: bool = False,
) -> UpgradeReport:
    """Bring a store written by tiered-state 0.1 to the current format.

    Takes the same arguments as :func:`tiered_state.open`. Idempotent; safe
    to interrupt and run again. Stop every process using the store first: a
    0.1 process writing meanwhile would keep writing the old layout.

    :param pack: also move every COLD record stored as an object of its own
        (by 0.1, by an earlier 0.2 or by a single ``set(..., tier="cold")``)
        into segments now, as each sweep otherwise does over time. Safe while
        other processes use the store: each record moves by a conditional write.
    """
    from .factory import open_repositories

    repos = open_repositories(path, hot=hot, warm=warm, cold=cold)
    try:
        durable = [t for t in (Tier.WARM, Tier.COLD) if t in repos and not repos[t].volatile]
        tier = durable[0] if durable else next(t for t in (Tier.HOT, Tier.WARM, Tier.COLD)
                                               if t in repos)
        payloads = (Tier.COLD, repos[Tier.COLD]) if tier is Tier.WARM and Tier.COLD in repos else None
        catalog = Catalog(tier, repos[tier], payloads)
        report = UpgradeReport(already=_stored_format(catalog) == FORMAT)
        if report.already:
            if pack:
                report.packed = _pack(catalog)
            return report
        hot_repo = repos.get(Tier.HOT)
        if hot_repo is not None and hot_repo.shared and tier is not Tier.HOT:
            # Copies only: the catalog has the records. A backend may have
            # flushed another layout's keys already, when it was first used.
            report.hot_flushed = hot_repo.clear() + getattr(hot_repo, "flushed_on_open", 0)
        catalog.repo.delete(_OLD_SIGNAL)
        if catalog.payload_repo is not None:
            _adopt_cold(catalog, catalog.payload_repo, report)
        _mark(catalog)
        if pack:
            report.packed = _pack(catalog)
        log.info("upgraded the store to format %d: %s", FORMAT, report)
        return report
    finally:
        for repo in repos.values():
            repo.close()


def _pack(catalog: Catalog) -> int:
    """Pack COLD records stored one per object into segments: the sweep's
    garbage pass, which packs what it finds (and collects garbage)."""
    if catalog.segments is None:
        return 0
    report = SweepReport()
    Sweeper(catalog, TieringPolicy(), lambda name, n: None).collect(report, time.time())
    if report.failed:
        log.error("%d records could not be packed: %s", report.failed, report.errors)
    return report.packed


def _adopt_cold(catalog: Catalog, cold: StateRepository, report: UpgradeReport) -> None:
    """Turn 0.1 COLD objects (named after their key) into catalog payloads."""
    for chunk in chunked(cold.iter_all_keys(), 500):
        legacy = {}
        for name, entry in cold.fetch_many(chunk).items():
            if is_payload_name(name, entry.version):
                continue  # a payload already (an earlier, interrupted run made it)
            if name.startswith(RESERVED_PREFIX):
                continue
            legacy[name] = entry
        if not legacy:
            continue
        current = catalog.repo.fetch_many(list(legacy))
        for key, entry in legacy.items():
            held = current.get(key)
            if not entry.valid():
                report.corrupt += 1
                log.error("0.1 COLD object %r fails its checksum; left in place", key)
                continue
            if not entry.expired() and (held is None or held.version < entry.version):
                catalog.store_payloads({key: (entry.payload, entry.metadata)})
                stub, md = catalog.stub_for(key, entry.metadata)
                if catalog.repo.store_if_newer(key, stub, md):
                    report.moved += 1
                else:  # the catalog got a newer version meanwhile: the copy is garbage
                    catalog.drop_payloads({key: entry.version})
                    report.dropped += 1
            else:
                report.dropped += 1
            cold.delete_if_version(key, entry.version)
