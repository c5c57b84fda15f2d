"""Bash completion through argcomplete: the real completion of `python -m farm`, asked as bash asks it
(COMP_LINE, COMP_POINT, _ARGCOMPLETE set by the function `register-python-argcomplete farm` defines),
as argcomplete's own tests do; and the registration script bash evaluates."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.helpers import REPO


def complete(line: str, tmp_path: Path) -> list[str]:
    out = tmp_path / "completions"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FARM_", "_ARGCOMPLETE", "COMP_"))}
    env.update(COMP_LINE=line, COMP_POINT=str(len(line)), COMP_TYPE="9", _ARGCOMPLETE="1",
               _ARGCOMPLETE_IFS="\n", _ARGCOMPLETE_STDOUT_FILENAME=str(out))
    done = subprocess.run([sys.executable, "-m", "farm"], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    return sorted(w.strip() for w in out.read_text().split("\n") if w.strip())


def test_farm_ru_completes_to_runs(tmp_path):
    assert complete("farm ru", tmp_path) == ["runs"]


def test_farm_runs_offers_its_actions(tmp_path):
    assert complete("farm runs ", tmp_path) == ["cancel", "list", "resume", "show"]


def test_farm_config_offers_show_and_options_complete_after_a_dash(tmp_path):
    assert complete("farm config ", tmp_path) == ["show"]
    assert {"--broker", "--json", "--inventory", "--libvirt"} <= set(complete("farm config show --", tmp_path))
    assert complete("farm probe --qe", tmp_path) == ["--qemu"]


def test_without_the_completion_variables_farm_runs_as_usual(tmp_path):
    done = subprocess.run([sys.executable, "-m", "farm", "config", "show", "--json"], cwd=REPO, capture_output=True,
                          text=True, timeout=60, env={**os.environ, "FARM_CONFIG": str(tmp_path / "none.toml")})
    assert done.returncode == 2 and "no such config file" in done.stderr


def test_the_registration_bash_evaluates_defines_a_completion_for_farm(tmp_path):
    register = Path(sys.executable).parent / "register-python-argcomplete"
    script = subprocess.run([str(register), "farm"], capture_output=True, text=True, timeout=60, check=True).stdout
    done = subprocess.run(["bash", "-c", script + "\ncomplete -p farm"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "farm" in done.stdout and "-F" in done.stdout
