"""The ``local`` transport: this machine, as the user running farm."""

from __future__ import annotations

import contextlib
import errno
import os
import pwd
import select
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

from farm.hosts import Cancellation, Completed, HostConfigError, HostError, tell


class LocalTransport:
    """Runs on this machine, as ``user`` (via runuser, needs root) when it is another user."""

    def __init__(self, name: str = "local", user: str | None = None):
        self.name = name
        self.user = user if user and user != pwd.getpwuid(os.geteuid()).pw_name else None
        if self.user:
            try:
                self._uid = pwd.getpwnam(self.user).pw_uid
            except KeyError:
                raise HostConfigError(f"host {name!r}: no local user {self.user!r}") from None
            if os.geteuid() != 0:
                raise HostConfigError(f"host {name!r}: running the agent as {self.user!r} needs root")

    def run(
        self, argv: list[str], timeout: float | None = None, on_line: Callable[[str], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> Completed:
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        try:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                start_new_session=True,
            )
        except OSError as e:
            missing = e.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR)  # a path of the inventory
            raise (HostConfigError if missing else HostError)(
                f"host {self.name!r}: cannot run {argv[0]}: {e.strerror}") from None
        out_chunks: list[str] = []
        err_lines: list[str] = []

        def drain_stdout() -> None:
            out_chunks.append(proc.stdout.read())

        def drain_stderr() -> None:
            for line in proc.stderr:
                err_lines.append(line)
                if on_line:
                    tell(on_line, line.rstrip("\n"), self.name)

        readers = [threading.Thread(target=f, daemon=True) for f in (drain_stdout, drain_stderr)]
        for r in readers:
            r.start()
        timed_out = False
        with cancel.on_cancel(lambda: _kill_group(proc)) if cancel else contextlib.nullcontext():
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
        for r in readers:
            r.join(10)
        if cancel:
            cancel.check()
        return Completed(list(argv), proc.returncode, "".join(out_chunks), "".join(err_lines), timed_out)

    def start(self, argv: list[str]) -> _Pipes:
        """Start ``argv`` and leave it running, its stdin and stdout (stderr merged) a channel for
        the caller (a long-lived agent server). When this process dies, however it dies, the
        server's stdin closes and it stops what it runs: nothing outlives `farm probe`."""
        if self.user:
            argv = ["runuser", "-u", self.user, "--", *argv]
        try:
            proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    bufsize=0, start_new_session=True)
        except OSError as e:
            missing = e.errno in (errno.ENOENT, errno.EACCES, errno.ENOTDIR)
            raise (HostConfigError if missing else HostError)(
                f"host {self.name!r}: cannot run {argv[0]}: {e.strerror}") from None
        return _Pipes(proc)

    def put(self, local: Path, remote: str) -> None:
        if Path(local).resolve() != Path(remote).resolve():
            shutil.copyfile(local, remote)

    def get(self, remote: str, local: Path) -> None:
        if Path(remote).resolve() != Path(local).resolve():
            shutil.copyfile(remote, local)


class _Pipes:
    """A local process's stdin and stdout as the channel an agent server is talked to through
    (what farm.hosts.server uses of a paramiko channel: recv, sendall, settimeout, close)."""

    def __init__(self, proc: subprocess.Popen):
        self.proc = proc
        self._timeout: float | None = None

    def settimeout(self, timeout: float | None) -> None:
        self._timeout = timeout

    def recv(self, size: int) -> bytes:
        fd = self.proc.stdout.fileno()
        if self._timeout is not None and not select.select([fd], [], [], self._timeout)[0]:
            raise TimeoutError("timed out")
        return os.read(fd, size)

    def sendall(self, data: bytes) -> None:
        self.proc.stdin.write(data)

    def close(self) -> None:
        """stdin closed: the server stops its requests and exits (killed if it does not, soon)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            _kill_group(self.proc)
        with contextlib.suppress(OSError):
            self.proc.stdout.close()


def _kill_group(proc: subprocess.Popen) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(5)
            return
        except subprocess.TimeoutExpired:
            continue
