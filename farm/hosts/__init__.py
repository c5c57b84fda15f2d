"""Reaching a host: a small Transport interface and its implementations.

A transport runs an argument list (never a shell string built from values)
with a timeout, streaming stderr lines to a callback, and copies files.
``local`` runs on this machine; ``ssh`` (paramiko) on a host reached over
SSH with a pinned host key.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import logging
import os
import threading
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from farm.errors import FarmError, OperationalError


class HostError(OperationalError):
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


class Cancelled(FarmError):
    """A job was cancelled (``farm runs cancel``, a stopping worker, an interrupted CLI): not the host's fault."""


class Cancellation:
    """A job's cancel switch, shared by the threads that work for the job. What the job waits on
    (an agent's reply, a local process, a host slot) registers how to stop waiting with
    ``on_cancel``; ``cancel(reason)`` runs those hooks once, from any thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._hooks: list[Callable[[], None]] = []
        self.reason: str | None = None

    @property
    def cancelled(self) -> bool:
        return self.reason is not None

    def cancel(self, reason: str) -> None:
        with self._lock:
            if self.reason is not None:
                return
            self.reason = reason
            hooks = list(self._hooks)
        for hook in hooks:
            _quietly(hook)

    def check(self) -> None:
        """Raise ``Cancelled`` if the job was cancelled."""
        if self.reason is not None:
            raise Cancelled(self.reason)

    @contextlib.contextmanager
    def on_cancel(self, hook: Callable[[], None]) -> Iterator[None]:
        """Run ``hook`` when the job is cancelled while the block runs (at once if it already is)."""
        with self._lock:
            self._hooks.append(hook)
            now = self.reason is not None
        if now:
            _quietly(hook)
        try:
            yield
        finally:
            with self._lock:
                self._hooks.remove(hook)


def _quietly(hook: Callable[[], None]) -> None:
    try:
        hook()
    except Exception:  # noqa: BLE001 - a hook that fails must not stop the others
        logging.getLogger(__name__).exception("cancelling: a hook failed")


MAX_DUMP_BYTES = 64 << 20  # a dump decompressed (a real one is about 1 MB)


def inflate(text: str, limit: int = MAX_DUMP_BYTES) -> str:
    """The UTF-8 text of base64-encoded zlib data from a host or a worker, at most ``limit``
    bytes decompressed (a zip bomb stops there); ValueError when it is damaged or too large."""
    try:
        inflater = zlib.decompressobj()
        data = inflater.decompress(base64.b64decode(text, validate=True), limit)
        if inflater.unconsumed_tail:
            raise ValueError(f"larger than {limit >> 20} MiB decompressed")
        if not inflater.eof:
            raise ValueError("truncated")
        return data.decode("utf-8")
    except (zlib.error, UnicodeDecodeError, binascii.Error, TypeError) as e:
        raise ValueError(str(e)) from None


def tell(on_line: Callable[[str], None], line: str, host: str) -> None:
    """Give a line of a host's output to its listener. The listener's failure is logged, never
    raised: it must not kill the thread that reads the host (the reply would never be read)."""
    try:
        on_line(line)
    except Exception:  # noqa: BLE001 - a listener's bug is not the host's
        logging.getLogger(__name__).exception("host %s: the progress listener failed on %r", host, line[:200])


class Transport(Protocol):
    name: str

    def run(
        self, argv: list[str], timeout: float | None = None, on_line: Callable[[str], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> Completed: ...

    def put(self, local: Path, remote: str) -> None: ...

    def get(self, remote: str, local: Path) -> None: ...


_pool: dict[tuple, Transport] = {}
_pool_lock = threading.Lock()


def transport_for(host) -> Transport:
    """The transport of an inventory host.

    Transports are shared per host within a process (one SSH connection, one agent server,
    reused by every job on that host; a forked child opens its own).
    """
    if host.transport == "local":
        from farm.hosts.local import LocalTransport

        key: tuple[object, ...] = (os.getpid(), host.name, host.user)
        with _pool_lock:
            transport = _pool.get(key)
            if transport is None:
                transport = _pool[key] = LocalTransport(host.name, host.user)
            return transport
    if host.transport == "ssh":
        from farm.hosts.ssh import SSHTransport

        key = (os.getpid(), host.name, host.address, host.port, host.user, host.host_key,
               host.known_hosts, host.identity_file)
        with _pool_lock:
            transport = _pool.get(key)
            if transport is None:
                transport = _pool[key] = SSHTransport(host)
            return transport
    raise HostError(f"host {host.name!r}: unknown transport {host.transport!r} (ssh or local)")
