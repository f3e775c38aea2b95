from __future__ import annotations

import contextlib
import json
import os
import select
import signal
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
from tiered_state.record import make_stub, make_tombstone
from tiered_state.repositories.sqlite_repository import SQLiteStateRepository
from tiered_state.testing import RepositoryContract, make


class TestSQLiteConformance(RepositoryContract):
    takes_no_secret = "sqlite:// names a local file: there is no password to give"

    @pytest.fixture
    def repository(self, tmp_path: Path) -> Iterator[SQLiteStateRepository]:
        with SQLiteStateRepository(tmp_path / "warm.db") as repo:
            yield repo

    @pytest.fixture
    def repository_url(self, tmp_path: Path) -> str:
        return f"sqlite:///{tmp_path / 'warm.db'}"

    @contextlib.contextmanager
    def break_key(self, repository: SQLiteStateRepository, key: str) -> Iterator[None]:  # type: ignore[override]
        """Triggers that abort every insert, update and delete of ``key``."""
        assert key.isalnum()  # spelt into the SQL below
        ops = {"insert": "NEW", "update": "NEW", "delete": "OLD"}
        conn = sqlite3.connect(repository.path, isolation_level=None)
        try:
            for op, row in ops.items():
                conn.execute(f"CREATE TRIGGER refuse_{op} BEFORE {op.upper()} ON {repository.table} "
                             f"WHEN {row}.key = '{key}' BEGIN SELECT RAISE(ABORT, 'refused'); END")
            yield
        finally:
            for op in ops:
                conn.execute(f"DROP TRIGGER IF EXISTS refuse_{op}")
            conn.close()


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
    assert list(repo.iter_all_keys()) == ["gone"]
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


@pytest.mark.parametrize("method", ["store_many_if_newer", "store_many_if_version"])
def test_batch_conditionals_are_one_transaction(repo: SQLiteStateRepository, method: str) -> None:
    repo.store("x", *make("before", 1))
    other = sqlite3.connect(repo.path, isolation_level=None)
    other.execute(
        "CREATE TRIGGER boom BEFORE INSERT ON tiered_state WHEN NEW.key = 'bad'"
        " BEGIN SELECT RAISE(ABORT, 'refused'); END"
    )
    other.close()
    items = {"x": make("after", 2), "y": make(1, 2), "bad": make(2, 2)}
    with pytest.raises(BackendError) as info:
        if method == "store_many_if_newer":
            repo.store_many_if_newer(items)
        else:
            repo.store_many_if_version(items, {"x": 1, "y": 0, "bad": 0})
    assert isinstance(info.value.__cause__, sqlite3.Error)
    assert repo.fetch("x") == "before" and repo.fetch("y") is None
    assert not repo._conn().in_transaction
    # ... and a missing expected version is refused before anything is written
    with pytest.raises(KeyError):
        repo.store_many_if_version({"x": make("after", 2), "z": make(1, 2)}, {"x": 1})
    assert repo.fetch("x") == "before"


def test_store_many_if_version_kinds(repo: SQLiteStateRepository) -> None:
    now = time.time()
    payload, metadata = make({"v": 1}, 5)
    repo.store_many({"value": (payload, metadata), "gone": ("", make_tombstone(5, now=now)),
                     "old": make("o", 5, now=now - 10, ttl=1)})
    stub = make_stub(metadata, "elsewhere")
    stored = repo.store_many_if_version(
        {"value": stub, "gone": make("g", 4), "old": make("n", 6), "new": make("x", 1)},
        {"value": 5, "gone": 0, "old": 0, "new": 0},
    )
    # same-version migration to a stub; a tombstone of version 5 refuses version 4;
    # an expired row is replaced; an absent key is created
    assert stored == {"value", "old", "new"}
    assert repo.fetch_record("value").kind == "stub"  # type: ignore[union-attr]
    assert repo.fetch_record("gone").kind == "tombstone"  # type: ignore[union-attr]
    assert repo.fetch("old") == "n" and repo.fetch("new") == "x"


def test_batch_conditionals_across_processes_are_exact(tmp_path: Path) -> None:
    """Processes race store_many_if_newer on the same keys: every key ends at
    the greatest version, and the batch that wrote it reported it."""
    path = tmp_path / "race.db"
    SQLiteStateRepository(path).close()
    code = """
        import json, sys
        from tiered_state.repositories.sqlite_repository import SQLiteStateRepository
        from tiered_state.testing import make
        repo = SQLiteStateRepository(sys.argv[1], busy_timeout=30)
        w = int(sys.argv[2])
        claims = []
        for i in range(40):
            version = i * 10 + w
            got = repo.store_many_if_newer({f"k{j}": make([w, i], version) for j in range(20)})
            claims.append([version, sorted(got)])
        print(json.dumps(claims))
    """
    root = str(Path(__file__).resolve().parent.parent)
    procs = [
        subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(path), str(w)],
                         cwd=root, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for w in range(1, 5)
    ]
    claimed: dict[str, list[int]] = {}
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        for version, keys in json.loads(out):
            for key in keys:
                claimed.setdefault(key, []).append(version)
    with SQLiteStateRepository(path) as repo:
        for j in range(20):
            entry = repo.fetch_record(f"k{j}")
            assert entry is not None and entry.version == 39 * 10 + 4
            # the final version was reported once, by its writer, and no
            # version was reported twice
            versions = claimed[f"k{j}"]
            assert max(versions) == entry.version and len(versions) == len(set(versions))


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
        from tiered_state.testing import make
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
        from tiered_state.testing import make
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


# A new connection's data_version baseline is "now": on its own it would hide
# commits made before the connection opened from the thread (or forked child)
# that opened it, while this process's HOT copies still predate them.
_WRITE_ELSEWHERE = """
    import sys
    from tiered_state.repositories.sqlite_repository import SQLiteStateRepository
    from tiered_state.testing import make
    SQLiteStateRepository(sys.argv[1]).store(sys.argv[2], *make(int(sys.argv[3])))
"""


def write_in_another_process(path: str, key: str, value: int) -> None:
    root = str(Path(__file__).resolve().parent.parent)
    subprocess.run([sys.executable, "-c", textwrap.dedent(_WRITE_ELSEWHERE), path, key, str(value)],
                   cwd=root, check=True, timeout=60)


def in_new_thread(repo: SQLiteStateRepository, *calls: str) -> list[object]:
    """Call the named methods of ``repo`` in order in a new thread; return the answers."""
    answers: list[object] = []

    def work() -> None:
        for name in calls:
            answers.append(getattr(repo, name)() if name == "changed_by_others" else repo.fetch(name))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join(timeout=30)
    assert not thread.is_alive()
    return answers


def wait_child(pid: int, timeout: float = 60.0) -> int:
    """The exit code of the forked child ``pid``; kill it after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"forked child did not finish within {timeout}s")
        time.sleep(0.01)


def validated(repo: SQLiteStateRepository) -> None:
    """Ask until this thread gets False: its copies are then up to date."""
    repo.changed_by_others()
    assert repo.changed_by_others() is False


def test_new_thread_sees_commits_made_before_it_connected(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    validated(repo)
    write_in_another_process(repo.path, "k", 2)
    assert in_new_thread(repo, "changed_by_others", "changed_by_others") == [True, False]
    # Its connection opened by a read first: the first call still answers True.
    write_in_another_process(repo.path, "k", 3)
    assert in_new_thread(repo, "k", "changed_by_others") == [3, True]
    assert repo.changed_by_others() is True  # the first thread saw them too
    assert repo.changed_by_others() is False


def test_new_thread_trusts_an_unchanged_store(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    assert in_new_thread(repo, "changed_by_others") == [True]  # nobody got False yet
    validated(repo)
    assert in_new_thread(repo, "changed_by_others", "changed_by_others") == [False, False]
    repo.store("k", *make(2))  # this thread's own write
    assert repo.changed_by_others() is False
    assert in_new_thread(repo, "k", "changed_by_others") == [2, False]


def test_a_connection_opened_after_close_sees_foreign_commits(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    validated(repo)
    repo.close()  # the last connection: SQLite removes -wal and -shm
    write_in_another_process(repo.path, "k", 2)
    assert repo.changed_by_others() is True
    assert repo.fetch("k") == 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("when", ["before fork", "after fork", "never"])
def test_forked_child_first_call(repo: SQLiteStateRepository, when: str) -> None:
    """A child inherits the parent's HOT copies: its first call answers True iff
    another process wrote after the parent's last False answer."""
    repo.store("k", *make(1))
    validated(repo)
    if when == "before fork":
        write_in_another_process(repo.path, "k", 2)
    go_read, go_write = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 2
        try:
            os.close(go_write)
            if select.select([go_read], [], [], 30)[0] and os.read(go_read, 1) == b"1":
                code = 0 if repo.changed_by_others() is (when != "never") else 1
        finally:
            os._exit(code)
    os.close(go_read)
    try:
        if when == "after fork":
            write_in_another_process(repo.path, "k", 2)
        os.write(go_write, b"1")
    finally:
        os.close(go_write)
    assert wait_child(pid) == 0
    assert repo.changed_by_others() is (when != "never")


class _FakeShm:
    """Stands in for the -shm reader, returning chosen header bytes."""

    def __init__(self, header: bytes) -> None:
        self.header = header

    def read(self) -> bytes:
        return self.header


def test_a_header_read_mid_commit_is_never_trusted(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make(1))
    validated(repo)
    real = repo._local.shm
    assert real is not None
    header = real.read()
    assert header is not None and header[:48] == header[48:]
    # The second copy already rewritten, the first not yet: a commit in flight.
    torn = header[:48] + bytes(48)
    clean = repo._clean
    repo._local.shm = _FakeShm(torn)  # type: ignore[assignment]
    assert repo.changed_by_others() is False  # the pragma decides...
    assert repo._clean is clean  # ...but the bytes are not remembered
    other = sqlite3.connect(repo.path, isolation_level=None)
    other.execute("UPDATE tiered_state SET version = version + 1")
    other.close()
    assert repo.changed_by_others() is True  # same torn bytes: not the fast path


def test_a_rebuilt_empty_wal_index_is_never_a_proof(repo: SQLiteStateRepository) -> None:
    # With zero salts the header is what every rebuild from an empty WAL
    # writes, whatever the database holds, so it proves nothing to a new
    # connection (this thread may still use it: its connection keeps the
    # -shm from being rebuilt).
    repo.store("k", *make(1))
    validated(repo)
    clean = repo._clean
    assert clean is not None
    rebuilt = bytearray(clean[1])
    rebuilt[32:40] = bytes(8)
    rebuilt[80:88] = bytes(8)
    repo._local.shm = _FakeShm(bytes(rebuilt))  # type: ignore[assignment]
    assert repo.changed_by_others() is False
    assert repo.changed_by_others() is False
    assert repo._clean is clean


# ---------------------------------------------------------------- hostile bytes
SECRET = "s3cr3t-payload"


def write_raw_payload(path: str, key: str, raw: bytes, *, as_blob: bool = False) -> None:
    """Put ``raw`` in ``key``'s payload column behind the repository's back."""
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        value = "?" if as_blob else "CAST(? AS TEXT)"
        conn.execute(f"UPDATE tiered_state SET payload = {value} WHERE key = ?", (raw, key))
    finally:
        conn.close()


@pytest.mark.parametrize("as_blob", [False, True], ids=["text", "blob"])
def test_undecodable_payload_is_an_integrity_error_without_the_stored_bytes(
    repo: SQLiteStateRepository, as_blob: bool
) -> None:
    repo.store("bad", *make({"v": SECRET}, 3))
    repo.store("good", *make("fine", 4))
    write_raw_payload(repo.path, "bad", b'{"v":"' + SECRET.encode() + b'\xff\xfe"}', as_blob=as_blob)
    for read in (repo.fetch, repo.fetch_payload):
        with pytest.raises(IntegrityError) as info:
            read("bad")
        assert SECRET not in str(info.value) and info.value.key == "bad"
    entry = repo.fetch_record("bad")
    assert entry is not None and entry.version == 3 and not entry.valid()
    # Batch reads and listings carry on past the bad row: it is there, and fails its check.
    many = repo.fetch_many(["bad", "good"])
    assert not many["bad"].valid() and many["good"].valid() and many["good"].payload == '"fine"'
    assert repo.keys() == ["bad", "good"]
    scanned = [e for batch in repo.scan(10, idle_before=time.time() + 1) for e in batch]
    assert sorted(e.key for e in scanned) == ["bad", "good"]
    assert repo.stats()["key_count"] == 2
    # The connection is left fit for writing: no read is left open on it.
    repo.store("good", *make("again", 5))
    assert repo.fetch("good") == "again"


def test_undecodable_key_and_checksum_columns_are_read(repo: SQLiteStateRepository) -> None:
    repo.store("k", *make({"v": 1}, 3))
    conn = sqlite3.connect(repo.path, isolation_level=None)
    try:
        conn.execute("UPDATE tiered_state SET checksum = CAST(X'61FF62' AS TEXT)")
        conn.execute("INSERT INTO tiered_state SELECT CAST(X'6BFF' AS TEXT), payload, checksum,"
                     " size_bytes, version, created_at, updated_at, last_accessed, expires_at,"
                     " encoding FROM tiered_state")
    finally:
        conn.close()
    with pytest.raises(IntegrityError):
        repo.fetch("k")
    entry = repo.fetch_record("k")
    assert entry is not None and not entry.valid()
    # A key that is not UTF-8 is no key the library wrote: listings skip it.
    assert repo.keys() == ["k"] and list(repo.iter_all_keys()) == ["k"]
    assert set(repo.fetch_many(["k"])) == {"k"}
    scanned = [e.key for batch in repo.scan(10, idle_before=time.time() + 1) for e in batch]
    assert scanned == ["k"]


def test_a_failed_read_leaves_no_snapshot_open(repo: SQLiteStateRepository) -> None:
    """A read that fails part-way must not keep its statement (and so an old
    snapshot) open: later reads would be stale, and a write on the
    connection would fail at once with SQLITE_BUSY instead of waiting."""
    repo.store_many({f"k{i}": make(i, 2) for i in range(5)})
    write_raw_payload(repo.path, "k2", b"\xff")
    repo.fetch_many([f"k{i}" for i in range(5)])
    other = sqlite3.connect(repo.path, isolation_level=None)
    try:
        other.execute("UPDATE tiered_state SET version = 9 WHERE key = 'k0'")
    finally:
        other.close()
    entry = repo.fetch_record("k0")
    assert entry is not None and entry.version == 9
    assert repo.store_if_version("k0", *make("new", 10), expected=9)


# ---------------------------------------------------------------- write locks
def test_every_write_waits_for_the_lock_instead_of_failing(tmp_path: Path) -> None:
    """A writer holding the lock for a while delays every kind of write; none fails."""
    repo = SQLiteStateRepository(tmp_path / "w.db", busy_timeout=5)
    repo.store("k", *make(1, 1))
    writes = [
        lambda: repo.store("a", *make(1, 1)),
        lambda: repo.store_many({"b": make(1, 1), "c": make(1, 1)}),
        lambda: repo.store_if_newer("k", *make(2, 2)),
        lambda: repo.store_if_version("k", *make(3, 3), expected=2),
        lambda: repo.store_many_if_newer({"d": make(1, 1)}),
        lambda: repo.store_many_if_version({"k": make(4, 4)}, {"k": 3}),
        lambda: repo.delete("a"),
        lambda: repo.delete_if_version("b", 1),
        lambda: repo.delete_many_if_version({"c": 1}),
        lambda: repo.delete_many(["d"]),
        lambda: repo.touch_many(["k"], time.time()),
    ]
    for write in writes:
        blocker = sqlite3.connect(repo.path, isolation_level=None, check_same_thread=False)
        blocker.execute("BEGIN IMMEDIATE")
        release = threading.Timer(0.2, lambda b=blocker: (b.execute("COMMIT"), b.close()))
        release.start()
        try:
            write()
        finally:
            release.join(timeout=10)
    entry = repo.fetch_record("k")
    assert entry is not None and entry.version == 4
    assert repo.keys() == ["k"]
    repo.close()


def _busy() -> sqlite3.OperationalError:
    exc = sqlite3.OperationalError("database is locked")
    exc.sqlite_errorcode = 5  # type: ignore[attr-defined]
    exc.sqlite_errorname = "SQLITE_BUSY"  # type: ignore[attr-defined]
    return exc


def test_a_busy_error_without_its_code_is_retried_too(tmp_path: Path) -> None:
    """Python 3.10's sqlite3 gives no error code: a busy error is known by
    SQLite's message then (unretried, four processes opening a new store at
    once failed on 3.10 only). Another error without a code is not retried."""
    repo = SQLiteStateRepository(tmp_path / "r.db", busy_timeout=0.5)
    refusals = iter([sqlite3.OperationalError("database is locked"), None])

    def refused_once(conn: sqlite3.Connection) -> int:
        error = next(refusals)
        if error is not None:
            raise error
        return conn.execute("SELECT 7").fetchone()[0]  # type: ignore[no-any-return]

    assert repo._write(refused_once) == 7
    calls: list[int] = []

    def table_locked(conn: sqlite3.Connection) -> None:
        calls.append(1)
        raise sqlite3.OperationalError("database table is locked")

    with pytest.raises(BackendError):
        repo._write(table_locked)
    assert calls == [1]
    repo.close()


def test_a_write_refused_at_once_is_retried_until_the_busy_timeout(tmp_path: Path) -> None:
    """SQLite answers some SQLITE_BUSY without waiting (the WAL switch, a stale
    snapshot): such a write is tried again, never failed before busy_timeout."""
    repo = SQLiteStateRepository(tmp_path / "r.db", busy_timeout=0.5)
    refusals = iter([_busy(), _busy(), None])

    def refused_twice(conn: sqlite3.Connection) -> int:
        error = next(refusals)
        if error is not None:
            raise error
        return conn.execute("SELECT 7").fetchone()[0]  # type: ignore[no-any-return]

    assert repo._write(refused_twice) == 7

    def always_refused(conn: sqlite3.Connection) -> None:
        raise _busy()

    started = time.monotonic()
    with pytest.raises(BackendError) as info:
        repo._write(always_refused, transaction=True)
    assert 0.4 <= time.monotonic() - started < 2.0
    assert "SQLITE_BUSY" in str(info.value)
    # The connection's own busy timeout is back to the configured one.
    assert repo._conn().execute("PRAGMA busy_timeout").fetchone()[0] == 500
    assert not repo._conn().in_transaction
    repo.close()


def test_a_new_file_opened_by_many_connections_at_once(tmp_path: Path) -> None:
    """WAL switch and schema creation race on a new file: every opener waits, none fails."""
    path = tmp_path / "new.db"
    errors: list[BaseException] = []
    start = threading.Barrier(8, timeout=10)

    def opener() -> None:
        try:
            with SQLiteStateRepository(path) as r:
                start.wait()
                r.store(f"k{threading.get_ident()}", *make(1, 1))
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=opener) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    with SQLiteStateRepository(path) as r:
        assert len(r.keys()) == 8


def _other_process_can_leave_wal(path: str) -> bool:
    """True if another process can switch ``path`` out of WAL mode at once,
    which it can only while no other connection has the file open."""
    result = run_python(
        """
        import sqlite3, sys
        conn = sqlite3.connect(sys.argv[1], timeout=0, isolation_level=None)
        try:
            print(conn.execute("PRAGMA journal_mode = DELETE").fetchone()[0])
        except sqlite3.OperationalError:
            print("locked")
        """,
        path,
    )
    return result.stdout.strip() == "delete"


def test_creating_the_file_never_drops_another_connections_locks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Closing any descriptor of a file drops every POSIX lock the process
    holds on it: a repository creating the file while another connection of
    this process already uses it must not open (and close) the file itself.
    (Without its lock, that connection looks absent to other processes, which
    then delete the WAL or rebuild its index under it.)"""
    path = tmp_path / "race.db"
    holder = sqlite3.connect(path, isolation_level=None)
    try:
        holder.execute("PRAGMA journal_mode = WAL")
        holder.execute("CREATE TABLE t (x)")
        holder.execute("INSERT INTO t VALUES (1)")
        assert not _other_process_can_leave_wal(str(path))
        # The file appears between the existence check and the creation.
        monkeypatch.setattr(os.path, "exists", lambda p: False)
        SQLiteStateRepository(path)._create_file()
        monkeypatch.undo()
        assert not _other_process_can_leave_wal(str(path)), "the holder's lock was dropped"
        assert holder.execute("SELECT x FROM t").fetchall() == [(1,)]
    finally:
        holder.close()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".new")]


def test_new_file_gets_0600_without_leftovers(tmp_path: Path) -> None:
    repo = SQLiteStateRepository(tmp_path / "sub" / "fresh.db")
    repo.store("k", *make(1, 1))
    assert stat.S_IMODE((tmp_path / "sub" / "fresh.db").stat().st_mode) == 0o600
    assert sorted(p.name for p in (tmp_path / "sub").iterdir() if not p.name.startswith("fresh.db"))\
        == []
    repo.close()


MULTIPROCESS_WORKER = """
    import random, sys, threading, time, traceback
    import tiered_state

    path, seed, start = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    errors = []
    opened = threading.Barrier(5, timeout=60)
    shared = None

    def work(thread):
        rng = random.Random(seed * 10 + thread)
        state = None
        try:
            while time.time() < start:  # every opener of the new store at once
                time.sleep(0.001)
            # Half the threads open stores of their own, half share the process's.
            state = tiered_state.open(path) if thread % 2 == 0 else None
            opened.wait()
            state = state or shared
            for i in range(300):
                key = f"k{rng.randrange(30)}"
                op = rng.random()
                if op < 0.35:
                    state.set(key, {"t": thread, "i": i}, tier=rng.choice(["hot", "warm", "cold"]))
                elif op < 0.65:
                    state.get(key)
                elif op < 0.75:
                    state.set_many({key: i, f"k{rng.randrange(30)}": i}, tier="warm")
                elif op < 0.85:
                    state.get_many([key, f"k{rng.randrange(30)}"])
                elif op < 0.95:
                    state.delete(key)
                else:
                    state.keys("k*")
        except BaseException:
            errors.append(traceback.format_exc())
        finally:
            if state is not None and state is not shared:
                state.close()

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    while time.time() < start:
        time.sleep(0.001)
    try:
        shared = tiered_state.open(path)
    finally:
        opened.wait()
    for t in threads:
        t.join(timeout=120)
    shared.close()
    print("".join(errors[:2]) or "ok")
"""


def test_two_processes_with_four_threads_each_never_see_sqlite_busy(tmp_path: Path) -> None:
    """2 processes x 4 threads write and read one new embedded store at once:
    every write waits for the lock (none fails with SQLITE_BUSY) and nothing
    else goes wrong either."""
    path = str(tmp_path / "store")
    start = time.time() + 1.0
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(MULTIPROCESS_WORKER), path, str(seed), str(start)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for seed in range(2)
    ]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-2000:]
        assert out.strip() == "ok", out[-3000:]
