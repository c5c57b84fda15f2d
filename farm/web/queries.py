"""Read-only queries of the ledger for the dashboard: few queries, light columns, whatever the ledger's size.

The ledger (``farm.ledger``) writes; the dashboard only reads, on a read-only SQLite connection.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import contextmanager
from dataclasses import dataclass, field

from farm.ledger import DUMPED, FINAL, HostHealth, Ledger, RunRecord, run_status


@dataclass
class CellJob:
    """A job that may stand for its cell (QEMU release asked for x arch[+variant]): the latest of its
    kind there (a real dump, another dump, a failure); the view picks the best."""

    job: str
    run: int
    qemu: str
    arch: str
    variant: str | None
    host: str | None
    status: str
    verdict: str | None
    reasons: list[str]
    artifact: str | None
    finished: float | None
    provenance: dict | None = None


@dataclass
class RunSummary:
    run: RunRecord
    counts: dict[str, int] = field(default_factory=dict)  # job status -> number of jobs
    moved: float = 0.0  # the latest start of one of its jobs

    row: sqlite3.Row | None = None

    @property
    def status(self) -> str:
        """As Ledger.run tells it (farm.ledger.run_status)."""
        return run_status(self.row, self.moved) if self.row is not None else self.run.status


class Queries:
    def __init__(self, ledger: Ledger):
        self.ledger = ledger

    @contextmanager
    def _db(self):
        db = sqlite3.connect(f"file:{self.ledger.path}?mode=ro", uri=True, timeout=30)
        try:
            db.execute("PRAGMA busy_timeout=30000")
            db.row_factory = sqlite3.Row
            yield db
        finally:
            db.close()

    # --- coverage -----------------------------------------------------------------------

    def cell_jobs(self) -> list[CellJob]:
        """Per (QEMU release asked for, arch, variant): its latest final job of each kind (a real
        dump, another dump, a failure); a wrong-version job belongs to the release it asked for."""
        marks = ",".join("?" * len(FINAL))
        with self._db() as db:
            rows = db.execute(
                "SELECT j.id, j.run, r.qemu, j.arch, j.variant, j.host, j.status, j.verdict, j.reasons, j.artifact, "
                f"j.finished FROM jobs j JOIN runs r ON r.id = j.run WHERE j.status IN ({marks}) "
                "ORDER BY j.finished",
                FINAL,
            ).fetchall()
            chosen: dict[tuple, sqlite3.Row] = {}
            for row in rows:  # in time order: later rows replace earlier ones of their kind
                kind = "real" if row["status"] == "ok" and row["verdict"] == "real" else (
                    "dump" if row["status"] in DUMPED else "failed")
                chosen[(row["qemu"], row["arch"], row["variant"], kind)] = row
            provenance = {}
            ids = [r["id"] for r in chosen.values()]
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                for p in db.execute(
                    f"SELECT id, provenance FROM jobs WHERE id IN ({','.join('?' * len(part))})", part
                ):
                    provenance[p["id"]] = json.loads(p["provenance"]) if p["provenance"] else None
        return [
            CellJob(r["id"], r["run"], r["qemu"], r["arch"], r["variant"], r["host"], r["status"], r["verdict"],
                    json.loads(r["reasons"]), r["artifact"], r["finished"], provenance.get(r["id"]))
            for r in chosen.values()
        ]

    # --- runs ---------------------------------------------------------------------------

    def run_count(self) -> int:
        with self._db() as db:
            return int(db.execute("SELECT COUNT(*) FROM runs").fetchone()[0])

    def run_summaries(self, limit: int, offset: int = 0) -> list[RunSummary]:
        """A page of runs, newest first, with their job counts per status (two queries)."""
        with self._db() as db:
            rows = db.execute("SELECT * FROM runs ORDER BY id DESC LIMIT ? OFFSET ?", (limit, offset)).fetchall()
            summaries = {r["id"]: RunSummary(Ledger.run_record(r), row=r) for r in rows}
            if summaries:
                ids = list(summaries)
                for c in db.execute(
                    f"SELECT run, status, COUNT(*) AS n, MAX(COALESCE(started, 0)) AS moved FROM jobs "
                    f"WHERE run IN ({','.join('?' * len(ids))}) GROUP BY run, status",
                    ids,
                ):
                    s = summaries[c["run"]]
                    s.counts[c["status"]] = c["n"]
                    s.moved = max(s.moved, c["moved"] or 0)
        return list(summaries.values())

    # --- hosts --------------------------------------------------------------------------

    def hosts_health(self) -> dict[str, HostHealth]:
        with self._db() as db:
            rows = db.execute("SELECT * FROM hosts").fetchall()
        return {r["name"]: HostHealth(r["name"], r["last_seen"], r["last_failure"], r["last_failure_reason"],
                                      r["failures"], bool(r["quarantined"]), r["last_failure_kind"]) for r in rows}

    def last_host_facts(self) -> dict[str, dict]:
        """Each host's facts as its latest job with provenance recorded them (KVM usable, kernel, CPU)."""
        with self._db() as db:
            rows = db.execute(
                "SELECT host, provenance, MAX(finished) FROM jobs WHERE host IS NOT NULL AND provenance IS NOT NULL "
                "GROUP BY host"
            ).fetchall()
        facts = {}
        for r in rows:
            f = (json.loads(r["provenance"]).get("host") or {}).get("facts")
            if f:
                facts[r["host"]] = f
        return facts

    def running(self) -> list[dict]:
        with self._db() as db:
            rows = db.execute(
                "SELECT j.id, j.run, j.host, j.arch, j.variant, j.started, r.qemu FROM jobs j JOIN runs r "
                "ON r.id = j.run WHERE j.status = 'running' ORDER BY j.started"
            ).fetchall()
        return [dict(r) for r in rows]
