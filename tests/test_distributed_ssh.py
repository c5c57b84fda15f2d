"""The configuration a real farm runs: `farm worker` processes (Celery over a real redis-server)
serving SSH hosts (a real sshd each, in its own network namespace). The probe is the replaying
stand-in (tests/standin.py: a recorded real dump after a delay), run by the real agent on the
host, so that a stop or a cancel can land mid-probe."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import farm
from tests.standin import QEMU, standin_builddir
from tests.test_faults import probing

pytestmark = pytest.mark.slow


def ssh_inventory(ssh_hosts, tmp_path: Path, count: int, delay: float) -> tuple[list, str]:
    standin = standin_builddir(Path(ssh_hosts.cache_dir()) / "standin", delay=delay)
    hosts = ssh_hosts.create(count)
    toolchain = {"libvirt": f"builddir:{standin}", "qemu": "system"}
    entries = [h.entry(toolchain={**toolchain, "cache_dir": ssh_hosts.cache_dir()}) for h in hosts]
    return hosts, str(ssh_hosts.inventory(tmp_path / "inventory.yaml", entries))


def start_probe(env: dict, inventory: str, broker: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "farm", "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", inventory,
         "--broker", broker, "--json", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def finish(cli: subprocess.Popen, timeout: float = 180) -> tuple[int, dict | None, str]:
    """The CLI's (exit code, JSON, stderr); a CLI still running after ``timeout`` is killed and the test fails."""
    try:
        out, err = cli.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(cli.pid, signal.SIGKILL)
        out, err = cli.communicate()
        pytest.fail(f"farm probe still running after {timeout} s: {err[-2000:]}")
    try:
        return cli.returncode, json.loads(out), err
    except json.JSONDecodeError:
        return cli.returncode, None, err


def wait_probing(host, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not probing(host.namespace):
        assert time.monotonic() < deadline, f"the stand-in probe never started on {host.name}"
        time.sleep(0.1)


def test_a_worker_serving_an_ssh_host_runs_the_job_and_relays_the_agents_progress(
        env, redis_server, workers, ssh_hosts, tmp_path):
    (host,), inventory = ssh_inventory(ssh_hosts, tmp_path, 1, delay=1)
    worker = workers.start(host.name, inventory)
    cli = start_probe(env, inventory, redis_server.url)
    code, out, err = finish(cli)  # the bug this guards against: a job that never ends
    (job,) = out["jobs"]
    assert (code, job["status"], job["verdict"], job["host"]) == (0, "ok", "real", host.name), err
    # the agent's own progress lines, read by the SSH connection's reader thread, reach the CLI
    assert f"farm: run-1-x86_64: {host.name}: probe: " in err, err
    log = Path(workers.logdir / "worker-0.log").read_text()
    assert "Traceback" not in log and "task_id must not be empty" not in log, log[-3000:]
    code, shown, _ = farm(env, "runs", "show", "1", "--json")
    assert shown["status"] == "done" and shown["jobs"][0]["host"] == host.name
    assert any(" probe: " in line for line in shown["jobs"][0]["log"]), shown["jobs"][0]["log"]
    assert worker.poll() is None


def test_an_ssh_host_that_is_down_fails_its_job_naming_the_host(env, redis_server, workers, ssh_hosts, tmp_path):
    (host,), inventory = ssh_inventory(ssh_hosts, tmp_path, 1, delay=1)
    workers.start(host.name, inventory)
    host.stop()
    cli = start_probe(env, inventory, redis_server.url, "--quiet")
    code, out, err = finish(cli)
    (job,) = out["jobs"]
    assert (code, job["status"]) == (1, "failed"), err
    assert host.name in job["reasons"][0] and host.address in job["reasons"][0], job["reasons"]
    assert err == ""  # --quiet: nothing on stderr but errors
