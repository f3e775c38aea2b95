"""Space: a sweep gives back the file space its moves and purges freed.

Without it the embedded WARM file keeps the size it had before most of its
records went COLD (38 MB after sweeping 100k records of 500 bytes).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.synchronize
import os
import sqlite3
import time
from pathlib import Path

import tiered_state
from tiered_state import TieringPolicy
from tiered_state.repositories import sqlite_repository
from tiered_state.repositories.sqlite_repository import SQLiteStateRepository
from tiered_state.testing import make

VALUE = {"side": "buy", "note": "x" * 440}  # ~500 bytes encoded


def file_bytes(path: Path) -> int:
    """What the database takes on disk: the file and its WAL."""
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def fill(repo: SQLiteStateRepository, count: int, prefix: str = "k") -> None:
    items = {f"{prefix}{i}": make(dict(VALUE, i=i), version=i + 1) for i in range(count)}
    for start in range(0, count, 1000):
        repo.store_many(dict(list(items.items())[start:start + 1000]))


def test_a_sweep_to_cold_shrinks_the_embedded_warm_file(tmp_path: Path, monkeypatch) -> None:
    # 5,000 records keep the test short; the threshold is scaled down with them.
    monkeypatch.setattr(sqlite_repository, "_RECLAIM_MIN_BYTES", 256 << 10)
    policy = TieringPolicy(cold_after=0, batch_size=1000)
    count = 5_000
    with tiered_state.open(tmp_path, policy=policy) as state:
        state.set_many({f"pos:{i}": dict(VALUE, i=i) for i in range(count)}, tier="warm")
        warm = tmp_path / "warm.db"
        before = file_bytes(warm)
        report = state.sweep()
        after = file_bytes(warm)
        assert report.moved == count and report.failed == 0
        # What is left is the stubs (about a quarter of a 500-byte record each).
        assert report.reclaimed_bytes > 0.5 * before
        assert after < 0.45 * before, (before, after)
        warm_stats = state.stats()["tiers"]["warm"]
        assert warm_stats["free_bytes"] == 0
        # Nothing was lost by the shrinking.
        got = state.get_many([f"pos:{i}" for i in range(count)])
        assert got == {f"pos:{i}": dict(VALUE, i=i) for i in range(count)}
        # A second sweep has nothing to give back.
        assert state.sweep().reclaimed_bytes == 0


def _open_and_write(path: str, barrier: multiprocessing.synchronize.Barrier, n: int) -> None:
    barrier.wait(timeout=30)
    with tiered_state.open(path) as state:
        state.set(f"k{n}", n, tier="warm")


def test_a_new_file_is_incremental_however_many_processes_create_it(tmp_path: Path) -> None:
    """The mode is set before the header is written, by whichever process
    writes it; a process that finds the file begun leaves it alone."""
    ctx = multiprocessing.get_context("spawn")
    for round_ in range(3):
        path = tmp_path / f"store{round_}"
        barrier = ctx.Barrier(4)
        procs = [ctx.Process(target=_open_and_write, args=(str(path), barrier, n)) for n in range(4)]
        for proc in procs:
            proc.start()
        for proc in procs:
            proc.join(timeout=60)
        assert [proc.exitcode for proc in procs] == [0] * 4
        conn = sqlite3.connect(path / "warm.db")
        try:
            assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        finally:
            conn.close()
        with tiered_state.open(path) as state:
            assert state.get_many([f"k{n}" for n in range(4)]) == {f"k{n}": n for n in range(4)}


def test_a_file_without_auto_vacuum_is_rewritten_once(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    # A file as 0.1 made it: tables created without auto-vacuum.
    with SQLiteStateRepository(path) as repo:
        pass
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA auto_vacuum = NONE")
    conn.execute("VACUUM")
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0
    conn.close()
    with SQLiteStateRepository(path) as repo:
        fill(repo, 10_000)
        repo.delete_many([f"k{i}" for i in range(9_000)])
        before = file_bytes(path)
        assert repo.reclaim_space() > 0
        assert file_bytes(path) < 0.3 * before
        assert sorted(repo.keys()) == sorted(f"k{i}" for i in range(9_000, 10_000))
        assert repo.fetch("k9999") == dict(VALUE, i=9999)
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 2  # incremental from now on
    conn.close()


def test_little_free_space_is_left_alone(tmp_path: Path) -> None:
    with SQLiteStateRepository(tmp_path / "w.db") as repo:
        fill(repo, 5_000)
        repo.delete_many([f"k{i}" for i in range(500)])  # ~10 % free
        before = file_bytes(tmp_path / "w.db")
        assert repo.reclaim_space() == 0
        assert file_bytes(tmp_path / "w.db") == before


def _writer(path: str, count: int, started: multiprocessing.synchronize.Event) -> None:
    with SQLiteStateRepository(path) as repo:
        started.set()
        for i in range(count):
            repo.store(f"w{i}", *make({"i": i}, version=i + 1))


def test_writers_in_other_processes_lose_nothing_while_space_is_given_back(tmp_path: Path) -> None:
    path = tmp_path / "w.db"
    with SQLiteStateRepository(path) as repo:
        fill(repo, 20_000)
        repo.delete_many([f"k{i}" for i in range(19_000)])
        ctx = multiprocessing.get_context("fork")
        started = ctx.Event()
        writer = ctx.Process(target=_writer, args=(str(path), 3_000, started))
        writer.start()
        try:
            assert started.wait(30)
            deadline = time.monotonic() + 60
            given = 0
            while writer.is_alive() and time.monotonic() < deadline:
                given += repo.reclaim_space(min_free_fraction=0.0)
                repo.delete_many([f"k{i}" for i in range(19_000, 19_100)])
            writer.join(60)
        finally:
            if writer.is_alive():
                writer.kill()
        assert writer.exitcode == 0
        assert given > 0
        assert repo.fetch_many([f"w{i}" for i in range(3_000)]).keys() == {f"w{i}" for i in range(3_000)}
        assert all(repo.fetch(f"w{i}") == {"i": i} for i in range(0, 3_000, 97))
        assert os.path.getsize(path) < 5 << 20
