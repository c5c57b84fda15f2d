"""Hostile inventories: each is refused by `farm hosts list` with exit 2 and one line on stderr
naming the file (and line, host and field where there are some), nothing on stdout, nothing
written (no state directory). YAML bombs and deep nesting are refused within seconds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from farm.cli import main as farm
from farm.inventory import MAX_BYTES
from tests.helpers import REPO

KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIM1pKiCkLYhB1GdD0Y1IKDN8JrPqDXUQCfUUNnjtOPHd"


def host(**fields: object) -> str:
    """An ssh host entry with ``fields`` (None: left out), under ``hosts:``."""
    fields = {"name": "x-1", "arch": "x86_64", "address": "x-1.example.org", "host_key": KEY, **fields}
    lines = [f"{k}: {v}" for k, v in fields.items() if v is not None]
    return "hosts:\n  - " + "\n    ".join(lines) + "\n"


def local(**fields: object) -> str:
    return host(transport="local", address=None, host_key=None, **fields)


def alias_bomb(levels: int) -> str:
    """The 'billion laughs': each level a list of nine aliases of the level below."""
    names = [f"l{i}" for i in range(levels + 1)]
    text = f"{names[0]}: &{names[0]} [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n"
    for below, level in zip(names, names[1:], strict=False):
        text += f"{level}: &{level} [{', '.join(['*' + below] * 9)}]\n"
    return text + f"hosts: *{names[-1]}\n"


GIT = "https://gitlab.com/libvirt/libvirt.git"

# (id, inventory text, fragments of the one-line message, in order)
BAD: list[tuple[str, str, list[str]]] = [
    # ports and counts are integers in range, not whatever YAML or pydantic would coerce
    ("port true", host(port="true"), [":6:", "host 'x-1'", "field 'port'", "expected an integer, not a boolean"]),
    ("port false", host(port="false"), ["field 'port'", "expected an integer, not a boolean"]),
    ("port a string", host(port="'22'"), ["field 'port'", "expected an integer, not a string"]),
    ("port a float", host(port="22.0"), ["field 'port'", "expected an integer, not a float"]),
    ("port null", host(port="null"), ["field 'port'", "expected an integer, not a null"]),
    ("port 0", host(port="0"), ["field 'port'", "greater than or equal to 1"]),
    ("port 65536", host(port="65536"), ["field 'port'", "less than or equal to 65535"]),
    ("port -22", host(port="-22"), ["field 'port'", "greater than or equal to 1"]),
    ("port 10**30", host(port=str(10**30)), ["field 'port'", "less than or equal to 65535"]),
    ("port a list", host(port="[22]"), ["field 'port'", "expected an integer, not a list"]),
    ("defaults port true", "defaults:\n  port: true\n" + host(), [":2:", "defaults: field 'port'",
                                                                 "expected an integer, not a boolean"]),
    ("max_jobs true", host(max_jobs="true"), ["field 'max_jobs'", "expected an integer, not a boolean"]),
    ("max_jobs a string", host(max_jobs="'2'"), ["field 'max_jobs'", "expected an integer, not a string"]),
    # YAML bombs and nesting
    ("alias bomb, 8 levels", alias_bomb(8), [":", "more than 200000 values once its aliases are expanded"]),
    ("alias bomb, 5 levels", alias_bomb(5), ["more than 200000 values once its aliases are expanded"]),
    ("flow nesting 5000 deep", "hosts: " + "[" * 5000 + "]" * 5000 + "\n", [":1:", "nested deeper than 32 levels"]),
    ("block nesting 5000 deep", "hosts:\n  " + "- " * 5000 + "x\n", [":2:", "nested deeper than 32 levels"]),
    ("mapping nesting 40 deep", "".join(" " * i + f"k{i}:\n" for i in range(40)) + " " * 40 + "v\n",
     [":33:", "nested deeper than 32 levels"]),
    ("an undefined alias", "hosts: *nope\n", [":1:", "YAML syntax error", "found undefined alias 'nope'"]),
    ("a python object tag", "hosts: !!python/object/apply:os.system ['touch /tmp/farm-pwned']\n",
     [":1:", "YAML syntax error", "could not determine a constructor"]),
    ("two documents", "hosts: []\n---\nhosts: []\n", [":2:", "YAML syntax error", "but found another document"]),
    ("a NUL byte", "hosts:\n  - name: a\x00\n", [":2:", "YAML error: special characters are not allowed"]),
    ("a tab as indentation", "hosts:\n\t- name: a\n", [":2:", "YAML syntax error", "found character '\\t'"]),
    ("a key given twice deep down", local(toolchain="\n      qemu: system\n      qemu: system"),
     [":7:", "key 'qemu' given twice"]),
    ("a scalar at the top", "hello\n", ["expected a mapping with a 'hosts:' list at the top, not a string"]),
    ("hosts a mapping", "hosts:\n  name: a\n", ["field 'hosts'", "expected a list, not a mapping"]),
    # git URLs and refs are never options of git
    ("libvirt git URL starting with -", local(toolchain="{libvirt: 'git:--upload-pack=touch@master'}"),
     ["field 'toolchain.libvirt'", "bad source 'git:--upload-pack=touch@master': the git URL starts with '-'"]),
    ("qemu git URL starting with -", local(toolchain="{qemu: 'git:-cprotocol.ext.allow=always@v9.0.0'}"),
     ["field 'toolchain.qemu'", "the git URL starts with '-'"]),
    ("git ref starting with -", local(toolchain=f"{{libvirt: 'git:{GIT}@--output=/tmp/x'}}"),
     ["field 'toolchain.libvirt'", "expected git:URL@REF"]),
    ("git ref with a space", local(toolchain=f"{{qemu: 'git:{GIT}@v9.0.0 --bare'}}"),
     ["field 'toolchain.qemu'", "expected git:URL@REF"]),
    ("git URL with a control character", local(toolchain=f'{{libvirt: "git:{GIT}\\a@master"}}'),
     ["field 'toolchain.libvirt'", "expected git:URL@REF"]),
    ("git URL with a newline", local(toolchain=f'{{libvirt: "git:{GIT}\\n@master"}}'),
     ["field 'toolchain.libvirt'", "expected git:URL@REF"]),
    # names, addresses, users and programs that would be options or shell
    ("host name with markup", host(name="'[bold]x'"), ["host '[bold]x'", "field 'name'", "bad host name '[bold]x'"]),
    ("host name with a newline", host(name='"a\\nb"'), ["field 'name'", "bad host name 'a\\nb'"]),
    ("address an ssh option", host(address="-oProxyCommand=touch"), ["field 'address'",
                                                                     "bad address '-oProxyCommand=touch'"]),
    ("address with shell", host(address="'a;rm -rf /'"), ["field 'address'", "bad address 'a;rm -rf /'"]),
    ("user an option", host(user="-oProxyCommand=x"), ["field 'user'", "bad user name '-oProxyCommand=x'"]),
    ("user with a space", host(user="'farm farm'"), ["field 'user'", "bad user name 'farm farm'"]),
    ("agent_python with shell", local(agent_python="'python3; touch /tmp/farm-pwned'"),
     ["field 'agent_python'", "bad program 'python3; touch /tmp/farm-pwned'"]),
    ("agent_python an option", local(agent_python="-c"), ["field 'agent_python'", "bad program '-c'"]),
    ("agent_python a template", local(agent_python="\"{{ lookup('pipe', 'id') }}\""),
     ["field 'agent_python'", "bad program"]),
    ("defaults user an option", "defaults:\n  user: --help\n" + host(), ["host 'x-1'", "field 'user'",
                                                                        "bad user name '--help'"]),
    # shapes
    ("a variant twice", local(variants="[amdsev, amdsev]"), ["field 'variants[1]'", "variant 'amdsev' listed twice"]),
    ("tags a string", local(tags="lab"), ["field 'tags'", "expected a list, not a string"]),
    ("arch a list", local(arch="[x86_64]"), ["field 'arch'"]),
    ("unknown field", local(pwned="yes"), ["field 'pwned'", "unknown field"]),
]


def run_hosts_list(monkeypatch, capsys, tmp_path: Path, path: Path) -> tuple[int, str, str]:
    monkeypatch.setenv("FARM_STATE_DIR", str(tmp_path / "state"))
    code = farm(["hosts", "list", "--json", "--inventory", str(path)])
    out, err = capsys.readouterr()
    return code, out, err


def test_there_are_at_least_forty_bad_inventories():
    assert len(BAD) >= 40


@pytest.mark.parametrize(("case", "text", "parts"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_inventory_is_one_line_exit_2_and_nothing_written(monkeypatch, capsys, tmp_path, case, text, parts):
    path = tmp_path / "inventory.yaml"
    path.write_text(text)
    started = time.monotonic()
    code, out, err = run_hosts_list(monkeypatch, capsys, tmp_path, path)
    assert time.monotonic() - started < 5
    assert (code, out) == (2, "")
    assert err.startswith(f"farm: {path}") and err.endswith("\n") and err.count("\n") == 1, err
    at = 0
    for part in parts:
        found = err.find(part, at)
        assert found >= 0, (part, err)
        at = found + len(part)
    assert not (tmp_path / "state").exists()


def test_the_alias_bomb_and_deep_nesting_fail_fast_as_processes(tmp_path):
    """As `farm hosts list` processes: an 8-level alias bomb and 5000-deep nesting answer in
    seconds with one line, no traceback."""
    for name, text, words in (("bomb.yaml", alias_bomb(8), "an alias bomb?"),
                              ("deep.yaml", "hosts: " + "[" * 5000 + "]" * 5000 + "\n", "nested deeper than 32"),
                              ("deep-block.yaml", "hosts:\n  " + "- " * 5000 + "x\n", "nested deeper than 32")):
        path = tmp_path / name
        path.write_text(text)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "farm", "hosts", "list", "--inventory", str(path)],
                              capture_output=True, text=True, cwd=REPO, timeout=30)
        assert time.monotonic() - started < 10
        assert done.returncode == 2 and done.stdout == "" and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith(f"farm: {path}:") and words in done.stderr


@pytest.mark.parametrize("kind", ["fifo", "directory", "latin-1", "huge"])
def test_an_inventory_that_is_not_a_text_file_is_refused_without_blocking(tmp_path, kind):
    path = tmp_path / "inventory.yaml"
    if kind == "fifo":
        os.mkfifo(path)
        words = "is a FIFO, not a regular inventory file"
    elif kind == "directory":
        path.mkdir()
        words = "is a directory, not a regular inventory file"
    elif kind == "latin-1":
        path.write_bytes(b"hosts:\n  - name: caf\xe9\n")
        words = "not UTF-8 text (invalid continuation byte at byte 20)"
    else:
        with open(path, "wb") as fh:
            fh.truncate(MAX_BYTES + 1)
        words = "larger than 4 MiB, the inventory file limit"
    done = subprocess.run([sys.executable, "-m", "farm", "hosts", "list", "--inventory", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=20)
    assert (done.returncode, done.stdout, done.stderr) == (2, "", f"farm: {path}: {words}\n")


def test_a_port_is_an_integer_as_written(monkeypatch, capsys, tmp_path):
    """The control: an integer port in range loads as that port."""
    path = tmp_path / "inventory.yaml"
    path.write_text(host(port="2222"))
    code, out, err = run_hosts_list(monkeypatch, capsys, tmp_path, path)
    assert code == 0, err
    assert '"port": 2222' in out


def test_markup_in_inventory_text_is_shown_literally(tmp_path):
    """Tags are free text: `[/]` (a rich closing tag) and `[bold]` are printed as written."""
    path = tmp_path / "inventory.yaml"
    path.write_text(local(tags="['[/]', '[bold]x', ':smile:']"))
    done = subprocess.run([sys.executable, "-m", "farm", "hosts", "list", "--inventory", str(path)],
                          capture_output=True, text=True, cwd=REPO, timeout=30, env={**os.environ, "COLUMNS": "400"})
    assert (done.returncode, done.stderr) == (0, "")
    assert "[/],[bold]x,:smile:" in done.stdout
