"""Hostile dumps from a host: `farm probe` judges them, it never raises on them. The probe is
the replaying stand-in (tests/standin.py) replaying a damaged copy of a real dump, on a real
`local` host through the real agent; the coordinator, ledger and CLI are the real ones.

A dump nested thousands deep used to be a RecursionError in the judging (the job then stayed
`running`); a schema key `[/]` crashed the rich output of probe, runs show and status."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers import REPO, farm
from tests.standin import QEMU, RECORDED, standin_builddir

SCHEMA_ENTRY = '    {\n      "name": "query-status",\n'


def inventory(path: Path, standin: Path, name: str) -> Path:
    path.write_text(f"hosts:\n  - name: {name}\n    transport: local\n    arch: x86_64\n"
                    f"    toolchain:\n      libvirt: builddir:{standin}\n      qemu: system\n")
    return path


def probe_text(env: dict, inventory: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "farm", "probe", "--qemu", QEMU, "--arch", "x86_64", "--quiet",
                           "--inventory", str(inventory)], env=env, capture_output=True, text=True, cwd=REPO,
                          timeout=300)


@pytest.mark.parametrize(("case", "damage", "reason", "shown"), [
    ("nested 5000 deep", lambda t: t.replace('"micro": 0,', '"micro": ' + "[" * 5000 + "]" * 5000 + ",", 1),
     "invalid JSON: nested deeper than 64 levels", "nested deeper"),
    ("a duplicate key", lambda t: t.replace('"micro": 0,', '"micro": 0,\n      "micro": 0,', 1),
     "invalid JSON: duplicate key 'micro'", "duplicate key"),
    ("markup as schema keys", lambda t: t.replace(SCHEMA_ENTRY, SCHEMA_ENTRY + '      "[/]": "x",\n'
                                                  '      "[bold]": "y",\n', 1),
     "unhandled keys '[/]', '[bold]'", "unhandled keys '[/]'"),
])
def test_a_hostile_dump_from_a_host_is_an_invalid_job_shown_literally(env, tmp_path, case, damage, reason, shown):
    dumped = tmp_path / "damaged.replies"
    dumped.write_text(damage(RECORDED.read_text()))
    standin = standin_builddir(tmp_path / "build", 0, dumped)
    inv = inventory(tmp_path / "inventory.yaml", standin, "x86-1")

    done = probe_text(env, inv)
    assert done.returncode == 1 and all(line.startswith("farm: ") for line in done.stderr.splitlines()), done.stderr
    assert "invalid" in done.stdout and shown in done.stdout, done.stdout

    code, runs, _ = farm(env, "runs", "list", "--json")
    run = runs[0]
    (job,) = run["jobs"]
    assert run["status"] != "running" and (job["status"], job["verdict"]) == ("invalid", "invalid")
    assert any(reason in r for r in job["reasons"]), job["reasons"]

    for command in (["runs", "show", str(run["run"])], ["status", "--inventory", str(inv)], ["runs", "list"]):
        done = subprocess.run([sys.executable, "-m", "farm", *command], env=env, capture_output=True, text=True,
                              cwd=REPO, timeout=60)
        assert done.returncode == 0 and done.stderr == "", (command, done.stderr)
        if command[1] == "show":
            assert shown in done.stdout, done.stdout


def test_markup_in_a_host_failure_and_probe_stderr_is_shown_literally(env, tmp_path):
    """A probe whose stderr is rich markup (`[/]`, `[bold]`) fails the job; probe, runs show and
    status show the words as they are."""
    build = tmp_path / "build"
    probe = build / "tests" / "qemucapsprobe"
    probe.parent.mkdir(parents=True)
    probe.write_text("#!/bin/sh\necho 'error: [/] [bold]boom[/bold] [red]' >&2\nexit 3\n")
    probe.chmod(0o755)
    inv = inventory(tmp_path / "inventory.yaml", build, "markup-1")
    done = probe_text(env, inv)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert "[/] [bold]boom[/bold] [red]" in done.stdout
    code, runs, _ = farm(env, "runs", "list", "--json")
    shown = subprocess.run([sys.executable, "-m", "farm", "runs", "show", str(runs[0]["run"])], env=env,
                           capture_output=True, text=True, cwd=REPO, timeout=60)
    assert shown.returncode == 0 and "[/] [bold]boom[/bold] [red]" in shown.stdout, shown.stderr
    status = subprocess.run([sys.executable, "-m", "farm", "status", "--inventory", str(inv)], env=env,
                            capture_output=True, text=True, cwd=REPO, timeout=60)
    assert status.returncode == 0 and status.stderr == "", status.stderr
