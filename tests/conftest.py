"""Shared fixtures: libvirt's own test data, fetched by ./bootstrap into the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.paths import CACHE

pytest_plugins = ["tests.libvirt_worktree", "tests.netns", "tests.publishing", "tests.services"]

SOURCES = CACHE / "src"


def libvirt_tree(version: str) -> Path:
    tree = SOURCES / f"libvirt-{version}"
    if not (tree / "tests" / "qemucapabilitiesdata").is_dir():
        pytest.skip(f"libvirt {version} source not in {SOURCES}: run ./bootstrap test (it fetches it)")
    return tree


@pytest.fixture(scope="session")
def libvirt11() -> Path:
    """libvirt 11.3.0 (trixie): current names and layout, scripts/qemu-replies-tool.py."""
    return libvirt_tree("11.3.0")


@pytest.fixture(scope="session")
def libvirt9() -> Path:
    """libvirt 9.0.0 (bookworm): old names and layout."""
    return libvirt_tree("9.0.0")


@pytest.fixture(scope="session")
def data11(libvirt11: Path) -> Path:
    return libvirt11 / "tests" / "qemucapabilitiesdata"


@pytest.fixture(scope="session")
def data9(libvirt9: Path) -> Path:
    return libvirt9 / "tests" / "qemucapabilitiesdata"


@pytest.fixture
def env(tmp_path) -> dict:
    """The environment of a farm CLI run: its own state dir, the shared build cache, no other FARM_*."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_STATE_DIR=str(tmp_path / "state"), FARM_CACHE_DIR=str(CACHE))
    return env
