from __future__ import annotations

import contextlib
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from tiered_state.config import open_repository
from tiered_state.errors import BackendError, BatchError, ConfigurationError, IntegrityError
from tiered_state.record import make_stub, make_tombstone
from tiered_state.repositories.filesystem_repository import (
    FileSystemStateRepository,
    _locate,
    decode_name,
    encode_name,
)
from tiered_state.testing import AWKWARD_KEYS, RepositoryContract, make

ROOT = str(Path(__file__).resolve().parent.parent)


class TestFileSystemConformance(RepositoryContract):
    takes_no_secret = "file:// names a local folder: there is no password to give"

    @pytest.fixture
    def repository(self, tmp_path: Path) -> Iterator[FileSystemStateRepository]:
        with FileSystemStateRepository(tmp_path / "cold") as repo:
            yield repo

    @pytest.fixture
    def repository_url(self, tmp_path: Path) -> str:
        return (tmp_path / "cold").as_uri()

    @contextlib.contextmanager
    def break_key(self, repository: FileSystemStateRepository, key: str) -> Iterator[None]:  # type: ignore[override]
        """A folder, not empty, where the file of ``key`` goes: nothing can
        replace, read or unlink it."""
        fan, name, _ = _locate(key)
        path = Path(repository.root) / fan / name
        if path.is_file():
            path.unlink()
        (path / "in-the-way").mkdir(parents=True)
        try:
            yield
        finally:
            shutil.rmtree(path)


@pytest.fixture
def repo(tmp_path: Path) -> Iterator[FileSystemStateRepository]:
    with FileSystemStateRepository(tmp_path / "cold") as repository:
        yield repository


def files_under(root: Path) -> list[Path]:
    return [Path(d) / f for d, _, names in os.walk(root) for f in names]


# ---------------------------------------------------------------- URLs and options
def test_url_forms(tmp_path: Path) -> None:
    absolute = open_repository(f"file://{tmp_path}/abs?fsync=false&compress_above=none")
    assert isinstance(absolute, FileSystemStateRepository)
    assert absolute.root == str(tmp_path / "abs")
    assert absolute.fsync is False and absolute.compress_above is None
    relative = open_repository("file://rel/cold?compress_above=10&compress_level=9")
    assert isinstance(relative, FileSystemStateRepository)
    assert relative.root == str(tmp_path / "rel" / "cold")  # conftest chdir'ed to tmp_path
    assert (relative.compress_above, relative.compress_level) == (10, 9)
    assert open_repository("file://./dot").root == str(tmp_path / "dot")  # type: ignore[attr-defined]
    assert open_repository("file:///a%20b").root == "/a b"  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    "url", ["file://", "file:///x?bogus=1", "file:///x?fsync=maybe", "file:///x?compress_level=12"]
)
def test_bad_urls(url: str) -> None:
    with pytest.raises(ConfigurationError):
        open_repository(url)


# ---------------------------------------------------------------- names
MALICIOUS = [
    *AWKWARD_KEYS,
    "../../../../../../tmp/evil", "/etc/passwd", "./.", "...", ".tmp-abc", "~hashed-looking",
    "%2E%2E", "a" * 300, "ü" * 100, "x/" * 500, "CON", "nul", "a:b",
]


@pytest.mark.parametrize("key", MALICIOUS, ids=lambda k: repr(k)[:40])
def test_names_are_safe_and_reversible(key: str) -> None:
    name = encode_name(key)
    assert len(name.encode("utf-8")) <= 255
    assert "/" not in name and "\x00" not in name and name not in (".", "..")
    assert not name.startswith(".")  # the temp-file and lock namespace
    assert name == name.lower() or "%" in name  # case-insensitive file systems keep keys apart
    decoded = decode_name(name)
    assert decoded in (key, None)
    assert decoded is not None or name.startswith("~")


def test_malicious_keys_stay_inside_the_root(tmp_path: Path) -> None:
    root = tmp_path / "deep" / "cold"
    repo = FileSystemStateRepository(root)
    for i, key in enumerate(MALICIOUS):
        repo.store(key, *make(i))
    assert sorted(repo.keys()) == sorted(set(MALICIOUS))
    for i, key in enumerate(MALICIOUS):
        assert repo.fetch(key) == i
    outside = [p for p in files_under(tmp_path) if root not in p.parents]
    assert outside == []
    for path in files_under(root):
        assert path.resolve().is_relative_to(root.resolve())
        assert len(path.name.encode()) <= 255
    assert not Path("/tmp/evil").exists()


def test_long_keys_are_recovered_from_the_file(repo: FileSystemStateRepository) -> None:
    keys = ["é" * 512, "k" * 1024, "long/" + "z" * 400]
    repo.store_many({k: make(k) for k in keys})
    assert sorted(repo.keys()) == sorted(keys)
    assert sorted(repo.keys("long/*")) == ["long/" + "z" * 400]
    assert all(p.name.startswith("~") for p in files_under(Path(repo.root)) if p.name != ".lock")


#: Payload names as the manager builds them: ``<key>@<16 hex digits of the version>``.
PAYLOAD_KEYS = [
    "p" * 1000 + "@0123456789abcdef",  # hashed: the name would pass 200 bytes
    "é" * 100 + "@0123456789abcdef",  # hashed: percent-encoding triples it
    "user:42@0123456789abcdef",  # encoded as is
    "a/b@ffffffffffffffff",
    "~" + "0" * 64 + "~0123456789abcdef",  # the catalog's name for a key too long for "@"
]


def test_payload_keys_round_trip(repo: FileSystemStateRepository) -> None:
    assert encode_name(PAYLOAD_KEYS[0]).startswith("~")
    assert encode_name(PAYLOAD_KEYS[1]).startswith("~")
    assert decode_name(encode_name(PAYLOAD_KEYS[2])) == PAYLOAD_KEYS[2]
    items = {k: make({"key": k}, 7) for k in PAYLOAD_KEYS}
    assert repo.store_many_if_newer(items) == set(PAYLOAD_KEYS)
    # Written once: the same version again is refused, and no temp file is left.
    assert repo.store_many_if_newer(items) == set()
    assert repo.store_if_newer(PAYLOAD_KEYS[0], *items[PAYLOAD_KEYS[0]]) is False
    assert not [p for p in files_under(Path(repo.root)) if p.name.startswith(".tmp")]
    for key in PAYLOAD_KEYS:
        assert repo.fetch(key) == {"key": key}
    got = repo.fetch_many(PAYLOAD_KEYS)
    assert set(got) == set(PAYLOAD_KEYS) and all(e.valid() for e in got.values())
    assert sorted(repo.iter_all_keys()) == sorted(PAYLOAD_KEYS)
    assert sorted(repo.keys("*@0123456789abcdef")) == sorted(PAYLOAD_KEYS[:3])
    assert repo.keys(PAYLOAD_KEYS[0]) == [PAYLOAD_KEYS[0]]
    assert repo.delete_many_if_version({k: 7 for k in PAYLOAD_KEYS[:2]}) == set(PAYLOAD_KEYS[:2])
    assert sorted(repo.iter_all_keys()) == sorted(PAYLOAD_KEYS[2:])


def test_iter_all_keys_streams_folder_by_folder(
    repo: FileSystemStateRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.store_many({f"k{i}": make(i) for i in range(300)})
    listed: list[object] = []
    real = os.scandir

    def scandir(path: int) -> object:
        listed.append(path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    walk = repo.iter_all_keys()
    first = next(walk)
    assert len(listed) == 1  # one folder listed so far, not the whole tree
    assert len({first, *walk}) == 300 and len(listed) > 100


# ---------------------------------------------------------------- entry kinds on disk
def test_tombstone_file_and_counts(repo: FileSystemStateRepository) -> None:
    import time

    repo.store("v", *make("x", 5))
    repo.store("s", *make_stub(make("y", 5)[1], '{"at":"cold"}'))
    assert repo.store_if_version("v", "", make_tombstone(6, now=time.time()), expected=5)
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "v"]
    header, body = path.read_bytes().split(b"\n", 1)
    assert body == b""
    assert json.loads(header)["encoding"] == "tombstone"
    assert json.loads(header)["expires_at"] == 0.0
    stats = repo.stats()
    assert (stats["key_count"], stats["tombstone_count"], stats["expired_count"]) == (1, 1, 0)
    assert repo.keys() == ["s"] and repo.keys("v") == [] and repo.fetch("s") is None
    assert sorted(repo.iter_all_keys()) == ["s", "v"]


def test_conditional_write_over_corrupt_file_leaves_no_temp(repo: FileSystemStateRepository) -> None:
    repo.store("k", *make(1, 3))
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "k"]
    path.write_bytes(b"garbage without a header")
    with pytest.raises(IntegrityError):
        repo.store_if_newer("k", *make(2, 4))
    with pytest.raises(BatchError) as info:
        repo.store_many_if_newer({"k": make(2, 4), "other": make(3, 4)})
    assert set(info.value.failed) == {"k"} and info.value.succeeded == ["other"]
    assert isinstance(info.value.failed["k"], IntegrityError)
    assert not [p for p in files_under(Path(repo.root)) if p.name.startswith(".tmp")]


def test_batch_conditionals_report_failed_keys_apart_from_refused(
    repo: FileSystemStateRepository, tmp_path: Path
) -> None:
    keys = [f"k{i}" for i in range(40)]
    bad_fan = _locate(keys[0])[0]
    in_bad = {k for k in keys if _locate(k)[0] == bad_fan}
    repo.store_many({k: make(k, 5) for k in keys})
    # A folder replaced by a symlink is refused: those keys fail, the rest go ahead.
    fan = Path(repo.root) / bad_fan
    for child in fan.iterdir():
        child.unlink()
    fan.rmdir()
    (tmp_path / "elsewhere").mkdir()
    fan.symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    items = {k: make(k, 6 if i % 2 else 4) for i, k in enumerate(keys)}  # even: older, refused
    with pytest.raises(BatchError) as info:
        repo.store_many_if_newer(items)
    assert set(info.value.failed) == in_bad
    assert set(info.value.succeeded) == {k for i, k in enumerate(keys) if i % 2} - in_bad
    with pytest.raises(BatchError) as info:
        repo.delete_many_if_version(dict.fromkeys(keys, 6))
    assert set(info.value.failed) == in_bad
    assert set(info.value.succeeded) == {k for i, k in enumerate(keys) if i % 2} - in_bad
    assert list((tmp_path / "elsewhere").iterdir()) == []


# ---------------------------------------------------------------- format, permissions
def test_file_format_and_compression(tmp_path: Path) -> None:
    repo = FileSystemStateRepository(tmp_path / "c", compress_above=100)
    small, big = make({"a": 1}), make({"blob": "y" * 10_000}, version=5, ttl=60)
    repo.store("small", *small)
    repo.store("big", *big)
    files = {p.name: p.read_bytes() for p in files_under(Path(repo.root)) if p.name != ".lock"}
    header = json.loads(files["small"].split(b"\n", 1)[0])
    assert header["key"] == "small" and header["body"] == "json"
    assert files["small"].split(b"\n", 1)[1] == small[0].encode()
    big_header, body = files["big"].split(b"\n", 1)
    assert json.loads(big_header)["body"] == "json+zlib" and len(body) < 1000
    entry = repo.fetch_record("big")
    assert entry is not None and entry.valid() and entry.metadata["encoding"] == "json"
    assert entry.metadata["expires_at"] == big[1]["expires_at"]
    assert repo.fetch("big") == {"blob": "y" * 10_000}


def test_files_and_folders_are_private(tmp_path: Path) -> None:
    os.umask(0o022)
    root = tmp_path / "new" / "cold"
    repo = FileSystemStateRepository(root)
    repo.store_many({f"k{i}": make(i) for i in range(20)})
    repo.store("one", *make(1))
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    for dirpath, dirnames, filenames in os.walk(root):
        for d in dirnames:
            assert stat.S_IMODE((Path(dirpath) / d).stat().st_mode) == 0o700
        for f in filenames:
            assert stat.S_IMODE((Path(dirpath) / f).stat().st_mode) == 0o600


def test_corrupt_file_raises_integrity_error(repo: FileSystemStateRepository) -> None:
    repo.store("k", *make({"a": 1}))
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "k"]
    path.write_bytes(b"garbage without a header")
    with pytest.raises(IntegrityError):
        repo.fetch("k")
    assert repo.keys() == []  # listing skips it (with a warning) instead of failing


def test_expired_files_are_tombstones_until_deleted(repo: FileSystemStateRepository) -> None:
    import time

    repo.store("gone", *make("old", version=4, now=time.time() - 10, ttl=1))
    assert repo.fetch("gone") is None and repo.keys() == []
    entry = repo.fetch_record("gone")
    assert entry is not None and entry.expired() and entry.version == 4
    assert list(repo.iter_all_keys()) == ["gone"]
    assert repo.stats()["expired_count"] == 1
    assert repo.delete("gone") is True


# ---------------------------------------------------------------- crash safety, symlinks
def test_leftover_temp_file_is_never_a_key(repo: FileSystemStateRepository) -> None:
    repo.store("k", *make("old"))
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "k"]
    # What a crash between write and rename leaves: a complete temp file.
    (path.parent / ".tmp-deadbeef").write_bytes(path.read_bytes())
    assert repo.keys() == ["k"] and list(repo.iter_all_keys()) == ["k"]
    assert repo.stats()["key_count"] == 1


def test_failed_rename_keeps_old_value_and_no_temp(
    repo: FileSystemStateRepository, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo.store("k", *make("old"))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError(5, "simulated I/O error")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(BackendError) as info:
        repo.store("k", *make("new"))
    assert isinstance(info.value.__cause__, OSError)
    monkeypatch.undo()
    assert repo.fetch("k") == "old"
    assert [p.name for p in files_under(Path(repo.root)) if p.name.startswith(".tmp")] == []


def test_killed_writer_leaves_every_key_readable(tmp_path: Path) -> None:
    root = tmp_path / "cold"
    code = """
        import sys
        from tiered_state.repositories.filesystem_repository import FileSystemStateRepository
        from tiered_state.testing import make
        repo = FileSystemStateRepository(sys.argv[1])
        i = 0
        while True:
            i += 1
            repo.store(f"k{i % 7}", *make({"i": i, "pad": "p" * (i % 5000)}, version=i))
            if i == 50:
                print("ready", flush=True)
    """
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(root)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    proc.kill()
    proc.wait()
    repo = FileSystemStateRepository(root)
    assert sorted(repo.keys()) == [f"k{i}" for i in range(7)]
    for key in repo.keys():
        entry = repo.fetch_record(key)
        assert entry is not None and entry.valid()


def test_symlinked_file_is_never_followed(repo: FileSystemStateRepository, tmp_path: Path) -> None:
    secret = tmp_path / "outside.txt"
    secret.write_text("do not touch")
    repo.store("victim", *make(1))
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "victim"]
    path.unlink()
    path.symlink_to(secret)
    with pytest.raises(BackendError):
        repo.fetch("victim")  # O_NOFOLLOW: never reads the target
    repo.store("victim", *make(2))  # rename replaces the link, not the target
    assert repo.fetch("victim") == 2
    assert secret.read_text() == "do not touch"
    path.unlink()
    path.symlink_to(secret)
    assert repo.delete("victim") is True
    assert secret.read_text() == "do not touch"


def test_symlinked_folder_is_never_followed(repo: FileSystemStateRepository, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    repo.store("victim", *make(1))
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "victim"]
    fan = path.parent
    for child in fan.iterdir():
        child.unlink()
    fan.rmdir()
    fan.symlink_to(outside, target_is_directory=True)
    with pytest.raises(BackendError):
        repo.store("victim", *make(2))
    assert list(outside.iterdir()) == []
    assert repo.keys() == []  # listing does not walk into it either


# ---------------------------------------------------------------- processes
def test_conditional_writes_are_atomic_across_processes(tmp_path: Path) -> None:
    root = tmp_path / "cold"
    FileSystemStateRepository(root).store("counter", *make(0, version=1))
    code = """
        import sys
        from tiered_state.repositories.filesystem_repository import FileSystemStateRepository
        from tiered_state.testing import make
        repo = FileSystemStateRepository(sys.argv[1], fsync=False)
        done = 0
        while done < 25:
            entry = repo.fetch_record("counter")
            value = int(entry.payload)
            if repo.store_if_version("counter", *make(value + 1, version=entry.version + 1),
                                     expected=entry.version):
                done += 1
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(root)],
                              cwd=ROOT, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    for proc in procs:
        _, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
    repo = FileSystemStateRepository(root)
    assert repo.fetch("counter") == 100  # no increment lost
    assert repo.fetch_record("counter").version == 101  # type: ignore[union-attr]


def test_batch_conditionals_are_atomic_across_processes(tmp_path: Path) -> None:
    """Processes increment the same counters with store_many_if_version, each
    batch in its own key order: no increment is lost and no batch deadlocks."""
    root = tmp_path / "cold"
    keys = [f"c{i}" for i in range(12)]
    FileSystemStateRepository(root).store_many({k: make(0, version=1) for k in keys})
    code = """
        import json, random, sys
        from tiered_state.repositories.filesystem_repository import FileSystemStateRepository
        from tiered_state.testing import make
        repo = FileSystemStateRepository(sys.argv[1], fsync=False)
        keys = [f"c{i}" for i in range(12)]
        wins = dict.fromkeys(keys, 0)
        rng = random.Random(int(sys.argv[2]))
        for _ in range(30):
            batch = rng.sample(keys, 6)
            got = repo.fetch_many(batch)
            items = {k: make(int(got[k].payload) + 1, version=got[k].version + 1) for k in batch}
            for key in repo.store_many_if_version(items, {k: got[k].version for k in batch}):
                wins[key] += 1
        print(json.dumps(wins))
    """
    procs = [subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(root), str(n)],
                              cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for n in range(4)]
    totals = dict.fromkeys(keys, 0)
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        for key, wins in json.loads(out).items():
            totals[key] += wins
    repo = FileSystemStateRepository(root)
    for key in keys:
        entry = repo.fetch_record(key)
        assert entry is not None
        assert int(entry.payload) == totals[key] and entry.version == totals[key] + 1


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_fork_child_can_write(repo: FileSystemStateRepository) -> None:
    repo.store("parent", *make("p"))
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        code = 1
        try:
            repo.store_if_newer("child", *make("c", version=3))
            code = 0 if repo.fetch("parent") == "p" else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert repo.fetch("child") == "c"
    repo.store("parent", *make("p2"))
    assert repo.fetch("parent") == "p2"


def test_false_deadlock_from_the_kernel_is_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """POSIX record locks are per process: threads of two processes waiting on
    each other's stripes make the kernel answer EDEADLK though no thread holds
    two stripes. That can't be staged reliably, so lockf is made to say it once."""
    import errno
    import fcntl

    from tiered_state.repositories import filesystem_repository as module

    real = fcntl.lockf
    calls = {"n": 0}

    def flaky(fd: int, cmd: int, *args: int) -> None:
        calls["n"] += 1
        if cmd == fcntl.LOCK_EX and calls["n"] == 1:
            raise OSError(errno.EDEADLK, "Resource deadlock avoided")
        real(fd, cmd, *args)

    monkeypatch.setattr(module.fcntl, "lockf", flaky)
    repo = FileSystemStateRepository(tmp_path / "cold")
    assert repo.store_if_version("k", *make("v", 5), expected=0) is True
    assert repo.fetch("k") == "v" and calls["n"] >= 3


# ---------------------------------------------------------------- damaged headers
def test_fetch_many_reports_an_unreadable_file_and_reads_the_rest(
    repo: FileSystemStateRepository,
) -> None:
    repo.store_many({"bad": make(1, 3), "good": make(2, 4)})
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "bad"]
    path.write_bytes(b"garbage without a header")
    with pytest.raises(BatchError) as info:
        repo.fetch_many(["bad", "good", "absent"])
    assert set(info.value.failed) == {"bad"} and info.value.succeeded == ["good"]
    assert isinstance(info.value.failed["bad"], IntegrityError)
    assert repo.keys() == ["good"] and repo.keys("bad") == [] and repo.stats()["key_count"] == 1


@pytest.mark.parametrize("edit", [
    (b'"checksum":', b'"checksuo":'),  # a field's name: no KeyError, an IntegrityError
    (b'"version":3', b'"version":2'),  # a value: the metadata checksum catches it
    (b'"key":"k"', b'"key":"j"'),  # the key: not "absent", an IntegrityError
    (b'"body":"json"', b'"body":"jsoo"'),
    (b'"meta":"', b'"meta":"0'),
])
def test_a_damaged_header_is_an_integrity_error(
    repo: FileSystemStateRepository, edit: tuple[bytes, bytes]
) -> None:
    repo.store("k", *make({"a": 1}, 3))
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "k"]
    data = path.read_bytes()
    assert edit[0] in data
    path.write_bytes(data.replace(edit[0], edit[1], 1))
    with pytest.raises(IntegrityError) as info:
        repo.fetch_record("k")
    assert info.value.key == "k"
    with pytest.raises(IntegrityError):
        repo.fetch("k")
    with pytest.raises(IntegrityError):
        repo.store_if_newer("k", *make({"a": 2}, 4))  # a version it cannot read is no version
    assert repo.keys() == [] and repo.stats()["key_count"] == 0


def test_headers_carry_a_metadata_checksum(repo: FileSystemStateRepository) -> None:
    from tiered_state.record import metadata_checksum

    payload, metadata = make({"a": 1}, 3)
    repo.store("k", payload, metadata)
    (path,) = [p for p in files_under(Path(repo.root)) if p.name == "k"]
    header = json.loads(path.read_bytes().split(b"\n", 1)[0])
    assert header["meta"] == metadata_checksum("k", metadata, "json")
