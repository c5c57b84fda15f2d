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


def test_runs_cancel_stops_the_job_on_its_ssh_host_and_the_worker_serves_on(
        env, redis_server, workers, ssh_hosts, tmp_path):
    (host,), inventory = ssh_inventory(ssh_hosts, tmp_path, 1, delay=60)
    worker = workers.start(host.name, inventory)
    cli = start_probe(env, inventory, redis_server.url, "--quiet")
    wait_probing(host)
    code, out, err = farm(env, "runs", "cancel", "1", "--broker", redis_server.url, "--json")
    assert code == 0 and [j["status"] for j in out["cancelled"]] == ["cancelled"], err
    code, out, err = finish(cli, timeout=30)
    (job,) = out["jobs"]
    assert (code, job["status"], job["reasons"]) == (1, "cancelled", ["cancelled (farm runs cancel)"]), err
    deadline = time.monotonic() + 20
    while probing(host.namespace) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not probing(host.namespace), "the probe outlived its cancelled job"
    assert worker.poll() is None
    code, status, _ = farm(env, "status", "--inventory", inventory, "--json")
    assert status["hosts"][0]["failures"] == 0


def test_a_stopped_worker_hands_its_job_back_after_the_grace_and_another_worker_finishes_it(
        env, redis_server, workers, ssh_hosts, tmp_path):
    (host,), inventory = ssh_inventory(ssh_hosts, tmp_path, 1, delay=8)
    workers.env = {**env, "FARM_WORKER_GRACE": "1"}
    first = workers.start(host.name, inventory)
    cli = start_probe(env, inventory, redis_server.url, "--quiet")
    wait_probing(host)
    os.killpg(first.pid, signal.SIGTERM)
    assert first.wait(30) == 0  # stopped within the grace and the hand-back, not after the probe
    log = (workers.logdir / "worker-0.log").read_text()
    assert "run-1-x86_64: handed back to the queue" in log, log[-3000:]
    assert "succeeded" not in log
    workers.start(host.name, inventory)
    code, out, err = finish(cli)
    (job,) = out["jobs"]
    assert (code, job["status"], job["host"]) == (0, "ok", host.name), err
    code, shown, _ = farm(env, "runs", "show", "1", "--json")
    assert shown["status"] == "done" and len(shown["jobs"]) == 1


def test_a_stopped_worker_finishes_a_job_that_ends_within_the_grace(env, redis_server, workers, ssh_hosts, tmp_path):
    (host,), inventory = ssh_inventory(ssh_hosts, tmp_path, 1, delay=3)
    workers.env = {**env, "FARM_WORKER_GRACE": "60"}
    worker = workers.start(host.name, inventory)
    cli = start_probe(env, inventory, redis_server.url, "--quiet")
    wait_probing(host)
    os.killpg(worker.pid, signal.SIGTERM)
    code, out, err = finish(cli)
    assert (code, out["jobs"][0]["status"]) == (0, "ok"), err
    assert worker.wait(30) == 0
    assert "run-1-x86_64: handed back to the queue" not in (workers.logdir / "worker-0.log").read_text()


def test_resume_with_no_live_worker_fails_fast_naming_the_queue(env, redis_server, workers, ssh_hosts, tmp_path):
    (host,), inventory = ssh_inventory(ssh_hosts, tmp_path, 1, delay=60)
    worker = workers.start(host.name, inventory)
    cli = start_probe(env, inventory, redis_server.url, "--quiet")
    wait_probing(host)
    os.killpg(cli.pid, signal.SIGKILL)
    workers.kill(worker)
    started = time.monotonic()
    code, out, err = farm(env, "runs", "resume", "1", "--broker", redis_server.url, "--json", "--quiet")
    assert time.monotonic() - started < 60
    assert out is not None, err
    (job,) = out["jobs"]
    assert (code, job["status"]) == (1, "failed"), err
    assert "no live worker serves a healthy host of arch.x86_64" in job["reasons"][0]


def test_ctrl_c_of_a_distributed_probe_says_the_workers_go_on_and_resume_collects(
        env, redis_server, workers, ssh_hosts, tmp_path):
    (host,), inventory = ssh_inventory(ssh_hosts, tmp_path, 1, delay=4)
    workers.start(host.name, inventory)
    cli = start_probe(env, inventory, redis_server.url, "--quiet")
    wait_probing(host)
    os.kill(cli.pid, signal.SIGINT)
    code, _, err = finish(cli, timeout=30)
    assert code == 130 and err.strip() == (
        "farm: interrupted: the workers go on with run 1's jobs; collect their results with: farm runs resume 1")
    code, out, err = farm(env, "runs", "resume", "1", "--broker", redis_server.url, "--json", "--quiet")
    assert (code, out["jobs"][0]["status"]) == (0, "ok"), err
