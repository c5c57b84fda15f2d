"""A stand-in for qemucapsprobe, for fault and scale tests: it replays a recorded real dump
(libvirt's own caps_9.2.0_x86_64.replies, made under KVM) after a delay, in place of
running QEMU. Used through the `builddir:PATH` libvirt toolchain source."""

from __future__ import annotations

import os
import shlex
from pathlib import Path

from tests.paths import CACHE

RECORDED = CACHE / "src" / "libvirt-11.3.0" / "tests" / "qemucapabilitiesdata" / "caps_9.2.0_x86_64.replies"
QEMU = "9.2.0"  # the release the recorded dump is of


def standin_builddir(directory: Path, delay: float, dump: Path = RECORDED) -> Path:
    """A directory that looks like a libvirt build dir whose tests/qemucapsprobe replays ``dump``."""
    probe = directory / "tests" / "qemucapsprobe"
    probe.parent.mkdir(parents=True, exist_ok=True)
    probe.write_text(f"#!/bin/sh\nsleep {delay}\nexec cat {shlex.quote(str(dump))}\n")
    probe.chmod(0o755)
    for d in (directory, probe.parent):
        os.chmod(d, 0o755)
    return directory
