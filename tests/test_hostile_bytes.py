"""Stored bytes nobody should have written: reads fail safe, never strange.

Whatever a store holds -- text that is not UTF-8 in the SQLite catalog, a
flipped bit in a cold file, a decompression bomb in a cold file or an S3
object, damaged S3 object metadata -- a read returns the exact record that
was stored or raises :class:`~tiered_state.errors.IntegrityError` (a valid
copy elsewhere is served instead where there is one), never a foreign
exception, never changed metadata, and batch reads, listings and the sweep go
on past the bad record.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import time
import tracemalloc
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import IntegrityError, StateManager, Tier, TieredStateError, TieringPolicy, codec
from tiered_state.catalog import payload_name
from tiered_state.errors import BatchError
from tiered_state.record import Entry, make_metadata
from tiered_state.repositories.filesystem_repository import FileSystemStateRepository, _locate
from tiered_state.repositories.s3_repository import S3StateRepository

HOT, WARM, COLD = Tier.HOT, Tier.WARM, Tier.COLD
SECRET = "s3cr3t-value"


# ====================================================================== SQLite
def corrupt_warm_row(state: StateManager, key: str) -> None:
    """Write a payload that is not UTF-8 into ``key``'s catalog row, with sqlite3 directly."""
    path = state.repositories[WARM].path  # type: ignore[attr-defined]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        raw = b'{"v":"' + SECRET.encode() + b'\xff\xfe"}'
        assert conn.execute("UPDATE tiered_state SET payload = CAST(? AS TEXT) WHERE key = ?",
                            (raw, key)).rowcount == 1
    finally:
        conn.close()
    state.repositories[HOT].delete(key)  # so reads go to the catalog


def raw_warm_payload(state: StateManager, key: str) -> bytes:
    path = state.repositories[WARM].path  # type: ignore[attr-defined]
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        row = conn.execute("SELECT CAST(payload AS BLOB), encoding FROM tiered_state WHERE key = ?",
                           (key,)).fetchone()
    finally:
        conn.close()
    assert row is not None and row[1] == "json"
    return row[0]  # type: ignore[no-any-return]


@pytest.fixture
def state(tmp_path: Path) -> Iterator[StateManager]:
    # A tiny cold_after: every value is idle for the sweep.
    with tiered_state.open(tmp_path / "store", policy=TieringPolicy(cold_after=0.001)) as manager:
        yield manager


def with_cold_copy(state: StateManager, key: str, value: Any) -> None:
    """``key`` as a value in the catalog (WARM) with a valid COLD copy of the same version."""
    state.set(key, value, tier="cold")
    state.get(key)
    assert state.promote(key, to="warm")
    entry = state.repositories[WARM].fetch_record(key)
    assert entry is not None and entry.kind == "value"


def test_undecodable_catalog_payload_is_served_from_its_cold_copy_and_repaired(
    state: StateManager,
) -> None:
    value = {"v": SECRET}
    with_cold_copy(state, "bad", value)
    state.set("good", 1, tier="warm")
    version = state.get_record("bad").version  # type: ignore[union-attr]

    corrupt_warm_row(state, "bad")
    assert state.get("bad") == value
    # The catalog row is repaired from the copy: valid text, same version.
    assert raw_warm_payload(state, "bad") == codec.encode(value).encode()
    record = state.get_record("bad")
    assert record is not None and record.value == value and record.version == version

    corrupt_warm_row(state, "bad")
    state.repositories[HOT].delete("good")
    assert state.get_many(["bad", "good", "absent"]) == {"bad": value, "good": 1}

    corrupt_warm_row(state, "bad")
    records = {r.key: r.value for r in state.iter_records()}
    assert records == {"bad": value, "good": 1}


def test_undecodable_catalog_payload_without_a_copy_is_an_integrity_error(
    state: StateManager, caplog: pytest.LogCaptureFixture
) -> None:
    state.set("only", {"v": SECRET}, tier="warm")
    state.set("good", 1, tier="warm")
    corrupt_warm_row(state, "only")
    with pytest.raises(IntegrityError) as info:
        state.get("only")
    assert SECRET not in str(info.value) and info.value.key == "only"
    with pytest.raises(IntegrityError) as info:
        state.get_record("only")
    assert SECRET not in str(info.value)
    # A batch names the bad key without its value ...
    with pytest.raises(IntegrityError) as info:
        state.get_many(["good", "only"])
    assert "only" in str(info.value) and SECRET not in str(info.value)
    # ... and a listing reports it and carries on.
    failed: dict[str, IntegrityError] = {}
    records = [r.key for r in state.iter_records(on_error=failed.__setitem__)]
    assert records == ["good"] and list(failed) == ["only"]
    assert sorted(state.keys()) == ["good", "only"]
    assert state.get("good") == 1
    assert SECRET not in caplog.text


def test_sweep_carries_on_past_an_undecodable_value_and_reports_it(
    state: StateManager, caplog: pytest.LogCaptureFixture
) -> None:
    with_cold_copy(state, "repairable", {"v": 1})
    state.set("only", {"v": SECRET}, tier="warm")
    state.set_many({f"k{i}": i for i in range(5)}, tier="warm")
    corrupt_warm_row(state, "repairable")
    corrupt_warm_row(state, "only")
    time.sleep(0.01)  # idle for longer than cold_after
    with caplog.at_level(logging.ERROR, logger="tiered_state"):
        report = state.sweep()
    assert report.failed == 1 and list(report.errors) == ["only"]
    assert SECRET not in report.errors["only"]
    assert "'only'" in caplog.text and SECRET not in caplog.text
    # Everything else moved, the repairable value from its valid copy.
    assert report.moved == 6
    warm = state.repositories[WARM]
    for key in ["repairable", *(f"k{i}" for i in range(5))]:
        entry = warm.fetch_record(key)
        assert entry is not None and entry.kind == "stub"
    assert state.get("repairable") == {"v": 1}
    assert state.get_many([f"k{i}" for i in range(5)]) == {f"k{i}": i for i in range(5)}
    with pytest.raises(IntegrityError):
        state.get("only")


# ====================================================================== cold files
def only_file(repo: FileSystemStateRepository, key: str) -> Path:
    fan, name, _ = _locate(key)
    return Path(repo.root) / fan / name


def read_outcome(read: Callable[[], Any]) -> Any:
    """What ``read()`` returned, or the IntegrityError it raised; any other
    exception fails the test (it is re-raised with the flip that caused it)."""
    try:
        return read()
    except IntegrityError as exc:
        return exc


BITS = (0, 2, 5, 7)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "zlib"])
def test_every_bit_flip_of_a_cold_file_reads_as_the_record_or_an_integrity_error(
    tmp_path: Path, compress: bool
) -> None:
    repo = FileSystemStateRepository(tmp_path / "cold", fsync=False,
                                     compress_above=0 if compress else None)
    value = {"a": 1, "b": "two"}
    payload = codec.encode(value)
    metadata = make_metadata(payload, 123456789, now=1_700_000_000.25, ttl=10**9)
    repo.store("k", payload, metadata)
    path = only_file(repo, "k")
    original = path.read_bytes()
    assert len(original) < 400
    outcomes: dict[str, int] = {}
    try:
        for index in range(len(original)):
            for bit in BITS:
                damaged = bytearray(original)
                damaged[index] ^= 1 << bit
                path.write_bytes(bytes(damaged))
                where = f"byte {index} bit {bit}"
                try:
                    _check_one_read(repo, payload, metadata, value, outcomes)
                except AssertionError as exc:
                    raise AssertionError(f"{where}: {exc}") from None
                except Exception as exc:
                    raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
    finally:
        repo.close()
    # The metadata checksum makes every header flip an IntegrityError.
    assert outcomes.get("changed metadata", 0) == 0
    assert outcomes["integrity error"] > 0


def _check_one_read(repo: FileSystemStateRepository, payload: str, metadata: Any, value: Any,
                    outcomes: dict[str, int]) -> None:
    entry = read_outcome(lambda: repo.fetch_record("k"))
    if isinstance(entry, IntegrityError):
        outcomes["integrity error"] = outcomes.get("integrity error", 0) + 1
        assert SECRET not in str(entry)
    else:
        assert isinstance(entry, Entry), "the key went missing"
        if entry.metadata != metadata:
            outcomes["changed metadata"] = outcomes.get("changed metadata", 0) + 1
        assert entry.metadata == metadata, "changed metadata"
        # A damaged body fails its checksum (the catalog then looks elsewhere).
        assert entry.payload == payload or not entry.valid()
        outcomes["record"] = outcomes.get("record", 0) + 1
    got = read_outcome(lambda: repo.fetch("k"))
    assert isinstance(got, IntegrityError) or got == value
    try:
        many = repo.fetch_many(["k"])
    except BatchError as exc:
        assert isinstance(exc.failed["k"], IntegrityError)
    else:
        assert many["k"].metadata == metadata
    for listing in (lambda: repo.keys(), lambda: repo.keys("k"), lambda: list(repo.iter_all_keys())):
        assert listing() in ([], ["k"])


def test_bit_flips_of_a_cold_payload_through_the_store(tmp_path: Path) -> None:
    """The same, through the public API: the payload of a COLD record, behind
    its catalog stub. get_record returns the record exactly or raises."""
    with tiered_state.open(tmp_path / "store", hot="none",
                           policy=TieringPolicy(promote_to=None)) as state:
        value = {"deep": [1, 2, 3]}
        state.set("k", value, tier="cold")
        state.set("other", "fine", tier="cold")
        expected = state.get_record("k")
        assert expected is not None and expected.tier is COLD
        cold = state.repositories[COLD]
        assert isinstance(cold, FileSystemStateRepository)
        path = only_file(cold, payload_name("k", expected.version))
        original = path.read_bytes()
        raised = 0
        for index in range(len(original)):
            for bit in (1, 6):
                damaged = bytearray(original)
                damaged[index] ^= 1 << bit
                path.write_bytes(bytes(damaged))
                where = f"byte {index} bit {bit}"
                try:
                    record = state.get_record("k")
                    assert record == expected, f"{where}: {record} != {expected}"
                except IntegrityError:
                    raised += 1
                    with pytest.raises(IntegrityError):
                        state.get_many(["k", "other"])
                    assert state.get_many(["other"]) == {"other": "fine"}
                    assert sorted(state.keys()) == ["k", "other"]
                    assert isinstance(state.stats(), dict)
                except TieredStateError:
                    raise
                except Exception as exc:
                    raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
        assert raised > len(original)  # most flips are caught; the rest read back exactly
        path.write_bytes(original)
        assert state.get_record("k") == expected


def test_cold_files_of_the_earlier_format_still_read(tmp_path: Path) -> None:
    """Files written before the metadata checksum existed: the same header without ``meta``."""
    repo = FileSystemStateRepository(tmp_path / "cold", fsync=False)
    payload = codec.encode({"old": True})
    metadata = make_metadata(payload, 77, now=1_600_000_000.5)
    repo.store("legacy", payload, metadata)
    big = codec.encode("x" * 5000)  # stored compressed
    repo.store("big", big, make_metadata(big, 78, now=1_600_000_000.5))
    for key in ("legacy", "big"):
        path = only_file(repo, key)
        header, body = path.read_bytes().split(b"\n", 1)
        fields = json.loads(header)
        del fields["meta"]
        path.write_bytes(json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode()
                         + b"\n" + body)
    entry = repo.fetch_record("legacy")
    assert entry is not None and entry.metadata == metadata and entry.valid()
    assert repo.fetch("legacy") == {"old": True}
    assert repo.fetch("big") == "x" * 5000
    assert sorted(repo.keys()) == ["big", "legacy"] and repo.stats()["key_count"] == 2
    # Anything in such a file that does not parse is still an IntegrityError.
    path = only_file(repo, "legacy")
    path.write_bytes(path.read_bytes().replace(b'"version":77', b'"version":"77"'))
    with pytest.raises(IntegrityError):
        repo.fetch_record("legacy")
    path.write_bytes(path.read_bytes().replace(b'"version":"77"', b'"versoin":77'))
    with pytest.raises(IntegrityError):
        repo.fetch_record("legacy")
    assert repo.keys() == ["big"]
    repo.close()


# ====================================================================== bombs
BOMB_BYTES = 300 * 1024 * 1024  # what the bomb inflates to


def zlib_bomb() -> bytes:
    """A zlib stream of BOMB_BYTES spaces, made without holding them in memory."""
    packer = zlib.compressobj(9)
    chunk = b" " * (1 << 20)
    parts = [packer.compress(chunk) for _ in range(BOMB_BYTES // len(chunk))]
    parts.append(packer.flush())
    return b"".join(parts)


@pytest.fixture(scope="module")
def bomb() -> bytes:
    data = zlib_bomb()
    assert len(data) < 400 * 1024
    return data


def peak_while(read: Callable[[], Any]) -> int:
    """Peak bytes Python allocated while ``read()`` ran."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        read()
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    return peak


def test_a_decompression_bomb_in_a_cold_file_is_an_integrity_error(
    tmp_path: Path, bomb: bytes
) -> None:
    repo = FileSystemStateRepository(tmp_path / "cold", fsync=False, compress_above=0)
    payload = codec.encode("x" * 2000)
    repo.store("k", payload, make_metadata(payload, 5, now=time.time()))
    path = only_file(repo, "k")
    header = path.read_bytes().split(b"\n", 1)[0]
    assert json.loads(header)["body"] == "json+zlib"
    path.write_bytes(header + b"\n" + bomb)

    def read() -> None:
        with pytest.raises(IntegrityError):
            repo.fetch_record("k")

    assert peak_while(read) < 8 * 1024 * 1024
    with pytest.raises(BatchError) as info:
        repo.fetch_many(["k"])
    assert isinstance(info.value.failed["k"], IntegrityError)
    repo.close()


def test_a_decompression_bomb_in_an_s3_object_is_an_integrity_error(
    s3_url: str, bomb: bytes
) -> None:
    with S3StateRepository.from_url(s3_url, compress_min_bytes=0) as repo:
        payload = codec.encode("x" * 2000)
        repo.store("k", payload, make_metadata(payload, 5, now=time.time()))
        name = repo._base + repo._name("k")
        stored = repo._client.get_object(Bucket=repo.bucket, Key=name)
        assert stored["Metadata"]["encoding"] == "json+zlib"
        repo._client.put_object(Bucket=repo.bucket, Key=name, Body=bomb,
                                Metadata=stored["Metadata"])

        def read() -> None:
            with pytest.raises(IntegrityError):
                repo.fetch_record("k")

        assert peak_while(read) < 32 * 1024 * 1024
        with pytest.raises(BatchError) as info:
            repo.fetch_many(["k"])
        assert isinstance(info.value.failed["k"], IntegrityError)


# ====================================================================== S3 metadata
def test_damaged_s3_object_metadata_reads_as_the_record_or_an_integrity_error(
    s3_url: str,
) -> None:
    with S3StateRepository.from_url(s3_url) as repo:
        payload = codec.encode({"a": 1})
        metadata = make_metadata(payload, 987654321, now=1_700_000_000.25, ttl=10**9)
        repo.store("k", payload, metadata)
        name = repo._base + repo._name("k")
        stored = repo._client.get_object(Bucket=repo.bucket, Key=name)
        body, original = stored["Body"].read(), dict(stored["Metadata"])
        assert "metadata-checksum" in original
        raised = 0
        for field, text in original.items():
            for index in range(len(text)):
                damaged = dict(original)
                flipped = chr(ord(text[index]) ^ 1)
                damaged[field] = text[:index] + flipped + text[index + 1:]
                repo._client.put_object(Bucket=repo.bucket, Key=name, Body=body,
                                        Metadata=damaged)
                where = f"{field}[{index}]"
                try:
                    entry = repo.fetch_record("k")
                except IntegrityError:
                    raised += 1
                    assert isinstance(repo.keys(), list)
                    continue
                except Exception as exc:
                    raise AssertionError(f"{where}: {type(exc).__name__}: {exc}") from exc
                assert entry is not None and entry.metadata == metadata, where
                assert entry.payload == payload, where
        assert raised > 0
        # Objects written before the metadata checksum existed still read.
        legacy = {k: v for k, v in original.items() if k != "metadata-checksum"}
        repo._client.put_object(Bucket=repo.bucket, Key=name, Body=body, Metadata=legacy)
        entry = repo.fetch_record("k")
        assert entry is not None and entry.metadata == metadata and entry.valid()
        assert repo.keys() == ["k"]


def test_a_sweep_over_a_file_catalog_carries_on_past_an_unreadable_file(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """With the file tier as the catalog (no WARM), one damaged file must not
    stop the sweep: the other records are still purged, and the damage is logged."""
    policy = TieringPolicy(purge_after=0)
    with tiered_state.open(tmp_path, hot="none", warm="none", policy=policy) as state:
        state.set("damaged", "x")
        state.set("short-lived", "y", ttl=0.05)
        cold = state.repositories[Tier.COLD]
        assert isinstance(cold, FileSystemStateRepository)
        path = only_file(cold, "damaged")
        path.write_bytes(b"\x00not a header\n" + path.read_bytes())
        time.sleep(0.1)
        with caplog.at_level(logging.WARNING):
            report = state.sweep()
        assert report.purged == 1
        assert "unreadable" in caplog.text
        assert not only_file(cold, "short-lived").exists()
        with pytest.raises(IntegrityError):
            state.get("damaged")
