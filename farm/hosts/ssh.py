"""The ``ssh`` transport: a probe host reached over SSH (paramiko).

Host keys are pinned: the inventory's ``host_key`` or a ``known_hosts`` file,
checked with a reject policy; an unknown or different key is refused before
anything is sent, never added. Commands are argument lists, each element
quoted with ``shlex.quote`` for the remote user's shell. One SSH connection per
transport object, shared by the threads using it (channels run concurrently)
and reopened once when it dropped.
"""

from __future__ import annotations

import base64
import codecs
import contextlib
import hashlib
import select
import shlex
import socket
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import paramiko

from farm.hosts import Cancellation, Completed, HostError, tell

CONNECT_TIMEOUT = 15.0  # seconds: TCP connect, SSH banner, authentication, opening a channel
KEEPALIVE = 30  # seconds between keepalives, so a dead connection is noticed
_CHUNK = 1 << 16


def fingerprint(key: paramiko.PKey) -> str:
    """OpenSSH's SHA256 fingerprint of a public key: ``SHA256:base64``."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(key.asbytes()).digest()).decode().rstrip("=")


class _UnknownHostKey(paramiko.SSHException):
    def __init__(self, key: paramiko.PKey):
        super().__init__("unknown host key")
        self.key = key


class _Pinned(paramiko.RejectPolicy):
    """Reject a key that is not pinned, keeping the key for the error message; never add it."""

    def missing_host_key(self, client, hostname, key):
        raise _UnknownHostKey(key)


class SSHTransport:
    """Runs on an inventory host over SSH as ``host.user``."""

    def __init__(self, host, connect_timeout: float = CONNECT_TIMEOUT):
        if not host.address:
            raise HostError(f"host {host.name!r}: no address for transport 'ssh'")
        self.name = host.name
        self.host = host
        self.user = host.user or "farm"
        self.connect_timeout = connect_timeout
        self.where = f"{self.user}@{host.address}" + (f":{host.port}" if host.port != 22 else "")
        self._lock = threading.RLock()
        self._client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self._sftp_lock = threading.Lock()

    # -- connection -------------------------------------------------------------------

    def _fail(self, message: str) -> HostError:
        return HostError(f"host {self.name!r} ({self.where}): {message}")

    def _pin(self, keys: paramiko.HostKeys) -> None:
        """Add the host keys this host may present, under the name paramiko looks it up by."""
        host = self.host
        if host.known_hosts is not None:
            try:
                keys.load(str(host.known_hosts))
            except OSError as e:
                raise self._fail(f"cannot read known_hosts {host.known_hosts}: {e.strerror or e}") from None
        if host.host_key:
            kind, b64 = host.host_key.split()[:2]
            keys.add(self._lookup_name(), kind, paramiko.PKey.from_type_string(kind, base64.b64decode(b64)))

    def _lookup_name(self) -> str:
        return self.host.address if self.host.port == 22 else f"[{self.host.address}]:{self.host.port}"

    def _expected(self, keys: paramiko.HostKeys) -> str:
        known: Mapping[str, paramiko.PKey] = keys.lookup(self._lookup_name()) or {}
        return ", ".join(f"{kind} {fingerprint(key)}" for kind, key in known.items()) or "none"

    def _connect(self) -> paramiko.SSHClient:
        """The open connection, (re)opened if there is none or it dropped."""
        with self._lock:
            if self._client is not None:
                transport = self._client.get_transport()
                if transport is not None and transport.is_active():
                    return self._client
                self._drop()
            client = paramiko.SSHClient()  # no system known_hosts: only what the inventory pins
            keys = client.get_host_keys()
            self._pin(keys)
            client.set_missing_host_key_policy(_Pinned())
            identity = self.host.identity_file
            try:
                client.connect(
                    self.host.address,
                    port=self.host.port,
                    username=self.user,
                    key_filename=str(identity) if identity else None,
                    allow_agent=identity is None,
                    look_for_keys=identity is None,
                    timeout=self.connect_timeout,
                    banner_timeout=self.connect_timeout,
                    auth_timeout=self.connect_timeout,
                    channel_timeout=self.connect_timeout,
                )
            except _UnknownHostKey as e:
                client.close()
                raise self._fail(
                    f"host key mismatch: the host presented {e.key.get_name()} {fingerprint(e.key)}, "
                    f"the inventory pins {self._expected(keys)}; refusing to connect "
                    "(if the host was reinstalled, check and update its host_key)"
                ) from None
            except paramiko.BadHostKeyException as e:
                client.close()
                raise self._fail(
                    f"host key mismatch: the host presented {e.key.get_name()} {fingerprint(e.key)}, "
                    f"the inventory pins {e.expected_key.get_name()} {fingerprint(e.expected_key)}; "
                    "refusing to connect (if the host was reinstalled, check and update its host_key)"
                ) from None
            except paramiko.AuthenticationException as e:
                client.close()
                how = f"key {identity}" if identity else "the SSH agent's and ~/.ssh keys"
                raise self._fail(f"authentication failed with {how}: {e}") from None
            except (paramiko.SSHException, EOFError, OSError) as e:  # refused, unreachable, timeouts
                client.close()
                raise self._fail(f"cannot connect: {self._reason(e)}") from None
            client.get_transport().set_keepalive(KEEPALIVE)
            client.get_transport().sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # else ~40 ms per command (Nagle + delayed ACK)
            self._client = client
            return client

    def _reason(self, e: BaseException) -> str:
        if isinstance(e, paramiko.ssh_exception.NoValidConnectionsError) and e.errors:
            e = next(iter(e.errors.values()))  # per address tried; say why the first failed
        if isinstance(e, (socket.timeout, TimeoutError)):
            return f"no answer within {self.connect_timeout:.0f} s"
        if isinstance(e, OSError) and e.strerror:
            return e.strerror
        return str(e) or type(e).__name__

    def _drop(self) -> None:
        with self._lock:
            client, self._client, self._sftp = self._client, None, None
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()

    def close(self) -> None:
        """Close the connection (the next call opens a new one)."""
        self._drop()

    def _session(self) -> paramiko.Channel:
        """A new session channel; the connection is reopened once if it dropped."""
        for attempt in (1, 2):
            client = self._connect()
            try:
                return client.get_transport().open_session(timeout=self.connect_timeout)
            except (paramiko.SSHException, EOFError, OSError, AttributeError) as e:
                self._drop()
                if attempt == 2:
                    raise self._fail(f"cannot open a session: {e or type(e).__name__}") from None
        raise AssertionError("unreachable")

    # -- commands ---------------------------------------------------------------------

    def run(
        self, argv: list[str], timeout: float | None = None, on_line: Callable[[str], None] | None = None,
        cancel: Cancellation | None = None,
    ) -> Completed:
        """Run ``argv`` on the host, stdout collected, stderr lines streamed to ``on_line``.

        The remote shell sees each element quoted, never a command line built from values.
        On timeout the channel is closed and ``timed_out`` set.
        """
        if not argv:
            raise ValueError("empty argv")
        command = " ".join(shlex.quote(str(a)) for a in argv)
        channel = self._session()
        try:
            try:
                channel.exec_command(command)
                channel.shutdown_write()  # no stdin
            except (paramiko.SSHException, EOFError, OSError) as e:
                self._drop()
                raise self._fail(f"cannot run {argv[0]}: {e or type(e).__name__}") from None
            with cancel.on_cancel(channel.close) if cancel else contextlib.nullcontext():
                done = self._collect(channel, list(argv), timeout, on_line)
            if cancel:
                cancel.check()
            return done
        except HostError:
            if cancel:
                cancel.check()  # the channel closed by the cancel, not lost
            raise
        finally:
            channel.close()

    def start(self, argv: list[str]) -> paramiko.Channel:
        """Start ``argv`` on the host and leave it running, stdin open, stderr merged into
        stdout: the channel, for the caller to talk to (a long-lived agent server)."""
        if not argv:
            raise ValueError("empty argv")
        command = " ".join(shlex.quote(str(a)) for a in argv)
        channel = self._session()
        try:
            channel.set_combine_stderr(True)
            channel.exec_command(command)
        except (paramiko.SSHException, EOFError, OSError) as e:
            channel.close()
            self._drop()
            raise self._fail(f"cannot run {argv[0]}: {e or type(e).__name__}") from None
        return channel

    def _collect(self, channel: paramiko.Channel, argv: list[str], timeout: float | None,
                 on_line: Callable[[str], None] | None) -> Completed:
        deadline = None if timeout is None else time.monotonic() + timeout
        out = bytearray()
        err: list[str] = []
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pending = ""

        def stderr_text(text: str) -> None:
            nonlocal pending
            pending += text
            *lines, pending = pending.split("\n")
            for line in lines:
                err.append(line + "\n")
                if on_line:
                    tell(on_line, line, self.name)

        def drain() -> bool:
            moved = False
            while channel.recv_ready():
                out.extend(channel.recv(_CHUNK))
                moved = True
            while channel.recv_stderr_ready():
                stderr_text(decoder.decode(channel.recv_stderr(_CHUNK)))
                moved = True
            return moved

        timed_out = False
        while True:
            moved = drain()
            # the end is the remote's EOF, not its exit status: OpenSSH may send the exit
            # status while output it buffered is still on its way
            if (channel.eof_received or channel.closed) and not channel.recv_ready() \
                    and not channel.recv_stderr_ready():
                break
            if deadline is not None and time.monotonic() >= deadline:
                timed_out = True
                break
            if not moved:
                wait = 0.5 if deadline is None else max(0.0, min(0.5, deadline - time.monotonic()))
                select.select([channel], [], [], wait)
        drain()
        stderr_text(decoder.decode(b"", final=True))
        if pending:
            stderr_text("\n")
        if timed_out:
            returncode = -1
        else:
            returncode = channel.recv_exit_status()
            if returncode == -1:  # closed without an exit status: the connection went away
                self._drop()
                raise self._fail(f"connection lost while running {argv[0]}")
        return Completed(argv, returncode, out.decode("utf-8", "replace"), "".join(err), timed_out)

    # -- files ------------------------------------------------------------------------

    def _sftp_client(self) -> paramiko.SFTPClient:
        with self._lock:
            client = self._connect()
            if self._sftp is None or self._sftp.get_channel() is None or self._sftp.get_channel().closed:
                try:
                    self._sftp = client.open_sftp()
                except (paramiko.SSHException, EOFError, OSError) as e:
                    self._drop()
                    raise self._fail(f"cannot open SFTP: {e or type(e).__name__}") from None
            return self._sftp

    def _alive(self) -> bool:
        transport = self._client.get_transport() if self._client is not None else None
        return transport is not None and transport.is_active()

    def _file_op(self, what: str, op: Callable[[paramiko.SFTPClient], object]) -> object:
        """Run an SFTP operation; when the connection had dropped, once more on a new one."""
        for attempt in (1, 2):
            sftp = self._sftp_client()
            try:
                with self._sftp_lock:
                    return op(sftp)
            except (paramiko.SSHException, EOFError, OSError) as e:
                if not self._alive():
                    self._drop()
                    if attempt == 1:
                        continue
                reason = (e.strerror if isinstance(e, OSError) and e.strerror else str(e)) or type(e).__name__
                raise self._fail(f"{what}: {reason}") from None
        raise AssertionError("unreachable")

    def put(self, local: Path, remote: str) -> None:
        self._file_op(f"cannot upload {local} to {remote}", lambda sftp: sftp.put(str(local), remote))

    def get(self, remote: str, local: Path) -> None:
        self._file_op(f"cannot download {remote}", lambda sftp: sftp.get(remote, str(local)))
