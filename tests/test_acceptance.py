"""The acceptance test of the whole farm, end to end and for real.

`farm probe` on the embedded default makes a real x86_64 dump of Debian's QEMU 7.2 with
libvirt 11.3.0's qemucapsprobe under KVM. Put into the libvirt 11.3.0 tree under the name
libvirt gives it, the dump passes that tree's qemu-replies-tool.py, and after
VIR_TEST_REGENERATE_OUTPUT=1 of qemucapabilitiestest (built in that tree) the test passes
without regeneration.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from farm.publish.tree import regenerate_and_verify
from tests.helpers import farm, needs_kvm, needs_x86

pytestmark = [pytest.mark.slow, needs_kvm, needs_x86]


def test_a_probed_dump_lands_in_libvirt_and_its_tests_pass(env, libvirt_worktree):
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert (job["status"], job["verdict"]) == ("ok", "real"), job
    artifact = Path(job["artifact"])

    tree = libvirt_worktree.tree
    data = tree / "tests" / "qemucapabilitiesdata"
    target = data / artifact.name
    assert target.name == "caps_7.2.0_x86_64.replies" and target.exists()  # replaces libvirt's own 7.2.0 dump
    shutil.copyfile(artifact, target)
    assert libvirt_worktree.changed()

    tool = subprocess.run(
        [sys.executable, str(tree / "scripts" / "qemu-replies-tool.py"), str(target)], capture_output=True, text=True
    )
    assert tool.returncode == 0 and tool.stdout.strip().endswith("... OK"), tool.stdout

    run = regenerate_and_verify(tree, libvirt_worktree.build_dir, ["qemucapabilitiestest"])
    assert run.ok and not run.regenerate
    # the regenerated expected output describes the new dump: Debian's QEMU 7.2 build
    xml = (data / "caps_7.2.0_x86_64.xml").read_text()
    assert "<version>7002022</version>" in xml  # QEMU 7.2.22, not the 7.2.0 libvirt recorded
