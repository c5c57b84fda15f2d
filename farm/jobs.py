"""One job: probe one QEMU release (or a git ref of QEMU, filed under a release) for one arch
(and variant) on one host.

``run_job`` is the only place a probe happens (one host); ``execute`` tries a
job over hosts and calls it: the embedded dispatcher calls ``execute`` from
threads, a Celery worker calls the same function. A job never ends in silent
success: every job ends with a status and the reasons for it.

Statuses: ``ok`` (a real dump, or a fake of an arch libvirt keeps fake),
``fake`` (TCG only where libvirt expects real hardware), ``invalid`` (the dump
does not validate), ``wrong-version`` (QEMU is not the release asked for),
``failed`` (host, toolchain or probe failure: no dump), ``timeout``.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import multiprocessing
import os
import platform
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from farm import __version__
from farm.caps import dump
from farm.caps.arch import Architecture
from farm.caps.inspect import Inspection, Verdict, inspect, unreadable
from farm.caps.names import DumpName, column
from farm.caps.version import QemuVersion
from farm.errors import OperationalError
from farm.hosts import Cancellation, Cancelled, HostConfigError, HostError, transport_for
from farm.hosts.agent import Agent, AgentError
from farm.ledger import RETRYABLE, JobRecord, Ledger

PROBE_TIMEOUT = 600.0



@dataclass(frozen=True)
class Job:
    run: int
    qemu: str  # the release asked for, X.Y.Z
    arch: str
    variant: str | None = None
    probe_timeout: float = PROBE_TIMEOUT
    targeted: bool = False  # only the hosts planned for it, by their own queues
    qemu_ref: str | None = None  # a git ref or commit of QEMU to build instead of the tag vQEMU

    @property
    def id(self) -> str:
        return f"run-{self.run}-{column(self.arch, self.variant)}"

    @property
    def name(self) -> DumpName:
        """The name libvirt gives this job's dump (a release X.Y.Z is filed under X.Y.0)."""
        version = QemuVersion.parse(self.qemu)
        return DumpName(QemuVersion(version.major, version.minor), Architecture.parse(self.arch), self.variant)

    def wants(self, actual: QemuVersion) -> bool:
        """Is a QEMU reporting ``actual`` the one asked for? X.Y.0 asks for any X.Y.z; X.Y.Z for exactly it."""
        asked = QemuVersion.parse(self.qemu)
        return actual == asked if asked.micro else asked in actual.release_names()


class _Ended(Exception):
    """A job step decided how the job ends."""

    def __init__(self, status: str, *reasons: str):
        super().__init__(status)
        self.status = status
        self.reasons = list(reasons)


class Attempt(NamedTuple):
    """One host's try at a job: what it says of the host's health."""

    host: str
    status: str
    reason: str  # the first reason
    misconfigured: bool = False  # failed on the host's configuration (HostConfigError), not an outage


@dataclass
class Outcome:
    """What one job produced: how it ended and, if a probe ran, the dump and its libvirt name."""

    record: JobRecord
    dump: str | None = None
    name: str | None = None
    attempts: list[Attempt] = field(default_factory=list)
    config_error: bool = False  # this attempt failed on a HostConfigError


class HostSlots:
    """Job slots of hosts (``max_jobs`` each): a job takes a free slot on any of its
    candidate hosts, the least busy first, or waits in line; a slot given back goes straight
    to the first job in line that can use that host (only that job is woken)."""

    def __init__(self, hosts: list, leases: Path | None = None):
        self.leases = leases  # a directory of lock files: slots held across the processes sharing it
        self._free = {h.name: h.max_jobs for h in hosts}
        self._size = dict(self._free)
        self._lock = threading.Lock()
        self._line: list[tuple[dict, threading.Event, list]] = []  # (candidates by name, woken, [host])

    @property
    def size(self) -> int:
        """How many jobs may run at once on all hosts (the slots, free or taken)."""
        return sum(self._size.values())

    def add(self, hosts: list) -> None:
        with self._lock:
            for h in hosts:
                self._free.setdefault(h.name, h.max_jobs)
                self._size.setdefault(h.name, h.max_jobs)

    @contextlib.contextmanager
    def take(self, hosts: list, cancel: Cancellation | None = None) -> Iterator[tuple]:
        """(a host of ``hosts`` with its slot held, a function giving the slot back early);
        (None, ...) if ``hosts`` is empty. The slot is given back at the latest at the end.
        A job cancelled while it waits in line leaves the line (``Cancelled``)."""
        if not hosts:
            yield None, lambda: None
            return
        with self._lock:
            free = [h for h in hosts if self._free[h.name] > 0]
            if free:
                host = max(free, key=lambda h: self._free[h.name] / h.max_jobs)
                self._free[host.name] -= 1
            else:
                turn: tuple[dict, threading.Event, list] = ({h.name: h for h in hosts}, threading.Event(), [])
                self._line.append(turn)
        if not free:
            with cancel.on_cancel(turn[1].set) if cancel else contextlib.nullcontext():
                turn[1].wait()
            with self._lock:
                given = bool(turn[2])
                if not given:  # woken by the cancel: out of the line
                    self._line.remove(turn)
            if not given:
                assert cancel is not None
                cancel.check()
            host = turn[2][0]
        held = [True]
        try:
            lease = self._lease(host, cancel)
        except BaseException:
            self._give_back(host)
            raise

        def release() -> None:
            with self._lock:
                if not held[0]:
                    return
                held[0] = False
                if lease is not None:
                    os.close(lease)
                self._pass_on(host)

        try:
            yield host, release
        finally:
            release()

    def _pass_on(self, host) -> None:
        """A slot of ``host`` given back (lock held): to the first job in line that can use it."""
        for i, (candidates, woken, given) in enumerate(self._line):
            if host.name in candidates:
                del self._line[i]
                given.append(candidates[host.name])
                woken.set()
                return
        self._free[host.name] += 1

    def _give_back(self, host) -> None:
        with self._lock:
            self._pass_on(host)

    def _lease(self, host, cancel: Cancellation | None) -> int | None:
        """One of ``host``'s max_jobs lock files, held (flock) until the slot is given back, so that
        processes sharing the leases directory (two `farm probe` of one state dir, a worker beside
        them) never run more than max_jobs jobs on a host at once; waits for one (cancellable)."""
        if self.leases is None:
            return None
        try:
            self.leases.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OperationalError(f"{self.leases}: cannot keep host slots there: {e.strerror}") from None
        while True:
            for k in range(host.max_jobs):
                fd = os.open(self.leases / f"{host.name}.{k}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    return fd
                except BlockingIOError:
                    os.close(fd)
            if cancel is not None:
                cancel.check()
            time.sleep(0.2)


def _said_by(say: Callable[[str], None], host: str, message: str) -> None:
    say(f"{host}: {message}")


def execute(job: Job, hosts: list, progress: Callable[[str], None] | None = None,
            slots: HostSlots | None = None, on_start: Callable | None = None, judges: Judges | None = None,
            attempts: int | None = None, earlier: list[Attempt] | None = None,
            cancel: Cancellation | None = None) -> Outcome:
    """Run a job on a host that can do it, trying another host of the same arch
    after an infrastructure failure, each host once, at most ``attempts`` hosts.

    ``slots`` (shared by the jobs of a dispatcher) decides which host and when;
    ``on_start(job, host)`` is told when an attempt starts; ``judges`` assess the dumps;
    ``earlier``: the attempts made by earlier deliveries of the
    job (another worker), which the reasons of a job failed everywhere name too; ``cancel``
    ends the job (status ``cancelled``) wherever it is.
    """
    say = progress or (lambda message: None)
    slots = slots or HostSlots(hosts)
    earlier = list(earlier or [])
    attempts_made: list[Attempt] = []
    outcome = None
    while attempts is None or len(attempts_made) < attempts:
        try:
            with slots.take([h for h in hosts if h.name not in {a[0] for a in attempts_made}], cancel) as (
                    host, release):
                if host is None:
                    break
                if on_start:
                    on_start(job, host)
                outcome = run_job(job, host, functools.partial(_said_by, say, host.name), judges, host_done=release,
                                  cancel=cancel)
        except Cancelled as e:  # cancelled while waiting for a host
            outcome = Outcome(JobRecord(job.id, job.run, job.arch, job.variant, status="cancelled", reasons=[str(e)],
                                        started=time.time(), finished=time.time()))
            break
        r = outcome.record
        attempts_made.append(Attempt(host.name, r.status, "; ".join(r.reasons), outcome.config_error))
        if r.status not in RETRYABLE:
            break
        say(f"{host.name}: {r.status}")
    if outcome is None:
        outcome = Outcome(JobRecord(job.id, job.run, job.arch, job.variant, status="failed", started=time.time(),
                                    finished=time.time()))
        outcome.record.reasons = [f"no healthy host can probe {column(job.arch, job.variant)} "
                                  "(quarantined hosts: farm hosts release NAME)"]
    tried = earlier + attempts_made
    if len(tried) > 1 and (outcome.record.status in RETRYABLE or not attempts_made):
        outcome.record.reasons = [f"all {len(tried)} hosts of {column(job.arch, job.variant)} failed"] + [
            f"{a.host}: {a.reason}" for a in tried]
    elif earlier and not attempts_made:  # the one host that could, tried by an earlier delivery
        outcome.record.status, outcome.record.reasons = earlier[0][1], [earlier[0][2]]
    outcome.attempts = [a._replace(reason=a.reason.split("; ")[0]) for a in attempts_made]
    return outcome


def keep(ledger: Ledger, outcome: Outcome) -> JobRecord:
    """Keep an outcome: the dump in the artifact store, the job's end in the ledger (once),
    and what each attempt says of its host's health."""
    for host, status, reason, misconfigured in outcome.attempts:
        if status in RETRYABLE:
            ledger.host_failed(host, reason, config=misconfigured)
        elif status != "cancelled":  # a cancelled job says nothing of its host
            ledger.host_seen(host)
    r = outcome.record
    if outcome.dump is not None and outcome.name:
        try:
            r.artifact = str(ledger.store_artifact(r.run, r.id, outcome.name, outcome.dump, r.provenance or {}))
        except (OSError, OperationalError) as e:  # a full disk, a planted symlink: the job fails, saying so
            reason = f"{e.strerror}: {e.filename}" if isinstance(e, OSError) and e.strerror else str(e)
            r.status, r.verdict, r.artifact = "failed", None, None
            r.reasons = [f"cannot store the dump: {reason}"] + r.reasons
    return ledger.finish_job(r)


def run_job(job: Job, host, progress: Callable[[str], None] | None = None, judges: Judges | None = None,
            host_done: Callable[[], None] | None = None, cancel: Cancellation | None = None) -> Outcome:
    """Probe ``job`` on ``host`` once and return how it ended (nothing recorded). The dump is
    assessed by ``judges`` (default: in this thread) after ``host_done()`` said that the host's
    part is over (its slot can take the next job meanwhile)."""
    record = JobRecord(job.id, job.run, job.arch, job.variant, host.name, started=time.time())

    def say(message: str) -> None:
        record.log.append(f"{time.strftime('%H:%M:%S')} {message}")
        if progress:
            progress(message)

    provenance: dict = {"job": job.id, "host": {"name": host.name, "arch": host.arch.value}}
    outcome = Outcome(record)
    try:
        qemu_args = _qemu_args(host, job)
        agent = Agent(transport_for(host), host, say, cancel)
        say(f"toolchain (libvirt {host.toolchain.libvirt}, QEMU {host.toolchain.qemu}) and probe")
        try:
            reply = agent.job(
                host.toolchain.libvirt, Architecture.parse(job.arch).qemu_target, job.probe_timeout,
                expect_arch=None if host.transport == "local" else host.arch.value, **qemu_args,
            )
        finally:
            if host_done:
                host_done()
        facts = reply.facts.model_dump() if reply.facts else {}
        if reply.facts:
            provenance["host"]["facts"] = facts
            check_host(host, facts)
        libvirt, qemu, probe = reply.libvirt, reply.qemu, reply.probe
        if libvirt is None or qemu is None or probe is None:
            raise AgentError(f"host {host.name!r}: agent job: {reply.error}")
        provenance["libvirt"] = libvirt.model_dump(include={"source", "libvirt_version", "commit", "probe", "cached"})
        provenance["qemu"] = {
            "path": qemu.path or qemu.binary,
            "version": qemu.version,
            "version_line": qemu.version_line,
            "commit": qemu.commit,  # built from git: the commit
            "origin": qemu_origin(host, job),
        }
        provenance["probe"] = probe.model_dump(include={"sha256", "size", "seconds", "exit_status", "timed_out"})
        tail = probe.tail
        record.log += [f"qemucapsprobe: {line}" for line in tail]
        if probe.timed_out:
            raise _Ended("timeout", f"qemucapsprobe did not finish within {job.probe_timeout:.0f} s (killed)")
        if not probe.ok:
            raise _Ended("failed", f"qemucapsprobe failed (exit {probe.exit_status}): " + " | ".join(tail[-3:]))
        outcome.dump = reply.dump
        if outcome.dump is None:
            raise _Ended("failed", "the agent's reply has no dump")
        outcome.name = str(judge(job, record, (judges or assess)(job, outcome.dump), facts, provenance))
    except _Ended as e:
        record.status, record.reasons = e.status, e.reasons + record.reasons
    except Cancelled as e:
        record.status, record.reasons = "cancelled", [str(e)]
    except HostError as e:
        record.status, record.reasons = "failed", [str(e)]
        outcome.config_error = isinstance(e, HostConfigError)
    record.finished = time.time()
    provenance["timings"] = {"started": record.started, "finished": record.finished}
    record.provenance = provenance
    return outcome


def check_host(host, facts: dict) -> None:
    """A remote host must be of its inventory arch (local hosts may emulate another: TCG)."""
    machine = facts.get("arch", "?")
    if host.transport != "local" and Architecture.from_uname(machine) is not host.arch:
        raise HostConfigError(f"host {host.name!r} is {machine}, the inventory says {host.arch.value}")


def host_warnings(facts: dict) -> list[str]:
    """What a host's facts say is wrong without stopping it: an agent running as root, cache
    entries its agent refused (planted by another user)."""
    warnings = []
    if facts.get("user") == 0:
        warnings.append("the agent runs as root: run it as an unprivileged user in the kvm group "
                        "(README: Running unprivileged)")
    probes = facts.get("probes")
    probes = probes if isinstance(probes, list) else []
    warnings += [str(p["refused"]) for p in probes if isinstance(p, dict) and p.get("refused")]
    return warnings


def _qemu_spec(host, job: Job) -> str:
    """The host's QEMU source for this job: a git source builds the job's ref, else the tag of the
    release asked for."""
    source = host.toolchain.qemu_source
    if source.kind == "git":
        return f"git:{source.location}@{job.qemu_ref or f'v{job.qemu}'}"
    return host.toolchain.qemu


def _qemu_args(host, job: Job) -> dict:
    if job.qemu_ref and not host.toolchain.qemu_from_git:  # the run planner gives such jobs other hosts
        raise _Ended("failed", f"host {host.name!r} cannot build QEMU at {job.qemu_ref}: its toolchain.qemu "
                     f"is {host.toolchain.qemu}, not git:URL@REF")
    kind = host.toolchain.qemu_source.kind
    if kind == "system":
        return {}
    if kind == "binary":
        return {"qemu_binary": host.toolchain.qemu_source.location}
    return {"qemu_source": _qemu_spec(host, job)}


def qemu_origin(host, job: Job) -> str:
    """Where the QEMU a job probes on ``host`` comes from, as provenance records it: ``system``, a
    ``binary:``/``tarball:`` spec of the host, or the ``git:URL@REF`` it builds."""
    return "system" if host.toolchain.qemu_source.kind == "system" else _qemu_spec(host, job)


@dataclass
class Assessment:
    """What a dump is, as the job's: the name it is stored under, its inspection, and why its
    QEMU is not the one asked for (None: it is)."""

    name: DumpName
    inspection: Inspection
    wrong_version: str | None = None


def assess(job: Job, text: str) -> Assessment:
    """Parse and inspect a job's dump (pure: runs in a judging process as well). A dump no
    check foresaw is judged invalid with the reason: never an exception, never a job left running."""
    try:
        d = dump.parse(text, str(job.name))
        inspection = inspect(d, job.name)
    except Exception as e:  # noqa: BLE001 - the dump comes from a host: anything it does is its verdict
        return Assessment(job.name, unreadable(str(job.name), job.name, f"cannot be judged: {type(e).__name__}: {e}"))
    version = inspection.facts.qemu_version
    if version is not None and not job.wants(version):
        name = DumpName(version.release_names()[0], job.name.arch, job.name.variant)
        return Assessment(name, inspect(d, name), f"asked for QEMU {job.qemu}, the binary is QEMU {version}")
    return Assessment(job.name, inspection)


_shared: dict[int, Judges] = {}
_shared_lock = threading.Lock()


class Judges:
    """Where a process assesses its jobs' dumps: in the job's thread, or in ``processes`` worker
    processes. Parsing a dump is pure CPU under Python's GIL (15-20 ms for an x86_64 dump); a
    process running many jobs at once would keep its threads that talk to hosts waiting on it,
    so a dispatcher with more than a couple of job slots judges in processes (forked from a
    clean server process, not from this threaded one; started when first needed)."""

    def __init__(self, processes: int = 0):
        self.processes = processes
        self._pool: ProcessPoolExecutor | None = None
        self._lock = threading.Lock()

    @classmethod
    def for_slots(cls, slots: int) -> Judges:
        """The judges of a dispatcher with ``slots`` job slots: in its threads for up to two,
        else this process's judging processes (kept for its life: started once, warm)."""
        processes = min(os.cpu_count() or 1, 4) if slots > 2 else 0
        if not processes:
            return cls()
        with _shared_lock:
            return _shared.setdefault(processes, cls(processes))

    def __call__(self, job: Job, text: str) -> Assessment:
        if not self.processes:
            return assess(job, text)
        with self._lock:
            if self._pool is None:
                context = multiprocessing.get_context("forkserver")
                context.set_forkserver_preload(["farm.jobs"])
                self._pool = ProcessPoolExecutor(self.processes, mp_context=context)
            pool = self._pool
        try:
            return pool.submit(assess, job, text).result()
        except BrokenProcessPool:  # a judging process died (killed, out of memory): new ones next time
            with self._lock:
                if self._pool is pool:
                    self._pool = None
            return assess(job, text)

    def close(self) -> None:
        with self._lock:
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown()


def judge(job: Job, record: JobRecord, assessment: Assessment, facts: dict, provenance: dict) -> DumpName:
    """Set the job's status, verdict and reasons; return the name the dump is stored under."""
    inspection = assessment.inspection
    if assessment.wrong_version:
        record.status = "wrong-version"
        record.reasons = [assessment.wrong_version] + inspection.reasons
    elif inspection.verdict is Verdict.invalid:
        record.status, record.reasons = "invalid", inspection.reasons
    elif inspection.verdict is Verdict.fake and inspection.expects_real:
        record.status, record.reasons = "fake", inspection.reasons
    else:
        record.status, record.reasons = "ok", inspection.reasons
    kvm = facts.get("kvm")
    kvm = kvm if isinstance(kvm, dict) else {}
    if not kvm.get("usable"):
        record.reasons.append(f"host has no usable /dev/kvm: {kvm.get('error') or 'not present'}")
    name = assessment.name
    record.verdict = inspection.verdict.value
    record.warnings = inspection.warnings
    provenance["verdict"] = {
        "verdict": record.verdict,
        "reasons": record.reasons,
        "warnings": record.warnings,
        "facts": inspection.to_json(),
    }
    provenance["farm"] = {"version": __version__, "coordinator": platform.node(), "pid": os.getpid()}
    return name
