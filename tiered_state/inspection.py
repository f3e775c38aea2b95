"""What :meth:`StateManager.inspect` reports: every copy of one key, as stored.

Inspection reads each tier's bytes as they are -- it never promotes, never
repairs and never counts as a read -- so it shows what a read would have to
choose from, including copies a read would refuse (a corrupt HOT copy, a
placeholder, an orphaned payload).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any

from .catalog import Catalog
from .errors import IntegrityError
from .record import STUB, TOMBSTONE, Entry, Tier
from .repositories.base import StateRepository

__all__ = ["CopyInfo", "inspect_key"]


@dataclass(frozen=True)
class CopyInfo:
    """One stored copy or catalog entry of a key.

    :ivar tier: ``"hot"``, ``"warm"`` or ``"cold"``.
    :ivar role: what the bytes are --
        ``"value"`` (the catalog's entry holding the value),
        ``"stub"`` (the catalog's entry pointing at a payload below),
        ``"tombstone"`` (the catalog's record of a delete),
        ``"payload"`` (the value a stub points at, or an unreferenced one),
        ``"copy"`` (a HOT copy), ``"placeholder"`` (a HOT entry that blocks
        stale copies while a write is in flight).
    :ivar version: the version the bytes carry (0 if unreadable).
    :ivar expires_at: epoch seconds, or None for no expiry.
    :ivar size_bytes: the payload's size in bytes as stored (before compression).
    :ivar location: where the bytes are: a backend name and the stored name.
    :ivar checksum_ok: whether the payload matches its checksum (None: the
        entry has no payload to check, as a stub, tombstone or placeholder).
    :ivar current: whether a read now would serve this copy's version.
    :ivar encoding: the stored ``encoding`` metadata (the codec's name).
    """

    tier: str
    role: str
    version: int
    expires_at: float | None
    size_bytes: int
    location: str
    checksum_ok: bool | None
    current: bool
    encoding: str = ""

    def as_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (for ``tiered-state inspect --json``)."""
        return asdict(self)


def _location(repo: StateRepository, name: str) -> str:
    locate = getattr(repo, "locate", None)
    return locate(name) if callable(locate) else f"{repo.backend}:{name}"


def _info(tier: Tier, role: str, entry: Entry, repo: StateRepository, name: str,
          current: bool) -> CopyInfo:
    md = entry.metadata
    return CopyInfo(
        tier=tier.value, role=role, version=md["version"], expires_at=md["expires_at"],
        size_bytes=md["size_bytes"], location=_location(repo, name),
        checksum_ok=entry.valid() if role in ("value", "payload", "copy") else None,
        current=current, encoding=md["encoding"])


def _unreadable(tier: Tier, repo: StateRepository, name: str) -> CopyInfo:
    return CopyInfo(tier=tier.value, role="unreadable", version=0, expires_at=None, size_bytes=0,
                    location=_location(repo, name), checksum_ok=False, current=False)


def _fetch(repo: StateRepository, name: str) -> Entry | IntegrityError | None:
    try:
        return repo.fetch_record(name)
    except IntegrityError as exc:
        return exc


def inspect_key(key: str, catalog: Catalog, hot: StateRepository | None) -> list[CopyInfo]:
    """The copies of ``key``: HOT's (if it is not the catalog), the catalog's
    entry, and the payload below that a stub points at."""
    now = time.time()
    out: list[CopyInfo] = []
    entry = _fetch(catalog.repo, key)
    live = 0
    if isinstance(entry, Entry) and entry.live(now):
        live = entry.version
    if hot is not None:
        copy = _fetch(hot, key)
        if isinstance(copy, IntegrityError):
            out.append(_unreadable(Tier.HOT, hot, key))
        elif copy is not None:
            placeholder = copy.kind == STUB
            out.append(_info(Tier.HOT, "placeholder" if placeholder else "copy", copy, hot, key,
                             not placeholder and copy.version == live and copy.live(now)
                             and copy.valid()))
    if isinstance(entry, IntegrityError):
        out.append(_unreadable(catalog.tier, catalog.repo, key))
        return out
    if entry is None:
        return out
    kind = entry.kind
    role = "tombstone" if kind == TOMBSTONE else kind
    out.append(_info(catalog.tier, role, entry, catalog.repo, key,
                     bool(live) and (kind == STUB or entry.valid())))
    below = catalog.payload_repo
    if kind == STUB and below is not None and catalog.payload_tier is not None:
        name = catalog.located_name(entry) or ""
        payload = _fetch(below, name) if name else None
        span = catalog.located_span(entry)
        if span is not None:
            # A frame of a segment: named by its span; an unreadable one is
            # logged by fetch_frames and shown as unreadable here.
            name = f"segments/{span.segment}@{span.offset}+{span.length}"
            payload = catalog.fetch_frames({key: span}).get(key) or IntegrityError(name, key)
        if isinstance(payload, IntegrityError):
            out.append(_unreadable(catalog.payload_tier, below, name))
        elif payload is not None:
            matches = Catalog._matching(entry, payload) is not None
            info = _info(catalog.payload_tier, "payload", payload, below, name,
                         bool(live) and matches)
            out.append(info)
    return out
