"""The embedded dispatcher: every job in a thread of this process, no services.

A host runs at most ``max_jobs`` jobs at once; a job waits for a free slot on
one of the hosts of its arch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from farm.jobs import Job, execute, run_job
from farm.ledger import JobRecord, Ledger


def dispatch(
    work: list[tuple[Job, list]], ledger: Ledger, progress: Callable[[str, str], None] | None = None
) -> list[JobRecord]:
    """Run each (job, candidate hosts) pair; return the records in the same order."""
    slots: dict[str, threading.BoundedSemaphore] = {}
    for _, hosts in work:
        for host in hosts:
            slots.setdefault(host.name, threading.BoundedSemaphore(host.max_jobs))

    def attempt(job, host, ledger, say):
        with slots[host.name]:
            return run_job(job, host, ledger, say)

    def one(job: Job, hosts: list) -> JobRecord:
        ordered = sorted(hosts, key=lambda h: -slots[h.name]._value)  # the least busy first
        return execute(job, ordered, ledger, lambda m: progress and progress(job.id, m), attempt)

    if not work:
        return []
    with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="farm-job") as pool:
        futures = [pool.submit(one, job, hosts) for job, hosts in work]
        return [f.result() for f in futures]
