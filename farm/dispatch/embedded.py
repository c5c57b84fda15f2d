"""The embedded dispatcher: every job in a thread of this process, no services.

A host runs at most ``max_jobs`` jobs at once; a job waits for a free slot on
one of the hosts of its arch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from farm.jobs import Job, execute, keep, run_job
from farm.ledger import JobRecord, Ledger


def dispatch(
    work: list[tuple[Job, list]], ledger: Ledger, progress: Callable[[str, str], None] | None = None
) -> list[JobRecord]:
    """Run each (job, candidate hosts) pair; return the records in the same order."""
    slots: dict[str, threading.BoundedSemaphore] = {}
    for _, hosts in work:
        for host in hosts:
            slots.setdefault(host.name, threading.BoundedSemaphore(host.max_jobs))

    busy: dict[str, int] = {name: 0 for name in slots}
    lock = threading.Lock()

    def attempt(job, host, say):
        with slots[host.name]:
            with lock:
                busy[host.name] += 1
            ledger.start_job(job.id, host.name)
            try:
                return run_job(job, host, say)
            finally:
                with lock:
                    busy[host.name] -= 1

    def one(job: Job, hosts: list) -> JobRecord:
        with lock:
            ordered = sorted(hosts, key=lambda h: busy[h.name] / h.max_jobs)  # the least busy first
        outcome = execute(job, ordered, lambda m: progress and progress(job.id, m), attempt)
        return keep(ledger, outcome)

    if not work:
        return []
    with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="farm-job") as pool:
        futures = [pool.submit(one, job, hosts) for job, hosts in work]
        return [f.result() for f in futures]
