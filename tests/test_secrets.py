"""Secrets in URLs never show: ``repr``, error messages, log records, CLI output.

The password here holds a raw ``/`` and ``@``, the spelling that leaked: a
strict URL parser takes the ``/`` for the start of the path and the first
``@`` for the end of the user info, and then shows the rest as a host or a
path. Every piece of it is distinctive, so a test can tell that no piece shows.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest

import tiered_state
from tiered_state.config import open_repository
from tiered_state.errors import ConfigurationError, TieredStateError
from tiered_state.record import make_metadata

from .support import require_module, unique_name
from .test_cli import cli

SECRET = "Zq7Lx/Wm4Rp@Ky9Tb"
PIECES = ("Zq7Lx", "Wm4Rp", "Ky9Tb")


def assert_hidden(text: str) -> None:
    for piece in PIECES:
        assert piece not in text, text


def _dead(url: str) -> str:
    """``url``'s user and password, pointed at a port nobody listens on."""
    return url.rsplit("@", 1)[0] + "@127.0.0.1:1/db?connect_timeout=2"


@pytest.fixture
def pg_secret_url(postgres_url: str) -> Iterator[str]:
    """The test server's URL with SECRET as the password (trust auth ignores
    it) and a table of its own, dropped afterwards."""
    psycopg2 = require_module("psycopg2")
    params = psycopg2.extensions.parse_dsn(postgres_url)
    table = unique_name("ts_secret")
    yield (f"postgresql://{params.get('user', 'postgres')}:{SECRET}@"
           f"{params.get('host', '127.0.0.1')}:{params.get('port', 5432)}/{params['dbname']}"
           f"?table={table}")
    conn = psycopg2.connect(postgres_url)
    conn.autocommit = True
    with conn.cursor() as cur:
        cur.execute(f"DROP TABLE IF EXISTS {table}")
    conn.close()


@pytest.fixture
def redis_secret_url(redis_url: str) -> str:
    require_module("redis")
    return redis_url.replace("redis://", f"redis://:{SECRET}@", 1)


S3_SECRET_URLS = [
    # The endpoint's own user info, raw and percent-encoded, and a token in its query.
    f"s3://bucket/p?endpoint_url=http://key:{SECRET}@127.0.0.1:9&region=us-east-1",
    "s3://bucket/p?endpoint_url=" + quote(f"http://key:{SECRET}@127.0.0.1:9", safe="")
    + "&region=us-east-1",
    f"s3://bucket/p?endpoint_url=http://127.0.0.1:9/?token={SECRET}&region=us-east-1",
]


# ------------------------------------------------------------------ repr
def test_postgres_repr_and_use(pg_secret_url: str, caplog: pytest.LogCaptureFixture) -> None:
    """Opened, used (the password reaches the server whole: the URL's host is
    the one connected to) and shown without the password."""
    caplog.set_level(logging.DEBUG, logger="tiered_state")
    with open_repository(pg_secret_url) as repository:
        shown = repr(repository)
        assert_hidden(shown)
        assert ":***@" in shown
        from psycopg2.extensions import parse_dsn

        assert parse_dsn(repository._connect_kwargs["dsn"])["password"] == SECRET
        repository.store("k", "1", make_metadata("1", version=1, now=0.0))
        assert repository.fetch("k") == 1
        assert_hidden(str(repository.stats()))
    assert_hidden(caplog.text)


def test_redis_repr(redis_secret_url: str) -> None:
    from tiered_state.repositories.redis_repository import RedisStateRepository

    # Through the registry and through the class itself: the same URL handling.
    for opened in (open_repository(redis_secret_url),
                   RedisStateRepository.from_url(redis_secret_url)):
        with opened as repository:
            assert_hidden(repr(repository))
            # The whole password is the password (not a host or a path).
            assert repository.client.connection_pool.connection_kwargs["password"] == SECRET


@pytest.mark.parametrize("url", S3_SECRET_URLS, ids=["userinfo", "encoded", "query"])
def test_s3_repr(url: str) -> None:
    require_module("boto3")
    with open_repository(url) as repository:
        assert_hidden(repr(repository))
        assert "***" in repr(repository)


# ------------------------------------------------------------------ errors
BAD_URLS = [
    f"redis://:{SECRET}@127.0.0.1:notaport/0",
    f"redis://u:{SECRET}@127.0.0.1:6379/0?db=x",
    f"postgresql://u:{SECRET}@127.0.0.1/db?bogus_libpq_option=1",
    f"postgresql://u:{SECRET}@127.0.0.1/db?sslpassword={SECRET}&bogus=1",
    f"postgresql://u:{SECRET}@127.0.0.1/db?pool_size=zero",
    f"postgresql://u:{SECRET}@127.0.0.1/db?table=bad-name",
    f"s3://bucket/p?aws_secret_access_key={SECRET}",
    f"s3://key:{SECRET}@bucket/p",
    f"bogus://u:{SECRET}@host/x",
    f"u:{SECRET}@host/x",  # no scheme at all
]


@pytest.mark.parametrize("url", BAD_URLS)
def test_configuration_errors(url: str) -> None:
    scheme = url.split("://", 1)[0]
    if scheme.startswith(("redis", "postgres", "s3")):
        require_module({"redis": "redis", "postgresql": "psycopg2", "s3": "boto3"}[scheme])
    with pytest.raises(ConfigurationError) as info:
        open_repository(url)
    assert_hidden(str(info.value))
    with pytest.raises(ConfigurationError) as info:
        tiered_state.open(hot="none", warm=url, cold="none")
    assert_hidden(str(info.value))


def test_server_errors(pg_secret_url: str) -> None:
    """A driver's own message may quote the connection's settings; none of it
    shows the password."""
    with open_repository(_dead(pg_secret_url)) as repository, \
            pytest.raises(TieredStateError) as info:
        repository.ping()
    assert_hidden(str(info.value))


# ------------------------------------------------------------------ logs
def test_log_records(
    pg_secret_url: str, redis_secret_url: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="tiered_state")
    with tiered_state.open(hot=redis_secret_url + "?prefix=" + unique_name("ts") + ":",
                           warm=pg_secret_url, cold=f"file://{tmp_path}/cold") as state:
        state.set("k", {"v": 1})
        assert state.get("k") == {"v": 1}
        state.delete("k")
    with pytest.raises(TieredStateError):
        tiered_state.open(hot="none", warm=_dead(pg_secret_url), cold="none").get("k")
    assert caplog.records
    for record in caplog.records:
        assert_hidden(record.getMessage())
    assert_hidden(caplog.text)


# ------------------------------------------------------------------ CLI
@pytest.mark.parametrize("debug", [False, True], ids=["plain", "debug"])
def test_doctor_output(
    pg_secret_url: str, redis_secret_url: str, tmp_path: Path, debug: bool
) -> None:
    dead_pg = _dead(pg_secret_url)
    runs: list[Any] = []
    for hot, warm, cold in [
        (redis_secret_url, pg_secret_url, S3_SECRET_URLS[0]),
        ("none", dead_pg, S3_SECRET_URLS[1]),
        (redis_secret_url, pg_secret_url, f"s3://bucket/p?aws_secret_access_key={SECRET}"),
    ]:
        args = ["--debug"] if debug else []
        result = cli(*args, "--hot", hot, "--warm", warm, "--cold", cold, "doctor",
                     path=tmp_path / "store")
        runs.append(result)
        assert "Traceback" not in result.stdout
        assert_hidden(result.stdout + result.stderr)
        assert "***" in result.stdout, result.stdout
    # The first run reached the servers: it is not an error that hid everything.
    assert any(line.startswith("warm") and " ok " in line for line in runs[0].stdout.splitlines())
