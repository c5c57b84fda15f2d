"""The agent's ``serve`` mode, from the coordinator's side: one agent per connection.

Started once per SSH connection (``python3 farm_agent.py serve``), the agent forks a copy
of itself for every request instead of the host starting sshd's session, a shell and a
Python interpreter per call. Requests and replies are JSON lines tagged with an id (see
``serve()`` in agents/farm_agent.py), so the jobs of a host share it. What a call returns
is what running the subcommand alone returns (``Completed``); when the server or its
connection goes away, the calls waiting on it fail as a lost connection would.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from farm.hosts import Cancellation, Completed, HostError
from farm.hosts import tell as _tell

log = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds for the server's greeting
MAX_LINE = 96 << 20  # bytes of one message (a reply with a dump is ~150 KB compressed, base64)


@dataclass
class _Call:
    argv: list[str]
    on_line: Callable[[str], None] | None
    stderr: list[str] = field(default_factory=list)
    done: threading.Event = field(default_factory=threading.Event)
    result: Completed | None = None
    error: str | None = None


class AgentServer:
    """A running ``farm_agent.py serve`` behind ``transport.start(argv)``."""

    def __init__(self, transport, argv: list[str], name: str):
        self.name = name
        self._channel = transport.start(argv)
        self._send_lock = threading.Lock()
        self._calls: dict[int, _Call] = {}
        self._calls_lock = threading.Lock()
        self._ids = itertools.count(1)
        self._said: deque[str] = deque(maxlen=5)  # the server's own words (not JSON), for errors
        self.dead: str | None = None
        self._channel.settimeout(START_TIMEOUT)
        self._messages = self._read_messages()
        greeting = self._greeting()
        self.pid = greeting.get("pid")
        self._channel.settimeout(None)
        threading.Thread(target=self._read, name=f"farm-agent-{name}", daemon=True).start()

    def _greeting(self) -> dict:
        try:
            for message in self._messages:
                if "serve" in message:
                    return message
        except (OSError, EOFError) as e:  # socket.timeout is an OSError
            self.close()
            raise HostError(f"host {self.name!r}: the agent server did not start: {e or type(e).__name__}") from None
        self.close()
        raise HostError(f"host {self.name!r}: the agent server did not start: "
                        f"{' | '.join(self._said) or 'it exited without a word'}")

    def _read_messages(self):
        """The channel's JSON objects, line by line; other lines are the server's own words (kept
        in ``_said``). Lines are split here: paramiko's readline rescans long lines."""
        buffer = bytearray()
        while True:
            chunk = self._channel.recv(1 << 18)
            start = len(buffer)
            buffer += chunk or b"\n"
            begin, end = 0, buffer.find(b"\n", start)
            while end >= 0:
                line = bytes(buffer[begin:end])
                begin, end = end + 1, buffer.find(b"\n", end + 1)
                try:
                    message = json.loads(line)
                except (ValueError, RecursionError):
                    message = None
                if isinstance(message, dict):
                    yield message
                elif line.strip():
                    self._said.append(line.decode(errors="replace").strip())
            del buffer[:begin]
            if len(buffer) > MAX_LINE:
                raise EOFError(f"a line of more than {MAX_LINE >> 20} MiB from the agent server")
            if not chunk:
                return

    def _read(self) -> None:
        try:
            for message in self._messages:
                with self._calls_lock:
                    call = self._calls.get(message.get("id"))
                if call is None:
                    continue
                if "line" in message:
                    call.stderr.append(f"{message['line']}\n")
                    if call.on_line:
                        _tell(call.on_line, str(message["line"]), self.name)
                elif "exit" in message:
                    call.result = Completed(call.argv, int(message["exit"]), message.get("stdout", ""),
                                            "".join(call.stderr))
                    call.done.set()
            reason = "the agent server exited" + (f": {' | '.join(self._said)}" if self._said else "")
        except (OSError, EOFError) as e:
            reason = f"connection lost ({e or type(e).__name__})"
        except Exception as e:  # noqa: BLE001 - whatever ends the reader must end the calls too
            log.exception("host %s: reading the agent server's replies failed", self.name)
            reason = f"reading the agent's replies failed: {type(e).__name__}: {e}"
        self._end(reason)

    def _end(self, reason: str) -> None:
        self.dead = self.dead or reason
        with self._calls_lock:
            calls, self._calls = list(self._calls.values()), {}
        for call in calls:
            call.error = f"host {self.name!r}: connection lost while running {call.argv[0]}: {self.dead}"
            call.done.set()

    def _send(self, message: dict) -> None:
        data = (json.dumps(message) + "\n").encode()
        try:
            with self._send_lock:
                self._channel.sendall(data)
        except (OSError, EOFError) as e:
            self._end(f"cannot send: {e or type(e).__name__}")
            self.close()

    def call(self, argv: list[str], timeout: float | None = None,
             on_line: Callable[[str], None] | None = None, cancel: Cancellation | None = None) -> Completed:
        """Run ``argv`` (a subcommand and its arguments) on the server; like ``Transport.run``.
        Cancelled, the request is cancelled on the host (its processes stopped) and
        ``Cancelled`` raised."""
        call = _Call(list(argv), on_line)
        request = next(self._ids)
        with self._calls_lock:
            if self.dead:
                raise HostError(f"host {self.name!r}: {self.dead}")
            self._calls[request] = call
        self._send({"id": request, "argv": call.argv})
        with cancel.on_cancel(call.done.set) if cancel else contextlib.nullcontext():
            finished = call.done.wait(timeout)
        with self._calls_lock:
            self._calls.pop(request, None)
        if cancel and cancel.cancelled and call.result is None:
            self._send({"id": request, "cancel": True})
            cancel.check()
        if not finished:
            self._send({"id": request, "cancel": True})
            return Completed(call.argv, -1, "", "".join(call.stderr), timed_out=True)
        if call.error:
            raise HostError(call.error)
        assert call.result is not None
        return call.result

    def close(self) -> None:
        """Close the channel: the server stops what it runs and exits."""
        self.dead = self.dead or "closed"
        try:
            self._channel.close()
        except Exception:  # noqa: BLE001 - closing a dead channel
            pass
