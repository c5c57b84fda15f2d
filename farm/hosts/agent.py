"""Talking to the farm agent (agents/farm_agent.py) on a host, through its transport."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path

from farm.hosts import Cancellation, HostConfigError, HostError, Transport, inflate
from farm.hosts.server import AgentServer

AGENT_FILE = Path(__file__).resolve().parents[2] / "agents" / "farm_agent.py"

# seconds; toolchain builds can take long on slow hosts
FACTS_TIMEOUT = 60
BUILD_TIMEOUT = 4 * 3600


# run with the agent's Python on the host, paths as arguments (never in the code):
# expand and create the cache dir, report the sha256 of the agent file in it
_CACHE_HELPER = """\
import hashlib, json, os, sys
cache = os.path.abspath(os.path.expanduser(sys.argv[1]))
try:
    os.makedirs(cache, exist_ok=True)
except OSError as e:
    print(json.dumps({"cache": cache, "error": "cannot create it: %s" % (e.strerror or e)}))
    sys.exit(1)
try:
    with open(os.path.join(cache, "farm_agent.py"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()
except OSError:
    digest = None
print(json.dumps({"cache": cache, "sha256": digest}))
"""
# move the uploaded agent into place atomically; print the sha256 of what is there now
_REPLACE_HELPER = """\
import hashlib, os, sys
os.chmod(sys.argv[1], 0o644)
os.replace(sys.argv[1], sys.argv[2])
with open(sys.argv[2], "rb") as f:
    print(hashlib.sha256(f.read()).hexdigest())
"""

# per transport: (python, cache as configured) -> {"cache": absolute path, "sha256": of the agent there}
_installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_installed_lock = threading.Lock()
# per transport that can keep a command running (ssh): (python, agent path) -> [lock, its AgentServer]
# (a lock per server: a host slow to start one does not hold up the others)
_servers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_servers_lock = threading.Lock()


class AgentError(HostError):
    """The agent ran and reported a failure."""


class Agent:
    """The agent of one host. A call runs ``python3 farm_agent.py SUBCOMMAND ...``: on a
    host over SSH through the agent server of the connection (farm.hosts.server: started
    once, a fork per call), on this machine as a process of its own."""

    def __init__(self, transport: Transport, host, progress: Callable[[str], None] | None = None,
                 cancel: Cancellation | None = None):
        self.transport = transport
        self.host = host
        self.progress = progress
        self.cancel = cancel  # a job's: cancelling it stops what the agent runs for the job
        self.python = host.agent_python
        cache = host.toolchain.cache_dir
        if host.transport == "local":
            if cache is None:
                from farm.config import settings

                cache = str(settings().cache_dir)
            cache = os.path.expanduser(cache)
            self.path = str(AGENT_FILE)
            if not AGENT_FILE.is_file():
                raise HostError(f"agent not found at {AGENT_FILE} (farm must run from its source tree)")
        else:
            self._remote = self._remote_cache(cache or "~/.cache/farm")
            cache = self._remote["cache"]
            self.path = f"{cache}/farm_agent.py"
        self.cache = f"{cache}/agent"
        self.uploaded = False  # did install() upload the agent (for tests and logs)
        if host.transport != "local":
            self.install()

    def _remote_cache(self, cache: str) -> dict:
        """The host's cache dir as an absolute path (``~`` expanded there), created if missing,
        and the sha256 of the agent file in it: asked once per transport."""
        with _installed_lock:
            known = _installed.setdefault(self.transport, {})
        key = (self.python, cache)
        if key not in known:
            done = self.transport.run([self.python, "-c", _CACHE_HELPER, cache], timeout=FACTS_TIMEOUT)
            if done.timed_out:
                raise HostError(f"host {self.host.name!r}: no answer within {FACTS_TIMEOUT} s")
            try:
                reply = json.loads(done.stdout)
            except json.JSONDecodeError:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no output"
                raise HostConfigError(
                    f"host {self.host.name!r}: cannot run the agent's Python {self.python!r} "
                    f"(exit {done.returncode}): {tail}"
                ) from None
            if reply.get("error"):
                raise HostConfigError(f"host {self.host.name!r}: cache dir {cache!r}: {reply['error']}")
            known[key] = reply
        return known[key]

    def install(self) -> bool:
        """Make the host's ``{cache}/farm_agent.py`` this farm's agent (by sha256), uploading it
        over SFTP to a temporary name and renaming it when it differs; checked once per
        transport. Returns whether it uploaded."""
        digest = hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest()
        if self._remote.get("sha256") == digest:
            return False
        tmp = f"{self.path}.tmp-{uuid.uuid4().hex[:12]}"
        self.transport.put(AGENT_FILE, tmp)
        done = self.transport.run([self.python, "-c", _REPLACE_HELPER, tmp, self.path], timeout=FACTS_TIMEOUT)
        if done.returncode != 0 or done.stdout.strip() != digest:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or done.stdout.strip() or "no output"
            raise HostError(f"host {self.host.name!r}: installing the agent at {self.path} failed: {tail}")
        self._remote["sha256"] = digest
        self.uploaded = True
        with _servers_lock:  # a server still running the old agent
            old = _servers.get(self.transport, {}).pop((self.python, self.path), None)
        if old is not None:
            with old[0]:
                if old[1] is not None:
                    old[1].close()
        return True

    def _server(self) -> AgentServer:
        """The agent server of this transport, started when there is none or it died."""
        with _servers_lock:
            entry = _servers.setdefault(self.transport, {}).setdefault((self.python, self.path), [threading.Lock(), None])
        with entry[0]:
            if entry[1] is None or entry[1].dead:
                entry[1] = AgentServer(self.transport, [self.python, self.path, "serve"], self.host.name)
            return entry[1]

    def call(self, *args: str, timeout: float = FACTS_TIMEOUT, check: bool = True) -> dict:
        if hasattr(self.transport, "start"):
            done = self._server().call(list(args), timeout=timeout, on_line=self._progress, cancel=self.cancel)
        else:
            done = self.transport.run([self.python, self.path, *args], timeout=timeout, on_line=self._progress,
                                      cancel=self.cancel)
        what = f"host {self.host.name!r}: agent {args[0]}"
        if done.timed_out:
            raise HostError(f"{what}: no answer within {timeout:.0f} s")
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            tail = done.stderr.strip().splitlines()[-3:]
            raise HostError(f"{what}: exit {done.returncode}, no JSON reply: {' | '.join(tail) or 'no output'}") from None
        if check and (done.returncode != 0 or not reply.get("ok", True)):
            raise AgentError(f"{what}: {reply.get('error') or f'exit {done.returncode}'}")
        return reply

    def _progress(self, line: str) -> None:
        if self.progress and line.startswith("progress: "):
            self.progress(line[len("progress: "):])

    def facts(self, target: str | None = None) -> dict:
        """Host facts; with ``target`` only that qemu-system-TARGET is looked at (faster)."""
        return self.call("facts", "--cache", self.cache, *(["--target", target] if target else []))

    def job(self, libvirt: str, target: str, timeout: float, qemu_binary: str | None = None,
            qemu_source: str | None = None, expect_arch: str | None = None) -> dict:
        """facts + toolchains + probe in one agent run. The reply says how far it got:
        ``facts`` (always, unless the agent failed early), ``libvirt``, ``qemu``, ``probe``, and
        ``dump``: the text the probe wrote (it travels in the reply, compressed)."""
        args = ["job", "--libvirt", libvirt, "--target", target, "--out", "-", "--timeout", str(timeout),
                "--cache", self.cache]
        for flag, value in (("--qemu-binary", qemu_binary), ("--qemu-source", qemu_source),
                            ("--expect-arch", expect_arch)):
            if value:
                args += [flag, value]
        reply = self.call(*args, timeout=BUILD_TIMEOUT + timeout, check=False)
        if reply.get("dump") is not None:
            try:
                reply["dump"] = inflate(reply["dump"])
            except ValueError as e:
                raise HostError(f"host {self.host.name!r}: agent job: the dump in its reply is damaged: {e}") from None
        return reply
