"""Reading a text file that may be hostile: a FIFO, a device, a directory, huge, not UTF-8.

Only a regular file is opened (``stat`` first, then ``fstat`` of what was opened, with
``O_NONBLOCK`` so that a FIFO swapped in meanwhile cannot block); at most ``limit`` bytes are
read; the text must be UTF-8. Every refusal is a one-line UsageError naming the file.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from farm.errors import UsageError


def read(path: str | os.PathLike[str], limit: int, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path`` of at most ``limit`` bytes."""
    path = Path(path)
    try:
        _check(path, os.stat(path), limit, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise UsageError(f"{path}: no such {what}") from None
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    try:
        _check(path, os.fstat(fd), limit, what)
        with os.fdopen(fd, "rb", closefd=False) as fh:
            data = fh.read(limit + 1)
    except OSError as e:
        raise UsageError(f"{path}: cannot read: {e.strerror}") from None
    finally:
        os.close(fd)
    if len(data) > limit:
        raise UsageError(f"{path}: larger than {_size(limit)}, the {what} limit")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _check(path: Path, st: os.stat_result, limit: int, what: str) -> None:
    mode = st.st_mode
    if not stat.S_ISREG(mode):
        kind = (
            "a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a special file"
        )
        raise UsageError(f"{path}: is {kind}, not a regular {what}")
    if st.st_size > limit:
        raise UsageError(f"{path}: larger than {_size(limit)}, the {what} limit")


def _size(limit: int) -> str:
    return f"{limit >> 20} MiB" if limit >= 1 << 20 else f"{limit >> 10} KiB"
