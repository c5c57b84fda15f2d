"""Git URLs and refs never become options of git: a URL or ref starting with '-' is refused
(inventory, agent, nightly, `farm probe --ref`), and git is given `--` before its positional
arguments, which real git (on real local repositories) accepts."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest

from farm import nightly
from farm.errors import UsageError
from tests.helpers import farm
from tests.test_agent import run_agent

AGENT = Path(__file__).resolve().parents[1] / "agents" / "farm_agent.py"


@pytest.fixture
def repo(tmp_path) -> Path:
    """A real git repository with a commit on master and the tags v9.0.0 and v9.1.0-rc1."""
    path = tmp_path / "qemu"
    git = ["git", "-C", str(path), "-c", "user.name=t", "-c", "user.email=t@example.org"]
    subprocess.run(["git", "init", "-q", "-b", "master", str(path)], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "one"], check=True)
    subprocess.run([*git, "tag", "v9.0.0"], check=True)
    subprocess.run([*git, "tag", "v9.1.0-rc1"], check=True)
    return path


def agent_module():
    spec = importlib.util.spec_from_file_location("farm_agent_under_test", AGENT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("command", "source", "words"), [
    (["toolchain", "libvirt"], "git:--upload-pack=touch@master", "bad git URL '--upload-pack=touch'"),
    (["toolchain", "libvirt"], "git:file:///srv/libvirt@--output=/tmp/x", "bad git ref '--output=/tmp/x'"),
    (["toolchain", "qemu", "--target", "x86_64"], "git:-cprotocol.ext.allow=always@v9.0.0",
     "bad git URL '-cprotocol.ext.allow=always'"),
    (["toolchain", "qemu", "--target", "x86_64"], "git:file:///srv/qemu@v9 .0", "bad git ref 'v9 .0'"),
])
def test_the_agent_refuses_git_urls_and_refs_that_git_would_read_as_options(tmp_path, command, source, words):
    cache = tmp_path / "cache"
    code, answer, stderr = run_agent(*command, "--source", source, "--cache", str(cache))
    assert code == 2 and words in answer["error"] and answer["ok"] is False
    assert stderr.count("\n") == 1 and words in stderr
    assert not (cache / "git").exists()  # git never ran


def test_the_agent_mirrors_resolves_and_checks_out_a_real_repository_with_dashdash(tmp_path, repo):
    agent = agent_module()
    mirror = agent.git_mirror(str(tmp_path / "cache"), f"file://{repo}")
    commit = agent.git_resolve(mirror, "v9.0.0")
    assert commit == subprocess.run(["git", "-C", str(repo), "rev-parse", "v9.0.0^{commit}"], check=True,
                                    capture_output=True, text=True).stdout.strip()
    dest = tmp_path / "checkout"
    agent.git_checkout(mirror, f"file://{repo}", commit, str(dest))
    origin = subprocess.run(["git", "-C", str(dest), "remote", "get-url", "origin"], check=True,
                            capture_output=True, text=True).stdout.strip()
    assert origin == f"file://{repo}"


def test_nightly_refuses_a_qemu_url_starting_with_a_dash(tmp_path):
    marker = tmp_path / "pwned"
    with pytest.raises(UsageError, match="starts with '-'"):
        nightly.discover(f"--upload-pack=touch {marker}")
    assert not marker.exists()


def test_nightly_reads_tags_and_refs_of_a_real_repository_with_dashdash(repo):
    found = nightly.discover(str(repo))
    assert [t.name for t in found.tags] == ["v9.0.0", "v9.1.0-rc1"] and found.head
    assert nightly._ls_remote_ref(str(repo), "v9.0.0") == found.head


@pytest.mark.parametrize("ref", ["--upload-pack=touch /tmp/x", "-x", "v9.0.0 --bare"])
def test_probe_refuses_a_ref_starting_with_a_dash_or_holding_spaces(env, ref):
    code, _, err = farm(env, "probe", "--qemu", "9.0.0", f"--ref={ref}", "--quiet")
    assert code == 2 and err.count("\n") == 1 and f"bad QEMU git ref {ref!r} (--ref)" in err
