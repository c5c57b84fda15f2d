"""QEMU's development head: `farm probe --ref` and farm nightly's head, with a local git repository
standing in for QEMU's (tags v7.0.0, v7.1.0, v7.2.0 and a development commit 7.2.50 after them).

The repository stands in for QEMU's source too: its `configure` makes a build.ninja that installs a
qemu-system-x86_64 telling its version as a git build would (7.2.50, `git describe`) and running
Debian's QEMU otherwise. The host's libvirt probe is a stand-in replaying libvirt 9.0.0's real
development dump caps_8.0.0.x86_64.replies (QEMU 7.2.50 under KVM), so the dumps are filed under 8.0.0.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from farm.caps.version import QemuVersion
from farm.nightly import Discovery, Tag, _of_candidate, parse_tags
from tests.helpers import REPO, farm, served_dashboard
from tests.paths import CACHE
from tests.standin import standin_builddir
from tests.test_nightly import qemu_repo

DEVELOPMENT_DUMP = CACHE / "src" / "libvirt-9.0.0" / "tests" / "qemucapabilitiesdata" / "caps_8.0.0.x86_64.replies"

# QEMU's configure as farm's agent calls it (build_qemu); --disable-docs is the one optional flag it knows
CONFIGURE = r"""#!/bin/sh
set -e
src=$(cd "$(dirname "$0")" && pwd)
for arg; do
  case $arg in
    --prefix=/*) prefix=${arg#--prefix=} ;;
    --target-list=x86_64-softmmu|--disable-docs|--python=*) ;;
    *) echo "configure: unknown argument $arg" >&2; exit 1 ;;
  esac
done
[ -n "$prefix" ] || { echo "configure: no --prefix" >&2; exit 1; }
printf '#!/bin/sh\n[ "$1" = --version ] && exec echo "QEMU emulator version %s (%s)"\nexec /usr/bin/qemu-system-x86_64 "$@"\n' \
  "$(cat "$src/VERSION")" "$(git -C "$src" describe --tags --long)" > qemu-system-x86_64
chmod 755 qemu-system-x86_64
cat > build.ninja <<EOF
rule install
  command = mkdir -p $prefix/bin && cp qemu-system-x86_64 $prefix/bin/qemu-system-x86_64
build $prefix/bin/qemu-system-x86_64: install qemu-system-x86_64
build install: phony $prefix/bin/qemu-system-x86_64
default $prefix/bin/qemu-system-x86_64
EOF
"""


def git(repo: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@example.org", *args],
                          check=True, capture_output=True, text=True).stdout.strip()


def develop(repo: Path, message: str) -> str:
    """One more development commit (QEMU 7.2.50, buildable) on the default branch; its sha."""
    (repo / "VERSION").write_text("7.2.50\n")
    (repo / "configure").write_text(CONFIGURE)
    (repo / "configure").chmod(0o755)
    wheels = repo / "python" / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    (wheels / "meson-0-py3-none-any.whl").write_bytes(b"")  # QEMU bundles meson: no venv for it
    git(repo, "add", "-A")
    git(repo, "commit", "--quiet", "--allow-empty", "-m", message)
    return git(repo, "rev-parse", "HEAD")


def inventory(path: Path, builddir: Path, qemu: str, cache: Path) -> Path:
    path.write_text("hosts:\n  - name: standin\n    transport: local\n    arch: x86_64\n"
                    f"    toolchain:\n      libvirt: builddir:{builddir}\n      qemu: {qemu}\n"
                    f"      cache_dir: {cache}\n")
    return path


@dataclass
class Farm:
    env: dict
    repo: Path
    head: str  # the development commit
    tmp: Path

    def with_system_qemu(self) -> dict:
        """The same farm, its one host probing the system's QEMU."""
        path = Path(self.env["FARM_INVENTORY"])
        system = path.with_name("system.yaml")
        system.write_text(path.read_text().replace(f"git:file://{self.repo}@master", "system"))
        return {**self.env, "FARM_INVENTORY": str(system)}


@pytest.fixture
def qemu_farm(env, tmp_path) -> Farm:
    if not DEVELOPMENT_DUMP.is_file():
        pytest.skip(f"{DEVELOPMENT_DUMP} missing: run ./bootstrap test (it fetches libvirt 9.0.0)")
    repo = qemu_repo(tmp_path / "qemu", ["v7.0.0", "v7.1.0", "v7.2.0"])
    head = develop(repo, "development after 7.2.0")
    standin = standin_builddir(tmp_path / "standin", delay=0, dump=DEVELOPMENT_DUMP)
    path = inventory(tmp_path / "inventory.yaml", standin, f"git:file://{repo}@master", tmp_path / "cache")
    return Farm({**env, "FARM_QEMU_GIT_URL": str(repo), "FARM_INVENTORY": str(path),
                 "FARM_NIGHTLY_MIN_QEMU": "8.0.0"}, repo, head, tmp_path)


def provenance(artifact: str) -> dict:
    return json.loads((Path(artifact).parent / "provenance.json").read_text())


# --- farm probe --ref ------------------------------------------------------------------------


def test_probe_builds_a_git_ref_and_files_the_dump_under_the_release(qemu_farm):
    code, out, err = farm(qemu_farm.env, "probe", "--qemu", "8.0.0", "--ref", qemu_farm.head, "--json", "--quiet")
    assert code == 0, err
    (job,) = out["jobs"]
    assert (job["status"], job["verdict"]) == ("ok", "real"), job
    assert Path(job["artifact"]).name == "caps_8.0.0_x86_64.replies"
    qemu = provenance(job["artifact"])["qemu"]
    assert qemu["commit"] == qemu_farm.head
    assert qemu["origin"] == f"git:file://{qemu_farm.repo}@{qemu_farm.head}"
    assert qemu["version_line"] == f"QEMU emulator version 7.2.50 (v7.2.0-1-g{qemu_farm.head[:7]})"

    code, shown, err = farm(qemu_farm.env, "runs", "show", str(out["run"]), "--json")
    assert code == 0, err
    assert (shown["qemu"], shown["qemu_ref"]) == ("8.0.0", qemu_farm.head)
    text = subprocess.run([sys.executable, "-m", "farm", "runs", "show", str(out["run"])], env=qemu_farm.env,
                          capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert f"QEMU 8.0.0 (built at {qemu_farm.head})" in text
    assert f"built at <code>{qemu_farm.head}</code>" in dashboard(qemu_farm.env, f"/runs/{out['run']}")


def dashboard(env: dict, path: str) -> str:
    """A page of `farm dashboard` served for real over the ledger of ``env``."""
    import urllib.request

    with served_dashboard(env, Path(env["FARM_STATE_DIR"]).parent / "dashboard.log") as (url, _):
        with urllib.request.urlopen(url + path, timeout=30) as answer:
            return answer.read().decode()


@pytest.mark.parametrize("ref, problem", [
    ("-c", "starts with '-'"),
    ("master topic", "has whitespace or control characters"),
    ("master\x1b", "has whitespace or control characters"),
    ("master@{1}", "not a branch, tag or commit"),
    ("", "empty"),
])
def test_a_bad_ref_is_a_clear_error(qemu_farm, ref, problem):
    code, _, err = farm(qemu_farm.env, "probe", "--qemu", "8.0.0", f"--ref={ref}", "--quiet")
    assert code == 2
    assert f"bad QEMU git ref {ref!r} (--ref): {problem}" in err
    assert farm(qemu_farm.env, "runs", "list", "--json")[1] == []


def test_a_ref_needs_a_host_that_builds_qemu_from_git(qemu_farm):
    code, _, err = farm(qemu_farm.with_system_qemu(), "probe", "--qemu", "8.0.0", "--ref", qemu_farm.head)
    assert code == 2
    assert "no host of x86_64 builds QEMU from git" in err and "standin has qemu system" in err
    assert farm(qemu_farm.env, "runs", "list", "--json")[1] == []


def test_resume_builds_the_runs_ref(qemu_farm):
    """A run with a ref that stopped before its job ran: `farm runs resume` builds that ref."""
    from farm.ledger import JobRecord, Ledger

    ledger = Ledger(Path(qemu_farm.env["FARM_STATE_DIR"]))
    run = ledger.new_run("8.0.0", ["x86_64"], None, qemu_farm.env["FARM_INVENTORY"], "embedded", 600, qemu_farm.head)
    ledger.add_job(JobRecord(f"run-{run}-x86_64", run, "x86_64", None))
    code, out, err = farm(qemu_farm.env, "runs", "resume", str(run), "--json", "--quiet")
    assert code == 0, err
    (job,) = out["jobs"]
    assert job["status"] == "ok", job
    assert provenance(job["artifact"])["qemu"]["commit"] == qemu_farm.head
    assert ledger.run(run).qemu_ref == qemu_farm.head


# --- farm nightly: the development head ------------------------------------------------------


def head_items(out: dict) -> list[tuple[str, str | None, str, str, str]]:
    return [(i["qemu"], i["ref"], i["arch"], i["action"], i["why"])
            for i in out["plan"] + out["skipped"] if i["tag"] == "HEAD"]


def test_nightly_probes_the_head_as_the_next_release_until_it_moves(qemu_farm):
    code, out, err = farm(qemu_farm.env, "nightly", "--once", "--json")
    assert code == 0, err
    assert head_items(out) == [("8.0.0", qemu_farm.head, "x86_64", "probe", "missing")]  # after 7.2 comes 8.0
    (run,) = out["runs"]
    assert (run["qemu"], run["ref"]) == ("8.0.0", qemu_farm.head)
    assert [(j["status"], j["verdict"]) for j in run["jobs"]] == [("ok", "real")]
    code, shown, err = farm(qemu_farm.env, "runs", "show", str(run["run"]), "--json")
    (job,) = shown["jobs"]
    assert shown["qemu_ref"] == qemu_farm.head
    assert Path(job["artifact"]).name == "caps_8.0.0_x86_64.replies"
    assert provenance(job["artifact"])["qemu"]["commit"] == qemu_farm.head

    code, out, err = farm(qemu_farm.env, "nightly", "--once", "--json")
    assert code == 0, err
    assert out["plan"] == [] and out["runs"] == []
    assert head_items(out) == [("8.0.0", qemu_farm.head, "x86_64", "skip", "covered")]

    moved = develop(qemu_farm.repo, "more development")
    code, out, err = farm(qemu_farm.env, "nightly", "--once", "--json")
    assert code == 0, err
    assert head_items(out) == [("8.0.0", moved, "x86_64", "probe",
                                f"stale: head moved from {qemu_farm.head[:12]} to {moved[:12]}")]
    (run,) = out["runs"]
    assert [(j["status"], j["verdict"]) for j in run["jobs"]] == [("ok", "real")]
    (job,) = farm(qemu_farm.env, "runs", "show", str(run["run"]), "--json")[1]["jobs"]
    assert provenance(job["artifact"])["qemu"]["commit"] == moved
    assert farm(qemu_farm.env, "nightly", "--once", "--json")[1]["plan"] == []


def test_head_probing_can_be_turned_off(qemu_farm):
    code, out, err = farm({**qemu_farm.env, "FARM_NIGHTLY_HEAD": "0"}, "nightly", "--once", "--json")
    assert code == 0, err
    assert head_items(out) == [] and out["runs"] == []
    assert any("FARM_NIGHTLY_HEAD is off" in note for note in out["notes"])


def test_the_head_needs_a_host_that_builds_qemu_from_git(qemu_farm):
    code, out, err = farm(qemu_farm.with_system_qemu(), "nightly", "--once", "--json")
    assert code == 0, err
    assert head_items(out) == [("8.0.0", qemu_farm.head, "x86_64", "skip",
                                "head: no host of x86_64 builds QEMU from git")]
    assert out["runs"] == []


def test_the_head_is_the_next_release_once_the_newest_line_is_released():
    def development(*tags: str) -> tuple[Tag | None, str]:
        listing = "".join(f"{i:040x}\trefs/tags/{t}\n" for i, t in enumerate(tags))
        return Discovery("u", parse_tags(listing), "f" * 40).development(QemuVersion(7, 0))

    assert development("v7.1.0", "v7.2.0-rc1", "v7.2.0")[0] == Tag("HEAD", QemuVersion(8, 0), commit="f" * 40)
    assert development("v8.0.0", "v7.2.1")[0].version == QemuVersion(8, 1)
    head, note = development("v7.2.0", "v8.0.0-rc1", "v8.0.0-rc2")  # in freeze: the rc covers it
    assert head is None and "QEMU 8.0.0 in freeze, covered by v8.0.0-rc2" in note
    head, note = development("v6.1.0")  # 6.2.0: older than FARM_NIGHTLY_MIN_QEMU
    assert head is None and "below the minimum" in note


def test_release_candidates_and_releases_supersede_head_results():
    head = Tag("HEAD", QemuVersion(8, 0), commit="a" * 40)
    result = {"qemu": {"commit": "a" * 40, "version": "7.2.50"}, "verdict": {"facts": {"qemu_version": "7.2.50"}}}
    assert _of_candidate(result, head)
    assert not _of_candidate(result, Tag("HEAD", QemuVersion(8, 0), commit="b" * 40))  # the head moved
    assert not _of_candidate(result, Tag("v8.0.0-rc0", QemuVersion(8, 0), 0))
    assert not _of_candidate(result, Tag("v8.0.0", QemuVersion(8, 0)))


def test_a_release_candidate_is_built_at_its_tag_on_hosts_that_build_qemu_from_git(qemu_farm):
    """In freeze (v8.0.0-rc0 tagged, no v8.0.0): the rc is probed as 8.0.0 built at its own tag
    (the tag v8.0.0 does not exist yet); hosts with an installed QEMU cannot build it."""
    git(qemu_farm.repo, "tag", "-a", "-m", "rc0", "v8.0.0-rc0")
    code, out, err = farm(qemu_farm.with_system_qemu(), "nightly", "--once", "--json")
    assert code == 0, err
    assert [(i["tag"], i["action"], i["why"]) for i in out["skipped"] if i["tag"] == "v8.0.0-rc0"] == [
        ("v8.0.0-rc0", "skip", "v8.0.0-rc0: no host of x86_64 builds QEMU from git")]
    assert out["runs"] == []

    code, out, err = farm(qemu_farm.env, "nightly", "--once", "--json")
    assert code == 0, err
    assert [(i["qemu"], i["tag"], i["ref"], i["why"]) for i in out["plan"]] == [
        ("8.0.0", "v8.0.0-rc0", "v8.0.0-rc0", "missing")]
    assert any("in freeze, covered by v8.0.0-rc0" in note for note in out["notes"])
    (run,) = out["runs"]
    assert (run["qemu"], run["ref"]) == ("8.0.0", "v8.0.0-rc0")
    (job,) = farm(qemu_farm.env, "runs", "show", str(run["run"]), "--json")[1]["jobs"]
    assert job["status"] == "ok", job
    assert provenance(job["artifact"])["qemu"]["commit"] == qemu_farm.head  # the rc0 tag's commit


@pytest.mark.slow
def test_a_ref_travels_to_celery_workers(qemu_farm, redis_server, workers):
    """Distributed: the job's ref reaches the `farm worker` (real Redis and worker), which builds it."""
    workers.env.update(qemu_farm.env)
    workers.start("standin", qemu_farm.env["FARM_INVENTORY"])
    code, out, err = farm(qemu_farm.env, "probe", "--qemu", "8.0.0", "--ref", qemu_farm.head, "--broker",
                          redis_server.url, "--json", "--quiet")
    assert code == 0, err
    (job,) = out["jobs"]
    assert (job["status"], job["verdict"]) == ("ok", "real"), job
    assert provenance(job["artifact"])["qemu"]["commit"] == qemu_farm.head
    code, shown, err = farm(qemu_farm.env, "runs", "show", str(out["run"]), "--json")
    assert (shown["mode"], shown["qemu_ref"]) == ("distributed", qemu_farm.head)
