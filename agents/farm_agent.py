#!/usr/bin/env python3
"""farm-agent: the part of the probe farm that runs on a probe host.

One stdlib-only file (Python >= 3.9), copied to hosts of any arch and distro and
run as an unprivileged user (in the kvm group).  Subcommands:

  facts      [--cache DIR] [--target ARCH]...
  toolchain  libvirt --source debian:VERSION|git:URL@REF|tarball:PATH|builddir:PATH
                     [--tarball PATH] [--cache DIR] [--jobs N]
  toolchain  qemu --binary PATH
  toolchain  qemu --source tarball:PATH|git:URL@REF --target ARCH
                  [--cache DIR] [--python PATH] [--configure-arg ARG]... [--jobs N]
  probe      --probe PATH --qemu PATH --out FILE [--timeout SECONDS] [--force]
  job        --libvirt SOURCE --target ARCH [--qemu-binary PATH|--qemu-source SPEC]
             --out FILE|- [--timeout SECONDS] [--expect-arch ARCH] [--cache DIR]
             (facts + toolchain libvirt + toolchain qemu + probe in one call;
             --out - returns the dump in the reply, zlib-compressed, base64)
  serve      answer requests until stdin closes (one per line, see serve())

Every subcommand prints exactly one JSON object on stdout.  Progress of long
steps goes to stderr, one line each, prefixed with "progress: ".  Failures print
{"ok": false, "error": "..."} and exit 1; usage errors exit 2.

Cache layout (default $FARM_AGENT_CACHE or ~/.cache/farm-agent):

  libvirt/<key>            symlink -> .work/<key>-<random>, created only after a
                           successful build (absolute paths are compiled into
                           qemucapsprobe, so the build dir itself never moves)
  libvirt/.work/<key>-*/   src/, build/, farm-agent.json (metadata)
  libvirt/downloads/<key>/ apt-get source downloads (orig tarball)
  libvirt/<key>.lock       flock held while building that key
  qemu/<key>               same scheme; prefix/bin/qemu-system-ARCH
  git/<name>-<hash>.git    bare mirrors of git sources
  qemu-versions.json       --version of QEMU binaries, by path, inode, size and mtime
"""

import argparse
import base64
import bz2
import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import re
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
import zlib
from typing import Dict, Iterator, List, Optional, Tuple

AGENT_VERSION = "0.1.0"

KVM_GET_API_VERSION = 0xAE00
KVM_API_VERSION = 12
PR_SET_CHILD_SUBREAPER = 36
META_NAME = "farm-agent.json"
PROBE_REL = os.path.join("tests", "qemucapsprobe")
MOCK_REL = os.path.join("tests", "libqemucapsprobemock.so")
STDERR_TAIL_LINES = 40

# Meson options for a minimal libvirt build of qemucapsprobe.  Only the ones the
# source tree knows (checked against meson_options.txt) are passed.
LIBVIRT_MESON_OPTIONS = [
    ("auto_features", "disabled"),   # meson builtin: every "auto" feature off
    ("driver_qemu", "enabled"),
    ("driver_libvirtd", "enabled"),  # libvirt: "libvirtd is required to build QEMU driver"
    ("driver_remote", "enabled"),    # ... and libvirtd needs the remote driver
    ("tests", "enabled"),
    ("docs", "disabled"),
    ("json_c", "enabled"),           # libvirt >= 10.0 (JSON for QMP)
    ("yajl", "enabled"),             # libvirt < 10.0
    ("libnl", "enabled"),            # src/util/virnetdevbridge.c fails to build without it
    ("no_git", "true"),
    ("git_werror", "disabled"),
]
MESON_BUILTIN_OPTIONS = {"auto_features"}

# QEMU configure flags passed when the source tree supports them.
QEMU_OPTIONAL_FLAGS = [
    "--disable-docs",
    "--disable-user",
    "--disable-tools",
    "--disable-guest-agent",
    "--disable-werror",
    "--disable-download",
    "--disable-install-blobs",
]
QEMU_VENV_PACKAGES = ["meson==1.9.0", "pycotap==1.3.1"]
# uname -m and libvirt's arch names -> QEMU's target name; kept in step with farm/caps/arch.py
# (tests/test_arch_aliases.py)
QEMU_TARGET_ALIASES = {"ppc64le": "ppc64", "armv7l": "arm", "armv7": "arm", "armv8l": "arm", "arm64": "aarch64",
                       "amd64": "x86_64", "i686": "i386"}


class AgentError(Exception):
    """A failure to report as {"ok": false, "error": ...} with exit code 1."""


class UsageError(AgentError):
    """A bad argument: reported like AgentError, but with exit code 2."""


class Terminated(Exception):
    """Raised from a signal handler when the agent itself is asked to stop."""


# --------------------------------------------------------------------------- helpers

def progress(message: str) -> None:
    """Write one progress line to stderr."""
    line = " ".join(str(message).splitlines()) or "-"
    sys.stderr.write("progress: %s\n" % line)
    sys.stderr.flush()


def default_cache_dir() -> str:
    """$FARM_AGENT_CACHE or ~/.cache/farm-agent."""
    env = os.environ.get("FARM_AGENT_CACHE")
    if env:
        return env
    return os.path.join(os.path.expanduser("~"), ".cache", "farm-agent")


def resolve_cache(path: Optional[str]) -> str:
    """The absolute cache dir for --cache PATH (or the default)."""
    return os.path.abspath(os.path.expanduser(path or default_cache_dir()))


def sanitize(text: str) -> str:
    """A file-name-safe version of text ('+', '.', '-', '_' kept)."""
    return re.sub(r"[^A-Za-z0-9.+_-]", "_", text).strip(".") or "_"


def sha256_file(path: str) -> str:
    """Hex sha256 of a file's contents."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_text(path: str) -> Optional[str]:
    """A file's text, or None if it cannot be read."""
    try:
        with open(path, encoding="utf-8", errors="replace") as handle:
            return handle.read()
    except OSError:
        return None


def write_json_atomic(path: str, data: Dict) -> None:
    """Write JSON to path via a temp file and rename."""
    tmp = "%s.tmp-%d" % (path, os.getpid())
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.replace(tmp, path)


def is_executable_file(path: str) -> bool:
    """True for an existing regular file we may execute."""
    return os.path.isfile(path) and os.access(path, os.X_OK)


TELLING = re.compile(r"(E:|error|ERROR|Error|fatal:|FAILED|ninja: build stopped)")
ONE_LINE = 240  # characters of a failure's text


def one_line(text: str) -> str:
    """text as one line of at most ONE_LINE characters (blanks squeezed)."""
    text = " ".join(str(text).split())
    return text if len(text) <= ONE_LINE else text[:ONE_LINE - 3] + "..."


def run_capture(argv: List[str], timeout: float = 60, cwd: Optional[str] = None) -> str:
    """Run argv, return stdout; raise AgentError with the output's tail on failure."""
    try:
        proc = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise AgentError("%s: %s" % (argv[0], exc)) from exc
    if proc.returncode != 0:
        lines = [line for line in proc.stderr.decode(errors="replace").splitlines() if line.strip()]
        telling = [line for line in lines if TELLING.match(line.strip())]
        raise AgentError("%s failed (exit %d): %s" % (" ".join(argv[:3]), proc.returncode,
                                                      one_line((telling or lines or ["no output"])[-1])))
    return proc.stdout.decode(errors="replace")


def run_streamed(argv: List[str], label: str, cwd: Optional[str] = None,
                 env: Optional[Dict[str, str]] = None) -> None:
    """Run argv, streaming each output line to stderr as progress; raise on failure."""
    progress("%s: running %s" % (label, " ".join(argv)))
    try:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except OSError as exc:
        raise AgentError("%s: cannot run %s: %s" % (label, argv[0], exc)) from exc
    telling = None  # type: Optional[str]
    last = None  # type: Optional[str]
    assert proc.stdout is not None
    for raw in proc.stdout:
        line = raw.decode(errors="replace").rstrip()
        if not line:
            continue
        progress("%s: %s" % (label, line))  # the whole output: the job's log
        last = line
        if TELLING.match(line.strip()):
            telling = line
    status = proc.wait()
    if status != 0:  # one line: the tool's telling line (its last error), else its last line
        raise AgentError("%s failed (exit %d): %s" % (label, status, one_line(telling or last or "no output")))


@contextlib.contextmanager
def file_lock(path: str) -> Iterator[None]:
    """Hold an exclusive flock on path (created if needed) for the block."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def extract_tarball(tarball: str, dest: str) -> str:
    """Extract tarball into a fresh dest dir; return its single top directory."""
    os.makedirs(dest)
    progress("extract: %s" % tarball)
    try:
        with tarfile.open(tarball) as archive:
            if hasattr(tarfile, "data_filter"):
                archive.extractall(dest, filter="data")
            else:  # Python without extraction filters (< 3.9.17)
                archive.extractall(dest)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise AgentError("cannot extract %s: %s" % (tarball, exc)) from exc
    entries = [e for e in os.listdir(dest) if not e.startswith(".")]
    if len(entries) == 1 and os.path.isdir(os.path.join(dest, entries[0])):
        return os.path.join(dest, entries[0])
    return dest


def parse_git_spec(value: str) -> Tuple[str, str]:
    """Split 'URL@REF' at the last '@' (URLs may contain '@', refs do not)."""
    url, sep, ref = value.rpartition("@")
    if not sep or not url or not ref:
        raise UsageError("--source: expected git:URL@REF, got %r" % ("git:" + value))
    for what, text in (("URL", url), ("ref", ref)):  # never an option of git
        if text.startswith("-") or any(c.isspace() or not c.isprintable() for c in text):
            raise UsageError("--source: bad git %s %r: starts with '-' or has whitespace" % (what, text))
    return url, ref


# --------------------------------------------------------------------------- cache entries

def publish_entry(entry: str, work: str) -> None:
    """Atomically make the cache entry symlink point at a finished work dir."""
    tmp_link = "%s.link-%d" % (entry, os.getpid())
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp_link)
    os.symlink(os.path.relpath(work, os.path.dirname(entry)), tmp_link)
    os.replace(tmp_link, entry)


def untrusted(path: str) -> Optional[str]:
    """Why this agent must not use PATH (a cache entry, or a program in it), or None: it, and every
    directory above it, must belong to this agent's user or root and be writable by no one else
    (a sticky directory such as /tmp excepted). Otherwise another user could have planted what
    this agent would run, as its user."""
    me = os.geteuid()
    current = os.path.realpath(path)
    while True:
        try:
            st = os.lstat(current)
        except OSError as exc:
            return "%s: %s" % (current, exc.strerror)
        if st.st_uid not in (me, 0):
            return "%s belongs to uid %d, not to this agent's user (uid %d) or root" % (current, st.st_uid, me)
        if st.st_mode & 0o022 and not (stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX):
            return "%s is writable by users other than its owner (mode %o)" % (current, st.st_mode & 0o7777)
        parent = os.path.dirname(current)
        if parent == current:
            return None
        current = parent


def read_entry_meta(entry: str) -> Optional[Dict]:
    """The metadata of a published cache entry, or None when absent/incomplete. An entry this
    agent must not trust (see untrusted()), or whose programs lie outside it, is refused."""
    text = read_text(os.path.join(entry, META_NAME))
    if text is None:
        return None
    try:
        meta = json.loads(text)
    except ValueError:
        return None
    if not isinstance(meta, dict):
        return None
    why = untrusted(os.path.join(entry, META_NAME))
    real = os.path.realpath(entry)
    for field in ("probe", "mock", "binary"):
        program = meta.get(field)
        if why is None and isinstance(program, str) and program:
            inside = os.path.realpath(program).startswith(real + os.sep)
            why = untrusted(program) if inside else "its %s %s lies outside the entry" % (field, program)
    if why:
        raise AgentError("refusing the cache entry %s: %s (remove it; the agent builds it again)" % (entry, why))
    return meta


def new_work_dir(area: str, key: str) -> str:
    """A fresh, uniquely named directory under AREA/.work for building KEY."""
    base = os.path.join(area, ".work")
    os.makedirs(base, exist_ok=True)
    work = tempfile.mkdtemp(prefix=key + "-", dir=base)
    os.chmod(work, 0o755)  # published builds are shared read-only with other users of the cache
    return work


@contextlib.contextmanager
def building(area: str, key: str) -> Iterator[str]:
    """Yield a work dir for KEY; remove it again unless the block succeeds."""
    work = new_work_dir(area, key)
    try:
        yield work
    except BaseException:
        progress("build failed, removing %s" % work)
        shutil.rmtree(work, ignore_errors=True)
        raise


# --------------------------------------------------------------------------- git

def git_mirror(cache: str, url: str) -> str:
    """Create or update a bare mirror of url in the cache; return its path."""
    name = sanitize(url.rstrip("/").rsplit("/", 1)[-1].replace(".git", ""))
    mirror = os.path.join(cache, "git", "%s-%s.git" % (name, hashlib.sha1(url.encode()).hexdigest()[:12]))
    os.makedirs(os.path.dirname(mirror), exist_ok=True)
    if not os.path.isdir(mirror):
        tmp = "%s.tmp-%d" % (mirror, os.getpid())
        shutil.rmtree(tmp, ignore_errors=True)
        run_streamed(["git", "clone", "--mirror", "--progress", "--", url, tmp], "git clone")
        os.replace(tmp, mirror)
    return mirror


def git_resolve(mirror: str, ref: str) -> str:
    """Fetch the mirror (best effort) and resolve ref to a full commit id."""
    def rev_parse() -> Optional[str]:
        try:
            out = run_capture(["git", "-C", mirror, "rev-parse", "--verify", "--quiet",
                               ref + "^{commit}"])
        except AgentError:
            return None
        return out.strip() or None

    if re.fullmatch(r"[0-9a-f]{40}", ref) and rev_parse():
        return ref
    try:
        run_streamed(["git", "-C", mirror, "fetch", "--prune", "--tags", "origin"], "git fetch")
    except AgentError as exc:
        progress("git fetch failed, using the mirror as it is: %s" % exc)
    commit = rev_parse()
    if not commit:
        raise AgentError("git: cannot resolve %r in %s" % (ref, mirror))
    return commit


def git_checkout(mirror: str, url: str, commit: str, dest: str) -> None:
    """Check out commit from the mirror into dest, with submodules."""
    run_streamed(["git", "clone", "--quiet", "--no-checkout", "--", mirror, dest], "git clone")
    run_capture(["git", "-C", dest, "remote", "set-url", "--", "origin", url])
    run_capture(["git", "-C", dest, "checkout", "--quiet", "--detach", commit], timeout=600)
    if os.path.exists(os.path.join(dest, ".gitmodules")):
        run_streamed(["git", "-C", dest, "submodule", "update", "--init", "--recursive"],
                     "git submodule")


# --------------------------------------------------------------------------- facts

def cpu_model() -> Optional[str]:
    """Best-effort CPU model from /proc/cpuinfo on x86, arm, ppc64 and s390x."""
    text = read_text("/proc/cpuinfo") or ""
    fields = {}  # type: Dict[str, str]
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and key not in fields:
            fields[key] = value.strip()
    for key in ("model name", "cpu", "Hardware", "Model"):
        if fields.get(key):
            return fields[key]
    match = re.search(r"machine\s*=\s*(\w+)", text)  # s390x: "processor 0: ... machine = 8561"
    if match:
        return "%s machine %s" % (fields.get("vendor_id", "s390"), match.group(1))
    if fields.get("machine"):
        return fields["machine"]
    if fields.get("CPU implementer"):
        return "implementer %s part %s" % (fields["CPU implementer"], fields.get("CPU part", "?"))
    return None


def kvm_status(path: str = "/dev/kvm") -> Dict:
    """Whether /dev/kvm exists and can be opened read/write with the expected API."""
    status = {"present": os.path.exists(path), "usable": False, "api_version": None,
              "error": None}  # type: Dict
    if not status["present"]:
        status["error"] = "%s does not exist" % path
        return status
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as exc:
        status["error"] = "cannot open %s read/write: %s" % (path, exc.strerror)
        return status
    try:
        status["api_version"] = fcntl.ioctl(fd, KVM_GET_API_VERSION, 0)
    except OSError as exc:
        status["error"] = "KVM_GET_API_VERSION failed: %s" % exc.strerror
        return status
    finally:
        os.close(fd)
    if status["api_version"] != KVM_API_VERSION:
        status["error"] = "unexpected KVM API version %s" % status["api_version"]
    else:
        status["usable"] = True
    return status


def parse_qemu_version(line: str) -> Optional[str]:
    """'QEMU emulator version 7.2.19 (Debian ...)' -> '7.2.19'."""
    match = re.search(r"version\s+(\d+\.\d+(?:\.\d+)?)", line)
    return match.group(1) if match else None


def qemu_version(path: str, cache: Optional[str] = None) -> Dict:
    """{"version", "version_line"} of a QEMU binary, from its --version.

    With a cache dir, answers are kept in it by the binary's real path, inode, size and
    mtime, so an unchanged binary is not started again (a job asks on every probe).
    """
    key = None
    known = {}  # type: Dict[str, Dict]
    if cache:
        try:
            st = os.stat(path)
            key = "%s:%d:%d:%d" % (os.path.realpath(path), st.st_ino, st.st_size, st.st_mtime_ns)
            known = json.loads(read_text(os.path.join(cache, "qemu-versions.json")) or "{}")
        except (OSError, ValueError):
            known = {}
        if key in known and isinstance(known[key], dict):
            return dict(known[key])
    try:
        out = run_capture([path, "--version"], timeout=30)
    except AgentError as exc:
        return {"version": None, "version_line": None, "error": str(exc)}
    line = (out.strip().splitlines() or [""])[0].strip()
    info = {"version": parse_qemu_version(line), "version_line": line}
    if key and info["version"]:
        entries = [(k, v) for k, v in known.items() if not k.startswith(os.path.realpath(path) + ":")]
        with contextlib.suppress(OSError):
            os.makedirs(cache, exist_ok=True)
            write_json_atomic(os.path.join(cache, "qemu-versions.json"), dict(entries[-63:] + [(key, info)]))
    return info


def qemu_candidates(cache: str, targets: Optional[List[str]] = None) -> List[Tuple[str, str]]:
    """(path, arch) of qemu-system-ARCH binaries on PATH and in the cache, plus qemu-kvm;
    with targets only those (looked up by name: no listing of /usr/bin)."""
    dirs = [d for d in os.environ.get("PATH", "").split(os.pathsep) if d]
    qemu_area = os.path.join(cache, "qemu")
    if os.path.isdir(qemu_area):
        for entry in sorted(os.listdir(qemu_area)):
            dirs.append(os.path.join(qemu_area, entry, "prefix", "bin"))
    found = []  # type: List[Tuple[str, str]]
    seen = set()
    for directory in dirs:
        if targets:
            names = ["qemu-system-" + t for t in targets]
        else:
            try:
                names = sorted(os.listdir(directory))
            except OSError:
                continue
        for name in names:
            arch = name[len("qemu-system-"):]
            # skip wrappers such as qemu-system-x86_64-microvm: their suffix is no arch
            if not name.startswith("qemu-system-") or not arch or "-" in arch:
                continue
            path = os.path.join(directory, name)
            identity = os.path.join(os.path.realpath(directory), name)  # /bin == /usr/bin
            if identity not in seen and is_executable_file(path):
                seen.add(identity)
                found.append((path, arch))
    if is_executable_file("/usr/libexec/qemu-kvm") and (not targets or os.uname().machine in targets):  # RHEL
        found.append(("/usr/libexec/qemu-kvm", os.uname().machine))
    return found


def list_probes(cache: str) -> List[Dict]:
    """The qemucapsprobe builds published in the cache."""
    area = os.path.join(cache, "libvirt")
    probes = []
    try:
        entries = sorted(os.listdir(area))
    except OSError:
        return probes
    for name in entries:
        if name.startswith(".") or name == "downloads" or name.endswith(".lock"):
            continue
        try:
            meta = read_entry_meta(os.path.join(area, name))
        except AgentError as exc:
            probes.append({"key": name, "refused": str(exc)})
            continue
        if meta and is_executable_file(meta.get("probe", "")):
            probes.append({"key": meta.get("key", name), "path": meta["probe"],
                           "libvirt_version": meta.get("libvirt_version"),
                           "source": meta.get("source"), "commit": meta.get("commit")})
    return probes


def free_disk_bytes(path: str) -> Optional[int]:
    """Free bytes for an unprivileged user on the filesystem of path (or its nearest parent)."""
    while path and not os.path.exists(path):
        path = os.path.dirname(path)
    try:
        st = os.statvfs(path or "/")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def os_pretty_name() -> Optional[str]:
    """PRETTY_NAME from /etc/os-release."""
    match = re.search(r'^PRETTY_NAME="?([^"\n]*)"?', read_text("/etc/os-release") or "", re.M)
    return match.group(1) if match else None


REACH_TIMEOUT = 3.0  # seconds per TCP connect of facts --reach


def apt_source_endpoints() -> List[str]:
    """HOST:PORT of the deb-src URIs in apt's sources (one-line and deb822 formats)."""
    texts = [read_text("/etc/apt/sources.list") or ""]
    directory = "/etc/apt/sources.list.d"
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(directory)):
            if name.endswith((".list", ".sources")):
                texts.append(read_text(os.path.join(directory, name)) or "")
    uris = []  # type: List[str]
    for text in texts:
        for line in text.splitlines():
            match = re.match(r"\s*deb-src\s+(\[[^]]*\]\s+)?(\S+)", line)
            if match:
                uris.append(match.group(2))
        for stanza in re.split(r"\n\s*\n", text):
            if re.search(r"^Types:.*\bdeb-src\b", stanza, re.M):
                match = re.search(r"^URIs:\s*(.+)$", stanza, re.M)
                if match:
                    uris += match.group(1).split()
    endpoints = []  # type: List[str]
    for uri in uris:
        match = re.match(r"(https?)://(\[[^]]+\]|[^/:]+)(?::(\d+))?", uri)
        if match:
            port = match.group(3) or ("443" if match.group(1) == "https" else "80")
            endpoint = "%s:%s" % (match.group(2).strip("[]"), port)
            if endpoint not in endpoints:
                endpoints.append(endpoint)
    return endpoints


def reach(endpoint: str, timeout: float = REACH_TIMEOUT) -> Dict:
    """Can this host open a TCP connection to HOST:PORT? Best effort, within timeout."""
    import socket

    host, sep, port = endpoint.rpartition(":")
    if not sep or not host or not port.isdigit():
        return {"endpoint": endpoint, "ok": False, "error": "not HOST:PORT"}
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return {"endpoint": endpoint, "ok": True, "error": None}
    except (OSError, ValueError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc) or type(exc).__name__
        return {"endpoint": endpoint, "ok": False, "error": reason}


def reachability(endpoints: List[str]) -> List[Dict]:
    """reach() of each endpoint; 'apt' stands for the hosts of apt's deb-src entries."""
    out = []  # type: List[Dict]
    for endpoint in endpoints:
        if endpoint == "apt":
            found = apt_source_endpoints()
            if not found:
                out.append({"endpoint": "apt", "ok": False, "error": "no deb-src entry in apt's sources"})
            out += [reach(e) for e in found]
        else:
            out.append(reach(endpoint))
    return out


def cmd_facts(args: argparse.Namespace) -> Dict:
    """Describe this host: arch, kernel, CPU, KVM, disk, QEMU binaries, cached probes, and
    (--reach) whether it can open TCP connections to where its sources come from."""
    cache = resolve_cache(args.cache)
    uname = os.uname()
    qemus = []
    for path, arch in qemu_candidates(cache, args.target):
        item = {"path": path, "arch": arch}
        item.update(qemu_version(path, cache))
        qemus.append(item)
    return {
        "ok": True,
        "agent_version": AGENT_VERSION,
        "hostname": uname.nodename,
        "arch": uname.machine,
        "kernel": uname.release,
        "os": os_pretty_name(),
        "python": "%d.%d.%d" % sys.version_info[:3],
        "user": os.getuid(),
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "kvm": kvm_status(),
        "cache_dir": cache,
        "free_disk_bytes": free_disk_bytes(cache),
        "qemu": qemus,
        "probes": list_probes(cache),
        "reach": reachability(getattr(args, "reach", None) or []),
    }


# --------------------------------------------------------------------------- toolchain libvirt

def debian_upstream_version(version: str) -> str:
    """'1:11.3.0-3+deb13u3' -> '11.3.0'."""
    version = version.split(":", 1)[-1]
    return version.rsplit("-", 1)[0] if "-" in version else version


def find_orig_tarball(directory: str, upstream: str) -> Optional[str]:
    """The libvirt_<upstream>.orig.tar.* file in directory, if any."""
    try:
        names = sorted(os.listdir(directory))
    except OSError:
        return None
    for name in names:
        if name.startswith("libvirt_%s.orig.tar." % upstream) and not name.endswith(".asc"):
            return os.path.join(directory, name)
    return None


def debian_tarball(cache: str, version: str) -> str:
    """The upstream tarball of Debian's libvirt=VERSION, downloaded with apt-get if needed.

    apt-get may fail on other files (this mirror 404s the .dsc); the run counts
    when the orig tarball is there.
    """
    upstream = debian_upstream_version(version)
    download = os.path.join(cache, "libvirt", "downloads", "debian-" + sanitize(version))
    found = find_orig_tarball(download, upstream)
    if found:
        return found
    os.makedirs(download, exist_ok=True)
    argv = ["apt-get", "source", "--download-only", "libvirt=" + version]
    try:
        run_streamed(argv, "apt-get", cwd=download)
    except AgentError as exc:
        if not find_orig_tarball(download, upstream):
            raise AgentError("cannot download libvirt=%s source: %s" % (version, exc)) from exc
        progress("apt-get reported errors, but the orig tarball is there: %s" % exc)
    found = find_orig_tarball(download, upstream)
    if not found:
        raise AgentError("apt-get source gave no libvirt_%s.orig.tar.* in %s" % (upstream, download))
    return found


def libvirt_version(src: str) -> Optional[str]:
    """The version in libvirt's top-level meson.build project() call."""
    match = re.search(r"version\s*:\s*'([^']+)'", read_text(os.path.join(src, "meson.build")) or "")
    return match.group(1) if match else None


def meson_option_names(src: str) -> set:
    """Option names declared by a meson source tree."""
    text = ""
    for name in ("meson_options.txt", "meson.options"):
        text += read_text(os.path.join(src, name)) or ""
    return set(re.findall(r"option\(\s*'([^']+)'", text))


def libvirt_meson_args(src: str) -> List[str]:
    """The -D options from LIBVIRT_MESON_OPTIONS that this libvirt tree knows."""
    known = meson_option_names(src) | MESON_BUILTIN_OPTIONS
    return ["-D%s=%s" % (name, value) for name, value in LIBVIRT_MESON_OPTIONS if name in known]


def require_program(name: str, hint: str) -> str:
    """The path of a program on PATH, or an AgentError saying how to get it."""
    path = shutil.which(name)
    if not path:
        raise AgentError("%s not found on PATH (%s)" % (name, hint))
    return path


def build_qemucapsprobe(src: str, build: str, jobs: Optional[int]) -> None:
    """meson setup + ninja for just qemucapsprobe and its mock library."""
    meson = require_program("meson", "Debian: apt-get install meson ninja-build")
    ninja = require_program("ninja", "Debian: apt-get install ninja-build")
    run_streamed([meson, "setup", build, src] + libvirt_meson_args(src), "meson")
    argv = [ninja, "-C", build]
    if jobs:
        argv += ["-j", str(jobs)]
    run_streamed(argv + [PROBE_REL, MOCK_REL], "ninja")
    for rel in (PROBE_REL, MOCK_REL):
        if not os.path.isfile(os.path.join(build, rel)):
            raise AgentError("build finished but %s is missing" % rel)


def libvirt_source_plan(args: argparse.Namespace, cache: str) -> Dict:
    """Work out key, label and how to get the source, before any build."""
    kind, sep, value = args.source.partition(":")
    if not sep or not value:
        raise UsageError("--source: expected debian:VERSION, git:URL@REF or tarball:PATH, got %r"
                         % args.source)
    if args.tarball and kind != "debian":
        raise UsageError("--tarball: only valid with --source debian:VERSION")
    if kind == "debian":
        if not re.fullmatch(r"[0-9A-Za-z.+~:-]+", value):
            raise UsageError("--source: bad Debian version %r" % value)
        if args.tarball and not os.path.isfile(args.tarball):
            raise UsageError("--tarball: no such file: %s" % args.tarball)
        return {"kind": kind, "key": "debian-" + sanitize(value), "version": value,
                "commit": None, "tarball": args.tarball and os.path.abspath(args.tarball)}
    if kind == "tarball":
        if not os.path.isfile(value):
            raise UsageError("--source: no such tarball: %s" % value)
        path = os.path.abspath(value)
        return {"kind": kind, "key": "tarball-" + sha256_file(path)[:16], "commit": None,
                "tarball": path}
    if kind == "git":
        url, ref = parse_git_spec(value)
        mirror = git_mirror(cache, url)
        commit = git_resolve(mirror, ref)
        return {"kind": kind, "key": "git-" + commit, "commit": commit, "url": url,
                "mirror": mirror, "ref": ref}
    raise UsageError("--source: unknown kind %r (debian, git, tarball)" % kind)


def fetch_libvirt_source(plan: Dict, cache: str, work: str) -> str:
    """Put the libvirt source for plan into work/src; return that path."""
    src = os.path.join(work, "src")
    if plan["kind"] == "git":
        git_checkout(plan["mirror"], plan["url"], plan["commit"], src)
        return src
    tarball = plan.get("tarball") or debian_tarball(cache, plan["version"])
    top = extract_tarball(tarball, os.path.join(work, "extract"))
    os.rename(top, src)
    shutil.rmtree(os.path.join(work, "extract"), ignore_errors=True)
    return src


def entry_result(meta: Dict, source: str, cached: bool, seconds: float) -> Dict:
    """The toolchain libvirt answer for a cache entry's metadata.

    "source" is the one asked for; "built_from" the one recorded at build time (for git
    they may differ in URL or ref while naming the same commit).
    """
    result = {"ok": True, "cached": cached, "seconds": round(seconds, 3), "source": source,
              "built_from": meta.get("source")}
    for key in ("probe", "mock", "build_dir", "libvirt_version", "commit", "key"):
        result[key] = meta.get(key)
    return result


def builddir_result(path: str, source: str) -> Dict:
    """An existing libvirt build directory on the host (nothing is built)."""
    probe = os.path.join(os.path.abspath(path), PROBE_REL)
    if not is_executable_file(probe):
        raise UsageError("--source: no executable %s in the build directory %s" % (PROBE_REL, path))
    version, commit = None, None
    info = read_text(os.path.join(path, "meson-info", "intro-projectinfo.json"))
    if info:
        with contextlib.suppress(ValueError):
            version = json.loads(info).get("version")
    return {"ok": True, "cached": True, "seconds": 0.0, "source": source, "built_from": source,
            "probe": probe, "mock": os.path.join(os.path.abspath(path), MOCK_REL),
            "build_dir": os.path.abspath(path), "libvirt_version": version, "commit": commit,
            "key": "builddir"}


def cmd_toolchain_libvirt(args: argparse.Namespace) -> Dict:
    """Prepare (or find cached) a qemucapsprobe build for the given libvirt source."""
    started = time.monotonic()
    if args.source.startswith("builddir:"):
        return builddir_result(args.source[len("builddir:"):], args.source)
    cache = resolve_cache(args.cache)
    plan = libvirt_source_plan(args, cache)
    area = os.path.join(cache, "libvirt")
    entry = os.path.join(area, plan["key"])
    meta = read_entry_meta(entry)  # a published build needs no lock (nor write access)
    if meta and is_executable_file(meta.get("probe", "")):
        return entry_result(meta, args.source, True, time.monotonic() - started)
    with file_lock(entry + ".lock"):
        meta = read_entry_meta(entry)
        if meta and is_executable_file(meta.get("probe", "")):
            return entry_result(meta, args.source, True, time.monotonic() - started)
        with building(area, plan["key"]) as work:
            src = fetch_libvirt_source(plan, cache, work)
            build = os.path.join(work, "build")
            build_qemucapsprobe(src, build, args.jobs)
            commit = plan["commit"]
            if plan["kind"] == "git":
                commit = run_capture(["git", "-C", src, "rev-parse", "HEAD"]).strip()
            meta = {"key": plan["key"], "source": args.source, "commit": commit,
                    "libvirt_version": libvirt_version(src), "src_dir": src, "build_dir": build,
                    "probe": os.path.join(build, PROBE_REL), "mock": os.path.join(build, MOCK_REL),
                    "meson_options": libvirt_meson_args(src),
                    "build_seconds": round(time.monotonic() - started, 3),
                    "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            write_json_atomic(os.path.join(work, META_NAME), meta)
            publish_entry(entry, work)
    progress("published %s" % entry)
    return entry_result(meta, args.source, False, time.monotonic() - started)


# --------------------------------------------------------------------------- toolchain qemu

def qemu_target(arch: str) -> str:
    """Normalise and validate a --target ARCH (host names such as ppc64le accepted)."""
    target = QEMU_TARGET_ALIASES.get(arch, arch)
    if not re.fullmatch(r"[a-z0-9_]+", target or ""):
        raise UsageError("--target: bad arch %r" % arch)
    return target


def cmd_toolchain_qemu_binary(path: str, cache: Optional[str] = None) -> Dict:
    """Validate an existing QEMU binary and report its version."""
    if not is_executable_file(path):
        raise UsageError("--binary: not an executable file: %s" % path)
    info = qemu_version(path, cache)
    if not info.get("version"):
        raise AgentError("%s --version gave no QEMU version: %s"
                         % (path, info.get("error") or info.get("version_line")))
    name = os.path.basename(path)
    arch = name[len("qemu-system-"):] if name.startswith("qemu-system-") else os.uname().machine
    result = {"ok": True, "binary": os.path.abspath(path), "path": os.path.abspath(path),
              "arch": arch, "cached": True, "seconds": 0.0}
    result.update(info)
    return result


def qemu_source_plan(args: argparse.Namespace, cache: str, target: str) -> Dict:
    """Key and source location for toolchain qemu --source."""
    kind, sep, value = args.source.partition(":")
    if kind == "tarball" and sep and value:
        if not os.path.isfile(value):
            raise UsageError("--source: no such tarball: %s" % value)
        path = os.path.abspath(value)
        return {"kind": kind, "tarball": path, "commit": None,
                "key": "tarball-%s-%s" % (sha256_file(path)[:16], target)}
    if kind == "git" and sep and value:
        url, ref = parse_git_spec(value)
        mirror = git_mirror(cache, url)
        commit = git_resolve(mirror, ref)
        return {"kind": kind, "url": url, "mirror": mirror, "commit": commit,
                "key": "git-%s-%s" % (commit, target)}
    raise UsageError("--source: expected tarball:PATH or git:URL@REF, got %r" % args.source)


def qemu_supported_flags(src: str) -> List[str]:
    """The QEMU_OPTIONAL_FLAGS that this QEMU tree's configure knows."""
    text = (read_text(os.path.join(src, "configure")) or "") + \
        (read_text(os.path.join(src, "scripts", "meson-buildoptions.sh")) or "")
    return [flag for flag in QEMU_OPTIONAL_FLAGS if flag in text]


def qemu_blob_placeholders(src: str) -> List[str]:
    """Create pc-bios/edk2-*.fd.bz2 placeholders (compressed empty files) that a '+ds' tarball
    lacks; return their names."""
    created = []
    pcbios = os.path.join(src, "pc-bios")
    for name in sorted(set(re.findall(r"'(edk2-[\w.-]+\.fd)'",
                                      read_text(os.path.join(pcbios, "meson.build")) or ""))):
        path = os.path.join(pcbios, name + ".bz2")
        if not os.path.exists(path):
            with open(path, "wb") as handle:  # a valid bzip2 stream of nothing: the build unpacks it
                handle.write(bz2.compress(b""))
            created.append(name + ".bz2")
    return created


def qemu_python(cache: str, src: str, python: Optional[str]) -> Optional[str]:
    """The --python for configure: given, or a cached venv with meson when the tree bundles none."""
    if python:
        return python
    wheels = os.path.join(src, "python", "wheels")
    if os.path.isdir(wheels) and any(n.startswith("meson-") for n in os.listdir(wheels)):
        return None
    venv = os.path.join(cache, "qemu", ".venv-" + sanitize("-".join(QEMU_VENV_PACKAGES)))
    venv_python = os.path.join(venv, "bin", "python3")
    stamp = os.path.join(venv, ".complete")
    with file_lock(venv + ".lock"):
        if not os.path.exists(stamp):
            shutil.rmtree(venv, ignore_errors=True)
            run_streamed([sys.executable, "-m", "venv", venv], "venv")
            run_streamed([venv_python, "-m", "pip", "install", "--quiet"] + QEMU_VENV_PACKAGES,
                         "pip")
            open(stamp, "w").close()
    return venv_python


def build_qemu(src: str, build: str, prefix: str, target: str, python: Optional[str],
               extra: List[str], jobs: Optional[int]) -> None:
    """configure, ninja and install one QEMU system emulator into prefix."""
    ninja = require_program("ninja", "Debian: apt-get install ninja-build")
    os.makedirs(build)
    argv = [os.path.join(src, "configure"), "--prefix=" + prefix,
            "--target-list=%s-softmmu" % target] + qemu_supported_flags(src)
    if python:
        argv.append("--python=" + python)
    run_streamed(argv + list(extra), "configure", cwd=build)
    jobs_args = ["-j", str(jobs)] if jobs else []
    run_streamed([ninja, "-C", build] + jobs_args, "ninja")
    run_streamed([ninja, "-C", build, "install"], "ninja install")


def cmd_toolchain_qemu(args: argparse.Namespace) -> Dict:
    """Validate a QEMU binary (--binary) or build one from source into the cache."""
    if args.binary and args.source:
        raise UsageError("--binary and --source are mutually exclusive")
    if args.binary:
        return cmd_toolchain_qemu_binary(args.binary)
    if not args.source:
        raise UsageError("--source or --binary is required")
    if not args.target:
        raise UsageError("--target: required with --source")
    started = time.monotonic()
    target = qemu_target(args.target)
    cache = resolve_cache(args.cache)
    plan = qemu_source_plan(args, cache, target)
    area = os.path.join(cache, "qemu")
    entry = os.path.join(area, plan["key"])
    binary_rel = os.path.join("prefix", "bin", "qemu-system-" + target)
    with file_lock(entry + ".lock"):
        meta = read_entry_meta(entry)
        cached = bool(meta and is_executable_file(meta.get("binary", "")))
        if not cached:
            with building(area, plan["key"]) as work:
                src = os.path.join(work, "src")
                if plan["kind"] == "git":
                    git_checkout(plan["mirror"], plan["url"], plan["commit"], src)
                else:
                    os.rename(extract_tarball(plan["tarball"], os.path.join(work, "extract")), src)
                placeholders = qemu_blob_placeholders(src)
                python = qemu_python(cache, src, args.python)
                build_qemu(src, os.path.join(work, "build"), os.path.join(work, "prefix"),
                           target, python, args.configure_arg or [], args.jobs)
                meta = {"key": plan["key"], "source": args.source, "commit": plan["commit"],
                        "target": target, "binary": os.path.join(work, binary_rel),
                        "prefix": os.path.join(work, "prefix"),
                        "blob_placeholders": placeholders,
                        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                if not is_executable_file(meta["binary"]):
                    raise AgentError("QEMU install finished but %s is missing" % meta["binary"])
                write_json_atomic(os.path.join(work, META_NAME), meta)
                publish_entry(entry, work)
    assert meta is not None
    result = {"ok": True, "cached": cached, "seconds": round(time.monotonic() - started, 3),
              "path": meta["binary"], "arch": target}
    for key in ("binary", "prefix", "commit", "source", "key"):
        result[key] = meta.get(key)
    result.update(qemu_version(meta["binary"], cache))
    return result


def cmd_toolchain(args: argparse.Namespace) -> Dict:
    """Dispatch toolchain libvirt|qemu."""
    if args.what == "libvirt":
        return cmd_toolchain_libvirt(args)
    return cmd_toolchain_qemu(args)


# --------------------------------------------------------------------------- probe

SUBREAPER = [False]  # are we the subreaper of what we start (set_child_subreaper)


def set_child_subreaper() -> bool:
    """Make orphaned descendants (e.g. a daemonized QEMU) our children (Linux >= 3.4)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        SUBREAPER[0] = libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        SUBREAPER[0] = False
    return SUBREAPER[0]


def proc_stat(pid: int) -> Optional[Tuple[str, int, int]]:
    """(state, ppid, pgrp) of a live process, or None if it is gone."""
    text = read_text("/proc/%d/stat" % pid)
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()
    return fields[0], int(fields[1]), int(fields[2])


def descendants() -> Optional[List[int]]:
    """Our descendants (zombies too), from /proc/PID/task/TID/children; None when the kernel
    does not list children (CONFIG_PROC_CHILDREN)."""
    found = []  # type: List[int]
    todo = [os.getpid()]
    while todo:
        pid = todo.pop()
        try:
            tids = os.listdir("/proc/%d/task" % pid)
        except OSError:
            continue
        for tid in tids:
            text = read_text("/proc/%d/task/%s/children" % (pid, tid))
            if text is None:
                if pid == os.getpid():
                    return None
                continue
            children = [int(child) for child in text.split()]
            found += children
            todo += children
    return found


def candidate_pids() -> List[int]:
    """Where the probe's processes can be: our descendants when we are their subreaper (a
    daemonized QEMU is adopted by us, not by init), else every process of the host."""
    if SUBREAPER[0]:
        pids = descendants()
        if pids is not None:
            return pids
    return [int(name) for name in os.listdir("/proc") if name.isdigit()]


def related_pids(pgid: int) -> List[int]:
    """Live (non-zombie) processes in process group pgid or reparented to us."""
    me = os.getpid()
    found = []
    for pid in candidate_pids():
        if pid == me:
            continue
        stat = proc_stat(pid)
        if stat and stat[0] != "Z" and (stat[2] == pgid or stat[1] == me):
            found.append(pid)
    return sorted(found)


def reap_adopted(exclude: int = 0) -> None:
    """Reap zombie children (including orphans adopted as subreaper), except pid exclude.

    The excluded pid is the Popen child, whose status Popen itself collects.
    """
    me = os.getpid()
    for pid in candidate_pids():
        if pid != exclude:
            stat = proc_stat(pid)
            if stat and stat[0] == "Z" and stat[1] == me:
                with contextlib.suppress(ChildProcessError):
                    os.waitpid(pid, os.WNOHANG)


def wait_reaping(proc: "subprocess.Popen", deadline: float) -> Optional[int]:
    """Wait for proc until the monotonic deadline, reaping adopted orphans meanwhile.

    As subreaper we inherit the daemonized QEMU; libvirt kills it at the end and
    polls until the pid is gone, so its zombie must be reaped promptly. The wait
    sleeps until a child changes state (SIGCHLD), so it costs nothing while the
    probe works. Returns the exit status, or None on timeout.
    """
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGCHLD})
    try:
        while True:
            status = proc.poll()
            if status is not None:
                return status
            reap_children(exclude=proc.pid)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            signal.sigtimedwait([signal.SIGCHLD], min(remaining, 1.0))
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def reap_children(exclude: int) -> None:
    """Reap every exited child (adopted orphans too) but ``exclude``, which Popen collects."""
    while True:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None or info.si_pid == exclude:
            return
        with contextlib.suppress(ChildProcessError):
            os.waitpid(info.si_pid, 0)


def signal_pids(pids: List[int], pgid: int, sig: int) -> None:
    """Send sig to the process group and to each pid, ignoring ones already gone."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def kill_tree(pgid: int, grace: float = 3.0) -> List[int]:
    """SIGTERM, then SIGKILL, the process group and adopted orphans; return pids still alive."""
    killed = related_pids(pgid)
    if not killed:
        return []
    progress("stopping processes %s" % killed)
    signal_pids(killed, pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        reap_adopted(exclude=pgid)
        if not related_pids(pgid):
            return []
        time.sleep(0.1)
    remaining = related_pids(pgid)
    signal_pids(remaining, pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and related_pids(pgid):
        reap_adopted(exclude=pgid)
        time.sleep(0.1)
    reap_adopted(exclude=pgid)
    return related_pids(pgid)


def tail_lines(path: str, count: int = STDERR_TAIL_LINES) -> List[str]:
    """The last count lines of a (possibly large) text file."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            handle.seek(max(0, handle.tell() - 65536))
            data = handle.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()[-count:]


def validate_probe_args(args: argparse.Namespace) -> None:
    """Usage checks for probe: raise UsageError naming the bad argument."""
    if not is_executable_file(args.probe):
        raise UsageError("--probe: not an executable file: %s" % args.probe)
    if not os.path.isfile(args.qemu):
        raise UsageError("--qemu: no such file: %s" % args.qemu)
    if args.timeout <= 0:
        raise UsageError("--timeout: must be positive, got %s" % args.timeout)
    out_dir = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(out_dir):
        raise UsageError("--out: directory does not exist: %s" % out_dir)
    if os.path.lexists(args.out) and not args.force:
        raise UsageError("--out: %s exists; refusing to overwrite it (use --force)" % args.out)


def place_output(tmp: str, out: str, force: bool) -> None:
    """Move the finished dump into place without ever overwriting out unless force."""
    if force:
        os.replace(tmp, out)
        return
    try:
        os.link(tmp, out)  # fails if out appeared meanwhile
    except FileExistsError:
        raise AgentError("--out: %s appeared while probing; not overwritten" % out) from None
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if os.path.lexists(out):
            raise AgentError("--out: %s appeared while probing; not overwritten" % out) from None
        os.rename(tmp, out)
        return
    os.unlink(tmp)


def raise_terminated(signum: int, _frame: object) -> None:
    """Signal handler: turn SIGTERM/SIGHUP into an exception so cleanup runs."""
    raise Terminated("agent received signal %d" % signum)


def run_contained(argv: List[str], cwd: str, stdout: str, stderr: str,
                  timeout: float) -> Tuple[Optional[int], bool, List[int]]:
    """Run argv in its own session with a timeout; nothing it started may outlive it.

    Returns (exit status, timed out, pids that could not be killed).
    """
    with open(stdout, "wb") as out, open(stderr, "wb") as err:
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err,
                                start_new_session=True)
    status = None
    try:
        status = wait_reaping(proc, time.monotonic() + timeout)
    finally:  # also on Terminated: stop the group and the adopted orphans
        leftover = kill_tree(proc.pid)
        if proc.poll() is None:
            proc.kill()
        exit_status = proc.wait()
    return exit_status, status is None, leftover


def cmd_probe(args: argparse.Namespace) -> Dict:
    """Run qemucapsprobe QEMU > FILE atomically, with a timeout that leaves no process behind."""
    validate_probe_args(args)
    out = os.path.abspath(args.out)
    argv = [os.path.abspath(args.probe), os.path.abspath(args.qemu)]
    subreaper = set_child_subreaper()
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_terminated)
    tmp_out = os.path.join(os.path.dirname(out), ".%s.tmp-%s" % (os.path.basename(out),
                                                                 uuid.uuid4().hex[:8]))
    workdir = tempfile.mkdtemp(prefix="farm-probe-")
    err_path = os.path.join(workdir, "stderr")
    progress("probe: %s %s" % tuple(argv))
    started = time.monotonic()
    try:
        exit_status, timed_out, leftover = run_contained(argv, workdir, tmp_out, err_path,
                                                         args.timeout)
        stderr_tail = tail_lines(err_path)
        size = os.path.getsize(tmp_out)
        error = None
        if timed_out:
            error = "probe timed out after %ss" % args.timeout
        elif exit_status != 0:
            error = "probe exited with status %s" % exit_status
        elif size == 0:
            error = "probe exited 0 but produced no output"
        elif leftover:
            error = "processes survived the probe: %s" % leftover
        sha256 = None
        if error is None:
            sha256 = sha256_file(tmp_out)
            place_output(tmp_out, out, args.force)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_out)
    result = {"ok": error is None, "out": out, "sha256": sha256, "size": size if sha256 else 0,
              "seconds": round(time.monotonic() - started, 3), "exit_status": exit_status,
              "timed_out": timed_out, "stderr_tail": stderr_tail, "leftover_pids": leftover,
              "subreaper": subreaper, "probe": argv[0], "qemu": argv[1]}
    if error:
        result["error"] = error
    return result


# --------------------------------------------------------------------------- job

def cmd_job(args: argparse.Namespace) -> Dict:
    """facts + toolchain libvirt + toolchain qemu + probe, in one call (one start-up per job).

    Stops before building anything when the host is not of --expect-arch.
    """
    ns = argparse.Namespace
    facts = cmd_facts(ns(cache=args.cache, target=[args.target]))
    if args.expect_arch and QEMU_TARGET_ALIASES.get(facts["arch"], facts["arch"]) != qemu_target(args.expect_arch):
        return {"ok": False, "error": "this host is %s, not %s" % (facts["arch"], args.expect_arch), "facts": facts}
    libvirt = cmd_toolchain_libvirt(ns(source=args.libvirt, tarball=None, cache=args.cache, jobs=None))
    if args.qemu_source:
        qemu = cmd_toolchain_qemu(ns(binary=None, source=args.qemu_source, target=args.target, cache=args.cache,
                                     python=None, configure_arg=None, jobs=None))
    elif args.qemu_binary:
        qemu = cmd_toolchain_qemu_binary(args.qemu_binary, resolve_cache(args.cache))
    else:
        found = [q for q in facts["qemu"] if q.get("arch") == qemu_target(args.target) and q.get("version")]
        if not found:
            raise AgentError("no working qemu-system-%s on PATH" % qemu_target(args.target))
        qemu = dict(found[0], ok=True)
    inline = args.out == "-"
    workdir = tempfile.mkdtemp(prefix="farm-job-") if inline else None
    out = os.path.join(workdir, "dump.replies") if workdir else args.out
    try:
        probe = cmd_probe(ns(probe=libvirt["probe"], qemu=qemu["path"], out=out, timeout=args.timeout, force=False))
        result = {"ok": probe["ok"], "facts": facts, "libvirt": libvirt, "qemu": qemu, "probe": probe}
        if inline:
            probe["out"] = "-"
            if probe["ok"]:
                with open(out, "rb") as handle:
                    result["dump"] = base64.b64encode(zlib.compress(handle.read(), 1)).decode("ascii")
    finally:
        if workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    if not probe["ok"]:
        result["error"] = probe.get("error")
    return result


# --------------------------------------------------------------------------- serve

def serve() -> int:
    """Answer requests until stdin closes: the agent started once per connection, not per call.

    In (stdin), one JSON object per line: {"id": N, "argv": [SUBCOMMAND, ...]} runs that
    subcommand in a forked copy of this process (no interpreter start-up, nothing imported
    again), several at once; {"id": N, "cancel": true} stops request N (SIGTERM, then SIGKILL).
    Out (stdout), one JSON object per line: first {"serve": VERSION, "pid": PID}; then per
    request {"id": N, "line": L} for each stderr line of it, and at its end
    {"id": N, "exit": CODE, "stdout": TEXT}: what running the subcommand alone would give.
    When stdin closes (the coordinator went away) running requests are stopped.
    """
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, raise_terminated)
    selector = selectors.DefaultSelector()
    selector.register(0, selectors.EVENT_READ)
    running = {}  # type: Dict[int, Dict]
    broken = [False]

    def send(obj: Dict) -> None:
        if broken[0]:
            return
        data = (json.dumps(obj, sort_keys=True) + "\n").encode()
        try:
            while data:
                data = data[os.write(1, data):]
        except OSError:  # the coordinator is gone: keep stopping what runs, say nothing
            broken[0] = True

    def start(request_id: int, argv: List[str]) -> None:
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the request: this process, as if started with argv
            code = 1
            try:
                for sig in (signal.SIGTERM, signal.SIGHUP):
                    signal.signal(sig, signal.SIG_DFL)
                null = os.open(os.devnull, os.O_RDONLY)
                os.dup2(null, 0)
                os.dup2(out_w, 1)
                os.dup2(err_w, 2)
                others = [k.fd for k in selector.get_map().values() if k.fd > 2]  # other requests' pipes
                selector.close()
                for fd in [null, out_r, out_w, err_r, err_w] + others:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                code = main(argv)
            except SystemExit as exc:
                code = exc.code if isinstance(exc.code, int) else 1
            except BaseException as exc:  # noqa: B036 - whatever happens, report it and exit
                with contextlib.suppress(Exception):
                    emit({"ok": False, "error": "agent: %s: %s" % (type(exc).__name__, exc)})
            finally:
                with contextlib.suppress(Exception):
                    sys.stdout.flush()
                    sys.stderr.flush()
                os._exit(code)
        os.close(out_w)
        os.close(err_w)
        request = {"pid": pid, "out": bytearray(), "err": b"", "open": 2, "kill_at": None}
        running[request_id] = request
        selector.register(out_r, selectors.EVENT_READ, (request_id, "out"))
        selector.register(err_r, selectors.EVENT_READ, (request_id, "err"))

    def stop(request_id: int) -> None:
        request = running.get(request_id)
        if request and request["kill_at"] is None:
            with contextlib.suppress(OSError):
                os.kill(request["pid"], signal.SIGTERM)  # the probe's own clean-up kills its QEMU
            request["kill_at"] = time.monotonic() + 5

    def finish(request_id: int) -> None:
        request = running.pop(request_id)
        _, status = os.waitpid(request["pid"], 0)
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
        if request["err"]:
            send({"id": request_id, "line": request["err"].decode(errors="replace")})
        send({"id": request_id, "exit": code, "stdout": request["out"].decode(errors="replace")})

    def handle(line: bytes) -> None:
        try:
            message = json.loads(line)
            request_id = int(message["id"])
        except (ValueError, KeyError, TypeError):
            send({"error": "bad request: %r" % line[:200]})
            return
        if message.get("cancel"):
            stop(request_id)
        elif request_id in running:
            send({"id": request_id, "exit": 2, "stdout": json.dumps({"ok": False, "error": "request id in use"})})
        elif not isinstance(message.get("argv"), list) or message["argv"][:1] == ["serve"]:
            send({"id": request_id, "exit": 2, "stdout": json.dumps({"ok": False, "error": "bad argv"})})
        else:
            start(request_id, [str(a) for a in message["argv"]])

    parser()  # built here once, not in every request
    send({"serve": AGENT_VERSION, "pid": os.getpid()})
    pending = b""
    stdin_open = True
    try:
        while stdin_open or running:
            for key, _ in selector.select(timeout=1.0):
                chunk = os.read(key.fd, 65536)
                if key.data is None:  # stdin
                    if not chunk:
                        stdin_open = False
                        selector.unregister(0)
                        for request_id in list(running):
                            stop(request_id)
                        continue
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            handle(line)
                    continue
                request_id, stream = key.data
                request = running[request_id]
                if not chunk:
                    selector.unregister(key.fd)
                    os.close(key.fd)
                    request["open"] -= 1
                    if not request["open"]:
                        finish(request_id)
                elif stream == "out":
                    request["out"] += chunk
                else:
                    *lines, request["err"] = (request["err"] + chunk).split(b"\n")
                    for line in lines:
                        send({"id": request_id, "line": line.decode(errors="replace")})
            now = time.monotonic()
            for request in running.values():
                if request["kill_at"] is not None and now > request["kill_at"]:
                    with contextlib.suppress(OSError):
                        os.kill(request["pid"], signal.SIGKILL)
    except Terminated:
        for request in running.values():
            with contextlib.suppress(OSError):
                os.kill(request["pid"], signal.SIGTERM)
        return 1
    return 0


# --------------------------------------------------------------------------- CLI

class JsonArgumentParser(argparse.ArgumentParser):
    """argparse that reports usage errors as one JSON object and exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.print_usage(sys.stderr)
        emit({"ok": False, "error": "%s: %s" % (self.prog, message)})
        sys.exit(2)


def positive(kind: type, what: str):
    """argparse type: a number of ``kind`` > 0 (``what`` names it in errors)."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError("not %s: %r" % (what, text)) from None
        if value <= 0:
            raise argparse.ArgumentTypeError("must be positive: %r" % text)
        return value
    return parse


positive_float = positive(float, "a number")
positive_int = positive(int, "an integer")


def build_parser() -> argparse.ArgumentParser:
    """The command-line interface."""
    parser = JsonArgumentParser(prog="farm_agent", description="farm probe-host agent")
    parser.add_argument("--version", action="version", version=AGENT_VERSION)
    sub = parser.add_subparsers(dest="command", parser_class=JsonArgumentParser)
    sub.required = True

    facts = sub.add_parser("facts", help="describe this host")
    facts.add_argument("--cache", help="cache dir (default $FARM_AGENT_CACHE or ~/.cache/farm-agent)")
    facts.add_argument("--target", action="append",
                       help="only report qemu-system-TARGET binaries (repeatable; default: all)")
    facts.add_argument("--reach", action="append", metavar="HOST:PORT",
                       help="try a TCP connection there (repeatable; 'apt': the hosts of apt's deb-src entries)")

    toolchain = sub.add_parser("toolchain", help="prepare qemucapsprobe or QEMU")
    what = toolchain.add_subparsers(dest="what", parser_class=JsonArgumentParser)
    what.required = True
    libvirt = what.add_parser("libvirt", help="build libvirt's tests/qemucapsprobe")
    libvirt.add_argument("--source", required=True,
                         help="debian:VERSION, git:URL@REF or tarball:PATH")
    libvirt.add_argument("--tarball", help="with debian:VERSION: use this orig tarball")
    libvirt.add_argument("--cache")
    libvirt.add_argument("--jobs", type=positive_int)
    qemu = what.add_parser("qemu", help="validate or build a QEMU binary")
    qemu.add_argument("--binary", help="an existing qemu-system-ARCH to validate")
    qemu.add_argument("--source", help="tarball:PATH or git:URL@REF")
    qemu.add_argument("--target", help="guest arch, e.g. x86_64 (builds ARCH-softmmu)")
    qemu.add_argument("--python", help="python for configure (default: a venv with meson)")
    qemu.add_argument("--configure-arg", action="append", help="extra configure argument")
    qemu.add_argument("--cache")
    qemu.add_argument("--jobs", type=positive_int)

    probe = sub.add_parser("probe", help="run qemucapsprobe against a QEMU binary")
    probe.add_argument("--probe", required=True, help="path of tests/qemucapsprobe")
    probe.add_argument("--qemu", required=True, help="path of the QEMU binary")
    probe.add_argument("--out", required=True, help="where to write the .replies dump")
    probe.add_argument("--timeout", type=positive_float, default=600.0, help="seconds (600)")
    probe.add_argument("--force", action="store_true", help="overwrite an existing --out")

    job = sub.add_parser("job", help="facts, toolchain and probe in one call")
    job.add_argument("--libvirt", required=True, help="libvirt source, as toolchain libvirt --source")
    job.add_argument("--target", required=True, help="guest arch of the QEMU, e.g. x86_64")
    job.add_argument("--qemu-binary", help="this qemu-system binary (default: qemu-system-TARGET on PATH)")
    job.add_argument("--qemu-source", help="build QEMU from tarball:PATH or git:URL@REF")
    job.add_argument("--out", required=True, help="where to write the .replies dump; - puts it in the reply")
    job.add_argument("--timeout", type=positive_float, default=600.0, help="probe seconds (600)")
    job.add_argument("--expect-arch", help="refuse to work unless this host is of this arch")
    job.add_argument("--cache")

    sub.add_parser("serve", help="answer requests on stdin until it closes (one start-up per connection)")
    return parser


_PARSER = []  # type: List[argparse.ArgumentParser]


def parser() -> argparse.ArgumentParser:
    """The command-line interface, built once (serve's forked requests inherit it)."""
    if not _PARSER:
        _PARSER.append(build_parser())
    return _PARSER[0]


def emit(obj: Dict) -> None:
    """Print the one JSON object of this run on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=True) + "\n")
    sys.stdout.flush()


COMMANDS = {"facts": cmd_facts, "toolchain": cmd_toolchain, "probe": cmd_probe, "job": cmd_job}


def main(argv: Optional[List[str]] = None) -> int:
    """Parse, run one subcommand, print its JSON; return the exit code."""
    args = parser().parse_args(argv)
    if args.command == "serve":
        return serve()
    try:
        result = COMMANDS[args.command](args)
        emit(result)
        return 0 if result.get("ok") else 1
    except UsageError as exc:
        emit({"ok": False, "error": str(exc)})
        sys.stderr.write("farm_agent: %s\n" % exc)
        return 2
    except (AgentError, Terminated, OSError) as exc:
        emit({"ok": False, "error": str(exc)})
        return 1
    except KeyboardInterrupt:
        emit({"ok": False, "error": "interrupted"})
        return 1


if __name__ == "__main__":
    sys.exit(main())
