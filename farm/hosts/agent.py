"""Talking to the farm agent (agents/farm_agent.py) on a host, through its transport."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
import threading
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import overload

from pydantic import ValidationError

from farm.hosts import Cancellation, HostConfigError, HostError, Transport, inflate
from farm.hosts.replies import JobReply
from farm.hosts.server import AgentServer


def _agent_file() -> Path:
    """The agent: inside the installed package (a wheel carries it as farm/_agent/farm_agent.py,
    see setup.py), else in the source tree (agents/farm_agent.py: a checkout or editable install)."""
    here = Path(__file__).resolve()
    packaged = here.parents[1] / "_agent" / "farm_agent.py"
    return packaged if packaged.is_file() else here.parents[2] / "agents" / "farm_agent.py"


AGENT_FILE = _agent_file()

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
# move an uploaded file (argv[1]) into place (argv[2]) atomically if its sha256 is argv[3]
# (else remove it and exit 1); print the sha256 of the upload
_REPLACE_HELPER = """\
import hashlib, os, sys
digest = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
print(digest.hexdigest())
if digest.hexdigest() != sys.argv[3]:
    os.unlink(sys.argv[1])
    sys.exit(1)
os.chmod(sys.argv[1], 0o644)
os.replace(sys.argv[1], sys.argv[2])
"""
# is a staged file there (its name holds its sha256: it is only ever renamed into place once
# verified), with this size? Creates its directory. Prints {"present": bool}
_STAGED_HELPER = """\
import json, os, sys
try:
    os.makedirs(os.path.dirname(sys.argv[1]), exist_ok=True)
    present = os.path.getsize(sys.argv[1]) == int(sys.argv[2])
except OSError as e:
    present = False
    if not os.path.isdir(os.path.dirname(sys.argv[1])):
        print(json.dumps({"error": "cannot create %s: %s" % (os.path.dirname(sys.argv[1]), e.strerror or e)}))
        sys.exit(1)
print(json.dumps({"present": present}))
"""

# per transport: (python, cache as configured) -> {"cache": absolute path, "sha256": of the agent there}
_installed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_installed_lock = threading.Lock()
# per transport: staged file path on the host -> lock (held while it is checked or uploaded; then known present)
_staged: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_staged_lock = threading.Lock()
# per transport that can keep a command running (ssh): (python, agent path) -> [lock, its AgentServer]
# (a lock per server: a host slow to start one does not hold up the others)
_servers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_servers_lock = threading.Lock()


class AgentError(HostError):
    """The agent ran and reported a failure."""


ONE_LINE = 300  # characters of an error in a job's reasons


def one_line(text: str, limit: int = ONE_LINE) -> str:
    """A failure's text as one line of at most ``limit`` characters: its first line and its telling
    line (the last ``E:``, ``error``, ``fatal:`` or ``FAILED`` line of a tool's output)."""
    lines = [" ".join(line.split()) for line in str(text).splitlines() if line.strip()]
    if not lines:
        return ""
    first = lines[0]
    telling = next((line for line in reversed(lines[1:]) if re.match(r"(E:|error|ERROR|fatal:|FAILED)", line)), None)
    out = first if telling is None or telling in first else f"{first} {telling}"
    return out if len(out) <= limit else out[: limit - 3] + "..."


def is_bundle(url: str) -> bool:
    """Is a git source's URL a git bundle file of the coordinator (staged on the host like a tarball)?"""
    return url.startswith("/") and url.endswith(".bundle")


_digests: dict[tuple, tuple[str, int]] = {}
_digests_lock = threading.Lock()


def file_digest(path: Path) -> tuple[str, int]:
    """(sha256, size) of a file of this machine, computed once per (path, size, mtime)."""
    try:
        st = path.stat()
    except OSError as e:
        raise HostError(f"{path}: cannot read it: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise HostError(f"{path}: not a regular file")
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ino)
    with _digests_lock:
        if key in _digests:
            return _digests[key]
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    except OSError as e:
        raise HostError(f"{path}: cannot read it: {e.strerror or e}") from None
    with _digests_lock:
        _digests[key] = (digest.hexdigest(), st.st_size)
    return _digests[key]


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
                raise HostError(f"agent not found at {AGENT_FILE} (neither in the installed package nor in a source tree)")
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

    def _upload(self, local: Path, remote: str, digest: str, what: str, timeout: float = FACTS_TIMEOUT) -> None:
        """Put ``local`` at ``remote`` on the host: over SFTP to a temporary name beside it, then
        renamed into place once its sha256 there is ``digest`` (never a half-written file)."""
        tmp = f"{remote}.tmp-{uuid.uuid4().hex[:12]}"
        self.transport.put(local, tmp)
        done = self.transport.run([self.python, "-c", _REPLACE_HELPER, tmp, remote, digest], timeout=timeout)
        if done.returncode != 0 or done.stdout.strip() != digest:
            tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or done.stdout.strip() or "no output"
            raise HostError(f"host {self.host.name!r}: {what} at {remote} failed: {tail}")

    def install(self) -> bool:
        """Make the host's ``{cache}/farm_agent.py`` this farm's agent (by sha256), uploading it
        over SFTP to a temporary name and renaming it when it differs; checked once per
        transport. Returns whether it uploaded."""
        digest = hashlib.sha256(AGENT_FILE.read_bytes()).hexdigest()
        if self._remote.get("sha256") == digest:
            return False
        self._upload(AGENT_FILE, self.path, digest, "installing the agent")
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
        except (ValueError, RecursionError):
            tail = done.stderr.strip().splitlines()[-3:]
            raise HostError(f"{what}: exit {done.returncode}, no JSON reply: {' | '.join(tail) or 'no output'}") from None
        if not isinstance(reply, dict):
            raise HostError(f"{what}: exit {done.returncode}, its reply is not a JSON object")
        if check and (done.returncode != 0 or not reply.get("ok", True)):
            raise AgentError(f"{what}: {reply.get('error') or f'exit {done.returncode}'}")
        return reply

    def _one_line(self, text: str) -> str:
        """An agent's error as one line for a job's reasons; a longer text also goes to progress."""
        line = one_line(text)
        if line != text.strip() and self.progress:
            for part in text.strip().splitlines():
                self.progress(f"error: {part}")
        return line

    def _progress(self, line: str) -> None:
        if self.progress and line.startswith("progress: "):
            self.progress(line[len("progress: "):])

    def facts(self, target: str | None = None, reach: list[str] | None = None) -> dict:
        """Host facts; with ``target`` only that qemu-system-TARGET is looked at (faster); with
        ``reach`` (HOST:PORT, or ``apt``) whether the host can open TCP connections there."""
        args = ["facts", "--cache", self.cache, *(["--target", target] if target else [])]
        for endpoint in reach or []:
            args.append(f"--reach={endpoint}")  # one argument: an endpoint never reads as an option
        return self.call(*args)

    def network(self) -> dict:
        """Does this host's toolchain need network access, and does the host have it (best effort:
        a TCP connection to each source's host, a few seconds at most each)?
        {"needs": bool, "sources": {"libvirt"|"qemu": endpoint}, "reachable": bool|None, "checks": [...]}"""
        sources = self.host.toolchain.network()
        if not sources:
            return {"needs": False, "sources": {}, "reachable": None, "checks": []}
        checks = self.facts(reach=list(dict.fromkeys(sources.values()))).get("reach") or []
        return {"needs": True, "sources": sources, "checks": checks,
                "reachable": bool(checks) and all(c.get("ok") for c in checks)}

    def stage(self, local: str | os.PathLike[str]) -> str:
        """The path on the host of a file of this machine (a source tarball): for a ``local`` host
        the file itself; over SSH ``{cache}/staged/<sha256>/<name>``, uploaded once by sha256 over
        SFTP (checked once per transport, then known)."""
        path = Path(local)
        if self.host.transport == "local":
            return str(path)
        digest, size = file_digest(path)
        name = re.sub(r"[^A-Za-z0-9._+-]", "_", path.name).lstrip(".") or "source"
        remote = f"{self.cache}/staged/{digest}/{name}"
        with _staged_lock:
            known = _staged.setdefault(self.transport, {})
            lock = known.setdefault(remote, [threading.Lock(), False])
        with lock[0]:
            if lock[1]:
                return remote
            done = self.transport.run([self.python, "-c", _STAGED_HELPER, remote, str(size)], timeout=FACTS_TIMEOUT)
            try:
                reply = json.loads(done.stdout)
            except json.JSONDecodeError:
                tail = " | ".join(done.stderr.strip().splitlines()[-3:]) or "no output"
                raise HostError(f"host {self.host.name!r}: staging {path.name}: {tail}") from None
            if reply.get("error"):
                raise HostError(f"host {self.host.name!r}: staging {path.name}: {reply['error']}")
            if not reply.get("present"):
                if self.progress:
                    self.progress(f"staging {path} ({size} bytes) into {remote}")
                self._upload(path, remote, digest, f"staging {path.name}", timeout=BUILD_TIMEOUT)
            lock[1] = True
        return remote

    @overload
    def _staged_source(self, source: str) -> str: ...
    @overload
    def _staged_source(self, source: str | None) -> str | None: ...

    def _staged_source(self, source: str | None) -> str | None:
        """A toolchain source as the agent on the host reads it: ``tarball:PATH`` and
        ``git:PATH.bundle@REF`` (files of this machine: a source tarball, a git bundle) staged on
        the host; other sources as they are."""
        if source and source.startswith("tarball:"):
            return "tarball:" + self.stage(source[len("tarball:"):])
        if source and source.startswith("git:"):
            url, _, ref = source[len("git:"):].rpartition("@")
            if is_bundle(url):
                return f"git:{self.stage(url)}@{ref}"
        return source

    def job(self, libvirt: str, target: str, timeout: float, qemu_binary: str | None = None,
            qemu_source: str | None = None, expect_arch: str | None = None) -> JobReply:
        """facts + toolchains + probe in one agent run, parsed (a reply that does not parse is a
        HostError). The reply says how far it got:
        ``facts`` (always, unless the agent failed early), ``libvirt``, ``qemu``, ``probe``, and
        ``dump``: the text the probe wrote (it travels in the reply, compressed).

        ``tarball:PATH`` sources are files of this machine, staged on the host first (``stage``);
        the reply names them as given. An error the agent reports is one line in ``error`` (the
        whole text, e.g. a tool's output, goes to progress: the job's log)."""
        asked = libvirt
        libvirt, qemu_source = self._staged_source(libvirt), self._staged_source(qemu_source)
        args = ["job", "--libvirt", libvirt, "--target", target, "--out", "-", "--timeout", str(timeout),
                "--cache", self.cache]
        for flag, value in (("--qemu-binary", qemu_binary), ("--qemu-source", qemu_source),
                            ("--expect-arch", expect_arch)):
            if value:
                args += [flag, value]
        reply = self.call(*args, timeout=BUILD_TIMEOUT + timeout, check=False)
        if isinstance(reply.get("libvirt"), dict) and reply["libvirt"].get("source") == libvirt:
            reply["libvirt"]["source"] = asked  # as the inventory says it (provenance, nightly's plan)
        if isinstance(reply.get("error"), str):
            reply["error"] = self._one_line(reply["error"])
        if isinstance(reply.get("dump"), str):
            try:
                reply["dump"] = inflate(reply["dump"])
            except ValueError as e:
                raise HostError(f"host {self.host.name!r}: agent job: the dump in its reply is damaged: {e}") from None
        try:
            return JobReply.model_validate(reply)
        except ValidationError as e:
            first = e.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            raise HostError(f"host {self.host.name!r}: agent job: malformed reply: {where}: {first['msg']}") from None
