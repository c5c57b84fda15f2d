"""A run: one QEMU release probed for a set of arches (and a variant), as jobs; with a git ref, QEMU
is built at that ref (on hosts that build QEMU from git) and its dumps are filed under the release."""

from __future__ import annotations

from collections.abc import Callable

from farm.caps.arch import Architecture
from farm.caps.names import column, parse_variant
from farm.caps.version import QemuVersion
from farm.config import settings
from farm.errors import UsageError
from farm.hosts import Cancellation
from farm.inventory import git_ref_problem
from farm.jobs import PROBE_TIMEOUT, Job
from farm.ledger import JobRecord, Ledger, RunRecord


def plan(
    inventory, arch_spec: str, variant: str | None, only: list[str] | None = None, qemu_ref: str | None = None
) -> list[tuple[Architecture, list]]:
    """(arch, candidate hosts) per job; ``all`` is every arch of the inventory (of the ``only`` hosts).
    With ``qemu_ref`` only hosts that build QEMU from git are candidates."""
    variant = parse_variant(variant)
    chosen = [inventory.host(name) for name in only] if only else inventory.hosts
    archs = Architecture.parse_list(arch_spec, list(dict.fromkeys(h.arch for h in chosen)))
    work = []
    for arch in archs:
        what = column(arch.value, variant)
        producers = [h for h in inventory.hosts_for(arch, variant) if h in chosen]
        if not producers and only:
            raise UsageError(f"{inventory.source}: --hosts cannot probe {what}: " + "; ".join(
                f"host {h.name} is {h.arch.value}, not {arch.value}" if h.arch is not arch
                else f"host {h.name} has no variant {variant}" for h in chosen))
        if not producers:
            raise UsageError(f"{inventory.source}: no host can probe {what} (hosts: {', '.join(h.name for h in inventory.hosts)})")
        hosts = _builders(producers, qemu_ref)
        if not hosts:
            raise UsageError(f"{inventory.source}: no host of {what} builds QEMU from git (toolchain.qemu "
                             f"git:URL@REF), needed for --ref {qemu_ref}: "
                             + ", ".join(f"{h.name} has qemu {h.toolchain.qemu}" for h in producers))
        work.append((arch, hosts))
    return work


def _builders(hosts: list, qemu_ref: str | None) -> list:
    """The hosts that can build the QEMU of a job: any for a release, those building from git for a ref."""
    return [h for h in hosts if qemu_ref is None or h.toolchain.qemu_from_git]


def probe(
    inventory,
    qemu: str,
    arch_spec: str,
    ledger: Ledger,
    variant: str | None = None,
    timeout: float = PROBE_TIMEOUT,
    broker: str | None = None,
    progress: Callable[[str, str], None] | None = None,
    on_start: Callable[[int, list[Job]], None] | None = None,
    only: list[str] | None = None,
    qemu_ref: str | None = None,
) -> RunRecord:
    """Plan, record and run the jobs of a run: embedded (threads) or, with a broker, on Celery workers.

    ``only`` restricts the run to those hosts (distributed: their own queues). ``qemu_ref``: a git
    ref or commit of QEMU to build instead of the tag vQEMU (the dumps are filed under ``qemu``).
    """
    version = str(QemuVersion.parse(qemu))
    if qemu_ref is not None and (problem := git_ref_problem(qemu_ref)):
        raise UsageError(f"bad QEMU git ref {qemu_ref!r} (--ref): {problem}")
    work = plan(inventory, arch_spec, variant, only, qemu_ref)
    if timeout <= 0:
        raise UsageError(f"--timeout must be a positive number of seconds, not {timeout:g}")
    if broker:
        from farm.dispatch import distributed

        settings().redelivery_after  # noqa: B018 - a bad FARM_VISIBILITY_TIMEOUT stops us before the run exists
        distributed.check_broker(broker)  # as does a broker that does not answer
    mode = "distributed" if broker else "embedded"
    run = ledger.new_run(version, [a.value for a, _ in work], variant, str(inventory.source), mode, timeout, qemu_ref)
    jobs = [
        (Job(run, version, arch.value, variant, timeout, targeted=bool(only), qemu_ref=qemu_ref),
         _healthy(ledger, hosts))
        for arch, hosts in work
    ]
    for job, _ in jobs:
        ledger.add_job(JobRecord(job.id, run, job.arch, job.variant))
    if on_start:
        on_start(run, [job for job, _ in jobs])
    _dispatch(run, jobs, ledger, broker, progress)
    return ledger.run(run)


def resume(
    ledger: Ledger,
    run: int,
    inventory,
    broker: str | None = None,
    progress: Callable[[str, str], None] | None = None,
    on_start: Callable[[int, list[Job]], None] | None = None,
) -> RunRecord:
    """Finish a run's unfinished jobs: collect what workers finished meanwhile, run the rest again.

    Jobs keep their ids, so a job that did finish is never recorded twice.
    """
    record = ledger.run(run)
    if record.mode == "distributed" and not broker:
        raise UsageError(f"run {run} ran on Celery: give --broker or FARM_BROKER_URL to resume it")
    if (driver := ledger.driver(run)) is not None:
        raise UsageError(f"run {run} is still driven by process {driver.get('pid')} on {driver.get('node')}: "
                         f"wait for it, or stop it with farm runs cancel {run}")
    if record.mode == "distributed" and broker:
        from farm.dispatch import distributed

        settings().redelivery_after  # noqa: B018 - checked before anything moves
        distributed.check_broker(broker)
    timeout = record.timeout or PROBE_TIMEOUT
    jobs = []
    for j in record.jobs:
        if j.final:
            continue
        hosts = _builders(inventory.hosts_for(Architecture.parse(j.arch), j.variant), record.qemu_ref)
        jobs.append((Job(run, record.qemu, j.arch, j.variant, timeout, qemu_ref=record.qemu_ref),
                     _healthy(ledger, hosts)))
    if on_start:
        on_start(run, [job for job, _ in jobs])
    ledger.reopen_run(run)
    _dispatch(run, jobs, ledger, broker if record.mode == "distributed" else None, progress, resume=True)
    return ledger.run(run)


def _healthy(ledger: Ledger, hosts: list) -> list:
    """The hosts not quarantined."""
    quarantined = ledger.quarantined()
    return [h for h in hosts if h.name not in quarantined]


def cancel(ledger: Ledger, run: int, which: list[str] | None = None, broker: str | None = None) -> list[JobRecord]:
    """Cancel a run's unfinished jobs (``which``: job ids or arch[+variant] columns; default all):
    each is recorded ``cancelled`` at once, the process driving the run stops it (it watches the
    ledger), and, for a distributed run, the workers are told to stop it and drop it from their
    queues. The jobs cancelled."""
    record = ledger.run(run)
    if record.mode == "distributed" and not broker:
        raise UsageError(f"run {run} runs on Celery: give --broker or FARM_BROKER_URL to cancel it")
    known = {j.id for j in record.jobs} | {column(j.arch, j.variant) for j in record.jobs}
    unknown = [w for w in which or [] if w not in known]
    if unknown:
        raise UsageError(f"run {run} has no job {', '.join(unknown)} (its jobs: "
                         f"{', '.join(column(j.arch, j.variant) for j in record.jobs)})")
    chosen = [j for j in record.jobs if not j.final
              and (not which or j.id in which or column(j.arch, j.variant) in which)]
    reason = "cancelled (farm runs cancel)"
    for j in chosen:
        ledger.finish_job(JobRecord(j.id, j.run, j.arch, j.variant, j.host, status="cancelled", reasons=[reason],
                                    started=j.started, log=j.log))
    if chosen and record.mode == "distributed" and broker:
        from farm.dispatch import distributed

        distributed.cancel(broker, [j.id for j in chosen], reason)
    if ledger.driver(run) is None:
        ledger.finish_run(run)
    return [ledger.job(j.id) for j in chosen]


def _dispatch(run: int, jobs, ledger: Ledger, broker: str | None, progress, resume: bool = False) -> None:
    cancels = {job.id: Cancellation() for job, _ in jobs}

    def watch() -> None:  # jobs ended by someone else (farm runs cancel) are stopped here
        for j in ledger.jobs(run):
            if j.final and j.id in cancels and not cancels[j.id].cancelled:
                cancels[j.id].cancel("; ".join(j.reasons) or f"the job is {j.status}")

    try:
        with ledger.driving(run, watch):
            if broker:
                from farm.dispatch import distributed

                distributed.dispatch(jobs, ledger, broker, progress, resume=resume, cancels=cancels)
            else:
                from farm.dispatch import embedded

                embedded.dispatch(jobs, ledger, progress, cancels)
    finally:
        ledger.finish_run(run)
