"""Publishing tests share: a git helper, the checkout's "as it was" snapshot, bare upstream and
fork remotes, and the real libvirt 11.3.0 checkout set up for `farm publish` (fixture ``libvirt``)."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.libvirt_worktree import LibvirtWorktree

CAPS = Path("tests") / "qemucapabilitiesdata"
NAME, EMAIL = "Farm Tester", "farm-tester@example.org"


def git(tree: Path, *args: str) -> str:
    argv = ["git", "-C", str(tree), "-c", "user.name=upstream", "-c", "user.email=upstream@localhost",
            "-c", "commit.gpgsign=false", *args]
    return subprocess.run(argv, check=True, capture_output=True, text=True).stdout.strip()


def snapshot(tree: Path) -> tuple[str, str, str]:
    """What 'the checkout as it was' means: branch, HEAD, status (untracked included), branches."""
    return (git(tree, "symbolic-ref", "--short", "HEAD") + " " + git(tree, "rev-parse", "HEAD"),
            git(tree, "status", "--porcelain", "--untracked-files=all"),
            git(tree, "for-each-ref", "--format=%(refname)", "refs/heads"))


@dataclass
class Remotes:
    tree: Path
    upstream: Path
    fork: Path


def add_remotes(tree: Path, root: Path) -> Remotes:
    """A bare "upstream" (origin) of the tree's current commit and a bare "fork", as remotes of tree."""
    upstream, fork = root / "upstream.git", root / "fork.git"
    for bare in (upstream, fork):
        subprocess.run(["git", "clone", "--quiet", "--bare", "--shared", str(tree), str(bare)], check=True)
    for name, bare in (("origin", upstream), ("fork", fork)):
        subprocess.run(["git", "-C", str(tree), "remote", "remove", name], capture_output=True)
        git(tree, "remote", "add", name, str(bare))
    return Remotes(tree, upstream, fork)


@pytest.fixture
def libvirt(libvirt_worktree: LibvirtWorktree, tmp_path: Path, env: dict):
    """The real 11.3.0 checkout with bare upstream and fork remotes, and env for publishing into it."""
    tree = libvirt_worktree.tree

    def drop_branches():
        for ref in git(tree, "for-each-ref", "--format=%(refname:short)", "refs/heads/qemucaps/").splitlines():
            git(tree, "branch", "-D", ref)

    drop_branches()
    remotes = add_remotes(tree, tmp_path)
    env.update(FARM_LIBVIRT_CHECKOUT=str(tree), FARM_LIBVIRT_BUILD_DIR=str(libvirt_worktree.build_dir),
               FARM_GIT_NAME=NAME, FARM_GIT_EMAIL=EMAIL)
    yield remotes
    drop_branches()
    for name in ("origin", "fork"):
        subprocess.run(["git", "-C", str(tree), "remote", "remove", name], capture_output=True)
