"""The README is the contract: every command and option it documents exists in the real parser and
every option of the parser is documented; every `FARM_*` setting of the settings model is in its
configuration table and every `FARM_*` it names is a setting (or one of ./bootstrap's own); the
`--json` keys it documents are in the commands' real output. A renamed option or a new setting
without docs fails here."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from farm.cli import _parser
from farm.config import Settings
from tests.helpers import REPO, farm
from tests.standin import QEMU, standin_builddir
from tests.test_faults import local_inventory

README = (REPO / "README.md").read_text(encoding="utf-8")
BOOTSTRAP_VARIABLES = {"FARM_CACHE", "FARM_VENV"}  # ./bootstrap's own, not farm's settings
CONFIG_VARIABLES = {"FARM_CONFIG"}  # names the config file the settings are read from; not a setting
GLOBAL_OPTIONS = {"-h", "--help", "--json"}  # "Every command takes --json"


def subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def leaf_commands(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> dict[tuple[str, ...], argparse.ArgumentParser]:
    children = subcommands(parser)
    if not children:
        return {path: parser}
    found = {}
    for name, child in children.items():
        found.update(leaf_commands(child, path + (name,)))
    return found


def options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for action in parser._actions for o in action.option_strings if o.startswith("--")} - GLOBAL_OPTIONS


def sections() -> list[tuple[str, str]]:
    """(heading, body) of each `###` section of the README."""
    parts = re.split(r"^### (.*)$", README, flags=re.M)
    return [(parts[i], parts[i + 1]) for i in range(1, len(parts) - 1, 2)]


def documented_commands() -> dict[tuple[str, ...], tuple[set[str], str]]:
    """Per command path named in a section heading: (the options its heading shows, the section's text)."""
    root = _parser()
    documented: dict[tuple[str, ...], tuple[set[str], str]] = {}
    for heading, body in sections():
        for span in re.findall(r"`(farm [^`]*)`", heading):
            tokens = span.split()[1:]
            parser, path = root, ()
            while tokens and tokens[0] in subcommands(parser):
                parser = subcommands(parser)[tokens[0]]
                path += (tokens.pop(0),)
            documented[path] = (set(re.findall(r"--[a-z][a-z-]*", span)), heading + body)
    return documented


def test_every_command_of_the_parser_has_a_readme_section_and_every_heading_names_a_real_command():
    commands = leaf_commands(_parser())
    documented = documented_commands()
    assert sorted(" ".join(c) for c in commands if c not in documented) == []
    assert sorted(" ".join(c) for c in documented if c not in commands) == []


def test_every_option_of_every_command_is_documented_in_its_section_and_every_documented_one_exists():
    commands = leaf_commands(_parser())
    missing, unreal = [], []
    for path, (shown, text) in documented_commands().items():
        if path not in commands:
            continue
        real = options(commands[path])
        missing += [f"farm {' '.join(path)} {o}" for o in sorted(real) if not re.search(rf"{re.escape(o)}\b", text)]
        unreal += [f"farm {' '.join(path)} {o}" for o in sorted(shown - real - GLOBAL_OPTIONS)]
    assert missing == [], "options the README does not document"
    assert unreal == [], "options the README shows that the parser does not have"


def test_every_setting_is_in_the_configuration_table_and_every_farm_variable_named_is_a_setting():
    settings = {f"FARM_{name.upper()}" for name in Settings.model_fields}
    table = README.split("## Configuration", 1)[1].split("\n## ", 1)[0]
    in_table = set(re.findall(r"`(FARM_[A-Z_]+)`", table))
    assert sorted(settings - in_table) == [], "settings missing from the README's configuration table"
    named = set(re.findall(r"\bFARM_[A-Z][A-Z_]*[A-Z]\b", README))
    assert sorted(named - settings - BOOTSTRAP_VARIABLES - CONFIG_VARIABLES) == [], "FARM_* variables the README names that do not exist"


def json_keys_documented(command: str) -> set[str]:
    """The "key"s the README shows after `--json` in the section of ``command``."""
    text = documented_commands()[tuple(command.split())][1]
    keys: set[str] = set()
    for tail in text.split("`--json`")[1:]:
        paragraph = tail.split("\n\n", 1)[0]
        keys |= set(re.findall(r'"([a-z_]+)"', paragraph))
    return keys


def json_keys(value) -> set[str]:
    if isinstance(value, dict):
        return set(value) | {k for v in value.values() for k in json_keys(v)}
    if isinstance(value, list):
        return {k for v in value for k in json_keys(v)}
    return set()


@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A state dir with one run of the stand-in probe; the dump it made."""
    import os

    from tests.paths import CACHE

    tmp = tmp_path_factory.mktemp("readme")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_STATE_DIR=str(tmp / "state"), FARM_CACHE_DIR=str(CACHE))
    inventory = local_inventory(tmp / "inventory.yaml", standin_builddir(tmp / "standin", 0), ["x86-a"])
    code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory),
                          "--json", "--quiet")
    assert code == 0, err
    return env, inventory, out


@pytest.mark.parametrize("command, args", [
    ("replies validate", ["{broken}"]),
    ("replies inspect", ["{dump}"]),
    ("hosts list", ["--inventory", "{inventory}"]),
    ("config show", []),
    ("probe", ["--qemu", QEMU, "--arch", "x86_64", "--inventory", "{inventory}", "--quiet"]),
])
def test_the_json_keys_the_readme_documents_are_in_the_real_output(probed, command, args):
    env, inventory, run = probed
    dump = run["jobs"][0]["artifact"]
    broken = Path(dump).with_name("broken.replies")  # a dump with a problem, so that problems show theirs
    broken.write_text(Path(dump).read_text().replace('"return": {', '"return": {"x-unhandled": 1, ', 1))
    argv = [a.format(dump=dump, broken=broken, inventory=inventory) for a in args]
    documented = json_keys_documented(command)
    assert documented, f"the README documents no --json keys for farm {command}"
    code, out, err = farm(env, *command.split(), *argv, "--json")
    assert out is not None, err
    assert sorted(documented - json_keys(out)) == []


def test_the_json_keys_of_runs_cancel_are_in_its_real_output(env, tmp_path):
    import subprocess
    import sys

    from tests.test_runs_control import standin_running, wait_until

    standin = standin_builddir(tmp_path / "standin", 60)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["x86-a"])
    cli = subprocess.Popen([sys.executable, "-m", "farm", "probe", "--qemu", QEMU, "--arch", "x86_64",
                            "--inventory", str(inventory), "--quiet"], env=env, cwd=REPO)
    wait_until(lambda: standin_running(standin), what="the stand-in probe starting")
    code, out, err = farm(env, "runs", "cancel", "1", "--json")
    cli.wait(30)
    assert out is not None and out["cancelled"], err
    assert sorted(json_keys_documented("runs cancel") - json_keys(out)) == []
