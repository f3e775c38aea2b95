"""The sweep: the tiering policy applied once, in bounded batches.

Three jobs, each safe against every concurrent writer because each ends in a
conditional write that loses any race:

* **collect** (first) -- payloads below the catalog that no entry can
  reference any more (:meth:`tiered_state.catalog.Catalog.is_garbage`) are
  deleted;
* **purge** -- catalog entries dead for ``policy.purge_after`` (expired
  records, tombstones of deletes) are deleted if they still hold the version
  the sweep saw, and the payloads their stubs pointed at go with them;
* **move** -- WARM values idle for ``cold_after`` go COLD: copy the payload
  below the catalog, read it back and check it, then turn the entry into a
  stub *of the same version* (the migration commit); a write that came in
  meanwhile makes that commit fail and the copy is garbage. A value that
  fails its checksum is first replaced by a valid copy of its version below
  the catalog, if there is one (and then moved); if not, it is left alone,
  logged and counted in ``failed`` -- the sweep goes on with the rest.

Last, each durable tier is asked to give the space its deletes freed back to
the file system (:meth:`~tiered_state.repositories.base.StateRepository.reclaim_space`):
an embedded SQLite file would otherwise keep the size it had before most of its
records went COLD.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .catalog import RESERVED_PREFIX, Catalog, parse_payload_name
from .errors import BackendError, BatchError
from .metrics import MetricsCollector
from .policy import TieringPolicy, seconds_of
from .record import STUB, TOMBSTONE, Entry
from .repositories.base import chunked

__all__ = ["GARBAGE_GRACE", "SweepReport", "Sweeper"]

log = logging.getLogger(__name__)

#: A payload below the catalog that no entry references yet may belong to a
#: write still in flight (payload stored, entry not yet committed); it is
#: garbage only once it is older than this. Writers that take longer start over.
GARBAGE_GRACE = 3600.0


@dataclass
class SweepReport:
    """What one sweep did.

    :ivar scanned: catalog entries examined (candidates the catalog returned).
    :ivar moved: records moved WARM -> COLD (copied, verified, entry turned into a stub).
    :ivar purged: dead entries deleted (expired records and tombstones of deletes).
    :ivar collected: unreferenced payloads deleted below the catalog.
    :ivar skipped: records left alone because a newer write raced the sweep.
    :ivar failed: records that could not be moved or purged (``errors`` says why).
    :ivar reclaimed_bytes: file space given back by the tiers (see
        :meth:`~tiered_state.repositories.base.StateRepository.reclaim_space`).
    :ivar seconds: wall time of the sweep.
    """

    scanned: int = 0
    moved: int = 0
    purged: int = 0
    collected: int = 0
    skipped: int = 0
    failed: int = 0
    reclaimed_bytes: int = 0
    seconds: float = 0.0
    errors: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scanned": self.scanned,
            "moved": self.moved,
            "purged": self.purged,
            "collected": self.collected,
            "skipped": self.skipped,
            "failed": self.failed,
            "reclaimed_bytes": self.reclaimed_bytes,
            "seconds": round(self.seconds, 6),
            "errors": dict(self.errors),
        }

    def _fail(self, keys: Any, why: str) -> None:
        keys = list(keys)
        for key in keys:
            self.failed += 1
            self.errors[key] = why
        if keys:
            shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
            log.error("sweep: %d record(s) failed (%s): %s", len(keys), shown, why)


class Sweeper:
    """Runs sweeps over one catalog.

    :param catalog: the catalog (and the payload tier below it).
    :param policy: ``cold_after`` and ``batch_size`` come from it.
    :param count: the manager's counter (``demotions``).
    """

    def __init__(self, catalog: Catalog, policy: TieringPolicy,
                 count: Callable[[str, int], None],
                 metrics: MetricsCollector | None = None) -> None:
        self.catalog = catalog
        self.policy = policy
        self._cold_after = seconds_of(policy.cold_after)
        self._purge_after = seconds_of(policy.purge_after)
        self._count = count
        self.metrics = metrics

    def run(self, progress: Callable[[SweepReport], None] | None = None, *,
            dry_run: bool = False, collect: bool = True) -> SweepReport:
        started = time.monotonic()
        report = SweepReport()
        now = time.time()
        catalog = self.catalog
        idle_before = None
        if catalog.payload_repo is not None and self._cold_after is not None:
            idle_before = now - self._cold_after
        if collect and not dry_run and catalog.payload_repo is not None:
            # First, while the entries that superseded old payloads still exist:
            # once purged, an absent entry proves nothing about a payload.
            self.collect(report, now)
        for batch in catalog.repo.scan(self.policy.batch_size, now=now, idle_before=idle_before):
            batch = [e for e in batch if not e.key.startswith(RESERVED_PREFIX)]
            report.scanned += len(batch)
            dead = [e for e in batch if e.expired(now) and self._purgeable(e, now)]
            idle = [e for e in batch if not e.expired(now) and e.kind == "value"]
            if dry_run:
                report.purged += len(dead)
                report.moved += len(idle) if idle_before is not None else 0
            else:
                if dead:
                    self.purge(dead, report)
                if idle and idle_before is not None:
                    self.move(idle, report)
            if progress is not None:
                progress(report)
        if not dry_run:
            self.reclaim(report)
        report.seconds = time.monotonic() - started
        self._gauges(report)
        return report

    # ------------------------------------------------------------ purge
    def _purgeable(self, entry: Entry, now: float) -> bool:
        """Dead for ``policy.purge_after`` seconds: since the delete for a
        tombstone, since ``expires_at`` for an expired record."""
        md = entry.metadata
        since = md["updated_at"] if md["encoding"] == TOMBSTONE else md["expires_at"]
        return since is not None and now - since >= self._purge_after

    def purge(self, dead: list[Entry], report: SweepReport) -> None:
        """Delete dead entries that still hold the version seen, then their payloads."""
        versions = {e.key: e.version for e in dead}
        try:
            deleted = self.catalog.repo.delete_many_if_version(versions)
        except BackendError as exc:
            report._fail(versions, str(exc))
            return
        report.purged += len(deleted)
        report.skipped += len(versions) - len(deleted)
        # A purged stub's payload can never be referenced again: a stub of a
        # version is only ever committed over the live value of that version.
        self.catalog.drop_payloads({e.key: e.version for e in dead
                                    if e.key in deleted and e.metadata["encoding"] == STUB})

    # ------------------------------------------------------------ move
    def move(self, idle: list[Entry], report: SweepReport) -> int:
        """Copy idle values below the catalog, verify the copies, commit the stubs.

        :returns: how many were moved.
        """
        catalog = self.catalog
        items = {}
        damaged = {}
        for entry in idle:
            if entry.valid():
                items[entry.key] = (entry.payload, entry.metadata)
            else:
                damaged[entry.key] = entry
        if damaged:
            # The catalog repairs a damaged value from a valid copy of its
            # version below, where there is one; that copy is then moved.
            try:
                repaired, corrupt = catalog.resolve(damaged, time.time())
            except BackendError as exc:
                report._fail(damaged, f"checksum mismatch in the catalog, not repaired: {exc}")
            else:
                for key, found in repaired.items():
                    items[key] = (found.entry.payload, found.entry.metadata)
                report._fail(corrupt, "checksum mismatch in the catalog and no valid copy; not moved")
        if not items:
            return 0
        try:
            failed = catalog.store_payloads(items)
        except BackendError as exc:
            report._fail(items, str(exc))
            return 0
        for key, error in failed.items():
            report._fail((key,), f"copy not stored: {error}")
            items.pop(key, None)
        try:
            verified = catalog.verify_payloads(items)
        except BackendError as exc:
            report._fail(items, f"copy not verified: {exc}")
            return 0
        unverified = [k for k in items if k not in verified]
        if unverified:
            # A copy that is gone or different is a lost race if the entry moved
            # on meanwhile (the loser of a race drops its copy, which may be the
            # one this sweep just stored); only a copy of the current version
            # that does not read back is a failure.
            now = time.time()
            current = catalog.repo.fetch_many(unverified)
            for key in unverified:
                held = current.get(key)
                if held is None or not held.live(now) or held.version != items[key][1]["version"]:
                    report.skipped += 1
                else:
                    report._fail((key,), "copy did not verify; not moved")
        stubs = {k: catalog.stub_for(k, items[k][1]) for k in verified}
        expected = {k: items[k][1]["version"] for k in verified}
        try:
            committed = catalog.repo.store_many_if_version(stubs, expected)
        except BatchError as exc:
            report._fail(exc.failed, "entry not updated: " + str(next(iter(exc.failed.values()))))
            committed = set(exc.succeeded)
        except BackendError as exc:
            report._fail(stubs, f"entry not updated: {exc}")
            return 0
        lost = {k: expected[k] for k in stubs if k not in committed}
        # Lost races: the entry moved on (or died), so the copy is garbage now.
        catalog.drop_payloads(lost)
        report.moved += len(committed)
        report.skipped += len(lost)
        self._count("demotions", len(committed))
        return len(committed)

    # ------------------------------------------------------------ reclaim
    def reclaim(self, report: SweepReport) -> None:
        """Let the catalog's tier and the payload tier give freed space back."""
        for repo in (self.catalog.repo, self.catalog.payload_repo):
            if repo is None:
                continue
            try:
                report.reclaimed_bytes += repo.reclaim_space()
            except BackendError as exc:  # space stays allocated until the next sweep
                log.warning("%s: could not give free space back: %s", repo.backend, exc)

    # ------------------------------------------------------------ collect
    def collect(self, report: SweepReport, now: float) -> None:
        """Delete the payloads below the catalog that no entry can reference again."""
        catalog = self.catalog
        repo = catalog.payload_repo
        assert repo is not None
        try:
            for chunk in chunked(catalog.scan_payloads(), 1000):
                parsed = {name: found for name in chunk
                          if (found := parse_payload_name(name)) is not None}
                if not parsed:
                    continue
                entries = catalog.repo.fetch_many({k for k, _ in parsed.values()})
                garbage = {name: v for name, (k, v) in parsed.items()
                           if catalog.is_garbage(name, v, entries.get(k), now, GARBAGE_GRACE)}
                if garbage:
                    report.collected += len(repo.delete_many_if_version(garbage))
        except BackendError as exc:
            log.warning("garbage collection stopped early: %s", exc)

    def _gauges(self, report: SweepReport) -> None:
        if self.metrics is None:
            return
        for name in ("scanned", "moved", "purged", "collected", "skipped", "failed"):
            try:
                self.metrics.gauge("state.manager.sweep." + name, getattr(report, name))
            except Exception:  # metrics never break state operations
                log.debug("metrics collector failed", exc_info=True)
