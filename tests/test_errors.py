from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import tiered_state
from tiered_state import errors

from .support import require_module


def test_tree() -> None:
    assert issubclass(errors.ConfigurationError, (errors.TieredStateError, ValueError))
    assert issubclass(errors.MissingDependencyError, (errors.ConfigurationError, ImportError))
    assert issubclass(errors.InvalidKeyError, ValueError)
    assert issubclass(errors.SerializationError, TypeError)
    assert issubclass(errors.BackendUnavailableError, errors.BackendError)
    assert issubclass(errors.BatchError, errors.BackendError)
    for name in errors.__all__:
        assert issubclass(getattr(errors, name), errors.TieredStateError)


def test_all_is_sorted_and_complete() -> None:
    assert errors.__all__ == sorted(errors.__all__)
    public = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert public == set(errors.__all__)
    assert set(errors.__all__) <= set(tiered_state.__all__)


def test_batch_error_shape() -> None:
    err = errors.BatchError("store_many failed", {"a": OSError("x")}, ["b"], "redis")
    assert err.failed.keys() == {"a"} and err.succeeded == ["b"] and err.backend == "redis"
    assert "1 failed" in str(err)


def test_conflict_error_shape() -> None:
    err = errors.ConflictError("k", 1, 2)
    assert (err.key, err.expected, err.actual) == ("k", 1, 2)


# ------------------------------------------------------------------ PostgreSQL: translation
PASSWORD = "Zq7Lx"
#: Method names that an error message must never show.
METHOD_NAMES = ("store_many_if_newer", "fetch_record", "_session", "_run", "_ready", "_prepare",
                "ping failed", "fetch on", "store on")


def _human(message: str) -> str:
    for name in METHOD_NAMES:
        assert name not in message, message
    assert PASSWORD not in message, message
    return message


@pytest.fixture
def pg_repo() -> Any:
    """A repository that never connects: _raise is called with made-up driver errors."""
    require_module("psycopg2")
    from tiered_state.repositories.postgres_repository import PostgresStateRepository

    return PostgresStateRepository(f"postgresql://app:{PASSWORD}@db.invalid:5432/app")


def _failed(text: str) -> str:
    return f'connection to server at "db.invalid" (10.0.0.1), port 5432 failed: {text}\n'


@pytest.mark.parametrize(
    ("text", "advice"),
    [
        ('FATAL:  password authentication failed for user "app"', "password"),
        ("fe_sendauth: no password supplied", "password"),
        ('FATAL:  role "app" does not exist', "user name"),
        ('FATAL:  no pg_hba.conf entry for host "10.0.0.2", user "app", database "app", SSL off',
         "pg_hba.conf"),
        ('FATAL:  database "app" does not exist', "database name"),
        ('FATAL:  permission denied for database "app"', "CONNECT"),
        ('FATAL:  unrecognized configuration parameter "work_mem2"', "option 'options'"),
    ],
)
def test_postgres_refusals_at_connect_are_configuration_errors(
    pg_repo: Any, text: str, advice: str
) -> None:
    """A failed connection has no SQLSTATE; the server's reason decides. The
    message says what the server said and what to check, never which
    method was running, never the password."""
    import psycopg2

    with pytest.raises(errors.ConfigurationError) as info:
        pg_repo._raise(psycopg2.OperationalError(_failed(text)), "connect")
    message = _human(str(info.value))
    assert text.removeprefix("FATAL:  ") in message and advice in message, message
    assert "postgresql://app:***@db.invalid:5432/app" in message
    assert isinstance(info.value.__cause__, psycopg2.OperationalError)


def test_postgres_refusal_on_a_later_address(pg_repo: Any) -> None:
    """libpq tries every address of a host; the reason may be on a later line."""
    import psycopg2

    text = (_failed("Connection refused\n\tIs the server running on that host?")
            + _failed('FATAL:  role "app" does not exist'))
    with pytest.raises(errors.ConfigurationError, match="user name"):
        pg_repo._raise(psycopg2.OperationalError(text), "connect")


@pytest.mark.parametrize("code", ["28000", "28P01", "3D000", "42501"])
def test_postgres_misconfiguration_sqlstates(pg_repo: Any, code: str) -> None:
    import psycopg2

    class Refused(psycopg2.ProgrammingError):
        pgcode = code

    with pytest.raises(errors.ConfigurationError) as info:
        pg_repo._raise(Refused("permission denied for table tiered_state\nDETAIL: x"),
                       "store_many_if_newer")
    message = _human(str(info.value))
    assert "permission denied for table tiered_state" in message and "DETAIL" not in message


@pytest.mark.parametrize(
    "text",
    ["Connection refused\n\tIs the server running on that host and accepting TCP/IP connections?",
     "timeout expired", "server closed the connection unexpectedly",
     'could not translate host name "db.invalid" to address: Name or service not known'],
)
def test_postgres_outages_stay_unavailable(pg_repo: Any, text: str) -> None:
    import psycopg2

    with pytest.raises(errors.BackendUnavailableError) as info:
        pg_repo._raise(psycopg2.OperationalError(_failed(text)), "connect")
    message = _human(str(info.value))
    assert message.startswith("postgres: cannot connect to postgresql://app:***@db.invalid")


def test_postgres_statement_errors_name_no_method(pg_repo: Any) -> None:
    import psycopg2

    class Shutdown(psycopg2.OperationalError):
        pgcode = "57P01"

    with pytest.raises(errors.BackendUnavailableError) as unavailable:
        pg_repo._raise(Shutdown("terminating connection due to administrator command"),
                       "store_many_if_newer")
    assert "a batch write on table tiered_state failed" in _human(str(unavailable.value))
    with pytest.raises(errors.BackendError) as failed:
        pg_repo._raise(psycopg2.DataError("division by zero"), "fetch")
    assert not isinstance(failed.value, errors.BackendUnavailableError)
    assert "a read on table tiered_state failed: DataError" in _human(str(failed.value))


@pytest.mark.parametrize(
    ("query", "named"),
    [("sslmode=bogus", "option 'sslmode'"), ("port=notaport", "option 'port'"),
     ("options=-c%20ts_no_such_setting%3D1", "option 'options'"),
     ("options=-c%20statement_timeout%3Dabc", "option 'options'")],
)
def test_postgres_bad_settings_against_the_server(postgres_url: str, query: str, named: str) -> None:
    """Settings libpq or the server refuse at connect: the configuration,
    reported at the first contact (read-only: the connection is refused)."""
    require_module("psycopg2")
    from tiered_state.config import open_repository

    url = postgres_url + ("&" if "?" in postgres_url else "?") + query
    with pytest.raises(errors.ConfigurationError) as info, open_repository(url) as repo:
        repo.ping()
    assert named in _human(str(info.value))


# ------------------------------------------------------------------ S3: refusals at ping
@pytest.fixture
def stubbed_s3() -> Iterator[tuple[Any, Any]]:
    """An S3 repository whose client answers from a botocore Stubber: the
    refusals a local S3 server cannot be made to give (it checks no keys)."""
    require_module("boto3")
    from botocore.stub import Stubber

    from tiered_state.config import open_repository

    repo: Any = open_repository("s3://bucket/p?endpoint_url=http://127.0.0.1:9&region=us-east-1")
    with repo, Stubber(repo._client) as stub:
        yield repo, stub


@pytest.mark.parametrize(
    ("code", "said"),
    [("InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"), ("SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"),
     ("AccessDenied", "s3:GetObject"), ("ExpiredToken", "expired")],
)
def test_s3_refused_credentials_at_ping(stubbed_s3: tuple[Any, Any], code: str, said: str) -> None:
    repo, stub = stubbed_s3
    stub.add_client_error("head_bucket", "403", http_status_code=403)
    stub.add_client_error("get_object", code, http_status_code=403)
    with pytest.raises(errors.ConfigurationError) as info:
        repo.ping()
    message = _human(str(info.value))
    assert code in message and said in message and "'bucket'" in message, message


def test_s3_head_refused_but_objects_allowed(stubbed_s3: tuple[Any, Any]) -> None:
    """No ListBucket, yet the object calls work: the ping passes."""
    repo, stub = stubbed_s3
    stub.add_client_error("head_bucket", "403", http_status_code=403)
    stub.add_client_error("get_object", "NoSuchKey", http_status_code=404)
    assert repo.ping() >= 0
    stub.assert_no_pending_responses()


def test_s3_ping_outcomes(stubbed_s3: tuple[Any, Any]) -> None:
    repo, stub = stubbed_s3
    stub.add_client_error("head_bucket", "404", http_status_code=404)
    with pytest.raises(errors.ConfigurationError, match="does not exist"):
        repo.ping()
    stub.add_client_error("head_bucket", "503", http_status_code=503)
    with pytest.raises(errors.BackendUnavailableError) as unavailable:
        repo.ping()
    stub.add_client_error("head_bucket", "500", http_status_code=500)
    with pytest.raises(errors.BackendError) as failed:
        repo.ping()
    for raised in (unavailable, failed):
        assert "reaching the bucket failed" in _human(str(raised.value))


@pytest.mark.parametrize(
    ("query", "named"),
    [("endpoint_url=127.0.0.1:9000", "'endpoint_url'"), ("region=not%20a%20region", "'region'"),
     ("profile=ts-no-such-profile", "'profile'")],
)
def test_s3_bad_settings_are_configuration_errors(
    query: str, named: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    require_module("boto3")
    from tiered_state.config import open_repository

    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    with pytest.raises(errors.ConfigurationError) as info:
        open_repository(f"s3://bucket/p?{query}")
    assert named in _human(str(info.value))
