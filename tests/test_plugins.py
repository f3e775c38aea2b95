"""Third-party backends: ``register_backend``, the ``tiered_state.backends``
entry points, and an example backend installed into a fresh virtual
environment that passes ``tiered_state.testing.RepositoryContract``."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import textwrap
import time
import venv
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import tiered_state
from tiered_state import config
from tiered_state.errors import ConfigurationError, MissingDependencyError
from tiered_state.repositories.memory_repository import MemoryStateRepository

EXAMPLE = Path(__file__).resolve().parent / "example_backend"
MEMORY = "tiered_state.repositories.memory_repository:MemoryStateRepository"


@pytest.fixture(autouse=True)
def _registry() -> Iterator[None]:
    """Each test leaves the registry as it found it."""
    saved = (dict(config._REGISTRY), dict(config._INSTALL), dict(config._DISTRIBUTION))
    yield
    for table, old in zip((config._REGISTRY, config._INSTALL, config._DISTRIBUTION), saved):
        table.clear()
        table.update(old)


def _entry_point(name: str, value: str, dist: str | None = "tiered-state-fake") -> Any:
    return SimpleNamespace(name=name, value=value, group=config.ENTRY_POINT_GROUP,
                           dist=None if dist is None else SimpleNamespace(name=dist))


@pytest.fixture
def entry_points(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The entry points ``importlib.metadata`` reports (append to it); each
    lookup is counted in ``calls``."""
    declared: list[Any] = []
    calls: list[str] = []

    def fake(**selection: Any) -> list[Any]:
        calls.append(selection["group"])
        return [ep for ep in declared if ep.group == selection["group"]]

    monkeypatch.setattr(importlib.metadata, "entry_points", fake)
    declared.append(SimpleNamespace(name="memory2", value=MEMORY, group="another.group", dist=None))
    fake.calls = calls  # type: ignore[attr-defined]
    return declared


def _calls(entry_points: list[Any]) -> list[str]:
    return importlib.metadata.entry_points.calls  # type: ignore[attr-defined, no-any-return]


# ---------------------------------------------------------------- register_backend
def test_a_registered_scheme_opens_its_class() -> None:
    assert tiered_state.register_backend is config.register_backend
    assert "register_backend" in tiered_state.__all__
    tiered_state.register_backend("lru", MEMORY)
    assert config.registry["lru"] == MEMORY
    with config.open_repository("lru://?max_items=3") as repo:
        assert isinstance(repo, MemoryStateRepository) and repo.max_items == 3
    # Schemes are case-insensitive, in the registry as in URLs.
    tiered_state.register_backend("My-Store.v2", MEMORY)
    assert "my-store.v2" in config.registry
    with config.open_repository("MY-STORE.V2://") as repo:
        assert isinstance(repo, MemoryStateRepository)


@pytest.mark.parametrize("scheme", ["", " ", "9lives", "a b", "x://", "x:", "post+gres", "é", "a_b",
                                    None, 42, b"bytes"])
def test_a_malformed_scheme_is_refused(scheme: Any) -> None:
    with pytest.raises(ConfigurationError, match="a URL scheme is a letter") as info:
        tiered_state.register_backend(scheme, MEMORY)
    if isinstance(scheme, str) and "+" in scheme:
        assert "postgresql+psycopg2" in str(info.value)
    assert set(config.registry) == set(config._REGISTRY)


@pytest.mark.parametrize("target", ["module", "module:", ":Class", "a b:C", "mod:Cls:x", "mod.:C",
                                    "mod:C.", "9mod:C", "mod-x:C", "", None, 3, MemoryStateRepository])
def test_a_malformed_target_is_refused(target: Any) -> None:
    with pytest.raises(ConfigurationError, match="'module:Class' string"):
        tiered_state.register_backend("newscheme", target)
    assert "newscheme" not in config.registry


@pytest.mark.parametrize("extra", ["", "  ", "two words", 5])
def test_a_malformed_extra_is_refused(extra: Any) -> None:
    with pytest.raises(ConfigurationError, match="extra is the requirement"):
        tiered_state.register_backend("newscheme", MEMORY, extra=extra)
    assert "newscheme" not in config.registry


def test_registering_again() -> None:
    """The same target again: fine (and the extra updated). Another target:
    refused unless replace=True -- built-in schemes included."""
    tiered_state.register_backend("dyn", "pkg_a.backend:Repo")
    tiered_state.register_backend("dyn", "pkg_a.backend:Repo", extra="pkg-a")
    assert config._INSTALL["dyn"] == "pkg-a"
    with pytest.raises(ConfigurationError) as info:
        tiered_state.register_backend("DYN", "pkg_b.backend:Repo")
    assert str(info.value) == ("the URL scheme 'dyn' is already registered to 'pkg_a.backend:Repo'; "
                               "pass replace=True to register another backend for it")
    assert config.registry["dyn"] == "pkg_a.backend:Repo"
    tiered_state.register_backend("dyn", "pkg_b.backend:Repo", replace=True)
    assert config.registry["dyn"] == "pkg_b.backend:Repo"
    assert "dyn" not in config._INSTALL  # pkg-a's install hint went with pkg-a
    with pytest.raises(ConfigurationError, match="already registered"):
        tiered_state.register_backend("redis", MEMORY)
    tiered_state.register_backend("redis", MEMORY, replace=True)
    with config.open_repository("redis://localhost/0") as repo:  # the memory class takes no host
        assert isinstance(repo, MemoryStateRepository)


# ---------------------------------------------------------------- import failures
def _module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, source: str) -> None:
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)


def test_a_missing_module_names_what_to_install() -> None:
    tiered_state.register_backend("ghost", "ts_no_such_module_xyz:GhostRepository",
                                  extra="tiered-state-ghost")
    with pytest.raises(MissingDependencyError) as info:
        config.open_repository("ghost://somewhere")
    assert str(info.value) == ("the ghost:// backend cannot be imported: no module named "
                               "'ts_no_such_module_xyz'; pip install 'tiered-state-ghost'")
    assert isinstance(info.value, ImportError) and isinstance(info.value.__cause__, ImportError)
    tiered_state.register_backend("ghost2", "ts_no_such_module_xyz:GhostRepository")
    with pytest.raises(MissingDependencyError, match=r"no module named 'ts_no_such_module_xyz'$"):
        config.open_repository("ghost2://")


def test_a_missing_driver_of_the_module_is_named(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "ts_needs_driver", "import ts_absent_driver_xyz\n")
    tiered_state.register_backend("needy", "ts_needs_driver:Repo", extra="tiered-state-needy[fast]")
    with pytest.raises(MissingDependencyError) as info:
        config.open_repository("needy://")
    assert "no module named 'ts_absent_driver_xyz'" in str(info.value)
    assert "pip install 'tiered-state-needy[fast]'" in str(info.value)
    assert info.value.package == "ts_absent_driver_xyz"


def test_a_module_failing_at_import_is_a_configuration_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "ts_broken_backend",
            "raise RuntimeError('cannot start: see redis://app:Zq7Lx@db/0')\n")
    tiered_state.register_backend("broken", "ts_broken_backend:Repo")
    with pytest.raises(ConfigurationError) as info:
        config.open_repository("broken://")
    message = str(info.value)
    assert not isinstance(info.value, MissingDependencyError)
    assert message.startswith("the broken:// backend failed to import: module 'ts_broken_backend' "
                              "raised RuntimeError: cannot start")
    assert "Zq7Lx" not in message  # a URL in the module's error is shown redacted
    assert isinstance(info.value.__cause__, RuntimeError)


@pytest.mark.parametrize(("target", "says"), [
    ("tiered_state.config:NoSuchRepository", "has no 'NoSuchRepository'"),
    ("tiered_state.config:ConfigurationError", "not a StateRepository subclass"),
    ("tiered_state.config:register_backend", "not a StateRepository subclass"),
    ("tiered_state.repositories.base:StateRepository.fetch", "not a StateRepository subclass"),
])
def test_a_target_that_is_no_repository_class(target: str, says: str) -> None:
    tiered_state.register_backend("odd", target)
    with pytest.raises(ConfigurationError, match=says):
        config.open_repository("odd://")


def test_a_nested_class_target(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "ts_nested_backend", """
        from tiered_state.repositories.memory_repository import MemoryStateRepository
        class Outer:
            class Repository(MemoryStateRepository):
                pass
        """)
    tiered_state.register_backend("nested", "ts_nested_backend:Outer.Repository")
    with config.open_repository("nested://") as repo:
        assert type(repo).__qualname__ == "Outer.Repository"


# ---------------------------------------------------------------- entry points
def test_entry_points_are_read_only_for_an_unknown_scheme(entry_points: list[Any],
                                                          tmp_path: Path) -> None:
    entry_points.append(_entry_point("viaep", MEMORY, dist="tiered-state-viaep"))
    for url in ("memory://", "memory://?max_items=2", f"sqlite:///{tmp_path}/warm.db",
                tmp_path.as_uri()):
        config.open_repository(url).close()
    assert _calls(entry_points) == []  # known schemes never look
    with config.open_repository("viaep://?max_items=5") as repo:
        assert isinstance(repo, MemoryStateRepository) and repo.max_items == 5
    assert _calls(entry_points) == [config.ENTRY_POINT_GROUP]
    assert config.registry["viaep"] == MEMORY and config._DISTRIBUTION["viaep"] == "tiered-state-viaep"
    config.open_repository("VIAEP://").close()  # registered now: no second look
    assert len(_calls(entry_points)) == 1
    with pytest.raises(ConfigurationError, match="unknown URL scheme 'nothing'") as info:
        config.open_repository("nothing://x")
    assert "tiered_state.register_backend" in str(info.value)
    assert "'tiered_state.backends'" in str(info.value)
    assert len(_calls(entry_points)) == 2  # an unknown scheme looks each time
    # An entry point of another group is no backend.
    with pytest.raises(ConfigurationError, match="unknown URL scheme 'memory2'"):
        config.open_repository("memory2://")


def test_a_registered_scheme_wins_over_an_entry_point(entry_points: list[Any]) -> None:
    entry_points.append(_entry_point("mine", "ts_not_imported_xyz:Repo"))
    tiered_state.register_backend("mine", MEMORY)
    config.open_repository("mine://").close()
    assert _calls(entry_points) == []


def test_an_entry_point_that_is_not_a_target(entry_points: list[Any]) -> None:
    entry_points.append(_entry_point("badep", "just_a_module", dist="tiered-state-bad"))
    with pytest.raises(ConfigurationError) as info:
        config.open_repository("badep://")
    assert str(info.value) == (
        "the entry point 'badep' of the distribution 'tiered-state-bad' (group "
        "'tiered_state.backends') is 'just_a_module', not a 'module:Class' string")
    assert "badep" not in config.registry


def test_an_entry_point_whose_module_is_missing_names_the_distribution(
        entry_points: list[Any]) -> None:
    entry_points.append(_entry_point("gone", "ts_uninstalled_xyz.backend:Repo [fast]",
                                     dist="tiered-state-gone"))
    with pytest.raises(MissingDependencyError) as info:
        config.open_repository("gone://")
    assert str(info.value) == (
        "the gone:// backend (from the distribution 'tiered-state-gone') cannot be imported: "
        "no module named 'ts_uninstalled_xyz'; pip install 'tiered-state-gone'")


def test_an_entry_point_whose_module_fails(entry_points: list[Any], tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    _module(tmp_path, monkeypatch, "ts_failing_ep", "1 / 0\n")
    entry_points.append(_entry_point("failing", "ts_failing_ep:Repo", dist="tiered-state-failing"))
    with pytest.raises(ConfigurationError, match=r"^the failing:// backend \(from the distribution "
                       r"'tiered-state-failing'\) failed to import: module 'ts_failing_ep' raised "
                       r"ZeroDivisionError"):
        config.open_repository("failing://")


def test_two_distributions_claiming_one_scheme(entry_points: list[Any]) -> None:
    entry_points.append(_entry_point("twice", MEMORY, dist="dist-a"))
    entry_points.append(_entry_point("twice", "other_pkg:Repo", dist="dist-b"))
    entry_points.append(_entry_point("same", MEMORY, dist="dist-a"))
    entry_points.append(_entry_point("same", MEMORY, dist=None))
    with pytest.raises(ConfigurationError) as info:
        config.open_repository("twice://")
    assert "several entry points" in str(info.value)
    assert "'dist-a' -> " in str(info.value) and "'dist-b' -> 'other_pkg:Repo'" in str(info.value)
    config.open_repository("same://").close()  # the same target twice is no conflict


def test_unreadable_metadata_is_a_configuration_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(**selection: Any) -> list[Any]:
        raise ValueError("bad METADATA in some-dist")

    monkeypatch.setattr(importlib.metadata, "entry_points", broken)
    with pytest.raises(ConfigurationError, match=r"reading the entry points of the group "
                       r"'tiered_state\.backends' failed \(ValueError: bad METADATA"):
        config.open_repository("whatever://")


def test_import_reads_no_entry_point(tmp_path: Path) -> None:
    """Neither ``import tiered_state`` nor opening the built-in schemes reads
    any distribution's metadata; an unknown scheme does."""
    code = textwrap.dedent("""
        import importlib.metadata, sys
        calls = []
        real = importlib.metadata.entry_points
        importlib.metadata.entry_points = lambda **kw: calls.append(kw) or real(**kw)
        import tiered_state
        from tiered_state.config import open_repository
        with tiered_state.open(sys.argv[1]) as state:
            state.set("k", 1)
            assert state.get("k") == 1
        assert calls == [], calls
        try:
            open_repository("nope://")
        except tiered_state.ConfigurationError:
            pass
        assert calls == [{"group": "tiered_state.backends"}], calls
        """)
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "store")], check=True, timeout=60)


# ---------------------------------------------------------------- an installed package
def _site_packages(root: Path) -> Path:
    (found,) = root.glob("lib/python3*/site-packages") or root.glob("Lib/site-packages")
    return found


def test_example_backend_installed_in_a_virtualenv(tmp_path: Path) -> None:
    """``tests/example_backend`` -- a distribution declaring ``example://`` in
    the group ``tiered_state.backends`` -- pip-installed into a new virtual
    environment. There, with nothing importing or registering it, its URL
    opens it, and its own test module runs ``RepositoryContract`` on it.

    The environment sees the tiered-state under test and pytest through a
    ``.pth`` file (what an editable install amounts to), so nothing is
    downloaded for them; pip builds the example with the setuptools of this
    environment when it has setuptools and wheel, else from the index.
    """
    started = time.monotonic()
    source = tmp_path / "src"
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info",
                                                                   "__pycache__"))
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=False, symlinks=os.name != "nt")
    python = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    site = _site_packages(env_dir)
    visible = [Path(tiered_state.__file__).resolve().parent.parent,
               Path(pytest.__file__).resolve().parent.parent]
    (site / "tiered_state_under_test.pth").write_text("".join(f"{p}\n" for p in visible))
    created = time.monotonic()

    build_here = all(importlib.util.find_spec(m) for m in ("setuptools", "wheel"))
    environ = {k: v for k, v in os.environ.items()
               if not k.startswith(("TIERED_STATE_", "PYTHON", "PYTEST_"))}
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-input",
         "--disable-pip-version-check", "--target", str(site),
         *(["--no-build-isolation", "--no-index"] if build_here else []), str(source)],
        capture_output=True, text=True, timeout=300, env=environ, cwd=tmp_path)
    assert install.returncode == 0, install.stdout + install.stderr
    assert list(site.glob("tiered_state_example-1.0.dist-info/entry_points.txt"))
    installed = time.monotonic()

    # Plugins of this environment stay out: the example's run sees only what it installed.
    run = subprocess.run(
        [str(python), "-m", "pytest", "-q", "-p", "no:cacheprovider",
         str(source / "check_contract.py")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
        env={**environ, "PYTEST_DISABLE_PLUGIN_AUTOLOAD": "1"})
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " passed" in run.stdout and "failed" not in run.stdout and "error" not in run.stdout
    print(f"virtualenv {created - started:.1f} s, pip install {installed - created:.1f} s, "
          f"contract {time.monotonic() - installed:.1f} s: {run.stdout.strip().splitlines()[-1]}")
