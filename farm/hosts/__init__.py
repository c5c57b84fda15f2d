"""Reaching a host: a small Transport interface and its implementations.

A transport runs an argument list (never a shell string built from values)
with a timeout, streaming stderr lines to a callback, and copies files.
``local`` runs on this machine; ``ssh`` (paramiko) on a host reached over
SSH with a pinned host key.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from farm.errors import FarmError


class HostError(FarmError):
    """A host could not be reached or did not do what it was asked (an infrastructure failure)."""


class HostConfigError(HostError):
    """The host was reached but is not set up as farm needs: its cache dir cannot be created or
    written, the agent's Python or the agent's user is missing, it is of another arch than the
    inventory says. A job fails (and moves to another host) as for any HostError, but the host is
    not unwell: it is recorded as its last failure and does not count toward quarantine."""


@dataclass
class Completed:
    argv: list[str]
    returncode: int
    stdout: str
    stderr: str
    timed_out: bool = False


class Transport(Protocol):
    name: str

    def run(
        self, argv: list[str], timeout: float | None = None, on_line: Callable[[str], None] | None = None
    ) -> Completed: ...

    def put(self, local: Path, remote: str) -> None: ...

    def get(self, remote: str, local: Path) -> None: ...


_ssh_pool: dict[tuple, Transport] = {}
_ssh_pool_lock = threading.Lock()


def transport_for(host) -> Transport:
    """The transport of an inventory host.

    SSH transports are shared per host within a process (one connection,
    reused by every job on that host; a forked child opens its own).
    """
    if host.transport == "local":
        from farm.hosts.local import LocalTransport

        return LocalTransport(host.name, host.user)
    if host.transport == "ssh":
        from farm.hosts.ssh import SSHTransport

        key = (os.getpid(), host.name, host.address, host.port, host.user, host.host_key,
               host.known_hosts, host.identity_file)
        with _ssh_pool_lock:
            transport = _ssh_pool.get(key)
            if transport is None:
                transport = _ssh_pool[key] = SSHTransport(host)
            return transport
    raise HostError(f"host {host.name!r}: unknown transport {host.transport!r} (ssh or local)")
