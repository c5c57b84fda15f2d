"""What libvirt upstream takes as test data: a release build of the QEMU it is filed under.

libvirt's ``tests/qemucapabilitiesdata`` holds dumps of vanilla QEMU: ``query-version`` says the
release (micro 0), or the development numbering of a release being made (X.Y.50 between releases,
X.Y.9N for release candidates, filed under the next release), and its ``package`` string is empty or
what QEMU's maintainers' builds put there: the tag (``v9.2.0``, ``v10.0.0-rc1``) or, for a build
from git, ``git describe`` (``v9.2.0-1203-gd6430c17d7``). A distribution's build (``Debian
1:7.2+dfsg-7+deb12u18+b3``, ``qemu-7.2.0-6.fc37``) carries its own patches and configuration, and a
stable micro release (7.2.22) is not the release libvirt files it under: neither is what a libvirt
reviewer takes as the data of that release. One exception: a vanilla build of an upstream stable
tag whose package string is exactly that tag (``v10.2.2`` for QEMU 10.2.2, as farm builds it) is
the maintainers' own release and is taken.

Pure: looks only at the version and the package string.
"""

from __future__ import annotations

import re

from farm.caps.version import QemuVersion

_TAG = re.compile(r"v([0-9]+\.[0-9]+\.[0-9]+)(-rc[0-9]+)?")
_DESCRIBE = re.compile(r"v[0-9]+\.[0-9]+\.[0-9]+(-rc[0-9]+)?-[0-9]+-g[0-9a-f]{7,40}")

#: the command-line flag that publishes such dumps anyway
FLAG = "--allow-distro-build"


def build_problem(version: QemuVersion | None, package: str | None) -> str | None:
    """Why a dump of this QEMU build is not what upstream takes; None when it is."""
    if version is None:
        return "no QEMU version (query-version)"
    package = (package or "").strip()
    problems = []
    tag = _TAG.fullmatch(package)
    if package and not tag and not _DESCRIBE.fullmatch(package):
        problems.append(f"a distribution build (package {package!r}), not a vanilla QEMU release")
    elif _DESCRIBE.fullmatch(package) and not version.is_development:
        problems.append(f"QEMU built from git between releases (package {package!r})")
    elif tag and not tag[2] and tag[1] != str(version):
        problems.append(f"package {package!r} names another release than QEMU {version}")
    elif tag and tag[2] and version.micro < 90:
        problems.append(f"package {package!r} names a release candidate, QEMU says {version}")
    if version.micro and not version.is_development and not (tag and tag[1] == str(version)):
        problems.append(f"micro release {version} (libvirt files it under "
                        f"{version.major}.{version.minor}.0: the data of {version.major}.{version.minor}.0 "
                        "comes from the release itself)")
    return "; ".join(problems) or None
