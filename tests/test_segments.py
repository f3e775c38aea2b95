"""COLD segments: a batch moved down is one file or object, each record one ranged read.

* the format refuses every damaged, stray or hostile span before a byte of it
  is returned (:mod:`tiered_state.segments`);
* the file and S3 segment stores, against the real SeaweedFS;
* through the public API on the embedded layout (SQLite + files) and the
  server layout (PostgreSQL + S3): the sweep writes one segment per batch, a
  bulk write to COLD one segment, a single write one object; compaction and
  packing keep every value; segments nothing points at are deleted; costs are
  reported; ``tiered-state upgrade --pack`` packs at once;
* a SIGKILL at any batch of a compaction leaves only garbage.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import TieringPolicy
from tiered_state.catalog import Catalog
from tiered_state.config import open_repository
from tiered_state.errors import IntegrityError
from tiered_state.record import Tier
from tiered_state.repositories.base import StateRepository
from tiered_state.segments import (
    TRAILER_BYTES,
    Location,
    build,
    created_at,
    footer_span,
    is_segment_name,
    new_name,
    read_footer,
    read_frame,
)
from tiered_state.testing import make

from .support import unique_name

COLD = Tier.COLD

PAD = "position size and fills " * 18  # ~430 bytes: a record of about 500 bytes


def records(count: int, start: int = 0) -> dict[str, tuple[str, Any]]:
    return {f"pos:{i:06d}": make({"i": i, "pad": PAD}, version=i + 1) for i in range(start, start + count)}


def frame_of(data: bytes, span: Location) -> bytes:
    return data[span.offset:span.offset + span.length]


# ---------------------------------------------------------------- the format
def test_every_frame_reads_back_from_its_span_alone() -> None:
    name = new_name()
    items = records(50)
    items["tiny"] = make("x", version=7)  # below the compression threshold
    items["ünï/../key"] = make({"k": "v" * 2000}, version=8)
    data, spans = build(name, items)
    assert is_segment_name(name) and abs(created_at(name) - time.time()) < 5
    for key, span in spans.items():
        entry = read_frame(frame_of(data, span), span, key)
        payload, md = items[key]
        assert entry.payload == payload and entry.key == key
        assert {k: entry.metadata[k] for k in ("checksum", "size_bytes", "version", "encoding")} == \
            {k: md[k] for k in ("checksum", "size_bytes", "version", "encoding")}
        assert entry.metadata["expires_at"] is None  # the catalog decides a record's life
        assert entry.valid()
    tail = data[-TRAILER_BYTES:]
    offset, length = footer_span(tail, name, len(data))
    footer = read_footer(data[offset:offset + length], tail, name)
    assert {k: footer.location(name, k) for k in footer.frames} == spans
    assert footer.frame_bytes == sum(s.length for s in spans.values())
    # Compressible payloads are stored compressed: 50 records take less than their text.
    assert len(data) < sum(len(p) for p, _ in items.values())


def test_a_damaged_byte_anywhere_in_a_frame_is_refused() -> None:
    name = new_name()
    data, spans = build(name, records(3))
    key = "pos:000001"
    span = spans[key]
    frame = frame_of(data, span)
    for position in range(len(frame)):
        damaged = bytearray(frame)
        damaged[position] ^= 0x41
        with pytest.raises(IntegrityError):
            read_frame(bytes(damaged), span, key)


def test_a_span_of_another_segment_key_or_length_is_refused() -> None:
    data, spans = build(new_name(), records(3))
    other, _ = build(new_name(), records(3))
    span = spans["pos:000001"]
    frame = frame_of(data, span)
    with pytest.raises(IntegrityError, match="no frame of it"):  # the same bytes in another segment
        read_frame(frame, Location(new_name(), span.offset, span.length), "pos:000001")
    with pytest.raises(IntegrityError, match="holds"):  # a stub pointing at another key's frame
        read_frame(frame, span, "pos:000002")
    with pytest.raises(IntegrityError, match="short read"):
        read_frame(frame[:-1], span, "pos:000001")
    wrong = spans["pos:000002"]
    with pytest.raises(IntegrityError):  # a span that starts one frame and ends in the next
        read_frame(data[span.offset + 1:span.offset + 1 + span.length], span, "pos:000001")
    with pytest.raises(IntegrityError):
        read_frame(frame_of(other, wrong), span, "pos:000001")


def test_a_frame_that_inflates_past_its_size_is_refused() -> None:
    # A frame whose CRC is right but whose body claims a tiny payload and
    # inflates to 64 MB: the bound stops it after size_bytes plus a margin.
    name = new_name()
    payload, md = make({"a": 1})
    data, spans = build(name, {"bomb": (payload, md)})
    span = spans["bomb"]
    frame = bytearray(frame_of(data, span))
    import struct

    header = struct.Struct(">2sBQQdd16sBHBI")
    fields = list(header.unpack_from(frame))
    body = zlib.compress(b"[" + b"0," * (32 << 20) + b"0]", 9)
    n_sum, n_key, n_enc = fields[7], fields[8], fields[9]
    fields[1], fields[10] = 1, len(body)
    head = header.pack(*fields)
    rest = bytes(frame[header.size:header.size + n_sum + n_key + n_enc])
    forged = head + rest + body
    forged += zlib.crc32(forged).to_bytes(4, "big")
    with pytest.raises(IntegrityError, match="inflates past"):
        read_frame(forged, Location(name, span.offset, len(forged)), "bomb")


def test_a_damaged_footer_or_trailer_is_refused() -> None:
    name = new_name()
    data, _ = build(name, records(5))
    tail = data[-TRAILER_BYTES:]
    offset, length = footer_span(tail, name, len(data))
    footer = bytearray(data[offset:offset + length])
    footer[3] ^= 1
    with pytest.raises(IntegrityError, match="footer"):
        read_footer(bytes(footer), tail, name)
    with pytest.raises(IntegrityError, match="trailer"):
        footer_span(tail[:-1] + b"X", name, len(data))
    with pytest.raises(IntegrityError, match="trailer"):
        footer_span(tail, name, len(data) + 1)  # not the end of this segment


@pytest.mark.parametrize("name", ["../escape", "seg-../../x", "/etc/passwd", "seg-0-0", "",
                                  "seg-0000000000000000-000000000000000g"])
def test_locators_that_are_no_segment_name_are_ignored(name: str) -> None:
    assert not is_segment_name(name)
    assert Location.parse({"segment": name, "offset": 0, "length": 10}) is None
    assert Location.parse({"segment": new_name(), "offset": -1, "length": 10}) is None
    assert Location.parse({"segment": new_name(), "offset": True, "length": 10}) is None


# ---------------------------------------------------------------- the stores
@pytest.fixture(params=["file", "s3"])
def cold(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[StateRepository]:
    url = (tmp_path / "cold").as_uri() if request.param == "file" else request.getfixturevalue("s3_url")
    with open_repository(url) as repo:
        yield repo


def test_the_store_holds_segments_apart_from_records(cold: StateRepository) -> None:
    store = cold.segments()
    assert store is not None
    name = new_name()
    data, spans = build(name, records(20))
    store.put(name, data)
    assert dict(store.list()) == {name: len(data)}
    assert cold.keys() == [] and list(cold.iter_all_keys()) == []  # never listed as keys
    span = spans["pos:000007"]
    assert store.read(name, span.offset, span.length) == frame_of(data, span)
    assert store.read_tail(name, TRAILER_BYTES) == data[-TRAILER_BYTES:]
    many = [(name, s.offset, s.length) for s in spans.values()]
    assert store.read_many(many) == [frame_of(data, s) for s in spans.values()]
    assert store.read(name, len(data) - 4, 100) == data[-4:]  # a short read, refused by read_frame
    missing = new_name()
    assert store.read(missing, 0, 10) is None and store.read_tail(missing, 10) is None
    assert store.read_many([(missing, 0, 1), (name, 0, 4)]) == [None, data[:4]]
    for hostile in ("../escape", "seg-x", "/etc/passwd"):
        with pytest.raises(IntegrityError):
            store.read(hostile, 0, 10)
        with pytest.raises(IntegrityError):
            store.put(hostile, b"x")
    store.delete(name)
    store.delete(name)  # absent is fine
    assert list(store.list()) == []
    assert cold.clear() == 0


def test_clear_removes_segments_too(cold: StateRepository) -> None:
    store = cold.segments()
    assert store is not None
    store.put(new_name(), build(new_name(), records(2))[0])
    cold.store("k", *make(1))
    assert cold.clear() == 1
    assert list(store.list()) == []


# ---------------------------------------------------------------- through the API
@pytest.fixture(params=["embedded", "server"])
def layout(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, Any]]:
    """``tiered_state.open`` arguments: memory + SQLite + files, or memory + PostgreSQL + S3."""
    config: dict[str, Any] = {"path": str(tmp_path / "store")}
    if request.param == "embedded":
        yield config
        return
    postgres_url = request.getfixturevalue("postgres_url")
    table = unique_name("seg").replace("-", "_")
    config["warm"] = f"{postgres_url}{'&' if '?' in postgres_url else '?'}table={table}"
    config["cold"] = request.getfixturevalue("s3_url")
    yield config
    import psycopg2

    with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
        cur.execute(f'DROP TABLE IF EXISTS "{table}"')


def opened(layout: dict[str, Any], **policy: Any) -> tiered_state.StateManager:
    defaults: dict[str, Any] = {"cold_after": 0, "batch_size": 200}
    return tiered_state.open(**layout, policy=TieringPolicy(**{**defaults, **policy}))


def segments_of(state: tiered_state.StateManager) -> dict[str, int]:
    store = state.repositories[COLD].segments()
    assert store is not None
    return dict(store.list())


def values(count: int, start: int = 0, tag: str = "") -> dict[str, Any]:
    return {f"pos:{i:06d}": {"i": i, "tag": tag, "pad": PAD} for i in range(start, start + count)}


def test_a_sweep_writes_one_segment_per_batch(layout: dict[str, Any]) -> None:
    with opened(layout) as state:
        state.set_many(values(1000), tier="warm")
        report = state.sweep()
        assert (report.moved, report.failed) == (1000, 0)
        assert len(segments_of(state)) == 5  # batch_size 200
        assert state.repositories[COLD].keys() == []  # no object per record
        assert {state.get_record(k, promote=False).tier.value
                for k in ("pos:000000", "pos:000999")} == {"cold"}
        assert state.get_many(list(values(1000))) == values(1000)


def test_one_cold_read_is_one_ranged_read(layout: dict[str, Any]) -> None:
    with opened(layout, promote_to=None) as state:
        state.set_many(values(300), tier="warm")
        state.sweep()
        catalog = state._catalog
        store = catalog.segments
        calls: list[tuple[str, int]] = []
        real = store.read_many

        def counting(spans: list[tuple[str, int, int]]) -> list[bytes | None]:
            calls.extend((name, length) for name, _, length in spans)
            return real(spans)

        store.read_many = counting  # type: ignore[method-assign]
        assert state.get("pos:000123") == values(300)["pos:000123"]
        assert len(calls) == 1 and calls[0][1] < 1000  # the record's span, not the segment


def test_a_bulk_write_to_cold_is_one_segment_and_a_single_write_one_object(layout: dict[str, Any]
                                                                           ) -> None:
    with opened(layout) as state:
        state.set_many(values(50), tier="cold")
        assert len(segments_of(state)) == 1 and state.repositories[COLD].keys() == []
        state.set("single", {"a": 1}, tier="cold")
        assert len(state.repositories[COLD].keys()) == 1
        assert state.get_many(list(values(50))) == values(50)
        assert state.get("single") == {"a": 1}
        # The next sweep packs objects of their own into a segment ...
        state.set("single2", {"a": 2}, tier="cold")
        report = state.sweep()
        assert report.packed == 2 and state.repositories[COLD].keys() == []
        assert (state.get("single"), state.get("single2")) == ({"a": 1}, {"a": 2})
        assert len(segments_of(state)) == 2


def test_a_single_demote_is_a_one_record_segment_and_a_sweep_packs_them(layout: dict[str, Any]
                                                                        ) -> None:
    with opened(layout, cold_after=None) as state:
        state.set_many(values(3), tier="warm")
        for key in values(3):
            assert state.demote(key, to="cold")
        assert len(segments_of(state)) == 3 and state.repositories[COLD].keys() == []
        report = state.sweep()
        assert (report.compacted, report.failed) == (3, 0)
        assert len(segments_of(state)) == 1
        assert state.get_many(list(values(3))) == values(3)
        state.set("lone", 1, tier="warm")
        state.demote("lone", to="cold")
        assert state.sweep().compacted == 0  # one record alone is no cheaper elsewhere
        assert len(segments_of(state)) == 2


def test_a_version_demoted_again_while_its_object_is_packed_stays_readable(
        layout: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """A pack deletes an object once its stub points at the new segment. If
    the key is promoted and demoted again at the same version in between, the
    new stub must not point at an object of that version's name, which the
    pack is about to delete (the demote once wrote exactly that object)."""
    with opened(layout, cold_after=None) as state, opened(layout, cold_after=None) as other:
        state.set("a", {"a": 1}, tier="cold")  # one object each: what a pack packs
        state.set("b", {"b": 2}, tier="cold")
        real = Catalog.drop_payloads
        raced: list[bool] = []

        def racing(catalog: Catalog, versions: Any) -> None:
            if versions and not raced:  # the pack's drop, after its stubs moved
                raced.append(other.promote("a", to="warm") and other.demote("a", to="cold"))
            real(catalog, versions)

        monkeypatch.setattr(Catalog, "drop_payloads", racing)
        report = state.sweep()
        assert raced == [True] and report.packed == 2
        monkeypatch.undo()
        assert state.get("a", promote=False) == {"a": 1} and other.get("a") == {"a": 1}
        assert state.get("b") == {"b": 2}
        assert state.repositories[COLD].keys() == []


@pytest.mark.parametrize("moves", [1, 3, 100])
def test_a_read_follows_a_record_the_sweep_moves_away_and_never_calls_it_corrupt(
        tmp_path: Path, moves: int) -> None:
    """Between a read's catalog lookup and its ranged read, another process
    moves the record to a new segment and deletes the old one (as a
    compaction does). The read follows it; if it keeps moving, the read fails
    with a BackendError to try again -- never an IntegrityError."""
    layout = {"path": str(tmp_path / "store")}
    with opened(layout, cold_after=None, promote_to=None) as state, \
            opened(layout, cold_after=None) as other:
        state.set("k", {"v": 1}, tier="warm")
        state.demote("k", to="cold")
        store = state._catalog.segments
        real = store.read_many
        moved: list[str] = []

        def moving(spans: list[tuple[str, int, int]]) -> list[bytes | None]:
            if len(moved) < moves:
                assert other.promote("k", to="warm") and other.demote("k", to="cold")
                store.delete(spans[0][0])
                moved.append(spans[0][0])
            return real(spans)

        store.read_many = moving  # type: ignore[method-assign]
        if moves < 9:
            assert state.get("k") == {"v": 1} and len(moved) == moves
        else:
            with pytest.raises(tiered_state.BackendError, match="moved below the catalog"):
                state.get("k")
            assert len(moved) == 9  # the first read and eight more
        store.read_many = real  # type: ignore[method-assign]
        assert state.get("k") == {"v": 1} and other.get("k") == {"v": 1}


def test_a_segment_collected_before_it_is_read_back_is_never_pointed_at(tmp_path: Path) -> None:
    """Another process's sweep may delete a new segment between its write and
    its read-back, once every record in it has moved on: the move then loses
    like any race, and a write writes again with new versions."""
    layout = {"path": str(tmp_path / "store")}
    with opened(layout) as state, opened(layout) as other:
        store = state._catalog.segments
        real = store.put
        collected: list[str] = []

        def collected_at_once(name: str, data: bytes) -> None:
            real(name, data)
            if not collected:
                other.set_many({"a": "newer", "b": "newer"}, tier="warm")  # both moved on
                store.delete(name)
                collected.append(name)

        store.put = collected_at_once  # type: ignore[method-assign]
        state.set_many({"a": 1, "b": 2}, tier="warm")
        report = state.sweep()
        assert collected and (report.moved, report.skipped, report.failed) == (0, 2, 0)
        assert state.get_many(["a", "b"], promote=False) == {"a": "newer", "b": "newer"}
        assert state.get_record("a", promote=False).tier is Tier.WARM

        written: list[str] = []

        def first_one_collected(name: str, data: bytes) -> None:
            real(name, data)
            if not written:
                store.delete(name)
            written.append(name)

        store.put = first_one_collected  # type: ignore[method-assign]
        versions = state.set_many({"c": 3, "d": 4}, tier="cold")  # written again, new versions
        assert len(written) == 2 and state.get_many(["c", "d"]) == {"c": 3, "d": 4}
        assert {state.get_record(k, promote=False).version for k in "cd"} == set(versions.values())
        assert written[1] in segments_of(state) and written[0] not in segments_of(state)


def test_touch_racing_a_compaction_never_names_the_retired_segment(layout: dict[str, Any]) -> None:
    """A touch of a record in COLD that a compaction moves to a new segment
    (same version) between the touch's read and its write: the old segment
    is deleted, and the touched entry must not name it."""
    with opened(layout, cold_after=None, promote_to=None) as state, \
            opened(layout, cold_after=None, compact_below=1.0) as other:
        state.set_many({"k": {"v": 1}, "gone": 0}, tier="cold")
        version = state.get_record("k").version
        repo = state._catalog.repo
        real = repo.store_if_version
        retired = segments_of(state)

        def compacted_first(*args: Any) -> bool:
            if set(segments_of(state)) == set(retired):
                other.delete("gone")  # a dead frame: compacted at once
                report = other.sweep()
                assert report.compacted == 1 and report.segments_deleted == 1
            return real(*args)

        repo.store_if_version = compacted_first  # type: ignore[method-assign]
        assert state.touch("k", 3600) is True
        repo.store_if_version = real  # type: ignore[method-assign]
        assert not set(retired) & set(segments_of(state))
        record = state.get_record("k")
        assert record.value == {"v": 1} and record.version == version
        assert record.expires_at is not None and record.expires_at > time.time() + 3000
        assert other.get("k") == {"v": 1}


def test_compaction_keeps_every_value_and_frees_the_dead_bytes(layout: dict[str, Any]) -> None:
    with opened(layout) as state:
        state.set_many(values(1000), tier="warm")
        state.sweep()
        before = segments_of(state)
        # Overwrite 70 % and delete 10 %: every segment is mostly dead.
        expected = values(1000)
        overwrite = {k: {**v, "tag": "new"} for k, v in expected.items() if v["i"] % 10 < 7}
        state.set_many(overwrite, tier="warm")
        gone = [k for k, v in expected.items() if v["i"] % 10 == 7]
        state.delete_many(gone)
        expected.update(overwrite)
        for key in gone:
            del expected[key]
        cost = state.stats()["tiers"]["cold"]["cost"]
        assert cost["segments"] == 5 and cost["dead_fraction"] > 0.75
        report = state.sweep()
        assert report.failed == 0 and report.compacted == 200  # the 20 % left, in one segment
        after = segments_of(state)
        assert not set(before) & set(after)  # every old segment deleted
        assert state.get_many(list(values(1000))) == expected
        cost = state.stats()["tiers"]["cold"]["cost"]
        assert cost["dead_fraction"] < 0.05 and cost["records"] == 900


def test_segments_nothing_points_at_are_deleted(layout: dict[str, Any]) -> None:
    with opened(layout) as state:
        state.set_many(values(400), tier="warm")
        state.sweep()
        assert len(segments_of(state)) == 2
        state.delete_many(list(values(400)))
        report = state.sweep()
        assert report.segments_deleted == 2 and segments_of(state) == {}


def test_a_damaged_frame_fails_its_own_key_only(layout: dict[str, Any], tmp_path: Path) -> None:
    with opened(layout, promote_to=None) as state:
        state.set_many(values(10), tier="warm")
        state.sweep()
        (name, size), = segments_of(state).items()
        catalog = state._catalog
        span = catalog.located_span(catalog.repo.fetch_record("pos:000004"))
        store = catalog.segments
        data = bytearray(store.read(name, 0, size))
        data[span.offset + span.length // 2] ^= 0xFF
        # Damage in place, as a disk or a bucket might: same name, same size.
        store.delete(name)
        store.put(name, bytes(data))
        with pytest.raises(IntegrityError):
            state.get("pos:000004")
        others = [k for k in values(10) if k != "pos:000004"]
        assert state.get_many(others) == {k: values(10)[k] for k in others}
        # The sweep never moves or hides it: it stays reported, not lost.
        state.set("pos:000005", "overwritten", tier="warm")
        report = state.sweep()
        assert "pos:000004" not in report.errors or "damaged" in report.errors["pos:000004"]
        with pytest.raises(IntegrityError):
            state.get("pos:000004")


def test_cold_files_cost_close_to_their_payload_bytes(tmp_path: Path) -> None:
    with opened({"path": str(tmp_path / "store")}, batch_size=500) as state:
        written = values(5000)
        state.set_many(written, tier="warm")
        state.sweep()
        payload_bytes = sum(len(tiered_state.codec.encode(v)) for v in written.values())
        folder = tmp_path / "store" / "cold"
        allocated = sum(p.stat().st_blocks * 512 for p in folder.rglob("*") if p.is_file())
        assert allocated <= 1.3 * payload_bytes, (allocated, payload_bytes)
        cost = state.stats()["tiers"]["cold"]["cost"]
        assert cost["records"] == 5000 and cost["segments"] == 10
        assert cost["allocated_bytes"] <= 1.3 * payload_bytes


def test_upgrade_pack_moves_every_single_object_into_segments(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with opened({"path": str(path)}, cold_after=None) as state:
        for key, value in values(30).items():
            state.set(key, value, tier="cold")  # one object each
        assert len(state.repositories[COLD].keys()) == 30
    done = subprocess.run([sys.executable, "-m", "tiered_state", "--path", str(path), "upgrade",
                           "--pack", "--json"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert '"packed": 30' in done.stdout
    with opened({"path": str(path)}, cold_after=None) as state:
        assert state.repositories[COLD].keys() == [] and len(segments_of(state)) == 1
        assert state.get_many(list(values(30))) == values(30)


def test_doctor_warns_about_dead_bytes(tmp_path: Path) -> None:
    path = tmp_path / "store"
    with opened({"path": str(path)}) as state:
        state.set_many(values(400), tier="warm")
        state.sweep()
        state.set_many({k: 0 for k in list(values(400))[:300]}, tier="warm")
    done = subprocess.run([sys.executable, "-m", "tiered_state", "--path", str(path), "doctor"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning: cold: 75% of its bytes are dead" in done.stdout


def test_an_expired_record_in_a_segment_is_gone_and_its_frame_dead(layout: dict[str, Any]) -> None:
    with opened(layout, purge_after=0) as state:
        state.set_many(values(5), tier="warm", ttl=0.5)
        state.set_many(values(5, start=5), tier="warm")
        state.sweep()
        time.sleep(0.6)
        assert state.get_many(list(values(10))) == values(5, start=5)
        state.sweep()
        cost = state.stats()["tiers"]["cold"]["cost"]
        assert cost["records"] == 5


# ---------------------------------------------------------------- crash safety
CHILD = r"""
import sys, time
import tiered_state
path, batches_file = sys.argv[1], sys.argv[2]
policy = tiered_state.TieringPolicy(cold_after=None, batch_size=100, compact_below=0.9)
state = tiered_state.open(path, policy=policy)
print("sweeping", flush=True)
state.sweep(progress=lambda r: print("batch", r.compacted, flush=True))
print("done", flush=True)
time.sleep(60)  # the parent kills us
"""


@pytest.mark.parametrize("batches", [0, 1, 2, 4])
def test_sigkill_during_compaction_leaves_only_garbage(tmp_path: Path, batches: int) -> None:
    path = tmp_path / "store"
    expected = values(1000)
    with opened({"path": str(path)}, batch_size=100) as state:
        state.set_many(expected, tier="warm")
        state.sweep()
        assert len(segments_of(state)) == 10
        changed = {k: {**v, "tag": "new"} for k, v in expected.items() if v["i"] % 4 == 0}
        state.set_many(changed, tier="warm")  # a quarter of each segment dead
        expected.update(changed)
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path), ""], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None
        assert child.stdout.readline().startswith("sweeping")
        for _ in range(batches):
            line = child.stdout.readline()
            assert line.startswith("batch"), f"the compaction ended before the kill: {line!r}"
        if batches == 0:
            time.sleep(0.05)  # somewhere inside the first batch
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(30)
    with opened({"path": str(path)}, batch_size=100) as state:
        assert state.get_many(list(expected)) == expected
        report = state.sweep()  # finishes the interrupted compaction
        assert report.failed == 0
        assert state.get_many(list(expected)) == expected
        catalog: Catalog = state._catalog
        live = {s.name: s for s in catalog.scan_segments(time.time())}
        # Every stub points at a segment that exists; what is left over is
        # garbage no stub points at (deleted by later sweeps).
        stubs = 0
        for key in expected:
            entry = catalog.repo.fetch_record(key)
            span = catalog.located_span(entry)  # the last sweep moved the overwritten ones too
            assert span is not None and span.segment in live
            stubs += 1
        assert stubs == 1000 and sum(len(s.live) for s in live.values()) == stubs
