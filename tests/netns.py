"""Real SSH hosts for tests: each in its own network namespace, with its own sshd.

Every host is a namespace ``farmtest-<pid>-<k>`` joined to this machine by a
point-to-point veth pair with a /30 of its own (10.77.0.0/16: this side .1,
the host .2), running OpenSSH's ``sshd -D`` on that address with freshly
generated host keys. Clients log in as the ``farm`` test user (created once,
shell /bin/sh, in the kvm group so the unprivileged agent can use /dev/kvm)
with a key generated for the test. Subnets are claimed with flock, so test
runs in parallel do not collide; namespaces left by a killed run are removed
by the next one. Needs root and ``ip netns``.

    def test_something(ssh_hosts):
        a, b = ssh_hosts.create(2)
        a.stop(); a.start(); a.cut(); a.restore()

``ssh_farm()`` is the same as a context manager (for benchmarks).
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import ipaddress
import os
import platform
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from tests.conftest import CACHE

FARM_USER = "farm"
SSHD = "/usr/sbin/sshd"
STATE = Path("/run/farm-netns")  # subnet locks, shared by concurrent test runs
NETWORK = ipaddress.ip_network("10.77.0.0/16")
SUBNETS = NETWORK.num_addresses // 4
PREFIX = "farmtest-"
LIBVIRT = "debian:11.3.0-3+deb13u3"
START_TIMEOUT = 10.0


def unavailable() -> str | None:
    """Why SSH hosts in namespaces cannot be made here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, sshd, a test user)"
    if not os.access(SSHD, os.X_OK):
        return f"needs OpenSSH's server at {SSHD} (apt-get install openssh-server)"
    if shutil.which("ip") is None or shutil.which("ssh-keygen") is None:
        return "needs iproute2 (ip) and ssh-keygen"
    try:
        subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"ip netns does not work here: {e}"
    return None


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")
    return done


def _pids_in(namespace: str) -> list[int]:
    done = _ip("netns", "pids", namespace, check=False)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def _kill_namespace_processes(namespace: str, grace: float = 3.0) -> None:
    """Stop every process in the namespace (all of them started by a test sshd)."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        pids = _pids_in(namespace)
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and _pids_in(namespace):
            time.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        yield


def _setup_machine() -> None:
    """Once per machine (idempotent): sshd's privsep dir, /dev/kvm for the kvm group, the farm user;
    and namespaces of test runs that died are removed."""
    with _locked(STATE / "setup.lock"):
        os.makedirs("/run/sshd", mode=0o755, exist_ok=True)
        subprocess.run(["groupadd", "-f", "kvm"], check=True)
        if os.path.exists("/dev/kvm"):  # what Debian's udev rule does (no udev in a container)
            shutil.chown("/dev/kvm", group="kvm")
            os.chmod("/dev/kvm", 0o660)
        try:
            pwd.getpwnam(FARM_USER)
        except KeyError:
            subprocess.run(["useradd", "--create-home", "--shell", "/bin/sh", "--user-group", FARM_USER], check=True)
        subprocess.run(["usermod", "-p", "*", FARM_USER], check=True)  # not locked (sshd without PAM)
        if FARM_USER not in grp.getgrnam("kvm").gr_mem:
            subprocess.run(["usermod", "-aG", "kvm", FARM_USER], check=True)
        for line in _ip("netns", "list").stdout.splitlines():
            name = line.split()[0] if line.split() else ""
            match = re.fullmatch(re.escape(PREFIX) + r"(\d+)-(\d+)", name)
            if match and not _alive(int(match.group(1))):
                _kill_namespace_processes(name)
                _ip("netns", "del", name, check=False)
                _ip("link", "del", f"fvr{match.group(2)}", check=False)


def _claim_subnet(start: int) -> tuple[int, object]:
    """A free /30 of NETWORK, held (flock) until the returned handle is closed."""
    (STATE / "subnets").mkdir(parents=True, exist_ok=True)
    for offset in range(SUBNETS):
        k = (start + offset) % SUBNETS
        handle = open(STATE / "subnets" / f"{k}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return k, handle
    raise RuntimeError(f"no free subnet left in {NETWORK}")


def native_arch() -> str:
    machine = platform.machine()
    return {"arm64": "aarch64", "ppc64le": "ppc64"}.get(machine, machine)


@dataclass
class SSHHost:
    """One test host: a namespace, its address and its sshd."""

    name: str
    namespace: str
    address: str  # of the host (sshd listens here)
    peer: str  # this machine's end of the link
    veth: str  # this machine's end of the veth pair
    host_key: str  # the public key line sshd presents, "ssh-ed25519 AAAA..."
    dir: Path  # its private files: host key, sshd config, log
    farm: SSHHosts = field(repr=False)
    _sshd: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def config(self) -> Path:
        return self.dir / "sshd_config"

    @property
    def log(self) -> str:
        """sshd's log (LogLevel VERBOSE)."""
        try:
            return (self.dir / "sshd.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, wait: bool = True) -> None:
        """Start sshd in the namespace (and wait until it accepts connections)."""
        if self._sshd is not None and self._sshd.poll() is None:
            return
        self._sshd = subprocess.Popen(
            ["ip", "netns", "exec", self.namespace, SSHD, "-D", "-f", str(self.config), "-E", str(self.dir / "sshd.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
        )
        if wait:
            self.wait_started()

    def wait_started(self, timeout: float = START_TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._sshd is not None and self._sshd.poll() is not None:
                raise RuntimeError(f"{self.name}: sshd exited ({self._sshd.returncode}): {self.log[-2000:]}")
            try:
                with socket.create_connection((self.address, 22), timeout=1):
                    return
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{self.name}: sshd not listening on {self.address}:22 after {timeout} s") from None
                time.sleep(0.02)

    def stop(self) -> None:
        """Stop sshd and everything it started (its connections, the commands they run)."""
        _kill_namespace_processes(self.namespace)
        if self._sshd is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._sshd.wait(5)
            self._sshd = None

    def cut(self) -> None:
        """Cut the host's network link (packets are lost: connections time out)."""
        _ip("-n", self.namespace, "link", "set", "eth0", "down")

    def restore(self) -> None:
        """Bring the link back up."""
        _ip("-n", self.namespace, "link", "set", "eth0", "up")

    def entry(self, arch: str | None = None, **overrides) -> dict:
        """This host as an inventory entry (a dict for YAML); keys in ``overrides`` replace or add."""
        entry = {
            "name": self.name,
            "transport": "ssh",
            "arch": arch or native_arch(),
            "address": self.address,
            "user": FARM_USER,
            "host_key": self.host_key,
            "identity_file": str(self.farm.client_key),
            "toolchain": {"libvirt": LIBVIRT, "qemu": "system"},
        }
        toolchain = overrides.pop("toolchain", None)
        entry.update(overrides)
        if toolchain:
            entry["toolchain"] = {**entry["toolchain"], **toolchain}
        return entry

    def destroy(self) -> None:
        self.stop()
        _ip("netns", "del", self.namespace, check=False)
        _ip("link", "del", self.veth, check=False)


class SSHHosts:
    """A set of test hosts and the client key that logs into all of them as ``farm``."""

    def __init__(self, base: Path | None = None):
        reason = unavailable()
        if reason:
            raise RuntimeError(reason)
        _setup_machine()
        self.base = Path(base or tempfile.mkdtemp(prefix="farm-ssh-"))
        self.base.mkdir(parents=True, exist_ok=True)
        os.chmod(self.base, 0o711)  # the farm user reaches authorized_keys and its cache dirs, lists nothing
        self.private = self.base / "private"
        self.private.mkdir(mode=0o700, exist_ok=True)
        self.client_key = self.private / "client_ed25519"
        _keygen(self.client_key, "farm test client")
        self.authorized_keys = self.base / "authorized_keys"
        self.authorized_keys.write_text(Path(f"{self.client_key}.pub").read_text())
        os.chmod(self.authorized_keys, 0o644)
        self.hosts: list[SSHHost] = []
        self._subnets: list[object] = []
        self._lock = threading.Lock()
        self._caches = 0
        self._start = (os.getpid() * 7) % SUBNETS

    def create(self, count: int = 1, prefix: str = "ssh", root: bool = False) -> list[SSHHost]:
        """``count`` new hosts named PREFIX-1, PREFIX-2, ... (numbered on across calls), sshd running.
        With ``root``, root may log in too, with the same client key (for provisioning tests)."""
        first = sum(1 for h in self.hosts if h.name.startswith(f"{prefix}-")) + 1
        names = [f"{prefix}-{first + i}" for i in range(count)]
        with ThreadPoolExecutor(max_workers=min(8, count)) as pool:
            hosts = list(pool.map(lambda name: self._create_one(name, root), names))
        for host in hosts:
            host.start(wait=False)
        for host in hosts:
            host.wait_started()
        return hosts

    def _create_one(self, name: str, root: bool = False) -> SSHHost:
        with self._lock:
            k, handle = _claim_subnet(self._start)
            self._subnets.append(handle)
        net = ipaddress.ip_network((int(NETWORK.network_address) + 4 * k, 30))
        peer, address = str(net.network_address + 1), str(net.network_address + 2)
        namespace, veth = f"{PREFIX}{os.getpid()}-{k}", f"fvr{k}"
        hostdir = self.private / name
        hostdir.mkdir(mode=0o700)
        key = hostdir / "ssh_host_ed25519_key"
        _keygen(key, name)
        host = SSHHost(name, namespace, address, peer, veth, " ".join(Path(f"{key}.pub").read_text().split()[:2]),
                       hostdir, self)
        with self._lock:
            self.hosts.append(host)  # from here on, close() removes it
        _ip("link", "del", veth, check=False)  # left over from a killed run
        _ip("netns", "add", namespace)
        _ip("link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", namespace)
        _ip("addr", "add", f"{peer}/30", "dev", veth)
        _ip("link", "set", veth, "up")
        _ip("-n", namespace, "addr", "add", f"{address}/30", "dev", "eth0")
        _ip("-n", namespace, "link", "set", "eth0", "up")
        _ip("-n", namespace, "link", "set", "lo", "up")
        host.config.write_text(
            f"ListenAddress {address}:22\n"
            f"HostKey {key}\n"
            f"PidFile {hostdir}/sshd.pid\n"
            f"AuthorizedKeysFile {self.authorized_keys}\n"
            f"AllowUsers {FARM_USER}{' root' if root else ''}\n"
            f"PermitRootLogin {'prohibit-password' if root else 'no'}\n"
            "PubkeyAuthentication yes\n"
            "PasswordAuthentication no\n"
            "KbdInteractiveAuthentication no\n"
            "UsePAM no\n"
            "StrictModes no\n"
            "UseDNS no\n"
            "PrintMotd no\n"
            "MaxStartups 200:30:400\n"
            "MaxSessions 100\n"
            "LogLevel VERBOSE\n"
            "Subsystem sftp internal-sftp\n"
        )
        return host

    def cache_dir(self) -> str:
        """A fresh toolchain cache dir owned by the farm user whose agent/libvirt and agent/qemu
        are the machine's cache of published builds (read-only for farm): the probe is not rebuilt."""
        with self._lock:
            self._caches += 1
            path = self.base / f"cache-{self._caches}"
        (path / "agent").mkdir(parents=True)
        for area in ("libvirt", "qemu"):
            (path / "agent" / area).symlink_to(CACHE / "agent" / area)
        for p in (path, path / "agent"):
            os.chown(p, pwd.getpwnam(FARM_USER).pw_uid, pwd.getpwnam(FARM_USER).pw_gid)
        return str(path)

    def inventory(self, path: Path, entries: list[dict]) -> Path:
        """Write an inventory file of these host entries."""
        path.write_text(yaml.safe_dump({"hosts": entries}, sort_keys=False))
        return path

    def close(self) -> None:
        with ThreadPoolExecutor(max_workers=8) as pool:
            list(pool.map(lambda h: h.destroy(), self.hosts))
        self.hosts.clear()
        for handle in self._subnets:
            handle.close()
        self._subnets.clear()
        shutil.rmtree(self.base, ignore_errors=True)


def _keygen(path: Path, comment: str) -> None:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", str(path)],
                   check=True, stdin=subprocess.DEVNULL)


@contextlib.contextmanager
def ssh_farm() -> Iterator[SSHHosts]:
    """SSH test hosts for the block, all removed afterwards (also on failure)."""
    hosts = SSHHosts()
    try:
        yield hosts
    finally:
        hosts.close()


@pytest.fixture
def ssh_hosts() -> Iterator[SSHHosts]:
    """A factory of real SSH hosts in network namespaces; ``ssh_hosts.create(n)``."""
    reason = unavailable()
    if reason:
        pytest.skip(f"SSH hosts in network namespaces: {reason}")
    with ssh_farm() as hosts:
        yield hosts
