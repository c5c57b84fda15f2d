"""Hosts without internet: sources staged by the coordinator, `farm hosts check` saying whether a
host's toolchain needs the network and whether it has it, and a tool's failure as one line.

The SSH hosts are real sshd in network namespaces (tests/netns.py) that have no route out: what an
s390x LPAR behind a jump box or an isolated POWER box sees."""

from __future__ import annotations

import json
import os
import pwd
import textwrap
import time
from pathlib import Path

import pytest

from farm.errors import UsageError
from farm.hosts.agent import one_line
from farm.inventory import Toolchain, load_inventory
from tests.helpers import farm, needs_kvm, needs_x86
from tests.netns import FARM_USER
from tests.paths import CACHE

ORIG = CACHE / "src" / "libvirt_11.3.0.orig.tar.xz"  # libvirt 11.3.0's release tarball, fetched by ./bootstrap


def test_tarball_sources_are_coordinator_paths_and_what_needs_the_network_is_known(tmp_path: Path):
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(textwrap.dedent("""\
        hosts:
          - name: lpar
            transport: local
            arch: s390x
            toolchain: {libvirt: "tarball:/srv/src/libvirt-11.3.0.tar.xz", qemu: "tarball:/srv/src/qemu-10.2.2.tar.xz"}
        """))
    (host,) = load_inventory(inventory).hosts
    assert host.toolchain.libvirt_source.kind == "tarball" and host.toolchain.network() == {}
    for bad, why in (("tarball:libvirt.tar.xz", "expected tarball:/absolute/path (on the coordinator, staged on"),
                     ("tarball:/srv/a\x1bb.tar.xz", "expected tarball:/absolute/path"),
                     ("tarball:", "expected tarball:/absolute/path"),
                     ("bundle:/srv/x", "expected one of debian:..., git:..., tarball:..., builddir:...")):
        inventory.write_text(f"hosts:\n  - name: h\n    transport: local\n    arch: x86_64\n"
                             f"    toolchain: {{libvirt: {json.dumps(bad)}}}\n")
        with pytest.raises(UsageError, match="field 'toolchain.libvirt'") as e:
            load_inventory(inventory)
        assert why in str(e.value) and "\n" not in str(e.value)
    assert Toolchain(libvirt="debian:11.3.0-3").network() == {"libvirt": "apt"}
    assert Toolchain(libvirt="git:https://gitlab.com/libvirt/libvirt.git@master",
                     qemu="git:git@gitlab.com:qemu-project/qemu.git@master").network() == {
        "libvirt": "gitlab.com:443", "qemu": "gitlab.com:22"}
    assert Toolchain(libvirt="git:ssh://git@[fd00::1]:2222/libvirt.git@v11.3.0").network() == {"libvirt": "fd00::1:2222"}
    assert Toolchain(libvirt="git:/srv/mirror/libvirt.git@master", qemu="system").network() == {}
    assert Toolchain(libvirt="builddir:/srv/build", qemu="binary:/usr/bin/qemu-system-x86_64").network() == {}


def test_a_failure_text_becomes_one_line():
    apt = ("Reading package lists...\nNOTICE: 'libvirt' packaging is maintained in the 'Git' version control\n"
           "E: Can not find version '0.0.1-1' of package 'libvirt'\nE: Unable to find a source package for libvirt\n")
    assert one_line("cannot download libvirt=0.0.1-1 source:\n" + apt) == \
        "cannot download libvirt=0.0.1-1 source: E: Unable to find a source package for libvirt"
    assert len(one_line("x" * 5000)) == 300 and "\n" not in one_line("a\n\n b \n")
    assert one_line("") == ""


def test_a_toolchain_failure_is_one_line_in_the_reasons_and_whole_in_the_job_log(env, tmp_path: Path):
    """apt-get source of a libvirt version Debian never had: its whole output goes to the job's log,
    one line to the reasons (not the whole apt-get output)."""
    inventory = tmp_path / "inv.yaml"
    inventory.write_text(textwrap.dedent(f"""\
        hosts:
          - name: nowhere
            transport: local
            arch: x86_64
            toolchain: {{libvirt: "debian:0.0.1-1", qemu: system, cache_dir: "{tmp_path / 'cache'}"}}
        """))
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory),
                          "--json", "--quiet")
    assert code == 1 and out is not None, err
    (job,) = out["jobs"]
    assert job["status"] == "failed"
    (reason,) = job["reasons"]
    assert "\n" not in reason and len(reason) < 400, reason
    assert "cannot download libvirt=0.0.1-1 source: apt-get failed (exit 100): E: " in reason, reason
    assert "Reading package lists" not in reason
    code, shown, err = farm(env, "runs", "show", str(out["run"]), "--json")
    log = "\n".join(shown["jobs"][0]["log"])
    assert "apt-get: Reading package lists" in log and "apt-get: E: " in log, log


def _farm_cache(ssh_hosts, name: str) -> Path:
    """An empty toolchain cache dir on the host, owned by the farm user: nothing built yet."""
    path = ssh_hosts.base / name
    path.mkdir()
    user = pwd.getpwnam(FARM_USER)
    os.chown(path, user.pw_uid, user.pw_gid)
    return path


def test_hosts_check_says_whether_a_toolchain_needs_the_network_and_whether_the_host_has_it(
        ssh_hosts, env, tmp_path: Path):
    debian, staged = ssh_hosts.create(2, prefix="offline")
    inventory = ssh_hosts.inventory(tmp_path / "inv.yaml", [
        debian.entry(toolchain={"cache_dir": str(_farm_cache(ssh_hosts, "c1"))}),
        staged.entry(toolchain={"libvirt": f"tarball:{ORIG}", "cache_dir": str(_farm_cache(ssh_hosts, "c2"))}),
    ])
    started = time.monotonic()
    code, out, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 0 and out is not None, err
    assert time.monotonic() - started < 60
    by_name = {e["name"]: e["network"] for e in out}
    needs = by_name[debian.name]
    assert needs["needs"] is True and needs["sources"] == {"libvirt": "apt"}
    assert needs["reachable"] is False and needs["checks"], needs  # no route out of the namespace
    assert all(not c["ok"] and c["error"] for c in needs["checks"]), needs
    assert by_name[staged.name] == {"needs": False, "sources": {}, "reachable": None, "checks": []}
    code, _, err = farm(env, "hosts", "check", "--inventory", str(inventory))
    assert code == 0, err


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_an_offline_ssh_host_builds_qemucapsprobe_from_a_staged_tarball_and_probes(ssh_hosts, env, tmp_path: Path):
    """A real build (libvirt 11.3.0's orig tarball, meson + ninja on the host) and a real probe of
    the host's QEMU under KVM, on a host that cannot reach Debian or GitLab."""
    if not ORIG.is_file():
        pytest.skip(f"{ORIG} missing: run ./bootstrap test (it fetches it)")
    (h,) = ssh_hosts.create(1, prefix="airgap")
    cache = _farm_cache(ssh_hosts, "cache")

    # as before: debian:VERSION on a host without internet fails, in one line
    before = ssh_hosts.inventory(tmp_path / "debian.yaml", [h.entry(toolchain={"cache_dir": str(cache)})])
    started = time.monotonic()
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(before),
                          "--json", "--quiet")
    failed_after = time.monotonic() - started
    (job,) = out["jobs"]
    assert code == 1 and job["status"] == "failed", out
    (reason,) = job["reasons"]
    assert "cannot download libvirt=11.3.0-3+deb13u3 source: apt-get failed" in reason and "\n" not in reason

    # staged: the coordinator's tarball goes to the host's cache once, the host builds and probes
    inventory = ssh_hosts.inventory(tmp_path / "staged.yaml", [
        h.entry(toolchain={"libvirt": f"tarball:{ORIG}", "cache_dir": str(cache)})])
    started = time.monotonic()
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory),
                          "--json", "--quiet")
    first_probe = time.monotonic() - started
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 0 and (job["status"], job["verdict"]) == ("ok", "real"), out
    staged = list((cache / "agent" / "staged").glob("*/libvirt_11.3.0.orig.tar.xz"))
    assert len(staged) == 1 and staged[0].read_bytes() == ORIG.read_bytes()
    assert staged[0].parent.name == __import__("hashlib").sha256(ORIG.read_bytes()).hexdigest()
    provenance = json.loads((Path(job["artifact"]).parent / "provenance.json").read_text())
    assert provenance["libvirt"]["source"] == f"tarball:{ORIG}"  # as the inventory says it
    assert provenance["libvirt"]["libvirt_version"] == "11.3.0" and provenance["libvirt"]["cached"] is False
    code, shown, _ = farm(env, "runs", "show", str(out["run"]), "--json")
    assert any("staging " in line for line in shown["jobs"][0]["log"])

    # the next probe: nothing uploaded, nothing built
    started = time.monotonic()
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory),
                          "--json", "--quiet")
    again = time.monotonic() - started
    assert code == 0 and out["jobs"][0]["status"] == "ok", out
    code, shown, _ = farm(env, "runs", "show", str(out["run"]), "--json")
    assert not any("staging " in line for line in shown["jobs"][0]["log"])
    print(f"\noffline host, first probe: debian source failed after {failed_after:.1f} s; "
          f"staged tarball: {first_probe:.1f} s (upload + build + probe); next probe {again:.1f} s")


def test_a_staged_source_that_is_a_fifo_or_missing_is_refused_without_blocking(tmp_path: Path):
    from farm.hosts import HostError
    from farm.hosts.agent import file_digest

    fifo = tmp_path / "libvirt.tar.xz"
    os.mkfifo(fifo)
    with pytest.raises(HostError, match="not a regular file"):
        file_digest(fifo)  # never opened: opening a FIFO would wait for a writer
    with pytest.raises(HostError, match="cannot read it: No such file"):
        file_digest(tmp_path / "missing.tar.xz")
    real = tmp_path / "real.tar.xz"
    real.write_bytes(b"x" * 3_000_000)
    assert file_digest(real) == (__import__("hashlib").sha256(real.read_bytes()).hexdigest(), 3_000_000)


def _bundle(tmp_path: Path) -> tuple[Path, str]:
    """A git bundle of libvirt 11.3.0's source (one commit, tagged v11.3.0), as a coordinator would
    make one of its mirror (`git bundle create FILE --all`): (the bundle, the commit)."""
    import subprocess

    source = CACHE / "src" / "libvirt-11.3.0"
    if not (source / "meson.build").is_file():
        pytest.skip(f"{source} missing: run ./bootstrap test (it fetches it)")
    repo = tmp_path / "mirror.git"
    git = ["git", "--git-dir", str(repo), "--work-tree", str(source), "-c", "user.name=farm tests",
           "-c", "user.email=farm@localhost", "-c", "commit.gpgsign=false"]
    subprocess.run(["git", "init", "--quiet", "--bare", str(repo)], check=True)
    subprocess.run([*git, "add", "--all", "--force"], check=True, capture_output=True)
    subprocess.run([*git, "commit", "--quiet", "--no-verify", "-m", "libvirt 11.3.0"], check=True)
    subprocess.run([*git, "tag", "v11.3.0"], check=True)
    bundle = tmp_path / "libvirt.bundle"
    subprocess.run([*git, "bundle", "create", str(bundle), "--all"], check=True, capture_output=True)
    commit = subprocess.run([*git, "rev-parse", "v11.3.0^{commit}"], check=True, capture_output=True,
                            text=True).stdout.strip()
    return bundle, commit


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_an_offline_ssh_host_builds_qemucapsprobe_from_a_staged_git_bundle(ssh_hosts, env, tmp_path: Path):
    """git:PATH.bundle@REF: a bundle of the coordinator's mirror, staged like a tarball; the host
    clones it (no network), checks out REF, builds and probes for real."""
    bundle, commit = _bundle(tmp_path)
    (h,) = ssh_hosts.create(1, prefix="bundle")
    cache = _farm_cache(ssh_hosts, "cache")
    source = f"git:{bundle}@v11.3.0"
    inventory = ssh_hosts.inventory(tmp_path / "inv.yaml", [h.entry(toolchain={"libvirt": source,
                                                                               "cache_dir": str(cache)})])
    code, checked, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 0 and checked[0]["network"]["needs"] is False, (checked, err)
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory),
                          "--json", "--quiet")
    assert out is not None, err
    (job,) = out["jobs"]
    assert code == 0 and (job["status"], job["verdict"]) == ("ok", "real"), out
    (staged,) = (cache / "agent" / "staged").glob("*/libvirt.bundle")
    assert staged.read_bytes() == bundle.read_bytes()
    provenance = json.loads((Path(job["artifact"]).parent / "provenance.json").read_text())
    assert provenance["libvirt"]["source"] == source and provenance["libvirt"]["commit"] == commit
