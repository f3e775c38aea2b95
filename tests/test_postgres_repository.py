"""PostgresStateRepository against the real PostgreSQL (TIERED_STATE_TEST_POSTGRES_URL)."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from typing import Any

import pytest

from tiered_state import codec
from tiered_state.config import open_repository
from tiered_state.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    IntegrityError,
)
from tiered_state.record import make_metadata, make_stub, make_tombstone
from tiered_state.testing import RepositoryContract, make, same_metadata

from .support import TCPProxy, free_port, require_module, unique_name

psycopg2 = require_module("psycopg2")

from tiered_state.repositories.postgres_repository import PostgresStateRepository  # noqa: E402


def _raw(url: str) -> Any:
    conn = psycopg2.connect(url)
    conn.autocommit = True
    return conn


def _in_threads(*targets: Callable[[], object]) -> list[BaseException]:
    """Run every target in its own thread; return what they raised."""
    errors: list[BaseException] = []

    def run(target: Callable[[], object]) -> None:
        try:
            target()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(t,)) for t in targets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def _drop(url: str, table: str) -> None:
    with _raw(url) as conn, conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()


@pytest.fixture
def table(postgres_url: str) -> Iterator[str]:
    name = unique_name("ts_test")
    yield name
    _drop(postgres_url, name)


@pytest.fixture
def repo(postgres_url: str, table: str) -> Iterator[PostgresStateRepository]:
    with PostgresStateRepository(postgres_url, table=table) as repository:
        yield repository


@pytest.fixture
def raw(postgres_url: str) -> Iterator[Any]:
    conn = _raw(postgres_url)
    yield conn
    conn.close()


class TestPostgresConformance(RepositoryContract):
    # secret_url: the default, a made-up password, which trust authentication accepts.

    @pytest.fixture
    def repository(self, repo: PostgresStateRepository) -> PostgresStateRepository:
        return repo

    @pytest.fixture
    def repository_url(self, postgres_url: str, table: str) -> str:
        return postgres_url + ("&" if "?" in postgres_url else "?") + f"table={table}"

    @contextlib.contextmanager
    def break_key(self, repository: PostgresStateRepository, key: str) -> Iterator[None]:  # type: ignore[override]
        """A trigger that raises on every insert, update and delete of ``key``."""
        assert key.isalnum()  # spelt into the SQL below
        repository.ping()  # the table exists
        table = repository.table
        conn = psycopg2.connect(**repository._connect_kwargs)
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(f"""
                    CREATE FUNCTION {table}_refuse() RETURNS trigger LANGUAGE plpgsql AS $$
                    BEGIN
                        IF TG_OP = 'DELETE' THEN
                            IF OLD.key = '{key}' THEN RAISE EXCEPTION 'refused'; END IF;
                            RETURN OLD;
                        END IF;
                        IF NEW.key = '{key}' THEN RAISE EXCEPTION 'refused'; END IF;
                        RETURN NEW;
                    END $$;
                    CREATE TRIGGER refuse BEFORE INSERT OR UPDATE OR DELETE ON {table}
                        FOR EACH ROW EXECUTE FUNCTION {table}_refuse();
                """)
            yield
        finally:
            with conn.cursor() as cur:
                cur.execute(f"DROP TRIGGER IF EXISTS refuse ON {table}; "
                            f"DROP FUNCTION IF EXISTS {table}_refuse()")
            conn.close()


# ------------------------------------------------------------------ URL, config
def test_from_url_options(postgres_url: str) -> None:
    url = postgres_url + ("&" if "?" in postgres_url else "?")
    repository = open_repository(
        url + "table=my_state&statement_timeout=2.5&connect_timeout=4&pool_size=3&pool_timeout=1"
    )
    assert isinstance(repository, PostgresStateRepository)
    assert repository.table == "my_state"
    assert repository.statement_timeout == 2.5
    assert repository._pool.size == 3 and repository._pool.timeout == 1
    assert repository._connect_kwargs["connect_timeout"] == 4
    assert "statement_timeout=2500" in repository._connect_kwargs["options"]
    other = open_repository(postgres_url.replace("postgresql://", "postgres://", 1))
    assert other.table == "tiered_state"
    assert other._connect_kwargs["connect_timeout"] == 3  # short default


def _show(repository: Any, setting: str) -> str:
    with repository._session("show") as (cur, _):
        cur.execute(f"SHOW {setting}")
        row = cur.fetchone()
    assert row is not None
    return str(row[0])


def test_libpq_options_reach_the_server_as_written(postgres_url: str, table: str) -> None:
    """libpq decodes %XX in a URI, never "+": ?options=-c%20statement_timeout%3D5000
    must reach the server as "-c statement_timeout=5000", so it is passed on
    as written (not decoded and form-encoded again). It also wins over the
    repository's own default statement_timeout, being the later -c."""
    base = postgres_url + ("&" if "?" in postgres_url else "?")
    url = base + f"table={table}&options=-c%20statement_timeout%3D5000"
    with open_repository(url) as repository:
        assert _show(repository, "statement_timeout") == "5s"
    url = (base + f"options=-c%20work_mem%3D5MB%20-c%20lock_timeout%3D1234&table={table}"
           "&statement_timeout=2&application_name=ts%20app+x")
    with open_repository(url) as repository:
        assert _show(repository, "statement_timeout") == "2s"  # the option of ours still applies
        assert _show(repository, "work_mem") == "5MB"
        assert _show(repository, "lock_timeout") == "1234ms"
        assert _show(repository, "application_name") == "ts app+x"  # libpq: "+" is a "+"
    # Keyword options are encoded for libpq, spaces and all.
    with open_repository(base + f"table={table}", options="-c work_mem=7MB") as repository:
        assert _show(repository, "work_mem") == "7MB"


@pytest.mark.parametrize(
    "table", ["bad-name", "a;drop table x", '"quoted"', "a.b.c", "1abc", "", "x" * 49, "s.", ".t"]
)
def test_table_must_be_an_identifier(table: str) -> None:
    with pytest.raises(ConfigurationError):
        PostgresStateRepository("postgresql://127.0.0.1/test", table=table)


def test_bad_options_rejected() -> None:
    with pytest.raises(ConfigurationError):
        open_repository("postgresql://127.0.0.1/test?bogus_libpq_option=1")
    with pytest.raises(ConfigurationError):
        open_repository("postgresql://127.0.0.1/test?pool_size=0")
    with pytest.raises(ConfigurationError):
        open_repository("postgresql://127.0.0.1/test?statement_timeout=-1")


def test_schema_qualified_table(postgres_url: str, raw: Any) -> None:
    schema = unique_name("ts_schema")
    with raw.cursor() as cur:
        cur.execute(f"CREATE SCHEMA {schema}")
    try:
        with PostgresStateRepository(postgres_url, table=f"{schema}.State") as repository:
            repository.store("k", *make({"a": 1}))
            assert repository.fetch("k") == {"a": 1}
        with raw.cursor() as cur:
            cur.execute(f'SELECT data->>\'a\' FROM {schema}."State" WHERE key = \'k\'')
            assert cur.fetchone() == ("1",)
    finally:
        with raw.cursor() as cur:
            cur.execute(f"DROP SCHEMA {schema} CASCADE")


def test_missing_schema_is_a_backend_error_not_a_driver_error(postgres_url: str) -> None:
    with PostgresStateRepository(postgres_url, table="no_such_schema_x.t") as repository:
        with pytest.raises(BackendError) as info:
            repository.store("k", *make(1))
    assert not isinstance(info.value, BackendUnavailableError)
    assert isinstance(info.value.__cause__, psycopg2.Error)


# ------------------------------------------------------------------ storage format
def test_plain_sql_reads_library_data(repo: PostgresStateRepository, raw: Any, table: str) -> None:
    now = time.time()
    payload, metadata = make({"qty": 1.5, "side": "buy", "fills": [1, 2]}, version=42, ttl=60)
    repo.store("position:BTC", payload, metadata)
    repo.store_many({f"lot:{i}": make({"qty": i}) for i in range(50)})
    with raw.cursor() as cur:
        cur.execute(
            f"SELECT (data->>'qty')::float8, data->'fills'->>1, data->>'side', version, checksum, "
            f"size_bytes, extract(epoch from updated_at), extract(epoch from expires_at), "
            f"encoding, payload FROM {table} WHERE key = %s",
            ("position:BTC",),
        )
        qty, fill, side, version, digest, size, updated, expires, encoding, text = cur.fetchone()
        assert (qty, fill, side, version) == (1.5, "2", "buy", 42)
        assert (digest, size, encoding, text) == (
            metadata["checksum"], metadata["size_bytes"], "json", None
        )
        assert abs(float(updated) - now) < 5 and abs(float(expires) - float(updated) - 60) < 0.001
        cur.execute(f"SELECT sum((data->>'qty')::int) FROM {table} WHERE key LIKE 'lot:%%'")
        assert cur.fetchone() == (sum(range(50)),)


def test_documented_schema_and_indexes(repo: PostgresStateRepository, raw: Any, table: str) -> None:
    repo.store("k", *make(1))
    with raw.cursor() as cur:
        cur.execute(
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = %s ORDER BY ordinal_position",
            (table,),
        )
        assert dict(cur.fetchall()) == {
            "key": "text", "data": "jsonb", "payload": "text", "checksum": "text",
            "size_bytes": "integer", "version": "bigint",
            "created_at": "timestamp with time zone", "updated_at": "timestamp with time zone",
            "last_accessed": "timestamp with time zone", "expires_at": "timestamp with time zone",
            "encoding": "text",
        }
        cur.execute("SELECT indexname FROM pg_indexes WHERE tablename = %s", (table,))
        assert {r[0] for r in cur.fetchall()} == {
            f"{table}_pkey", f"{table}_expires_idx", f"{table}_idle_idx"
        }


@pytest.mark.parametrize(
    "value",
    ["nul\x00inside", {"k\x00": 1}, 1e300, -0.0, 1e16, [1.5e-300, -1e22], {"x": "1e+5 in text"}],
    ids=repr,
)
def test_values_jsonb_cannot_hold_exactly(
    repo: PostgresStateRepository, raw: Any, table: str, value: Any
) -> None:
    payload, metadata = make(value)
    repo.store("v", payload, metadata)
    repo.store_many({f"m{i}": (payload, metadata) for i in range(40)})  # the COPY path too
    for key in ("v", "m7"):
        entry = repo.fetch_record(key)
        assert entry is not None and entry.payload == payload and entry.valid()
        got = repo.fetch(key)
        assert codec.encode(got) == payload
    with raw.cursor() as cur:
        cur.execute(f"SELECT data IS NULL, payload IS NULL FROM {table} WHERE key = 'v'")
        in_text_column = cur.fetchone() == (True, False)
    jsonb_safe = isinstance(value, dict) and "x" in value  # only a false alarm of the pre-check
    assert in_text_column is not jsonb_safe


def test_non_canonical_payload_comes_back_unchanged(repo: PostgresStateRepository) -> None:
    odd = ['{"b": 1, "a": 2}', "[1,2 ]", "not json", '"\\u00e9"', "1.0E2", "[NaN]", "9" * 5000]
    for payload in odd:
        metadata = make_metadata(payload, 1, now=time.time())
        repo.store("k", payload, metadata)
        entry = repo.fetch_record("k")
        assert entry is not None and entry.payload == payload and entry.valid()


def test_corrupt_row_raises_integrity_error(
    repo: PostgresStateRepository, raw: Any, table: str
) -> None:
    repo.store("k", *make({"a": 1}))
    with raw.cursor() as cur:
        cur.execute(f"UPDATE {table} SET data = '{{\"a\": 2}}' WHERE key = 'k'")
    with pytest.raises(IntegrityError):
        repo.fetch("k")
    entry = repo.fetch_record("k")
    assert entry is not None and not entry.valid()


def test_tombstones_until_deleted(repo: PostgresStateRepository) -> None:
    payload, metadata = make("old", now=time.time() - 10, ttl=5)
    repo.store("gone", payload, metadata)
    assert repo.fetch("gone") is None and repo.keys() == [] and repo.stats()["key_count"] == 0
    entry = repo.fetch_record("gone")
    assert entry is not None and entry.expired() and same_metadata(entry.metadata, metadata)
    assert "gone" in repo.fetch_many(["gone"])
    assert list(repo.iter_all_keys()) == ["gone"]
    assert repo.delete("gone") is True


def test_reads_never_write(repo: PostgresStateRepository, raw: Any, table: str) -> None:
    now = time.time()
    repo.store_many({f"r{i}": make(i, now=now - 100) for i in range(5)})

    def snapshot() -> list[Any]:
        with raw.cursor() as cur:
            cur.execute(f"SELECT key, xmin::text, ctid::text, last_accessed FROM {table} ORDER BY key")
            return cur.fetchall()

    before = snapshot()
    repo.fetch("r1")
    repo.fetch_record("r2")
    repo.fetch_many(["r1", "r3"])
    repo.keys("r*")
    list(repo.iter_keys("r*"))
    list(repo.scan(now=now, idle_before=now - 50))
    repo.stats()
    assert snapshot() == before


def test_touch_many_sets_last_accessed_monotonically(
    repo: PostgresStateRepository, raw: Any, table: str
) -> None:
    now = time.time()
    repo.store_many({f"t{i}": make(i, now=now - 100) for i in range(1500)})
    repo.touch_many([f"t{i}" for i in range(1200)] + ["absent"], at=now)
    repo.touch_many(["t0"], at=now - 500)  # an older report never moves it back
    with raw.cursor() as cur:
        cur.execute(
            f"SELECT count(*), min(extract(epoch from last_accessed)) FROM {table} "
            "WHERE last_accessed IS NOT NULL"
        )
        count, oldest = cur.fetchone()
    assert count == 1200 and abs(float(oldest) - now) < 0.001
    idle = {e.key for b in repo.scan(now=now, idle_before=now - 50) for e in b}
    assert idle == {f"t{i}" for i in range(1200, 1500)}


def test_iter_keys_pages_and_allows_writes(repo: PostgresStateRepository) -> None:
    repo.store_many({f"i{n:05d}": make(n) for n in range(2500)})
    repo.store_many({"other": make(0), "i_tomb": make(0, now=time.time() - 10, ttl=1)})
    seen = []
    for key in repo.iter_keys("i*"):
        seen.append(key)
        if len(seen) % 700 == 0:
            repo.delete(key)  # writing while iterating is fine: no cursor is held
    assert seen == sorted(seen) and len(seen) == 2500 and "i_tomb" not in seen
    assert sorted(repo.iter_keys("i0000[0-4]")) == [f"i{n:05d}" for n in range(5)]


def test_delete_many_if_version(repo: PostgresStateRepository) -> None:
    repo.store_many({f"d{i}": make(i, version=i + 1) for i in range(1500)})
    versions = {f"d{i}": i + 1 for i in range(1500)}
    versions.update({"d0": 99, "absent": 1})
    assert repo.delete_many_if_version(versions) == {f"d{i}" for i in range(1, 1500)}
    assert repo.keys() == ["d0"]


def test_stubs_and_tombstones_are_kept_verbatim_out_of_data(
    repo: PostgresStateRepository, raw: Any, table: str
) -> None:
    _, metadata = make({"qty": 1}, 4)
    repo.store("moved", *make_stub(metadata, '{"bucket":"b","name":"n"}'))  # a JSON locator
    repo.store("hot", *make_stub(metadata))  # an empty placeholder
    repo.store("gone", "", make_tombstone(5, now=time.time()))
    with raw.cursor() as cur:
        cur.execute(f"SELECT key, data, payload, encoding FROM {table} ORDER BY key")
        assert cur.fetchall() == [
            ("gone", None, "", "tombstone"),
            ("hot", None, "", "stub"),
            ("moved", None, '{"bucket":"b","name":"n"}', "stub"),
        ]
    assert repo.fetch_record("moved").payload == '{"bucket":"b","name":"n"}'  # type: ignore[union-attr]
    assert repo.fetch("moved") is None and repo.fetch("gone") is None
    assert sorted(repo.keys()) == ["hot", "moved"]


# Below 64 rows the batch conditionals run one statement over unnest(); from
# 64 on they COPY into the staging table first. Both paths, every case.
@pytest.mark.parametrize("filler", [0, 300], ids=["unnest", "copy"])
def test_store_many_if_version_cases(repo: PostgresStateRepository, filler: int) -> None:
    now = time.time()
    payload, metadata = make({"v": 1}, 5)
    repo.store_many({
        "value": (payload, metadata),
        "live": make("l", 5),
        "gone": ("", make_tombstone(5, now=now)),
        "gone2": ("", make_tombstone(5, now=now)),
        "old": make("o", 5, now=now - 10, ttl=1),
        **{f"f{i:04d}": make(i, 1) for i in range(filler)},
    })
    items = {
        "value": make_stub(metadata, "elsewhere"),  # same-version migration
        "live": make("l3", 3),  # expected matches, but older
        "gone": make("g4", 4),  # a create under a newer tombstone
        "gone2": make("g6", 6),  # a create over an older tombstone
        "old": make("n", 6),  # a create over an expired row
        "new": make("x", 1),  # a create
        "nowhere": make("y", 7),  # a CAS on an absent key
        **{f"f{i:04d}": make(-i, 2) for i in range(filler)},
    }
    expected = {"value": 5, "live": 5, "gone": 0, "gone2": 0, "old": 0, "new": 0, "nowhere": 6}
    expected.update({f"f{i:04d}": 1 if i % 2 else 2 for i in range(filler)})
    stored = repo.store_many_if_version(items, expected)
    assert stored == {"value", "gone2", "old", "new"} | {f"f{i:04d}" for i in range(1, filler, 2)}
    assert repo.fetch_record("value").kind == "stub"  # type: ignore[union-attr]
    assert repo.fetch("live") == "l" and repo.fetch("gone2") == "g6" and repo.fetch("old") == "n"
    assert repo.fetch_record("gone").kind == "tombstone"  # type: ignore[union-attr]
    assert repo.fetch_record("nowhere") is None
    if filler:
        assert repo.fetch("f0001") == -1 and repo.fetch("f0002") == 2


@pytest.mark.parametrize("size", [10, 300], ids=["unnest", "copy"])
def test_store_many_if_newer_paths(repo: PostgresStateRepository, size: int) -> None:
    repo.store_many({f"n{i:04d}": make(i, 10) for i in range(size)})
    repo.store("dead", "", make_tombstone(10, now=time.time()))
    items = {f"n{i:04d}": make(-i, 9 + 2 * (i % 2)) for i in range(size)}
    items.update({"dead": make("d", 10), "fresh": make("f", 1)})
    assert repo.store_many_if_newer(items) == {f"n{i:04d}" for i in range(1, size, 2)} | {"fresh"}
    assert repo.fetch("n0000") == 0 and repo.fetch("n0001") == -1


@pytest.mark.parametrize("size", [10, 300], ids=["unnest", "copy"])
@pytest.mark.parametrize("method", ["store_many_if_newer", "store_many_if_version"])
def test_failed_batch_conditional_writes_nothing(
    repo: PostgresStateRepository, size: int, method: str
) -> None:
    repo.store_many({f"b{i:04d}": make("old", 1) for i in range(size)})
    items = {f"b{i:04d}": make("new", 2) for i in range(size)}
    payload, metadata = make("bad", 2)
    metadata["created_at"] = 1e20  # a timestamp PostgreSQL cannot hold
    items["zzz"] = (payload, metadata)
    with pytest.raises(BackendError):
        if method == "store_many_if_newer":
            repo.store_many_if_newer(items)
        else:
            repo.store_many_if_version(items, {**{k: 1 for k in items}, "zzz": 0})
    assert {e.version for e in repo.fetch_many(list(items)).values()} == {1}
    with pytest.raises(KeyError):  # a missing expected version: refused before any I/O
        repo.store_many_if_version({"b0000": make("new", 2), "other": make(1, 2)}, {"b0000": 1})
    assert repo.fetch("b0000") == "old" and repo.fetch("other") is None


@pytest.mark.parametrize("sample", [6, 150], ids=["unnest", "copy"])
def test_concurrent_batch_conditionals_neither_deadlock_nor_misreport(
    repo: PostgresStateRepository, sample: int
) -> None:
    """Threads race store_many_if_version batches mixing CAS, creates over
    tombstones and deletes (so one batch updates a key another creates, and
    the other way round) and store_many_if_newer batches. No deadlock, and
    every key ends at the greatest version a batch reported writing."""
    keys = [f"c{i:03d}" for i in range(max(12, sample + 10))]
    repo.store_many({k: make(0, 1) for k in keys})
    wins: dict[str, list[int]] = {k: [] for k in keys}
    lock = threading.Lock()

    def worker(t: int) -> None:
        rng = random.Random(t)
        for i in range(12 if sample < 100 else 4):
            current = repo.fetch_many(keys)
            items: dict[str, tuple[str, Any]] = {}
            expected: dict[str, int] = {}
            for key in rng.sample(keys, sample):
                entry = current.get(key)
                new = (0 if entry is None else entry.version) + 1 + t
                if entry is not None and entry.live():
                    expected[key] = entry.version
                    if rng.random() < 0.4:
                        items[key] = ("", make_tombstone(new, now=time.time()))
                        continue
                else:
                    expected[key] = 0
                items[key] = make([t, i], new)
            got = repo.store_many_if_version(items, expected)
            newer = {k: make([t, i], 10_000 * (t + 1) + i) for k in rng.sample(keys, 3)}
            got_newer = repo.store_many_if_newer(newer)
            doomed = {k: current[k].version for k in rng.sample(keys, 2)
                      if k in current and k not in items}
            gone = repo.delete_many_if_version(doomed)
            with lock:
                for key in got:
                    wins[key].append(items[key][1]["version"])
                for key in got_newer:
                    wins[key].append(newer[key][1]["version"])
                deleted.update(gone)

    deleted: set[str] = set()
    errors = _in_threads(*(partial(worker, t) for t in range(4)))
    assert errors == []
    final = repo.fetch_many(keys)
    # (Two batches may both report one version: a create over a tombstone
    # may reuse the tombstone's version, which the contract allows. A key
    # deleted outright starts again from nothing, so it proves nothing here.)
    for key in keys:
        if wins[key] and key not in deleted:
            assert final[key].version == max(wins[key]), key


# ------------------------------------------------------------------ concurrency
def test_concurrent_conditional_writers_keep_one_consistent_row(
    repo: PostgresStateRepository, raw: Any, table: str
) -> None:
    seen_versions: list[int] = []
    stop = threading.Event()

    def cas_writer(t: int) -> None:
        for _ in range(40):
            while True:
                entry = repo.fetch_record("counter")
                current = 0 if entry is None else entry.version
                count = 0 if entry is None else codec.decode(entry.payload)["n"]
                value = {"n": count + 1, "by": t}
                if repo.store_if_version("counter", *make(value, current + 1), expected=current):
                    break

    def newer_writer(t: int) -> None:
        for i in range(60):
            repo.store_if_newer("newest", *make({"t": t, "i": i}, version=i * 10 + t))

    def reader() -> None:
        while not stop.is_set():
            entry = repo.fetch_record("counter")
            if entry is not None:
                assert entry.valid()
                seen_versions.append(entry.version)

    watcher = threading.Thread(target=reader)
    watcher.start()
    writers = [partial(cas_writer, t) for t in range(4)] + [partial(newer_writer, t) for t in range(4)]
    errors = _in_threads(*writers)
    stop.set()
    watcher.join()
    assert errors == []
    # Every compare-and-set increment landed exactly once...
    final = repo.fetch_record("counter")
    assert final is not None and final.version == 160
    assert codec.decode(final.payload)["n"] == 160
    # ...and a reader never saw the version go back.
    assert seen_versions == sorted(seen_versions)
    newest = repo.fetch_record("newest")
    assert newest is not None and newest.version == 593 and newest.valid()
    with raw.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {table} WHERE key IN ('counter', 'newest')")
        assert cur.fetchone() == (2,)


def test_first_use_from_many_threads_and_repositories(postgres_url: str, table: str) -> None:
    repos = [PostgresStateRepository(postgres_url, table=table) for _ in range(4)]
    barrier = threading.Barrier(8)

    def work(i: int) -> None:
        barrier.wait()
        repos[i % 4].store(f"k{i}", *make(i))

    assert _in_threads(*(partial(work, i) for i in range(8))) == []
    assert sorted(repos[0].keys()) == sorted(f"k{i}" for i in range(8))
    for r in repos:
        r.close()


def test_pool_waits_instead_of_failing(postgres_url: str, table: str) -> None:
    with PostgresStateRepository(postgres_url, table=table, pool_size=2) as repository:
        def work(t: int) -> None:
            for i in range(20):
                repository.store(f"w{t}-{i}", *make(i))

        assert _in_threads(*(partial(work, t) for t in range(8))) == []
        assert len(repository.keys("w*")) == 160
        assert repository._pool._open <= 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_opens_its_own_connections(repo: PostgresStateRepository) -> None:
    repo.store("k", *make(1))  # the parent now has a pooled connection
    parent_sessions = {link.conn.get_backend_pid() for link in repo._pool._idle}
    pid = os.fork()
    if pid == 0:  # the child: must not reuse (or close) the parent's session
        try:
            ok = repo.fetch("k") == 1 and repo.store("child", *make(2))
            link = repo._pool.get()
            ok = ok and link.conn.get_backend_pid() not in parent_sessions
            repo._pool.put(link)
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert repo.fetch("child") == 2 and repo.fetch("k") == 1  # the parent's connection lives


# ------------------------------------------------------------------ deadlocks, conflicts
def _with_options(url: str, **options: Any) -> str:
    return url + ("&" if "?" in url else "?") + "&".join(f"{k}={v}" for k, v in options.items())


def _require_superuser(raw: Any) -> None:
    with raw.cursor() as cur:
        cur.execute("SHOW is_superuser")
        row = cur.fetchone()
    if row is None or row[0] != "on":
        pytest.skip("needs a superuser to set deadlock_timeout per session")


def _wait_for_lock_wait(raw: Any, table: str, timeout: float = 10.0) -> None:
    """Block until some other session waits for a row lock on ``table``."""
    deadline = time.monotonic() + timeout
    with raw.cursor() as cur:
        for _ in range(int(timeout / 0.01) + 1):
            # Inside a transaction the activity view is read once and kept:
            # drop that snapshot so each look is a fresh one.
            cur.execute("SELECT pg_stat_clear_snapshot()")
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                "AND pid <> pg_backend_pid() AND query LIKE %s", (f"%{table}%",)
            )
            row = cur.fetchone()
            if row is not None and row[0] > 0:
                return
            if time.monotonic() > deadline:
                break
            time.sleep(0.01)
    with raw.cursor() as cur:
        cur.execute("SELECT pid, state, wait_event_type, wait_event, left(query, 100) "
                    "FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND query LIKE %s",
                    (f"%{table}%",))
        sessions = cur.fetchall()
    raise AssertionError(f"no session waited for a lock on {table} within {timeout}s: {sessions}")


@pytest.mark.parametrize("size", [2, 80], ids=["unnest", "copy"])
def test_a_deadlock_victim_is_run_again(
    postgres_url: str, table: str, raw: Any, size: int, caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A real deadlock: another session holds the last key and then asks for
    the first one, which the batch holds. The server aborts the batch (its
    wait began first, so its deadlock check runs first); the batch runs again
    once the other session is done, and reports every key written."""
    _require_superuser(raw)
    caplog.set_level(logging.INFO, logger="tiered_state")
    keys = [f"d{i:03d}" for i in range(size)]
    # The repository's sessions check for deadlocks after 1.5 s (the other
    # session's after 60 s), so the batch is the one the server aborts.
    # (statement_timeout=None: no options of its own, so libpq takes PGOPTIONS.)
    monkeypatch.setenv("PGOPTIONS", "-c deadlock_timeout=1500")
    with PostgresStateRepository(postgres_url, table=table, statement_timeout=None) as repository:
        repository.store_many({k: make(0, 1) for k in keys})
        result: dict[str, set[str]] = {}
        with raw.cursor() as cur:
            cur.execute("SET deadlock_timeout = '60s'")
            cur.execute("SET statement_timeout = '20s'")
            cur.execute("BEGIN")
            cur.execute(f"SELECT 1 FROM {table} WHERE key = %s FOR UPDATE", (keys[-1],))
            worker = threading.Thread(target=lambda: result.update(
                written=repository.store_many_if_newer({k: make(1, 2) for k in keys})))
            worker.start()
            try:
                _wait_for_lock_wait(raw, table)
                # Waits until the server aborted the batch, then holds both ends.
                cur.execute(f"SELECT 1 FROM {table} WHERE key = %s FOR UPDATE", (keys[0],))
                cur.execute(f"UPDATE {table} SET last_accessed = now() WHERE key = %s", (keys[0],))
            finally:
                cur.execute("COMMIT")
                worker.join(30)
        assert not worker.is_alive()
        assert result.get("written") == set(keys)
        assert {e.version for e in repository.fetch_many(keys).values()} == {2}
    assert "[40P01]" in caplog.text  # it did lose the deadlock once


def test_a_serialization_failure_is_run_again(
    postgres_url: str, table: str, raw: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Under SERIALIZABLE a write waiting for a row that another transaction
    then updates fails with 40001 when that transaction commits; it runs again
    on a fresh snapshot."""
    monkeypatch.setenv("PGOPTIONS", "-c default_transaction_isolation=serializable")
    with PostgresStateRepository(postgres_url, table=table, statement_timeout=None) as repository:
        repository.store_many({"s1": make(0, 1), "s2": make(0, 1)})
        result: dict[str, Any] = {}
        with raw.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(f"UPDATE {table} SET last_accessed = now() WHERE key = 's2'")
            worker = threading.Thread(target=lambda: result.update(
                written=repository.store_many_if_newer({"s1": make(1, 2), "s2": make(1, 2)}),
                one=repository.store_if_newer("s1", *make(2, 3))))
            worker.start()
            try:
                _wait_for_lock_wait(raw, table)
            finally:
                cur.execute("COMMIT")
                worker.join(30)
        assert not worker.is_alive()
        assert result == {"written": {"s1", "s2"}, "one": True}
        assert repository.fetch("s1") == 2 and repository.fetch("s2") == 1


def test_retries_are_bounded(repo: PostgresStateRepository, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that keeps losing gives up after a bounded number of runs, with
    the driver's error as the cause; other errors are never run again."""
    from tiered_state.repositories import postgres_repository as module

    runs: list[int] = []

    def always_deadlocked(cur: Any, sql: dict[str, str]) -> None:
        runs.append(1)
        cur.execute("SELECT 1/0")  # a real server error, then re-labelled as a deadlock

    class Deadlocked(psycopg2.extensions.TransactionRollbackError):
        pgcode = "40P01"

    real_raise = repo._raise

    def relabel(exc: Exception, operation: str) -> Any:
        return real_raise(Deadlocked("deadlock detected"), operation)

    monkeypatch.setattr(module, "_BACKOFF", 0.001)
    monkeypatch.setattr(repo, "_raise", relabel)
    with pytest.raises(BackendError) as info:
        repo._run("test", always_deadlocked)
    assert len(runs) == module._ATTEMPTS
    assert isinstance(info.value.__cause__, psycopg2.extensions.TransactionRollbackError)
    monkeypatch.setattr(repo, "_raise", real_raise)
    runs.clear()
    with pytest.raises(BackendError, match="DivisionByZero"):
        repo._run("test", always_deadlocked)
    assert len(runs) == 1
    repo.store("k", *make(1))  # the pool is sound afterwards
    assert repo.fetch("k") == 1


def test_multi_row_writes_lock_in_key_order(repo: PostgresStateRepository, raw: Any, table: str) -> None:
    """delete_many, touch_many and clear lock their rows in key order, whatever
    order the table holds them in (a plain DELETE / UPDATE follows the scan:
    the physical order). A session holding the greatest key sees each of
    them lock every smaller key first."""
    keys = [f"o{i:02d}" for i in range(20)]
    calls: list[tuple[str, Callable[[], object]]] = [
        ("touch_many", lambda: repo.touch_many(keys, time.time())),
        ("delete_many", lambda: repo.delete_many(keys)),
        ("clear", repo.clear),
    ]
    for name, call in calls:
        for key in reversed(keys):  # each row's newest version: in reverse key order
            repo.store(key, *make(0, 1))
        with raw.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute(f"SELECT 1 FROM {table} WHERE key = %s FOR UPDATE", (keys[-1],))
            failures: list[BaseException] = []
            worker = threading.Thread(target=lambda: failures.extend(_in_threads(call)))
            worker.start()
            try:
                _wait_for_lock_wait(raw, table)
                # Every smaller key is locked by the waiting call already.
                cur.execute(f"SELECT key FROM {table} WHERE key < %s FOR UPDATE SKIP LOCKED",
                            (keys[-1],))
                assert cur.fetchall() == [], name
            finally:
                cur.execute("COMMIT")
                worker.join(30)
            assert not worker.is_alive() and failures == [], name


def test_set_many_and_sweeps_under_contention(
    postgres_url: str, table: str, tmp_path: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Through the public API: 8 threads set_many overlapping keys in
    shuffled orders while a thread reads them (so every sweep first records
    read times with touch_many) and another sweeps, moving idle records to
    COLD. Nothing fails -- no deadlock surfaces anywhere -- and every key
    ends with the value of the highest version a set_many reported.

    Half the keys are written in most batches and read; the other half only
    now and then and never read, so they go idle, the sweeps move them, and
    the writers overwrite moved records too."""
    import tiered_state
    from tiered_state import TieringPolicy

    caplog.set_level(logging.WARNING, logger="tiered_state")
    keys = [f"k{i:03d}" for i in range(160)]
    busy, quiet = keys[::2], keys[1::2]  # interleaved: batches lock both kinds in turn
    state = tiered_state.open(
        hot="memory://",
        warm=_with_options(postgres_url, table=table),
        cold=f"file://{tmp_path}/cold?fsync=false",
        policy=TieringPolicy(cold_after=0.05, batch_size=50),
    )
    deadline = time.monotonic() + 4.0
    writes: dict[str, list[tuple[int, Any]]] = {k: [] for k in keys}
    lock = threading.Lock()
    done = threading.Event()
    reports: list[Any] = []

    def writer(t: int) -> None:
        rng = random.Random(t)
        for i in range(150):
            if time.monotonic() > deadline:
                return
            # Both statement paths: unnest below 64 rows, COPY from 64 on.
            batch = rng.sample(busy, rng.choice([rng.randint(2, 40), rng.randint(64, 75)]))
            if rng.random() < 0.3:
                batch += rng.sample(quiet, rng.randint(1, 6))
            rng.shuffle(batch)
            values = {k: {"t": t, "i": i} for k in batch}
            versions = state.set_many(values)
            with lock:
                for key, version in versions.items():
                    writes[key].append((version, values[key]))

    def reader() -> None:
        rng = random.Random(-1)
        for _ in range(5000):
            if done.is_set() or time.monotonic() > deadline:
                return
            state.get_many(rng.sample(busy, 30))

    def sweeper() -> None:
        for _ in range(1000):
            if done.is_set() or time.monotonic() > deadline:
                return
            reports.append(state.sweep())

    errors: list[BaseException] = []

    def writers_then_stop() -> None:
        try:
            errors.extend(_in_threads(*(partial(writer, t) for t in range(8))))
        finally:
            done.set()

    try:
        errors += _in_threads(writers_then_stop, reader, sweeper)
        assert errors == []
        assert sum(r.moved for r in reports) > 0  # the sweeps did move records
        assert [r.errors for r in reports if r.failed] == []
        assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
        final = state.get_many(keys)
        for key in keys:
            if writes[key]:
                assert final[key] == max(writes[key], key=lambda w: w[0])[1], key
    finally:
        state.close()


# ------------------------------------------------------------------ failures
def test_terminated_backends_are_replaced_on_the_next_call(
    postgres_url: str, table: str, raw: Any
) -> None:
    app = unique_name("ts_app")
    url = postgres_url + ("&" if "?" in postgres_url else "?") + f"application_name={app}"
    with PostgresStateRepository(url, table=table, pool_size=4) as repository:
        repository.store("k", *make("v"))
        # fill the pool with several idle connections
        assert _in_threads(*[partial(repository.fetch, "k")] * 4) == []
        with raw.cursor() as cur:
            cur.execute(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
                "WHERE application_name = %s",
                (app,),
            )
            assert cur.fetchone()[0] >= 1
        time.sleep(0.2)  # let the FATAL messages reach the sockets
        assert repository.fetch("k") == "v"
        repository.store("k2", *make("v2"))
        assert repository.fetch("k2") == "v2"


def test_connection_cut_mid_life_then_restored(postgres_url: str, table: str) -> None:
    params = psycopg2.extensions.parse_dsn(postgres_url)
    proxy = TCPProxy(params.get("host", "127.0.0.1"), int(params.get("port", 5432)))
    try:
        url = f"postgresql://{params.get('user', 'postgres')}@{proxy.address}/{params['dbname']}"
        with PostgresStateRepository(url, table=table) as repository:
            repository.store("k", *make(1))
            proxy.cut()
            with pytest.raises(BackendUnavailableError):
                repository.fetch("k")
            proxy.restore()
            assert repository.fetch("k") == 1
    finally:
        proxy.close()


def test_unreachable_server_fails_fast(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tiered_state")
    url = f"postgresql://postgres:s3cretpw@127.0.0.1:{free_port()}/test?connect_timeout=2"
    repository = open_repository(url)
    assert "s3cretpw" not in repr(repository)
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        repository.fetch("k")
    assert time.monotonic() - start < 2.5
    with pytest.raises(BackendUnavailableError):
        repository.store("k", *make(1))
    assert "s3cretpw" not in str(info.value)
    assert "s3cretpw" not in caplog.text


def test_blackholed_server_hits_connect_timeout() -> None:
    proxy = TCPProxy("127.0.0.1", free_port())
    proxy.blackhole()
    try:
        repository = PostgresStateRepository(
            f"postgresql://postgres@{proxy.address}/test", connect_timeout=2
        )
        start = time.monotonic()
        with pytest.raises(BackendUnavailableError):
            repository.ping()
        assert time.monotonic() - start < 4
    finally:
        proxy.close()


def test_statement_timeout(postgres_url: str, table: str, raw: Any) -> None:
    with PostgresStateRepository(postgres_url, table=table, statement_timeout=0.3) as repository:
        repository.store("k", *make(1))
        raw.autocommit = False
        with raw.cursor() as cur:
            cur.execute(f"SELECT 1 FROM {table} WHERE key = 'k' FOR UPDATE")  # hold the row lock
            start = time.monotonic()
            with pytest.raises(BackendUnavailableError):
                repository.store("k", *make(2))
            assert time.monotonic() - start < 2
        raw.rollback()
        raw.autocommit = True
        assert repository.fetch("k") == 1
        repository.store("k", *make(3))  # the connection was kept usable
        assert repository.fetch("k") == 3


@pytest.mark.parametrize("size", [10, 3000])
def test_failed_batch_leaves_nothing_half_written(repo: PostgresStateRepository, size: int) -> None:
    repo.store_many({f"b{i:05d}": make("old", 1) for i in range(size)})
    items = {f"b{i:05d}": make("new", 2) for i in range(size)}
    items.update({f"n{i:05d}": make("new", 2) for i in range(size)})
    # a timestamp PostgreSQL cannot hold fails the upsert part-way through its rows
    payload, metadata = make("bad", 2)
    metadata["created_at"] = 1e20
    items[f"n{size // 2:05d}"] = (payload, metadata)
    with pytest.raises(BackendError) as info:
        repo.store_many(items)
    assert "bad" not in str(info.value)
    assert repo.keys("n*") == []
    assert {e.version for e in repo.fetch_many(list(items)).values()} == {1}
    # an integer column overflow fails the COPY / VALUES stage instead
    items[f"n{size // 2:05d}"] = make("new", 2)
    items[f"b{size - 1:05d}"][1]["size_bytes"] = 2**40
    with pytest.raises(BackendError):
        repo.store_many(items)
    assert repo.keys("n*") == []
    items[f"b{size - 1:05d}"][1]["size_bytes"] = 5
    assert repo.store_many(items) == set(items)  # the repository is still usable
    assert len(repo.keys("n*")) == size


def test_no_driver_error_escapes(repo: PostgresStateRepository, raw: Any, table: str) -> None:
    repo.store("k", *make(1))
    with raw.cursor() as cur:
        cur.execute(f"DROP TABLE {table}")
    with pytest.raises(BackendError) as info:
        repo.fetch("k")
    assert isinstance(info.value.__cause__, psycopg2.Error)
    # the table is recreated on the next call after it vanished
    repo.store("k", *make(2))
    assert repo.fetch("k") == 2


def test_password_never_shown(postgres_url: str, table: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="tiered_state")
    params = psycopg2.extensions.parse_dsn(postgres_url)
    url = (
        f"postgresql://{params.get('user', 'postgres')}:hunter2pw@{params.get('host', '127.0.0.1')}"
        f":{params.get('port', 5432)}/{params['dbname']}?table={table}"
    )
    repository = open_repository(url)
    repository.store("k", *make(1))  # trust auth: the password is accepted and ignored
    assert "hunter2pw" not in repr(repository) and "***" in repr(repository)
    assert "hunter2pw" not in str(repository.stats())
    with pytest.raises(ConfigurationError) as info:
        open_repository(url + "&bogus=1")
    assert "hunter2pw" not in str(info.value)
    repository.close()
    assert "hunter2pw" not in caplog.text


@pytest.mark.parametrize(
    "value", [{"b": [1, 2.5, None], "a": "é\u001f\"\\"}, [True, False, 2**62, -1.5e-7], "🔑", 0]
)
def test_canonical_encoder_matches_codec(value: Any) -> None:
    from tiered_state.repositories.postgres_repository import _canonical

    assert _canonical(value) == codec.encode(value)
