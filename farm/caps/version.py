"""QEMU versions and the release a dump is filed under."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from farm.errors import UsageError

_VERSION = re.compile(r"(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(?:\.(0|[1-9][0-9]*))?")


@dataclass(frozen=True, order=True)
class QemuVersion:
    major: int
    minor: int
    micro: int = 0

    @classmethod
    def parse(cls, text: str) -> QemuVersion:
        m = _VERSION.fullmatch(text.strip())
        if not m:
            raise UsageError(f"not a QEMU version: {text!r} (expected X.Y or X.Y.Z, e.g. 9.1.0)")
        return cls(int(m[1]), int(m[2]), int(m[3] or 0))

    @classmethod
    def from_reply(cls, qemu: dict[str, Any]) -> QemuVersion:
        """From query-version's ``return.qemu`` object."""
        return cls(int(qemu["major"]), int(qemu["minor"]), int(qemu["micro"]))

    @property
    def is_development(self) -> bool:
        """A development snapshot (X.Y.50) or release candidate (X.Y.9x)."""
        return self.micro >= 50

    def release_names(self) -> tuple[QemuVersion, ...]:
        """The release names a dump of this QEMU may be filed under.

        A release X.Y.Z is filed under X.Y.0. A development snapshot X.Y.50 or a
        release candidate X.Y.9x is filed under the next release; QEMU moves to
        the next major version after X.2 (since 4.x), so both X.(Y+1).0 and
        (X+1).0.0 are accepted.
        """
        if not self.is_development:
            return (QemuVersion(self.major, self.minor, 0),)
        return (QemuVersion(self.major, self.minor + 1, 0), QemuVersion(self.major + 1, 0, 0))

    def next_release(self) -> QemuVersion:
        """The release after this one's line: after X.2 comes (X+1).0 (QEMU since 4.0), else X.(Y+1).0."""
        if self.minor >= 2:
            return QemuVersion(self.major + 1, 0, 0)
        return QemuVersion(self.major, self.minor + 1, 0)

    def __str__(self) -> str:
        return f"{self.major}.{self.minor}.{self.micro}"
