"""A run's life as the README tells it, on the embedded default with `local` hosts: usage errors
refused before a run exists, one retry rule, quiet meaning quiet, a run's driver known to the
ledger (interrupted when it dies, resume refused while it lives), Ctrl-C and `farm runs cancel`
stopping the probes. The probe is the replaying stand-in (tests/standin.py) run by the real agent."""

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
from tests.test_faults import local_inventory


def failing_build(directory: Path) -> Path:
    probe = directory / "tests" / "qemucapsprobe"
    probe.parent.mkdir(parents=True)
    probe.write_text("#!/bin/sh\necho 'error: cannot start QEMU: boom' >&2\nexit 3\n")
    probe.chmod(0o755)
    return directory


def start_probe(env: dict, inventory: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "farm", "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory),
         "--json", *args],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )


def standin_running(standin: Path) -> bool:
    """Is a stand-in probe of this build dir running (as a process of this machine)?"""
    done = subprocess.run(["pgrep", "-f", str(standin / "tests" / "qemucapsprobe")], capture_output=True)
    return done.returncode == 0


def wait_until(predicate, timeout: float = 30, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout} s"
        time.sleep(0.1)


def runs_shown(env: dict, run: int) -> tuple[str, str]:
    """(status in `farm runs list`, status in `farm runs show`)."""
    _, listed, _ = farm(env, "runs", "list", "--json")
    _, shown, _ = farm(env, "runs", "show", str(run), "--json")
    return next(r["status"] for r in listed if r["run"] == run), shown["status"]


@pytest.mark.parametrize("timeout", ["0", "-5", "nan", "abc"])
def test_a_probe_timeout_that_is_not_positive_is_refused_before_any_run_exists(env, tmp_path, timeout):
    code, _, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", f"--timeout={timeout}")
    assert code == 2 and "--timeout" in err, err
    code, runs, _ = farm(env, "runs", "list", "--json")
    assert runs == []
    code, status, _ = farm(env, "status", "--json")
    assert all(h["failures"] == 0 and h["last_failure"] is None for h in status["hosts"])


def test_a_visibility_timeout_below_the_job_time_limit_is_refused_before_any_run_exists(env):
    env = {**env, "FARM_VISIBILITY_TIMEOUT": "100", "FARM_JOB_TIME_LIMIT": "3600"}
    code, _, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--broker", "redis://127.0.0.1:1/0")
    assert code == 2 and "FARM_VISIBILITY_TIMEOUT (100) must be above FARM_JOB_TIME_LIMIT (3600)" in err, err
    code, runs, _ = farm(env, "runs", "list", "--json")
    assert runs == []


@pytest.mark.parametrize("retries, tried", [("0", 1), ("1", 2), ("3", 3)])
def test_max_retries_bounds_the_hosts_a_job_is_tried_on_in_the_embedded_mode_too(env, tmp_path, retries, tried):
    inventory = local_inventory(tmp_path / "inventory.yaml", failing_build(tmp_path / "build"),
                                ["failing-1", "failing-2", "failing-3"])
    code, out, err = farm({**env, "FARM_MAX_RETRIES": retries}, "probe", "--qemu", QEMU, "--arch", "x86_64",
                          "--inventory", str(inventory), "--json")
    (job,) = out["jobs"]
    assert (code, job["status"]) == (1, "failed"), err
    code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
    assert sum(h["failures"] for h in status["hosts"]) == tried
    if tried > 1:
        assert job["reasons"][0] == f"all {tried} hosts of x86_64 failed"
    else:
        assert job["reasons"][0] == "qemucapsprobe failed (exit 3): error: cannot start QEMU: boom"


def test_quiet_means_nothing_on_stderr_but_errors(env, tmp_path):
    inventory = local_inventory(tmp_path / "inventory.yaml", standin_builddir(tmp_path / "standin", 0), ["x86-a"])
    code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory),
                          "--json", "--quiet")
    assert (code, out["jobs"][0]["status"], err) == (0, "ok", "")
    code, out, err = farm(env, "runs", "resume", str(out["run"]), "--json", "--quiet")
    assert (code, err) == (0, "")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_stops_the_probes_and_names_the_resume_command_which_finishes_the_run(
        env, tmp_path, sig):
    standin = standin_builddir(tmp_path / "standin", delay=30)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["x86-a"])
    cli = start_probe(env, inventory)
    wait_until(lambda: standin_running(standin), what="the stand-in probe starting")
    os.kill(cli.pid, sig)
    out, err = cli.communicate(timeout=30)
    assert cli.returncode == 130
    assert err.strip().splitlines()[-1] == (
        "farm: interrupted: run 1's unfinished jobs were stopped; run them again with: farm runs resume 1")
    assert not standin_running(standin), "the probe outlived farm probe"
    assert runs_shown(env, 1) == ("incomplete", "incomplete")
    code, out, err = farm(env, "runs", "resume", "1", "--json", "--quiet", "--inventory", str(inventory))
    assert code == 0 and out["jobs"][0]["status"] == "ok", err


def test_a_run_whose_driver_was_killed_is_interrupted_in_list_and_show_and_resumable(env, tmp_path):
    standin = standin_builddir(tmp_path / "standin", delay=30)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["x86-a"])
    cli = start_probe(env, inventory)
    wait_until(lambda: standin_running(standin), what="the stand-in probe starting")
    assert runs_shown(env, 1) == ("running", "running")
    code, _, err = farm(env, "runs", "resume", "1", "--inventory", str(inventory))
    assert code == 2 and f"run 1 is still driven by process {cli.pid}" in err, err
    os.killpg(cli.pid, signal.SIGKILL)
    cli.wait()
    assert runs_shown(env, 1) == ("interrupted", "interrupted")
    wait_until(lambda: not standin_running(standin), timeout=20, what="the probe stopping with its driver")
    code, out, err = farm(env, "runs", "resume", "1", "--json", "--quiet", "--inventory", str(inventory))
    assert code == 0 and out["jobs"][0]["status"] == "ok", err


def test_runs_cancel_stops_a_running_job_of_an_embedded_run_driven_by_another_process(env, tmp_path):
    standin = standin_builddir(tmp_path / "standin", delay=60)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["x86-a"])
    cli = start_probe(env, inventory, "--quiet")
    wait_until(lambda: standin_running(standin), what="the stand-in probe starting")
    code, out, err = farm(env, "runs", "cancel", "1", "x86_64", "--json")
    assert code == 0 and [j["status"] for j in out["cancelled"]] == ["cancelled"], err
    out, err = cli.communicate(timeout=30)
    (job,) = json.loads(out)["jobs"]
    assert (cli.returncode, job["status"], job["reasons"]) == (1, "cancelled", ["cancelled (farm runs cancel)"])
    assert not standin_running(standin), "the probe outlived its cancelled job"
    assert runs_shown(env, 1) == ("done", "done")
    code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
    assert status["hosts"][0]["failures"] == 0  # a cancelled job says nothing of its host
    code, out, err = farm(env, "runs", "cancel", "1", "--json")  # nothing left to cancel: a no-op
    assert (code, out) == (0, {"run": 1, "cancelled": []}), err


def test_runs_cancel_of_an_unknown_job_names_the_runs_jobs(env, tmp_path):
    inventory = local_inventory(tmp_path / "inventory.yaml", standin_builddir(tmp_path / "standin", 0), ["x86-a"])
    farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory), "--quiet")
    code, _, err = farm(env, "runs", "cancel", "1", "s390x")
    assert code == 2 and err.strip() == "farm: run 1 has no job s390x (its jobs: x86_64)"
    code, _, err = farm(env, "runs", "cancel", "7")
    assert code == 2 and "no run 7" in err


def test_two_farm_probes_of_one_state_dir_share_a_hosts_slots(env, tmp_path):
    """max_jobs: 1 holds across processes: the second probe's job waits for the first's."""
    from tests.standin import RECORDED

    build = tmp_path / "build"
    probe = build / "tests" / "qemucapsprobe"
    probe.parent.mkdir(parents=True)
    spans = tmp_path / "spans"
    probe.write_text(f"#!/bin/sh\necho start $(date +%s.%N) >> {spans}\nsleep 2\n"
                     f"echo end $(date +%s.%N) >> {spans}\nexec cat {RECORDED}\n")
    probe.chmod(0o755)
    inventory = local_inventory(tmp_path / "inventory.yaml", build, ["x86-a"])
    first, second = start_probe(env, inventory, "--quiet"), start_probe(env, inventory, "--quiet")
    for cli in (first, second):
        out, err = cli.communicate(timeout=120)
        assert cli.returncode == 0 and json.loads(out)["jobs"][0]["status"] == "ok", err
    stamps = [(word, float(t)) for word, t in (line.split() for line in spans.read_text().splitlines())]
    assert [w for w, _ in sorted(stamps, key=lambda s: s[1])] == ["start", "end", "start", "end"], stamps


def test_kill_9_of_farm_probe_leaves_no_local_agent_or_probe_running(env, tmp_path):
    standin = standin_builddir(tmp_path / "standin", delay=60)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["x86-a"])
    cli = start_probe(env, inventory, "--quiet")
    wait_until(lambda: standin_running(standin), what="the stand-in probe starting")
    os.kill(cli.pid, signal.SIGKILL)
    cli.wait()
    wait_until(lambda: not standin_running(standin), timeout=20, what="the probe stopping with farm probe")
    wait_until(lambda: not agent_servers_of(env), timeout=20, what="the agent server stopping with farm probe")


def agent_servers_of(env: dict) -> list[int]:
    """The pids of agent servers started with this test's state dir in their environment."""
    mine = f"FARM_STATE_DIR={env['FARM_STATE_DIR']}".encode()
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if b"serve" in cmdline and any(c.endswith(b"farm_agent.py") for c in cmdline) \
                    and mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                found.append(int(pid))
        except OSError:
            continue
    return found
