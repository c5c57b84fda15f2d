"""Reaching a host: a small Transport interface and its implementations.

A transport runs an argument list (never a shell string built from values)
with a timeout, streaming stderr lines to a callback, and copies files.
``local`` runs on this machine; ``ssh`` (paramiko) arrives with the
distributed farm.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from farm.errors import FarmError


class HostError(FarmError):
    """A host could not be reached or did not do what it was asked (an infrastructure failure)."""


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

    def scratch(self) -> AbstractContextManager[str]:
        """A new directory on the host that the agent can write into, removed afterwards."""
        ...


def transport_for(host) -> Transport:
    """The transport of an inventory host."""
    if host.transport == "local":
        from farm.hosts.local import LocalTransport

        return LocalTransport(host.name, host.user)
    raise HostError(f"host {host.name!r}: transport {host.transport!r} is not available yet (only 'local')")
