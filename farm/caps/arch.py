"""CPU architectures as libvirt names them in tests/qemucapabilitiesdata."""

from __future__ import annotations

import enum
import os

from farm.errors import UsageError


class Architecture(enum.Enum):
    """An architecture of a dump, named as libvirt names the file."""

    x86_64 = "x86_64"
    aarch64 = "aarch64"
    ppc64 = "ppc64"
    s390x = "s390x"
    loongarch64 = "loongarch64"
    riscv64 = "riscv64"
    armv7l = "armv7l"
    ppc = "ppc"
    sparc = "sparc"
    i686 = "i686"
    mips64 = "mips64"

    @property
    def needs_hardware(self) -> bool:
        """libvirt expects this arch's dumps from real hardware with KVM."""
        return self in REAL_HARDWARE

    @property
    def qemu_target(self) -> str:
        """The arch name QEMU reports in query-target and uses in qemu-system-*."""
        return _QEMU_TARGET.get(self, self.value)

    @classmethod
    def from_qemu_target(cls, target: str) -> Architecture:
        for arch in cls:
            if arch.qemu_target == target:
                return arch
        raise UsageError(f"unknown QEMU target arch {target!r}")

    @classmethod
    def native(cls) -> Architecture:
        return cls.parse(_UNAME.get(os.uname().machine, os.uname().machine))

    @classmethod
    def from_uname(cls, machine: str | None) -> Architecture | None:
        """The arch of a host whose ``uname -m`` is ``machine`` (ppc64le -> ppc64); None if unknown."""
        if machine is None:
            return None
        try:
            return cls(_UNAME.get(machine, machine))
        except ValueError:
            return None

    @classmethod
    def parse(cls, name: str) -> Architecture:
        try:
            return cls(name)
        except ValueError:
            known = ", ".join(a.value for a in cls)
            raise UsageError(f"unknown arch {name!r} (known: {known})") from None

    @classmethod
    def parse_list(cls, spec: str, available: list[Architecture] | None = None) -> list[Architecture]:
        """Parse ``all``, ``native`` or a comma-separated list of arch names.

        ``all`` means every arch in ``available`` (the inventory's), or every
        arch libvirt expects from real hardware when no inventory is given.
        """
        result: list[Architecture] = []
        for word in (w.strip() for w in spec.split(",")):
            if not word:
                raise UsageError(f"empty arch name in {spec!r}")
            if word == "all":
                picked = list(available) if available is not None else sorted(REAL_HARDWARE, key=_order)
            elif word == "native":
                picked = [cls.native()]
            else:
                picked = [cls.parse(word)]
            result.extend(a for a in picked if a not in result)
        return result


REAL_HARDWARE = frozenset(
    {Architecture.x86_64, Architecture.aarch64, Architecture.ppc64, Architecture.s390x, Architecture.loongarch64}
)

_QEMU_TARGET = {Architecture.armv7l: "arm", Architecture.i686: "i386"}
# uname -m -> libvirt's name; the agent's QEMU_TARGET_ALIASES agree (tests/test_arch_aliases.py)
_UNAME = {"ppc64le": "ppc64", "arm64": "aarch64", "armv7": "armv7l", "armv8l": "armv7l", "amd64": "x86_64",
          "i386": "i686"}


def _order(arch: Architecture) -> int:
    return list(Architecture).index(arch)
