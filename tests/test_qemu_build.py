"""QEMU built from source by the agent, then probed: QEMU 10.2.2 from Debian's orig tarball
(upstream source without bundled firmware), target x86_64, under KVM.

QEMU >= 10.2 answers `query-accelerators`. libvirt 11.3.0's qemucapsprobe (the newest libvirt
source package reachable here) still asks `query-kvm`, so its dump is judged by that; the
verdict on a dump as a newer libvirt records it is proven with the built QEMU's own
`query-accelerators` replies (asked over QMP here, under KVM and under TCG) in place of
`query-kvm` in the real dump.
The build (~10-30 minutes on 2 cores) is cached in $FARM_CACHE/agent/qemu, keyed by the
tarball's sha256 and the target.
"""

from __future__ import annotations

import json
import platform
import subprocess
from pathlib import Path

import pytest

from farm.caps import dump
from farm.caps.dump import Exchange
from tests.helpers import farm, needs_kvm
from tests.paths import CACHE

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
    assert d.valid and d.find("query-version").result["qemu"] == {"major": 10, "minor": 2, "micro": 2}
    assert d.find("query-kvm").result == {"enabled": True, "present": True}
    code, inspected, _ = farm(env, "replies", "inspect", "--json", str(artifact))
    assert inspected[0]["accelerator"] == "kvm" and inspected[0]["sessions"] == 2
    assert inspected[0]["verdict"] == "real"

    # The modern way: query-accelerators, as the built QEMU answers it.
    qemu = provenance["qemu"]["path"]
    kvm, tcg = ask_accelerators(qemu, "kvm"), ask_accelerators(qemu, "tcg")
    assert kvm["enabled"] == "kvm" and tcg["enabled"] == "tcg" and "kvm" in kvm["present"]

    modern = tmp_path / "modern" / artifact.name
    modern.parent.mkdir()
    modern.write_text(dump.render(with_accelerators(d.exchanges, kvm)))
    fake = tmp_path / "fake" / artifact.name
    fake.parent.mkdir()
    fake.write_text(dump.render(with_accelerators(d.sessions[0], tcg)))
    code, judged, _ = farm(env, "replies", "inspect", "--json", str(modern), str(fake))
    assert [(j["accelerator"], j["sessions"], j["verdict"]) for j in judged] == [("kvm", 2, "real"), ("tcg", 1, "fake")]
    assert code == 1 and judged[1]["reasons"][0].startswith("FAKE: TCG only")


def ask_accelerators(qemu: str, accel: str) -> dict:
    """query-accelerators of a QEMU started with -accel ACCEL, over QMP on stdio."""
    commands = [{"execute": "qmp_capabilities"}, {"execute": "query-accelerators"}, {"execute": "quit"}]
    done = subprocess.run(
        [qemu, "-machine", "none", "-accel", accel, "-nodefaults", "-display", "none", "-qmp", "stdio"],
        input="".join(json.dumps(c) + "\n" for c in commands), capture_output=True, text=True, timeout=60,
    )
    replies = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    answers = [r["return"] for r in replies if isinstance(r.get("return"), dict) and "enabled" in r["return"]]
    assert answers, done.stdout + done.stderr
    return answers[0]


def with_accelerators(exchanges: list, reply: dict) -> list:
    """The exchanges with query-kvm replaced by query-accelerators answered with ``reply``."""
    out = []
    for ex in exchanges:
        if ex.execute == "query-kvm":
            ex = Exchange({"execute": "query-accelerators", "id": ex.command["id"]}, "", ex.line, ex.reply_line,
                          {"return": reply, "id": ex.command["id"]})
        out.append(ex)
    return out
