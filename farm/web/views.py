"""What the dashboard shows, as plain data: the same dicts feed the HTML pages and the JSON API."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from farm.caps.arch import Architecture
from farm.caps.names import column
from farm.caps.version import QemuVersion
from farm.errors import FarmError
from farm.ledger import HostHealth
from farm.web.queries import CellJob, Queries

STATES = ("real", "fake", "stale", "failed", "missing")
RUNS_PER_PAGE = 50


# --- coverage -----------------------------------------------------------------------------


def _column_order(column: str) -> tuple[int, str]:
    try:
        return (list(Architecture).index(Architecture.parse(column.split("+")[0])), column)
    except FarmError:
        return (len(Architecture), column)


def _version_key(text: str) -> tuple:
    try:
        v = QemuVersion.parse(text)
        return (v.major, v.minor, v.micro)
    except FarmError:
        return (-1, -1, -1)


def _libvirt_key(text: str | None) -> tuple:
    try:
        return tuple(int(p) for p in (text or "").split("."))
    except ValueError:
        return ()


RANK = {"real": 0, "fake": 1, "stale": 2, "failed": 3}  # which job a cell shows: the best, then the latest


def farm_cells(jobs: list[CellJob], artifacts: Path) -> list[dict]:
    """The farm's matrix: one cell per QEMU release (asked for) x arch[+variant] the ledger has a final
    job for, showing its best job: a current real dump over a fake over a stale one over a failure
    (the latest of equals). A wrong-version job is a failure of the release it asked for; its dump,
    kept under its true name, says nothing of that release's cell."""
    newest_probe: dict[str, tuple] = {}  # arch -> newest libvirt (probe code) version among the dumps
    for j in jobs:
        version = _probe_version(j)
        if j.status in ("ok", "fake") and version:
            newest_probe[j.arch] = max(newest_probe.get(j.arch, ()), _libvirt_key(version))
    best: dict[tuple, dict] = {}
    for j in jobs:
        col = column(j.arch, j.variant)
        artifact = _relative(j.artifact, artifacts)
        probe = _probe_version(j)
        reasons = list(j.reasons)
        if j.status not in ("ok", "fake"):
            state = "failed"
            reasons.insert(0, f"job {j.status}")
        elif probe and _libvirt_key(probe) < newest_probe.get(j.arch, ()):
            state = "stale"
            newest = ".".join(map(str, newest_probe[j.arch]))
            reasons.insert(0, f"probed with libvirt {probe}'s qemucapsprobe; libvirt {newest} probes this arch now")
        else:
            state = "real" if j.verdict == "real" else "fake"
        cell = {
            "source": "farm", "version": j.qemu, "column": col, "state": state, "verdict": j.verdict,
            "status": j.status, "reasons": reasons, "run": j.run, "job": j.job, "host": j.host,
            "finished": j.finished, "libvirt": probe,
            "expects_real": _expects_real(j.arch),
            "dump": f"/artifacts/{artifact}" if artifact else None,
            "provenance": f"/artifacts/{Path(artifact).parent}/provenance.json" if artifact else None,
        }
        held = best.get((j.qemu, col))
        if held is None or (RANK[state], -(j.finished or 0)) < (RANK[held["state"]], -(held["finished"] or 0)):
            best[(j.qemu, col)] = cell
    return list(best.values())


def _probe_version(j: CellJob) -> str | None:
    return ((j.provenance or {}).get("libvirt") or {}).get("libvirt_version")


def _expects_real(arch: str) -> bool:
    try:
        return Architecture.parse(arch).needs_hardware
    except FarmError:
        return False


def _relative(artifact: str | None, artifacts: Path) -> str | None:
    if not artifact:
        return None
    try:
        return Path(artifact).resolve().relative_to(artifacts.resolve()).as_posix()
    except ValueError:
        return None


class TreeCoverage:
    """The libvirt tree's matrix, recomputed only when its data directory changes (inspecting ~1 s)."""

    def __init__(self, tree: Path | None):
        self.tree = tree
        self._lock = threading.Lock()
        self._stamp: tuple | None = None
        self._cells: list[dict] = []
        self.directory: Path | None = None
        self.error: str | None = None

    def cells(self) -> list[dict]:
        if self.tree is None:
            return []
        from farm.coverage import coverage, data_dir

        with self._lock:
            try:
                directory = data_dir(self.tree)
                stamp = (str(directory), os.stat(directory).st_mtime_ns)
                if stamp != self._stamp:
                    cov = coverage(self.tree)
                    self._cells = [self._cell(c) for c in cov.cells]
                    self.directory, self._stamp, self.error = directory, stamp, None
            except FarmError as e:
                self.error, self._cells, self._stamp = str(e), [], None
            return self._cells

    @staticmethod
    def _cell(c) -> dict:
        i = c.inspection
        verdict = i.verdict.value
        reasons = list(i.reasons)
        qemu = i.facts.qemu_version
        if verdict == "invalid":
            state = "failed"
        elif qemu is not None and qemu.is_development:
            state = "stale"
            reasons.insert(0, f"made from a development QEMU ({qemu}): to be replaced by the release's dump")
        else:
            state = verdict
        name = Path(i.file).name
        return {
            "source": "tree", "version": str(c.version), "column": c.column, "state": state, "verdict": verdict,
            "reasons": reasons, "warnings": list(i.warnings), "file": name, "expects_real": i.expects_real,
            "dump": f"/tree/{name}",
        }


def coverage(queries: Queries, tree: TreeCoverage) -> dict:
    farm = farm_cells(queries.cell_jobs(), queries.ledger.artifacts)
    treecells = tree.cells()
    versions = sorted({c["version"] for c in farm + treecells}, key=_version_key, reverse=True)
    columns = sorted({c["column"] for c in farm + treecells}, key=_column_order)
    sources = [("farm", "farm results (ledger)", farm)]
    if tree.tree is not None:
        sources.append(("tree", f"libvirt tree {tree.directory or tree.tree}", treecells))
    matrices = []
    for key, title, cells in sources:
        grid = {(c["version"], c["column"]): c for c in cells}
        rows = []
        for v in versions:
            rows.append({"version": v, "cells": [
                grid.get((v, col)) or {"source": key, "version": v, "column": col, "state": "missing"}
                for col in columns
            ]})
        counts = {s: 0 for s in STATES}
        for row in rows:
            for c in row["cells"]:
                counts[c["state"]] += 1
        matrices.append({"source": key, "title": title, "rows": rows, "counts": counts})
    return {
        "versions": versions, "columns": columns, "matrices": matrices,
        "tree": str(tree.tree) if tree.tree else None, "tree_error": tree.error,
        "generated": time.time(),
    }


def coverage_json(view: dict) -> dict:
    """The API's shape: flat cells (missing ones included) per source."""
    return {
        "versions": view["versions"], "columns": view["columns"], "tree": view["tree"],
        "tree_error": view["tree_error"],
        "sources": {
            m["source"]: {"counts": m["counts"], "cells": [c for row in m["rows"] for c in row["cells"]]}
            for m in view["matrices"]
        },
    }


# --- hosts --------------------------------------------------------------------------------


def hosts(queries: Queries, inventory) -> list[dict]:
    """The inventory's hosts (and any host the ledger knows that the inventory no longer lists)."""
    health = queries.hosts_health()
    facts = queries.last_host_facts()
    running = queries.running()
    entries = [(h.name, h.arch.value, h.transport) for h in (inventory.hosts if inventory else [])]
    known = {e[0] for e in entries}
    entries += [(name, None, None) for name in sorted(health) if name not in known]
    out = []
    for name, arch, transport in entries:
        h = health.get(name) or HostHealth(name)
        f = facts.get(name) or {}
        kvm = f.get("kvm") or {}
        out.append({
            "name": name, "arch": arch, "transport": transport, "in_inventory": name in known,
            "health": h.state, "failures": h.failures, "quarantined": h.quarantined, "last_seen": h.last_seen,
            "last_failure": h.last_failure, "last_failure_reason": h.last_failure_reason,
            "last_failure_kind": h.last_failure_kind, "failing_now": h.failing_now,
            "kvm_usable": kvm.get("usable") if kvm else None, "machine": f.get("arch"), "kernel": f.get("kernel"),
            "cpu": f.get("cpu_model"),
            "running": [{"job": j["id"], "run": j["run"], "qemu": j["qemu"],
                         "column": column(j["arch"], j["variant"]), "started": j["started"]}
                        for j in running if j["host"] == name],
        })
    return out


# --- runs ---------------------------------------------------------------------------------


def runs_page(queries: Queries, page: int) -> dict:
    total = queries.run_count()
    pages = max(1, -(-total // RUNS_PER_PAGE))
    page = min(max(1, page), pages)
    rows = []
    for s in queries.run_summaries(RUNS_PER_PAGE, (page - 1) * RUNS_PER_PAGE):
        r = s.run
        rows.append({
            "run": r.id, "qemu": r.qemu, "archs": r.archs, "variant": r.variant, "mode": r.mode,
            "status": s.status, "created": r.created, "finished": r.finished,
            "seconds": round(r.finished - r.created, 1) if r.finished else None,
            "jobs": sum(s.counts.values()), "counts": dict(sorted(s.counts.items())),
        })
    return {"page": page, "pages": pages, "per_page": RUNS_PER_PAGE, "total": total, "runs": rows}


def run_detail(ledger, run: int) -> dict:
    record = ledger.run(run)
    artifacts = ledger.artifacts
    jobs = []
    for j in record.jobs:
        artifact = _relative(j.artifact, artifacts)
        jobs.append({
            **j.to_json(), "column": column(j.arch, j.variant),
            "dump": f"/artifacts/{artifact}" if artifact else None,
            "provenance": f"/artifacts/{Path(artifact).parent}/provenance.json" if artifact else None,
            "libvirt": ((j.provenance or {}).get("libvirt") or {}).get("libvirt_version"),
            "qemu_origin": ((j.provenance or {}).get("qemu") or {}).get("origin"),
        })
    return {
        **{k: v for k, v in record.to_json().items() if k != "jobs"},
        "seconds": round(record.finished - record.created, 1) if record.finished else None,
        "jobs": jobs,
        "publications": [p.to_json() for p in ledger.publications(run)],
    }


# --- metrics ------------------------------------------------------------------------------


def metrics(queries: Queries, inventory, tree: TreeCoverage) -> str:
    """Prometheus text exposition: host and coverage gauges, all named farm_*."""
    lines: list[str] = []

    def gauge(name: str, help_: str, samples: list[tuple[dict, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items())
            lines.append(f"{name}{{{text}}} {value:g}" if text else f"{name} {value:g}")

    hs = hosts(queries, inventory)
    base = [({"host": h["name"], "arch": h["arch"] or ""}, h) for h in hs]
    gauge("farm_host_healthy", "1 if the host's last job or check worked and it is not quarantined",
          [(lab, 1.0 if h["health"] in ("ok", "unknown") else 0.0) for lab, h in base])
    gauge("farm_host_quarantined", "1 if the host is quarantined (gets no jobs)",
          [(lab, 1.0 if h["quarantined"] else 0.0) for lab, h in base])
    gauge("farm_host_consecutive_failures", "consecutive infrastructure failures of the host",
          [(lab, float(h["failures"])) for lab, h in base])
    gauge("farm_host_last_seen_timestamp_seconds", "when the host last worked (unix time; 0: never)",
          [(lab, float(h["last_seen"] or 0)) for lab, h in base])
    gauge("farm_host_running_jobs", "jobs running on the host", [(lab, float(len(h["running"]))) for lab, h in base])
    view = coverage(queries, tree)
    samples = []
    for m in view["matrices"]:
        for state in STATES:
            samples.append(({"source": m["source"], "state": state}, float(m["counts"][state])))
    gauge("farm_coverage_cells", "cells of the QEMU release x arch[+variant] matrix per source and state", samples)
    gauge("farm_runs", "runs in the ledger", [({}, float(queries.run_count()))])
    gauge("farm_jobs_running", "jobs running now", [({}, float(len(queries.running())))])
    return "\n".join(lines) + "\n"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
