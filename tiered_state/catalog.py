"""The catalog: the one authority on every key.

The first durable tier of a manager (WARM; COLD when WARM is off; the only
tier when there is one) holds an *entry* for every key that exists or was
deleted recently:

* a **value**: the record itself, payload included;
* a **stub**: the record's metadata and a *locator* naming where its payload
  is -- an object of the payload tier (COLD, when the catalog is WARM);
* a **tombstone**: a versioned delete.

Everything the manager knows about a key it learns here, and every change to a
key is one conditional write of its entry (:mod:`tiered_state.repositories.base`,
"Conditional writes"), so two writers can never both win and no copy elsewhere
can outvote the catalog.

Payloads below the catalog are written *before* the entry that points at them
and are never overwritten with other content: each is named after its key and
version (:func:`payload_name`), or -- when a batch goes down at once and the
tier below keeps segments -- lies in a segment written once under a fresh
name (:mod:`tiered_state.segments`), the stub naming its span. A payload no
entry references is garbage -- never read, and removed by the sweep
(:meth:`Catalog.is_garbage`; a segment once no live stub names it).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

from . import codec, segments
from .codec import JSON, Codec, decode_entry
from .errors import BackendError, BatchError, IntegrityError, InvalidKeyError, SerializationError
from .keys import MAX_KEY_BYTES, validate_key
from .record import STUB, Entry, Metadata, Record, Tier, is_value, make_stub
from .repositories.base import Items, StateRepository, chunked
from .segments import Footer, Location, SegmentStore

__all__ = [
    "RESERVED_PREFIX",
    "Catalog",
    "Resolved",
    "SegmentCollected",
    "SegmentState",
    "is_payload_name",
    "parse_payload_name",
    "payload_name",
    "user_key",
]

log = logging.getLogger(__name__)

#: Keys under this prefix are the library's own bookkeeping: never listed,
#: refused as user keys.
RESERVED_PREFIX = "__tiered_state__:"

_HEX = frozenset("0123456789abcdef")
#: Segment footers kept per process (a few KiB each).
_FOOTER_CACHE = 4096
#: How many more times a read follows a key whose payload moved away between
#: its catalog read and its payload read (each time a sweep finished a move of
#: that very key in between) before it gives up with a BackendError.
_READ_AGAIN = 8


def payload_name(key: str, version: int) -> str:
    """The name under which version ``version`` of ``key``'s payload is stored below the catalog.

    ``<key>@<version, 16 hex digits>``; a key too long for that becomes
    ``~<sha256 of the key>~<version>``. Versions are unique, so a name is
    written once: two copies of one name are the same bytes.
    """
    suffix = f"@{version:016x}"
    if len(key.encode("utf-8")) + len(suffix) <= MAX_KEY_BYTES:
        return key + suffix
    return "~" + hashlib.sha256(key.encode("utf-8")).hexdigest() + f"~{version:016x}"


def parse_payload_name(name: str) -> tuple[str, int] | None:
    """``(key, version)`` of a payload name; None for a hashed name (its key is
    not recoverable) or a name that is not a payload's."""
    if len(name) < 18 or name[-17] != "@" or not _HEX.issuperset(name[-16:]):
        return None
    return name[:-17], int(name[-16:], 16)


def is_payload_name(name: str, version: int) -> bool:
    """True if ``name`` is the payload name of some key at ``version``."""
    parsed = parse_payload_name(name)
    if parsed is not None:
        return parsed[1] == version
    return (len(name) == 82 and name[0] == "~" and name[65] == "~"
            and _HEX.issuperset(name[1:65]) and name[66:] == f"{version:016x}")


def user_key(key: object) -> str:
    """``key`` if it may be used by an application: valid, and not reserved.

    :raises InvalidKeyError: invalid (see :func:`tiered_state.keys.validate_key`),
        or starting with :data:`RESERVED_PREFIX`.
    """
    key = validate_key(key)
    if key[:1] == "_" and key.startswith(RESERVED_PREFIX):
        raise InvalidKeyError(f"keys starting with {RESERVED_PREFIX!r} are reserved")
    return key


@dataclass(frozen=True, slots=True)
class Resolved:
    """A key's current value as a read sees it: the entry (payload = the value's
    payload, metadata = the catalog's) and the tier its payload came from."""

    entry: Entry
    tier: Tier

    def record(self, codec: Codec = JSON) -> Record:
        """The :class:`~tiered_state.record.Record` a caller gets: the value
        decoded by the store's ``codec`` (see :func:`~tiered_state.codec.decode_entry`).

        :raises SerializationError: the record was written by another codec.
        """
        md = self.entry.metadata
        return Record(
            key=self.entry.key,
            value=decode_entry(self.entry.payload, md["encoding"], codec),
            version=md["version"],
            checksum=md["checksum"],
            size_bytes=md["size_bytes"],
            created_at=md["created_at"],
            updated_at=md["updated_at"],
            expires_at=md["expires_at"],
            tier=self.tier,
        )


class SegmentCollected(Exception):
    """A segment just written was deleted as garbage before it was read back."""


@dataclass(frozen=True, slots=True)
class SegmentState:
    """A segment as the catalog sees it now.

    :ivar entries: the catalog entries of the keys it holds frames of.
    :ivar live: those entries that are live stubs pointing at its frames.
    """

    name: str
    size: int
    footer: Footer
    entries: dict[str, Entry]
    live: dict[str, Entry]

    @property
    def live_bytes(self) -> int:
        return sum(self.footer.frames[key][2] for key in self.live)


class Catalog:
    """The catalog repository and the payload tier below it.

    :param tier: the catalog's tier.
    :param repo: the catalog's repository.
    :param payloads: the tier and repository that hold payloads of stubs (COLD
        under a WARM catalog), or None.
    """

    def __init__(
        self,
        tier: Tier,
        repo: StateRepository,
        payloads: tuple[Tier, StateRepository] | None = None,
    ) -> None:
        self.tier = tier
        self.repo = repo
        self.payload_tier = payloads[0] if payloads else None
        self.payload_repo = payloads[1] if payloads else None
        #: Where batches moved below the catalog go, one segment each (None:
        #: the tier below keeps one object per payload).
        self.segments: SegmentStore | None = (
            self.payload_repo.segments() if self.payload_repo is not None else None)
        self._footers: dict[str, Footer] = {}

    # ------------------------------------------------------------ locators
    def locator(self, name: str) -> str:
        """A stub's payload: where its value's bytes are."""
        assert self.payload_tier is not None
        return codec.encode({"name": name, "tier": self.payload_tier.value})

    def segment_locator(self, where: Location) -> str:
        """A stub's payload when its value lies in a segment: the span."""
        assert self.payload_tier is not None
        return codec.encode({**where.as_dict(), "tier": self.payload_tier.value})

    @staticmethod
    def _locator(stub: Entry) -> object:
        try:
            return codec.decode(stub.payload)
        except SerializationError:
            return None

    @classmethod
    def located_name(cls, stub: Entry) -> str | None:
        """The payload name a stub points at (None: a segment's span, or not a
        locator this version wrote)."""
        data = cls._locator(stub)
        name = data.get("name") if isinstance(data, dict) else None
        return name if isinstance(name, str) else None

    @classmethod
    def located_span(cls, stub: Entry) -> Location | None:
        """The segment span a stub points at (None: a payload name, or not a locator)."""
        return Location.parse(cls._locator(stub))

    def holds(self, tier: Tier) -> bool:
        """True if a write aimed at ``tier`` keeps its payload in the catalog row."""
        return tier is self.tier or self.payload_tier is None or tier is not self.payload_tier

    # ------------------------------------------------------------ reads
    def resolve(self, entries: Mapping[str, Entry], now: float, *, _again: int = _READ_AGAIN
                ) -> tuple[dict[str, Resolved], list[str]]:
        """The values of live catalog entries: values as they are, stubs with
        their payloads read and checked against the stub.

        A value whose payload fails its checksum (or is not text at all) is
        replaced by a valid copy of the same version below the catalog if
        there is one (and the catalog row repaired); otherwise the key is
        reported corrupt. A payload below that cannot even be read (its
        header fails its own check) counts as missing, for its key alone.

        A stub whose payload is missing or wrong is read again: a writer (or
        the sweep) that replaced the entry since it was read may have dropped
        that payload, and then the key is resolved from its new entry.

        :returns: ``(key -> Resolved, corrupt keys)``; dead entries (absent,
            expired, tombstones) are in neither.
        :raises BackendError: a key's payload moved away again each time it
            was read (a lost race, not damage: reading again will do).
        """
        found: dict[str, Resolved] = {}
        stubs: dict[str, Entry] = {}
        damaged: dict[str, Entry] = {}
        for key, entry in entries.items():
            if not entry.live(now):
                continue
            if entry.metadata["encoding"] == STUB:
                stubs[key] = entry
            elif entry.valid():
                found[key] = Resolved(entry, self.tier)
            else:
                log.error("checksum mismatch for key %r in the catalog (%s)", key, self.tier.value)
                damaged[key] = entry
        corrupt: list[str] = []
        if stubs or damaged:
            names = {key: self.located_name(e) or "" for key, e in stubs.items()}
            names.update((key, payload_name(key, e.version)) for key, e in damaged.items())
            payloads = self._fetch_payloads(names)
            spans = {key: span for key, e in stubs.items()
                     if not names[key] and (span := self.located_span(e)) is not None}
            payloads.update(self.fetch_frames(spans))
            missing: list[str] = []
            for key, stub in stubs.items():
                value = self._matching(stub, payloads.get(key))
                if value is None:
                    missing.append(key)
                else:
                    found[key] = Resolved(value, self.payload_tier or self.tier)
            if missing:
                now_entries = self.repo.fetch_many(missing)
                # Moved on: a newer version, or the same one elsewhere (compacted
                # into another segment, or promoted into the catalog).
                moved = {k: e for k, e in now_entries.items()
                         if e.version != stubs[k].version or e.payload != stubs[k].payload}
                for key in missing:
                    if key in moved or key not in now_entries:
                        continue  # replaced or deleted since it was read: not corrupt
                    log.error("the payload of key %r (%s) is missing or fails its checksum",
                              key, names[key] or stubs[key].payload)
                    corrupt.append(key)
                if moved and not _again:
                    raise BackendError(
                        f"{len(moved)} key(s) moved below the catalog each of the "
                        f"{_READ_AGAIN + 1} times they were read, a sweep compacting them "
                        f"meanwhile; read them again: {sorted(moved)[:5]}")
                if moved:
                    more, still = self.resolve(moved, now, _again=_again - 1)
                    found.update(more)
                    corrupt.extend(still)
            for key, bad in damaged.items():
                copy = self._matching(bad, payloads.get(key))
                if copy is None:
                    corrupt.append(key)
                    continue
                self._repair(bad, copy)
                found[key] = Resolved(copy, self.payload_tier or self.tier)
        return found, corrupt

    def _fetch_payloads(self, names: Mapping[str, str]) -> dict[str, Entry]:
        """key -> the payload entry stored under ``names[key]`` (absent ones left out)."""
        repo = self.payload_repo
        if repo is None:
            return {}
        wanted = {name: key for key, name in names.items() if name}
        if not wanted:
            return {}
        if len(wanted) == 1:
            (name, key), = wanted.items()
            try:
                entry = repo.fetch_record(name)
            except IntegrityError as exc:
                log.error("payload %r cannot be read: %s", name, exc)
                return {}
            return {} if entry is None else {key: entry}
        return {wanted[n]: e for n, e in self._readable(list(wanted)).items()}

    def fetch_frames(self, spans: Mapping[str, Location]) -> dict[str, Entry]:
        """key -> the payload entry in segment span ``spans[key]``; absent and
        unreadable ones (logged) left out, as :meth:`_readable` does."""
        store = self.segments
        if store is None or not spans:
            return {}
        keys = list(spans)
        read = store.read_many([(spans[k].segment, spans[k].offset, spans[k].length) for k in keys])
        found: dict[str, Entry] = {}
        for key, data in zip(keys, read):
            if data is None:
                continue
            try:
                found[key] = segments.read_frame(data, spans[key], key)
            except IntegrityError as exc:
                log.error("payload of %r in segment %s cannot be read: %s",
                          key, spans[key].segment, exc)
        return found

    def _readable(self, names: list[str]) -> dict[str, Entry]:
        """The payload entries stored under ``names``, absent ones left out --
        and unreadable ones too (logged): a payload whose stored form fails
        its own integrity check is as good as missing, and must not keep the
        rest of a batch from being read.
        """
        repo = self.payload_repo
        assert repo is not None
        try:
            return repo.fetch_many(names)
        except BatchError as exc:
            unreadable = {n: e for n, e in exc.failed.items() if isinstance(e, IntegrityError)}
            if len(unreadable) < len(exc.failed):
                raise
        for name, error in sorted(unreadable.items()):
            log.error("payload %r cannot be read: %s", name, error)
        return repo.fetch_many([n for n in names if n not in unreadable])

    @staticmethod
    def _matching(stub: Entry, payload: Entry | None) -> Entry | None:
        """The value ``stub`` stands for, if ``payload`` is exactly it; else None.

        The payload must be a value of the stub's version whose bytes match the
        stub's checksum: a stray or stale object can never pass for it.
        """
        if payload is None or not is_value(payload.metadata):
            return None
        if payload.version != stub.version:
            return None
        metadata = stub.metadata.copy()
        metadata["encoding"] = payload.metadata["encoding"]
        value = Entry(stub.key, payload.payload, metadata)
        return value if value.valid() else None

    def _repair(self, bad: Entry, good: Entry) -> None:
        try:
            if self.repo.store_if_version(bad.key, good.payload, good.metadata, bad.version):
                log.warning("replaced a corrupt catalog row of key %r by its copy below", bad.key)
        except BackendError as exc:  # a repair is a bonus; the read succeeds without it
            log.warning("could not repair the catalog row of key %r: %s", bad.key, exc)

    # ------------------------------------------------------------ writes
    def lift(self, values: Mapping[str, Entry]) -> set[str]:
        """Turn stubs back into the values they stand for, at the same version
        (a promotion into the catalog); a lost race is simply skipped.

        :returns: the keys whose entry now holds its value.
        """
        if not values:
            return set()
        try:
            return self.repo.store_many_if_version(
                {k: (e.payload, e.metadata) for k, e in values.items()},
                {k: e.version for k, e in values.items()},
            )
        except BackendError as exc:
            log.warning("promotion to %s skipped: %s", self.tier.value, exc)
            return set()

    def stub_for(self, key: str, payload_md: Metadata) -> tuple[str, Metadata]:
        """The catalog entry of a value whose payload lives below the catalog."""
        return make_stub(payload_md, self.locator(payload_name(key, payload_md["version"])))

    def store_segment(self, items: Items) -> tuple[str, dict[str, tuple[str, Metadata]]]:
        """Write the payloads of ``items`` below the catalog as one new segment,
        read it back whole, and return its name and the stub of each key
        pointing at its span (with the metadata ``items`` give).

        :raises SegmentCollected: another process's sweep deleted it before it
            was read back: every record in it had moved on meanwhile.
        :raises BackendError: the segment could not be stored, or did not read
            back as written (it is deleted then: nothing can reference it yet).
        """
        store = self.segments
        assert store is not None
        name = segments.new_name()
        data, spans = segments.build(name, items)
        store.put(name, data)
        back = store.read(name, 0, len(data))
        if back is None:
            # Never point a stub at it: the records it holds are all newer or
            # gone in the catalog (see Catalog.is_garbage), so their moves lose.
            raise SegmentCollected(name)
        if back != data:
            store.delete(name)
            raise BackendError(f"segment {name} did not read back as written")
        return name, {key: make_stub(items[key][1], self.segment_locator(span))
                      for key, span in spans.items()}

    def footer(self, name: str, size: int) -> Footer | None:
        """The index of segment ``name`` (``size`` bytes), read once per process
        (segments never change); None if it is gone.

        :raises IntegrityError: its trailer or footer is damaged.
        """
        found = self._footers.get(name)
        if found is not None:
            return found
        store = self.segments
        assert store is not None
        tail = store.read_tail(name, segments.TRAILER_BYTES)
        if tail is None:
            return None
        offset, length = segments.footer_span(tail, name, size)
        data = store.read(name, offset, length)
        if data is None:
            return None
        found = segments.read_footer(data, tail, name)
        if len(self._footers) >= _FOOTER_CACHE:
            self._footers.clear()
        self._footers[name] = found
        return found

    def scan_segments(self, now: float) -> Iterator[SegmentState]:
        """Every segment below the catalog with its index and the live stubs
        pointing into it, streamed. A segment whose index is damaged is logged
        and left out (reads of its records report them).
        """
        store = self.segments
        assert store is not None
        for name, size in list(store.list()):
            try:
                footer = self.footer(name, size)
            except IntegrityError as exc:
                log.error("segment %s cannot be indexed, left alone: %s", name, exc)
                continue
            if footer is None:
                continue  # deleted meanwhile
            entries: dict[str, Entry] = {}
            for chunk in chunked(list(footer.frames), 1000):
                entries.update(self.repo.fetch_many(chunk))
            live: dict[str, Entry] = {}
            for key, (version, offset, length) in footer.frames.items():
                entry = entries.get(key)
                if (entry is not None and entry.version == version and entry.kind == STUB
                        and entry.live(now)
                        and self.located_span(entry) == Location(name, offset, length)):
                    live[key] = entry
            yield SegmentState(name, size, footer, entries, live)

    def store_payloads(self, items: Items) -> dict[str, BaseException]:
        """Write payloads below the catalog, each under its :func:`payload_name`.

        Payloads never expire on their own: the catalog decides their life.

        :returns: ``key -> error`` for the payloads a batch could not store
            (a single payload's error, or a whole batch's, is raised).
        """
        repo = self.payload_repo
        assert repo is not None
        named: dict[str, tuple[str, Metadata]] = {}
        keys: dict[str, str] = {}
        for key, (payload, metadata) in items.items():
            md = metadata.copy()
            md["expires_at"] = None
            name = payload_name(key, md["version"])
            named[name] = (payload, md)
            keys[name] = key
        if len(named) == 1:
            (name, (payload, md)), = named.items()
            repo.store(name, payload, md)
            return {}
        try:
            repo.store_many(named)
        except BatchError as exc:
            return {keys[name]: error for name, error in exc.failed.items() if name in keys}
        return {}

    def verify_payloads(self, items: Items) -> set[str]:
        """The keys whose payload is stored below the catalog exactly as given."""
        assert self.payload_repo is not None
        names = {payload_name(k, md["version"]): k for k, (_, md) in items.items()}
        copies = self._readable(list(names))
        good: set[str] = set()
        for name, key in names.items():
            copy = copies.get(name)
            payload, md = items[key]
            if (copy is not None and copy.payload == payload and copy.version == md["version"]
                    and copy.valid()):
                good.add(key)
        return good

    def drop_payloads(self, versions: Mapping[str, int]) -> None:
        """Delete payloads no entry can reference any more (best effort: the
        sweep's garbage collection gets whatever this misses)."""
        repo = self.payload_repo
        if repo is None or not versions:
            return
        names = {payload_name(k, v): v for k, v in versions.items()}
        try:
            repo.delete_many_if_version(names)
        except BackendError as exc:  # garbage left behind is collected later
            log.debug("could not drop %d unreferenced payloads now: %s", len(names), exc)

    # ------------------------------------------------------------ garbage
    @staticmethod
    def is_garbage(name: str, version: int, entry: Entry | None, now: float, grace: float) -> bool:
        """True if the payload ``name`` (of ``version``) can never be referenced again.

        * The key's entry has moved past that version, or holds it but is dead
          (deleted or expired): entries only move forward, and a stub for a
          version is only ever committed over the live value of that version.
        * The entry is absent or older: the payload may belong to a write still
          in flight (stored, not yet committed), so it is garbage only once it
          is older than ``grace`` -- its age read from the version, which is
          the writer's clock in microseconds.
        """
        if entry is not None and (entry.version > version
                                  or (entry.version == version and not entry.live(now))):
            return True
        if entry is not None and entry.version == version:
            return False  # the current record: referenced, or a copy a demote may commit
        written = (version >> 10) / 1e6
        return now - written > grace

    def scan_payloads(self) -> Iterable[str]:
        """Every name stored in the payload tier."""
        repo = self.payload_repo
        return () if repo is None else repo.iter_all_keys()

