"""Real services for tests: a redis-server and `farm worker` (Celery) processes.

Each redis-server gets a free port and its own directory (append-only file on,
so a restart keeps the queues); each worker is a real `python -m farm worker`.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Redis:
    """A redis-server; with ``password`` it asks for it (requirepass), with ``tls`` (a directory of
    ca.pem, server.pem, server.key) it speaks only TLS (rediss://, the CA checked)."""

    def __init__(self, directory: Path, password: str | None = None, tls: Path | None = None):
        self.directory = directory
        self.port = free_port()
        self.password, self.tls = password, tls
        auth = f":{password}@" if password else ""
        if tls:
            self.url = f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={tls / 'ca.pem'}"
        else:
            self.url = f"redis://{auth}127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        args = ["--bind", "127.0.0.1", "--dir", str(self.directory), "--appendonly", "yes", "--save", "",
                "--daemonize", "no"]
        args += ["--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(self.tls / "server.pem"),
                 "--tls-key-file", str(self.tls / "server.key"), "--tls-ca-cert-file", str(self.tls / "ca.pem"),
                 "--tls-auth-clients", "no"] if self.tls else ["--port", str(self.port)]
        args += ["--requirepass", self.password] if self.password else []
        self.proc = subprocess.Popen(
            ["redis-server", *args],
            stdout=open(self.directory / "redis.log", "a"), stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.ping():
                return
            time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start: {(self.directory / 'redis.log').read_text()[-500:]}")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as raw:
                s = raw
                if self.tls:
                    import ssl

                    s = ssl.create_default_context(cafile=str(self.tls / "ca.pem")).wrap_socket(
                        raw, server_hostname="127.0.0.1")
                if self.password:
                    s.sendall(f"AUTH {self.password}\r\n".encode())
                    if not s.recv(16).startswith(b"+OK"):
                        return False
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def redis_server(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server not installed (./bootstrap installs it)")
    server = Redis(tmp_path)
    server.start()
    yield server
    server.stop()


class Workers:
    """`farm worker` processes, each serving some hosts of an inventory."""

    def __init__(self, env: dict, broker: str, logdir: Path):
        self.env, self.broker, self.logdir = env, broker, logdir
        self.procs: list[subprocess.Popen] = []

    def start(self, hosts: str, inventory: str | None = None, extra: list[str] | None = None) -> subprocess.Popen:
        argv = [sys.executable, "-m", "farm", "worker", "--hosts", hosts, "--broker", self.broker, "--loglevel", "INFO"]
        if inventory:
            argv += ["--inventory", inventory]
        argv += extra or []
        log = open(self.logdir / f"worker-{len(self.procs)}.log", "w")
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(proc)
        self._wait_ready(proc, log.name)
        return proc

    def _wait_ready(self, proc: subprocess.Popen, log: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"farm worker exited: {Path(log).read_text()[-2000:]}")
            if " ready." in Path(log).read_text():
                return
            time.sleep(0.1)
        raise RuntimeError(f"farm worker not ready: {Path(log).read_text()[-2000:]}")

    def kill(self, proc: subprocess.Popen, sig: int = signal.SIGKILL) -> None:
        os.killpg(proc.pid, sig)
        proc.wait(30)

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)


@pytest.fixture
def workers(env, redis_server, tmp_path):
    pool = Workers(env, redis_server.url, tmp_path)
    yield pool
    pool.stop_all()
