"""The embedded dispatcher: every job in a thread of this process, no services.

A host runs at most ``max_jobs`` jobs at once; a job waits for a free slot on
one of the hosts of its arch.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from farm.jobs import HostSlots, Job, Judges, execute, keep
from farm.ledger import JobRecord, Ledger


def dispatch(
    work: list[tuple[Job, list]], ledger: Ledger, progress: Callable[[str, str], None] | None = None
) -> list[JobRecord]:
    """Run each (job, candidate hosts) pair; return the records in the same order."""
    slots = HostSlots([h for _, hosts in work for h in hosts])
    judges = Judges.for_slots(min(slots.size, len(work)))

    def started(job: Job, host) -> None:
        ledger.start_job(job.id, host.name)

    def one(job: Job, hosts: list) -> JobRecord:
        say = (lambda m: progress(job.id, m)) if progress else None
        return keep(ledger, execute(job, hosts, say, slots, started, judges))

    if not work:
        return []
    with ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="farm-job") as pool:
        futures = [pool.submit(one, job, hosts) for job, hosts in work]
        return [f.result() for f in futures]
