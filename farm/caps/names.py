"""File names of dumps in libvirt's tests/qemucapabilitiesdata.

Current trees: ``caps_<ver>_<arch>[+<variant>].replies`` (and ``.xml``);
libvirt <= 9.x: ``caps_<ver>.<arch>[+<variant>].replies``.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from pathlib import Path

from farm.caps.arch import Architecture
from farm.caps.version import QemuVersion
from farm.errors import UsageError

KNOWN_VARIANTS = ("hvf", "amdsev", "inteltdx", "sgx", "mshv")
SUFFIXES = (".replies", ".xml")

_NAME = re.compile(
    r"caps_(?P<ver>[0-9]+\.[0-9]+\.[0-9]+)(?P<sep>[_.])(?P<arch>[a-z0-9_]+?)"
    r"(?:\+(?P<variant>[a-z][a-z0-9]*))?(?P<suffix>\.replies|\.xml)"
)


class Scheme(enum.Enum):
    current = "current"  # caps_9.1.0_x86_64.replies
    old = "old"  # caps_8.0.0.x86_64.replies (libvirt <= 9.x)


@dataclass(frozen=True)
class DumpName:
    version: QemuVersion
    arch: Architecture
    variant: str | None = None
    scheme: Scheme = Scheme.current
    suffix: str = ".replies"

    @classmethod
    def parse(cls, name: str) -> DumpName:
        """Parse a bare file name; anything with a directory part is refused."""
        if "/" in name or "\\" in name or "\0" in name or name in (".", ".."):
            raise UsageError(f"{name!r}: not a plain file name")
        m = _NAME.fullmatch(name)
        if not m:
            raise UsageError(
                f"{name!r}: not a dump name (expected caps_<ver>_<arch>[+<variant>].replies "
                "or caps_<ver>.<arch>.replies)"
            )
        try:
            arch = Architecture.parse(m["arch"])
        except UsageError as e:
            raise UsageError(f"{name!r}: {e}") from None
        return cls(
            version=QemuVersion.parse(m["ver"]),
            arch=arch,
            variant=m["variant"],
            scheme=Scheme.current if m["sep"] == "_" else Scheme.old,
            suffix=m["suffix"],
        )

    def __str__(self) -> str:
        sep = "_" if self.scheme is Scheme.current else "."
        return f"caps_{self.version}{sep}{column(self.arch.value, self.variant)}{self.suffix}"

    def with_scheme(self, scheme: Scheme) -> DumpName:
        return DumpName(self.version, self.arch, self.variant, scheme, self.suffix)

    def with_suffix(self, suffix: str) -> DumpName:
        if suffix not in SUFFIXES:
            raise UsageError(f"unknown dump suffix {suffix!r}")
        return DumpName(self.version, self.arch, self.variant, self.scheme, suffix)

    @property
    def cell(self) -> tuple[QemuVersion, Architecture, str | None]:
        """The coverage cell this name fills: (version, arch, variant)."""
        return (self.version, self.arch, self.variant)


def column(arch: str, variant: str | None) -> str:
    """A dump's arch[+variant], as libvirt's file names and farm's coverage columns write it."""
    return arch + (f"+{variant}" if variant else "")


def parse_variant(text: str | None) -> str | None:
    if text is None or text == "":
        return None
    if not re.fullmatch(r"[a-z][a-z0-9]*", text):
        raise UsageError(f"bad variant {text!r}: lowercase letters and digits, e.g. {', '.join(KNOWN_VARIANTS)}")
    return text


def detect_scheme(directory: Path) -> Scheme:
    """The naming scheme of a tests/qemucapabilitiesdata directory.

    An empty directory gets the current scheme; a directory mixing both is an error.
    """
    schemes = {DumpName.parse(p.name).scheme for p in directory.glob("caps_*.replies")}
    if len(schemes) > 1:
        raise UsageError(f"{directory}: mixes current and old (libvirt <= 9.x) dump names")
    return schemes.pop() if schemes else Scheme.current


def place(directory: Path, name: DumpName) -> Path:
    """The path of ``name`` inside ``directory``; never a path outside it."""
    path = directory / str(name)
    if path.parent != directory or DumpName.parse(path.name) != name:
        raise UsageError(f"{name}: refusing a name that leaves {directory}")
    return path
