"""Tests of agents/farm_agent.py, run as a subprocess the way hosts run it.

The agent is stdlib-only and must run on Python >= 3.9; it is run here with the
system python3 (/usr/bin/python3; override with FARM_AGENT_PYTHON).
"""

import ast
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.paths import CACHE

ROOT = Path(__file__).resolve().parent.parent
AGENT = ROOT / "agents" / "farm_agent.py"
QEMU_X86 = "/usr/bin/qemu-system-x86_64"
LIBVIRT_DEBIAN = "debian:11.3.0-3+deb13u3"
NOKVM_USER = "farm-nokvm"


def agent_python() -> str:
    """The interpreter that runs the agent: the system python3."""
    env = os.environ.get("FARM_AGENT_PYTHON")
    if env:
        return env
    return "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable


def run_agent(*args: str, env=None, timeout: float = 120, **kwargs) -> tuple:
    """Run the agent; return (exit code, parsed JSON stdout, stderr)."""
    proc = subprocess.run([agent_python(), str(AGENT), *args], capture_output=True, text=True,
                          timeout=timeout, env=env, **kwargs)
    lines = proc.stdout.splitlines()
    assert len(lines) == 1, "stdout must be exactly one JSON line, got %r" % proc.stdout
    return proc.returncode, json.loads(lines[0]), proc.stderr


def kvm_usable() -> bool:
    """Whether this process can open /dev/kvm read/write."""
    return os.path.exists("/dev/kvm") and os.access("/dev/kvm", os.R_OK | os.W_OK)


def pid_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        stat = Path("/proc/%d/stat" % pid).read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@pytest.fixture(scope="module")
def probe_cache() -> Path:
    """The shared build cache for qemucapsprobe ($FARM_CACHE/agent)."""
    path = CACHE / "agent"
    path.mkdir(parents=True, exist_ok=True)
    return path


# --------------------------------------------------------------------------- source rules

def test_agent_is_python39_syntax_and_stdlib_only():
    """The file parses as Python 3.9 and imports nothing outside the standard library."""
    tree = ast.parse(AGENT.read_text(), feature_version=(3, 9))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
        assert not isinstance(node, getattr(ast, "Match", ())), "no match statements"
    stdlib = getattr(sys, "stdlib_module_names", None)
    if stdlib:
        assert imported <= set(stdlib), imported - set(stdlib)
    assert "shell=True" not in AGENT.read_text()


# --------------------------------------------------------------------------- facts

def test_facts_shape(tmp_path):
    code, facts, _ = run_agent("facts", "--cache", str(tmp_path / "cache"))
    assert code == 0
    assert facts["ok"] is True
    assert facts["arch"] == os.uname().machine
    assert facts["kernel"] == os.uname().release
    assert isinstance(facts["agent_version"], str)
    assert facts["cpu_model"] is None or isinstance(facts["cpu_model"], str)
    assert set(facts["kvm"]) >= {"present", "usable", "api_version", "error"}
    assert isinstance(facts["free_disk_bytes"], int) and facts["free_disk_bytes"] > 0
    assert facts["probes"] == []
    for qemu in facts["qemu"]:
        assert set(qemu) >= {"path", "arch", "version", "version_line"}


def test_facts_finds_qemu_binaries(tmp_path):
    if not os.path.exists(QEMU_X86):
        pytest.skip("%s is not installed" % QEMU_X86)
    _, facts, _ = run_agent("facts", "--cache", str(tmp_path))
    by_path = {q["path"]: q for q in facts["qemu"]}
    x86 = by_path[QEMU_X86]
    assert x86["arch"] == "x86_64"
    assert x86["version_line"].startswith("QEMU emulator version ")
    assert x86["version"] and x86["version_line"].startswith("QEMU emulator version " + x86["version"])
    assert len(by_path) == len(facts["qemu"]), "each binary listed once"


def test_facts_kvm_usable():
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm does not exist on this machine")
    if not kvm_usable():
        pytest.skip("this user cannot open /dev/kvm read/write")
    _, facts, _ = run_agent("facts")
    assert facts["kvm"] == {"present": True, "usable": True, "api_version": 12, "error": None}


@pytest.fixture
def nokvm_user():
    """A local user without access to /dev/kvm (created with useradd when running as root)."""
    if os.geteuid() != 0:
        pytest.skip("creating a user without kvm access needs root")
    if not shutil.which("useradd"):
        pytest.skip("useradd is not available")
    try:
        pwd.getpwnam(NOKVM_USER)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                        NOKVM_USER], check=True)
    return pwd.getpwnam(NOKVM_USER)


def test_facts_without_kvm_access(nokvm_user):
    if not os.path.exists("/dev/kvm"):
        pytest.skip("/dev/kvm does not exist on this machine")
    st = os.stat("/dev/kvm")
    if st.st_mode & 0o006 or st.st_gid in os.getgrouplist(nokvm_user.pw_name, nokvm_user.pw_gid):
        pytest.skip("/dev/kvm is accessible to every user here")
    python = agent_python()
    if python != "/usr/bin/python3":
        pytest.skip("the unprivileged user needs a system python3")
    env = {"PATH": "/usr/bin:/bin", "HOME": "/nonexistent", "LANG": "C.UTF-8"}
    code, facts, _ = run_agent("facts", env=env, cwd="/", user=nokvm_user.pw_uid,
                               group=nokvm_user.pw_gid, extra_groups=[])
    assert code == 0
    assert facts["user"] == nokvm_user.pw_uid
    assert facts["kvm"]["present"] is True
    assert facts["kvm"]["usable"] is False
    assert "Permission denied" in facts["kvm"]["error"]


# --------------------------------------------------------------------------- arguments

@pytest.mark.parametrize("args,named", [
    (["probe", "--qemu", QEMU_X86, "--out", "x"], "--probe"),
    (["probe", "--probe", "/nonexistent/qemucapsprobe", "--qemu", QEMU_X86, "--out", "x"],
     "--probe"),
    (["probe", "--probe", "/bin/true", "--qemu", "/nonexistent/qemu", "--out", "x"], "--qemu"),
    (["probe", "--probe", "/bin/true", "--qemu", "/bin/true", "--out", "x", "--timeout", "soon"],
     "--timeout"),
    (["probe", "--probe", "/bin/true", "--qemu", "/bin/true", "--out", "x", "--timeout", "-1"],
     "--timeout"),
    (["probe", "--probe", "/bin/true", "--qemu", "/bin/true", "--out", "/nonexistent/dir/x"],
     "--out"),
    (["toolchain", "libvirt"], "--source"),
    (["toolchain", "libvirt", "--source", "svn:whatever"], "--source"),
    (["toolchain", "libvirt", "--source", "git:no-ref-here"], "--source"),
    (["toolchain", "libvirt", "--source", "debian:11.3.0", "--tarball", "/nonexistent.tar.xz"],
     "--tarball"),
    (["toolchain", "qemu", "--binary", "/nonexistent/qemu-system-x86_64"], "--binary"),
    (["toolchain", "qemu", "--source", "tarball:/nonexistent.tar.xz", "--target", "x86_64"],
     "--source"),
    (["toolchain", "qemu", "--source", "ftp:somewhere", "--target", "x86_64"], "--source"),
    (["toolchain", "qemu", "--source", "tarball:/etc/hostname"], "--target"),
    (["toolchain", "qemu", "--source", "tarball:/etc/hostname", "--target", "X86;rm"], "--target"),
    (["toolchain", "libvirt", "--source", "debian:1", "--jobs", "0"], "--jobs"),
])
def test_bad_arguments_exit_2_naming_the_argument(tmp_path, args, named):
    code, answer, stderr = run_agent(*args, "--cache", str(tmp_path)) if args[0] == "toolchain" \
        else run_agent(*args, cwd=tmp_path)
    assert code == 2, answer
    assert answer["ok"] is False
    assert named in answer["error"]
    assert not list(tmp_path.iterdir()), "nothing written for a usage error"


def test_unknown_subcommand_exits_2():
    code, answer, _ = run_agent("fly")
    assert code == 2 and answer["ok"] is False


def test_toolchain_qemu_binary_validates():
    if not os.path.exists(QEMU_X86):
        pytest.skip("%s is not installed" % QEMU_X86)
    code, answer, _ = run_agent("toolchain", "qemu", "--binary", QEMU_X86)
    assert code == 0 and answer["ok"] is True
    assert answer["path"] == QEMU_X86 and answer["arch"] == "x86_64"
    assert answer["version"] and answer["version"] in answer["version_line"]


def test_toolchain_qemu_binary_rejects_non_qemu(tmp_path):
    code, answer, _ = run_agent("toolchain", "qemu", "--binary", "/bin/true")
    assert code == 1 and "no QEMU version" in answer["error"]


# --------------------------------------------------------------------------- probe (stand-ins)

def write_script(path: Path, text: str) -> Path:
    """Write an executable shell script."""
    path.write_text("#!/bin/sh\n" + text)
    path.chmod(0o755)
    return path


def test_probe_writes_atomically_and_never_overwrites(tmp_path):
    """A stand-in for qemucapsprobe that echoes its argument; a second run must not overwrite."""
    fake = write_script(tmp_path / "fakeprobe", 'echo "{\\"probed\\": \\"$1\\"}"\necho oops >&2\n')
    out = tmp_path / "out.replies"
    code, answer, stderr = run_agent("probe", "--probe", str(fake), "--qemu", "/bin/true",
                                     "--out", str(out))
    assert code == 0, answer
    assert answer["ok"] and not answer["timed_out"] and answer["exit_status"] == 0
    assert out.read_text() == '{"probed": "/bin/true"}\n'
    assert answer["size"] == out.stat().st_size
    assert answer["stderr_tail"] == ["oops"]
    assert "progress:" in stderr
    import hashlib
    assert answer["sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()

    out.write_text("precious\n")
    code, answer, _ = run_agent("probe", "--probe", str(fake), "--qemu", "/bin/true",
                                "--out", str(out))
    assert code == 2 and "--out" in answer["error"]
    assert out.read_text() == "precious\n"

    code, answer, _ = run_agent("probe", "--probe", str(fake), "--qemu", "/bin/true",
                                "--out", str(out), "--force")
    assert code == 0 and out.read_text().startswith('{"probed"')
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fakeprobe", "out.replies"]


def test_probe_failure_leaves_no_file(tmp_path):
    """A stand-in for qemucapsprobe that prints something and then fails."""
    fake = write_script(tmp_path / "fakeprobe", "echo partial\necho 'cannot probe' >&2\nexit 3\n")
    out = tmp_path / "out.replies"
    code, answer, _ = run_agent("probe", "--probe", str(fake), "--qemu", "/bin/true",
                                "--out", str(out))
    assert code == 1 and answer["ok"] is False
    assert answer["exit_status"] == 3 and "status 3" in answer["error"]
    assert answer["stderr_tail"] == ["cannot probe"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fakeprobe"]


def test_probe_empty_output_is_a_failure(tmp_path):
    fake = write_script(tmp_path / "fakeprobe", "exit 0\n")
    code, answer, _ = run_agent("probe", "--probe", str(fake), "--qemu", "/bin/true",
                                "--out", str(tmp_path / "out.replies"))
    assert code == 1 and "no output" in answer["error"]
    assert not (tmp_path / "out.replies").exists()


def test_probe_timeout_kills_group_and_daemonized_qemu(tmp_path):
    """A stand-in for qemucapsprobe: it starts a real QEMU with -daemonize (as libvirt does;
    QEMU then leaves our process group with setsid) and hangs.  On timeout the agent must kill
    the whole process group and the daemonized QEMU, and write no output file."""
    if not os.path.exists(QEMU_X86):
        pytest.skip("%s is not installed" % QEMU_X86)
    pidfile = tmp_path / "qemu.pid"
    shpidfile = tmp_path / "sh.pid"
    fake = write_script(tmp_path / "fakeprobe", (
        f'echo $$ > "{shpidfile}"\n'
        f'"$1" -daemonize -display none -S -machine none -nodefaults -pidfile "{pidfile}" || exit 9\n'
        f'cp "{pidfile}" "{pidfile}.saved"\n'  # QEMU removes its pidfile when it exits
        'echo "{\\"started\\": true}"\n'
        'sleep 600\n'))
    out = tmp_path / "out.replies"
    started = time.monotonic()
    code, answer, _ = run_agent("probe", "--probe", str(fake), "--qemu", QEMU_X86,
                                "--out", str(out), "--timeout", "3")
    assert code == 1, answer
    assert answer["timed_out"] is True and answer["ok"] is False
    assert "timed out" in answer["error"]
    assert answer["leftover_pids"] == []
    assert time.monotonic() - started < 30
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.replies")]
    qemu_pid = int((tmp_path / "qemu.pid.saved").read_text())
    assert not pid_alive(qemu_pid), "daemonized QEMU %d survived" % qemu_pid
    assert not pid_alive(int(shpidfile.read_text())), "stand-in probe survived"


# --------------------------------------------------------------------------- real build + probe

@pytest.mark.slow
def test_toolchain_libvirt_debian_build_and_real_probe(probe_cache, tmp_path):
    """Build qemucapsprobe from Debian's libvirt 11.3.0 source (cached across runs), probe the
    system QEMU for x86_64 with it, and get a cached answer the second time."""
    code, built, stderr = run_agent("toolchain", "libvirt", "--source", LIBVIRT_DEBIAN,
                                    "--cache", str(probe_cache), timeout=3600)
    assert code == 0, (built, stderr[-3000:])
    assert built["ok"] is True
    assert built["libvirt_version"] == "11.3.0"
    assert built["commit"] is None and built["source"] == LIBVIRT_DEBIAN
    probe = Path(built["probe"])
    assert probe.is_absolute() and probe.name == "qemucapsprobe" and os.access(probe, os.X_OK)
    assert str(probe).startswith(built["build_dir"])
    assert (Path(built["build_dir"]) / "tests" / "libqemucapsprobemock.so").is_file()
    if not built["cached"]:
        assert "progress: ninja:" in stderr

    again_code, again, _ = run_agent("toolchain", "libvirt", "--source", LIBVIRT_DEBIAN,
                                     "--cache", str(probe_cache))
    assert again_code == 0 and again["cached"] is True
    assert again["probe"] == built["probe"]

    _, facts, _ = run_agent("facts", "--cache", str(probe_cache))
    assert any(p["path"] == built["probe"] and p["libvirt_version"] == "11.3.0"
               for p in facts["probes"])

    if not os.path.exists(QEMU_X86):
        pytest.skip("%s is not installed" % QEMU_X86)
    out = tmp_path / "caps_x86_64.replies"
    code, answer, _ = run_agent("probe", "--probe", built["probe"], "--qemu", QEMU_X86,
                                "--out", str(out), "--timeout", "300", timeout=400)
    assert code == 0, answer
    assert answer["ok"] and answer["exit_status"] == 0 and not answer["timed_out"]
    text = out.read_text()
    first = json.loads(text.split("\n\n", 1)[0])
    assert first == {"execute": "qmp_capabilities", "id": "libvirt-1"}
    assert '"execute": "query-kvm"' in text
    assert answer["size"] == len(text.encode())
    if kvm_usable():  # an accelerated probe has a second, TCG-only session
        assert text.count('"execute": "qmp_capabilities"') >= 2


GIT_ENV = {"GIT_AUTHOR_NAME": "farm", "GIT_AUTHOR_EMAIL": "farm@example.invalid",
           "GIT_COMMITTER_NAME": "farm", "GIT_COMMITTER_EMAIL": "farm@example.invalid",
           "GIT_AUTHOR_DATE": "2025-05-01T00:00:00Z", "GIT_COMMITTER_DATE": "2025-05-01T00:00:00Z"}


def local_libvirt_repo(repo: Path, tarball: Path) -> Path:
    """A git repo of the tarball's tree tagged v11.3.0, kept at a fixed path (so the agent's
    mirror of it is reused) and made with fixed dates (so its commit id is stable)."""
    if (repo / ".git").is_dir():
        return repo
    tmp = repo.with_name(repo.name + ".tmp-%d" % os.getpid())
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run(["tar", "-xf", str(tarball), "-C", str(tmp), "--strip-components=1"],
                   check=True)
    env = dict(os.environ, **GIT_ENV)
    for argv in (["init", "-q", "-b", "master"], ["add", "-A", "."],
                 ["commit", "-q", "-m", "libvirt 11.3.0"], ["tag", "v11.3.0"]):
        subprocess.run(["git", "-C", str(tmp), *argv], check=True, env=env)
    tmp.rename(repo)
    return repo


@pytest.mark.slow
def test_toolchain_libvirt_git_source(probe_cache):
    """Build qemucapsprobe from a git repository (a local one made from the 11.3.0 release
    tarball, with fixed dates so its commit id, and hence the cache key, is stable)."""
    if not shutil.which("git"):
        pytest.skip("git is not installed")
    code, built, _ = run_agent("toolchain", "libvirt", "--source", LIBVIRT_DEBIAN,
                               "--cache", str(probe_cache), timeout=3600)
    assert code == 0, built
    tarballs = list((probe_cache / "libvirt" / "downloads").glob("*/libvirt_11.3.0.orig.tar.*"))
    assert tarballs
    repo = local_libvirt_repo(probe_cache / "test-repos" / "libvirt-11.3.0", tarballs[0])
    commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "v11.3.0^{commit}"], check=True,
                            capture_output=True, text=True).stdout.strip()

    source = "git:file://%s@v11.3.0" % repo
    code, built, stderr = run_agent("toolchain", "libvirt", "--source", source,
                                    "--cache", str(probe_cache), timeout=3600)
    assert code == 0, (built, stderr[-3000:])
    assert built["commit"] == commit and built["key"] == "git-" + commit
    assert built["libvirt_version"] == "11.3.0" and built["source"] == source
    assert os.access(built["probe"], os.X_OK)

    code, again, _ = run_agent("toolchain", "libvirt", "--source",
                               "git:file://%s@%s" % (repo, commit), "--cache", str(probe_cache))
    assert code == 0 and again["cached"] is True and again["probe"] == built["probe"]

    code, answer, _ = run_agent("toolchain", "libvirt", "--source",
                                "git:file://%s@no-such-branch" % repo, "--cache", str(probe_cache))
    assert code == 1 and "no-such-branch" in answer["error"]


def test_job_refuses_a_host_of_another_arch_before_building_anything(tmp_path):
    """`job` = facts + toolchains + probe in one run; a wrong-arch host gets no build, no probe."""
    other = "s390x" if os.uname().machine != "s390x" else "x86_64"
    code, answer, _ = run_agent("job", "--libvirt", "debian:11.3.0-3+deb13u3", "--target", other,
                                "--out", str(tmp_path / "out.replies"), "--expect-arch", other,
                                "--cache", str(tmp_path / "cache"))
    assert code == 1 and not answer["ok"]
    assert answer["error"] == "this host is %s, not %s" % (os.uname().machine, other)
    assert answer["facts"]["arch"] == os.uname().machine
    assert "probe" not in answer and "libvirt" not in answer
    assert not (tmp_path / "cache" / "libvirt").exists() and not (tmp_path / "out.replies").exists()


@pytest.mark.slow
def test_job_probes_in_one_call(probe_cache, tmp_path):
    out = tmp_path / "caps.replies"
    code, answer, _ = run_agent("job", "--libvirt", "debian:11.3.0-3+deb13u3", "--target", "x86_64",
                                "--out", str(out), "--cache", str(probe_cache), timeout=3600)
    assert code == 0 and answer["ok"], answer
    assert answer["libvirt"]["libvirt_version"] == "11.3.0"
    assert answer["qemu"]["path"].endswith("qemu-system-x86_64")
    assert answer["probe"]["sha256"] and out.stat().st_size == answer["probe"]["size"]


# --------------------------------------------------------------------------- serve

class Server:
    """``farm_agent.py serve`` as a subprocess, spoken to as the coordinator does."""

    def __init__(self):
        self.proc = subprocess.Popen([agent_python(), str(AGENT), "serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)
        self.greeting = self.read()

    def send(self, **message) -> None:
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        assert line, "the server ended"
        return json.loads(line)

    def until_exit(self, wanted: set) -> dict:
        """Messages until every id in wanted has its exit: {id: {"exit", "stdout", "lines"}}."""
        ended = {}
        lines = {}
        while not wanted <= set(ended):
            m = self.read()
            if "line" in m:
                lines.setdefault(m["id"], []).append(m["line"])
            elif "exit" in m:
                ended[m["id"]] = dict(m, lines=lines.get(m["id"], []))
        return ended


def test_serve_answers_requests_concurrently_as_the_subcommands_would(tmp_path):
    slow = write_script(tmp_path / "slowprobe", "sleep 2\necho '{\"return\": {}}'\n")
    server = Server()
    assert server.greeting["serve"] and server.greeting["pid"] == server.proc.pid
    started = time.monotonic()
    server.send(id=1, argv=["probe", "--probe", str(slow), "--qemu", "/bin/true", "--out", str(tmp_path / "a")])
    server.send(id=2, argv=["probe", "--probe", str(slow), "--qemu", "/bin/true", "--out", str(tmp_path / "b")])
    server.send(id=3, argv=["facts", "--cache", str(tmp_path / "cache")])
    server.send(id=4, argv=["bogus"])
    server.send(id=5, argv=["serve"])
    ended = server.until_exit({1, 2, 3, 4, 5})
    assert time.monotonic() - started < 3.8, "the two 2 s probes ran one after the other"
    for i in (1, 2):
        assert ended[i]["exit"] == 0 and json.loads(ended[i]["stdout"])["ok"]
        assert any(line.startswith("progress: probe:") for line in ended[i]["lines"])
    assert (tmp_path / "a").read_text() == '{"return": {}}\n'
    assert json.loads(ended[3]["stdout"])["agent_version"]
    assert ended[4]["exit"] == 2 and "invalid choice" in json.loads(ended[4]["stdout"])["error"]
    assert ended[5]["exit"] == 2  # no server in the server
    server.proc.stdin.close()
    assert server.proc.wait(10) == 0


def test_serve_cancel_and_a_closed_stdin_leave_no_probe_behind(tmp_path):
    """A request cancelled, and the coordinator going away mid-probe: the probe (and the
    QEMU it daemonized) are killed, no output is left."""
    if not os.path.exists(QEMU_X86):
        pytest.skip("%s is not installed" % QEMU_X86)
    pids = []
    server = Server()
    for i in (1, 2):
        pid = tmp_path / f"qemu{i}.pid"
        fake = write_script(tmp_path / f"hang{i}", (
            f'echo $$ > "{tmp_path}/sh{i}.pid"\n'
            f'"$1" -daemonize -display none -S -machine none -nodefaults -pidfile "{pid}" || exit 9\n'
            f'cp "{pid}" "{pid}.saved"\nsleep 600\n'))
        server.send(id=i, argv=["probe", "--probe", str(fake), "--qemu", QEMU_X86, "--out", str(tmp_path / f"out{i}")])
    deadline = time.monotonic() + 30
    while not all((tmp_path / f"qemu{i}.pid.saved").exists() for i in (1, 2)) and time.monotonic() < deadline:
        time.sleep(0.1)
    for i in (1, 2):
        pids += [int((tmp_path / f"qemu{i}.pid.saved").read_text()), int((tmp_path / f"sh{i}.pid").read_text())]
    server.send(id=1, cancel=True)
    ended = server.until_exit({1})
    assert ended[1]["exit"] == 1 and "signal" in json.loads(ended[1]["stdout"])["error"]
    assert not pid_alive(pids[0]) and not pid_alive(pids[1])
    assert pid_alive(pids[2]), "cancelling request 1 stopped request 2"
    server.proc.stdin.close()  # the coordinator is gone
    assert server.proc.wait(30) == 0
    assert not any(pid_alive(p) for p in pids), "a probe or its QEMU outlived the server"
    assert not list(tmp_path.glob("out*")) and not list(tmp_path.glob(".out*"))


def test_job_out_dash_returns_the_dump_in_its_reply_and_qemu_versions_are_cached(tmp_path):
    import base64
    import zlib

    calls = tmp_path / "calls"
    for d in ("bin", "build/tests", "tmp"):
        (tmp_path / d).mkdir(parents=True)
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"))
    qemu = write_script(tmp_path / "bin" / "qemu-system-x86_64",
                        f'echo x >> "{calls}"\necho "QEMU emulator version 9.2.0"\n')
    build = tmp_path / "build"
    write_script(build / "tests" / "qemucapsprobe", 'echo \'{"return": {}}\'\n')
    args = ["job", "--libvirt", f"builddir:{build}", "--target", "x86_64", "--qemu-binary", str(qemu),
            "--out", "-", "--cache", str(tmp_path / "cache")]
    code, reply, _ = run_agent(*args, env=env)
    assert code == 0, reply
    assert zlib.decompress(base64.b64decode(reply["dump"])) == b'{"return": {}}\n'
    assert reply["probe"]["out"] == "-" and reply["qemu"]["version"] == "9.2.0"
    assert not list((tmp_path / "tmp").iterdir()), "the job's own scratch dir stayed"
    asked = calls.read_text().count("x")
    assert run_agent(*args, env=env)[0] == 0
    assert calls.read_text().count("x") == asked, "an unchanged QEMU was asked for its version again"
    qemu.write_text(qemu.read_text().replace("9.2.0", "9.2.1"))  # rebuilt in place
    code, reply, _ = run_agent(*args, env=env)
    assert reply["qemu"]["version"] == "9.2.1"
