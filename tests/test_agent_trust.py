"""The agent trusts only cache entries of its own user or root that no one else can write: a
less privileged user who can write into a shared cache must not get a program run as the agent's
user (here root). Two real users: root runs the agent, `nobody` plants the entry."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, farm, needs_root

AGENT = REPO / "agents" / "farm_agent.py"
SOURCE = "debian:11.3.0-3+deb13u3"


def as_nobody(*argv: str) -> None:
    subprocess.run(["runuser", "-u", "nobody", "--", *argv], check=True)


@pytest.fixture
def shared_cache():
    """A cache whose libvirt area the user nobody can write into (a shared cache gone wrong), in a
    directory nobody can reach (pytest's tmp_path is root's only)."""
    import tempfile

    base = Path(tempfile.mkdtemp(prefix="farm-shared-cache-", dir="/tmp"))
    cache = base / "cache"
    area = cache / "agent" / "libvirt"
    area.mkdir(parents=True)
    for d in (base, cache, cache / "agent"):
        os.chmod(d, 0o755)
    shutil.chown(area, "nobody")
    yield cache
    shutil.rmtree(base, ignore_errors=True)


def plant(cache: Path, marker: Path, *, owner: str = "nobody", mode: int = 0o755) -> Path:
    """An entry for SOURCE whose 'probe' touches MARKER when run."""
    entry = cache / "agent" / "libvirt" / "debian-11.3.0-3+deb13u3"
    build = entry / "build" / "tests"
    evil = build / "qemucapsprobe"
    as_nobody("mkdir", "-p", str(build))
    as_nobody("sh", "-c", f"printf '#!/bin/sh\\ntouch {marker}\\n' > {evil} && chmod 755 {evil}")
    meta = {"key": entry.name, "source": SOURCE, "probe": str(evil), "mock": str(evil), "libvirt_version": "11.3.0"}
    as_nobody("sh", "-c", f"cat > {entry}/farm-agent.json <<'EOF'\n{json.dumps(meta)}\nEOF")
    if owner == "root":
        subprocess.run(["chown", "-R", "root:root", str(entry)], check=True)
        os.chmod(entry, mode)
    return entry


@needs_root
def test_an_entry_planted_by_another_user_is_refused_and_never_run(shared_cache, tmp_path):
    marker = shared_cache / "ran"
    entry = plant(shared_cache, marker)
    done = subprocess.run([sys.executable, str(AGENT), "toolchain", "libvirt", "--source", SOURCE,
                           "--cache", str(shared_cache / "agent")], capture_output=True, text=True, timeout=60)
    reply = json.loads(done.stdout)
    assert done.returncode != 0 and not reply["ok"]
    uid = pwd.getpwnam("nobody").pw_uid
    assert f"refusing the cache entry {entry}" in reply["error"] and f"belongs to uid {uid}" in reply["error"]
    subprocess.run([sys.executable, str(AGENT), "facts", "--cache", str(shared_cache / "agent")],
                   capture_output=True, timeout=60)
    assert not marker.exists()


@needs_root
def test_an_entry_of_root_under_a_directory_others_can_write_is_refused(shared_cache, tmp_path):
    marker = shared_cache / "ran"
    entry = plant(shared_cache, marker, owner="root")  # root's files, but in nobody's directory
    done = subprocess.run([sys.executable, str(AGENT), "toolchain", "libvirt", "--source", SOURCE,
                           "--cache", str(shared_cache / "agent")], capture_output=True, text=True, timeout=60)
    reply = json.loads(done.stdout)
    assert not reply["ok"] and "belongs to uid" in reply["error"] and str(entry.parent) in reply["error"]
    assert not marker.exists()


@needs_root
def test_hosts_check_warns_of_an_agent_running_as_root_and_of_refused_entries(env, shared_cache, tmp_path):
    plant(shared_cache, shared_cache / "ran")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  - name: here\n    transport: local\n    arch: x86_64\n"
                         f"    toolchain:\n      libvirt: {SOURCE}\n      qemu: system\n"
                         f"      cache_dir: {shared_cache}\n")
    code, out, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    (host,) = out
    assert host["warnings"][0].startswith("the agent runs as root: run it as an unprivileged user")
    assert any("refusing the cache entry" in w for w in host["warnings"][1:])
    assert not (shared_cache / "ran").exists()
