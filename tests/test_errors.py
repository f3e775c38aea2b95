from __future__ import annotations

import tiered_state
from tiered_state import errors


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
