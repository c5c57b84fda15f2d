"""QEMU built from source by the agent, then probed: QEMU 10.2.2 from Debian's orig tarball
(upstream source without bundled firmware), target x86_64, under KVM.

QEMU >= 10.2 answers `query-accelerators`, so this also proves the verdict on a modern dump.
The build (~30 minutes on 2 cores) is cached in $FARM_CACHE/agent/qemu, keyed by the
tarball's sha256 and the target.
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest

from farm.caps import dump
from tests.paths import CACHE
from tests.helpers import farm, needs_kvm

TARBALL = CACHE / "src" / "qemu_10.2.2+ds.orig.tar.xz"

pytestmark = [pytest.mark.slow, needs_kvm]


@pytest.mark.skipif(platform.machine() != "x86_64", reason="builds and probes an x86_64 QEMU")
def test_qemu_10_2_2_built_from_the_tarball_probes_real_with_query_accelerators(env, tmp_path):
    if not TARBALL.is_file():
        pytest.skip(f"{TARBALL} missing: ./bootstrap test fetches it")
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "hosts:\n"
        "  - name: builder\n"
        "    transport: local\n"
        "    arch: x86_64\n"
        "    toolchain:\n"
        "      libvirt: debian:11.3.0-3+deb13u3\n"
        f"      qemu: tarball:{TARBALL}\n"
    )
    code, out, err = farm(env, "probe", "--qemu", "10.2.2", "--arch", "x86_64", "--inventory", str(inventory), "--json")
    assert out is not None, err[-3000:]
    (job,) = out["jobs"]
    assert (code, job["status"], job["verdict"]) == (0, "ok", "real"), job
    artifact = Path(job["artifact"])
    assert artifact.name == "caps_10.2.0_x86_64.replies"
    provenance = json.loads((artifact.parent / "provenance.json").read_text())
    assert provenance["qemu"]["origin"] == f"tarball:{TARBALL}"
    assert provenance["qemu"]["version"] == "10.2.2"
    assert provenance["qemu"]["path"].startswith(str(CACHE / "agent" / "qemu"))

    d = dump.load(artifact)
    accelerators = d.find("query-accelerators")
    assert accelerators is not None, "QEMU 10.2 answers query-accelerators"
    assert accelerators.result["enabled"] == "kvm"
    assert d.find("query-version").result["qemu"] == {"major": 10, "minor": 2, "micro": 2}
    code, inspected, _ = farm(env, "replies", "inspect", "--json", str(artifact))
    assert inspected[0]["accelerator"] == "kvm" and inspected[0]["sessions"] == 2
    assert inspected[0]["verdict"] == "real"
