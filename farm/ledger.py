"""The durable record of runs and jobs: SQLite (WAL), plus the artifact store.

Each job's dump is stored under the name libvirt would give it, next to a
provenance JSON, in ``<state>/artifacts/run-<N>/``. A job id maps to one
artifact: recording a job twice never adds a second result nor overwrites a
good one.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import platform
import re
import shutil
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path

from farm.errors import OperationalError, UsageError

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    qemu TEXT NOT NULL,
    archs TEXT NOT NULL,
    variant TEXT,
    inventory TEXT,
    mode TEXT NOT NULL DEFAULT 'embedded',
    timeout REAL,
    qemu_ref TEXT,
    driver TEXT,
    heartbeat REAL,
    status TEXT NOT NULL DEFAULT 'running',
    created REAL NOT NULL,
    finished REAL
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    run INTEGER NOT NULL REFERENCES runs(id),
    arch TEXT NOT NULL,
    variant TEXT,
    host TEXT,
    status TEXT NOT NULL DEFAULT 'pending',
    verdict TEXT,
    reasons TEXT NOT NULL DEFAULT '[]',
    warnings TEXT NOT NULL DEFAULT '[]',
    artifact TEXT,
    started REAL,
    finished REAL,
    provenance TEXT,
    log TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS jobs_run ON jobs(run);
CREATE TABLE IF NOT EXISTS hosts (
    name TEXT PRIMARY KEY,
    last_seen REAL,
    last_failure REAL,
    last_failure_reason TEXT,
    failures INTEGER NOT NULL DEFAULT 0,
    quarantined INTEGER NOT NULL DEFAULT 0,
    last_failure_kind TEXT
);
CREATE TABLE IF NOT EXISTS publications (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run INTEGER NOT NULL REFERENCES runs(id),
    created REAL NOT NULL,
    status TEXT NOT NULL,
    checkout TEXT,
    branch TEXT,
    base TEXT,
    commits TEXT NOT NULL DEFAULT '[]',
    mr_url TEXT,
    patches TEXT NOT NULL DEFAULT '[]',
    details TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS publications_run ON publications(run);
"""

# statuses a job ends in; 'pending' and 'running' are not final
class JobStatus(StrEnum):
    """How a job stands: the one list of job statuses (a StrEnum: equal to its text in the ledger,
    JSON and the wire). The sets below are derived from it, not spelled again elsewhere."""

    pending = "pending"
    running = "running"
    ok = "ok"  # a real dump (or a fake of an arch libvirt keeps fake)
    fake = "fake"  # TCG only where libvirt expects real hardware
    invalid = "invalid"  # the dump does not validate
    wrong_version = "wrong-version"  # another QEMU release than asked for
    failed = "failed"  # host, toolchain or probe failure: no dump
    timeout = "timeout"  # the probe did not finish in time
    cancelled = "cancelled"  # farm runs cancel

    @property
    def final(self) -> bool:
        return self not in (JobStatus.pending, JobStatus.running)

    @property
    def retryable(self) -> bool:
        """An infrastructure failure: worth another host of the arch."""
        return self in (JobStatus.failed, JobStatus.timeout)

    @property
    def answer(self) -> bool:
        """A final status that is the toolchain's answer, not an accident (a dump was judged)."""
        return self in (JobStatus.ok, JobStatus.fake, JobStatus.invalid, JobStatus.wrong_version)

    @property
    def dumped(self) -> bool:
        """A final status that comes with a dump judged real or fake."""
        return self in (JobStatus.ok, JobStatus.fake)


FINAL = tuple(s.value for s in JobStatus if s.final)
RETRYABLE = tuple(s.value for s in JobStatus if s.retryable)
ANSWERS = tuple(s.value for s in JobStatus if s.answer)
DUMPED = tuple(s.value for s in JobStatus if s.dumped)


_ARTIFACT_NAME = re.compile(r"caps_[0-9]+\.[0-9]+\.[0-9]+[._][a-z0-9_]+(\+[a-z]+)?\.replies")  # as libvirt names dumps
_JOB_ID = re.compile(r"run-[0-9]+-[a-z0-9_]+(\+[a-z]+)?")
HEARTBEAT = 2.0  # seconds between a run driver's heartbeats
STALE = 30.0  # seconds without a heartbeat after which a run's driver is taken for dead


def run_status(row: sqlite3.Row, moved: float) -> str:
    """A run's status as users see it, from its ``runs`` row and the latest start of one of its
    jobs: a run stored 'running' whose driver is dead is 'interrupted' (dead: no heartbeat for
    STALE seconds, or its pid gone on this machine; a run from before heartbeats: no job started
    for an hour)."""
    if row["status"] != "running":
        return str(row["status"])
    if row["heartbeat"] is None:
        return "running" if time.time() - max(moved, row["created"]) < 3600 else "interrupted"
    driver = _driver(row)
    return "running" if driver and _driver_alive(row["heartbeat"], driver) else "interrupted"


def _driver(row: sqlite3.Row) -> dict | None:
    try:
        driver = json.loads(row["driver"]) if row["driver"] else None
    except ValueError:
        return None
    return driver if isinstance(driver, dict) else None


def _driver_alive(heartbeat: float | None, driver: dict) -> bool:
    if heartbeat is None or time.time() - heartbeat > STALE:
        return False
    if driver.get("node") == platform.node() and isinstance(driver.get("pid"), int):
        try:
            os.kill(driver["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        try:  # a zombie (killed, not yet reaped by its parent) drives nothing
            with open(f"/proc/{driver['pid']}/stat", "rb") as f:
                return f.read().rpartition(b")")[2].split()[:1] != [b"Z"]
        except OSError:
            pass
    return True


@dataclass
class JobRecord:
    id: str
    run: int
    arch: str
    variant: str | None
    host: str | None = None
    status: str = "pending"
    verdict: str | None = None
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    artifact: str | None = None
    started: float | None = None
    finished: float | None = None
    provenance: dict | None = None
    log: list[str] = field(default_factory=list)  # what the job did, step by step

    @property
    def final(self) -> bool:
        return self.status in FINAL

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "arch": self.arch,
            "variant": self.variant,
            "host": self.host,
            "status": self.status,
            "verdict": self.verdict,
            "reasons": self.reasons,
            "warnings": self.warnings,
            "artifact": self.artifact,
            "started": self.started,
            "finished": self.finished,
            "seconds": round(self.finished - self.started, 2) if self.started and self.finished else None,
            "log": self.log,
        }


@dataclass
class HostHealth:
    """A host's health. Its last failure is *current* until the host is next seen working, then
    past (kept, shown as such). A configuration error (``last_failure_kind`` ``config``: reached but
    misconfigured) is recorded as the last failure without counting toward quarantine; an outage
    (``outage``: unreachable, toolchain or probe failure) counts."""

    name: str
    last_seen: float | None = None
    last_failure: float | None = None
    last_failure_reason: str | None = None
    failures: int = 0  # consecutive infrastructure failures (outages)
    quarantined: bool = False
    last_failure_kind: str | None = None  # outage | config

    @property
    def failing_now(self) -> bool:
        """Is the last failure current (not followed by the host working)?"""
        return self.last_failure is not None and (self.last_seen is None or self.last_failure > self.last_seen)

    @property
    def state(self) -> str:
        """quarantined, failing (outages in a row), misconfigured (a current configuration error),
        ok (seen working), or unknown (never seen)."""
        if self.quarantined:
            return "quarantined"
        if self.failures:
            return "failing"
        if self.failing_now and self.last_failure_kind == "config":
            return "misconfigured"
        return "ok" if self.last_seen or self.last_failure else "unknown"

    def to_json(self) -> dict:
        return {**self.__dict__, "failing_now": self.failing_now, "state": self.state}


@dataclass
class PublicationRecord:
    """What one `farm publish` of a run delivered: the branch, its commits, the MR or the patches."""

    id: int
    run: int
    created: float
    status: str  # published | unchanged
    checkout: str | None = None
    branch: str | None = None
    base: str | None = None  # the upstream commit the branch starts from
    commits: list[str] = field(default_factory=list)
    mr_url: str | None = None
    patches: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return dict(self.__dict__)


@dataclass
class RunRecord:
    id: int
    qemu: str
    archs: list[str]
    variant: str | None
    inventory: str | None
    mode: str
    status: str
    created: float
    finished: float | None
    timeout: float | None = None
    qemu_ref: str | None = None  # the git ref or commit of QEMU built instead of the release's tag
    jobs: list[JobRecord] = field(default_factory=list)

    @property
    def inventory_path(self) -> str | None:
        """The inventory file of the run; None for the built-in one."""
        if self.inventory is None or self.inventory.endswith("(built-in)"):
            return None
        return self.inventory

    def to_json(self) -> dict:
        return {
            "run": self.id,
            "qemu": self.qemu,
            "qemu_ref": self.qemu_ref,
            "archs": self.archs,
            "variant": self.variant,
            "inventory": self.inventory,
            "mode": self.mode,
            "status": self.status,
            "created": self.created,
            "finished": self.finished,
            "jobs": [j.to_json() for j in self.jobs],
        }


_locks: dict[str, threading.RLock] = {}
_locks_lock = threading.Lock()


def _lock_of(key: str) -> threading.RLock:
    """This process's lock of the ledger at ``key`` (its resolved path)."""
    with _locks_lock:
        return _locks.setdefault(key, threading.RLock())


def _forked() -> None:
    """A forked worker starts with no lock held (another thread may have held one at the fork)."""
    global _locks_lock
    _locks.clear()
    _locks_lock = threading.Lock()


os.register_at_fork(after_in_child=_forked)


class Ledger:
    def __init__(self, state_dir: Path, quarantine_after: int = 3):
        self.state_dir = Path(state_dir)
        self.quarantine_after = quarantine_after
        self.artifacts = self.state_dir / "artifacts"
        self.path = self.state_dir / "ledger.sqlite"
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OperationalError(f"{self.state_dir}: cannot create the state dir (FARM_STATE_DIR): "
                                   f"{e.strerror}") from None
        if self.path.exists() and not self.path.is_file():
            raise OperationalError(f"{self.path}: the ledger is not a regular file")
        if self.path.is_file() and self.path.stat().st_size == 0 and self._last_artifact_run():
            raise self._damaged("it is empty, but the artifact store beside it has runs")
        self._key = str(self.path.resolve())
        self._migrate()

    def _damaged(self, why: str) -> OperationalError:
        return OperationalError(
            f"{self.path}: the ledger is damaged ({why}); move it aside (mv {self.path} {self.path}.damaged) "
            f"and farm starts a new one: the dumps in {self.artifacts} stay, new runs are numbered after theirs")

    def _last_artifact_run(self) -> int:
        """The highest run number of the artifact store (0: none), so that a new ledger never
        numbers a run like one whose artifacts are kept."""
        try:
            names = [p.name for p in self.artifacts.iterdir()]
        except OSError:
            return 0
        return max((int(n[4:]) for n in names if n.startswith("run-") and n[4:].isdigit()), default=0)

    def _migrate(self) -> None:
        """The schema, and what older ledgers lack. One process at a time (a lock file beside the
        ledger): SQLite answers 'database is locked' at once, not after its busy timeout, to two
        processes turning a new ledger into WAL mode together."""
        try:
            lock = os.open(self.state_dir / ".ledger.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError:  # a state dir this process may only read: nothing to migrate concurrently
            self._migrate_locked()
            return
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._migrate_locked()
        finally:
            os.close(lock)

    def _migrate_locked(self) -> None:
        with self._db() as db:
            db.executescript(SCHEMA)
            columns = {row["name"] for row in db.execute("PRAGMA table_info(runs)")}
            if "timeout" not in columns:  # ledgers from before runs kept their probe timeout
                db.execute("ALTER TABLE runs ADD COLUMN timeout REAL")
            if "qemu_ref" not in columns:  # before runs could build a git ref of QEMU
                db.execute("ALTER TABLE runs ADD COLUMN qemu_ref TEXT")
            if "driver" not in columns:  # before runs knew the process driving them
                db.execute("ALTER TABLE runs ADD COLUMN driver TEXT")
                db.execute("ALTER TABLE runs ADD COLUMN heartbeat REAL")
            if "log" not in {row["name"] for row in db.execute("PRAGMA table_info(jobs)")}:
                db.execute("ALTER TABLE jobs ADD COLUMN log TEXT NOT NULL DEFAULT '[]'")  # before job logs
            if "last_failure_kind" not in {row["name"] for row in db.execute("PRAGMA table_info(hosts)")}:
                db.execute("ALTER TABLE hosts ADD COLUMN last_failure_kind TEXT")  # before configuration errors

    @contextmanager
    def _db(self):
        """A connection, one thread of this process at a time: the threads of a dispatcher
        queue here instead of in SQLite's busy handler, which sleeps up to 100 ms per try.
        Other processes (workers, the dashboard) still meet in SQLite's locks. WAL with
        synchronous=NORMAL: a crash of farm loses nothing; a power cut may lose the last
        commits, never consistency (and `farm runs resume` redoes unfinished jobs)."""
        with _lock_of(self._key):
            try:
                db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            except sqlite3.Error as e:
                raise OperationalError(f"{self.path}: cannot open the ledger: {e}") from None
            try:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA busy_timeout=30000")
                db.row_factory = sqlite3.Row
                yield db
            except sqlite3.DatabaseError as e:
                if isinstance(e, sqlite3.OperationalError) or "malformed" not in str(e) and "not a database" not in str(e):
                    raise OperationalError(f"{self.path}: {e}") from None
                raise self._damaged(str(e)) from None
            finally:
                db.close()

    # --- runs -------------------------------------------------------------------------

    def new_run(
        self, qemu: str, archs: list[str], variant: str | None, inventory: str | None, mode: str,
        timeout: float | None = None, qemu_ref: str | None = None,
    ) -> int:
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            last = db.execute("SELECT COALESCE(MAX(id), 0) FROM runs").fetchone()[0]
            run = max(int(last), self._last_artifact_run()) + 1  # never the number of kept artifacts
            db.execute(
                "INSERT INTO runs (id, qemu, archs, variant, inventory, mode, timeout, qemu_ref, created) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run, qemu, json.dumps(archs), variant, inventory, mode, timeout, qemu_ref, time.time()),
            )
            db.execute("COMMIT")
            return run

    def reopen_run(self, run: int) -> None:
        with self._db() as db:
            db.execute("UPDATE runs SET status = 'running', finished = NULL WHERE id = ?", (run,))

    def finish_run(self, run: int) -> None:
        jobs = self.jobs(run)
        status = "done" if all(j.final for j in jobs) else "incomplete"
        with self._db() as db:
            db.execute("UPDATE runs SET status = ?, finished = ? WHERE id = ?", (status, time.time(), run))

    def run(self, run: int) -> RunRecord:
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run,)).fetchone()
        if row is None:
            raise UsageError(f"no run {run} in {self.path}")
        return self._with_jobs(row)

    def runs(self, limit: int = 50) -> list[RunRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ?", (limit,)).fetchall()
        return [self._with_jobs(row) for row in rows]

    def _with_jobs(self, row: sqlite3.Row) -> RunRecord:
        record = self.run_record(row)
        record.jobs = self.jobs(record.id)
        record.status = run_status(row, max([j.started or 0 for j in record.jobs], default=0))
        return record

    @staticmethod
    def run_record(row: sqlite3.Row) -> RunRecord:
        """A row of ``runs`` as a record (without its jobs; the status as stored)."""
        return RunRecord(
            row["id"], row["qemu"], json.loads(row["archs"]), row["variant"], row["inventory"],
            row["mode"], row["status"], row["created"], row["finished"], row["timeout"], row["qemu_ref"],
        )

    def driver(self, run: int) -> dict | None:
        """The live process driving ``run`` ({"pid", "node"}), or None when none is."""
        with self._db() as db:
            row = db.execute("SELECT * FROM runs WHERE id = ?", (run,)).fetchone()
        if row is None or row["status"] != "running":
            return None
        driver = _driver(row)
        return driver if driver and _driver_alive(row["heartbeat"], driver) else None

    @contextmanager
    def driving(self, run: int, watch: Callable[[], None] | None = None) -> Iterator[None]:
        """This process drives ``run`` for the block: its pid and node, and a heartbeat every
        HEARTBEAT seconds, are in the ledger, so that `farm runs show` says `interrupted` soon
        after the process died and `farm runs resume` refuses a run still driven. ``watch`` is
        called at every beat (the embedded dispatcher looks for cancelled jobs there)."""
        me = json.dumps({"pid": os.getpid(), "node": platform.node()})
        with self._db() as db:
            db.execute("UPDATE runs SET driver = ?, heartbeat = ? WHERE id = ?", (me, time.time(), run))
        stop = threading.Event()

        def beat() -> None:
            while not stop.wait(HEARTBEAT):
                try:
                    with self._db() as db:
                        db.execute("UPDATE runs SET heartbeat = ? WHERE id = ?", (time.time(), run))
                    if watch:
                        watch()
                except Exception:  # noqa: BLE001 - a missed beat is not the run's end
                    log.exception("run %s: heartbeat", run)

        beater = threading.Thread(target=beat, name=f"farm-run-{run}-heartbeat", daemon=True)
        beater.start()
        try:
            yield
        finally:
            stop.set()
            beater.join()
            with self._db() as db:
                db.execute("UPDATE runs SET driver = NULL WHERE id = ? AND driver = ?", (run, me))

    # --- jobs -------------------------------------------------------------------------

    def add_job(self, job: JobRecord) -> None:
        with self._db() as db:
            db.execute(
                "INSERT OR IGNORE INTO jobs (id, run, arch, variant, host) VALUES (?, ?, ?, ?, ?)",
                (job.id, job.run, job.arch, job.variant, job.host),
            )

    def start_job(self, job_id: str, host: str) -> None:
        with self._db() as db:
            db.execute(
                "UPDATE jobs SET status = 'running', host = ?, started = ? WHERE id = ? AND status IN ('pending', 'running')",
                (host, time.time(), job_id),
            )

    def finish_job(self, job: JobRecord) -> JobRecord:
        """Record a job's end once: a job already final keeps its first result."""
        with self._db() as db:
            db.execute(
                "UPDATE jobs SET status = ?, host = ?, verdict = ?, reasons = ?, warnings = ?, artifact = ?, "
                "started = COALESCE(started, ?), finished = ?, provenance = ?, log = ? "
                f"WHERE id = ? AND status NOT IN ({','.join('?' * len(FINAL))})",
                (
                    job.status, job.host, job.verdict, json.dumps(job.reasons), json.dumps(job.warnings),
                    job.artifact, job.started, job.finished or time.time(),
                    json.dumps(job.provenance) if job.provenance is not None else None,
                    json.dumps(job.log), job.id, *FINAL,
                ),
            )
        return self.job(job.id)

    def job(self, job_id: str) -> JobRecord:
        with self._db() as db:
            row = db.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise UsageError(f"no job {job_id!r} in {self.path}")
        return self._job_record(row)

    def jobs(self, run: int) -> list[JobRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE run = ? ORDER BY rowid", (run,)).fetchall()
        return [self._job_record(r) for r in rows]

    @staticmethod
    def _job_record(row: sqlite3.Row) -> JobRecord:
        return JobRecord(
            row["id"], row["run"], row["arch"], row["variant"], row["host"], row["status"], row["verdict"],
            json.loads(row["reasons"]), json.loads(row["warnings"]), row["artifact"], row["started"],
            row["finished"], json.loads(row["provenance"]) if row["provenance"] else None,
            json.loads(row["log"]),
        )

    # --- host health ------------------------------------------------------------------

    def host_seen(self, name: str) -> None:
        """The host worked: it is healthy again (quarantine stays until released)."""
        with self._db() as db:
            db.execute(
                "INSERT INTO hosts (name, last_seen) VALUES (?, ?) "
                "ON CONFLICT(name) DO UPDATE SET last_seen = excluded.last_seen, failures = 0",
                (name, time.time()),
            )

    def host_failed(self, name: str, reason: str, config: bool = False) -> HostHealth:
        """An infrastructure failure; after ``quarantine_after`` in a row the host is quarantined.
        A configuration error (``config``) is recorded as the last failure but not counted."""
        counted = 0 if config else 1
        with self._db() as db:
            db.execute(
                "INSERT INTO hosts (name, last_failure, last_failure_reason, last_failure_kind, failures) "
                "VALUES (?, ?, ?, ?, ?) "
                "ON CONFLICT(name) DO UPDATE SET last_failure = excluded.last_failure, "
                "last_failure_reason = excluded.last_failure_reason, "
                "last_failure_kind = excluded.last_failure_kind, failures = failures + excluded.failures",
                (name, time.time(), reason, "config" if config else "outage", counted),
            )
            db.execute(
                "UPDATE hosts SET quarantined = 1 WHERE name = ? AND failures >= ?", (name, self.quarantine_after)
            )
        return self.host(name)

    def release_host(self, name: str) -> HostHealth:
        with self._db() as db:
            db.execute(
                "INSERT INTO hosts (name) VALUES (?) ON CONFLICT(name) DO UPDATE SET quarantined = 0, failures = 0",
                (name,),
            )
        return self.host(name)

    def host(self, name: str) -> HostHealth:
        with self._db() as db:
            row = db.execute("SELECT * FROM hosts WHERE name = ?", (name,)).fetchone()
        if row is None:
            return HostHealth(name)
        return HostHealth(row["name"], row["last_seen"], row["last_failure"], row["last_failure_reason"],
                          row["failures"], bool(row["quarantined"]), row["last_failure_kind"])

    def quarantined(self) -> set[str]:
        with self._db() as db:
            return {r["name"] for r in db.execute("SELECT name FROM hosts WHERE quarantined = 1")}

    def running_jobs(self) -> list[JobRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM jobs WHERE status = 'running' ORDER BY started").fetchall()
        return [self._job_record(r) for r in rows]

    # --- publications -------------------------------------------------------------------

    def add_publication(self, run: int, status: str, *, checkout: str | None = None, branch: str | None = None,
                        base: str | None = None, commits: list[str] | None = None, mr_url: str | None = None,
                        patches: list[str] | None = None, details: dict | None = None) -> PublicationRecord:
        with self._db() as db:
            cur = db.execute(
                "INSERT INTO publications (run, created, status, checkout, branch, base, commits, mr_url, patches, "
                "details) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (run, time.time(), status, checkout, branch, base, json.dumps(commits or []), mr_url,
                 json.dumps(patches or []), json.dumps(details or {})),
            )
            publication = int(cur.lastrowid)
        return next(p for p in self.publications(run) if p.id == publication)

    def publications(self, run: int) -> list[PublicationRecord]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM publications WHERE run = ? ORDER BY id", (run,)).fetchall()
        return [PublicationRecord(r["id"], r["run"], r["created"], r["status"], r["checkout"], r["branch"],
                                  r["base"], json.loads(r["commits"]), r["mr_url"], json.loads(r["patches"]),
                                  json.loads(r["details"])) for r in rows]

    # --- artifacts ----------------------------------------------------------------------

    def store_artifact(self, run: int, job_id: str, name: str, dump: str, provenance: dict) -> Path:
        """Keep a job's dump as ``run-N/<job>/<libvirt name>`` with ``provenance.json`` beside it.

        Written to a temporary directory and renamed into place; an existing
        artifact of the same job is never overwritten (the first one stays).
        """
        if not (_ARTIFACT_NAME.fullmatch(name) and _JOB_ID.fullmatch(job_id) and job_id.startswith(f"run-{run}-")):
            raise OperationalError(f"refusing to store an artifact named {name!r} for job {job_id!r}")
        final = self.artifacts / f"run-{run}" / job_id
        target = final / name
        final.parent.mkdir(parents=True, exist_ok=True)
        store = self.artifacts.resolve()
        if final.parent.resolve() != store / f"run-{run}" or (final.exists() and final.resolve() != store / f"run-{run}" / job_id):
            raise OperationalError(f"{final}: a symlink out of the artifact store {store}; refusing to write there")
        if target.exists():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{job_id}.", dir=final.parent))
        try:
            (tmp / name).write_text(dump, encoding="utf-8")
            (tmp / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True) + "\n")
            os.rename(tmp, final)
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
            if target.exists():  # another delivery of the same job won the race
                return target
            raise
        return target
