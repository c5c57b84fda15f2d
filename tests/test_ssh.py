"""The ssh transport against real OpenSSH servers, each host in its own network namespace
(tests/netns.py): pinned host keys, quoting, timeouts, reconnects, the agent installed over
SFTP, and `farm hosts check` / `farm probe` over SSH with the real qemucapsprobe.
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
from tests.helpers import farm, needs_kvm, needs_x86
from tests.netns import FARM_USER, LIBVIRT, native_arch
from tests.paths import CACHE


@pytest.fixture(scope="session")
def probe_build() -> None:
    """libvirt 11.3.0's qemucapsprobe published in the machine's cache (built by the local agent
    the first time, as tests/test_probe.py does); the SSH hosts' caches link to it read-only."""
    done = subprocess.run(
        [sys.executable, str(AGENT_FILE), "toolchain", "libvirt", "--source", LIBVIRT, "--cache", str(CACHE / "agent")],
        capture_output=True, text=True, timeout=3600,
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]


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


def test_put_and_get_over_sftp(ssh_hosts, tmp_path):
    (h,) = ssh_hosts.create(1)
    t = SSHTransport(host_of(h))
    remote = f"{ssh_hosts.cache_dir()}/file"
    data = os.urandom(3 << 20)
    (tmp_path / "up").write_bytes(data)
    t.put(tmp_path / "up", remote)
    assert t.run(["stat", "-c", "%U", remote]).stdout.split() == [FARM_USER]
    t.get(remote, tmp_path / "down")
    assert (tmp_path / "down").read_bytes() == data
    with pytest.raises(HostError, match="cannot download"):
        t.get(f"{remote}.missing", tmp_path / "missing")


# -- the agent over SFTP ----------------------------------------------------------------------


def test_the_agent_is_installed_by_hash(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    host = host_of(h, toolchain={"cache_dir": ssh_hosts.cache_dir()})
    local = hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest()

    first = Agent(SSHTransport(host), host)
    assert first.uploaded and first.path == f"{host.toolchain.cache_dir}/farm_agent.py"
    assert remote_sha256(first.path) == local
    stat = os.stat(first.path)
    assert stat.st_uid == pwd.getpwnam(FARM_USER).pw_uid
    assert first.facts()["agent_version"]

    again = Agent(SSHTransport(host), host)  # a new connection: checks, does not upload
    assert not again.uploaded and os.stat(again.path).st_ino == stat.st_ino

    transport = again.transport
    calls: list[list[str]] = []
    run = transport.run
    transport.run = lambda argv, *a, **k: calls.append(argv) or run(argv, *a, **k)
    Agent(transport, host)  # the same transport: not even checked again
    assert calls == []

    with open(first.path, "a") as f:  # changed on the host (or a new farm version here)
        f.write("# tampered\n")
    changed = Agent(SSHTransport(host), host)
    assert changed.uploaded and remote_sha256(changed.path) == local
    assert [p for p in os.listdir(host.toolchain.cache_dir) if ".tmp-" in p] == []


def test_agent_calls_share_one_agent_server_per_connection(ssh_hosts):
    """Calls go to one ``farm_agent.py serve`` per connection (a fork per call, no SSH session
    or interpreter start-up each); a dead server or connection fails what was waiting on it
    as a host error, and the next call starts a new one."""
    (h,) = ssh_hosts.create(1)
    host = host_of(h, toolchain={"cache_dir": ssh_hosts.cache_dir()})
    agent = Agent(SSHTransport(host), host)
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: agent.facts(), range(8)))
    assert all(r["agent_version"] for r in replies)
    server = agent._server()
    assert Path(f"/proc/{server.pid}/cmdline").read_bytes().split(b"\0")[-3:] == [agent.path.encode(), b"serve", b""]
    assert os.stat(f"/proc/{server.pid}").st_uid == pwd.getpwnam(FARM_USER).pw_uid
    assert Agent(agent.transport, host)._server() is server
    assert h.log.count("Accepted publickey") == 1

    hang = Path(host.toolchain.cache_dir) / "hang"  # where the farm user can reach it
    hang.write_text("#!/bin/sh\nsleep 60\n")
    hang.chmod(0o755)
    threading.Timer(1, os.kill, (server.pid, 9)).start()
    started = time.monotonic()
    with pytest.raises(HostError, match=f"host '{h.name}': connection lost while running probe"):
        agent.call("probe", "--probe", str(hang), "--qemu", "/bin/true", "--out", f"{hang}.out", timeout=30)
    assert time.monotonic() - started < 10
    again = agent._server()
    assert again is not server and again.pid != server.pid
    assert agent.facts()["agent_version"]

    agent.transport.close()  # the connection goes: its server sees stdin close and exits
    deadline = time.monotonic() + 10
    while Path(f"/proc/{again.pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not Path(f"/proc/{again.pid}").exists()
    assert agent.facts()["agent_version"] and agent._server().pid != again.pid


def test_the_default_cache_is_under_the_remote_home(ssh_hosts):
    (h,) = ssh_hosts.create(1)
    host = host_of(h)  # no cache_dir: ~/.cache/farm of the farm user, expanded there
    agent = Agent(SSHTransport(host), host)
    home = pwd.getpwnam(FARM_USER).pw_dir
    assert agent.path == f"{home}/.cache/farm/farm_agent.py"
    assert agent.cache == f"{home}/.cache/farm/agent"
    assert remote_sha256(agent.path) == hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest()


# -- farm over SSH ----------------------------------------------------------------------------


@needs_kvm
def test_hosts_check_over_ssh(ssh_hosts, env, tmp_path):
    (h,) = ssh_hosts.create(1)
    inventory = ssh_hosts.inventory(tmp_path / "inventory.yaml", [h.entry()])
    code, out, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 0, err
    (entry,) = out
    assert entry["ok"] and entry["transport"] == "ssh" and entry["name"] == h.name
    facts = entry["facts"]
    assert facts["user"] == pwd.getpwnam(FARM_USER).pw_uid  # ran as farm, over SSH
    assert facts["arch"] == platform.machine()
    assert facts["kvm"]["usable"] is True, facts["kvm"]  # farm is in the kvm group
    assert entry["real_dumps"] is True
    assert facts["cache_dir"] == f"{pwd.getpwnam(FARM_USER).pw_dir}/.cache/farm/agent"
    assert f"Accepted publickey for {FARM_USER}" in h.log


def test_hosts_check_refuses_a_host_with_another_key(ssh_hosts, env, tmp_path):
    a, b = ssh_hosts.create(2)
    cache = ssh_hosts.cache_dir()
    inventory = ssh_hosts.inventory(
        tmp_path / "inventory.yaml", [a.entry(host_key=b.host_key, toolchain={"cache_dir": cache})]
    )
    code, out, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 1, err
    (entry,) = out
    assert not entry["ok"] and "host key mismatch" in entry["error"] and a.name in entry["error"]
    assert fingerprint(a.host_key, tmp_path) in entry["error"] and fingerprint(b.host_key, tmp_path) in entry["error"]
    assert "Accepted publickey" not in a.log
    assert not os.path.exists(f"{cache}/farm_agent.py")  # nothing installed, nothing run


def test_a_host_of_another_arch_than_the_inventory_says_is_refused(ssh_hosts, env, tmp_path):
    (h,) = ssh_hosts.create(1)
    machine = platform.machine()
    claimed = "aarch64" if native_arch() != "aarch64" else "x86_64"
    inventory = ssh_hosts.inventory(
        tmp_path / "inventory.yaml", [h.entry(arch=claimed, toolchain={"cache_dir": ssh_hosts.cache_dir()})]
    )
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", claimed, "--inventory", str(inventory), "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 1 and job["status"] == "failed" and job["artifact"] is None
    assert job["reasons"] == [f"host '{h.name}' is {machine}, the inventory says {claimed}"]


def test_shell_metacharacters_in_the_inventory_are_never_executed(ssh_hosts, env, tmp_path):
    a, b = ssh_hosts.create(2)
    pwned = f"/tmp/farm-pwned-{uuid.uuid4().hex[:8]}"
    # an agent_python that is shell text is refused by the inventory itself
    refused = ssh_hosts.inventory(tmp_path / "refused.yaml", [a.entry(agent_python=f"python3; touch {pwned}")])
    code, _, err = farm(env, "hosts", "check", "--inventory", str(refused))
    assert code == 2 and "field 'agent_python': bad program 'python3; touch" in err, err
    inventory = ssh_hosts.inventory(tmp_path / "inventory.yaml", [
        a.entry(agent_python="/nonexistent/python3",
                toolchain={"cache_dir": ssh_hosts.cache_dir()}),
        b.entry(toolchain={"cache_dir": f"/nonexistent/$(touch {pwned})`touch {pwned}`; touch {pwned}"}),
    ])
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", native_arch(),
                          "--inventory", str(inventory), "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 1 and job["status"] == "failed" and job["artifact"] is None
    assert job["reasons"][0] == f"all 2 hosts of {native_arch()} failed"
    first, second = job["reasons"][1:]
    assert first.startswith(f"{a.name}: host '{a.name}': cannot run the agent's Python '/nonexistent/python3'")
    assert second.startswith(f"{b.name}: host '{b.name}': cache dir '/nonexistent/$(touch {pwned})")
    assert "cannot create it: Permission denied" in second
    assert not os.path.exists(pwned)


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_probe_over_ssh_makes_a_real_dump(ssh_hosts, env, tmp_path, probe_build):
    (h,) = ssh_hosts.create(1)
    inventory = ssh_hosts.inventory(tmp_path / "inventory.yaml", [h.entry(toolchain={"cache_dir": ssh_hosts.cache_dir()})])
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory), "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 0 and (job["status"], job["verdict"], job["host"]) == ("ok", "real", h.name), job
    artifact = Path(job["artifact"])
    assert artifact.name == "caps_7.2.0_x86_64.replies"
    provenance = json.loads((artifact.parent / "provenance.json").read_text())
    assert provenance["host"]["facts"]["user"] == pwd.getpwnam(FARM_USER).pw_uid  # probed as farm, over SSH
    assert provenance["libvirt"]["libvirt_version"] == "11.3.0" and provenance["libvirt"]["cached"] is True
    assert provenance["probe"]["sha256"] == hashlib.sha256(artifact.read_bytes()).hexdigest()
    code, inspected, _ = farm(env, "replies", "inspect", "--json", str(artifact))
    assert code == 0 and inspected[0]["verdict"] == "real" and inspected[0]["sessions"] == 2
    assert f"Accepted publickey for {FARM_USER}" in h.log


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_a_job_moves_to_the_next_host_when_the_first_is_down(ssh_hosts, env, tmp_path, probe_build):
    down, up = ssh_hosts.create(2)
    down.stop()
    cache = ssh_hosts.cache_dir()
    inventory = ssh_hosts.inventory(tmp_path / "inventory.yaml", [
        down.entry(toolchain={"cache_dir": cache}), up.entry(toolchain={"cache_dir": cache}),
    ])
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory), "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 0 and (job["status"], job["verdict"], job["host"]) == ("ok", "real", up.name), job
