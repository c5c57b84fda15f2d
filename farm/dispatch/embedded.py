"""The embedded dispatcher: every job in a thread of this process, no services.

A host runs at most ``max_jobs`` jobs at once; a job waits for a free slot on
one of the hosts of its arch.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from farm.config import settings
from farm.hosts import Cancellation
from farm.jobs import HostSlots, Job, Judges, execute, keep
from farm.ledger import JobRecord, Ledger


def dispatch(
    work: list[tuple[Job, list]], ledger: Ledger, progress: Callable[[str, str], None] | None = None,
    cancels: dict[str, Cancellation] | None = None,
) -> list[JobRecord]:
    """Run each (job, candidate hosts) pair; return the records in the same order.

    ``cancels`` (by job id) stop jobs. Interrupted (Ctrl-C, SIGTERM), every job is stopped and
    the ones it stopped are left unfinished in the ledger, for `farm runs resume`."""
    attempts = 1 + settings().max_retries  # hosts a job is tried on, as in the distributed dispatcher
    slots = HostSlots([h for _, hosts in work for h in hosts], leases=ledger.state_dir / "slots")
    judges = Judges.for_slots(min(slots.size, len(work)))
    cancels = cancels if cancels is not None else {}
    interrupted = threading.Event()

    def started(job: Job, host) -> None:
        ledger.start_job(job.id, host.name)

    def one(job: Job, hosts: list) -> JobRecord:
        say = (lambda m: progress(job.id, m)) if progress else None
        outcome = execute(job, hosts, say, slots, started, judges, attempts,
                          cancel=cancels.setdefault(job.id, Cancellation()))
        if interrupted.is_set() and outcome.record.status == "cancelled":
            return ledger.job(job.id)  # unfinished: resumable
        return keep(ledger, outcome)

    if not work:
        return []
    pool = ThreadPoolExecutor(max_workers=len(work), thread_name_prefix="farm-job")
    try:
        futures = [pool.submit(one, job, hosts) for job, hosts in work]
        return [f.result() for f in futures]
    except BaseException:
        interrupted.set()
        for job, _ in work:
            cancels.setdefault(job.id, Cancellation()).cancel("interrupted")
        raise
    finally:
        pool.shutdown(wait=True)
