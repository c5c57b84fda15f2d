"""Helpers shared by the tests: running the farm CLI for real, and what a test needs of the machine."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


needs_kvm = pytest.mark.skipif(not kvm_usable(), reason="needs a usable /dev/kvm")
needs_x86 = pytest.mark.skipif(platform.machine() != "x86_64", reason="expects an x86_64 machine (Debian's QEMU 7.2)")
needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (users, network namespaces)")


def farm(env: dict, *args: str) -> tuple[int, dict | list | None, str]:
    """Run `python -m farm ARGS` in ``env``: (exit code, parsed JSON stdout or None, stderr)."""
    done = subprocess.run([sys.executable, "-m", "farm", *args], env=env, capture_output=True, text=True, cwd=REPO)
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        out = None
    return done.returncode, out, done.stderr
