"""What farm publish takes: release builds of QEMU (not a distribution's), real dumps (fakes skipped
and reported, or the whole run refused with --strict), every dump's warnings repeated; dry runs say
so. Into a small checkout shaped like a libvirt tree (tests/test_publish.py's ``mini``): everything
here stops before regeneration, so no libvirt build is needed. The QEMU 7.2 runs are real probes of
Debian's system QEMU (7.2.22, package 'Debian 1:7.2+dfsg-...') on this machine's built-in inventory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from farm.caps import dump as dumps
from farm.caps.inspect import inspect
from farm.caps.version import QemuVersion
from farm.publish import upstream
from tests.helpers import farm, needs_kvm, needs_x86
from tests.publishing import Remotes, snapshot
from tests.standin import standin_builddir
from tests.test_publish import make_run, mini  # noqa: F401 - the fixture

DEBIAN = re.compile(r"Debian 1:7\.2\+dfsg-\S+")


def _package(path: Path) -> str | None:
    return inspect(dumps.load(path)).facts.package


def test_the_upstream_rule_over_libvirts_own_dumps(data11: Path):
    """libvirt's tree: vanilla releases and git builds of a release being made pass; the Fedora builds
    of fake-only arches and a micro release without a package string do not; so would Debian's."""
    verdicts = {}
    for path in sorted(data11.glob("caps_*.replies")):
        facts = inspect(dumps.load(path)).facts
        verdicts[path.name] = upstream.build_problem(facts.qemu_version, facts.package)
    assert _package(data11 / "caps_9.2.0_x86_64.replies") == "v9.2.0"
    assert verdicts["caps_9.2.0_x86_64.replies"] is None
    assert _package(data11 / "caps_10.0.0_s390x.replies") == "v9.2.0-1203-gd6430c17d7"  # QEMU 9.2.50
    assert verdicts["caps_10.0.0_s390x.replies"] is None
    assert "a distribution build (package 'qemu-7.2.0-6.fc37')" in verdicts["caps_7.2.0_ppc.replies"]
    assert "micro release 9.2.2" in verdicts["caps_9.2.0_aarch64+hvf.replies"]
    taken = [name for name, problem in verdicts.items() if problem is None]
    assert len(taken) == len(verdicts) - 4, verdicts  # ppc, armv7l, sparc (Fedora) and the 9.2.2 hvf

    debian = upstream.build_problem(QemuVersion(7, 2, 22), "Debian 1:7.2+dfsg-7+deb12u18+b3")
    assert debian == ("a distribution build (package 'Debian 1:7.2+dfsg-7+deb12u18+b3'), not a vanilla QEMU "
                      "release; micro release 7.2.22 (libvirt files it under 7.2.0: the data of 7.2.0 comes "
                      "from the release itself)")
    # farm-built QEMU: the package string is the tag it was built from
    assert upstream.build_problem(QemuVersion(10, 2, 2), "v10.2.2") is None
    assert upstream.build_problem(QemuVersion(10, 2, 0), "") is None
    assert upstream.build_problem(QemuVersion(10, 1, 91), "v10.2.0-rc1") is None
    assert "names another release" in upstream.build_problem(QemuVersion(10, 2, 0), "v10.1.0")
    assert "between releases" in upstream.build_problem(QemuVersion(10, 2, 0), "v10.2.0-3-gabcdef123")
    assert "micro release" in upstream.build_problem(QemuVersion(10, 2, 2), "")


def _probe(env, archs: str) -> dict:
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", archs, "--json", "--quiet")
    assert out is not None, err
    return out


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_debians_qemu_is_refused_with_the_reason_and_published_with_allow_distro_build(env, mini: Remotes):
    out = _probe(env, "x86_64")
    (job,) = out["jobs"]
    assert (job["status"], job["verdict"]) == ("ok", "real"), out
    assert DEBIAN.fullmatch(_package(Path(job["artifact"]))), _package(Path(job["artifact"]))
    run = str(out["run"])
    before = snapshot(mini.tree)

    for dry in ([], ["--dry-run"]):
        code, _, err = farm(env, "publish", run, "--libvirt", str(mini.tree), *dry)
        assert code == 2, err
        lines = err.strip().splitlines()
        last = lines[-1]
        assert f"farm: run {run} has no dump to publish" in last
        assert "caps_7.2.0_x86_64.replies: not a QEMU release build upstream takes: a distribution build " \
               "(package 'Debian 1:7.2+dfsg-" in last
        assert "micro release 7.2." in last and "(--allow-distro-build to publish it anyway)" in last
        # the probe's warnings, repeated
        assert any("warning: caps_7.2.0_x86_64.replies: QEMU build is not a vanilla release" in line
                   for line in lines), err
        assert any("warning: caps_7.2.0_x86_64.replies: micro version 7.2." in line for line in lines), err
    assert snapshot(mini.tree) == before

    code, out, err = farm(env, "publish", run, "--libvirt", str(mini.tree), "--allow-distro-build", "--dry-run",
                          "--json")
    assert code == 0, err
    assert out["status"] == "dry-run" and [d["action"] for d in out["dumps"]] == ["Update"]
    assert any("QEMU build is not a vanilla release" in w for w in out["warnings"]), out
    assert any("micro version" in w for w in out["dumps"][0]["warnings"]), out
    assert out["skipped"] == []
    assert snapshot(mini.tree) == before


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_a_run_with_a_fake_publishes_its_real_dump_and_reports_the_fake_unless_strict(env, mini: Remotes):
    """The built-in inventory's run: x86_64 real, s390x fake (TCG). The real one is taken, the fake
    reported; --strict keeps the all-or-nothing rule; --allow-fake adds the fake."""
    out = _probe(env, "x86_64,s390x")
    assert sorted((j["arch"], j["status"]) for j in out["jobs"]) == [("s390x", "fake"), ("x86_64", "ok")], out
    run = str(out["run"])
    before = snapshot(mini.tree)
    code, published, err = farm(env, "publish", run, "--libvirt", str(mini.tree), "--allow-distro-build",
                                "--dry-run", "--json")
    assert code == 0, err
    assert published["status"] == "dry-run"
    assert [(d["arch"], d["action"]) for d in published["dumps"]] == [("x86_64", "Update")]
    (skipped,) = published["skipped"]
    assert skipped.startswith("caps_7.2.0_s390x.replies: a fake s390x dump (TCG only)"), skipped
    assert "1 job(s) skipped" in published["message"]

    code, text, err = farm(env, "publish", run, "--libvirt", str(mini.tree), "--allow-distro-build", "--dry-run")
    assert code == 0, err
    assert "skipped: caps_7.2.0_s390x.replies: a fake s390x dump" in err  # reported as it goes, too

    code, _, err = farm(env, "publish", run, "--libvirt", str(mini.tree), "--allow-distro-build", "--dry-run",
                        "--strict", "--quiet")
    assert code == 2, err
    assert err.strip().splitlines() == [err.strip()]  # one line
    assert f"run {run}: refusing to publish (--strict): caps_7.2.0_s390x.replies: a fake s390x dump" in err

    code, published, err = farm(env, "publish", run, "--libvirt", str(mini.tree), "--allow-distro-build",
                                "--allow-fake", "--dry-run", "--strict", "--json")
    assert code == 0, err
    assert sorted(d["arch"] for d in published["dumps"]) == ["s390x", "x86_64"] and published["skipped"] == []
    assert snapshot(mini.tree) == before


def _changed(data11: Path, tmp_path: Path) -> Path:
    """libvirt's own vanilla 9.2.0 dump, one exchange left out (a semantic change)."""
    d = dumps.load(data11 / "caps_9.2.0_x86_64.replies")
    changed = tmp_path / "changed" / "caps_9.2.0_x86_64.replies"
    changed.parent.mkdir(exist_ok=True)
    changed.write_text(dumps.render([ex for ex in d.exchanges if ex.execute != "query-migrate-capabilities"]))
    return changed


def test_a_vanilla_release_dump_is_taken_without_flags(env, mini: Remotes, data11: Path, tmp_path: Path):
    changed = _changed(data11, tmp_path)
    assert _package(changed) == "v9.2.0" and str(inspect(dumps.load(changed)).facts.qemu_version) == "9.2.0"
    run = make_run(Path(env["FARM_STATE_DIR"]), changed, "x86_64")
    code, out, err = farm(env, "publish", str(run), "--libvirt", str(mini.tree), "--dry-run", "--strict", "--json")
    assert code == 0, err
    assert out["status"] == "dry-run" and [d["action"] for d in out["dumps"]] == ["Update"]
    assert out["skipped"] == [] and out["warnings"] == []


def test_a_dry_run_says_dry_run_even_when_nothing_changed(env, mini: Remotes, data11: Path, tmp_path: Path):
    """`farm publish --dry-run` and `farm probe --publish --dry-run`: status dry-run, as documented."""
    run = make_run(Path(env["FARM_STATE_DIR"]), data11 / "caps_9.2.0_x86_64.replies", "x86_64")
    before = snapshot(mini.tree)
    code, out, err = farm(env, "publish", str(run), "--libvirt", str(mini.tree), "--dry-run", "--json")
    assert code == 0, err
    assert out["status"] == "dry-run" and out["branch"] is None and out["commits"] == []
    assert [d["action"] for d in out["dumps"]] == ["unchanged"]
    assert "would publish nothing (dry run)" in out["message"]

    # farm probe --publish --dry-run, with a stand-in probe replaying libvirt's own 9.2.0 dump
    builddir = standin_builddir(tmp_path / "standin", delay=0)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  - name: standin\n    transport: local\n    arch: x86_64\n"
                         f"    toolchain:\n      libvirt: builddir:{builddir}\n      qemu: system\n")
    code, out, err = farm(env, "probe", "--qemu", "9.2.0", "--arch", "x86_64", "--inventory", str(inventory),
                          "--publish", "--dry-run", "--libvirt", str(mini.tree), "--json", "--quiet")
    assert out is not None, err
    assert out["jobs"][0]["status"] == "ok", out
    assert out["publication"]["status"] == "dry-run", out["publication"]
    assert snapshot(mini.tree) == before
    code, shown, _ = farm(env, "runs", "show", str(out["run"]), "--json")
    assert shown["publications"] == []  # a dry run records nothing
