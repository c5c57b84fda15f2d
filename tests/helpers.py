"""Helpers shared by the tests: running the farm CLI for real, and what a test needs of the machine."""

from __future__ import annotations

import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
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


@contextlib.contextmanager
def served_dashboard(env: dict, log: Path, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`farm dashboard ARGS` serving for real on a free port: (its URL, the process), stopped after."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with open(log, "w") as fh:
        process = subprocess.Popen([sys.executable, "-m", "farm", "dashboard", "--port", str(port), *args],
                                   env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/api/runs", timeout=2).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"farm dashboard did not answer on {url}: {log.read_text()}")
                time.sleep(0.1)
        yield url, process
    finally:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
