"""Faults of a real farm, made for real: an SSH host's sshd killed mid-probe, a Celery worker
SIGKILLed mid-job, Redis restarted mid-run. The probe is the replaying stand-in
(tests/standin.py: a recorded real dump after a delay) so that a fault can land mid-probe.
"""

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

pytestmark = pytest.mark.slow


def start_probe(env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "farm", "probe", "--qemu", QEMU, "--arch", "x86_64", "--json", "--quiet", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def probing(namespace: str) -> bool:
    """Is the stand-in probe running in this network namespace?"""
    pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True, text=True).stdout.split()
    for pid in pids:
        try:
            if b"qemucapsprobe" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return True
        except OSError:
            continue
    return False


def local_inventory(path: Path, standin: Path, names: list[str]) -> Path:
    hosts = "".join(
        f"  - name: {n}\n    transport: local\n    arch: x86_64\n"
        f"    toolchain:\n      libvirt: builddir:{standin}\n      qemu: system\n"
        for n in names
    )
    path.write_text("hosts:\n" + hosts)
    return path


def test_sshd_killed_mid_probe_the_job_completes_on_another_host(env, ssh_hosts, tmp_path):
    standin = standin_builddir(Path(ssh_hosts.cache_dir()) / "standin", delay=6)
    first, second = ssh_hosts.create(2)
    toolchain = {"libvirt": f"builddir:{standin}", "qemu": "system", "cache_dir": ssh_hosts.cache_dir()}
    inventory = ssh_hosts.inventory(
        tmp_path / "inventory.yaml", [first.entry(toolchain=toolchain), second.entry(toolchain=toolchain)]
    )
    cli = start_probe(env, "--inventory", str(inventory))
    deadline = time.monotonic() + 30
    while not probing(first.namespace) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert probing(first.namespace), "the stand-in never started on the first host"
    first.stop()  # sshd and everything it started, killed
    out, err = cli.communicate(timeout=120)
    (job,) = json.loads(out)["jobs"]
    assert (job["status"], job["verdict"], job["host"]) == ("ok", "real", second.name), (job, err[-2000:])


def test_a_worker_killed_mid_job_the_job_is_redelivered_and_kept_once(env, redis_server, workers, tmp_path):
    env.update(FARM_JOB_TIME_LIMIT="60", FARM_VISIBILITY_TIMEOUT="70")
    standin = standin_builddir(tmp_path / "standin", delay=5)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["standin-1"])
    first = workers.start("standin-1", str(inventory))
    cli = start_probe(env, "--inventory", str(inventory), "--broker", redis_server.url)
    time.sleep(3)  # the job is running on the first worker
    workers.kill(first)
    workers.start("standin-1", str(inventory))  # a new worker for the same host
    out, err = cli.communicate(timeout=240)  # redelivered after the visibility timeout
    (job,) = json.loads(out)["jobs"]
    assert (job["status"], job["verdict"]) == ("ok", "real"), (job, err[-2000:])
    artifacts = list((Path(env["FARM_STATE_DIR"]) / "artifacts").rglob("*.replies"))
    assert [a.name for a in artifacts] == ["caps_9.2.0_x86_64.replies"]
    code, shown, _ = farm(env, "runs", "show", "1", "--json")
    assert [j["status"] for j in shown["jobs"]] == ["ok"]


def test_redis_restarted_mid_run_the_run_completes(env, redis_server, workers, tmp_path):
    standin = standin_builddir(tmp_path / "standin", delay=6)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["standin-1"])
    workers.start("standin-1", str(inventory))
    cli = start_probe(env, "--inventory", str(inventory), "--broker", redis_server.url)
    time.sleep(3)
    redis_server.restart()  # append-only file on: the queues and results survive
    try:
        out, err = cli.communicate(timeout=240)
    except subprocess.TimeoutExpired:
        os.killpg(cli.pid, signal.SIGKILL)
        out, err = cli.communicate()
    if cli.returncode in (0, 1):
        assert out, err[-3000:]
        (job,) = json.loads(out)["jobs"]
    else:  # the coordinator gave up: resume collects the result
        assert "farm runs resume" in err
        code, resumed, err = farm(env, "runs", "resume", "1", "--broker", redis_server.url, "--json")
        (job,) = resumed["jobs"]
    assert (job["status"], job["verdict"]) == ("ok", "real"), (job, err[-2000:])
    code, shown, _ = farm(env, "runs", "show", "1", "--json")
    assert shown["status"] == "done"


def test_a_failing_probe_is_a_failed_job_with_its_stderr(env, tmp_path):
    """A qemucapsprobe that fails (a stand-in that prints an error and exits 3) ends the job
    as failed, with the probe's own words in the reasons and the log, and no artifact."""
    build = tmp_path / "build"
    probe = build / "tests" / "qemucapsprobe"
    probe.parent.mkdir(parents=True)
    probe.write_text("#!/bin/sh\necho 'error: cannot start QEMU: boom' >&2\nexit 3\n")
    probe.chmod(0o755)
    inventory = local_inventory(tmp_path / "inventory.yaml", build, ["failing-1"])
    code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory), "--json")
    (job,) = out["jobs"]
    assert (code, job["status"], job["artifact"]) == (1, "failed", None), err
    assert job["reasons"][0] == "qemucapsprobe failed (exit 3): error: cannot start QEMU: boom"
    code, shown, _ = farm(env, "runs", "show", str(out["run"]), "--json")
    assert "qemucapsprobe: error: cannot start QEMU: boom" in shown["jobs"][0]["log"]
