"""farm nightly --once --publish into the real libvirt 11.3.0 checkout (tests/libvirt_worktree.py).

QEMU releases come from a local git repository standing in for QEMU's (v7.2.0, v9.2.0); the one
x86_64 host's libvirt probe is a stand-in (tests/standin.py) replaying a REAL dump of QEMU 7.2 made
first by ``farm probe`` (Debian's QEMU 7.2 under KVM, the built-in inventory). libvirt 11.3.0 has real
dumps of both releases, so a release with no result would be skipped as "in tree": the ledger holds
older results (made with other libvirt probes) that the stand-in's makes stale, and both are probed.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from pathlib import Path

import pytest

from farm.caps import dump as dumps
from tests.commit_style import check_commit_message
from tests.helpers import farm, needs_kvm, needs_x86
from tests.publishing import CAPS, EMAIL, NAME, git, snapshot
from tests.standin import RECORDED, standin_builddir
from tests.test_nightly import qemu_repo

SUBJECT = "qemucapabilitiesdata: Update test data for qemu-7.2.0 on x86_64"


def vanilla(dump: Path, out: Path) -> Path:
    """A copy of a real dump whose query-version says a vanilla release: micro 0, package 'vX.Y.0'."""
    d = dumps.load(dump)
    exchanges = []
    for ex in d.exchanges:
        if ex.execute == "query-version":
            reply = ex.reply
            qemu = reply["return"]["qemu"]
            qemu["micro"] = 0
            reply["return"]["package"] = f"v{qemu['major']}.{qemu['minor']}.0"
            ex = dataclasses.replace(ex, reply_text=json.dumps(reply, indent=2), _reply=None)
        exchanges.append(ex)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(dumps.render(exchanges))
    assert dumps.load(out).valid
    return out


def inventory(path: Path, builddir: Path) -> Path:
    path.write_text("hosts:\n  - name: standin\n    transport: local\n    arch: x86_64\n"
                    f"    toolchain:\n      libvirt: builddir:{builddir}\n      qemu: system\n")
    return path


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_nightly_publishes_what_changed_and_then_nothing(env, libvirt, tmp_path: Path):
    if not RECORDED.is_file():
        pytest.skip(f"{RECORDED} missing: run ./bootstrap test (it fetches libvirt 11.3.0)")
    tree = libvirt.tree

    # a real QEMU 7.2 dump (built-in inventory), in the ledger as run 1
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--json", "--quiet")
    assert code == 0, err
    (job,) = out["jobs"]
    assert (job["status"], job["verdict"]) == ("ok", "real"), out
    probed = Path(job["artifact"])
    assert probed.name == "caps_7.2.0_x86_64.replies"
    assert probed.read_text() != (tree / CAPS / probed.name).read_text()  # this host's dump is not libvirt's
    # Debian's build (7.2.22, package 'Debian ...') is not what upstream takes (farm publish refuses it
    # without --allow-distro-build): the stand-in replays it as a vanilla 7.2.0 would answer query-version
    real = vanilla(probed, tmp_path / "vanilla" / probed.name)

    # an older 9.2.0 result, made with another libvirt probe (replaying libvirt's own 9.2.0 dump)
    older = inventory(tmp_path / "older.yaml", standin_builddir(tmp_path / "older", delay=0))
    code, out, err = farm(env, "probe", "--qemu", "9.2.0", "--arch", "x86_64", "--inventory", str(older),
                          "--json", "--quiet")
    assert code == 0 and out["jobs"][0]["status"] == "ok", err

    # the nightly host: a stand-in that replays the real 7.2 dump, whatever QEMU it is asked for
    standin = standin_builddir(tmp_path / "standin", delay=0, dump=real)
    env.update(FARM_QEMU_GIT_URL=str(qemu_repo(tmp_path / "qemu", ["v7.2.0", "v9.2.0"])),
               FARM_NIGHTLY_MIN_QEMU="7.2.0", FARM_INVENTORY=str(inventory(tmp_path / "inv.yaml", standin)))
    before = snapshot(tree)
    upstream_main = git(str(libvirt.upstream), "rev-parse", "main")

    code, out, err = farm(env, "nightly", "--once", "--publish", "--json", "--quiet")
    assert code == 0, (out, err)
    assert [(i["tag"], i["why"].split(":")[0]) for i in out["plan"]] == [("v7.2.0", "stale"), ("v9.2.0", "stale")]
    runs = {r["qemu"]: r for r in out["runs"]}
    assert [(j["status"], j["verdict"]) for j in runs["7.2.0"]["jobs"]] == [("ok", "real")]
    assert [j["status"] for j in runs["9.2.0"]["jobs"]] == ["wrong-version"]  # the stand-in is QEMU 7.2

    # 7.2.0: published, one signed-off commit on the branch, on top of upstream's main
    pub = runs["7.2.0"]["publication"]
    branch = f"qemucaps/qemu-7.2.0-{datetime.date.today():%Y%m%d}"
    assert pub["status"] == "published" and pub["branch"] == branch, pub
    (commit,) = pub["commits"]
    assert git(tree, "rev-parse", branch) == commit
    assert git(tree, "log", "--format=%H", f"{upstream_main}..{branch}").splitlines() == [commit]
    message = git(tree, "log", "-1", "--format=%B", branch)
    check_commit_message(message)  # every line, against libvirt's style
    assert message.splitlines()[0] == SUBJECT
    assert message.endswith(f"Signed-off-by: {NAME} <{EMAIL}>")
    assert "QEMU 7.2.0 (tag v7.2.0, package 'v7.2.0')" in message.replace("\n", " ")
    files = git(tree, "show", "--name-only", "--format=", commit).splitlines()
    assert str(CAPS / "caps_7.2.0_x86_64.replies") in files
    assert git(tree, "show", f"{commit}:{CAPS}/caps_7.2.0_x86_64.replies") == real.read_text().strip()
    assert snapshot(tree)[:2] == before[:2]  # the checkout is back on main, clean

    # 9.2.0: nothing to publish
    assert runs["9.2.0"]["publication"]["status"] == "nothing"
    assert git(tree, "for-each-ref", "--format=%(refname:short)", "refs/heads/qemucaps/").splitlines() == [branch]

    # the ledger: one publication, of the 7.2.0 run
    code, shown, err = farm(env, "runs", "show", str(runs["7.2.0"]["run"]), "--json")
    assert code == 0, err
    (recorded,) = shown["publications"]
    assert recorded["status"] == "published" and recorded["branch"] == branch and recorded["commits"] == [commit]
    code, shown, err = farm(env, "runs", "show", str(runs["9.2.0"]["run"]), "--json")
    assert code == 0 and shown["publications"] == [], err

    # a second pass: nothing planned, nothing published
    after = (snapshot(tree), git(tree, "log", "--format=%H", branch))
    code, out, err = farm(env, "nightly", "--once", "--publish", "--json", "--quiet")
    assert code == 0, (out, err)
    assert out["plan"] == [] and out["runs"] == []
    why = {i["tag"]: i["why"] for i in out["skipped"]}
    assert why["v7.2.0"] == "covered" and why["v9.2.0"].startswith("tried: wrong-version")
    assert (snapshot(tree), git(tree, "log", "--format=%H", branch)) == after
    code, runs_list, err = farm(env, "runs", "list", "--json")
    assert len(runs_list) == 4, runs_list  # probe, older, and the first pass' two
    published = [p for r in runs_list for p in farm(env, "runs", "show", str(r["run"]), "--json")[1]["publications"]]
    assert [p["commits"] for p in published] == [[commit]]
