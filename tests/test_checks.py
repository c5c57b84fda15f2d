"""The import contracts of pyproject.toml (run by `./bootstrap check` and .ci/run) hold, name
every module they must, and catch an import cycle even when a function-level import hides it."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import farm
from tests.helpers import REPO

LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"
CONFIG = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]


def contract(name_starts: str) -> dict:
    (found,) = [c for c in CONFIG["contracts"] if c["name"].startswith(name_starts)]
    return found


def lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), "--no-cache"], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_the_purity_contract_of_caps_names_every_other_module_of_farm():
    modules = {f"farm.{m.name}" for m in pkgutil.iter_modules(farm.__path__)}
    assert set(contract("farm.caps is pure")["forbidden_modules"]) == modules - {"farm.caps", "farm.errors"}


def test_the_import_contracts_hold():
    done = lint_imports(REPO)
    assert done.returncode == 0, done.stdout[-3000:]
    assert "3 kept, 0 broken" in done.stdout


def test_a_cycle_through_a_function_level_import_breaks_the_contracts(tmp_path):
    shutil.copytree(REPO / "farm", tmp_path / "farm", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    distributed = tmp_path / "farm" / "dispatch" / "distributed.py"
    distributed.write_text(distributed.read_text() + "\n\ndef _nightly_again():\n    from farm import nightly\n\n"
                           "    return nightly\n")
    done = lint_imports(tmp_path)
    assert done.returncode == 1, done.stdout[-3000:]
    assert "no import cycles between the modules and packages of any package BROKEN" in done.stdout
