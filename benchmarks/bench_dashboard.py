"""Render time of the dashboard's coverage and runs pages with 10,000 jobs in the ledger.

The ledger is filled through Ledger's own methods (2,500 runs x 4 arches, over 25 QEMU releases, with
provenance and a mix of ok / fake / failed), the dashboard is served by uvicorn in a thread, and each
page is fetched over HTTP N times: p50 and p95, against the same pages over an empty ledger (baseline,
same run). Goal: p95 <= 150 ms.

    .venv/bin/python benchmarks/bench_dashboard.py [--jobs 10000] [--requests 100] [--libvirt TREE]
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvicorn  # noqa: E402

from farm.ledger import JobRecord, Ledger  # noqa: E402
from farm.web.app import create_app  # noqa: E402

ARCHS = ["x86_64", "aarch64", "ppc64", "s390x"]
GOAL_MS = 150.0


def fill(ledger: Ledger, jobs: int) -> None:
    versions = [f"{major}.{minor}.0" for major in (6, 7, 8, 9, 10) for minor in range(5)]
    runs = jobs // len(ARCHS)
    for n in range(runs):
        qemu = versions[n % len(versions)]
        run = ledger.new_run(qemu, ARCHS, None, "/etc/farm/inventory.yaml", "distributed", 600)
        for i, arch in enumerate(ARCHS):
            job_id = f"run-{run}-{arch}"
            ledger.add_job(JobRecord(job_id, run, arch, None, f"{arch}-host-{n % 8}"))
            status = ("ok", "ok", "fake", "failed")[(n + i) % 4]
            ledger.finish_job(JobRecord(
                job_id, run, arch, None, f"{arch}-host-{n % 8}", status,
                verdict={"ok": "real", "fake": "fake"}.get(status),
                reasons=["probed with KVM (plus the TCG-only session)"] if status == "ok" else ["TCG only"],
                started=time.time() - 60, finished=time.time(),
                provenance={"job": job_id, "host": {"name": f"{arch}-host-{n % 8}", "arch": arch,
                                                     "facts": {"kvm": {"usable": True}, "kernel": "6.1.0"}},
                            "libvirt": {"source": "git:...@v11.3.0", "libvirt_version": "11.3.0"},
                            "qemu": {"origin": "system", "version": qemu}, "probe": {"seconds": 3.2}},
            ))
        ledger.finish_run(run)


def serve(app) -> tuple[str, uvicorn.Server]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.02)
    return f"http://127.0.0.1:{port}", server


def timings(url: str, requests: int) -> list[float]:
    urllib.request.urlopen(url).read()  # warm-up (templates compiled, tree inspected)
    out = []
    for _ in range(requests):
        t = time.perf_counter()
        with urllib.request.urlopen(url) as r:
            r.read()
            assert r.status == 200
        out.append((time.perf_counter() - t) * 1000)
    return out


def pct(values: list[float], p: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[int(p) - 1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--libvirt", type=Path, help="also show this libvirt tree's coverage")
    args = parser.parse_args()
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=base) as empty_dir, tempfile.TemporaryDirectory(dir=base) as full_dir:
        t = time.perf_counter()
        full = Ledger(Path(full_dir))
        fill(full, args.jobs)
        print(f"ledger: {args.jobs} jobs in {args.jobs // len(ARCHS)} runs, filled in {time.perf_counter() - t:.1f} s")
        empty_url, empty_server = serve(create_app(Ledger(Path(empty_dir)), None, args.libvirt))
        full_url, full_server = serve(create_app(full, None, args.libvirt))
        failed = False
        print(f"{'page':<16}{'p50 ms':>9}{'p95 ms':>9}{'empty p50':>11}{'ratio p50':>11}   goal p95 <= {GOAL_MS:.0f} ms")
        for page in ("/coverage", "/runs", "/runs?page=40", "/api/coverage", "/api/runs"):
            base_ms = timings(empty_url + page, args.requests)
            ms = timings(full_url + page, args.requests)
            p50, p95 = statistics.median(ms), pct(ms, 95)
            verdict = "ok" if p95 <= GOAL_MS else "MISSED"
            failed |= p95 > GOAL_MS and not page.startswith("/api")
            print(f"{page:<16}{p50:>9.1f}{p95:>9.1f}{statistics.median(base_ms):>11.1f}"
                  f"{p50 / statistics.median(base_ms):>10.1f}x   {verdict}")
        empty_server.should_exit = full_server.should_exit = True
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
