"""The ssh transport against real OpenSSH servers, each host in its own network namespace
(tests/netns.py): pinned host keys, quoting, timeouts, reconnects.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import pwd
import subprocess
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from farm.hosts import HostError
from farm.hosts.agent import AGENT_FILE, Agent
from farm.hosts.ssh import SSHTransport
from farm.inventory import Host
from tests.conftest import CACHE
from tests.netns import FARM_USER, LIBVIRT, native_arch, ssh_hosts  # noqa: F401 (the fixture)

REPO = Path(__file__).resolve().parents[1]
needs_x86 = pytest.mark.skipif(platform.machine() != "x86_64", reason="expects an x86_64 machine (Debian's QEMU 7.2)")


def kvm_present() -> bool:
    return os.path.exists("/dev/kvm")


needs_kvm = pytest.mark.skipif(not kvm_present(), reason="needs /dev/kvm")


@pytest.fixture
def env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_STATE_DIR=str(tmp_path / "state"), FARM_CACHE_DIR=str(CACHE))
    return env


@pytest.fixture(scope="session")
def probe_build() -> None:
    """libvirt 11.3.0's qemucapsprobe published in the machine's cache (built by the local agent
    the first time, as tests/test_probe.py does); the SSH hosts' caches link to it read-only."""
    done = subprocess.run(
        [sys.executable, str(AGENT_FILE), "toolchain", "libvirt", "--source", LIBVIRT, "--cache", str(CACHE / "agent")],
        capture_output=True, text=True, timeout=3600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


def farm(env: dict, *args: str) -> tuple[int, dict | list | None, str]:
    done = subprocess.run([sys.executable, "-m", "farm", *args], env=env, capture_output=True, text=True, cwd=REPO)
    try:
        out = json.loads(done.stdout)
    except json.JSONDecodeError:
        out = None
    return done.returncode, out, done.stderr


def host_of(test_host, **overrides) -> Host:
    return Host.model_validate(test_host.entry(**overrides))


def remote_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def fingerprint(public_key_line: str, tmp_path: Path) -> str:
    pub = tmp_path / f"key-{uuid.uuid4().hex[:6]}.pub"
    pub.write_text(public_key_line + "\n")
    return subprocess.run(["ssh-keygen", "-lf", str(pub)], capture_output=True, text=True, check=True).stdout.split()[1]


# -- the transport ----------------------------------------------------------------------------


def test_commands_are_argv_never_shell_strings_and_run_as_farm(ssh_hosts, tmp_path):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    pwned = f"/tmp/farm-pwned-{uuid.uuid4().hex[:8]}"
    args = [f"$(touch {pwned})", f"`touch {pwned}`", f"; touch {pwned}", "a  b", "'\"", "*", "\\n", ""]
    done = t.run(["printf", "%s\\n", *args])
    assert done.returncode == 0 and done.stdout.split("\n")[:-1] == args
    assert not os.path.exists(pwned)
    assert t.run(["id", "-un"]).stdout.strip() == FARM_USER
    assert t.run(["sh", "-c", "exit 3"]).returncode == 3


def test_large_stdout_and_stderr_are_drained_while_running(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    script = (
        "import sys\n"
        "for i in range(20000):\n"
        "    sys.stdout.write('x' * 500 + '\\n')\n"
        "    sys.stderr.write('progress: line %d\\n' % i)\n"
    )
    lines: list[str] = []
    started = time.monotonic()
    done = t.run(["python3", "-c", script], timeout=60, on_line=lines.append)
    assert done.returncode == 0 and not done.timed_out
    assert len(done.stdout) == 20000 * 501  # 10 MB, none lost
    assert lines == [f"progress: line {i}" for i in range(20000)]  # streamed, in order, whole lines
    assert done.stderr.count("\n") == 20000
    assert time.monotonic() - started < 30


def test_a_command_that_outlives_its_timeout_is_cut_off(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    started = time.monotonic()
    done = t.run(["sleep", "30"], timeout=1)
    assert done.timed_out and done.returncode == -1
    assert time.monotonic() - started < 5
    assert t.run(["true"], timeout=10).returncode == 0  # the connection is still usable


def test_one_connection_reused_and_reopened_once_after_a_drop(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    for _ in range(3):
        assert t.run(["true"]).returncode == 0
    assert h.log.count("Accepted publickey") == 1  # one connection for three commands
    h.stop()  # kills the connection with the server
    h.start()
    assert t.run(["true"]).returncode == 0  # reconnected transparently
    assert h.log.count("Accepted publickey") == 2


def test_threads_share_the_connection(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    with ThreadPoolExecutor(8) as pool:
        done = list(pool.map(lambda i: t.run(["sh", "-c", f"sleep 0.3; echo {i}"]), range(16)))
    assert [d.stdout for d in done] == [f"{i}\n" for i in range(16)]
    assert h.log.count("Accepted publickey") == 1


def test_a_connection_lost_while_a_command_runs_is_a_host_error(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    assert t.run(["true"]).returncode == 0
    threading.Timer(1, h.stop).start()
    started = time.monotonic()
    with pytest.raises(HostError, match=f"host '{h.name}' .*: connection lost while running sleep"):
        t.run(["sleep", "30"])
    assert time.monotonic() - started < 10


def test_an_unreachable_host_is_a_host_error_naming_it(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h), connect_timeout=2)
    h.stop()
    with pytest.raises(HostError) as refused:
        t.run(["true"])
    assert f"host '{h.name}' (farm@{h.address})" in str(refused.value)
    assert "cannot connect: Connection refused" in str(refused.value)
    h.start()
    h.cut()
    started = time.monotonic()
    with pytest.raises(HostError) as cut:
        t.run(["true"])
    assert time.monotonic() - started < 10
    assert f"host '{h.name}' (farm@{h.address}): cannot connect" in str(cut.value)
    h.restore()
    assert t.run(["true"]).returncode == 0


def test_a_host_presenting_another_key_is_refused_before_anything_runs(ssh_hosts, tmp_path):
    a, b = ssh_hosts.create(2)
    t = SSHTransport(host_of(a, host_key=b.host_key))  # a's address, b's key pinned
    with pytest.raises(HostError) as refused:
        t.run(["touch", "/tmp/never"])
    message = str(refused.value)
    assert f"host '{a.name}' (farm@{a.address})" in message and "host key mismatch" in message
    assert fingerprint(a.host_key, tmp_path) in message and fingerprint(b.host_key, tmp_path) in message
    assert "Accepted publickey" not in a.log  # refused before authenticating

    known = tmp_path / "known_hosts"
    known.write_text(f"{a.address} {b.host_key}\n")
    entry = a.entry()
    del entry["host_key"]
    t = SSHTransport(Host.model_validate({**entry, "known_hosts": str(known)}))
    with pytest.raises(HostError, match="host key mismatch"):
        t.run(["true"])
    known.write_text(f"{a.address} {a.host_key}\n")
    assert SSHTransport(Host.model_validate({**entry, "known_hosts": str(known)})).run(["true"]).returncode == 0


def test_put_get_and_scratch(ssh_hosts, tmp_path):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    data = os.urandom(3 << 20)
    (tmp_path / "up").write_bytes(data)
    with t.scratch() as scratch:
        owner = t.run(["stat", "-c", "%U %a", scratch]).stdout.split()
        assert owner == [FARM_USER, "700"]
        t.put(tmp_path / "up", f"{scratch}/file")
        t.get(f"{scratch}/file", tmp_path / "down")
        assert (tmp_path / "down").read_bytes() == data
        with pytest.raises(HostError, match="cannot download"):
            t.get(f"{scratch}/missing", tmp_path / "missing")
    assert not os.path.exists(scratch)
