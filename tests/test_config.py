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


def test_unknown_scheme_and_non_url() -> None:
    with pytest.raises(ConfigurationError, match="unknown URL scheme"):
        config.open_repository("mongodb://x")
    with pytest.raises(ConfigurationError, match="not a URL"):
        config.open_repository("just-a-path")


def test_option_parsers() -> None:
    assert config.parse_bool("yes", "x") is True and config.parse_bool("0", "x") is False
    with pytest.raises(ConfigurationError):
        config.parse_bool("maybe", "x")
    assert config.parse_number("1.5", "x") == 1.5 and config.parse_number("none", "x") is None
    with pytest.raises(ConfigurationError):
        config.parse_number("-1", "x")
    with pytest.raises(ConfigurationError):
        config.parse_number("nan", "x")
