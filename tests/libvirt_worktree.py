"""pytest plugin: a writable libvirt 11.3.0 git checkout with a build directory that survives resets.

Enable it with ``pytest_plugins = ["tests.libvirt_worktree"]`` in tests/conftest.py, then ask for the
``libvirt_worktree`` fixture (and mark the test ``slow`` if it builds or runs libvirt's tests).

- The checkout is ``$FARM_CACHE/work/libvirt-11.3.0``: made once by copying the pristine source in
  ``$FARM_CACHE/src/libvirt-11.3.0`` (never written to), ``git init`` and one commit,
  "libvirt 11.3.0 (pristine)", tagged ``pristine``.
- Every test that asks for ``libvirt_worktree`` gets it reset to that commit first
  (``git checkout --force -B main pristine`` + ``git clean -fdx``), so tests may change it freely.
- The build directory is ``$FARM_CACHE/build/libvirt-11.3.0``, outside the checkout: it survives
  resets and ninja stays incremental.
- A session holds an exclusive lock on the checkout (``$FARM_CACHE/work/libvirt-11.3.0.lock``), so
  concurrent pytest runs take turns instead of resetting each other's files.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.paths import CACHE

VERSION = "11.3.0"
PRISTINE_MESSAGE = f"libvirt {VERSION} (pristine)"
PRISTINE_TAG = "pristine"


def cache_dir() -> Path:
    return CACHE


def _git(tree: Path, *args: str) -> str:
    argv = ["git", "-C", str(tree), "-c", "user.name=farm tests", "-c", "user.email=farm@localhost",
            "-c", "commit.gpgsign=false", "-c", "core.autocrlf=false", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout


@dataclass(frozen=True)
class LibvirtWorktree:
    tree: Path  # the writable git checkout
    build_dir: Path  # its meson build directory, outside the checkout
    pristine: Path  # the read-only source it was copied from
    base: str  # the commit "libvirt 11.3.0 (pristine)"

    def reset(self) -> None:
        """Back to the pristine commit: tracked files restored, everything untracked removed."""
        _git(self.tree, "checkout", "--quiet", "--force", "-B", "main", self.base)
        _git(self.tree, "clean", "-fdxq")

    def changed(self) -> list[str]:
        """Paths (relative to the tree) that differ from the pristine commit, untracked included."""
        out = _git(self.tree, "status", "--porcelain", "--untracked-files=all")
        return [line[3:] for line in out.splitlines()]


def _create(pristine: Path, tree: Path) -> None:
    """Copy pristine to tree and commit it, atomically (a half-made checkout is never left at tree)."""
    tmp = tree.with_name(f".{tree.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(pristine, tmp, symlinks=True)
    for path in (tmp, *tmp.rglob("*")):  # the pristine copy may be read-only
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)
    _git(tmp, "init", "--quiet")
    _git(tmp, "add", "--all", "--force")
    _git(tmp, "commit", "--quiet", "--no-verify", "-m", PRISTINE_MESSAGE)
    _git(tmp, "tag", PRISTINE_TAG)
    tmp.rename(tree)


def _base(tree: Path) -> str | None:
    try:
        return _git(tree, "rev-parse", "--verify", "--quiet", f"refs/tags/{PRISTINE_TAG}^{{commit}}").strip()
    except subprocess.CalledProcessError:
        return None


def open_worktree(version: str = VERSION) -> LibvirtWorktree:
    """The checkout (made if missing or broken); the caller holds the lock."""
    cache = cache_dir()
    pristine = cache / "src" / f"libvirt-{version}"
    tree = cache / "work" / f"libvirt-{version}"
    build_dir = cache / "build" / f"libvirt-{version}"
    if not (pristine / "meson.build").is_file():
        pytest.skip(f"libvirt {version} source not in {pristine.parent}: run ./bootstrap test (it fetches it)")
    base = _base(tree) if (tree / ".git").is_dir() else None
    if base is None:
        shutil.rmtree(tree, ignore_errors=True)
        tree.parent.mkdir(parents=True, exist_ok=True)
        _create(pristine, tree)
        base = _base(tree)
        assert base is not None
    return LibvirtWorktree(tree=tree, build_dir=build_dir, pristine=pristine, base=base)


_lock_file = None  # the open, flock()ed lock file while this process holds the checkout
_lock_users = 0


@contextmanager
def locked() -> Iterator[None]:
    """Hold the checkout's lock (reentrant within this process; other processes wait)."""
    global _lock_file, _lock_users
    if _lock_users == 0:
        path = cache_dir() / "work" / f"libvirt-{VERSION}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        _lock_file = open(path, "w")
        fcntl.flock(_lock_file, fcntl.LOCK_EX)
    _lock_users += 1
    try:
        yield
    finally:
        _lock_users -= 1
        if _lock_users == 0 and _lock_file is not None:
            _lock_file.close()  # releases the lock
            _lock_file = None


@pytest.fixture(scope="session")
def libvirt_worktree_session() -> Iterator[LibvirtWorktree]:
    """The checkout, locked for this session (not reset: use libvirt_worktree)."""
    with locked():
        worktree = open_worktree()
        try:
            yield worktree
        finally:
            worktree.reset()


@pytest.fixture
def libvirt_worktree(libvirt_worktree_session: LibvirtWorktree) -> LibvirtWorktree:
    """The writable libvirt 11.3.0 checkout, reset to pristine: ``.tree``, ``.build_dir``."""
    libvirt_worktree_session.reset()
    return libvirt_worktree_session
