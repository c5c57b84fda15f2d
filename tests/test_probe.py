"""`farm probe` on the embedded default, for real: libvirt 11.3.0's qemucapsprobe
(built by the agent from Debian's source package) against Debian's QEMU 7.2 under KVM.

On an x86_64 machine only the x86_64 dump can be real; aarch64, ppc64 and s390x
run under TCG and must come out fake, flagged.
"""

from __future__ import annotations

import json
import pwd
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import farm, needs_kvm, needs_root, needs_x86

pytestmark = pytest.mark.slow

NO_KVM_USER = "farm-nokvm"


def qemu_processes() -> set[int]:
    done = subprocess.run(["pgrep", "-f", "qemu-system-"], capture_output=True, text=True)
    return {int(p) for p in done.stdout.split()}


@needs_kvm
@needs_x86
def test_probe_all_local_arches_real_x86_and_flagged_fakes(env):
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "all", "--json")
    assert out is not None, err
    assert code == 1  # fakes where libvirt expects real hardware are findings
    jobs = {j["arch"]: j for j in out["jobs"]}
    assert set(jobs) == {"x86_64", "aarch64", "ppc64", "s390x"}
    x86 = jobs["x86_64"]
    assert (x86["status"], x86["verdict"], x86["host"]) == ("ok", "real", "local-x86_64")
    for arch in ("aarch64", "ppc64", "s390x"):
        assert (jobs[arch]["status"], jobs[arch]["verdict"]) == ("fake", "fake")
        assert jobs[arch]["reasons"][0].startswith("FAKE: TCG only")
    for arch, job in jobs.items():
        artifact = Path(job["artifact"])
        assert artifact.name == f"caps_7.2.0_{arch}.replies"
        provenance = json.loads((artifact.parent / "provenance.json").read_text())
        assert provenance["libvirt"]["source"] == "debian:11.3.0-3+deb13u3"
        assert provenance["libvirt"]["libvirt_version"] == "11.3.0"
        assert provenance["qemu"]["version"].startswith("7.2.")
        assert provenance["host"]["facts"]["kvm"]["usable"] is True
        assert provenance["probe"]["sha256"] and provenance["verdict"]["verdict"] == job["verdict"]

    # the ledger remembers
    code, shown, _ = farm(env, "runs", "show", str(out["run"]), "--json")
    assert code == 0 and shown["status"] == "done"
    log = next(j["log"] for j in shown["jobs"] if j["arch"] == "x86_64")
    assert any("probe: " in line and "qemucapsprobe" in line for line in log), log  # the agent's own steps
    assert {j["arch"]: j["status"] for j in shown["jobs"]} == {a: j["status"] for a, j in jobs.items()}
    code, listed, _ = farm(env, "runs", "list", "--json")
    assert [r["run"] for r in listed] == [out["run"]]

    # the stored dumps judge the same from the command line
    code, inspected, _ = farm(env, "replies", "inspect", "--json", jobs["x86_64"]["artifact"])
    assert code == 0 and inspected[0]["verdict"] == "real" and inspected[0]["sessions"] == 2


@needs_kvm
@needs_x86
def test_a_qemu_of_another_release_is_a_clear_status(env):
    code, out, err = farm(env, "probe", "--qemu", "7.1.0", "--arch", "x86_64", "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 1 and job["status"] == "wrong-version"
    assert job["reasons"][0].startswith("asked for QEMU 7.1.0, the binary is QEMU 7.2.")
    assert Path(job["artifact"]).name == "caps_7.2.0_x86_64.replies"  # kept under its true name


@needs_kvm
@needs_x86
def test_a_probe_that_times_out_leaves_no_qemu_behind(env):
    before = qemu_processes()
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--timeout", "0.3", "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 1 and job["status"] == "timeout" and job["artifact"] is None
    assert "did not finish within" in job["reasons"][0]
    # other tests on this machine may start QEMUs of their own; an orphan of ours would stay
    deadline = time.monotonic() + 10
    while qemu_processes() - before and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not qemu_processes() - before


def test_an_arch_without_host_is_a_usage_error(env):
    code, _, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "riscv64")
    assert code == 2 and "no host can probe riscv64" in err
    code, _, err = farm(env, "probe", "--qemu", "seven", "--arch", "x86_64")
    assert code == 2 and "not a QEMU version" in err


@needs_root
@needs_kvm
@needs_x86
def test_the_same_probe_as_a_user_without_kvm_access_is_fake(env, tmp_path):
    try:
        pwd.getpwnam(NO_KVM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", NO_KVM_USER], check=True)
    check = subprocess.run(["runuser", "-u", NO_KVM_USER, "--", "test", "-w", "/dev/kvm"])
    assert check.returncode != 0, f"{NO_KVM_USER} must not have access to /dev/kvm"
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "hosts:\n"
        "  - name: nokvm\n"
        "    transport: local\n"
        f"    user: {NO_KVM_USER}\n"
        "    arch: x86_64\n"
        "    toolchain:\n"
        "      libvirt: debian:11.3.0-3+deb13u3\n"
        "      qemu: system\n"
    )
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory), "--json")
    assert out is not None, err
    (job,) = out["jobs"]
    assert (job["status"], job["verdict"]) == ("fake", "fake"), job
    assert any("no usable /dev/kvm" in r for r in job["reasons"])
