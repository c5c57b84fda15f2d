"""Talking to the farm agent (agents/farm_agent.py) on a host, through its transport."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from farm.hosts import HostError, Transport

AGENT_FILE = Path(__file__).resolve().parents[2] / "agents" / "farm_agent.py"

# seconds; toolchain builds can take long on slow hosts
FACTS_TIMEOUT = 60
BUILD_TIMEOUT = 4 * 3600


class AgentError(HostError):
    """The agent ran and reported a failure."""


class Agent:
    """The agent of one host. Every call runs ``python3 farm_agent.py SUBCOMMAND ...``."""

    def __init__(self, transport: Transport, host, progress: Callable[[str], None] | None = None):
        self.transport = transport
        self.host = host
        self.progress = progress
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
            cache = cache or "~/.cache/farm"
            self.path = f"{cache}/farm_agent.py"
        self.cache = f"{cache}/agent"

    def call(self, *args: str, timeout: float = FACTS_TIMEOUT, check: bool = True) -> dict:
        argv = [self.python, self.path, *args]
        done = self.transport.run(argv, timeout=timeout, on_line=self._progress)
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

    def libvirt(self, source: str) -> dict:
        """Prepare (or find cached) qemucapsprobe from ``debian:VERSION`` or ``git:URL@REF``."""
        return self.call("toolchain", "libvirt", "--source", source, "--cache", self.cache, timeout=BUILD_TIMEOUT)

    def qemu_binary(self, path: str) -> dict:
        return self.call("toolchain", "qemu", "--binary", path)

    def qemu_build(self, source: str, target: str) -> dict:
        return self.call(
            "toolchain", "qemu", "--source", source, "--target", target, "--cache", self.cache,
            timeout=BUILD_TIMEOUT,
        )

    def probe(self, probe: str, qemu: str, out: str, timeout: float) -> dict:
        """Run qemucapsprobe; the reply says whether it worked (ok, timed_out, stderr_tail)."""
        return self.call(
            "probe", "--probe", probe, "--qemu", qemu, "--out", out, "--timeout", str(timeout),
            timeout=timeout + 60,
            check=False,
        )
