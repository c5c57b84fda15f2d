"""A ``.replies`` dump: parse, validate, format, renumber.

A dump is a recorded QMP conversation: JSON objects (command, reply, command,
reply, ...) separated by one blank line, with one final newline. A probe
session starts at each ``qmp_capabilities`` and restarts the ``libvirt-N`` ids
at 1. This module makes every check of libvirt's scripts/qemu-replies-tool.py
and reports problems as ``file:line: what is wrong``.

Two layouts exist: ``current`` (each object is exactly ``json.dumps(obj,
indent=2)``) and ``old``, the one libvirt <= 9.x wrote (the same, except empty
objects and arrays are written open, ``{\\n<indent>}``). A dump is valid in the
layout it is in.

Hostile input is bounded: a file must be a regular file (anything else is
refused without being opened) of at most ``MAX_BYTES``, UTF-8; JSON may nest at
most ``MAX_DEPTH`` levels; duplicate keys, non-finite numbers (``NaN``,
``Infinity``, ``1e400``) and numbers Python cannot keep exactly are invalid
JSON here, so that what is valid can be rewritten without changing a value.
"""

from __future__ import annotations

import enum
import functools
import itertools
import json
import math
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any, cast

from farm.caps import schema, textfile


class Layout(enum.Enum):
    current = "current"  # json.dumps(obj, indent=2): libvirt >= 10
    old = "old"  # libvirt <= 9.x: empty containers written open


@dataclass(frozen=True)
class Problem:
    """Something wrong with a dump, at a line of its file (1-based).

    ``kind`` is one of: json (not JSON), structure (blank lines, a command
    without reply), layout (formatting), id (numbering), schema (QMP schema
    key rules). Only layout and id problems can be fixed by reformatting.
    """

    line: int
    message: str
    kind: str = "structure"


@dataclass
class Exchange:
    """One command and its reply, with the lines they start at."""

    command: dict[str, Any]
    reply_text: str
    line: int
    reply_line: int
    _reply: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def execute(self) -> str:
        execute: str = self.command.get("execute", "")
        return execute

    @property
    def arguments(self) -> dict[str, Any]:
        arguments = self.command.get("arguments")
        return arguments if isinstance(arguments, dict) else {}

    @property
    def reply(self) -> dict[str, Any]:
        """The parsed reply."""
        if self._reply is None:
            self._reply = cast(dict[str, Any], decode(self.reply_text))
        return self._reply

    @property
    def result(self) -> Any:
        """The reply's ``return`` value, or None for an error reply."""
        return self.reply.get("return")

    def reply_id(self) -> object:
        """The reply's ``id``, read from the text where the layout puts it."""
        text = self.reply_text
        if text.startswith('{\n  "id": '):
            m = _ID_FIRST.match(text)
        else:
            m = _ID_LAST.search(text, max(0, len(text) - 64))
        if m:
            return m[1]
        return self.reply.get("id")


_ID_FIRST = re.compile(r'\{\n  "id": "([^"\\]*)",?\n')
_ID_LAST = re.compile(r'\n  "id": "([^"\\]*)"\n\}\Z')


@dataclass
class Dump:
    """A parsed dump: its exchanges, its layout and what is wrong with it."""

    path: str
    exchanges: list[Exchange]
    layout: Layout | None
    problems: list[Problem]

    @property
    def valid(self) -> bool:
        return not self.problems

    @property
    def sessions(self) -> list[list[Exchange]]:
        """Probe sessions: runs of exchanges each starting at qmp_capabilities."""
        sessions: list[list[Exchange]] = []
        for ex in self.exchanges:
            if ex.execute == "qmp_capabilities" or not sessions:
                sessions.append([])
            sessions[-1].append(ex)
        return sessions

    def find(self, execute: str, session: int = 0) -> Exchange | None:
        """The first exchange running ``execute`` in the given session."""
        sessions = self.sessions
        if session >= len(sessions):
            return None
        return next((ex for ex in sessions[session] if ex.execute == execute), None)

    def all(self, execute: str) -> list[Exchange]:
        return [ex for ex in self.exchanges if ex.execute == execute]

    @property
    def reformattable(self) -> bool:
        """Rewriting it in the current layout keeps every exchange."""
        return bool(self.exchanges) and all(p.kind in ("layout", "id", "schema") for p in self.problems)

    def errors(self) -> list[str]:
        """Problems as ``file:line: message`` lines."""
        return [f"{self.path}:{p.line}: {p.message}" for p in self.problems]


MAX_PROBLEMS = 20
MAX_BYTES = 16 * 2**20  # a real dump is about 1 MB; checking a hostile one of this size takes < 3 s
MAX_DEPTH = 64  # a real dump nests 6 levels
MAX_OBJECTS = 20_000  # commands and replies; a real dump has a few hundred


def read(path: str | Path) -> str:
    """The text of a dump file: a regular UTF-8 file of at most MAX_BYTES (anything else,
    a FIFO, a device or a directory included, raises UsageError without being read)."""
    return textfile.read(path, MAX_BYTES, ".replies file")


def load(path: str | Path) -> Dump:
    """Read and parse a dump file. Unreadable files raise UsageError (see ``read``)."""
    return parse(read(path), str(path))


def validate_files(paths: list[str | Path], jobs: int | None = None) -> list[Dump]:
    """Load and validate many dumps, on several cores when there are several.

    The dumps come back without their exchanges (path, layout, problems only):
    shipping whole conversations between processes would cost more than it saves.
    """
    jobs = min(jobs or os.cpu_count() or 1, len(paths))
    if jobs <= 1:
        return [_checked(p) for p in paths]
    import concurrent.futures
    import multiprocessing

    _layout_regex(Layout.current)  # compiled once, inherited by the forked workers
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context) as pool:
        return list(pool.map(_checked, paths))


def _checked(path: str | Path) -> Dump:
    d = load(path)
    return Dump(d.path, [], d.layout, d.problems)


def parse(text: str, path: str = "<dump>") -> Dump:
    """Parse and validate a dump. Never raises for bad content: see ``problems``."""
    if text.count("\n\n") >= MAX_OBJECTS:
        return Dump(path, [], None, [Problem(1, f"more than {MAX_OBJECTS} JSON objects: not a probe's dump")])
    layout = _matching_layout(text)
    if layout is not None:
        dump = _parse_canonical(text, path, layout)
    else:
        dump = _parse_slow(text, path)
    if dump.exchanges:
        _check_ids(dump)
        _check_schema(dump)
    del dump.problems[MAX_PROBLEMS:]
    dump.problems = [replace(p, message=_clip(p.message, 300)) for p in dump.problems]
    return dump


def render(exchanges: list[Exchange], layout: Layout = Layout.current, renumber: bool = True) -> str:
    """Write exchanges as a dump in ``layout``, ids renumbered per session."""
    encode = _encoder(layout)
    parts = []
    seq = 9999
    for ex in exchanges:
        command, reply = dict(ex.command), dict(ex.reply)
        if renumber:
            if command.get("execute") == "qmp_capabilities":
                seq = 1
            command["id"] = reply["id"] = f"libvirt-{seq}"
            seq += 1
        parts.append(encode(command))
        parts.append(encode(reply))
    return "\n\n".join(parts) + "\n"


# --- the fast path: a dump already in one of the two layouts ---------------


def _matching_layout(text: str) -> Layout | None:
    for layout in Layout:
        if _layout_regex(layout).fullmatch(text):
            return layout
    return None


def _parse_canonical(text: str, path: str, layout: Layout) -> Dump:
    """Split a dump proven well-formed (and at most 6 deep) by the layout regex."""
    chunks = text[:-1].split("\n\n")
    problems: list[Problem] = []
    exchanges: list[Exchange] = []
    line = 1
    for i in range(0, len(chunks) - 1, 2):
        cmd_text, reply_text = chunks[i], chunks[i + 1]
        reply_line = line + cmd_text.count("\n") + 2
        try:  # strict: the regex admits duplicate keys
            command, reply = _object(cmd_text, line, shallow=True), _object(reply_text, reply_line, shallow=True)
        except _Unreadable as e:
            return Dump(path, [], None, [e.problem])
        if not isinstance(command, dict) or not isinstance(reply, dict):
            return _parse_slow(text, path)  # names what is not an object
        exchanges.append(Exchange(command, reply_text, line, reply_line, reply))
        line = reply_line + reply_text.count("\n") + 2
    if len(chunks) % 2:
        problems.append(Problem(line, f"command {_brief(chunks[-1])} has no reply"))
    return Dump(path, exchanges, layout, problems)


# --- the slow path: find and name what is wrong -----------------------------


def _parse_slow(text: str, path: str) -> Dump:
    if not text:
        return Dump(path, [], None, [Problem(1, "empty file")])
    chunks, problems = _chunks(text)
    objects: list[tuple[int, str, object]] = []  # (line, text, parsed)
    for start, chunk in chunks:
        try:
            objects.append((start, chunk, _object(chunk, start)))
        except _Unreadable as e:
            return Dump(path, [], None, [*problems, e.problem])

    for line, _, obj in objects:
        if not isinstance(obj, dict):
            problems.append(Problem(line, f"expected a JSON object, found {type(obj).__name__}"))
    if problems and any(not isinstance(o, dict) for _, _, o in objects):
        return Dump(path, [], None, problems)

    exchanges = []
    for i in range(0, len(objects) - 1, 2):
        (cline, _, command), (rline, rtext, reply) = objects[i], objects[i + 1]
        # every object is a dict here (any other is a problem, returned above)
        exchanges.append(Exchange(cast(dict[str, Any], command), rtext, cline, rline, cast(dict[str, Any], reply)))
    if len(objects) % 2:
        line, _, command = objects[-1]
        problems.append(Problem(line, f"command {_brief(command)} has no reply"))

    layout, mismatches = _closest_layout(objects)
    for (line, chunk, obj), offset in zip(objects, mismatches, strict=False):
        if offset is not None:
            at, want, got = _difference_at(obj, chunk, layout, offset)
            problems.append(
                Problem(line + at, f"not in the {layout.value} layout: expected {want!r}, found {got!r}", "layout")
            )
            if len(problems) >= MAX_PROBLEMS:
                break
    return Dump(path, exchanges, layout, problems)


class JsonProblem(ValueError):
    """JSON Python's json module reads but cannot write back as it was, or nested too deep."""

    def __init__(self, message: str, needle: str | None = None, nth: int = 1):
        super().__init__(message)
        self.message, self.needle, self.nth = message, needle, nth

    def line_in(self, text: str) -> int:
        """The line of ``text`` (1-based) where the problem is, as near as the needle tells."""
        if self.nth == 2 and self.needle:  # a duplicate key: its second line in the same object
            line = _repeated_key_line(text, self.needle)
            if line:
                return line
        at = -1
        needle = self.needle or ""
        for _ in range(self.nth if needle else 0):
            at = text.find(needle, at + 1)
            if at < 0:
                return 1
        return text.count("\n", 0, at) + 1 if at >= 0 else 1


def _repeated_key_line(text: str, needle: str) -> int | None:
    """In indented JSON: the line (1-based) where the key ``needle`` (``"key":``) comes a second
    time in the same object (same indentation, no shallower line between); None if none does."""
    seen: dict[int, int] = {}  # indentation -> line of the key there, in the objects still open
    for number, line in enumerate(text.split("\n"), 1):
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        for deeper in [i for i in seen if i > indent]:
            del seen[deeper]
        if body.startswith(needle):
            if indent in seen:
                return number
            seen[indent] = number
    return None


def _pairs(pairs: list[tuple[str, object]]) -> dict[str, object]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:  # the first key seen twice
            if key in seen:
                break
            seen.add(key)
        raise JsonProblem(f"duplicate key {key!r} (one of its values would be lost)", json.dumps(key) + ":", 2)
    return obj


def _constant(name: str) -> float:
    raise JsonProblem(f"{name} is not a JSON number", name)


def _float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise JsonProblem(f"number {text} is out of range (it would become {value})", text)
    try:
        exact = Decimal(text) == Decimal(repr(value))
    except InvalidOperation:
        exact = False
    if not exact:
        raise JsonProblem(f"number {text} cannot be kept exactly (it would become {value!r})", text)
    return value


_STRICT = json.JSONDecoder(object_pairs_hook=_pairs, parse_constant=_constant, parse_float=_float)
_STRING = re.compile(r'"(?:[^"\\]++|\\.)*+"')
_NOT_BRACKET = re.compile(r"[^\[\]{}]++")
_STEP = {"[": 1, "{": 1, "]": -1, "}": -1}.__getitem__


def depth(text: str) -> int:
    """How deep the JSON ``text`` nests (an estimate for text that is not JSON)."""
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text))
    return max(itertools.accumulate(map(_STEP, brackets)), default=0)


def decode(text: str, shallow: bool = False) -> object:
    """json.loads, strict: duplicate keys, non-finite or inexact numbers and nesting deeper
    than MAX_DEPTH raise JsonProblem, bad JSON JSONDecodeError (both ValueErrors).
    ``shallow``: the caller knows the text nests at most MAX_DEPTH levels."""
    if not shallow and text.count("[") + text.count("{") > MAX_DEPTH and depth(text) > MAX_DEPTH:
        raise JsonProblem(f"nested deeper than {MAX_DEPTH} levels")
    try:
        return _STRICT.decode(text)
    except RecursionError:
        raise JsonProblem(f"nested deeper than {MAX_DEPTH} levels") from None
    except (JsonProblem, json.JSONDecodeError):
        raise
    except ValueError as e:  # an integer of more digits than Python converts
        raise JsonProblem(f"unreadable number: {str(e).split(';')[0]}") from None


class _Unreadable(Exception):
    def __init__(self, problem: Problem):
        super().__init__(problem.message)
        self.problem = problem


def _object(chunk: str, line: int, shallow: bool = False) -> object:
    """The JSON value of a chunk starting at ``line``; what is wrong with it raises _Unreadable."""
    try:
        return decode(chunk, shallow)
    except json.JSONDecodeError as e:
        raise _Unreadable(Problem(line + e.lineno - 1, f"invalid JSON: {e.msg} (column {e.colno})", "json")) from None
    except JsonProblem as e:
        raise _Unreadable(Problem(line + e.line_in(chunk) - 1, f"invalid JSON: {e.message}", "json")) from None


_CHUNK = re.compile(r"[^\n]+(?:\n[^\n]+)*+")


def _chunks(text: str) -> tuple[list[tuple[int, str]], list[Problem]]:
    """The blank-line separated objects with their first lines, and separator problems
    (one per run of extra blank lines: a file of millions of them is still a few problems)."""
    problems: list[Problem] = []
    chunks: list[tuple[int, str]] = []
    line, at = 1, 0  # the line number at offset ``at``
    for m in _CHUNK.finditer(text):
        gap = text.count("\n", at, m.start())  # before the first object: 0; between two: 2
        line += gap
        extra = gap if not chunks else gap - 2
        if extra > 0 and len(problems) < MAX_PROBLEMS:
            problems.append(Problem(line - extra, "extra blank line (objects are separated by exactly one)"))
        chunks.append((line, m[0]))
        line += m[0].count("\n")
        at = m.end()
    trailing = text.count("\n", at)
    if not text.endswith("\n"):
        problems.append(Problem(line, "missing final newline"))
    elif trailing > 1 or not chunks:  # a blank line at the end (or nothing but blank lines)
        problems.append(Problem(line + 1 if chunks else 1, "extra blank line (objects are separated by exactly one)"))
    return chunks, problems


def _closest_layout(objects: list[tuple[int, str, object]]) -> tuple[Layout, list[int | None]]:
    """The layout most objects are in (ties: current), and where each object differs from it."""
    found: dict[Layout, list[int | None]] = {layout: [] for layout in Layout}
    for _, chunk, obj in objects:
        current = _mismatch(obj, chunk, Layout.current)
        found[Layout.current].append(current)
        # the layouts differ in empty containers only: without any, one match is both
        same = current is None and "{}" not in chunk and "[]" not in chunk
        found[Layout.old].append(None if same else _mismatch(obj, chunk, Layout.old))
    layout = max(Layout, key=lambda layout: (found[layout].count(None), layout is Layout.current))
    return layout, found[layout]


def _mismatch(obj: object, chunk: str, layout: Layout) -> int | None:
    """Where ``chunk`` first differs from ``obj`` written in ``layout`` (None: nowhere). The
    writing stops there: a huge object on one line costs nothing."""
    pos = 0
    for piece in _pieces(obj, layout):
        end = pos + len(piece)
        if not chunk.startswith(piece, pos):
            return pos + next((i for i, c in enumerate(piece) if pos + i >= len(chunk) or chunk[pos + i] != c),
                              len(piece))
        pos = end
    return None if pos == len(chunk) else pos


def _difference_at(obj: object, chunk: str, layout: Layout, offset: int) -> tuple[int, str, str]:
    """(line index in the chunk, expected line, found line) of a mismatch at ``offset``."""
    n = chunk.count("\n", 0, offset)
    written: list[str] = []
    size = 0
    for piece in _pieces(obj, layout):  # up to the end of the line of the mismatch
        written.append(piece)
        size += len(piece)
        if size > offset and "\n" in piece[max(0, offset - size + len(piece)):]:
            break
    want = "".join(written).split("\n")
    got = chunk.split("\n", n + 1)
    return n, (_clip(want[n]) if n < len(want) else "<end>"), (_clip(got[n]) if n < len(got) else "<end>")


def _clip(line: str, width: int = 120) -> str:
    """A line as shown in a message: at most ``width`` characters."""
    return line if len(line) <= width else line[: width - 3] + "..."


# --- checks on parsed exchanges ---------------------------------------------


def _check_ids(dump: Dump) -> None:
    """ids are libvirt-N, restarting at 1 at every qmp_capabilities."""
    seq = None
    for ex in dump.exchanges:
        if len(dump.problems) >= MAX_PROBLEMS:
            return
        if not isinstance(ex.command.get("execute"), str):
            dump.problems.append(Problem(ex.line, "command has no 'execute' string"))
            continue
        if ex.execute == "qmp_capabilities":
            seq = 1
        elif seq is None:
            dump.problems.append(Problem(ex.line, f"first command is {ex.execute!r}, expected 'qmp_capabilities'"))
            seq = 1
        expected = f"libvirt-{seq}"
        if ex.command.get("id") != expected:
            dump.problems.append(
                Problem(ex.line, f"command {ex.execute!r} has id {ex.command.get('id')!r}, expected {expected!r}", "id")
            )
        reply_id = ex.reply_id()
        if reply_id != expected:
            dump.problems.append(
                Problem(ex.reply_line, f"reply to {ex.execute!r} has id {reply_id!r}, expected {expected!r}", "id")
            )
        seq += 1


def _check_schema(dump: Dump) -> None:
    for ex in dump.all("query-qmp-schema"):
        entries = ex.result
        if entries is None:
            continue
        for index, message in schema.check(entries):
            dump.problems.append(Problem(_entry_line(ex, entries, index), f"query-qmp-schema: {message}", "schema"))


def _entry_line(ex: Exchange, entries: list[Any], index: int) -> int:
    """The line of a schema entry, found by its unique name."""
    if not isinstance(entries, list) or index >= len(entries):
        return ex.reply_line
    entry = entries[index]
    if isinstance(entry, dict) and isinstance(entry.get("name"), str):
        needle = '\n      "name": ' + json.dumps(entry["name"])
        at = ex.reply_text.find(needle)
        if at >= 0:
            return ex.reply_line + ex.reply_text.count("\n", 0, at) + 1
    return ex.reply_line


def _brief(command: object) -> str:
    if isinstance(command, str):
        try:
            command = decode(command)
        except ValueError:
            return "(unparsable)"
    if isinstance(command, dict):
        return repr(command.get("execute", "?"))
    return "(not an object)"


# --- the two layouts ---------------------------------------------------------


def _encoder(layout: Layout) -> Callable[[object], str]:
    return _encode_current if layout is Layout.current else _encode_old


def _encode_current(obj: object) -> str:
    return json.dumps(obj, indent=2)


_CURRENT = json.JSONEncoder(indent=2)


def _pieces(obj: object, layout: Layout, level: int = 0) -> Iterator[str]:
    """``obj`` written in ``layout``, piece by piece (joined: what the encoder writes)."""
    if layout is Layout.current:
        yield from _CURRENT.iterencode(obj)
        return
    pad = "  " * level
    if isinstance(obj, (dict, list)) and not obj:
        yield ("{\n" if isinstance(obj, dict) else "[\n") + pad + ("}" if isinstance(obj, dict) else "]")
    elif isinstance(obj, dict):
        for i, (k, v) in enumerate(obj.items()):
            yield ("{\n" if i == 0 else ",\n") + f"{pad}  {json.dumps(k)}: "
            yield from _pieces(v, layout, level + 1)
        yield "\n" + pad + "}"
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield ("[\n" if i == 0 else ",\n") + f"{pad}  "
            yield from _pieces(v, layout, level + 1)
        yield "\n" + pad + "]"
    else:
        yield json.dumps(obj)


def _encode_old(obj: object) -> str:
    """libvirt <= 9.x: like json.dumps(indent=2) but empty containers open."""
    return "".join(_pieces(obj, Layout.old))


# A regex of each layout's grammar, nested to a fixed depth (libvirt's dumps
# nest 6 deep). A full match proves a dump is valid JSON laid out exactly as in
# that layout, at the speed of the regex engine; anything else takes the slow
# path, which names the line. Strings admit only json.dumps' own spellings;
# numbers only integers (no dump has floats; one that has takes the slow path).
_STR = r'"(?:[ !#-\[\]-~]++|\\["\\bfnrt]|\\u(?!00[2-7]|000[89acd])[0-9a-f]{4})*+"'
_NUM = r"(?:0|-?[1-9][0-9]*+)"
_SCALAR = f"(?:{_STR}|{_NUM}|true|false|null)"
_DEPTH = 6


def _value(depth: int, layout: Layout) -> str:
    if depth >= _DEPTH:
        return _SCALAR
    pad, pad1 = "  " * depth, "  " * (depth + 1)
    inner = _value(depth + 1, layout)
    parts = [_SCALAR]
    for open_, close, item in (("\\{", "\\}", f"{_STR}: {inner}"), ("\\[", "\\]", inner)):
        end = f"\\n{pad}{close}"
        parts.append(f"{open_}\\n{pad}{close}" if layout is Layout.old else f"{open_}{close}")
        parts.append(f"{open_}(?:\\n{pad1}{item}(?:,(?=\\n{pad1}[^ ])|(?={end})))++{end}")
    return "(?>" + "|".join(parts) + ")"


@functools.cache
def _layout_regex(layout: Layout) -> re.Pattern[str]:
    top = _value(0, layout)
    return re.compile(f"(?:{top}\\n\\n)*+{top}\\n")
