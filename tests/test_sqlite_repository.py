from __future__ import annotations

import os
import sqlite3
import stat
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiered_state.config import open_repository
from tiered_state.errors import BackendError, BackendUnavailableError, ConfigurationError, IntegrityError
from tiered_state.repositories.base import StateRepository
from tiered_state.repositories.sqlite_repository import SQLiteStateRepository

from .conformance import RepositoryConformance, make


class TestSQLiteConformance(RepositoryConformance):
    @pytest.fixture
    def repository(self, tmp_path: Path) -> Iterator[SQLiteStateRepository]:
        with SQLiteStateRepository(tmp_path / "warm.db") as repo:
            yield repo

    def test_repr_has_no_secret(self, repository: StateRepository) -> None:
        # Overridden: repr shows the database path, and pytest names tmp_path
        # after the test ("test_repr_has_no_secret0"); a path is not a secret.
        text = repr(repository).replace(str(Path(repository.path).parent), "")  # type: ignore[attr-defined]
        assert "password" not in text.lower() and "secret" not in text.lower()


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[SQLiteStateRepository]:
    with SQLiteStateRepository(tmp_path / "warm.db") as repository:
        yield repository


def run_python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    """Run ``code`` in a fresh interpreter (a separate process on the same file)."""
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True, text=True, timeout=60, check=True,
    )


# ---------------------------------------------------------------- URLs and options
def test_url_forms(tmp_path: Path) -> None:
    absolute = open_repository(f"sqlite:///{tmp_path}/abs.db?synchronous=full&busy_timeout=2")
    assert isinstance(absolute, SQLiteStateRepository)
    assert absolute.path == str(tmp_path / "abs.db")
    assert (absolute.synchronous, absolute.busy_timeout) == ("FULL", 2.0)
    relative = open_repository("sqlite:///sub/rel.db?table=other")
    assert isinstance(relative, SQLiteStateRepository)
    assert relative.path == str(tmp_path / "sub" / "rel.db")  # conftest chdir'ed to tmp_path
    relative.store("k", *make(1))
    assert (tmp_path / "sub" / "rel.db").exists()
    assert relative.table == "other"
    relative.close()


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///",
        "sqlite:///x.db?bogus=1",
        "sqlite:///x.db?synchronous=sometimes",
        "sqlite:///x.db?busy_timeout=-1",
        "sqlite:///x.db?table=drop%20table",
        "sqlite:///:memory:",
    ],
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_repository(url)


def test_pragmas_applied(tmp_path: Path) -> None:
    repo = SQLiteStateRepository(tmp_path / "p.db", synchronous="FULL", busy_timeout=1.5)
    conn = repo._conn()
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    assert conn.execute("PRAGMA busy_timeout").fetchone()[0] == 1500
    repo.close()


# ---------------------------------------------------------------- files
def test_files_and_folder_are_private(tmp_path: Path) -> None:
    os.umask(0o022)
    folder = tmp_path / "new" / "deeper"
    repo = SQLiteStateRepository(folder / "warm.db")
    repo.store("k", *make(1))
    repo.changed_by_others()
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    for name in ("warm.db", "warm.db-wal", "warm.db-shm"):
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o600, name
    repo.close()


def test_schema_is_inspectable_with_plain_sqlite(repo: SQLiteStateRepository) -> None:
    payload, metadata = make({"a": 1}, version=3, ttl=60)
    repo.store("k", payload, metadata)
    conn = sqlite3.connect(repo.path)
    row = conn.execute(
        "SELECT key, payload, checksum, size_bytes, version, expires_at, encoding FROM tiered_state"
    ).fetchone()
    conn.close()
    assert row[:5] == ("k", payload, metadata["checksum"], metadata["size_bytes"], 3)
    assert row[5] == pytest.approx(metadata["expires_at"]) and row[6] == "json"


# ---------------------------------------------------------------- tombstones, listing
def test_expired_rows_are_tombstones_until_deleted(repo: SQLiteStateRepository) -> None:
    repo.store("gone", *make("old", version=4, now=time.time() - 10, ttl=1))
    assert repo.fetch("gone") is None
    assert repo.keys() == [] and repo.stats()["key_count"] == 0
    entry = repo.fetch_record("gone")
    assert entry is not None and entry.expired() and entry.version == 4
    assert "gone" in repo.fetch_many(["gone"])
    assert list(repo._all_keys()) == ["gone"]
    assert repo.stats()["expired_count"] == 1
    assert repo.delete("gone") is True
    assert repo.fetch_record("gone") is None


def test_iter_keys_streams_in_pages(repo: SQLiteStateRepository) -> None:
    repo.store_many({f"k{i:05d}": make(i) for i in range(2500)})
    repo.store("other", *make(0))
    it = repo.iter_keys("k*")
    assert next(it) == "k00000"
    repo.delete("k02499")  # keyset paging tolerates changes between pages
    rest = list(it)
    assert len(rest) == 2498 and rest[-1] == "k02498"


def test_like_is_case_sensitive_and_escaped(repo: SQLiteStateRepository) -> None:
    repo.store_many({k: make(k) for k in ["Abc", "abc", "a_c", "a%c", "a\\c", "axc"]})
    assert sorted(repo.keys("a*")) == ["a%c", "a\\c", "a_c", "abc", "axc"]
    assert repo.keys("a_c") == ["a_c"]
    assert repo.keys("a%c") == ["a%c"]
    assert repo.keys("a\\\\c") == ["a\\c"]
    assert sorted(repo.keys("[Aa]bc")) == ["Abc", "abc"]


def test_touch_many_only_moves_forward(repo: SQLiteStateRepository) -> None:
    now = time.time()
    repo.store("k", *make(1, now=now - 100))
    repo.touch_many(["k"], at=now - 10)
    repo.touch_many(["k"], at=now - 90)  # an older touch never makes it look idler
    assert [e.key for b in repo.scan(now=now, idle_before=now - 20) for e in b] == []
    assert [e.key for b in repo.scan(now=now, idle_before=now - 5) for e in b] == ["k"]


def test_corrupt_row_raises_integrity_error(repo: SQLiteStateRepository) -> None:
    _, metadata = make({"a": 1})
    repo.store("k", '{"a":2}', metadata)
    with pytest.raises(IntegrityError):
        repo.fetch("k")


def test_store_many_is_one_transaction(repo: SQLiteStateRepository) -> None:
    repo.store("x", *make("before"))
    other = sqlite3.connect(repo.path, isolation_level=None)
    # A trigger that fails on one row makes the whole batch roll back.
    other.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON tiered_state WHEN NEW.key = 'bad'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    other.close()
    with pytest.raises(BackendError) as info:
        repo.store_many({"x": make("after"), "y": make(1), "bad": make(2)})
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert repo.fetch("x") == "before" and repo.fetch("y") is None


def test_delete_many_if_version(repo: SQLiteStateRepository) -> None:
    repo.store_many({"a": make(1, 1), "b": make(2, 2), "c": make(3, 3)})
    assert repo.delete_many_if_version({"a": 1, "b": 9, "zz": 1}) == {"a"}
    assert sorted(repo.keys()) == ["b", "c"]


# ---------------------------------------------------------------- errors
def test_locked_database_is_backend_error(tmp_path: Path) -> None:
    repo = SQLiteStateRepository(tmp_path / "l.db", busy_timeout=0.1)
    repo.store("k", *make(1))
    blocker = sqlite3.connect(repo.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        with pytest.raises(BackendError) as info:
            repo.store("k", *make(2))
        assert not isinstance(info.value, BackendUnavailableError)
        assert isinstance(info.value.__cause__, sqlite3.OperationalError)
        assert repo.fetch("k") == 1  # readers are never blocked in WAL mode
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    repo.store("k", *make(3))
    assert repo.fetch("k") == 3
    repo.close()


def test_not_a_database_is_unavailable(tmp_path: Path) -> None:
    path = tmp_path / "junk.db"
    path.write_bytes(b"this is not a database file" * 100)
    repo = SQLiteStateRepository(path)
    with pytest.raises(BackendUnavailableError) as info:
        repo.fetch("k")
    assert isinstance(info.value.__cause__, sqlite3.DatabaseError)


def test_unusable_folder_is_unavailable(tmp_path: Path) -> None:
    folder = tmp_path / "a-file"
    folder.write_text("not a folder")  # (permissions would not stop root)
    with pytest.raises(BackendUnavailableError):
        SQLiteStateRepository(folder / "x.db").store("k", *make(1))


# ---------------------------------------------------------------- threads, processes
def test_one_connection_per_thread(repo: SQLiteStateRepository) -> None:
    seen: list[int] = []
    main = id(repo._conn())

    def work() -> None:
        seen.append(id(repo._conn()))
        repo.store("t", *make(1))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    assert seen and seen[0] != main
    assert repo.fetch("t") == 1


def test_close_then_use_reopens(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    repo.close()
    assert repo.fetch("k") == 1


def test_several_processes_write_one_file_and_nothing_is_lost(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    code = """
        import sys
        from tiered_state.repositories.sqlite_repository import SQLiteStateRepository
        from tests.conformance import make
        repo = SQLiteStateRepository(sys.argv[1], busy_timeout=30)
        w = sys.argv[2]
        for i in range(150):
            repo.store(f"{w}-{i}", *make(i))
            repo.store_if_newer("shared", *make(w, version=int(w) * 1000 + i + 1))
        repo.store_many({f"{w}-batch-{i}": make(i) for i in range(500)})
        repo.delete_many([f"{w}-batch-{i}" for i in range(0, 500, 5)])
    """
    env_root = str(Path(__file__).resolve().parent.parent)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(code), str(path), str(w)],
            cwd=env_root, stderr=subprocess.PIPE, text=True,
        )
        for w in range(1, 5)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    repo = SQLiteStateRepository(path)
    keys = set(repo.keys())
    for w in range(1, 5):
        assert all(f"{w}-{i}" in keys for i in range(150))
        assert sum(1 for k in keys if k.startswith(f"{w}-batch-")) == 400
    shared = repo.fetch_record("shared")
    assert shared is not None and shared.version == 4150  # the newest version won
    repo.close()


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_reopens_its_connection(repo: SQLiteStateRepository) -> None:
    repo.store("parent", *make("p"))
    assert repo.fetch("parent") == "p"  # the parent's connection exists before fork
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            if repo.fetch("parent") == "p":
                repo.store("child", *make("c"))
                repo.store_many({"c1": make(1), "c2": make(2)})
                repo.close()
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert repo.fetch("child") == "c" and repo.fetch("c2") == 2
    repo.store("parent2", *make("p2"))  # the parent's connection still works
    assert repo.fetch("parent2") == "p2"
    assert sqlite3.connect(repo.path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


# ---------------------------------------------------------------- change signal
def test_changed_by_others_sees_another_process(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    repo.changed_by_others()
    assert repo.changed_by_others() is False
    assert repo._local.shm is not None  # the -shm fast path is in use
    repo.store("k", *make(2))
    assert repo.changed_by_others() is False  # our own write is not "others"
    code = """
        import sys
        from tiered_state.repositories.sqlite_repository import SQLiteStateRepository
        from tests.conformance import make
        SQLiteStateRepository(sys.argv[1]).store("k", *make(int(sys.argv[2])))
    """
    root = str(Path(__file__).resolve().parent.parent)
    for value in (3, 4, 5):
        subprocess.run([sys.executable, "-c", textwrap.dedent(code), repo.path, str(value)],
                       cwd=root, check=True, timeout=60)
        assert repo.changed_by_others() is True
        assert repo.changed_by_others() is False
        assert repo.fetch("k") == value


def test_changed_by_others_sees_another_thread(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    repo.changed_by_others()
    thread = threading.Thread(target=lambda: repo.store("k", *make(2)))
    thread.start()
    thread.join()
    assert repo.changed_by_others() is True
    assert repo.changed_by_others() is False


def test_changed_by_others_after_checkpoint_and_wal_reset(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    repo.changed_by_others()
    other = sqlite3.connect(repo.path, isolation_level=None)
    for i in range(3):
        other.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        # A checkpoint changes no data, but SQLite may report it (a spurious
        # True only costs the HOT tier a refresh); what matters is the write.
        repo.changed_by_others()
        other.execute("UPDATE tiered_state SET version = version + 1")
        assert repo.changed_by_others() is True, i
    other.close()


def test_changed_by_others_without_shm_falls_back_to_pragma(repo: SQLiteStateRepository) -> None:
    repo.changed_by_others()
    repo._local.shm = None
    other = sqlite3.connect(repo.path, isolation_level=None)
    other.execute("DELETE FROM tiered_state")
    other.close()
    assert repo.changed_by_others() is True
    assert repo.changed_by_others() is False
