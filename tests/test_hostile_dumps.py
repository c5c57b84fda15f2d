"""Hostile dumps: damaged copies of a real dump (libvirt 11.3.0's caps_9.1.0_riscv64.replies),
and files named like dumps that are not dumps (a FIFO, a directory, a device, not UTF-8, huge).

Every case goes through `farm replies validate`, `fmt --check`, `fmt`, `inspect` and `diff` and
must end with its exact exit code, at most one line on stderr, no traceback, and the file as it
was. FIFOs and the like run `farm` as a subprocess with a timeout: a blocking read would hang.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from farm.caps import dump
from farm.cli import main as farm
from tests.helpers import REPO

BASE = "caps_9.1.0_riscv64.replies"
QUERY_VERSION_REPLY = '''{
  "return": {
    "qemu": {
      "micro": 0,'''
FIRST_COMMAND = '{\n  "execute": "qmp_capabilities",\n  "id": "libvirt-1"\n}'
SCHEMA_ENTRY = '    {\n      "name": "query-status",\n'


def _nested(depth: int) -> Callable[[str], bytes]:
    def damage(text: str) -> bytes:
        deep = "[" * depth + "]" * depth
        return text.replace('"micro": 0,', f'"micro": {deep},', 1).encode()

    return damage


def _replace(old: str, new: str) -> Callable[[str], bytes]:
    def damage(text: str) -> bytes:
        assert old in text
        return text.replace(old, new, 1).encode()

    return damage


def _drop_last_reply(text: str) -> bytes:
    return text[: text[:-1].rindex("\n\n")].encode() + b"\n"


def _swap_first_exchanges(text: str) -> bytes:
    chunks = text[:-1].split("\n\n")
    chunks[0:2], chunks[2:4] = chunks[2:4], chunks[0:2]
    return ("\n\n".join(chunks) + "\n").encode()


def _indent_first_reply(text: str) -> bytes:
    chunks = text[:-1].split("\n\n")
    chunks[3] = json.dumps(json.loads(chunks[3]), indent=4)
    return ("\n\n".join(chunks) + "\n").encode()


# (id, damage, fragment of validate's verdict, exit codes of validate, fmt --check, inspect, diff)
# exit 1: a finding (the dump is invalid, or would be reformatted); diff refuses (1) a dump whose
# exchanges cannot all be read, and compares (0) one with only id, layout or schema problems.
DAMAGED: list[tuple[str, Callable[[str], bytes], str, tuple[int, int, int, int]]] = [
    ("empty", lambda t: b"", ":1: empty file", (1, 1, 1, 1)),
    ("a newline only", lambda t: b"\n", ":1: extra blank line", (1, 1, 1, 1)),
    ("cut in the middle", lambda t: t[: len(t) // 2].encode(), "invalid JSON", (1, 1, 1, 1)),
    ("the last reply missing", _drop_last_reply, "has no reply", (1, 1, 1, 1)),
    ("nested 5000 deep", _nested(5000), ":16: invalid JSON: nested deeper than 64 levels", (1, 1, 1, 1)),
    ("nested 65 deep", _nested(65), "nested deeper than 64 levels", (1, 1, 1, 1)),
    ("a duplicate key in a command", _replace(FIRST_COMMAND, FIRST_COMMAND.replace(
        '"id"', '"execute": "qmp_capabilities",\n  "id"')), ":3: invalid JSON: duplicate key 'execute'", (1, 1, 1, 1)),
    ("a duplicate key in a reply", _replace('"micro": 0,', '"micro": 0,\n      "micro": 1,'),
     ":20: invalid JSON: duplicate key 'micro'", (1, 1, 1, 1)),
    ("a duplicate key among many equal keys", _replace(SCHEMA_ENTRY, SCHEMA_ENTRY + '      "name": "query-status",\n'),
     ":49: invalid JSON: duplicate key 'name'", (1, 1, 1, 1)),
    ("NaN", _replace('"micro": 0,', '"micro": NaN,'), ":19: invalid JSON: NaN is not a JSON number", (1, 1, 1, 1)),
    ("Infinity", _replace('"micro": 0,', '"micro": Infinity,'), "Infinity is not a JSON number", (1, 1, 1, 1)),
    ("-Infinity", _replace('"micro": 0,', '"micro": -Infinity,'), "-Infinity is not a JSON number", (1, 1, 1, 1)),
    ("1e400", _replace('"micro": 0,', '"micro": 1e400,'), "number 1e400 is out of range", (1, 1, 1, 1)),
    ("an inexact float", _replace('"micro": 0,', '"micro": 0.10000000000000000001,'),
     "cannot be kept exactly (it would become 0.1)", (1, 1, 1, 1)),
    ("a 5000-digit integer", _replace('"micro": 0,', f'"micro": {"7" * 5000},'), "unreadable number",
     (1, 1, 1, 1)),
    ("a number instead of a command", _replace(FIRST_COMMAND, "1"), "expected a JSON object, found int",
     (1, 1, 1, 1)),
    ("a UTF-8 byte order mark", lambda t: "\ufeff".encode() + t.encode(), "invalid JSON", (1, 1, 1, 1)),
    ("a NUL byte in a string", _replace('"package": "v9.1.0"', '"package": "v9.1\x00.0"'),
     "invalid JSON: Invalid control character", (1, 1, 1, 1)),
    ("CRLF line ends", lambda t: t.replace("\n", "\r\n").encode(), "invalid JSON", (1, 1, 1, 1)),
    ("no final newline", lambda t: t[:-1].encode(), "missing final newline", (1, 1, 1, 1)),
    ("two blank lines", lambda t: t.replace("\n\n", "\n\n\n", 1).encode(), ":6: extra blank line", (1, 1, 1, 1)),
    ("a command's execute is a number", _replace('"execute": "query-target"', '"execute": 7'),
     "command has no 'execute' string", (1, 1, 1, 1)),
    ("the first command is not qmp_capabilities", _swap_first_exchanges,
     "first command is 'query-version', expected 'qmp_capabilities'", (1, 1, 1, 1)),
    ("a blank line at the end", lambda t: (t + "\n").encode(), "extra blank line", (1, 1, 1, 1)),
    ("20000 objects", lambda t: ("{}\n\n" * 20_000 + t).encode(), ":1: more than 20000 JSON objects", (1, 1, 1, 1)),
    ("a 10 MB line", _replace('"micro": 0,', '"micro": [' + "1," * 5_000_000 + '1],'),
     ":19: not in the current layout: expected '      \"micro\": [', found '      \"micro\": [1,1,", (1, 1, 1, 0)),
    ("query-version a list", _replace(QUERY_VERSION_REPLY, '{\n  "return": [\n    1\n  ],\n  "x": {\n    "qemu": {\n      "micro": 0,'),
     ": OK (current layout)", (0, 0, 1, 0)),
    ("a wrong id", _replace('"id": "libvirt-3"\n}\n\n{\n  "return"', '"id": "libvirt-9"\n}\n\n{\n  "return"'),
     ":28: command 'query-target' has id 'libvirt-9', expected 'libvirt-3'", (1, 1, 1, 0)),
    ("four-space indentation", _indent_first_reply, "not in the current layout", (1, 1, 1, 0)),
    ("markup as schema keys", _replace(SCHEMA_ENTRY, SCHEMA_ENTRY + '      "[/]": "x",\n      "[bold]": "y",\n'),
     "unhandled keys '[/]', '[bold]'", (1, 0, 1, 0)),
]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = farm(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def base(data11: Path) -> str:
    return (data11 / BASE).read_text()


def test_there_are_at_least_twenty_damaged_dumps():
    assert len(DAMAGED) >= 20


@pytest.mark.parametrize(("case", "damage", "fragment", "codes"), DAMAGED, ids=[c[0] for c in DAMAGED])
def test_a_damaged_dump_is_one_clear_finding_in_every_command(capsys, tmp_path, data11, base, case, damage,
                                                              fragment, codes):
    path = tmp_path / BASE
    path.write_bytes(damage(base))
    before = path.read_bytes(), path.stat().st_mtime_ns
    validate, check, inspect, diff = codes

    code, out, err = run(capsys, "replies", "validate", str(path))
    assert (code, err) == (validate, ""), out
    assert fragment in out

    code, out, err = run(capsys, "replies", "fmt", "--check", str(path))
    assert (code, err) == (check, ""), out

    code, out, err = run(capsys, "replies", "inspect", str(path))
    assert (code, err) == (inspect, ""), out
    assert "INVALID" in out

    code, out, err = run(capsys, "replies", "diff", str(data11 / BASE), str(path))
    assert code == diff, out + err
    if diff:
        assert out == "" and err.count("\n") == 1 and err.startswith(f"farm: {path}: not a dump to compare: "), err
    assert "Traceback" not in out + err
    assert (path.read_bytes(), path.stat().st_mtime_ns) == before

    if not dump.load(path).reformattable:  # fmt refuses it and leaves it as it is
        code, out, err = run(capsys, "replies", "fmt", str(path))
        assert (code, err) == (1, "") and f"{path}: unformattable" in out
        assert (path.read_bytes(), path.stat().st_mtime_ns) == before


def test_a_huge_damaged_dump_is_judged_within_seconds_in_short_lines(tmp_path, base):
    """A dump just under the size limit whose one reply is an array of millions of numbers, laid
    out right but nested one level deeper than the layout regex knows (the slow path), or on
    one line: each command answers within seconds, and no message line quotes megabytes."""
    numbers = ",\n".join(["        1"] * 1_000_000)
    deep = base.replace('"micro": 0,', '"micro": [\n        [\n' + numbers + '\n        ]\n      ],', 1)
    flat = base.replace('"micro": 0,', '"micro": [' + "1," * 5_000_000 + "1],", 1)
    for text in (deep, flat):
        path = tmp_path / BASE
        path.write_text(text)
        assert path.stat().st_size < dump.MAX_BYTES
        for command in (["validate"], ["fmt", "--check"], ["inspect"]):
            started = time.monotonic()
            done = farm_process("replies", *command, str(path), timeout=60)
            assert time.monotonic() - started < 10, command
            assert done.returncode == 1 and done.stderr == "", done.stderr
            assert max(map(len, done.stdout.splitlines())) < 500


def test_fmt_never_changes_a_value(tmp_path, base):
    """What fmt accepts it rewrites without changing any value: a float in another spelling is
    kept as the same number; one Python cannot hold exactly is refused."""
    path = tmp_path / BASE
    path.write_text(base.replace('"micro": 0,', '"micro": 1E2,', 1))
    assert farm(["replies", "fmt", str(path)]) == 0
    assert json.loads(path.read_text()[:-1].split("\n\n")[3])["return"]["qemu"]["micro"] == 100.0
    path.write_text(base.replace('"micro": 0,', '"micro": 12345678901234567890.5,', 1))
    assert farm(["replies", "fmt", str(path)]) == 1
    assert "12345678901234567890.5" in path.read_text()


# --- agreeing with libvirt's qemu-replies-tool.py ---------------------------------------------


def replies_tool(libvirt11: Path, path: Path) -> bool:
    done = subprocess.run([sys.executable, str(libvirt11 / "scripts" / "qemu-replies-tool.py"), str(path)],
                          capture_output=True, text=True, timeout=120)
    return done.returncode == 0


@pytest.mark.parametrize("case", ["a duplicate key in a command", "a duplicate key in a reply", "1e400",
                                  "a blank line at the end"])
def test_duplicate_keys_and_out_of_range_numbers_are_invalid_as_for_qemu_replies_tool(libvirt11, tmp_path, base,
                                                                                      case):
    """The tool re-reads and re-writes the JSON: a duplicate key or 1e400 does not come back as it
    was, so it fails the file; so does farm."""
    damage = next(d for c, d, _, _ in DAMAGED if c == case)
    path = tmp_path / BASE
    path.write_bytes(damage(base))
    assert replies_tool(libvirt11, path) is False
    assert dump.load(path).valid is False
    path.write_text(base)
    assert replies_tool(libvirt11, path) is True and dump.load(path).valid is True


def test_nan_is_invalid_in_farm_although_qemu_replies_tool_passes_it(libvirt11, tmp_path, base):
    """The one deliberate difference: Python's json reads and writes NaN, so the tool passes it;
    it is not JSON (RFC 8259) and QEMU never sends it, so farm says invalid."""
    path = tmp_path / BASE
    path.write_text(base.replace('"micro": 0,', '"micro": NaN,', 1))
    assert replies_tool(libvirt11, path) is True
    assert dump.load(path).valid is False


# --- files named like dumps that are not dumps -------------------------------------------------


def farm_process(*args: str, timeout: float = 20) -> subprocess.CompletedProcess:
    """`python -m farm ARGS`, killed (and the test failed) if it blocks."""
    return subprocess.run([sys.executable, "-m", "farm", *args], capture_output=True, text=True, cwd=REPO,
                          timeout=timeout)


def not_dumps(directory: Path) -> dict[str, tuple[Path, str]]:
    """Files named like dumps that are not: name -> (path, the refusal's words)."""
    directory.mkdir(parents=True, exist_ok=True)
    fifo = directory / "caps_9.0.0_x86_64.replies"
    os.mkfifo(fifo)
    folder = directory / "caps_9.0.0_aarch64.replies"
    folder.mkdir()
    device = directory / "caps_9.0.0_s390x.replies"
    device.symlink_to("/dev/zero")
    latin1 = directory / "caps_9.0.0_ppc64.replies"
    latin1.write_bytes(b'{\n  "execute": "caf\xe9"\n}\n')
    huge = directory / "caps_9.0.0_riscv64.replies"
    with open(huge, "wb") as fh:
        fh.truncate(dump.MAX_BYTES + 1)  # sparse: larger than a dump may be, nothing written
    return {
        "fifo": (fifo, "is a FIFO, not a regular .replies file"),
        "directory": (folder, "is a directory, not a regular .replies file"),
        "device": (device, "is a device, not a regular .replies file"),
        "latin-1": (latin1, "not UTF-8 text (invalid continuation byte at byte 19)"),
        "huge": (huge, "larger than 16 MiB, the .replies file limit"),
    }


@pytest.mark.parametrize("kind", ["fifo", "directory", "device", "latin-1", "huge"])
@pytest.mark.parametrize("command", [["replies", "validate"], ["replies", "inspect"], ["replies", "fmt"],
                                     ["replies", "fmt", "--check"]])
def test_a_file_named_like_a_dump_that_is_not_one_is_refused_without_blocking(tmp_path, kind, command):
    path, words = not_dumps(tmp_path)[kind]
    done = farm_process(*command, str(path))
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == f"farm: {path}: {words}\n"


@pytest.mark.parametrize("kind", ["fifo", "directory", "latin-1"])
def test_diff_refuses_a_file_that_is_not_a_dump_on_either_side(tmp_path, data11, kind):
    path, words = not_dumps(tmp_path)[kind]
    for old, new in ((data11 / BASE, path), (path, data11 / BASE)):
        done = farm_process("replies", "diff", str(old), str(new))
        assert (done.returncode, done.stdout, done.stderr) == (2, "", f"farm: {path}: {words}\n")


def test_coverage_lists_files_that_are_not_dumps_and_shows_the_rest(tmp_path, data11):
    """A FIFO, a directory, a device, a non-UTF-8 and a huge file among real dumps: each is an
    invalid cell with its reason, every real dump is still judged, the exit status is 1."""
    tree = tmp_path / "qemucapabilitiesdata"
    bad = not_dumps(tree)
    for name in ("caps_9.1.0_riscv64.replies", "caps_9.2.0_x86_64.replies", "caps_10.0.0_s390x.replies"):
        (tree / name).symlink_to(data11 / name)
    done = farm_process("coverage", "--json", str(tree))
    assert done.returncode == 1, done.stderr
    cells = {c["file"]: c for c in json.loads(done.stdout)["cells"]}
    assert len(cells) == 8
    for path, words in bad.values():
        assert (cells[path.name]["verdict"], cells[path.name]["reasons"]) == ("invalid", [words])
    assert cells["caps_9.2.0_x86_64.replies"]["verdict"] == "real"
    assert cells["caps_9.1.0_riscv64.replies"]["verdict"] == "fake"

    done = farm_process("coverage", str(tree))
    assert done.returncode == 1 and done.stderr == ""
    assert "caps_9.0.0_x86_64.replies: is a FIFO, not a regular .replies file" in done.stdout
    assert "real" in done.stdout and "fake" in done.stdout


def test_coverage_exits_0_when_no_cell_is_alarming_and_1_when_one_is(tmp_path, data11, base):
    tree = tmp_path / "qemucapabilitiesdata"
    tree.mkdir()
    (tree / "caps_9.2.0_x86_64.replies").symlink_to(data11 / "caps_9.2.0_x86_64.replies")
    (tree / BASE).write_text(base)  # riscv64: a fake libvirt keeps fake, not alarming
    assert farm_process("coverage", str(tree)).returncode == 0
    (tree / BASE).write_text(base.replace('"micro": 0,', '"micro": 0,\n      "micro": 0,', 1))
    done = farm_process("coverage", str(tree))
    assert done.returncode == 1 and "duplicate key 'micro'" in done.stdout


# --- text from dumps is never rich markup ------------------------------------------------------


def test_markup_in_a_dump_is_shown_literally_by_coverage_and_inspect(tmp_path, base):
    """Schema keys `[/]` and `[bold]` (rich closing and opening tags) crashed the rich output."""
    tree = tmp_path / "qemucapabilitiesdata"
    tree.mkdir()
    path = tree / BASE
    path.write_text(base.replace(SCHEMA_ENTRY, SCHEMA_ENTRY + '      "[/]": "x",\n      "[bold]": "y",\n', 1))
    done = farm_process("coverage", str(tree))
    assert done.returncode == 1 and done.stderr == "", done.stderr
    assert "unhandled keys '[/]', '[bold]'" in done.stdout
    done = farm_process("replies", "inspect", str(path))
    assert done.returncode == 1 and "unhandled keys '[/]', '[bold]'" in done.stdout


def test_a_lone_surrogate_in_a_dump_is_printed_escaped_not_a_traceback(tmp_path, base):
    path = tmp_path / BASE
    path.write_text(base.replace('"package": "v9.1.0"', '"package": "v9.1.0 \\ud800"', 1))
    done = farm_process("replies", "inspect", str(path))
    assert (done.returncode, done.stderr) == (0, "")
    assert "v9.1.0 \\ud800" in done.stdout


SHAPES = [None, 7, "text", [1, "a", None], {"qemu": [1]}, [{"name": 5}]]


def test_replies_of_any_shape_are_judged_never_raised(base):
    """Every reply's `return` of the real dump replaced, one at a time, by each JSON shape QEMU
    never sends: parsing and inspecting never raise, and diff either compares or refuses with
    Malformed (the CLI's one-line refusal), never another exception."""
    from farm.caps.diff import Malformed, diff
    from farm.caps.inspect import inspect
    from farm.caps.names import DumpName

    chunks = base[:-1].split("\n\n")
    name = DumpName.parse(BASE)
    good = dump.parse(base)
    refused = compared = 0
    for i in range(1, len(chunks), 2):
        reply = json.loads(chunks[i])
        for shape in SHAPES:
            damaged = list(chunks)
            damaged[i] = json.dumps({**reply, "return": shape}, indent=2)
            d = dump.parse("\n\n".join(damaged) + "\n")
            inspect(d, name)
            try:
                diff(good, d), diff(d, good)
                compared += 1
            except Malformed:
                refused += 1
    assert refused and compared


def test_diff_refuses_a_reply_of_a_shape_qemu_never_sends_in_one_line(capsys, tmp_path, data11, base):
    path = tmp_path / BASE
    chunks = base[:-1].split("\n\n")
    at = next(i for i in range(0, len(chunks), 2) if '"execute": "query-machines"' in chunks[i]) + 1
    reply = json.loads(chunks[at])
    chunks[at] = json.dumps({**reply, "return": 7}, indent=2)
    path.write_text("\n\n".join(chunks) + "\n")
    code, out, err = run(capsys, "replies", "diff", str(data11 / BASE), str(path))
    assert (code, out) == (1, "")
    assert err == f"farm: {path}: not a dump to compare: Machine types: a reply QEMU would not send " \
                  "(TypeError: 'int' object is not iterable)\n"
