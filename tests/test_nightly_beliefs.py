"""What nightly and the dashboard believe of the ledger: a wrong-version answer settles a candidate only
for the hosts that would run the same QEMU, and a cell shows the best dump of the release it asked for.

Real farm runs on local hosts whose libvirt probe replays a recorded QEMU 9.2.0 dump (tests/standin.py),
one host probing the system's QEMU, one building QEMU from a local git repository standing in for QEMU's
(its `configure` installs a qemu-system-x86_64 wrapper, as in tests/test_nightly_head.py).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from farm.ledger import JobRecord, Ledger
from farm.web import views
from farm.web.queries import Queries
from tests.helpers import farm, served_dashboard
from tests.standin import RECORDED, standin_builddir
from tests.test_nightly import qemu_repo
from tests.test_nightly_head import CONFIGURE, git

TAGS = ["v9.1.0", "v9.2.0"]


def buildable_qemu_repo(path: Path, tags: list[str]) -> Path:
    """A QEMU stand-in repository whose every tag builds (a wrapper reporting the tag's version)."""
    path.mkdir(parents=True)
    git(path, "init", "--quiet")
    for tag in tags:
        (path / "VERSION").write_text(tag[1:] + "\n")
        (path / "configure").write_text(CONFIGURE)
        (path / "configure").chmod(0o755)
        wheels = path / "python" / "wheels"
        wheels.mkdir(parents=True, exist_ok=True)
        (wheels / "meson-0-py3-none-any.whl").write_bytes(b"")
        git(path, "add", "-A")
        git(path, "commit", "--quiet", "-m", tag)
        git(path, "tag", "-a", "-m", tag, tag)
    return path


def host(name: str, standin: Path, qemu: str, cache: Path | None = None) -> str:
    return (f"  - name: {name}\n    transport: local\n    arch: x86_64\n"
            f"    toolchain:\n      libvirt: builddir:{standin}\n      qemu: {qemu}\n"
            + (f"      cache_dir: {cache}\n" if cache else ""))


@pytest.fixture
def standin(tmp_path) -> Path:
    if not RECORDED.is_file():
        pytest.skip(f"{RECORDED} missing: run ./bootstrap test (it fetches libvirt 11.3.0)")
    return standin_builddir(tmp_path / "standin", delay=0)


def items(out: dict, key: str) -> list[tuple]:
    return [(i["tag"], i["arch"], i["why"], i["hosts"]) for i in out[key]]


def test_a_wrong_version_of_a_system_qemu_does_not_settle_the_release_for_a_host_building_it_from_git(
        env, tmp_path, standin):
    repo = buildable_qemu_repo(tmp_path / "qemu", TAGS)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n" + host("system-qemu", standin, "system"))
    env = {**env, "FARM_QEMU_GIT_URL": str(repo), "FARM_INVENTORY": str(inventory), "FARM_NIGHTLY_HEAD": "0"}

    code, out, err = farm(env, "nightly", "--once", "--json")
    assert code == 0, err
    assert [(r["run"], r["qemu"], r["jobs"][0]["host"], r["jobs"][0]["status"]) for r in out["runs"]] == [
        (1, "9.1.0", "system-qemu", "wrong-version"), (2, "9.2.0", "system-qemu", "ok")]

    # a host that builds QEMU from git joins: it could produce 9.1.0, so 9.1.0 is not settled for it
    inventory.write_text(inventory.read_text() + host("git-qemu", standin, f"git:file://{repo}@master",
                                                      tmp_path / "cache"))
    code, out, err = farm(env, "nightly", "--dry-run", "--json")
    assert code == 0, err
    assert items(out, "plan") == [("v9.1.0", "x86_64", "untried on git-qemu: run 1 got wrong-version from QEMU "
                                   "system on system-qemu", ["git-qemu"])]
    assert items(out, "skipped") == [("v9.2.0", "x86_64", "covered", None)]

    # the pass probes it on that host only (the stand-in still replays 9.2.0: wrong-version, from git)
    code, out, err = farm(env, "nightly", "--once", "--json")
    assert code == 0, err
    (run,) = out["runs"]
    assert [(j["host"], j["status"]) for j in run["jobs"]] == [("git-qemu", "wrong-version")]
    code, shown, err = farm(env, "runs", "show", str(run["run"]), "--json")
    provenance = json.loads((Path(shown["jobs"][0]["artifact"]).parent / "provenance.json").read_text())
    assert provenance["qemu"]["origin"] == f"git:file://{repo}@v9.1.0"

    # now every host's QEMU has answered 9.1.0: tried, not probed every night
    code, out, err = farm(env, "nightly", "--dry-run", "--json")
    assert code == 0, err
    assert out["plan"] == []
    assert items(out, "skipped") == [("v9.1.0", "x86_64", f"tried: wrong-version (run {run['run']})", None),
                                     ("v9.2.0", "x86_64", "covered", None)]


def test_wrong_version_and_later_failures_do_not_displace_a_real_dump_of_the_release(env, tmp_path, standin):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n" + host("standin", standin, "system")
                         + host("broken", tmp_path / "no-such-build", "system"))
    probe = ("probe", "--arch", "x86_64", "--inventory", str(inventory), "--json", "--quiet")
    code, out, err = farm(env, *probe, "--qemu", "9.2.0", "--hosts", "standin")
    assert out["jobs"][0]["status"] == "ok", err
    # asked for 9.1.0, the host's QEMU is 9.2.0: a wrong-version job, its dump filed under 9.2.0
    code, out, err = farm(env, *probe, "--qemu", "9.1.0", "--hosts", "standin")
    assert out["jobs"][0]["status"] == "wrong-version", err
    assert Path(out["jobs"][0]["artifact"]).name == "caps_9.2.0_x86_64.replies"
    code, out, err = farm(env, *probe, "--qemu", "9.2.0", "--hosts", "broken")  # a later failure of 9.2.0
    assert out["jobs"][0]["status"] == "failed", err

    with served_dashboard(env, tmp_path / "dashboard.log", "--inventory", str(inventory)) as (url, _):
        import urllib.request

        with urllib.request.urlopen(url + "/api/coverage", timeout=30) as r:
            cov = json.loads(r.read())
    cells = {(c["version"], c["column"]): c for c in cov["sources"]["farm"]["cells"]}
    assert (cells["9.2.0", "x86_64"]["state"], cells["9.2.0", "x86_64"]["run"]) == ("real", 1)
    assert (cells["9.1.0", "x86_64"]["state"], cells["9.1.0", "x86_64"]["status"]) == ("failed", "wrong-version")
    assert cov["sources"]["farm"]["counts"] == {"real": 1, "fake": 0, "stale": 0, "failed": 1, "missing": 0}

    # nightly believes the same: 9.2.0 is covered by its real dump; 9.1.0 was answered wrong-version by
    # the stand-in's QEMU only, the other host's own QEMU has not answered it
    env = {**env, "FARM_QEMU_GIT_URL": str(qemu_repo(tmp_path / "qemu", TAGS)), "FARM_NIGHTLY_HEAD": "0"}
    code, out, err = farm(env, "nightly", "--dry-run", "--json", "--inventory", str(inventory))
    assert code == 0, err
    assert items(out, "skipped") == [("v9.2.0", "x86_64", "covered", None)]
    assert items(out, "plan") == [("v9.1.0", "x86_64", "untried on broken: run 2 got wrong-version from QEMU "
                                   "system on standin", ["broken"])]


def test_a_cell_shows_a_real_dump_over_a_later_fake_over_a_later_failure(tmp_path):
    # no probe here can make a TCG x86_64 dump of the same release as a KVM one: the jobs are recorded
    # through the ledger's own API, as a probe would record them
    ledger = Ledger(tmp_path / "state")
    run = ledger.new_run("9.2.0", ["x86_64"], None, None, "embedded")
    for n, (status, verdict) in enumerate([("failed", None), ("ok", "real"), ("fake", "fake"), ("failed", None)]):
        job = JobRecord(f"run-{run}-x86_64-{n}", run, "x86_64", None, "h")
        ledger.add_job(job)
        job.status, job.verdict, job.finished = status, verdict, time.time() + n
        ledger.finish_job(job)
    (cell,) = views.farm_cells(Queries(ledger).cell_jobs(), ledger.artifacts)
    assert (cell["state"], cell["job"]) == ("real", f"run-{run}-x86_64-1")


@pytest.mark.parametrize("origin, untried", [
    (42, ["b", "c"]), (["git:x"], ["b", "c"]), (None, ["b", "c"]), ("system", ["b", "c"]),
    ("git:file:///qemu@v9.1.0", ["a", "b"]),  # the same git build settles every host building it
    ("git:file:///elsewhere@v9.1.0", ["a", "b", "c"]),  # a build no host makes now settles none
])
def test_a_wrong_version_settles_a_release_only_for_hosts_running_the_same_qemu(tmp_path, origin, untried):
    # a result as a worker may send it (provenance is a worker's word), recorded through the ledger's API
    from farm.caps.version import QemuVersion
    from farm.inventory import resolve_inventory
    from farm.nightly import Discovery, parse_tags, plan

    standin = standin_builddir(tmp_path / "standin", delay=0)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n" + host("a", standin, "system") + host("b", standin, "system")
                         + host("c", standin, "git:file:///qemu@master"))
    ledger = Ledger(tmp_path / "state")
    run = ledger.new_run("9.1.0", ["x86_64"], None, str(inventory), "embedded")
    job = JobRecord(f"run-{run}-x86_64", run, "x86_64", None, "a")
    ledger.add_job(job)
    job.status, job.verdict, job.finished = "wrong-version", "real", time.time()
    job.provenance = {"libvirt": {"source": f"builddir:{standin}"}, "qemu": {"origin": origin}}
    ledger.finish_job(job)
    tags = "".join(f"0000000000000000000000000000000000000000\trefs/tags/{t}\n" for t in TAGS)
    items = plan(Discovery("file:///qemu", parse_tags(tags), None), QemuVersion.parse("9.1.0"),
                 resolve_inventory(str(inventory)), ledger, None)
    (item,) = [i for i in items if i.qemu == "9.1.0"]
    assert (item.action, item.hosts) == ("probe", untried), item.why
