"""The ``tiered-state`` command, run for real.

Most tests run ``python -m tiered_state`` in a subprocess (one runs the
``tiered-state`` console script) against a store under ``tmp_path`` and check
what a user sees: stdout, one-line errors on stderr, exit status, and the data
left in the store (read back in-process through the library). Some call
:func:`tiered_state.cli.main` in-process, as an embedding tool would. Tests
may reach the repositories to set a store up or look inside it; the command
itself uses the public API only.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import pty
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import BackendUnavailableError, Tier, codec
from tiered_state.cli import Progress, main
from tiered_state.factory import open_repositories
from tiered_state.record import checksum, make_metadata

from .support import free_port, require_module, unique_name

TIMEOUT = 30


def cli(
    *args: str,
    path: Path | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    stderr: int | None = None,
    timeout: float = TIMEOUT,
    unset: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tiered_state [--path PATH] ARGS...`` (without the
    environment variables whose names start with ``unset``)."""
    command = [sys.executable, "-m", "tiered_state"]
    if path is not None:
        command += ["--path", str(path)]
    environment = {k: v for k, v in os.environ.items() if unset is None or not k.startswith(unset)}
    return subprocess.run(
        command + list(args), input=stdin, capture_output=stderr is None,
        stderr=stderr, text=True, timeout=timeout, env={**environment, **(env or {})},
    )


def run(capsys: pytest.CaptureFixture[str], *args: str, path: Path | None = None
        ) -> tuple[int, str, str]:
    """``main([--path PATH] ARGS...)`` in this process: (exit status, stdout, stderr)."""
    code = main((["--path", str(path)] if path is not None else []) + list(args))
    out, err = capsys.readouterr()
    return code, out, err


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit ``code``, nothing on stdout, one error line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith("tiered-state: error: "), errors[0]
    for needle in needles:
        assert needle in errors[0], errors[0]


def one_json(result: subprocess.CompletedProcess[str] | str) -> Any:
    """The one JSON document a ``--json`` command printed, on one line."""
    out = result if isinstance(result, str) else result.stdout
    assert out.endswith("\n") and out.count("\n") == 1, out
    return json.loads(out)


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def seeded(store: Path) -> Iterator[Path]:
    """A store with values of every JSON type, a TTL, and copies in WARM and COLD."""
    with tiered_state.open(store) as state:
        state.set_many({f"order:{n}": {"id": n, "px": n * 1.5} for n in range(30)}, tier="warm")
        state.set("position:BTC", {"qty": 1.5, "tags": ["a", "ü"], "big": 2**70, "none": None})
        state.set("session:1", "token", ttl=3600)
        state.set("flag", True, tier="cold")
        state.set("weird key/..%_[x]", [1, 2.5, "três"])
        state.demote("order:0", to="cold")
        # A copy in both WARM and COLD must still be listed and exported once.
        state.promote("order:0", to="warm")
    yield store


def catalog_kind(path: Path, key: str) -> str | None:
    """What the catalog (WARM) holds for ``key``: "value", "stub", "tombstone" or None."""
    with tiered_state.open(path) as state:
        entry = state.repositories[Tier.WARM].fetch_record(key)
        return None if entry is None else entry.kind


def make_v01_store(path: Path, hot: str | None = None) -> None:
    """A store as tiered-state 0.1 wrote it: an independent copy per tier, COLD
    objects named after the bare key, no format record.

    ``k``: the COLD copy is newer; ``j``: the WARM copy is newer; ``only-cold``
    is in COLD alone. A shared HOT (``hot``) gets a stale copy of ``k``.
    """
    repos = open_repositories(path, hot=hot)
    try:
        now = time.time()

        def put(tier: Tier, key: str, value: object, version: int) -> None:
            payload = codec.encode(value)
            repos[tier].store(key, payload, make_metadata(payload, version, now=now))

        put(Tier.WARM, "k", "warm-older", 100)
        put(Tier.COLD, "k", "cold-newer", 200)
        put(Tier.WARM, "j", "warm-newer", 200)
        put(Tier.COLD, "j", "cold-older", 100)
        put(Tier.COLD, "only-cold", {"n": 1}, 150)
        if hot is not None:
            put(Tier.HOT, "k", "warm-older", 100)
    finally:
        for repo in repos.values():
            repo.close()


def records(path: Path, **urls: str) -> dict[str, tuple[object, int, float | None, float]]:
    """key -> (value, version, expires_at, created_at), read through the library."""
    with tiered_state.open(path, **urls) as state:
        out = {}
        for key in state.keys():
            record = state.get_record(key)
            assert record is not None
            out[key] = (record.value, record.version, record.expires_at, record.created_at)
        return out


# ---------------------------------------------------------------- key commands
def test_set_get_delete(store: Path) -> None:
    result = cli("set", "k", '{"b": [1, 2], "a": "ü"}', path=store)
    assert result.returncode == 0, result.stderr
    version = int(result.stdout)
    result = cli("get", "k", path=store)
    assert result.returncode == 0
    assert result.stdout == '{"a":"ü","b":[1,2]}\n'
    with tiered_state.open(store) as state:
        record = state.get_record("k")
        assert record is not None and record.version == version
        state.set("other", 1)
    result = cli("delete", "k", "other", "never-there", path=store)
    assert (result.returncode, result.stdout) == (0, "2\n")
    assert_clean_error(cli("get", "k", path=store), 1, "'k'", "not found")


def test_set_options(store: Path) -> None:
    result = cli("set", "s", '"x"', "--tier", "cold", "--ttl", "60", path=store)
    assert result.returncode == 0, result.stderr
    with tiered_state.open(store) as state:
        record = state.get_record("s")
        assert record is not None and record.tier is Tier.COLD
        assert record.expires_at is not None and 55 < record.expires_at - time.time() <= 60
        # Compare-and-set: a stale version is refused, the current one accepted.
        assert_clean_error(cli("set", "s", '"y"', "--if-version", "1", path=store), 1, "conflict")
        ok = cli("set", "s", '"y"', "--if-version", str(record.version), path=store)
        assert ok.returncode == 0 and int(ok.stdout) > record.version
        assert state.get("s") == "y"
    assert cli("set", "fresh", "1", "--if-version", "0", path=store).returncode == 0
    assert_clean_error(cli("set", "fresh", "2", "--if-version", "0", path=store), 1, "conflict")


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("set", "k", "{not json"), "invalid JSON"),
        (("set", "k", "NaN"), "JSON"),
        (("set", "k", "1", "--tier", "lukewarm"), "lukewarm"),
        (("set", "k", "1", "--ttl", "-5"), "positive"),
        (("get", "x" * 1100), "1024"),
        (("keys", "[unclosed"), "pattern"),
        (("nosuchcommand",), "invalid choice"),
    ],
)
def test_usage_errors_exit_2(store: Path, args: tuple[str, ...], needle: str) -> None:
    assert_clean_error(cli(*args, path=store), 2, needle)


def test_keys_streamed_once_each(seeded: Path) -> None:
    result = cli("keys", path=seeded)
    assert result.returncode == 0, result.stderr
    listed = result.stdout.splitlines()
    assert len(listed) == len(set(listed))  # order:0 is in WARM and COLD, listed once
    assert set(listed) == set(records(seeded))
    assert listed == sorted(listed)  # the catalog (SQLite) lists in key order
    result = cli("keys", "order:1?", path=seeded)
    assert sorted(result.stdout.splitlines()) == [f"order:{n}" for n in range(10, 20)]
    assert cli("keys", "nothing:*", path=seeded).stdout == ""


def test_stats_table_and_json(seeded: Path) -> None:
    table = cli("stats", path=seeded)
    assert table.returncode == 0, table.stderr
    assert "warm (sqlite)" in table.stdout and "cold (filesystem)" in table.stdout
    assert "key_count" in table.stdout
    data = json.loads(cli("stats", "--json", path=seeded).stdout)
    tiers = data["tiers"]
    assert tiers["warm"]["key_count"] + tiers["cold"]["key_count"] >= len(records(seeded))
    assert data["manager"]["catalog"] == "warm"


def test_keys_stream_in_key_order_across_pages(store: Path, capsys: pytest.CaptureFixture[str]
                                                ) -> None:
    keys = [f"k:{n}" for n in range(1200)] + ["k:é", "k:Z", "k:~", "k:日本", "other"]
    with tiered_state.open(store) as state:
        state.set_many(dict.fromkeys(keys, 0), tier="warm")
        state.delete("k:5")
    code, out, err = run(capsys, "keys", "k:*", path=store)
    assert (code, err) == (0, "")
    expected = sorted(k for k in keys if k.startswith("k:") and k != "k:5")
    assert out.splitlines() == expected  # code point order = SQLite's byte order of UTF-8


def test_promote_and_demote(seeded: Path) -> None:
    result = cli("demote", "position:BTC", path=seeded)
    assert (result.returncode, result.stdout) == (0, "moved 'position:BTC' to cold\n"), result.stderr
    assert catalog_kind(seeded, "position:BTC") == "stub"  # the payload went to COLD
    with tiered_state.open(seeded) as state:
        record = state.get_record("position:BTC")
        assert record is not None and record.tier is Tier.COLD
    assert cli("promote", "position:BTC", "--to", "warm", path=seeded).returncode == 0
    assert catalog_kind(seeded, "position:BTC") == "value"
    assert_clean_error(cli("demote", "absent", path=seeded), 1, "not found")
    assert_clean_error(cli("promote", "absent", path=seeded), 1, "not found")
    assert_clean_error(cli("demote", "flag", "--to", "hot", path=seeded), 2, "invalid choice")


def test_sweep_dry_run_then_sweep(store: Path) -> None:
    with tiered_state.open(store) as state:
        state.set_many({f"old:{n}": n for n in range(5)}, tier="warm")
        state.set_many({f"gone:{n}": n for n in range(3)}, tier="warm", ttl=0.05)
        # An overwritten COLD value leaves its old payload unreferenced: garbage.
        state.set("c", 1, tier="cold")
        state.set("c", 2, tier="cold")
    time.sleep(0.1)
    dry = cli("sweep", "--dry-run", "--cold-after", "0.01", "--purge-after", "0", path=store)
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.startswith("dry run: ")
    assert "would move 5" in dry.stdout and "would purge 3" in dry.stdout
    assert "collected" not in dry.stdout  # a dry run does not look for garbage
    with tiered_state.open(store) as state:  # nothing changed
        warm = state.repositories[Tier.WARM]
        assert warm.fetch_record("old:0").kind == "value"  # type: ignore[union-attr]
        assert warm.fetch_record("gone:0") is not None
    done = cli("sweep", "--cold-after", "0.01", "--purge-after", "0", path=store)
    assert done.returncode == 0, done.stderr
    assert "moved 5" in done.stdout and "purged 3" in done.stdout
    assert re.search(r"collected [1-9]\d* unreferenced payloads", done.stdout), done.stdout
    with tiered_state.open(store) as state:
        warm = state.repositories[Tier.WARM]
        assert {k: e.kind for k, e in warm.fetch_many([f"old:{n}" for n in range(5)]).items()} \
            == {f"old:{n}": "stub" for n in range(5)}
        assert warm.fetch_record("gone:0") is None
        assert state.get_many([f"old:{n}" for n in range(5)]) == {f"old:{n}": n for n in range(5)}
        assert state.get("c") == 2


def test_sweep_cold_after_0_moves_every_warm_record(store: Path) -> None:
    with tiered_state.open(store) as state:
        state.set_many({f"new:{n}": n for n in range(5)}, tier="warm")  # written just now
    done = cli("sweep", "--cold-after", "0", "--json", path=store)
    assert done.returncode == 0, done.stderr
    report = one_json(done)
    assert (report["moved"], report["failed"], report["dry_run"]) == (5, 0, False)
    assert [catalog_kind(store, f"new:{n}") for n in range(5)] == ["stub"] * 5
    assert_clean_error(cli("sweep", "--cold-after", "-1", path=store), 2, ">= 0")


def test_demote_says_when_nothing_moved(store: Path, capsys: pytest.CaptureFixture[str],
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    with tiered_state.open(store) as state:
        state.set("w", 1, tier="warm")
        state.set("c", 2, tier="cold")
    # Already at or below the target, no copy above: nothing to move, and no error.
    assert run(capsys, "demote", "c", "--to", "warm", path=store) == (
        0, "nothing moved: 'c' is in cold already, with no copy above it\n", "")
    code, out, err = run(capsys, "demote", "w", "--to", "warm", "--json", path=store)
    assert (code, err) == (0, "")
    assert one_json(out) == {"key": "w", "to": "warm", "moved": False, "tier": "warm"}
    assert catalog_kind(store, "c") == "stub" and catalog_kind(store, "w") == "value"
    code, out, err = run(capsys, "demote", "w", "--json", path=store)
    assert (code, err) == (0, "")
    assert one_json(out) == {"key": "w", "to": "cold", "moved": True, "tier": "cold"}
    assert run(capsys, "demote", "never", path=store) == (
        1, "", "tiered-state: error: nothing moved: key 'never' not found\n")

    # A write that lands while the move runs wins: demote returns False and the
    # value stays above the target.
    def racing(self: tiered_state.StateManager, key: str, to: object = "cold") -> bool:
        self.set(key, "newer", tier="warm")
        return False

    monkeypatch.setattr(tiered_state.StateManager, "demote", racing)
    assert run(capsys, "demote", "w", "--json", path=store) == (
        1, "", "tiered-state: error: nothing moved: 'w' was written while it was being moved "
               "to cold; run the command again\n")
    assert catalog_kind(store, "w") == "value"


def test_json_documents_of_the_key_commands(store: Path, capsys: pytest.CaptureFixture[str]
                                            ) -> None:
    code, out, err = run(capsys, "set", "k", '{"b": [1, 2], "a": "ü"}', "--json", path=store)
    assert (code, err) == (0, "")
    created = one_json(out)
    assert set(created) == {"key", "version"} and created["key"] == "k"
    code, out, err = run(capsys, "get", "k", "--json", path=store)
    assert (code, err) == (0, "")
    record = one_json(out)
    # The record as an export line: importable as it is.
    assert record == {"key": "k", "value": {"a": "ü", "b": [1, 2]}, "version": created["version"],
                      "checksum": checksum('{"a":"ü","b":[1,2]}'),
                      "created_at": record["created_at"], "updated_at": record["created_at"],
                      "expires_at": None, "tier": "warm"}
    assert run(capsys, "get", "absent", "--json", path=store) == (
        1, "", "tiered-state: error: key 'absent' not found\n")
    with tiered_state.open(store) as state:
        state.set_many({'we"ird\\ ü': 1, "k2": 2})
    code, out, err = run(capsys, "keys", "--json", path=store)
    assert (code, err) == (0, "")
    assert [json.loads(line) for line in out.splitlines()] == ["k", "k2", 'we"ird\\ ü']
    code, out, err = run(capsys, "demote", "k", "--json", path=store)
    assert one_json(out) == {"key": "k", "to": "cold", "moved": True, "tier": "cold"}
    code, out, err = run(capsys, "promote", "k", "--to", "warm", "--json", path=store)
    assert one_json(out) == {"key": "k", "to": "warm", "promoted": True}
    code, out, err = run(capsys, "delete", "k", "never", "--json", path=store)
    assert (code, err, one_json(out)) == (0, "", {"deleted": 1})


def test_json_documents_of_the_store_commands(seeded: Path, tmp_path: Path) -> None:
    stats = one_json(cli("stats", "--json", path=seeded))
    assert stats["manager"]["catalog"] == "warm" and "key_count" in stats["tiers"]["warm"]
    dry = one_json(cli("sweep", "--dry-run", "--cold-after", "none", "--json", path=seeded))
    assert dry == {"dry_run": True, "scanned": dry["scanned"], "moved": 0, "purged": 0,
                   "collected": None, "packed": None, "compacted": None, "segments_deleted": None,
                   "skipped": 0, "failed": 0, "reclaimed_bytes": None,
                   "seconds": dry["seconds"],
                   "errors": {}}
    dump = tmp_path / "dump.jsonl"
    exported = cli("export", str(dump), "order:1*", "--json", path=seeded)
    assert (exported.returncode, exported.stderr) == (0, "")
    assert one_json(exported) == {"exported": 11, "file": str(dump), "corrupt": []}
    imported = cli("import", str(dump), "--json", path=tmp_path / "target")
    assert one_json(imported) == {"imported": 11, "unchanged": 0, "newer": 0, "expired": 0,
                                  "invalid": 0}
    assert one_json(cli("upgrade", "--json", path=seeded)) == {
        "moved": 0, "dropped": 0, "corrupt": 0, "hot_flushed": 0, "packed": 0,
        "already": True}
    assert_clean_error(cli("export", "-", "--json", path=seeded), 2, "needs a FILE")


def test_keys_into_head_exits_0_quietly(store: Path) -> None:
    """`tiered-state keys | head -n 1`: the reader goes away early; no error, exit 0."""
    keys = [f"key:{n:06d}" for n in range(30_000)]
    with tiered_state.open(store) as state:
        state.set_many(dict.fromkeys(keys, 0), tier="warm")
    for extra in ((), ("--json",)):
        writer = subprocess.Popen(
            [sys.executable, "-m", "tiered_state", "--path", str(store), "keys", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert writer.stdout is not None
            # Far more than the pipe holds: the writer must run into the closed pipe.
            size = fcntl.fcntl(writer.stdout.fileno(), getattr(fcntl, "F_GETPIPE_SZ", 1032))
            assert sum(len(k) + 1 for k in keys) > 4 * size
            head = subprocess.Popen(["head", "-n", "1"], stdin=writer.stdout,
                                    stdout=subprocess.PIPE)
            writer.stdout.close()  # head holds the only read end now
            first, _ = head.communicate(timeout=TIMEOUT)
            _, err = writer.communicate(timeout=TIMEOUT)
        finally:
            if writer.poll() is None:
                writer.kill()
                writer.wait(timeout=TIMEOUT)
        expected = json.dumps(keys[0]) if extra else keys[0]
        assert first.decode() == expected + "\n"
        assert (writer.returncode, err.decode()) == (0, "")


# ---------------------------------------------------------------- export / import
def test_export_import_reproduces_keys_values_versions_ttls(seeded: Path, tmp_path: Path) -> None:
    dump = tmp_path / "dump.jsonl"
    result = cli("export", str(dump), path=seeded)
    assert result.returncode == 0, result.stderr
    before = records(seeded)
    assert f"exported {len(before)} records" in result.stdout
    text = dump.read_text(encoding="utf-8").splitlines()
    lines = [json.loads(line) for line in text]
    assert [line["key"] for line in lines] == sorted(before)  # streamed in catalog order
    assert set(lines[0]) == {"key", "value", "version", "checksum", "created_at", "updated_at",
                             "expires_at", "tier"}
    assert {line["tier"] for line in lines} == {"warm", "cold"}
    for raw, line in zip(text, lines):
        # The value is codec.encode(value) embedded verbatim, and the checksum is its SHA-256
        # (position:BTC holds a 2**70: the encoder's big-integer mark survives).
        value = codec.encode(line["value"])
        assert f'"value":{value},"version":' in raw
        assert hashlib.sha256(value.encode("utf-8")).hexdigest() == line["checksum"]
        assert (line["value"], line["version"], line["expires_at"], line["created_at"]) \
            == before[line["key"]]

    target = tmp_path / "target"
    result = cli("import", str(dump), path=target)
    assert result.returncode == 0, result.stderr
    assert f"imported {len(before)} records" in result.stdout
    assert records(target) == before  # keys, values, versions, expiry, creation time
    assert records(target)["session:1"][2] == before["session:1"][2]  # the TTL keeps counting
    # Each record back in its tier: a COLD one as a stub in the catalog.
    assert catalog_kind(target, "flag") == "stub"
    # Importing again changes nothing: every record there has the same version
    # (unchanged, not "newer"), and the COLD payloads the catalog points at
    # are left as they are.
    again = cli("import", str(dump), path=target)
    assert again.returncode == 0, again.stderr
    assert again.stdout == (f"imported 0 records, {len(before)} unchanged, kept 0 newer copies, "
                            "skipped 0 expired, 0 invalid lines\n")
    assert records(target) == before
    with tiered_state.open(target) as state:
        assert state.get_record("flag").tier is Tier.COLD  # type: ignore[union-attr]
    with tiered_state.open(target) as state:  # the store goes on from the imported versions
        assert state.set("flag", False) > before["flag"][1]
    third = cli("import", "--json", str(dump), path=target)
    assert (third.returncode, third.stderr) == (0, "")
    assert json.loads(third.stdout) == {"imported": 0, "unchanged": len(before) - 1, "newer": 1,
                                        "expired": 0, "invalid": 0}
    assert records(target)["flag"][0] is False


def test_export_stdout_pattern_and_import_stdin(seeded: Path, tmp_path: Path) -> None:
    result = cli("--quiet", "export", "-", "order:2*", path=seeded)
    assert result.returncode == 0 and result.stderr == ""
    keys = {json.loads(line)["key"] for line in result.stdout.splitlines()}
    assert keys == {"order:2"} | {f"order:{n}" for n in range(20, 30)}
    target = tmp_path / "target"
    loaded = cli("import", "-", path=target, stdin=result.stdout)
    assert loaded.returncode == 0, loaded.stderr
    assert set(records(target)) == keys


def test_import_rejects_tampered_and_malformed_lines(store: Path, tmp_path: Path) -> None:
    good = {"key": "a", "value": {"n": 1}, "version": 7, "checksum": checksum('{"n":1}'),
            "created_at": 1.0, "updated_at": 2.0, "expires_at": None, "tier": "warm"}
    tampered = {**good, "key": "b", "value": {"n": 2}}
    expired = {**good, "key": "c", "expires_at": 3.0}
    reserved = {**good, "key": "__tiered_state__:format"}
    control = {**good, "key": "bad\x01key"}
    good_too = {**good, "key": "d", "tier": "cold"}
    dump = tmp_path / "dump.jsonl"
    dump.write_text("\n".join([json.dumps(good), json.dumps(tampered), "{truncated", "",
                               json.dumps(expired), json.dumps(reserved), json.dumps(control),
                               json.dumps({**good, "version": 0}), json.dumps(good_too)]) + "\n")
    result = cli("import", str(dump), path=store)
    assert result.returncode == 1
    assert result.stdout == ("imported 2 records, 0 unchanged, kept 0 newer copies, "
                             "skipped 1 expired, 5 invalid lines\n")
    errors = result.stderr.splitlines()
    assert all(line.startswith("tiered-state: error: line ") for line in errors), errors
    assert [line.split(":")[2].strip() for line in errors] == \
        ["line 2", "line 3", "line 8", "line 6", "line 7"]
    assert "checksum" in errors[0] and "reserved" in errors[3] and "version" in errors[2]
    assert "Traceback" not in result.stderr
    # The bad lines were kept out of the batch, not the batch out of the store.
    assert records(store) == {"a": ({"n": 1}, 7, None, 1.0), "d": ({"n": 1}, 7, None, 1.0)}
    # A newer copy already in the store wins over the imported one.
    with tiered_state.open(store) as state:
        state.set("a", "newer")
    cli("import", str(dump), path=store)
    assert records(store)["a"][0] == "newer"
    assert_clean_error(cli("import", str(tmp_path / "missing.jsonl"), path=store), 2, "cannot read")


def test_export_leaves_out_a_record_that_fails_its_checksum(seeded: Path, tmp_path: Path) -> None:
    every = set(records(seeded))
    with tiered_state.open(seeded) as state:
        warm = state.repositories[Tier.WARM]
        entry = warm.fetch_record("order:5")
        assert entry is not None and entry.kind == "value"
        warm.store("order:5", entry.payload.replace("5", "6"), entry.metadata)  # bit rot
    dump = tmp_path / "dump.jsonl"
    result = cli("export", str(dump), path=seeded)
    assert result.returncode == 1
    assert result.stdout == (f"exported {len(every) - 1} records to {dump}; "
                             "1 failed their checksum and were left out\n")
    assert "'order:5'" in result.stderr and "Traceback" not in result.stderr
    assert {json.loads(line)["key"] for line in dump.read_text().splitlines()} == every - {"order:5"}


@pytest.mark.parametrize(
    ("fault", "code", "message"),
    [(BackendUnavailableError("connection lost", "s3"), 1, "unreachable: s3: connection lost"),
     (KeyboardInterrupt(), 130, "interrupted")],
)
def test_a_failed_export_leaves_no_partial_file(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch, fault: BaseException, code: int, message: str,
) -> None:
    with tiered_state.open(store) as state:
        state.set_many({f"k:{n:04d}": {"n": n, "pad": "x" * 100} for n in range(1200)},
                       tier="warm")
    folder = tmp_path / "backups"
    folder.mkdir()
    real = tiered_state.StateManager.iter_records
    seen: list[int] = []

    def failing(self: tiered_state.StateManager, *args: Any, **kwargs: Any
                ) -> Iterator[tiered_state.Record]:
        for n, record in enumerate(real(self, *args, **kwargs)):
            if n == 1000:  # two chunks written: the .partial file holds them
                seen.extend(p.stat().st_size for p in folder.glob("*.partial"))
                raise fault
            yield record

    monkeypatch.setattr(tiered_state.StateManager, "iter_records", failing)
    assert run(capsys, "export", str(folder / "dump.jsonl"), path=store) == (
        code, "", f"tiered-state: error: {message}\n")
    assert len(seen) == 1 and seen[0] > 0  # there was a partial file, with data in it
    assert list(folder.iterdir()) == []  # no .partial left, no dump either


def test_export_to_a_bad_path_is_a_clean_error(seeded: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no" / "such" / "dump.jsonl"
    result = cli("export", str(missing), path=seeded)
    assert_clean_error(result, 2, f"cannot write {missing}: No such file or directory")
    assert ".partial" not in result.stderr and not missing.parent.exists()
    folder = tmp_path / "folder"
    folder.mkdir()
    assert_clean_error(cli("export", str(folder), path=seeded), 2, "is a folder")
    assert list(folder.iterdir()) == []


def test_a_running_process_sees_an_import_at_once(store: Path, tmp_path: Path) -> None:
    with tiered_state.open(store) as state:
        state.set("k", "old")
        assert state.get("k") == "old"
        record = state.get_record("k")
        assert record is not None and record.tier is Tier.HOT  # cached in this process
        line = {"key": "k", "value": "new", "version": record.version + 1,
                "checksum": checksum('"new"'), "created_at": record.created_at,
                "updated_at": time.time(), "expires_at": None, "tier": "warm"}
        dump = tmp_path / "dump.jsonl"
        dump.write_text(json.dumps(line) + "\n")
        result = cli("import", str(dump), path=store)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("imported 1 records")
        assert state.get("k") == "new"  # not the copy this process had cached
        again = state.get_record("k")
        assert again is not None and again.version == record.version + 1


def test_progress_line_only_on_a_terminal(seeded: Path, tmp_path: Path) -> None:
    master, slave = pty.openpty()
    try:
        result = cli("export", str(tmp_path / "d.jsonl"), path=seeded, stderr=slave)
        assert result.returncode == 0
        os.close(slave)
        slave = -1
        shown = b""
        while True:
            try:
                chunk = os.read(master, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master)
        if slave != -1:
            os.close(slave)
    text = shown.decode()
    assert "\rexport: " in text and "/s" in text
    assert text.endswith("\r\x1b[K")  # the line is erased when done
    piped = cli("export", str(tmp_path / "e.jsonl"), path=seeded)
    assert "\r" not in piped.stderr and piped.stderr == ""


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_line_shows_count_rate_and_eta() -> None:
    screen = _Terminal()
    progress = Progress("import", enabled=True, stream=screen)
    progress.started -= 10  # ten seconds in, half done
    progress.update(5000, fraction=0.5, detail="3 invalid")
    assert screen.getvalue() == "\rimport: 5,000 | 500/s | ETA 0:10 | 3 invalid\x1b[K"
    progress.update(6000, fraction=0.6)  # throttled: drawn at most 10 times a second
    assert "6,000" not in screen.getvalue()
    progress.close()
    assert screen.getvalue().endswith("\r\x1b[K")
    quiet = _Terminal()
    muted = Progress("import", enabled=False, stream=quiet)
    muted.update(1, force=True)
    assert quiet.getvalue() == ""


# ---------------------------------------------------------------- doctor, faults
def test_doctor_reports_every_tier(store: Path) -> None:
    result = cli("--cold", "none", "doctor", path=store)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert any(line.startswith("hot ") and " ok " in line and "memory://" in line for line in lines)
    assert any(line.startswith("warm") and " ok " in line and " ms " in line for line in lines)
    assert any(line.startswith("cold") and " off " in line for line in lines)
    assert lines[-1] == "store: ok, catalog in warm (sqlite), format current"


@pytest.mark.parametrize(
    ("args", "code", "needle"),
    [
        (("get", "absent"), 1, "key 'absent' not found"),
        (("get", "absent", "--json"), 1, "key 'absent' not found"),
        (("inspect", "absent"), 1, "not found"),
        (("demote", "absent", "--json"), 1, "not found"),
        (("demote", "k", "--to", "hot"), 2, "demote: argument --to: invalid choice"),
        (("set", "k", "{bad"), 2, "invalid JSON"),
        (("--warm", "bogus://u:hunter2@host/x", "keys"), 2, "bogus"),
        (("--warm", "postgresql://u:hunter2@127.0.0.1:1/db?connect_timeout=1", "keys"), 1,
         "unreachable"),
        (("import", "/nonexistent/x.jsonl"), 2, "cannot read"),
        (("sweep", "--cold-after", "soon"), 2, "not a number"),
        (("frobnicate",), 2, "invalid choice"),
        ((), 2, "required"),
    ],
)
def test_every_error_is_one_line_in_one_style(store: Path, args: tuple[str, ...], code: int,
                                              needle: str) -> None:
    if any(arg.startswith("postgresql://") for arg in args):
        require_module("psycopg2")  # "unreachable" needs the driver to try
    result = cli(*args, path=store)
    assert (result.returncode, result.stdout) == (code, "")
    # One error line, last; before it at most the library's warnings, in the same form.
    lines = result.stderr.splitlines()
    assert [line for line in lines if "error" in line] == lines[-1:], lines
    assert lines[-1].startswith("tiered-state: error: ") and needle in lines[-1]
    assert all(line.startswith("tiered-state: warning: ") for line in lines[:-1]), lines
    assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_doctor_json(store: Path) -> None:
    result = cli("--cold", "none", "doctor", "--json", path=store)
    assert (result.returncode, result.stderr) == (0, ""), result.stdout
    report = one_json(result)
    assert report["ok"] is True and report["version"] == tiered_state.__version__
    assert set(report["drivers"]) == {"redis", "postgres", "s3", "statsd"}
    assert report["tiers"]["cold"] == {"status": "off", "backend": None, "url": None,
                                       "connect_ms": None, "latency_ms": None, "error": None,
                                       "hint": None}
    assert report["tiers"]["warm"]["url"] == f"sqlite:///{(store / 'warm.db').resolve()}"
    assert report["store"]["catalog"] == "warm" and report["store"]["ok"] is True
    assert sorted(report["store"]["health"]) == ["hot", "warm"]  # cold is off
    assert all(row["ok"] and row["error"] is None for row in report["store"]["health"].values())


def test_doctor_names_missing_s3_credentials(store: Path) -> None:
    require_module("boto3")
    # No credentials anywhere in boto3's chain (and no instance metadata to ask).
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(store / "none"),
           "AWS_CONFIG_FILE": str(store / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    cold = f"s3://bucket/prefix?endpoint_url=http://127.0.0.1:{free_port()}&region=us-east-1"
    doctor = cli("--cold", cold, "doctor", path=store, env=env, unset="AWS_")
    assert doctor.returncode == 1
    assert "no AWS credentials" in doctor.stdout
    assert ("fix: give boto3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"
            in doctor.stdout)
    assert doctor.stderr == "tiered-state: error: 1 configured tier(s) not usable: cold\n"
    report = one_json(cli("--cold", cold, "doctor", "--json", path=store, env=env, unset="AWS_"))
    assert report["ok"] is False and report["store"] is None
    assert report["tiers"]["cold"]["status"] == "error"
    assert "AWS_ACCESS_KEY_ID" in report["tiers"]["cold"]["hint"]
    assert "?profile=NAME" in report["tiers"]["cold"]["hint"]


def test_unreachable_server_is_a_clean_error_with_password_redacted(store: Path) -> None:
    require_module("redis")
    require_module("psycopg2")
    dead = f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    doctor = cli("--hot", dead, "doctor", path=store)
    assert doctor.returncode == 1
    assert "unreachable" in doctor.stdout and "fix: start the server" in doctor.stdout
    assert "warm" in doctor.stdout and " ok " in doctor.stdout.split("warm", 1)[1]
    # HOT down: reads and writes go on with the durable tier, with a warning.
    written = cli("--hot", dead, "set", "k", "1", path=store)
    assert written.returncode == 0 and "tiered-state: warning: " in written.stderr
    assert "tier hot" in written.stderr and "cannot reach Redis" in written.stderr
    alone = cli("--hot", dead, "--warm", "none", "--cold", "none", "get", "k", path=store)
    assert alone.returncode == 1 and "unreachable" in alone.stderr
    dead_pg = f"postgresql://app:s3cret-pw@127.0.0.1:{free_port()}/db?connect_timeout=2"
    refused = cli("--warm", dead_pg, "set", "k", "1", path=store)
    assert_clean_error(refused, 1, "unreachable")
    assert time.monotonic() - started < 20
    for result in (doctor, written, alone, refused):
        assert "Traceback" not in result.stderr
        assert "s3cret-pw" not in result.stdout + result.stderr
    assert "redis://app:***@127.0.0.1" in doctor.stdout


def test_config_errors_redact_passwords(store: Path) -> None:
    result = cli("--warm", "bogus://user:hunter2@host/x", "get", "k", path=store)
    assert_clean_error(result, 2, "bogus")
    assert "hunter2" not in result.stderr
    debug = cli("--debug", "--warm", "bogus://user:hunter2@host/x", "get", "k", path=store)
    assert debug.returncode == 2 and "Traceback" in debug.stderr


def test_doctor_names_a_missing_driver(store: Path, tmp_path: Path) -> None:
    # A `redis` package that fails to import stands in for one never installed.
    shim = tmp_path / "shim" / "redis"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('simulated: not installed')\n")
    env = {"PYTHONPATH": str(shim.parent)}
    doctor = cli("--hot", "redis://127.0.0.1:6379/0", "doctor", path=store, env=env)
    assert doctor.returncode == 1
    assert "missing driver" in doctor.stdout
    assert "pip install 'tiered-state[redis]'" in doctor.stdout
    assert_clean_error(cli("--hot", "redis://127.0.0.1:6379/0", "get", "k", path=store, env=env),
                       2, "tiered-state[redis]")


def test_environment_configures_the_store(store: Path) -> None:
    env = {"TIERED_STATE_PATH": str(store), "TIERED_STATE_COLD": "none"}
    assert cli("set", "e", "5", env=env).returncode == 0
    assert cli("get", "e", env=env).stdout == "5\n"
    doctor = cli("doctor", env=env)
    assert str(store) in doctor.stdout and " off " in doctor.stdout


def test_main_in_process_leaves_no_logging_behind(store: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    logger = logging.getLogger("tiered_state")
    handlers, level = list(logger.handlers), logger.level
    assert run(capsys, "set", "k", '"v"', path=store)[0] == 0
    assert run(capsys, "get", "k", path=store) == (0, '"v"\n', "")
    assert run(capsys, "delete", "k", "k", "never", path=store) == (0, "1\n", "")
    assert run(capsys, "get", "k", path=store) == (1, "", "tiered-state: error: key 'k' not found\n")
    assert logger.handlers == handlers and logger.level == level


# ---------------------------------------------------------------- inspect
def test_inspect_every_copy_as_a_table_and_as_json(seeded: Path) -> None:
    with tiered_state.open(seeded) as state:
        record = state.get_record("flag", promote=False)  # set in cold: a stub and a payload
        assert record is not None
    table = cli("inspect", "flag", path=seeded)
    assert table.returncode == 0, table.stderr
    header, *rows = table.stdout.splitlines()
    assert header.split() == ["tier", "role", "version", "current", "checksum", "size",
                              "encoding", "expires", "location"]
    assert [row.split()[:5] for row in rows] == [
        ["warm", "stub", str(record.version), "yes", "-"],
        ["cold", "payload", str(record.version), "yes", "ok"]]
    report = one_json(cli("inspect", "flag", "--json", path=seeded))
    assert report["key"] == "flag"
    assert [(c["tier"], c["role"], c["version"], c["current"], c["checksum_ok"])
            for c in report["copies"]] == [("warm", "stub", record.version, True, None),
                                           ("cold", "payload", record.version, True, True)]
    assert set(report["copies"][0]) == {"tier", "role", "version", "expires_at", "size_bytes",
                                        "location", "checksum_ok", "current", "encoding"}
    # A copy that fails its checksum is shown as it is.
    with tiered_state.open(seeded) as state:
        warm = state.repositories[Tier.WARM]
        entry = warm.fetch_record("order:5")
        assert entry is not None
        warm.store("order:5", entry.payload.replace("5", "6"), entry.metadata)
    rotten = cli("inspect", "order:5", path=seeded)
    assert rotten.returncode == 0, rotten.stderr
    assert rotten.stdout.splitlines()[1].split()[:5] == ["warm", "value", str(entry.version),
                                                         "no", "FAILED"]
    assert_clean_error(cli("inspect", "absent", path=seeded), 1, "'absent' not found")


# ---------------------------------------------------------------- a store written by 0.1
def test_upgrade_a_store_written_by_0_1(store: Path) -> None:
    make_v01_store(store)
    assert_clean_error(cli("get", "k", path=store), 2, "0.1", "`tiered-state upgrade`")
    done = cli("upgrade", path=store)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("upgraded the store to the current format: moved 2 records")
    assert "dropped 1 older or expired copies" in done.stdout and "0 corrupt" in done.stdout
    again = cli("upgrade", path=store)
    assert (again.returncode, again.stdout) == (
        0, "the store is already in the current format; nothing to do\n")
    assert cli("get", "k", path=store).stdout == '"cold-newer"\n'  # the newer COLD copy won
    assert cli("get", "j", path=store).stdout == '"warm-newer"\n'  # the newer WARM copy won
    assert cli("get", "only-cold", path=store).stdout == '{"n":1}\n'
    assert cli("keys", path=store).stdout == "j\nk\nonly-cold\n"
    assert catalog_kind(store, "k") == "stub"  # its payload stayed in COLD, under its new name
    doctor = cli("doctor", path=store)
    assert doctor.returncode == 0, doctor.stdout


def test_doctor_on_a_0_1_store_names_upgrade(store: Path) -> None:
    make_v01_store(store)
    doctor = cli("doctor", path=store)
    assert doctor.returncode == 1
    lines = doctor.stdout.splitlines()
    assert all(" ok " in line for line in lines if line.startswith(("hot", "warm", "cold")))
    assert "store: does not open" in lines
    assert any("written by tiered-state 0.1" in line for line in lines)
    assert any(line.strip().startswith("fix: run `tiered-state upgrade` once") for line in lines)
    assert doctor.stderr == "tiered-state: error: the store does not open\n"


def test_upgrade_leaves_a_corrupt_object_and_says_so(store: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    make_v01_store(store)
    repos = open_repositories(store)
    try:
        metadata = make_metadata('"y"', 300, now=time.time())
        repos[Tier.COLD].store("rotten", '"x"', metadata)  # fails its checksum
    finally:
        for repo in repos.values():
            repo.close()
    code, out, err = run(capsys, "upgrade", path=store)
    assert code == 1
    assert "moved 2 records" in out and "1 corrupt" in out
    assert "'rotten'" in err and "left in place" in err
    assert run(capsys, "get", "k", path=store) == (0, '"cold-newer"\n', "")
    assert run(capsys, "get", "rotten", path=store)[0] == 1


def test_upgrade_flushes_a_shared_hot_tier(store: Path, redis_url: str) -> None:
    hot = f"{redis_url}?prefix={unique_name('cli')}:"
    make_v01_store(store, hot=hot)
    try:
        done = cli("--hot", hot, "upgrade", path=store)
        assert done.returncode == 0, done.stderr
        assert "flushed 1 hot copies" in done.stdout
        # The stale HOT copy of k is gone: the newer COLD value is served.
        assert cli("--hot", hot, "get", "k", path=store).stdout == '"cold-newer"\n'
    finally:
        repos = open_repositories(store, hot=hot, warm="none", cold="none")
        repos[Tier.HOT].clear()
        repos[Tier.HOT].close()


# ---------------------------------------------------------------- servers
def test_move_embedded_store_to_servers(seeded: Path, tmp_path: Path, redis_url: str,
                                        postgres_url: str) -> None:
    """The README's migration: export embedded, import into Redis + PostgreSQL."""
    dump = tmp_path / "dump.jsonl"
    assert cli("export", str(dump), path=seeded).returncode == 0
    sep = "&" if "?" in postgres_url else "?"
    table = unique_name("cli")
    servers = ["--hot", f"{redis_url}?prefix={unique_name('cli')}:",
               "--warm", f"{postgres_url}{sep}table={table}", "--cold", "none"]
    try:
        loaded = cli(*servers, "import", str(dump), path=tmp_path / "unused")
        assert loaded.returncode == 0, loaded.stderr
        urls = dict(zip(("hot", "warm", "cold"), servers[1::2]))
        moved, original = records(tmp_path / "unused", **urls), records(seeded)
        assert moved.keys() == original.keys()
        for key, (value, version, expires_at, created_at) in original.items():
            # TIMESTAMPTZ keeps microseconds: times match to that precision.
            assert moved[key][:2] == (value, version)
            assert moved[key][2] == pytest.approx(expires_at, abs=1e-5)
            assert moved[key][3] == pytest.approx(created_at, abs=1e-5)
        doctor = cli(*servers, "doctor", path=tmp_path / "unused")
        assert doctor.returncode == 0, doctor.stdout
        assert "redis://" in doctor.stdout and "postgresql://" in doctor.stdout
    finally:
        # Not open(): a manager of Redis alone would take it for its catalog.
        hot = open_repositories(tmp_path / "unused", hot=servers[1], warm="none", cold="none")
        hot[Tier.HOT].clear()
        hot[Tier.HOT].close()
        psycopg2 = require_module("psycopg2")
        with psycopg2.connect(postgres_url) as conn, conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{table}"')


# ---------------------------------------------------------------- demo, console script
def test_demo_through_the_console_script(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "tiered-state"
    if not script.exists():
        pytest.fail(f"console script not installed next to {sys.executable}: pip install -e .")
    result = subprocess.run([str(script), "demo"], capture_output=True, text=True,
                            timeout=TIMEOUT, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "read from hot" in out and "read from cold" in out
    assert "sweep: scanned" in out and "purged 1 expired" in out and "stats:" in out
    assert len(out.splitlines()) < 30
    assert not (tmp_path / ".tiered_state").exists()  # the user's store is untouched


def test_a_typed_store_round_trips_through_export_and_import(tmp_path: Path) -> None:
    """--codec typed-json: export writes the tagged JSON the store holds, and
    import (into another typed store) gets the same values and versions back."""
    import datetime
    import decimal

    source, target, dump = tmp_path / "a", tmp_path / "b", tmp_path / "dump.jsonl"
    value = {"at": datetime.datetime(2026, 1, 2, 3, 4, tzinfo=datetime.timezone.utc),
             "px": decimal.Decimal("101.50"), "venues": {"x", "y"}, "window": (9, 17)}
    with tiered_state.open(source, codec="typed-json") as state:
        version = state.set("fill:1", value, tier="cold")
    assert cli("--codec", "typed-json", "export", str(dump), path=source).returncode == 0
    line = json.loads(dump.read_text(encoding="utf-8"))
    assert line["value"]["px"] == {"$type": "decimal", "value": "101.50"}  # readable tags
    result = cli("--codec", "typed-json", "import", str(dump), path=target)
    assert result.returncode == 0, result.stderr
    with tiered_state.open(target, codec="typed-json") as state:
        record = state.get_record("fill:1")
        assert record is not None and record.value == value and record.version == version
    shown = cli("--codec", "typed-json", "get", "fill:1", path=target)
    assert shown.returncode == 0 and '"$type":"decimal"' in shown.stdout
    # Without the codec the store refuses to misread the record, in one line.
    plain = cli("get", "fill:1", path=target)
    assert plain.returncode != 0 and "codec" in plain.stderr and "Traceback" not in plain.stderr
