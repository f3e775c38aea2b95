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
  meanwhile makes that commit fail and the copy is garbage. Where COLD keeps
  segments (:mod:`tiered_state.segments`), each batch goes down as one. A value that
  fails its checksum is first replaced by a valid copy of its version below
  the catalog, if there is one (and then moved); if not, it is left alone,
  logged and counted in ``failed`` -- the sweep goes on with the rest.

With segments, collect also deletes the segments no live stub points at any
more, *compacts* those whose live fraction has fallen below
``policy.compact_below`` (their live records are copied into a new segment
and each stub is moved there by one write conditional on its version, so it
loses any race to a concurrent write; the old segment goes once no stub points
at it), and *packs* payloads stored one per object (a single COLD write, or
an older store) into segments the same way. A crash at any point leaves only
garbage: a new segment no stub points at yet, or an old one no stub points at
any more.

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

from .catalog import RESERVED_PREFIX, Catalog, SegmentCollected, parse_payload_name
from .errors import BackendError, BatchError
from .metrics import MetricsCollector
from .policy import TieringPolicy, seconds_of
from .record import STUB, TOMBSTONE, Entry, Metadata
from .repositories.base import chunked
from .segments import created_at

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
    :ivar packed: COLD records moved from an object of their own into a segment.
    :ivar compacted: COLD records moved out of a mostly dead segment into a new one.
    :ivar segments_deleted: segments deleted because no record pointed at them any more.
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
    packed: int = 0
    compacted: int = 0
    segments_deleted: int = 0
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
            "packed": self.packed,
            "compacted": self.compacted,
            "segments_deleted": self.segments_deleted,
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
        self._batch = policy.batch_size
        self._count = count
        self.metrics = metrics
        self._progress: Callable[[SweepReport], None] | None = None

    def run(self, progress: Callable[[SweepReport], None] | None = None, *,
            dry_run: bool = False, collect: bool = True) -> SweepReport:
        started = time.monotonic()
        report = SweepReport()
        self._progress = progress
        now = time.time()
        catalog = self.catalog
        idle_before = None
        if catalog.payload_repo is not None and self._cold_after is not None:
            idle_before = now - self._cold_after
        if collect and not dry_run and catalog.payload_repo is not None:
            # First, while the entries that superseded old payloads still exist:
            # once purged, an absent entry proves nothing about a payload.
            self.collect(report, now)
        # Idle values are moved batch_size at a time, whatever the scan's
        # batches hold (some are dead, some reserved): each move is one
        # segment, so full ones.
        idle: list[Entry] = []
        for batch in catalog.repo.scan(self.policy.batch_size, now=now, idle_before=idle_before):
            batch = [e for e in batch if not e.key.startswith(RESERVED_PREFIX)]
            report.scanned += len(batch)
            dead = [e for e in batch if e.expired(now) and self._purgeable(e, now)]
            if idle_before is not None:
                idle.extend(e for e in batch if not e.expired(now) and e.kind == "value")
            if dry_run:
                report.purged += len(dead)
                report.moved += len(idle)
                idle.clear()
            else:
                if dead:
                    self.purge(dead, report)
                while len(idle) >= self._batch:
                    self.move(idle[:self._batch], report)
                    del idle[:self._batch]
            if progress is not None:
                progress(report)
        if idle and not dry_run:
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
        if catalog.segments is not None:
            # Even one record: a move copies a version the catalog already
            # holds, and that version may have been below before (demoted,
            # promoted, demoted again). An object is named by key and version,
            # so writing it again would recreate a name that a pack or a
            # compaction may be deleting right then; a segment's name is new.
            return self._commit_segment(items, report, "moved")
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

    def _commit_segment(self, items: dict[str, tuple[str, Metadata]], report: SweepReport,
                        counter: str) -> int:
        """Write ``items``' payloads as one segment, then point each key's entry
        at its span, conditional on the version in ``items``: the one way
        records go into a segment (moved, packed or compacted). A lost race
        leaves dead bytes; a segment nothing points at is deleted at once.

        :returns: how many entries now point into the new segment.
        """
        catalog = self.catalog
        try:
            name, stubs = catalog.store_segment(items)
        except SegmentCollected:
            report.skipped += len(items)  # every record in it moved on meanwhile
            return 0
        except BackendError as exc:
            report._fail(items, f"segment not stored: {exc}")
            return 0
        expected = {k: md["version"] for k, (_, md) in items.items()}
        try:
            committed = catalog.repo.store_many_if_version(stubs, expected)
        except BatchError as exc:
            report._fail(exc.failed, "entry not updated: " + str(next(iter(exc.failed.values()))))
            committed = set(exc.succeeded)
            report.skipped += len(stubs) - len(committed) - len(exc.failed)
        except BackendError as exc:
            report._fail(stubs, f"entry not updated: {exc}")
            return 0  # whether some landed is unknown: the segment stays
        else:
            report.skipped += len(stubs) - len(committed)
            if not committed:
                self._delete_segment(name)
        setattr(report, counter, getattr(report, counter) + len(committed))
        if counter == "moved":
            self._count("demotions", len(committed))
        elif self._progress is not None:  # moves report per scanned batch already
            self._progress(report)
        return len(committed)

    def _delete_segment(self, name: str) -> bool:
        store = self.catalog.segments
        assert store is not None
        try:
            store.delete(name)
        except BackendError as exc:  # garbage: a later sweep deletes it
            log.debug("could not delete segment %s now: %s", name, exc)
            return False
        return True

    # ------------------------------------------------------------ segments
    def segments(self, report: SweepReport, now: float) -> None:
        """Delete segments nothing points at; compact mostly dead ones, and
        pack the one-record segments single moves write, as :meth:`pack`
        packs objects."""
        catalog = self.catalog
        threshold = self.policy.compact_below
        sparse: list[tuple[str, dict[str, Entry]]] = []
        waiting = 0
        dead = False  # whether a segment in ``sparse`` has dead bytes to give back
        for segment in catalog.scan_segments(now):
            name, footer, entries, live = segment.name, segment.footer, segment.entries, segment.live
            if not live:
                # A young segment may be one whose stubs are being committed:
                # it goes once every record in it has moved on (as a payload
                # object does, see Catalog.is_garbage), or after the grace.
                if (now - created_at(name) > GARBAGE_GRACE
                        or all(catalog.is_garbage(name, version, entries.get(key), now, GARBAGE_GRACE)
                               for key, (version, _, _) in footer.frames.items())):
                    if self._delete_segment(name):
                        report.segments_deleted += 1
                continue
            wasted = segment.live_bytes < threshold * footer.frame_bytes
            if wasted or (threshold and len(footer.frames) == 1):
                sparse.append((name, live))
                waiting += len(live)
                dead = dead or wasted
                if waiting >= self._batch:
                    self.compact(sparse, report)
                    sparse, waiting, dead = [], 0, False
        if dead or waiting > 1:  # one lone record is no cheaper in a new segment
            self.compact(sparse, report)

    def compact(self, sparse: list[tuple[str, dict[str, Entry]]], report: SweepReport) -> None:
        """Copy the live records of the segments in ``sparse`` (name, live stubs)
        into one new segment, move their stubs, delete the old segments that
        no stub points at any more."""
        catalog = self.catalog
        stubs = {k: e for _, live in sparse for k, e in live.items()}
        values = self._values(stubs, report)
        if not values:
            return
        moved_before = report.compacted
        self._commit_segment(values, report, "compacted")
        if report.compacted == moved_before:
            return
        now_entries = catalog.repo.fetch_many(list(stubs))
        for name, live in sparse:
            still = [k for k in live if (e := now_entries.get(k)) is not None
                     and e.payload == live[k].payload]
            if not still and self._delete_segment(name):
                report.segments_deleted += 1

    def _values(self, stubs: dict[str, Entry], report: SweepReport
                ) -> dict[str, tuple[str, Metadata]]:
        """The payloads the live ``stubs`` stand for, read and checked against them."""
        catalog = self.catalog
        spans = {k: span for k, e in stubs.items() if (span := catalog.located_span(e)) is not None}
        names = {k: name for k, e in stubs.items() if (name := catalog.located_name(e))}
        found = catalog.fetch_frames(spans)
        found.update(catalog._fetch_payloads(names))
        values: dict[str, tuple[str, Metadata]] = {}
        for key, stub in stubs.items():
            value = Catalog._matching(stub, found.get(key))
            if value is None:
                # Missing or damaged: reads report it; moving it would hide that.
                report._fail((key,), "COLD payload missing or damaged; left where it is")
                continue
            values[key] = (value.payload, value.metadata)
        return values

    def pack(self, singles: dict[str, Entry], report: SweepReport) -> None:
        """Move payloads stored one per object (``singles``: their live stubs)
        into one segment, then delete the objects whose stubs moved."""
        if len(singles) < 2:
            return  # a segment of one is no cheaper than an object
        values = self._values(singles, report)
        if len(values) < 2:
            return
        before = report.packed
        self._commit_segment(values, report, "packed")
        if report.packed == before:
            return
        now_entries = self.catalog.repo.fetch_many(list(values))
        self.catalog.drop_payloads({k: singles[k].version for k in values
                                    if (e := now_entries.get(k)) is not None
                                    and e.payload != singles[k].payload})

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
        singles: dict[str, Entry] = {}
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
                if catalog.segments is None:
                    continue
                for name, (key, version) in parsed.items():
                    entry = entries.get(key)
                    if (entry is not None and entry.version == version and entry.kind == STUB
                            and entry.live(now) and catalog.located_name(entry) == name):
                        singles[key] = entry
                if len(singles) >= self._batch:
                    self.pack(singles, report)
                    singles = {}
            self.pack(singles, report)
            if catalog.segments is not None:
                self.segments(report, now)
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
