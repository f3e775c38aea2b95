from __future__ import annotations

import pytest

from tiered_state import config
from tiered_state.errors import ConfigurationError, MissingDependencyError


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
