"""Real git, run as a subprocess on a checkout: the few operations publishing needs.

Every call runs ``git -C <checkout>`` with an argv list (no shell), a fixed locale and no
interactive prompts; a failure is a GitError whose message has git's own last line of stderr,
with any secret the caller names scrubbed out.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from farm.errors import FarmError


class GitError(FarmError):
    """A git command failed (the message names the command and git's reason)."""


def scrub(text: str, secrets: Sequence[str]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "**********")
    return text


@dataclass
class Git:
    checkout: Path
    name: str | None = None  # identity of commits (user.name / user.email for this process only)
    email: str | None = None
    secrets: list[str] = field(default_factory=list)  # never shown in messages
    timeout: float = 600.0

    def _argv(self, args: Sequence[str]) -> list[str]:
        argv = ["git", "-C", str(self.checkout), "-c", "commit.gpgsign=false", "-c", "core.quotepath=off"]
        if self.name:
            argv += ["-c", f"user.name={self.name}"]
        if self.email:
            argv += ["-c", f"user.email={self.email}"]
        return argv + list(args)

    def run(self, *args: str, check: bool = True, what: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ, LC_ALL="C", GIT_TERMINAL_PROMPT="0", GIT_ASKPASS="/bin/false",
                   GIT_SSH_COMMAND=os.environ.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes"))
        try:
            done = subprocess.run(self._argv(args), capture_output=True, text=True, env=env,
                                  stdin=subprocess.DEVNULL, timeout=self.timeout, errors="replace")
        except FileNotFoundError:
            raise GitError("git not found on PATH: install it (apt-get install git)") from None
        except subprocess.TimeoutExpired:
            raise GitError(f"git {args[0]} in {self.checkout} took longer than {self.timeout:.0f} s") from None
        if check and done.returncode != 0:
            lines = [line.strip() for line in (done.stderr or done.stdout).splitlines() if line.strip()]
            fatal = [line for line in lines if line.startswith(("fatal:", "error:"))]
            reason = (fatal or lines or [f"exit status {done.returncode}"])[0 if fatal else -1]
            raise GitError(scrub(f"{what or 'git ' + args[0]} failed in {self.checkout}: {reason}", self.secrets))
        return done

    def out(self, *args: str, what: str | None = None) -> str:
        return self.run(*args, what=what).stdout.strip()

    def ok(self, *args: str) -> bool:
        return self.run(*args, check=False).returncode == 0

    # --- questions ------------------------------------------------------------------

    def is_repository(self) -> bool:
        return self.ok("rev-parse", "--git-dir")

    def status(self) -> list[str]:
        """`git status --porcelain` lines (untracked files included, ignored ones not)."""
        return self.run("status", "--porcelain", "--untracked-files=all").stdout.splitlines()

    def current_branch(self) -> str | None:
        done = self.run("symbolic-ref", "--quiet", "--short", "HEAD", check=False)
        return done.stdout.strip() or None

    def head(self) -> str:
        return self.out("rev-parse", "HEAD")

    def branch_exists(self, branch: str) -> bool:
        return self.ok("rev-parse", "--verify", "--quiet", f"refs/heads/{branch}")

    def remote_url(self, remote: str) -> str | None:
        done = self.run("remote", "get-url", remote, check=False)
        return done.stdout.strip() or None

    def config(self, key: str) -> str | None:
        done = self.run("config", "--get", key, check=False)
        return done.stdout.strip() or None

    def remote_default_branch(self, remote: str) -> str | None:
        """The branch the remote's HEAD points at (asks the remote)."""
        done = self.run("ls-remote", "--symref", remote, "HEAD", check=False)
        for line in done.stdout.splitlines():
            if line.startswith("ref: refs/heads/") and line.endswith("\tHEAD"):
                return line[len("ref: refs/heads/"):-len("\tHEAD")]
        return None
