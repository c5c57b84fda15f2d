"""farm nightly: QEMU releases discovered from a local git repository standing in for QEMU's,
probed on a local host whose libvirt probe replays a recorded QEMU 9.2.0 dump (tests/standin.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from farm.caps.version import QemuVersion
from farm.nightly import Discovery, Tag, _of_candidate, parse_tags
from tests.helpers import REPO, farm
from tests.standin import RECORDED, standin_builddir

TAGS = ["v8.2.0", "v9.1.0", "v9.2.0-rc1", "v9.2.0"]


def qemu_repo(path: Path, tags: list[str]) -> Path:
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "--quiet", str(path)], check=True)
    for tag in tags:
        (path / "VERSION").write_text(tag + "\n")
        subprocess.run([*git, "add", "VERSION"], check=True)
        subprocess.run([*git, "commit", "--quiet", "-m", tag], check=True)
        subprocess.run([*git, "tag", "-a", "-m", tag, tag], check=True)
    return path


@pytest.fixture
def nightly_env(env, tmp_path) -> dict:
    if not RECORDED.is_file():
        pytest.skip(f"{RECORDED} missing: run ./bootstrap test (it fetches libvirt 11.3.0)")
    standin = standin_builddir(tmp_path / "standin", delay=0)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  - name: standin\n    transport: local\n    arch: x86_64\n"
                         f"    toolchain:\n      libvirt: builddir:{standin}\n      qemu: system\n")
    return {**env, "FARM_QEMU_GIT_URL": str(qemu_repo(tmp_path / "qemu", TAGS)), "FARM_INVENTORY": str(inventory)}


def planned(out: dict) -> list[tuple[str, str, str]]:
    return [(i["tag"], i["arch"], i["why"]) for i in out["plan"]]


def test_a_pass_probes_what_is_missing_and_a_second_pass_plans_nothing(nightly_env):
    code, out, err = farm(nightly_env, "nightly", "--dry-run", "--json")
    assert code == 0, err
    assert planned(out) == [("v9.1.0", "x86_64", "missing"), ("v9.2.0", "x86_64", "missing")]
    assert out["runs"] == [] and out["qemu"]["head"]
    code, runs, err = farm(nightly_env, "runs", "list", "--json")
    assert runs == [], "--dry-run must not touch the ledger"

    code, out, err = farm(nightly_env, "nightly", "--once", "--json")
    assert code == 0, err
    assert planned(out) == [("v9.1.0", "x86_64", "missing"), ("v9.2.0", "x86_64", "missing")]
    jobs = {r["qemu"]: r["jobs"] for r in out["runs"]}
    assert [(j["arch"], j["status"], j["verdict"]) for j in jobs["9.2.0"]] == [("x86_64", "ok", "real")]
    assert [j["status"] for j in jobs["9.1.0"]] == ["wrong-version"]  # the stand-in is always QEMU 9.2.0

    code, out, err = farm(nightly_env, "nightly", "--once", "--json")
    assert code == 0, err
    assert out["plan"] == [] and out["runs"] == []
    why = {i["tag"]: i["why"] for i in out["skipped"]}
    assert why["v9.2.0"] == "covered"
    assert why["v9.1.0"].startswith("tried: wrong-version")  # not retried every night
    code, runs, err = farm(nightly_env, "runs", "list", "--json")
    assert len(runs) == 2


def test_a_new_libvirt_probe_makes_results_stale(nightly_env, tmp_path):
    assert farm(nightly_env, "nightly", "--once", "--json")[0] == 0
    other = standin_builddir(tmp_path / "standin-2", delay=0)
    inventory = Path(nightly_env["FARM_INVENTORY"])
    inventory.write_text(inventory.read_text().replace(str(tmp_path / "standin"), str(other)))
    code, out, err = farm(nightly_env, "nightly", "--dry-run", "--json")
    assert code == 0, err
    assert [(i["tag"], i["why"].split(":")[0]) for i in out["plan"]] == [("v9.1.0", "stale"), ("v9.2.0", "stale")]


def test_min_qemu_and_the_libvirt_tree_limit_the_plan(nightly_env, libvirt11):
    env = {**nightly_env, "FARM_NIGHTLY_MIN_QEMU": "9.2.0"}
    code, out, err = farm(env, "nightly", "--dry-run", "--json", "--libvirt", str(libvirt11))
    assert code == 0, err
    assert out["plan"] == []  # libvirt 11.3.0 has a real caps_9.2.0_x86_64
    assert [(i["tag"], i["why"]) for i in out["skipped"]] == [
        ("v9.2.0", "in tree"), ("HEAD", "head: no host of x86_64 builds QEMU from git")]  # the host's QEMU: system


def with_variants(env: dict, *variants: str) -> dict:
    """The nightly farm, its host declaring ``variants`` (the stand-in replays the same plain dump,
    which farm's judging finds out for +amdsev and +sgx)."""
    inventory = Path(env["FARM_INVENTORY"])
    inventory.write_text(inventory.read_text() + f"    variants: [{', '.join(variants)}]\n")
    return env


def columns(out: dict, key: str) -> list[tuple[str, str, str | None, str]]:
    return [(i["tag"], i["arch"], i["variant"], i["why"]) for i in out[key]]


def test_a_pass_plans_and_probes_each_variant_of_the_hosts(nightly_env):
    env = with_variants(nightly_env, "amdsev")
    code, out, err = farm(env, "nightly", "--dry-run", "--json")
    assert code == 0, err
    assert columns(out, "plan") == [
        ("v9.1.0", "x86_64", None, "missing"), ("v9.1.0", "x86_64", "amdsev", "missing"),
        ("v9.2.0", "x86_64", None, "missing"), ("v9.2.0", "x86_64", "amdsev", "missing")]

    code, out, err = farm(env, "nightly", "--once", "--json")
    assert code == 0, err
    runs = {(r["qemu"], r["variant"]): r for r in out["runs"]}  # one run per release and variant
    # the stand-in replays a plain dump: as +amdsev its own query-sev-capabilities gives it away
    assert [[(j["arch"], j["variant"], j["status"], j["verdict"]) for j in r["jobs"]] for r in out["runs"]] == [
        [("x86_64", None, "wrong-version", "real")], [("x86_64", "amdsev", "wrong-version", "invalid")],
        [("x86_64", None, "ok", "real")], [("x86_64", "amdsev", "invalid", "invalid")]]
    assert any("named +amdsev but query-sev-capabilities failed" in r for r in runs["9.2.0", "amdsev"]["jobs"][0]["reasons"])
    code, shown, err = farm(env, "runs", "show", str(runs["9.2.0", "amdsev"]["run"]), "--json")
    assert code == 0, err
    assert shown["variant"] == "amdsev"
    assert [Path(j["artifact"]).name for j in shown["jobs"]] == ["caps_9.2.0_x86_64+amdsev.replies"]

    code, out, err = farm(env, "nightly", "--once", "--json")
    assert code == 0, err
    assert out["plan"] == [] and out["runs"] == []
    assert [(tag, variant, why.split(" (")[0]) for tag, _, variant, why in columns(out, "skipped")] == [
        ("v9.1.0", None, "tried: wrong-version"), ("v9.1.0", "amdsev", "tried: wrong-version"),
        ("v9.2.0", None, "covered"), ("v9.2.0", "amdsev", "tried: invalid"),
        ("HEAD", None, "head: no host of x86_64 builds QEMU from git"),
        ("HEAD", "amdsev", "head: no host of x86_64+amdsev builds QEMU from git")]


def test_the_libvirt_tree_covers_variants(nightly_env, libvirt11):
    env = {**with_variants(nightly_env, "amdsev", "sgx"), "FARM_NIGHTLY_MIN_QEMU": "9.2.0", "FARM_NIGHTLY_HEAD": "0"}
    code, out, err = farm(env, "nightly", "--dry-run", "--json", "--libvirt", str(libvirt11))
    assert code == 0, err
    assert columns(out, "skipped") == [  # libvirt 11.3.0 has a real caps_9.2.0_x86_64+amdsev, no +sgx
        ("v9.2.0", "x86_64", None, "in tree"), ("v9.2.0", "x86_64", "amdsev", "in tree")]
    assert columns(out, "plan") == [("v9.2.0", "x86_64", "sgx", "missing")]
    text = subprocess.run([sys.executable, "-m", "farm", "nightly", "--dry-run", "--libvirt", str(libvirt11)],
                          env=env, capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "  v9.2.0         x86_64+amdsev   skip  in tree" in text.splitlines()


def test_a_bad_qemu_url_is_a_clear_error(nightly_env, tmp_path):
    code, _, err = farm({**nightly_env, "FARM_QEMU_GIT_URL": str(tmp_path / "nowhere")}, "nightly", "--once")
    assert code == 3 and "git ls-remote" in err  # git failed: operational


def test_release_candidates_are_filed_under_their_release():
    listing = "".join(f"{i:040x}\trefs/tags/{t}\n{i:040x}\trefs/tags/{t}^{{}}\n"
                      for i, t in enumerate(["v9.2.0-rc1", "v9.2.0-rc2", "v9.1.1", "v9.1.0", "v10.0.0-rc0", "x"]))
    tags = parse_tags(listing)
    chosen = Discovery("u", tags, None).candidates(QemuVersion.parse("9.0.0"))
    assert [t.name for t in chosen] == ["v9.1.0", "v9.2.0-rc2", "v10.0.0-rc0"]  # 9.1.1: stable, listed only
    rc2 = Tag("v9.2.0-rc2", QemuVersion(9, 2, 0), 2)

    def made(v):
        return {"verdict": {"facts": {"qemu_version": v}}}

    assert not _of_candidate(made("9.1.91"), rc2)  # rc1's result: a newer rc is out
    assert _of_candidate(made("9.1.92"), rc2)
    assert not _of_candidate(made("9.1.92"), Tag("v9.2.0", QemuVersion(9, 2, 0)))  # released since


def test_the_loop_waits_for_the_next_cron_time():
    import datetime

    from farm.nightly import next_time

    now = datetime.datetime(2026, 11, 25, 21, 30, tzinfo=datetime.UTC)
    assert next_time("0 2 * * *", now) == datetime.datetime(2026, 11, 26, 2, 0, tzinfo=datetime.UTC)
    assert next_time("*/15 * * * *", now) == datetime.datetime(2026, 11, 25, 21, 45, tzinfo=datetime.UTC)
