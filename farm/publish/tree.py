"""Build a libvirt source tree and run its QEMU capability tests, with and without regeneration.

After a dump is placed into ``tests/qemucapabilitiesdata/``, libvirt's tests are run once with
``VIR_TEST_REGENERATE_OUTPUT=1`` (they write the ``.xml`` and other expected outputs into the source
tree) and then once more without it: that second run must pass.

The build directory lives outside the tree (meson out-of-tree build) and is reused: ``meson setup``
runs only when it is not configured yet, ``ninja`` is incremental. Only the test programs (and the
mock libraries and helpers they need) are built, with a configuration reduced to what the QEMU
driver's tests need.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from farm.errors import FarmError

Progress = Callable[[str], None]

#: The tests that read ``tests/qemucapabilitiesdata`` and whose outputs change with a new dump,
#: newest names first; ``qemuxmlconftest`` replaced ``qemuxml2argvtest`` + ``qemuxml2xmltest``
#: in libvirt 10.3.
CAPABILITY_TESTS = (
    "qemucapabilitiestest",
    "domaincapstest",
    "qemuxmlconftest",
    "qemuxml2argvtest",
    "qemuxml2xmltest",
)

#: meson options for a build that only runs the QEMU driver's tests. Options the tree does not
#: define (older or newer libvirt) are left out. Features that change which capability tests
#: run are kept: nbdkit (qemuxmlconftest skips its nbdkit cases without it).
MESON_OPTIONS: dict[str, str] = {
    # what the tests need
    "driver_qemu": "enabled",
    "driver_remote": "enabled",  # driver_libvirtd needs it
    "driver_libvirtd": "enabled",  # driver_qemu needs it
    "json_c": "enabled",  # driver_qemu needs it
    "tests": "enabled",
    "nbdkit": "enabled",  # qemuxmlconftest's *-nbdkit cases run only with it
    "nbdkit_config_default": "disabled",
    # keep it quiet and fast
    "docs": "disabled",
    "expensive_tests": "disabled",
    "git_werror": "disabled",
    "no_git": "true",  # no `git submodule update` in a tree that is a git checkout
    "init_script": "none",
    "nls": "disabled",
    # other drivers
    **{
        f"driver_{name}": "disabled"
        for name in (
            "bhyve", "esx", "hyperv", "interface", "libxl", "lxc", "ch", "network", "openvz",
            "secrets", "test", "vbox", "vmware", "vz",
        )
    },
    # storage backends
    **{
        f"storage_{name}": "disabled"
        for name in (
            "dir", "disk", "fs", "gluster", "iscsi", "iscsi_direct", "lvm", "mpath", "rbd", "scsi",
            "vstorage", "zfs",
        )
    },
    # optional libraries and features (not libnl: 11.3.0 does not compile on Linux without it)
    **{
        name: "disabled"
        for name in (
            "apparmor", "attr", "audit", "bash_completion", "blkid", "capng", "curl", "fuse",
            "glusterfs", "libiscsi", "libpcap", "libssh", "libssh2", "netcf", "numactl",
            "openwsman", "pciaccess", "polkit", "readline", "sanlock", "sasl", "selinux", "udev",
            "wireshark_dissector", "secdriver_apparmor", "apparmor_profiles", "secdriver_selinux",
            "dtrace", "firewalld", "firewalld_zone", "host_validate", "login_shell", "nss", "numad",
            "pm_utils", "ssh_proxy", "sysctl_config", "userfaultfd_sysctl",
        )
    },
}

#: meson's own options: no optimisation, no debug info (fastest compile, the tests do not care).
MESON_BUILTIN_OPTIONS = ("-Dbuildtype=plain",)

#: What to install when meson setup cannot find something (Debian).
BUILD_DEPS_HINT = "apt-get build-dep libvirt && apt-get install libjson-c-dev libnbd-dev"

REGENERATE_ENV = "VIR_TEST_REGENERATE_OUTPUT"

#: The test that turns ``caps_*.replies`` into ``caps_*.xml`` (which the other tests read).
CAPS_TEST = "qemucapabilitiestest"

_TAIL_LINES = 60
_OUTPUT_LINES = 20


class TreeError(FarmError):
    """The directory is not a (buildable) libvirt source tree, or lacks a wanted test."""


class BuildError(FarmError):
    """meson setup or ninja failed."""


class TestsFailed(FarmError):
    """Capability tests still failed after their outputs were regenerated."""

    __test__ = False  # not a pytest test class

    def __init__(self, message: str, run: TestRun):
        super().__init__(message)
        self.run = run


@dataclass(frozen=True)
class TestResult:
    """One test program's outcome in a `meson test` run."""

    __test__ = False  # not a pytest test class

    name: str
    result: str  # meson's: OK, FAIL, SKIP, TIMEOUT, ERROR, EXPECTEDFAIL, UNEXPECTEDPASS, ...
    duration: float = 0.0
    output: str = ""  # the last lines of the test program's own stdout and stderr
    cases: str = ""  # libvirt's numbers of the failed cases (its VIR_TEST_RANGE), e.g. "45-46"

    @property
    def label(self) -> str:
        return f"{self.name} (cases {self.cases})" if self.cases else self.name

    @property
    def ok(self) -> bool:
        return self.result in ("OK", "SKIP", "EXPECTEDFAIL")


@dataclass
class TestRun:
    """A `meson test` run of capability tests: ok only if every asked-for test passed."""

    __test__ = False

    ok: bool
    regenerate: bool
    results: list[TestResult]
    log: Path  # meson's full text log of this run
    tail: str = ""  # last lines of the output
    returncode: int = 0
    missing: list[str] = field(default_factory=list)  # asked for, but meson reported no result

    @property
    def failed(self) -> list[str]:
        return [r.name for r in self.results if not r.ok] + self.missing

    def describe_failures(self) -> str:
        """'qemucapabilitiestest (cases 45-46), domaincapstest' (or how meson failed)."""
        labels = [r.label for r in self.results if not r.ok] + self.missing
        return ", ".join(labels) or f"meson test (exit status {self.returncode})"


# --------------------------------------------------------------------------------------- the tree


def _check_tree(tree: Path) -> None:
    if not (tree / "meson.build").is_file():
        raise TreeError(f"{tree} is not a libvirt source tree: it has no meson.build")
    if not (tree / "tests" / "meson.build").is_file():
        raise TreeError(f"{tree} is not a libvirt source tree: it has no tests/meson.build")


def capability_tests(tree: Path) -> list[str]:
    """The capability tests (see CAPABILITY_TESTS) that the tree's tests/meson.build defines."""
    tree = Path(tree)
    _check_tree(tree)
    defined = set(re.findall(r"""['"]name['"]\s*:\s*['"](\w+)['"]""",
                             (tree / "tests" / "meson.build").read_text(errors="replace")))
    return [name for name in CAPABILITY_TESTS if name in defined]


def tree_options(tree: Path) -> dict[str, str]:
    """Names and types of the options the tree's meson_options.txt (or meson.options) defines."""
    for name in ("meson.options", "meson_options.txt"):
        path = Path(tree) / name
        if path.is_file():
            text = path.read_text(errors="replace")
            return dict(re.findall(r"""option\(\s*'([^']+)'\s*,\s*type\s*:\s*'(\w+)'""", text))
    raise TreeError(f"{tree} is not a libvirt source tree: it has no meson_options.txt")


def meson_setup_args(tree: Path) -> list[str]:
    """The -D options `meson setup` gets for this tree: MESON_OPTIONS, as far as it defines them."""
    defined = tree_options(tree)
    for needed in ("driver_qemu", "tests"):
        if needed not in defined:
            raise TreeError(f"{tree} has no meson option {needed!r}: not a libvirt tree this farm can build")
    return [*MESON_BUILTIN_OPTIONS, *(f"-D{k}={v}" for k, v in MESON_OPTIONS.items() if k in defined)]


# ------------------------------------------------------------------------------------- processes


def _tool(name: str, package: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise BuildError(f"{name} not found on PATH: install it (apt-get install {package})")
    return path


def _stream(argv: Sequence[str], *, progress: Progress | None, env: dict[str, str] | None = None,
            log: Path | None = None) -> tuple[int, deque[str]]:
    """Run argv, passing each output line (stdout and stderr) to progress; return code and tail.

    With log, all output is also written there.
    """
    tail: deque[str] = deque(maxlen=_TAIL_LINES)
    logf = None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        logf = open(log, "w", encoding="utf-8")
    try:
        try:
            proc = subprocess.Popen(
                list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=env, text=True, errors="replace", bufsize=1,
            )
        except FileNotFoundError as e:
            raise BuildError(f"cannot run {argv[0]}: {e.strerror}") from None
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                line = line.rstrip("\n")
                tail.append(line)
                if logf is not None:
                    logf.write(line + "\n")
                if progress is not None:
                    progress(line)
            return proc.wait(), tail
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    finally:
        if logf is not None:
            logf.close()


def _first(lines: Iterable[str], pattern: str) -> str | None:
    rx = re.compile(pattern)
    return next((line.strip() for line in lines if rx.search(line)), None)


# ------------------------------------------------------------------------------------------ build


def _configured_source(build_dir: Path) -> Path | None:
    info = build_dir / "meson-info" / "meson-info.json"
    if not (build_dir / "build.ninja").is_file() or not info.is_file():
        return None
    try:
        return Path(json.loads(info.read_text())["directories"]["source"])
    except (ValueError, KeyError, TypeError):
        return None


def setup(tree: Path, build_dir: Path, progress: Progress | None = None) -> bool:
    """`meson setup` build_dir for tree unless it is configured already; True if it ran.

    A build directory this module configured is reconfigured when MESON_OPTIONS changed since;
    one configured by someone else is used as it is.
    """
    tree, build_dir = Path(tree).resolve(), Path(build_dir).absolute()
    _check_tree(tree)
    args = meson_setup_args(tree)
    stamp = build_dir / "meson-private" / "farm-setup-args.json"
    source = _configured_source(build_dir)
    reconfigure = False
    if source is not None:
        if source.resolve() != tree:
            raise BuildError(f"{build_dir} is configured for {source}, not {tree}: use another build directory")
        try:
            previous = json.loads(stamp.read_text())
        except (OSError, ValueError):
            return False  # not ours (or unreadable): leave its configuration alone
        if previous == args:
            return False
        reconfigure = True
    elif build_dir.exists() and any(build_dir.iterdir()):
        if not (build_dir / "meson-private").is_dir():
            raise BuildError(f"{build_dir} exists and is not a meson build directory: remove it or use another")
        shutil.rmtree(build_dir)  # a failed earlier setup: start again
    meson = _tool("meson", "meson")
    build_dir.parent.mkdir(parents=True, exist_ok=True)
    argv = [meson, "setup", *(["--reconfigure"] if reconfigure else []), *args, str(build_dir), str(tree)]
    if progress:
        progress(f"meson setup {'--reconfigure ' if reconfigure else ''}{build_dir} ({len(args)} options)")
    rc, tail = _stream(argv, progress=progress)
    if rc != 0:
        log = build_dir / "meson-logs" / "meson-log.txt"
        why = _first(tail, r"ERROR:|error:") or (tail[-1].strip() if tail else f"exit status {rc}")
        why = why[why.find("ERROR:"):] if "ERROR:" in why else why  # drop meson.build:LINE:COL
        hint = f"install libvirt's build dependencies ({BUILD_DEPS_HINT})" if re.search(
            r"not found|[Rr]equire|[Dd]ependency|[Pp]rogram", why) else "see the log"
        raise BuildError(f"meson setup of {tree} failed: {why} — {hint}; log: {log}")
    stamp.write_text(json.dumps(args))
    return True


def targets_for(build_dir: Path, tests: Sequence[str]) -> list[str]:
    """ninja targets (paths relative to build_dir) for the tests' programs and everything they need."""
    build_dir = Path(build_dir).absolute()
    info = build_dir / "meson-info"
    try:
        intro_tests = json.loads((info / "intro-tests.json").read_text())
        intro_targets = json.loads((info / "intro-targets.json").read_text())
    except (OSError, ValueError) as e:
        raise BuildError(f"{build_dir} is not a configured meson build directory ({e})") from None
    by_id = {t["id"]: t for t in intro_targets}
    defined = {t["name"]: t for t in intro_tests}
    unknown = [name for name in tests if name not in defined]
    if unknown:
        raise TreeError(f"the build in {build_dir} defines no test {', '.join(unknown)} "
                        "(is the QEMU driver enabled in its configuration?)")
    targets: dict[str, None] = {}
    for name in tests:
        test = defined[name]
        files = [test["cmd"][0]]
        for dep in test.get("depends", []):
            files.extend(by_id[dep]["filename"] if dep in by_id else [])
        for f in files:
            rel = os.path.relpath(f, build_dir)
            if not rel.startswith(".."):
                targets[rel] = None
    return list(targets)


def build(tree: Path, build_dir: Path, targets: list[str] | None = None,
          progress: Progress | None = None) -> None:
    """Configure build_dir for tree if needed, then `ninja` the targets.

    Default targets: the tree's capability tests (see capability_tests) and what they need.
    The full ninja output is kept in build_dir/meson-logs/farm-ninja.log.
    """
    tree, build_dir = Path(tree).resolve(), Path(build_dir).absolute()
    setup(tree, build_dir, progress)
    if targets is None:
        tests = capability_tests(tree)
        if not tests:
            raise TreeError(f"{tree}/tests/meson.build defines none of {', '.join(CAPABILITY_TESTS)}")
        targets = targets_for(build_dir, tests)
    ninja = _tool("ninja", "ninja-build")
    argv = [ninja, "-C", str(build_dir), *targets]
    if progress:
        progress(f"ninja -C {build_dir} ({len(targets)} targets)")
    log = build_dir / "meson-logs" / "farm-ninja.log"
    rc, tail = _stream(argv, progress=progress, log=log)
    if rc != 0:
        why = (_first(tail, r"error:") or _first(tail, r"^FAILED:|^ninja: error")
               or (tail[-1].strip() if tail else f"exit status {rc}"))
        raise BuildError(f"building {tree} in {build_dir} failed: {why}; log: {log}")


# ------------------------------------------------------------------------------------------ tests


def _read_results(path: Path) -> list[TestResult]:
    results = []
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    for line in lines:
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if isinstance(entry, dict) and "name" in entry:
            output = "\n".join(f"{entry.get('stdout') or ''}\n{entry.get('stderr') or ''}".strip()
                               .splitlines()[-_OUTPUT_LINES:])
            cases = re.search(r"VIR_TEST_RANGE=(\S+)", output)
            results.append(TestResult(_short(str(entry["name"])), str(entry.get("result", "?")),
                                      float(entry.get("duration") or 0.0), output,
                                      cases.group(1) if cases else ""))
    return results


def _short(name: str) -> str:
    return name.rsplit("/", 1)[-1].rsplit(":", 1)[-1].strip()  # meson's "project:suite / name"


def run_tests(build_dir: Path, tests: list[str], regenerate: bool,
              progress: Progress | None = None) -> TestRun:
    """Run the named tests of an already built build_dir with `meson test`.

    With regenerate, VIR_TEST_REGENERATE_OUTPUT=1 is set: the tests (re)write their expected
    outputs in the source tree, and still fail where an output differed (or was missing). Without,
    it is removed from the environment. A name the build does not define is a TreeError.
    """
    build_dir = Path(build_dir).absolute()
    if not tests:
        raise TreeError("no tests to run")
    targets_for(build_dir, tests)  # checks that they exist
    meson = _tool("meson", "meson")
    logbase = "farm-regenerate" if regenerate else "farm-verify"
    logs = build_dir / "meson-logs"
    for suffix in (".json", ".txt"):
        (logs / (logbase + suffix)).unlink(missing_ok=True)
    env = dict(os.environ)
    env.pop(REGENERATE_ENV, None)
    if regenerate:
        env[REGENERATE_ENV] = "1"
    argv = [meson, "test", "-C", str(build_dir), "--no-rebuild", "--print-errorlogs",
            "--logbase", logbase, *tests]
    if progress:
        progress(f"meson test {' '.join(tests)}" + (f" ({REGENERATE_ENV}=1)" if regenerate else ""))
    rc, tail = _stream(argv, progress=progress, env=env)
    results = _read_results(logs / f"{logbase}.json")
    seen = {r.name for r in results}
    missing = [name for name in tests if name not in seen]
    ok = rc == 0 and not missing and all(r.ok for r in results)
    return TestRun(ok=ok, regenerate=regenerate, results=results, log=logs / f"{logbase}.txt",
                   tail="\n".join(tail), returncode=rc, missing=missing)


def regenerate_and_verify(tree: Path, build_dir: Path, tests: list[str] | None = None,
                          progress: Progress | None = None) -> TestRun:
    """Build, run the tests with VIR_TEST_REGENERATE_OUTPUT=1, then again without: return that run.

    While regenerating, a test fails for every expected output it had to rewrite (libvirt writes
    the file, then reports the difference): that run's result does not count. The run without
    regeneration must pass, or TestsFailed names its failing tests and its log.

    qemucapabilitiestest regenerates first, alone: it writes the ``caps_*.xml`` files that
    domaincapstest and qemuxmlconftest read as their input.
    """
    tree, build_dir = Path(tree).resolve(), Path(build_dir).absolute()
    if tests is None:
        tests = capability_tests(tree)
        if not tests:
            raise TreeError(f"{tree}/tests/meson.build defines none of {', '.join(CAPABILITY_TESTS)}")
    setup(tree, build_dir, progress)
    build(tree, build_dir, targets_for(build_dir, tests), progress)
    first, rest = [t for t in tests if t == CAPS_TEST], [t for t in tests if t != CAPS_TEST]
    for stage in (first, rest):
        if stage:
            run_tests(build_dir, stage, regenerate=True, progress=progress)
    verify = run_tests(build_dir, tests, regenerate=False, progress=progress)
    if not verify.ok:
        raise TestsFailed(f"{verify.describe_failures()} still failed in {tree} after regenerating their outputs "
                          f"({REGENERATE_ENV}=1); log: {verify.log}", verify)
    return verify
