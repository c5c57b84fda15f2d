"""The rules every commit message farm writes must keep (libvirt's style), checked line by line."""

from __future__ import annotations

import re

WIDTH = 72
SUBJECT = re.compile(r"qemucapabilitiesdata: (Add|Update) test data for qemu-[0-9]+\.[0-9]+\.0 on [a-z0-9_]+(\+[a-z0-9]+)?")
INTERNAL = re.compile(r"\bfarm\b|\brun[- ]?[0-9]+|\bjob\b|Probed and published", re.IGNORECASE)
TRAILER = re.compile(r"Signed-off-by: [^<>]+ <[^<>@\s]+@[^<>\s]+>")
BODY_LINES = 20  # a short body: libvirt's own updates carry a few lines


def check_commit_message(message: str, signed: bool = True) -> list[str]:
    """The message's lines (checked): subject, blank line, a short body wrapped at 72 columns
    naming the QEMU build and the host, no internal run numbers; Signed-off-by last if signed."""
    lines = message.rstrip("\n").split("\n")
    assert SUBJECT.fullmatch(lines[0]), lines[0]
    assert lines[1] == "", lines[:2]
    body = lines[2:]
    if signed:
        assert TRAILER.fullmatch(body[-1]), body[-1]
        assert body[-2] == "", body[-3:]
        body = body[:-2]
    assert 0 < len(body) <= BODY_LINES, body
    for number, line in enumerate(lines, 1):
        assert len(line) <= WIDTH, f"line {number} has {len(line)} columns: {line!r}"
        assert line == line.rstrip(), f"line {number} has trailing blanks: {line!r}"
        if number <= 2 + len(body):  # not the trailer: it names whoever signs off
            assert not INTERNAL.search(line), f"line {number} names the farm's internals: {line!r}"
        assert "... and" not in line and not re.match(r"\s+[~+-] ", line), f"line {number} is a raw diff line: {line!r}"
    text = " ".join(body)
    assert re.search(r"QEMU [0-9]+\.[0-9]+\.[0-9]+ \(((tag v\S+|commit [0-9a-f]{12}), )?"
                     r"(package '[^']*'|no package string)\)", text), text
    assert re.search(r"; host [a-z0-9_]+, .+, (Linux \S+|kernel unknown)\.", text), text
    return lines
