"""The ``local`` transport: this machine, as the user running farm."""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import errno

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

    def put(self, local: Path, remote: str) -> None:
        if Path(local).resolve() != Path(remote).resolve():
            shutil.copyfile(local, remote)

    def get(self, remote: str, local: Path) -> None:
        if Path(remote).resolve() != Path(local).resolve():
            shutil.copyfile(remote, local)


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
