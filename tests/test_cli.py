"""The ``tiered-state`` command, run for real in a subprocess.

Every test runs ``python -m tiered_state`` (one runs the ``tiered-state``
console script) against a store under ``tmp_path`` and checks what a user
sees: stdout, one-line errors on stderr, exit status, and the data left in
the store (read back in-process through the library).
"""

from __future__ import annotations

import io
import json
import os
import pty
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import tiered_state
from tiered_state import Tier
from tiered_state.cli import Progress
from tiered_state.record import checksum

from .support import free_port, unique_name

TIMEOUT = 30


def cli(
    *args: str,
    path: Path | None = None,
    stdin: str | None = None,
    env: dict[str, str] | None = None,
    stderr: int | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m tiered_state [--path PATH] ARGS...``."""
    command = [sys.executable, "-m", "tiered_state"]
    if path is not None:
        command += ["--path", str(path)]
    return subprocess.run(
        command + list(args), input=stdin, capture_output=stderr is None,
        stderr=stderr, text=True, timeout=timeout, env={**os.environ, **(env or {})},
    )


def assert_clean_error(result: subprocess.CompletedProcess[str], code: int, *needles: str) -> None:
    """Exit ``code``, nothing on stdout, one error line on stderr, no traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, result.stderr
    for needle in needles:
        assert needle in errors[0], errors[0]


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
    assert "manager" in data


def test_promote_and_demote(seeded: Path) -> None:
    result = cli("demote", "position:BTC", path=seeded)
    assert result.returncode == 0, result.stderr
    with tiered_state.open(seeded) as state:
        repos = state.repositories
        assert repos[Tier.WARM].fetch_record("position:BTC") is None
        assert repos[Tier.COLD].fetch_record("position:BTC") is not None
    assert cli("promote", "position:BTC", "--to", "warm", path=seeded).returncode == 0
    with tiered_state.open(seeded) as state:
        assert state.repositories[Tier.WARM].fetch_record("position:BTC") is not None
    assert_clean_error(cli("demote", "absent", path=seeded), 1, "not found")
    assert_clean_error(cli("promote", "absent", path=seeded), 1, "not found")
    assert_clean_error(cli("demote", "flag", "--to", "hot", path=seeded), 2, "invalid choice")


def test_sweep_dry_run_then_sweep(store: Path) -> None:
    with tiered_state.open(store) as state:
        state.set_many({f"old:{n}": n for n in range(5)}, tier="warm")
        state.set_many({f"gone:{n}": n for n in range(3)}, tier="warm", ttl=0.05)
    time.sleep(0.1)
    dry = cli("sweep", "--dry-run", "--cold-after", "0.01", path=store)
    assert dry.returncode == 0, dry.stderr
    assert "would move 5" in dry.stdout and "would purge 3" in dry.stdout
    with tiered_state.open(store) as state:  # nothing changed
        assert state.repositories[Tier.WARM].fetch_many(["old:0", "gone:0"]).keys() == {"old:0", "gone:0"}
    done = cli("sweep", "--cold-after", "0.01", path=store)
    assert done.returncode == 0, done.stderr
    assert "moved 5" in done.stdout and "purged 3" in done.stdout
    with tiered_state.open(store) as state:
        repos = state.repositories
        assert repos[Tier.WARM].fetch_many([f"old:{n}" for n in range(5)]) == {}
        assert len(repos[Tier.COLD].fetch_many([f"old:{n}" for n in range(5)])) == 5
        assert repos[Tier.WARM].fetch_record("gone:0") is None
        assert state.get_many([f"old:{n}" for n in range(5)]) == {f"old:{n}": n for n in range(5)}


# ---------------------------------------------------------------- export / import
def test_export_import_reproduces_keys_values_versions_ttls(seeded: Path, tmp_path: Path) -> None:
    dump = tmp_path / "dump.jsonl"
    result = cli("export", str(dump), path=seeded)
    assert result.returncode == 0, result.stderr
    before = records(seeded)
    assert f"exported {len(before)} records" in result.stdout
    lines = [json.loads(line) for line in dump.read_text().splitlines()]
    assert {line["key"] for line in lines} == set(before)
    assert set(lines[0]) == {"key", "value", "version", "checksum", "created_at", "updated_at",
                             "expires_at", "tier"}
    assert {line["tier"] for line in lines} == {"warm", "cold"}

    target = tmp_path / "target"
    result = cli("import", str(dump), path=target)
    assert result.returncode == 0, result.stderr
    assert f"imported {len(before)} records" in result.stdout
    assert records(target) == before  # keys, values, versions, expiry, creation time
    with tiered_state.open(target) as state:  # tiers kept: COLD records went to COLD
        assert state.repositories[Tier.COLD].fetch_record("flag") is not None
        # The store goes on from the imported versions.
        assert state.set("flag", False) > before["flag"][1]
    # Importing again changes nothing: every copy there is at least as new.
    again = cli("import", str(dump), path=target)
    assert f"kept {len(before)} newer copies" in again.stdout
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
    dump = tmp_path / "dump.jsonl"
    dump.write_text("\n".join([json.dumps(good), json.dumps(tampered), "{truncated", "",
                               json.dumps(expired)]) + "\n")
    result = cli("import", str(dump), path=store)
    assert result.returncode == 1
    assert "imported 1 records" in result.stdout and "2 invalid" in result.stdout
    assert "skipped 1 expired" in result.stdout
    assert "line 2" in result.stderr and "checksum" in result.stderr and "line 3" in result.stderr
    assert "Traceback" not in result.stderr
    assert records(store) == {"a": ({"n": 1}, 7, None, 1.0)}
    # A newer copy already in the store wins over the imported one.
    with tiered_state.open(store) as state:
        state.set("a", "newer")
    cli("import", str(dump), path=store)
    assert records(store)["a"][0] == "newer"
    assert_clean_error(cli("import", str(tmp_path / "missing.jsonl"), path=store), 2, "cannot read")


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


def test_unreachable_server_is_a_clean_error_with_password_redacted(store: Path) -> None:
    dead = f"redis://app:s3cret-pw@127.0.0.1:{free_port()}/0"
    started = time.monotonic()
    doctor = cli("--hot", dead, "doctor", path=store)
    assert doctor.returncode == 1
    assert "unreachable" in doctor.stdout and "fix: start the server" in doctor.stdout
    assert "warm" in doctor.stdout and " ok " in doctor.stdout.split("warm", 1)[1]
    # HOT down: reads and writes go on with the durable tier, with a warning.
    written = cli("--hot", dead, "set", "k", "1", path=store)
    assert written.returncode == 0 and "unreachable" in written.stderr
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
        with tiered_state.open(tmp_path / "unused", hot=servers[1], warm="none",
                               cold="none") as state:
            state.repositories[Tier.HOT].clear()
        psycopg2 = pytest.importorskip("psycopg2")
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
