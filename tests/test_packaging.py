"""farm as a user installs it: a wheel built from this tree, installed with pip into a fresh
virtualenv (its dependencies from the package index), run from a directory outside the source
tree, so nothing of the checkout can stand in for what the wheel lacks (the agent above all)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import farm
from tests.helpers import REPO
from tests.paths import CACHE
from tests.standin import QEMU, standin_builddir
from tests.test_faults import local_inventory


def run(argv: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=600, **kwargs)


def the_tree_as_committed_or_about_to_be(target: Path) -> Path:
    """This checkout's files (tracked, and new ones not ignored) copied to ``target``: the build
    leaves its build/ and egg-info there, not in the checkout."""
    listed = run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO, check=True)
    for name in filter(None, listed.stdout.split("\0")):
        source = REPO / name
        if source.is_file() and not source.is_symlink():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target / name)
    return target


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    """The bin/ of a fresh virtualenv with farm installed from a wheel of this tree."""
    base = tmp_path_factory.mktemp("packaging")
    tree = the_tree_as_committed_or_about_to_be(base / "tree")
    built = run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "-w", str(base / "wheels"), "-q"], cwd=tree)
    assert built.returncode == 0, built.stderr[-3000:]
    (wheel,) = (base / "wheels").glob("farm-*.whl")
    venv = base / "venv"
    run([sys.executable, "-m", "venv", str(venv)], check=True)
    done = run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)], cwd=base)
    assert done.returncode == 0, done.stderr[-3000:]
    return venv / "bin"


@pytest.fixture
def outside(tmp_path, installed) -> dict:
    """Arguments running in a directory outside the source tree with a clean environment."""
    env = {"PATH": f"{installed}:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(tmp_path),
           "FARM_STATE_DIR": str(tmp_path / "state"), "FARM_CACHE_DIR": str(CACHE)}
    return {"cwd": tmp_path, "env": env}


def test_farm_version_prints_the_version_and_exits_0():
    done = run([sys.executable, "-m", "farm", "--version"], cwd=REPO)
    assert (done.returncode, done.stdout) == (0, f"farm {farm.__version__}\n"), done.stderr


def test_the_installed_farm_is_the_wheels_and_carries_the_agent_byte_for_byte(installed, outside):
    where = run([str(installed / "python"), "-c", "import farm, farm.hosts.agent as a; print(farm.__file__); "
                 "print(a.AGENT_FILE)"], **outside)
    package, agent = where.stdout.split()
    assert package.startswith(str(installed.parent)), where  # not this checkout's farm
    assert agent.startswith(str(installed.parent)) and agent.endswith("farm/_agent/farm_agent.py")
    assert Path(agent).read_bytes() == (REPO / "agents" / "farm_agent.py").read_bytes()


def test_the_installed_farm_prints_its_version(installed, outside):
    done = run(["farm", "--version"], **outside)
    assert (done.returncode, done.stdout) == (0, f"farm {farm.__version__}\n"), done.stderr


def test_the_installed_farm_checks_the_built_in_hosts_with_its_agent(installed, outside):
    done = run(["farm", "hosts", "check", "--json"], **outside)
    assert done.returncode in (0, 1), done.stderr[-2000:]
    assert "agent not found" not in done.stdout + done.stderr
    hosts = json.loads(done.stdout)
    assert hosts and all(h["facts"]["agent_version"] for h in hosts), hosts  # the agent answered


def test_the_installed_farm_probes_a_local_host_with_its_agent(installed, outside, tmp_path):
    standin = standin_builddir(tmp_path / "standin", delay=0)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["standin-1"])
    done = run(["farm", "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory), "--json",
                "--quiet"], **outside)
    assert done.returncode == 0, done.stderr[-3000:]
    (job,) = json.loads(done.stdout)["jobs"]
    assert (job["status"], job["verdict"], job["host"]) == ("ok", "real", "standin-1"), job
