from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

import tiered_state
from tiered_state import config
from tiered_state.errors import (
    BackendError,
    BackendUnavailableError,
    ConfigurationError,
    MissingDependencyError,
)
from tiered_state.record import Tier
from tiered_state.repositories.memory_repository import MemoryStateRepository
from tiered_state.repositories.sqlite_repository import SQLiteStateRepository

from .support import free_port, require_module, unique_name


def test_registry_is_read_only_and_complete() -> None:
    assert {"memory", "redis", "sqlite", "postgresql", "file", "s3"} <= set(config.registry)
    with pytest.raises(TypeError):
        config.registry["x"] = "y"  # type: ignore[index]
    for target in set(config.registry.values()):
        module, _, name = target.partition(":")
        assert module.startswith("tiered_state.repositories.") and name.endswith("StateRepository")


def test_require_names_the_extra() -> None:
    with pytest.raises(MissingDependencyError) as info:
        config.require("surely_not_installed_driver", extra="redis")
    assert "pip install 'tiered-state[redis]'" in str(info.value)
    assert isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ImportError)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:s3cret@host:6379/0", "redis://:***@host:6379/0"),
        ("postgresql://app:s3cret@db/app", "postgresql://app:***@db/app"),
        ("s3://b/p?aws_secret_access_key=s3cret&region=x", "s3://b/p?aws_secret_access_key=***&region=x"),
        ("redis://host/0?password=s3cret", "redis://host/0?password=***"),
        ("sqlite:////tmp/x.db", "sqlite:////tmp/x.db"),
    ],
)
def test_redact(url: str, shown: str) -> None:
    assert config.redact(url) == shown
    assert "s3cret" not in config.redact(url)


# Pieces of a password holding a raw "/", "@", "?" or "#": none may show.
PIECES = ("Zq7Lx", "Wm4Rp", "Ky9Tb")


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # User info runs to the last "@" before the query.
        ("redis://:Zq7Lx/Wm4Rp@Ky9Tb@127.0.0.1:6379/0", "redis://:***@127.0.0.1:6379/0"),
        ("rediss://app:Zq7Lx@Wm4Rp/Ky9Tb@h:6380/0?ssl_cert_reqs=none",
         "rediss://app:***@h:6380/0?ssl_cert_reqs=none"),
        ("postgresql://u:Zq7Lx@Wm4Rp/Ky9Tb@127.0.0.1/db", "postgresql://u:***@127.0.0.1/db"),
        ("postgresql+psycopg2://u:Zq7Lx%2FWm4Rp%40Ky9Tb@h/db", "postgresql+psycopg2://u:***@h/db"),
        ("redis://:Zq7Lx?Wm4Rp#Ky9Tb@h/0?db=1", "redis://:***@h/0?db=1"),
        ("unix://u:Zq7Lx/Wm4Rp@/tmp/redis.sock?db=0", "unix://u:***@/tmp/redis.sock?db=0"),
        # Secret options, however spelled; the rest of the query stays.
        ("postgresql://h/db?sslpassword=Zq7Lx&sslmode=require&password=Wm4Rp",
         "postgresql://h/db?sslpassword=***&sslmode=require&password=***"),
        ("s3://b/p?region=x&AWS_SECRET_ACCESS_KEY=Zq7Lx/Wm4Rp@Ky9Tb&aws_session_token=Wm4Rp",
         "s3://b/p?region=x&AWS_SECRET_ACCESS_KEY=***&aws_session_token=***"),
        ("s3://b?secret=Zq7Lx&token=Wm4Rp&api_key=Ky9Tb", "s3://b?secret=***&token=***&api_key=***"),
        # libpq key=value connection strings, quoted values whole.
        ("host=h password='Zq7Lx Wm4Rp\\' Ky9Tb' dbname=x", "host=h password=*** dbname=x"),
        ("host=h password=Zq7Lx/Wm4Rp@Ky9Tb dbname=x", "host=h password=*** dbname=x"),
        # A URL in another's query, plain or percent-encoded.
        ("s3://b?endpoint_url=http://k:Zq7Lx/Wm4Rp@Ky9Tb@127.0.0.1:9&region=x",
         "s3://b?endpoint_url=http://k:***@127.0.0.1:9&region=x"),
        ("s3://b?endpoint_url=http%3A%2F%2Fk%3AZq7Lx%2FWm4Rp%40Ky9Tb%40127.0.0.1&region=x",
         "s3://b?endpoint_url=***&region=x"),
        # URLs inside a message.
        ("cannot reach redis://:Zq7Lx/Wm4Rp@Ky9Tb@h:1/0 (refused); retry postgresql://u:Wm4Rp@h/d",
         "cannot reach redis://:***@h:1/0 (refused); retry postgresql://u:***@h/d"),
    ],
)
def test_redact_whole_passwords(url: str, shown: str) -> None:
    assert config.redact(url) == shown
    for piece in PIECES:
        assert piece not in config.redact(url)


@pytest.mark.parametrize(
    "url",
    [
        "redis://user@host:6379/0",  # a user name alone is no secret
        "sqlite:////var/lib/a@b:c/warm.db",  # paths, not user info
        "file:///srv/x:y@z/cold",
        "s3://bucket/pre@fix:x?region=eu-west-1",
        "postgresql://h:5432/db?application_name=me@host&options=-c%20work_mem%3D4MB",
        "memory://",
        "not a URL at all: a=b, c@d",
    ],
)
def test_redact_leaves_the_rest(url: str) -> None:
    assert config.redact(url) == url


def test_redact_is_linear_on_long_text() -> None:
    """redact runs on every CLI line, values included: no pathological input
    may make it quadratic."""
    import time

    for text in ("a=" * 200_000, "x://" * 100_000, "a=%41" * 80_000, "token" * 80_000,
                 "redis://" + "?@=" * 100_000, "password='" * 50_000):
        start = time.perf_counter()
        config.redact(text)
        assert time.perf_counter() - start < 2.0, text[:20]


@pytest.mark.parametrize(
    ("url", "sent"),
    [
        ("redis://:Zq7Lx/Wm4Rp@Ky9Tb@127.0.0.1:6379/0",
         "redis://:Zq7Lx%2FWm4Rp%40Ky9Tb@127.0.0.1:6379/0"),
        ("postgresql://u:Zq7Lx@Wm4Rp/Ky9Tb@h/db?sslmode=disable",
         "postgresql://u:Zq7Lx%40Wm4Rp%2FKy9Tb@h/db?sslmode=disable"),
        ("redis://:Zq7Lx?Wm4Rp@h/0", "redis://:Zq7Lx%3FWm4Rp@h/0"),
        ("redis://:Zq7Lx%Wm4Rp%2F@h/0", "redis://:Zq7Lx%25Wm4Rp%2F@h/0"),  # a lone "%"
        # Nothing to do: already encoded, no user info, or an "@" in the path
        # after a plain host:port.
        ("postgresql://u:Zq7Lx%2FWm4Rp@h/db", "postgresql://u:Zq7Lx%2FWm4Rp@h/db"),
        ("postgresql://h1:5432,h2:5433/db@x", "postgresql://h1:5432,h2:5433/db@x"),
        ("postgresql://[::1]:5432/db", "postgresql://[::1]:5432/db"),
        ("s3://bucket/p?endpoint_url=http://k:v@h", "s3://bucket/p?endpoint_url=http://k:v@h"),
        ("sqlite:///a@b/c.db", "sqlite:///a@b/c.db"),
    ],
)
def test_encode_userinfo(url: str, sent: str) -> None:
    """What drivers are given: the password redact hides, whole, as the password."""
    assert config.encode_userinfo(url) == sent
    assert config.encode_userinfo(sent) == sent


def test_unknown_scheme_and_non_url() -> None:
    with pytest.raises(ConfigurationError, match="unknown URL scheme"):
        config.open_repository("mongodb://x")
    with pytest.raises(ConfigurationError, match="not a URL"):
        config.open_repository("just-a-path")
    # Without a scheme nothing tells a password from a path: nothing is echoed.
    with pytest.raises(ConfigurationError) as info:
        config.open_repository("app:Zq7Lx/Wm4Rp@Ky9Tb@db/x")
    assert not any(piece in str(info.value) for piece in PIECES)


def test_option_parsers() -> None:
    assert config.parse_bool("yes", "x") is True and config.parse_bool("0", "x") is False
    with pytest.raises(ConfigurationError):
        config.parse_bool("maybe", "x")
    assert config.parse_number("1.5", "x") == 1.5 and config.parse_number("none", "x") is None
    with pytest.raises(ConfigurationError):
        config.parse_number("-1", "x")
    with pytest.raises(ConfigurationError):
        config.parse_number("nan", "x")


# ------------------------------------------------------------------ misspelt options
#: Per backend: a URL with a misspelt option, the option, the one meant and every valid one.
TYPOS = [
    ("memory://?max_item=10", "max_item", "max_items", {"max_items", "max_bytes"}),
    ("sqlite:///warm.db?tabel=t", "tabel", "table", {"busy_timeout", "synchronous", "table"}),
    ("file://cold?fsink=false", "fsink", "fsync", {"fsync", "compress_above", "compress_level"}),
    ("postgresql://u@127.0.0.1:1/db?tabel=t", "tabel", "table",
     {"table", "statement_timeout", "connect_timeout", "pool_size", "pool_timeout", "sslmode"}),
    ("s3://bucket/p?regoin=eu-west-1", "regoin", "region",
     {"region", "endpoint_url", "profile", "storage_class", "compression", "create_bucket",
      "max_workers", "connect_timeout", "read_timeout", "retries", "conditional"}),
]
_DRIVERS = {"postgresql": "psycopg2", "s3": "boto3"}


def _importorskip(url: str) -> None:
    driver = _DRIVERS.get(url.split("://", 1)[0])
    if driver:
        require_module(driver)


def _assert_names_option(message: str, bad: str, meant: str, valid: set[str]) -> None:
    assert repr(bad) in message, message
    assert f"did you mean {meant!r}" in message, message
    listed = message.split("valid options:", 1)[1]
    for name in valid:
        assert name in listed, (name, message)


@pytest.mark.parametrize(("url", "bad", "meant", "valid"), TYPOS,
                         ids=[t[0].split(":", 1)[0] for t in TYPOS])
def test_misspelt_option_named_with_the_valid_ones(
    url: str, bad: str, meant: str, valid: set[str], tmp_path: Path
) -> None:
    """In the URL or as a keyword, through the registry or open(): the
    message names the option, the one it looks like and every valid one."""
    _importorskip(url)
    with pytest.raises(ConfigurationError) as info:
        config.open_repository(url)
    _assert_names_option(str(info.value), bad, meant, valid)
    base, _, query = url.partition("?")
    name, _, value = query.partition("=")
    with pytest.raises(ConfigurationError) as info:
        config.open_repository(base, **{name: value})
    _assert_names_option(str(info.value), bad, meant, valid)
    tier = {"memory": "hot", "sqlite": "warm", "postgresql": "warm"}.get(base.split(":")[0], "cold")
    tiers: dict[str, Any] = {tier: url}
    with pytest.raises(ConfigurationError) as info:
        tiered_state.open(tmp_path, check=True, **tiers)
    _assert_names_option(str(info.value), bad, meant, valid)
    assert not list(tmp_path.iterdir())  # nothing was created


def test_several_misspelt_options_each_named() -> None:
    with pytest.raises(ConfigurationError) as info:
        config.open_repository("file://cold?fsink=0&compres_level=3&zzz=1")
    message = str(info.value)
    assert "'fsink' (did you mean 'fsync'?)" in message
    assert "'compres_level' (did you mean 'compress_level'?)" in message
    assert "'zzz'" in message and "'zzz' (did you mean" not in message


class StrictRepository(MemoryStateRepository):
    """A backend whose from_url hands its options on to a strict constructor,
    as a backend passing them on to its driver does."""

    def __init__(self, *, depth: int = 1, shape: str = "flat") -> None:
        super().__init__()
        self.depth, self.shape = depth, shape

    @classmethod
    def from_url(cls, url: str, **options: Any) -> StrictRepository:  # type: ignore[override]
        query: dict[str, Any] = config.query_options(url)[1]
        query.update(options)
        if query.pop("bug", None):  # a TypeError about something no user gave
            raise TypeError("helper() got an unexpected keyword argument 'internal'")
        return cls(**query)


def test_unexpected_keyword_from_a_backend_becomes_a_configuration_error(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The generic layer: a backend's from_url failing with a TypeError about
    an option the user gave is a ConfigurationError naming it and listing the
    constructor's options; any other TypeError is a bug and stays one."""
    monkeypatch.setitem(config._REGISTRY, "strict", f"{__name__}:StrictRepository")
    opened = config.open_repository("strict://?depth=2")
    assert isinstance(opened, StrictRepository) and str(opened.depth) == "2"
    for url, options in (("strict://?depht=2", {}), ("strict://", {"depht": 2})):
        with pytest.raises(ConfigurationError) as info:
            config.open_repository(url, **options)
        message = str(info.value)
        assert message.startswith("strict:// does not take the option 'depht'"), message
        assert "did you mean 'depth'" in message and message.endswith("valid options: depth, shape")
        assert isinstance(info.value.__cause__, TypeError)
    with pytest.raises(TypeError, match="internal") as raised:
        config.open_repository("strict://?bug=1")
    assert not isinstance(raised.value, ConfigurationError)


def test_unknown_options_message() -> None:
    error = config.unknown_options("x", ["tabel"], ["table", "timeout"], more="(and more)")
    assert str(error) == ("x:// does not take the option 'tabel' (did you mean 'table'?); "
                          "valid options: table, timeout (and more)")
    assert "did you mean" not in str(config.unknown_options("x", ["qqq"], ["table"]))
    assert config.given_options("a://h/p?x=1&y&z=%3D#f", {"w": 1}) == {"x", "y", "z", "w"}


# ------------------------------------------------------------------ open(check=True)
def _closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    return free_port()


@pytest.fixture
def pg_parts(postgres_url: str) -> dict[str, str]:
    psycopg2 = require_module("psycopg2")
    params: dict[str, str] = psycopg2.extensions.parse_dsn(postgres_url)
    return {"user": params.get("user", "postgres"), "host": params.get("host", "127.0.0.1"),
            "port": str(params.get("port", 5432)), "dbname": params["dbname"]}


@pytest.fixture
def pg_table(postgres_url: str) -> Iterator[str]:
    """A table name of its own, dropped afterwards."""
    psycopg2 = require_module("psycopg2")
    name = unique_name("ts_check")
    yield name
    conn = psycopg2.connect(postgres_url)
    try:
        conn.autocommit = True
        with conn.cursor() as cur:
            cur.execute(f'DROP TABLE IF EXISTS "{name}"')
    finally:
        conn.close()


def _pg(parts: dict[str, str], *, user: str | None = None, dbname: str | None = None,
        port: str | None = None, query: str = "") -> str:
    return (f"postgresql://{user or parts['user']}:{PIECES[0]}@{parts['host']}:"
            f"{port or parts['port']}/{dbname or parts['dbname']}{'?' + query if query else ''}")


#: Names of the repositories' methods: no error message may name one.
_METHODS = re.compile(r"\b(?:fetch|store|delete|touch|scan|ping|keys|_ready|_session|_run|"
                      r"fetch_record|fetch_many|store_many\w*|store_if\w*|delete_many\w*)\b"
                      r"(?: on| failed)")


def _assert_human(message: str) -> None:
    assert not _METHODS.search(message), message
    assert PIECES[0] not in message, message


def test_check_wrong_role_is_a_configuration_error(
    pg_parts: dict[str, str], tmp_path: Path
) -> None:
    role = unique_name("no_such_role")
    with pytest.raises(ConfigurationError) as info:
        tiered_state.open(tmp_path, hot="none", warm=_pg(pg_parts, user=role), cold="none",
                          check=True)
    message = str(info.value)
    assert f'role "{role}" does not exist' in message and "user name" in message, message
    assert ":***@" in message
    _assert_human(message)
    assert not list(tmp_path.iterdir())


def test_check_wrong_database_is_a_configuration_error(
    pg_parts: dict[str, str], tmp_path: Path
) -> None:
    database = unique_name("no_such_db")
    with pytest.raises(ConfigurationError) as info:
        tiered_state.open(tmp_path, hot="none", warm=_pg(pg_parts, dbname=database), cold="none",
                          check=True)
    message = str(info.value)
    assert f'database "{database}" does not exist' in message and "database name" in message
    _assert_human(message)


def test_check_table_the_role_may_not_create(pg_parts: dict[str, str], tmp_path: Path) -> None:
    """42501 on the real server without changing it: no role may create
    tables in pg_catalog (allow_system_table_mods is off)."""
    with pytest.raises(ConfigurationError) as info:
        tiered_state.open(tmp_path, hot="none",
                          warm=_pg(pg_parts, query="table=pg_catalog.ts_never_created"),
                          cold="none", check=True)
    message = str(info.value)
    assert "permission denied" in message and "CREATE on the schema" in message, message
    _assert_human(message)


def test_check_missing_schema(pg_parts: dict[str, str], tmp_path: Path) -> None:
    """A schema that does not exist fails the check as the statement's error
    (a BackendError, as at any later call), in words."""
    schema = unique_name("no_such_schema")
    with pytest.raises(BackendError) as info:
        tiered_state.open(tmp_path, hot="none", warm=_pg(pg_parts, query=f"table={schema}.t"),
                          cold="none", check=True)
    assert not isinstance(info.value, BackendUnavailableError)
    message = str(info.value)
    assert f'schema "{schema}" does not exist' in message, message
    _assert_human(message)


def test_check_unreachable_postgres(pg_parts: dict[str, str], tmp_path: Path) -> None:
    url = _pg(pg_parts, port=str(_closed_port()), query="connect_timeout=2")
    start = time.monotonic()
    with pytest.raises(BackendUnavailableError) as info:
        tiered_state.open(tmp_path, hot="none", warm=url, cold="none", check=True)
    assert time.monotonic() - start < 10
    assert "cannot connect to postgresql://" in str(info.value)
    _assert_human(str(info.value))


def test_check_unreachable_redis(tmp_path: Path) -> None:
    require_module("redis")
    store = tmp_path / "store"
    with pytest.raises(BackendUnavailableError):
        tiered_state.open(store, hot=f"redis://127.0.0.1:{_closed_port()}/0", check=True)
    # HOT is checked first: the embedded tiers were not even created.
    assert not list(store.iterdir())


def test_check_unreachable_s3(tmp_path: Path) -> None:
    require_module("boto3")
    url = f"s3://bucket/p?endpoint_url=http://127.0.0.1:{_closed_port()}&region=us-east-1&retries=1"
    with pytest.raises(BackendUnavailableError) as info:
        tiered_state.open(tmp_path, hot="none", warm="none", cold=url, check=True)
    _assert_human(str(info.value))


def test_unchecked_open_of_an_unreachable_catalog_still_succeeds(
    pg_parts: dict[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """check=False stays the default: an unreachable catalog is a warning at open."""
    url = _pg(pg_parts, port=str(_closed_port()), query="connect_timeout=2")
    with caplog.at_level(logging.WARNING, logger="tiered_state"), \
            tiered_state.open(tmp_path, hot="none", warm=url, cold="none") as state:
        assert state.catalog_tier is Tier.WARM
        with pytest.raises(BackendUnavailableError):
            state.get("k")
    assert "unreachable at open" in caplog.text
    assert PIECES[0] not in caplog.text


def test_check_missing_bucket(s3_url: str, tmp_path: Path) -> None:
    bucket = f"no-such-bucket-{time.time_ns()}"
    parts = urlsplit(s3_url)
    query = "&".join(q for q in parts.query.split("&") if not q.startswith("create_bucket"))
    url = urlunsplit(parts._replace(netloc=bucket, query=query))
    store = tmp_path / "store"
    with pytest.raises(ConfigurationError) as info:
        tiered_state.open(store, cold=url, check=True)
    message = str(info.value)
    assert f"bucket {bucket!r} does not exist" in message and "create_bucket=true" in message
    _assert_human(message)
    # COLD is checked last: WARM was reached (its file and table exist), but
    # nothing was stored in it, not even the store's format record.
    with SQLiteStateRepository(store / "warm.db") as warm:
        assert list(warm.iter_all_keys()) == []
    # With create_bucket the first write makes it: nothing to refuse.
    with tiered_state.open(store, cold=url + "&create_bucket=true", check=True):
        pass


def test_check_without_credentials(s3_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tiered_state.repositories import s3_repository

    # Undone before the s3_url fixture empties its prefix (with credentials).
    with monkeypatch.context() as patch:
        for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
                     "AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                     "AWS_CONTAINER_CREDENTIALS_FULL_URI", "AWS_WEB_IDENTITY_TOKEN_FILE"):
            patch.delenv(name, raising=False)
        patch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
        patch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
        patch.setenv("AWS_EC2_METADATA_DISABLED", "true")
        patch.setattr(s3_repository, "_SESSIONS", {})  # none holding credentials found earlier
        with pytest.raises(ConfigurationError) as info:
            tiered_state.open(tmp_path, hot="none", warm="none", cold=s3_url, check=True)
    message = str(info.value)
    assert "no AWS credentials" in message and "AWS_ACCESS_KEY_ID" in message, message
    assert "'profile'" in message


def test_nothing_stored_when_a_server_check_fails(
    postgres_url: str, pg_parts: dict[str, str], pg_table: str, tmp_path: Path
) -> None:
    psycopg2 = require_module("psycopg2")
    require_module("boto3")
    cold = f"s3://b/p?endpoint_url=http://127.0.0.1:{_closed_port()}&region=us-east-1&retries=1"
    with pytest.raises(BackendUnavailableError):
        tiered_state.open(tmp_path, hot="memory://", warm=_pg(pg_parts, query=f"table={pg_table}"),
                          cold=cold, check=True)
    conn = psycopg2.connect(postgres_url)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT to_regclass(%s)", (pg_table,))
            if cur.fetchone()[0] is not None:  # reached: the table may exist, empty
                cur.execute(f'SELECT count(*) FROM "{pg_table}"')
                assert cur.fetchone()[0] == 0
    finally:
        conn.close()


def test_check_embedded_layout(tmp_path: Path) -> None:
    with tiered_state.open(tmp_path, check=True) as state:
        state.set("k", {"v": 1})
        assert state.get("k") == {"v": 1}
    with tiered_state.open(tmp_path, check=True) as state:  # an existing store too
        assert state.get("k") == {"v": 1}


def test_check_server_layout(
    redis_url: str, pg_parts: dict[str, str], pg_table: str, s3_url: str, tmp_path: Path
) -> None:
    require_module("redis")
    require_module("boto3")
    hot = redis_url + ("&" if "?" in redis_url else "?") + f"prefix={unique_name('chk')}:"
    warm = _pg(pg_parts, query=f"table={pg_table}")
    with tiered_state.open(tmp_path, hot=hot, warm=warm, cold=s3_url, check=True) as state:
        try:
            state.set("k", [1, 2])
            state.demote("k", to="cold")
            assert state.get("k") == [1, 2]
        finally:
            state.repositories[Tier.HOT].clear()
