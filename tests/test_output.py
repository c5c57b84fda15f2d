"""What farm prints: `ansible-inventory --json`, tables as wide as COLUMNS says, a host of another arch
named as such, a misconfigured SSH host shown as reached, and a worker's log with one record per
exception."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from tests.helpers import REPO, farm


def run(env: dict, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "farm", *args], env=env, capture_output=True, text=True, cwd=REPO)


def test_ansible_inventory_takes_json_like_every_command(env):
    for args in (("--json",), ("--json", "--list"), ("--list",)):
        code, out, err = farm(env, "ansible-inventory", *args)
        assert code == 0, (args, err)
        assert out["agents"]["hosts"] == ["local-x86_64", "local-aarch64", "local-ppc64", "local-s390x"]
        assert "local-x86_64" in out["_meta"]["hostvars"]
    code, out, err = farm(env, "ansible-inventory", "--json", "--host", "local-s390x")
    assert code == 0 and out["farm_arch"] == {"__ansible_unsafe": "s390x"}, err  # never templated by Ansible
    code, _, err = farm(env, "ansible-inventory", "--list", "--host", "local-s390x")
    assert code == 2 and "not allowed with" in err


def wide_inventory(tmp_path: Path) -> Path:
    path = tmp_path / "inventory.yaml"
    tags = ", ".join(f"label-number-{n}" for n in range(12))  # a tags column of ~200 characters
    path.write_text(f"hosts:\n  - name: wide\n    transport: local\n    arch: x86_64\n    tags: [{tags}]\n")
    return path


def widths(text: str) -> list[int]:
    return [len(line) for line in text.splitlines()]


def test_tables_honour_columns_and_are_200_wide_only_when_nothing_says_otherwise(env, tmp_path):
    inventory = str(wide_inventory(tmp_path))
    env = {k: v for k, v in env.items() if k != "COLUMNS"}
    piped = run(env, "hosts", "list", "--inventory", inventory)
    assert piped.returncode == 0 and max(widths(piped.stdout)) == 200, piped.stdout
    narrow = run({**env, "COLUMNS": "90"}, "hosts", "list", "--inventory", inventory)
    assert narrow.returncode == 0 and max(widths(narrow.stdout)) == 90, narrow.stdout
    for bad in ("abc", "0", "-5", "99999999999"):  # not a usable width: as if unset
        out = run({**env, "COLUMNS": bad}, "hosts", "list", "--inventory", inventory)
        assert out.returncode == 0 and max(widths(out.stdout)) == 200, bad


def test_a_named_host_of_another_arch_is_said_to_be_of_its_arch(env):
    code, _, err = farm(env, "probe", "--qemu", "9.2.0", "--hosts", "local-s390x", "--arch", "x86_64")
    assert code == 2
    assert err.strip().endswith("--hosts cannot probe x86_64: host local-s390x is s390x, not x86_64")
    assert "local-aarch64" not in err  # not a list of every host
    code, _, err = farm(env, "probe", "--qemu", "9.2.0", "--hosts", "local-x86_64", "--variant", "amdsev")
    assert code == 2 and "host local-x86_64 has no variant amdsev" in err
    code, runs, _ = farm(env, "runs", "list", "--json")
    assert runs == []  # refused before a run was created


# A thread of `farm worker` that dies of an exception: the injected crash stands in for any bug of a
# thread (farm has none to rely on); the worker, Celery's redirect of stderr and its log are real.
CRASHING_WORKER = """
import sys, threading
from celery.signals import worker_ready
from farm.cli import main

def crash():
    raise ValueError("boom in a thread")

@worker_ready.connect
def start_crasher(**_):
    threading.Thread(target=crash, name="crasher").start()

sys.exit(main(sys.argv[1:]))
"""


def test_the_worker_logs_an_exception_of_a_thread_as_one_record(env, redis_server, tmp_path):
    log = tmp_path / "worker.log"
    with open(log, "w") as fh:
        proc = subprocess.Popen(
            [sys.executable, "-c", CRASHING_WORKER, "worker", "--hosts", "local-x86_64", "--broker", redis_server.url],
            env=env, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while "boom in a thread" not in log.read_text() or "ValueError: boom" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)
    text = log.read_text()
    records = [line for line in text.splitlines() if re.match(r"\[\d{4}-\d\d-\d\d [\d:,]+: ", line)]
    crash = [line for line in records if "crasher" in line]
    assert len(crash) == 1 and crash[0].endswith("ERROR/MainProcess] exception in thread crasher: boom in a thread")
    assert text.count("Traceback (most recent call last)") == 1
    block = text[text.index(crash[0]):].splitlines()[1:9]
    assert block[0] == "Traceback (most recent call last):" and any("in crash" in line for line in block), block
    # nothing of it written to the log piece by piece (a record per write of Python's default hook)
    assert not [line for line in records if re.search(r"WARNING/MainProcess\] *(\^+|Traceback.*|:)? *$", line)]


def test_a_host_whose_cache_dir_is_not_writable_is_reached_and_misconfigured_not_unreachable(
        ssh_hosts, env, tmp_path):
    (h,) = ssh_hosts.create(1)
    locked = ssh_hosts.base / "root-only"  # root's: the farm user cannot create its cache in it
    locked.mkdir(mode=0o755)
    inventory = ssh_hosts.inventory(tmp_path / "inventory.yaml",
                                    [h.entry(toolchain={"cache_dir": str(locked / "cache")})])
    for _ in range(4):  # more than FARM_QUARANTINE_AFTER (3)
        code, out, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
        assert code == 1, err
        (entry,) = out
        assert (entry["ok"], entry["error_kind"]) == (False, "config")
        assert "cache dir" in entry["error"] and "Permission denied" in entry["error"]
        assert (entry["health"]["failures"], entry["health"]["quarantined"]) == (0, False)
    text = run({**env, "COLUMNS": "300"}, "hosts", "check", "--inventory", str(inventory))
    assert text.returncode == 1
    row = next(line for line in text.stdout.splitlines() if h.name in line)
    assert "reached" in row and "configuration error: " in row and "unreachable" not in row
    code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
    assert status["hosts"][0]["state"] == "misconfigured"

    # given a cache dir of its own: the host is seen working, its failure is past
    ssh_hosts.inventory(inventory, [h.entry(toolchain={"cache_dir": ssh_hosts.cache_dir()})])
    code, out, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 0, err
    code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
    (host,) = status["hosts"]
    assert (host["state"], host["failing_now"], host["last_failure_kind"]) == ("ok", False, "config")


def test_a_host_of_another_arch_is_a_configuration_error_said_below_the_table(ssh_hosts, env, tmp_path):
    from tests.netns import native_arch

    (h,) = ssh_hosts.create(1)
    claimed = "aarch64" if native_arch() != "aarch64" else "x86_64"
    inventory = ssh_hosts.inventory(tmp_path / "inventory.yaml",
                                    [h.entry(arch=claimed, toolchain={"cache_dir": ssh_hosts.cache_dir()})])
    code, out, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 1, err
    (entry,) = out
    assert (entry["error_kind"], entry["health"]["failures"], entry["health"]["state"]) == ("config", 0, "misconfigured")
    text = run({**env, "COLUMNS": "300"}, "hosts", "check", "--inventory", str(inventory))
    assert text.returncode == 1
    assert f"{h.name}: configuration error: host '{h.name}' is " in text.stdout
    assert f"the inventory says {claimed}" in text.stdout
