"""farm publish: real git (bare "upstream" and "fork" remotes), real dumps, a local GitLab stub.

Fast tests use a small git checkout that looks like a libvirt tree to farm (libvirt 11.3.0's
qemucapabilitiesdata dumps, committed) for everything that stops before regeneration. The slow tests
publish into the real libvirt 11.3.0 checkout (tests/libvirt_worktree.py): regeneration builds and
runs its capability tests for real.
"""

from __future__ import annotations

import datetime
import json
import shutil
import subprocess
import textwrap
from pathlib import Path

import pytest

from farm.caps import dump as dumps
from farm.ledger import JobRecord, Ledger
from farm.publish import mr as merge_requests
from farm.publish import publisher
from farm.publish.git import Git
from tests.commit_style import check_commit_message
from tests.gitlab_stub import GitLabStub
from tests.helpers import farm, needs_kvm, needs_x86
from tests.publishing import CAPS, EMAIL, NAME, Remotes, add_remotes, git, snapshot

TOKEN = "glpat-FarmSecretToken-0123456789"


def make_run(state: Path, artifact: Path, arch: str, status: str = "ok", verdict: str = "real",
             provenance: dict | None = None, qemu: str | None = None) -> int:
    """A run in the ledger whose one job's dump is ``artifact`` (as farm probe would record it)."""
    ledger = Ledger(state)
    name = artifact.name
    qemu = qemu or name.split("_")[1]
    run = ledger.new_run(qemu, [arch], None, None, "embedded")
    job = JobRecord(f"run-{run}-{arch}", run, arch, None, "local-" + arch)
    ledger.add_job(job)
    prov = provenance or {"host": {"name": "test-host", "facts": {"cpu_model": "Test CPU", "kernel": "6.1.0",
                                                                    "arch": "x86_64"}},
                          "qemu": {"version_line": "QEMU emulator version test"},
                          "libvirt": {"libvirt_version": "11.3.0", "source": "test"},
                          "verdict": {"verdict": verdict}}
    job.artifact = str(ledger.store_artifact(run, job.id, name, artifact.read_text(), prov))
    job.status, job.verdict, job.provenance = status, verdict, prov
    ledger.finish_job(job)
    ledger.finish_run(run)
    return run


@pytest.fixture
def mini(tmp_path: Path, data11: Path) -> Remotes:
    """A small checkout shaped like a libvirt tree (three of 11.3.0's dumps), with its remotes."""
    tree = tmp_path / "libvirt"
    (tree / CAPS).mkdir(parents=True)
    for name in ("caps_7.2.0_x86_64.replies", "caps_9.2.0_x86_64.replies", "caps_9.1.0_riscv64.replies"):
        shutil.copyfile(data11 / name, tree / CAPS / name)
    git(tree.parent, "init", "--quiet", "-b", "main", str(tree))
    git(tree, "add", ".")
    git(tree, "commit", "--quiet", "-m", "libvirt, in small")
    return add_remotes(tree, tmp_path)


def options(tree: Path, **kw) -> publisher.Options:
    return publisher.Options(checkout=tree, build_dir=tree.parent / "build", git_name=NAME, git_email=EMAIL, **kw)


# ------------------------------------------------------------------------------- fast: no build


def test_a_commit_message_is_short_wrapped_and_names_build_and_host_not_the_farm(data11: Path):
    """libvirt's style: subject, a body of a few lines at most 72 columns; the full diff goes elsewhere."""
    assert publisher.branch_name("9.1.0", datetime.date(2025, 1, 2)) == "qemucaps/qemu-9.1.0-20250102"
    old, new = dumps.load(data11 / "caps_8.2.0_x86_64.replies"), dumps.load(data11 / "caps_9.2.0_x86_64.replies")
    from farm.caps.diff import diff
    from farm.caps.inspect import inspect
    from farm.publish import message as messages
    from tests.commit_style import check_commit_message

    change = diff(old, new)
    assert max(len(line) for line in change.to_text().splitlines()) > 72  # the raw diff would not fit
    placed = publisher.Placed("run-3-x86_64", "x86_64", "9.2.0", Path("a"), Path("caps_9.2.0_x86_64.replies"),
                              "Add", "", change, "caps_8.2.0_x86_64.replies",
                              {"host": {"name": "h1", "facts": {"cpu_model": "AMD EPYC 7B13 64-Core Processor",
                                                                "kernel": "6.1.0-18-amd64", "arch": "x86_64"}},
                               "qemu": {"version_line": "QEMU emulator version 9.2.0", "origin": "system"},
                               "libvirt": {"libvirt_version": "11.3.0", "source": "git:URL@v11.3.0",
                                           "commit": "abc123"}},
                              inspect(new))
    message = messages.commit_message(placed)
    lines = check_commit_message(message, signed=False)
    assert lines[0] == "qemucapabilitiesdata: Add test data for qemu-9.2.0 on x86_64"
    text = " ".join(lines)
    assert "QEMU 9.2.0 (tag v9.2.0, package 'v9.2.0') with KVM" in text
    assert "host x86_64, AMD EPYC 7B13 64-Core Processor, Linux 6.1.0-18-amd64." in text
    assert "Notable changes against caps_8.2.0_x86_64.replies:" in lines
    machines = next(c for c in change.features if c.title == "Machine types")
    assert f"- Machine types: {len(machines.added)} added ({', '.join(machines.added[:3])}" in message
    # the full diff: in the merge request (folded) and the cover letter (wrapped, folded)
    markdown = messages.description([placed], 3)
    assert "<details>" in markdown and "farm run 3" in markdown and machines.added[-1] in markdown
    cover = messages.cover_blurb([placed], 3, ["caps_9.2.0_x86_64.replies: a warning"])
    assert max(len(line) for line in cover.splitlines()) <= 72
    assert "Machine types: " + machines.counts in cover and "a warning" in cover
    assert "farm run 3, job run-3-x86_64" in cover.replace("\n    ", " ")


def test_nothing_changed_nothing_published(env, mini: Remotes, data11: Path):
    """The tree's own dump published back: no branch, no commit, exit 0 with a message."""
    run = make_run(Path(env["FARM_STATE_DIR"]), data11 / "caps_9.2.0_x86_64.replies", "x86_64")
    before = snapshot(mini.tree)
    code, out, err = farm(env, "publish", str(run), "--libvirt", str(mini.tree), "--json")
    assert code == 0, err
    assert out["status"] == "unchanged" and out["commits"] == [] and out["branch"] is None
    assert "nothing changed" in out["message"] and "nothing published" in out["message"]
    assert [d["action"] for d in out["dumps"]] == ["unchanged"]
    assert snapshot(mini.tree) == before
    code, shown, _ = farm(env, "runs", "show", str(run), "--json")
    assert [p["status"] for p in shown["publications"]] == ["unchanged"]


def test_the_old_layout_dump_of_the_tree_is_unchanged_too(mini: Remotes, tmp_path: Path, data11: Path):
    """Same content in another layout and other ids: semantically unchanged."""
    d = dumps.load(data11 / "caps_9.1.0_riscv64.replies")
    other = tmp_path / "other" / "caps_9.1.0_riscv64.replies"
    other.parent.mkdir()
    other.write_text(dumps.render(d.exchanges, dumps.Layout.old))
    state = tmp_path / "state"
    run = make_run(state, other, "riscv64", status="ok", verdict="fake")
    result = publisher.publish(Ledger(state), run, options(mini.tree))
    assert result.status == "unchanged"


def test_an_old_tree_gets_old_names_and_layout(tmp_path: Path, data9: Path, data11: Path):
    """libvirt <= 9.x: caps_<ver>.<arch>.replies in the old layout; 'Add' compares with the previous version."""
    tree = tmp_path / "libvirt9"
    (tree / CAPS).mkdir(parents=True)
    shutil.copyfile(data9 / "caps_7.1.0.x86_64.replies", tree / CAPS / "caps_7.1.0.x86_64.replies")
    state = tmp_path / "state"
    run = make_run(state, data11 / "caps_7.2.0_x86_64.replies", "x86_64")
    job = Ledger(state).run(run).jobs[0]
    placed = publisher._place(job, Path(job.artifact), tree)
    assert placed.target == tree / CAPS / "caps_7.2.0.x86_64.replies"
    assert placed.action == "Add" and placed.compared_with == "caps_7.1.0.x86_64.replies"
    assert placed.subject == "qemucapabilitiesdata: Add test data for qemu-7.2.0 on x86_64"
    assert dumps.parse(placed.text).layout is dumps.Layout.old and dumps.parse(placed.text).valid
    assert placed.diff is not None and placed.diff.version == ("7.1.0", "7.2.0")


def test_dry_run_changes_nothing(env, mini: Remotes, data11: Path, tmp_path: Path):
    d = dumps.load(data11 / "caps_9.2.0_x86_64.replies")
    exchanges = [ex for ex in d.exchanges if ex.execute != "query-migrate-capabilities"]  # a semantic change
    changed = tmp_path / "changed" / "caps_9.2.0_x86_64.replies"
    changed.parent.mkdir()
    changed.write_text(dumps.render(exchanges))
    assert dumps.load(changed).valid
    run = make_run(Path(env["FARM_STATE_DIR"]), changed, "x86_64")
    before = snapshot(mini.tree)
    code, out, err = farm(env, "publish", str(run), "--libvirt", str(mini.tree), "--dry-run", "--json")
    assert code == 0, err
    assert out["status"] == "dry-run" and out["commits"] == []
    (placed,) = out["dumps"]
    assert placed["action"] == "Update"
    assert placed["subject"] == "qemucapabilitiesdata: Update test data for qemu-9.2.0 on x86_64"
    assert snapshot(mini.tree) == before


def _refused(env, tree: Path, *args: str, expect: str, code_expected: int = 2) -> str:
    """Publishing refused (2) or failed on a remote (3): one line, the checkout as it was."""
    before = snapshot(tree)
    code, out, err = farm(env, "publish", *args, "--libvirt", str(tree), "--quiet")
    assert code == code_expected, (code, out, err)
    assert expect in err, err
    assert len(err.strip().splitlines()) == 1, err
    assert snapshot(tree) == before
    return err


def test_invalid_dump_is_refused(env, mini: Remotes, data11: Path, tmp_path: Path):
    broken = tmp_path / "broken" / "caps_9.2.0_x86_64.replies"
    broken.parent.mkdir()
    text = (data11 / "caps_9.2.0_x86_64.replies").read_text()
    broken.write_text(text.rsplit("\n\n", 1)[0] + "\n")  # the last reply is gone
    run = make_run(Path(env["FARM_STATE_DIR"]), broken, "x86_64", status="invalid", verdict="invalid")
    _refused(env, mini.tree, str(run), expect="invalid dump")


def test_expected_fake_is_fine_but_hardware_fake_is_refused(env, mini: Remotes, data11: Path):
    """riscv64 is fake in libvirt too; a TCG s390x dump from farm probe is refused without --allow-fake."""
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "s390x", "--json", "--quiet")
    (job,) = out["jobs"]
    assert (job["status"], job["verdict"]) == ("fake", "fake"), err
    err = _refused(env, mini.tree, str(out["run"]), expect="a fake s390x dump (TCG only) where libvirt expects real")
    assert "--allow-fake" in err
    run = make_run(Path(env["FARM_STATE_DIR"]), data11 / "caps_9.1.0_riscv64.replies", "riscv64", verdict="fake")
    code, published, err = farm(env, "publish", str(run), "--libvirt", str(mini.tree), "--json")
    assert code == 0 and published["status"] == "unchanged", err  # accepted (and unchanged)


def _changed_run(env, data11: Path, tmp_path: Path) -> int:
    d = dumps.load(data11 / "caps_9.2.0_x86_64.replies")
    changed = tmp_path / "changed" / "caps_9.2.0_x86_64.replies"
    changed.parent.mkdir(exist_ok=True)
    changed.write_text(dumps.render([ex for ex in d.exchanges if ex.execute != "query-migrate-capabilities"]))
    return make_run(Path(env["FARM_STATE_DIR"]), changed, "x86_64")


def test_dirty_checkout_is_refused(env, mini: Remotes, data11: Path, tmp_path: Path):
    run = _changed_run(env, data11, tmp_path)
    (mini.tree / "stray.txt").write_text("mine\n")
    _refused(env, mini.tree, str(run), expect="has uncommitted changes (stray.txt)")
    (mini.tree / "stray.txt").unlink()
    (mini.tree / CAPS / "caps_7.2.0_x86_64.replies").write_text("edited\n")
    _refused(env, mini.tree, str(run), expect="uncommitted changes (tests/qemucapabilitiesdata/caps_7.2.0_x86_64")


def test_existing_branch_is_refused(env, mini: Remotes, data11: Path, tmp_path: Path):
    run = _changed_run(env, data11, tmp_path)
    branch = publisher.branch_name("9.2.0", datetime.date.today())
    git(mini.tree, "branch", branch)
    _refused(env, mini.tree, str(run), expect=f"branch {branch} already exists")


def test_unreachable_upstream_is_refused(env, mini: Remotes, data11: Path, tmp_path: Path):
    run = _changed_run(env, data11, tmp_path)
    git(mini.tree, "remote", "set-url", "origin", "https://127.0.0.1:9/libvirt.git")
    _refused(env, mini.tree, str(run), expect="cannot fetch the upstream remote 'origin'", code_expected=3)
    git(mini.tree, "remote", "remove", "origin")
    _refused(env, mini.tree, str(run), expect="has no remote 'origin'")


def test_missing_token_and_project_are_refused(env, mini: Remotes, data11: Path, tmp_path: Path):
    run = _changed_run(env, data11, tmp_path)
    _refused(env, mini.tree, str(run), "--mr", expect="--mr needs a GitLab project: set FARM_GITLAB_PROJECT")
    env["FARM_GITLAB_PROJECT"] = "farm/libvirt"
    _refused(env, mini.tree, str(run), "--mr", expect="no GitLab token: set FARM_GITLAB_TOKEN_FILE")
    env["FARM_GITLAB_TOKEN_FILE"] = str(tmp_path / "no-such-token")
    _refused(env, mini.tree, str(run), "--mr", expect="cannot read the GitLab token")


def test_no_libvirt_checkout_is_a_usage_error(env, data11: Path):
    run = make_run(Path(env["FARM_STATE_DIR"]), data11 / "caps_9.2.0_x86_64.replies", "x86_64")
    code, _, err = farm(env, "publish", str(run))
    assert code == 2 and "no libvirt checkout: --libvirt PATH or FARM_LIBVIRT_CHECKOUT" in err
    code, _, err = farm(env, "publish", "99", "--libvirt", "/nonexistent")
    assert code == 2 and "no run 99" in err


def test_gitlab_merge_request_created_then_updated(tmp_path: Path):
    """python-gitlab against the stub: one MR per branch, the second call updates it; token never shown."""
    with GitLabStub(TOKEN) as stub:
        first = merge_requests.open_or_update(stub.url, stub.project, TOKEN, "qemucaps/x", "main", "T1", "D1")
        second = merge_requests.open_or_update(stub.url, stub.project, TOKEN, "qemucaps/x", "main", "T2", "D2")
        assert (first.action, second.action) == ("created", "updated")
        assert first.url == second.url and len(stub.merge_requests) == 1
        assert stub.merge_requests[0]["description"] == "D2"
        with pytest.raises(merge_requests.MergeRequestError, match="refused the token") as e:
            merge_requests.open_or_update(stub.url, stub.project, "wrong-" + TOKEN, "b", "main", "T", "D")
        assert TOKEN not in str(e.value)
        with pytest.raises(merge_requests.MergeRequestError, match="project 'nope/nope'"):
            merge_requests.open_or_update(stub.url, "nope/nope", TOKEN, "b", "main", "T", "D")
    with pytest.raises(merge_requests.MergeRequestError, match="cannot be reached"):
        merge_requests.open_or_update(stub.url, stub.project, TOKEN, "b", "main", "T", "D", timeout=5)
    methods = [(r.method, r.path.rsplit("/", 1)[-1]) for r in stub.requests if r.token == TOKEN]
    assert ("POST", "merge_requests") in methods and ("PUT", "1") in methods


def hooked_remote(remote: Path, record: Path) -> Path:
    """A bare repo advertising push options, whose pre-receive hook appends them to ``record``."""
    if not remote.exists():
        subprocess.run(["git", "init", "--quiet", "--bare", str(remote)], check=True)
    git(remote, "config", "receive.advertisePushOptions", "true")
    hook = remote / "hooks" / "pre-receive"
    hook.write_text(textwrap.dedent(f"""\
        #!/bin/sh
        i=0
        while [ "$i" -lt "${{GIT_PUSH_OPTION_COUNT:-0}}" ]; do
            eval "echo \\"\\$GIT_PUSH_OPTION_$i\\"" >> {record}
            i=$((i + 1))
        done
    """))
    hook.chmod(0o755)
    return remote


def test_push_options_reach_the_remote(tmp_path: Path, mini: Remotes):
    """-o merge_request.create ...: a bare repo advertising push options records them in a pre-receive hook."""
    record = tmp_path / "push-options.txt"
    remote = hooked_remote(tmp_path / "gitlab.git", record)
    git(mini.tree, "remote", "add", "gitlab", str(remote))
    git(mini.tree, "checkout", "--quiet", "-b", "qemucaps/qemu-9.2.0-20250102")
    options = merge_requests.push_options("master", "qemucapabilitiesdata: Update test data")
    merge_requests.push(Git(mini.tree), "gitlab", "qemucaps/qemu-9.2.0-20250102", options)
    assert record.read_text().splitlines() == [
        "merge_request.create", "merge_request.target=master",
        "merge_request.title=qemucapabilitiesdata: Update test data", "merge_request.remove_source_branch"]
    assert git(remote, "rev-parse", "qemucaps/qemu-9.2.0-20250102") == git(mini.tree, "rev-parse", "HEAD")


# ------------------------------------------------------------------------- slow: real libvirt


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_publish_a_probed_dump_with_patches_and_a_merge_request(env, libvirt: Remotes, tmp_path: Path):
    tree = libvirt.tree
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--json", "--quiet")
    assert code == 0, err
    run = out["run"]
    before = snapshot(tree)
    patches = tmp_path / "patches"
    token_file = tmp_path / "token"
    token_file.write_text(TOKEN + "\n")
    with GitLabStub(TOKEN) as stub:
        env.update(FARM_GITLAB_URL=stub.url, FARM_GITLAB_PROJECT=stub.project, FARM_GITLAB_TOKEN_FILE=str(token_file))
        # Debian's QEMU (7.2.22): not what upstream takes, so only with --allow-distro-build
        code, published, err = farm(env, "publish", str(run), "--mr", "--patches", str(patches), "--json",
                                    "--allow-distro-build")
        assert code == 0, err
        outputs = [json.dumps(published), err]
        assert any("QEMU build is not a vanilla release" in w for w in published["warnings"]), published

        # the commit: an Update of libvirt's own 7.2.0 dump, with the regenerated outputs, signed off
        assert published["status"] == "published"
        branch = published["branch"]
        assert branch == f"qemucaps/qemu-7.2.0-{datetime.date.today():%Y%m%d}"
        (commit,) = published["commits"]
        message = git(tree, "log", "-1", "--format=%B", commit) + "\n"
        lines = check_commit_message(message)  # every line, against libvirt's style
        assert lines[0] == "qemucapabilitiesdata: Update test data for qemu-7.2.0 on x86_64"
        assert lines[-1] == f"Signed-off-by: {NAME} <{EMAIL}>"
        assert "Probed QEMU 7.2.22 (package 'Debian 1:7.2+dfsg-" in " ".join(lines)
        print(message)  # shown with pytest -s
        assert git(tree, "log", "-1", "--format=%an <%ae>", commit) == f"{NAME} <{EMAIL}>"
        files = git(tree, "show", "--name-only", "--format=", commit).splitlines()
        assert str(CAPS / "caps_7.2.0_x86_64.replies") in files
        assert str(CAPS / "caps_7.2.0_x86_64.xml") in files  # regenerated
        assert git(tree, "rev-parse", f"{commit}^") == git(str(libvirt.upstream), "rev-parse", "main")
        xml = git(tree, "show", f"{commit}:{CAPS}/caps_7.2.0_x86_64.xml")
        assert "<version>7002022</version>" in xml
        placed = git(tree, "show", f"{commit}:{CAPS}/caps_7.2.0_x86_64.replies") + "\n"
        assert dumps.parse(placed).valid and dumps.parse(placed).layout is dumps.Layout.current

        # the checkout is back where it was; the branch stays for the record
        assert snapshot(tree)[:2] == before[:2]
        assert git(tree, "rev-parse", branch) == commit

        # patches: cover letter + 1
        names = sorted(p.name for p in patches.iterdir())
        assert len(names) == 2 and names[0].startswith("0000-cover-letter") and names[1].startswith("0001-")
        assert [str(patches / n) for n in names] == published["patches"]
        patch = (patches / names[1]).read_text().replace("\n ", " ")  # unfold mail headers
        assert "Subject: [PATCH 1/1] qemucapabilitiesdata: Update test data for qemu-7.2.0 on x86_64" in patch
        assert f"Signed-off-by: {NAME} <{EMAIL}>" in patch
        cover = (patches / names[0]).read_text()
        assert "*** SUBJECT HERE ***" not in cover and "*** BLURB HERE ***" not in cover
        assert f"farm run {run}" in cover and "QMP schema: " in cover  # the full diff, folded
        assert "QEMU build is not a vanilla release" in cover  # the warnings

        # the merge request: pushed to the fork, created once
        assert git(str(libvirt.fork), "rev-parse", f"refs/heads/{branch}") == commit
        assert published["mr_action"] == "created"
        (mr,) = stub.merge_requests
        assert mr["source_branch"] == branch and mr["target_branch"] == "main"
        assert mr["title"] == "qemucapabilitiesdata: Update test data for qemu-7.2.0 on x86_64"
        assert "### `" in mr["description"] and "Provenance" not in mr["title"]
        assert published["mr_url"] == mr["web_url"]

        # the ledger
        code, shown, _ = farm(env, "runs", "show", str(run), "--json")
        (pub,) = shown["publications"]
        assert pub["branch"] == branch and pub["commits"] == [commit] and pub["mr_url"] == mr["web_url"]
        assert pub["patches"] == published["patches"]
        shown_text = subprocess.run([".venv/bin/python", "-m", "farm", "runs", "show", str(run)], env=env,
                                    capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout
        assert f"branch {branch} of {tree}" in shown_text and f"commit {commit}" in shown_text
        assert f"merge request created: {mr['web_url']}" in shown_text and "patch " in shown_text

        # a second run of the same release the same day (its local branch gone): the same MR, updated
        git(tree, "branch", "-D", branch)
        code, out2, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--json", "--quiet")
        assert code == 0, err
        code, again, err = farm(env, "publish", str(out2["run"]), "--mr", "--tests", "qemucapabilitiestest", "--json",
                                "--allow-distro-build")
        assert code == 0, err
        outputs += [json.dumps(again), err]
        assert again["mr_action"] == "updated" and again["mr_url"] == mr["web_url"]
        assert len(stub.merge_requests) == 1
        assert f"farm run {out2['run']}" in stub.merge_requests[0]["description"]
        assert git(str(libvirt.fork), "rev-parse", f"refs/heads/{branch}") == again["commits"][0]
        posts = [r for r in stub.requests if r.method == "POST"]
        puts = [r for r in stub.requests if r.method == "PUT"]
        assert len(posts) == 1 and len(puts) == 1
        assert all(r.token == TOKEN for r in stub.requests)  # it was sent, as a header, to GitLab only

    # the token never shows
    outputs.append(subprocess.run([".venv/bin/python", "-m", "farm", "runs", "show", str(run), "--json"], env=env,
                                  capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1]).stdout)
    for text in outputs:
        assert TOKEN not in text
    for log in Path(env["FARM_STATE_DIR"]).rglob("*"):
        if log.is_file():
            assert TOKEN.encode() not in log.read_bytes(), log
    assert TOKEN not in git(tree, "log", "--all", "--format=%B")


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_failing_regeneration_leaves_the_checkout_as_it_was(env, libvirt: Remotes, tmp_path: Path):
    """Upstream carries a dump its tests cannot pass with (a reply cut off): publishing stops, nothing stays."""
    tree = libvirt.tree
    git(tree, "checkout", "--quiet", "-b", "broken")
    victim = tree / CAPS / "caps_9.2.0_x86_64.replies"
    victim.write_text(victim.read_text().rsplit("\n\n", 2)[0] + "\n")  # the last command and reply gone
    git(tree, "commit", "--quiet", "-am", "a broken upstream")
    git(tree, "push", "--quiet", "--force", "origin", "broken:main")
    git(tree, "checkout", "--quiet", "main")
    git(tree, "branch", "-D", "broken")
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--json", "--quiet")
    assert code == 0, err
    before = snapshot(tree)
    code, _, err = farm(env, "publish", str(out["run"]), "--tests", "qemucapabilitiestest", "--patches",
                        str(tmp_path / "patches"), "--allow-distro-build")
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert "caps_7.2.0_x86_64.replies: qemucapabilitiestest" in last and "still failed" in last, err
    assert snapshot(tree) == before
    assert not (tmp_path / "patches").exists()
    code, shown, _ = farm(env, "runs", "show", str(out["run"]), "--json")
    assert shown["publications"] == []


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_probe_then_publish_in_one_command(env, mini: Remotes):
    """farm probe --publish calls the same publishing after the run (here a dry run into the small tree)."""
    before = snapshot(mini.tree)
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--quiet", "--json",
                          "--publish", "--dry-run", "--allow-distro-build", "--libvirt", str(mini.tree))
    assert code == 0, err
    assert out["jobs"][0]["status"] == "ok"
    pub = out["publication"]
    assert pub["status"] == "dry-run" and pub["run"] == out["run"]
    assert [d["action"] for d in pub["dumps"]] == ["Update"]
    assert snapshot(mini.tree) == before


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_unreachable_fork_leaves_the_checkout_as_it_was(env, libvirt: Remotes, tmp_path: Path):
    """The commit is made and tested, then the push fails: the branch is gone, the checkout as it was."""
    tree = libvirt.tree
    git(tree, "remote", "set-url", "fork", str(tmp_path / "no-such-fork.git"))
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--json", "--quiet")
    assert code == 0, err
    before = snapshot(tree)
    with GitLabStub(TOKEN) as stub:
        env.update(FARM_GITLAB_URL=stub.url, FARM_GITLAB_PROJECT=stub.project, FARM_GITLAB_TOKEN=TOKEN)
        code, _, err = farm(env, "publish", str(out["run"]), "--mr", "--tests", "qemucapabilitiestest",
                            "--allow-distro-build")
    assert code == 3, err  # a remote that fails: operational
    last = err.strip().splitlines()[-1]
    assert "cannot push to the fork remote 'fork'" in last, err
    assert TOKEN not in err
    assert snapshot(tree) == before
    assert stub.requests == []  # GitLab was never asked


@pytest.mark.slow
@needs_kvm
@needs_x86
def test_merge_request_by_push_options(env, libvirt: Remotes, tmp_path: Path):
    """FARM_MR_METHOD=push-options: no API, no token; the fork receives the branch with GitLab's options."""
    record = tmp_path / "push-options.txt"
    hooked_remote(libvirt.fork, record)
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64", "--json", "--quiet")
    assert code == 0, err
    env["FARM_MR_METHOD"] = "push-options"
    code, published, err = farm(env, "publish", str(out["run"]), "--mr", "--tests", "qemucapabilitiestest", "--json",
                                "--allow-distro-build")
    assert code == 0, err
    assert published["mr_action"] == "pushed" and published["mr_url"] is None
    assert record.read_text().splitlines() == [
        "merge_request.create", "merge_request.target=main",
        "merge_request.title=qemucapabilitiesdata: Update test data for qemu-7.2.0 on x86_64",
        "merge_request.remove_source_branch"]
    assert git(str(libvirt.fork), "rev-parse", f"refs/heads/{published['branch']}") == published["commits"][0]
