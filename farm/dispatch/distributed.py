"""The distributed dispatcher: Celery over Redis.

The coordinator (``farm probe`` with a broker) sends each job to the queue of
its arch (``arch.x86_64``, ``arch.x86_64+amdsev``); ``farm worker --hosts ...``
serves those queues (and ``host.NAME`` for targeted jobs) for its hosts and
runs the same ``jobs.execute`` as the embedded dispatcher. The Celery task id is the
job id, so a redelivered job has one result; the coordinator keeps results in
the ledger (Redis carries work and liveness, SQLite remembers).

Infrastructure failures (host unreachable, no toolchain, timeout) are tried on
the worker's other hosts of that arch, then handed back to the queue for
another worker, up to ``max_retries``. A fake or invalid dump is a result.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import celery.exceptions
import celery.states
import kombu.exceptions
import redis.exceptions
from celery import Celery
from celery.signals import worker_shutting_down
from celery.worker.control import control_command

from farm.caps.arch import Architecture
from farm.caps.names import column
from farm.config import settings
from farm.dispatch.wire import open_sealed, seal
from farm.errors import FarmError, OperationalError
from farm.hosts import Cancellation
from farm.jobs import RETRYABLE, Attempt, HostSlots, Job, Judges, Outcome, execute, keep
from farm.ledger import JobRecord, Ledger

if TYPE_CHECKING:
    from farm.inventory import Host

TASK = "farm.probe"
NIGHTLY = "farm.nightly"  # one nightly pass, sent by `farm beat` at FARM_NIGHTLY_CRON times
COORDINATOR_QUEUE = "farm.coordinator"  # served by `farm worker --coordinator`
NIGHTLY_TIME_LIMIT = 24 * 3600  # a pass probes release after release; the next one is a day later
POLL = 0.5  # seconds between looks at the results
BROKER_PATIENCE = 300  # seconds the coordinator waits for an unreachable broker
BROKER_ERRORS = (
    OSError,
    redis.exceptions.ConnectionError,
    redis.exceptions.TimeoutError,
    kombu.exceptions.OperationalError,
    celery.exceptions.BackendError,
)

CANCEL = "farm_cancel"  # the remote control command that stops jobs where they run
log = logging.getLogger(__name__)

# The jobs this worker process runs now, and those a stopping worker hands back to the queue.
_running: dict[str, Cancellation] = {}
_handed_back: set[str] = set()
# The hosts this worker process serves, and their job slots (max_jobs each).
_served: dict[str, Host] = {}
_slots = HostSlots([])
_judges: list = [None]  # Judges for the slots, set when the worker starts
# One nightly pass, given the broker and where to say what it does: farm.nightly.scheduled_pass
# over the worker's inventory, handed in by `farm worker --coordinator` (this module never
# imports farm.nightly, which plans and probes through farm.run, which dispatches through here)
NightlyPass = Callable[[str, Callable[[str], None]], dict]
_nightly_pass: list[NightlyPass | None] = [None]


def arch_queue(arch: str, variant: str | None = None) -> str:
    return f"arch.{column(arch, variant)}"


def host_queue(name: str) -> str:
    return f"host.{name}"


def readable(job: Job, hosts: list[str]) -> dict[str, str]:
    """What Celery's monitoring (events, Flower, ``celery inspect active``) shows of a job's task
    instead of its raw arguments: ``farm.probe x86_64 9.2.0 run 3``, ``hosts=a,b``."""
    ref = f" ref {job.qemu_ref}" if job.qemu_ref else ""
    return {"argsrepr": f"{column(job.arch, job.variant)} {job.qemu}{ref} run {job.run}",
            "kwargsrepr": f"hosts={','.join(hosts)}"}


def make_app(broker: str) -> Celery:
    s = settings()
    app = Celery("farm", broker=broker, backend=broker, set_as_current=False)
    transport = {"visibility_timeout": s.redelivery_after}
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_track_started=True,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        task_time_limit=s.job_time_limit,
        broker_transport_options=transport,
        result_backend_transport_options=transport,
        result_expires=7 * 24 * 3600,
        result_extended=True,
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,  # a restarted Redis is waited for, not a reason to stop
        result_backend_always_retry=True,
        result_backend_max_retries=100,
        worker_hijack_root_logger=False,
        task_default_queue="farm.default",
        worker_send_task_events=True,  # Flower and `celery events` see the jobs (with readable())
        task_send_sent_event=True,
    )
    try:  # a bad FARM_NIGHTLY_CRON stops `farm beat` (below), not `farm probe`
        app.conf.beat_schedule = {
            "farm-nightly": {"task": NIGHTLY, "schedule": nightly_schedule(s.nightly_cron),
                             "options": {"queue": COORDINATOR_QUEUE}},
        }
    except FarmError:
        pass
    app.task(name=TASK, bind=True, max_retries=None)(_probe)  # retries: _probe counts them
    app.task(name=NIGHTLY, bind=True, acks_late=True, time_limit=NIGHTLY_TIME_LIMIT)(_nightly)
    return app


def nightly_schedule(expression: str):
    """FARM_NIGHTLY_CRON (5 fields) as a Celery crontab in local time, as `farm nightly` reads it."""
    from celery.schedules import crontab
    from celery.utils.time import timezone

    try:
        cron = crontab.from_string(expression)
    except (ValueError, TypeError) as e:
        raise FarmError(f"FARM_NIGHTLY_CRON: bad cron expression {expression!r}: {e}") from None
    cron.tz = timezone.local
    return cron


def beat(app: Celery, loglevel: str = "INFO") -> None:
    """Run the Celery beat scheduler (blocks): it sends ``farm.nightly`` to ``farm.coordinator``
    at each FARM_NIGHTLY_CRON time. Its schedule and pid files are in the state directory; the
    pid file refuses a second `farm beat` of the same state directory."""
    nightly_schedule(settings().nightly_cron)  # a bad expression is an error here
    state = settings().state_dir
    state.mkdir(parents=True, exist_ok=True)
    app.Beat(schedule=str(state / "beat-schedule"), pidfile=str(state / "beat.pid"), loglevel=loglevel,
             no_color=True).run()


# --- the worker side ----------------------------------------------------------------


def serve(app: Celery, hosts: list, loglevel: str = "INFO", nightly_pass: NightlyPass | None = None) -> None:
    """Run a Celery worker for ``hosts`` (blocks). One thread per job slot; with ``nightly_pass``
    one more, serving ``farm.coordinator`` (the nightly task, which runs ``nightly_pass``)."""
    coordinator = nightly_pass is not None
    for host in hosts:
        _served[host.name] = host
    _slots.add(hosts)
    _slots.leases = settings().state_dir / "slots"  # shared with the other farm processes of this machine
    _judges[0] = Judges.for_slots(_slots.size)
    _nightly_pass[0] = nightly_pass
    queues = {COORDINATOR_QUEUE} if coordinator else set()
    for host in hosts:
        queues.add(arch_queue(host.arch.value))
        queues.update(arch_queue(host.arch.value, v) for v in host.variants)
        queues.add(host_queue(host.name))
    name = "+".join([h.name for h in hosts] + (["coordinator"] if coordinator else []))
    app.worker_main([
        "worker", "--pool=threads", f"--concurrency={sum(h.max_jobs for h in hosts) + int(coordinator)}",
        f"--queues={','.join(sorted(queues))}", f"--hostname=farm-{name}@%h",
        "--without-gossip", "--without-mingle", f"--loglevel={loglevel}",
    ])


def _probe(task, job_fields: dict, allowed: list[str], tried: list) -> dict:
    """The Celery task: run one job on one of this worker's hosts of its arch that the
    coordinator allows (not quarantined) and no earlier delivery tried. ``tried``: the
    [host, status, reason] of the earlier deliveries' attempts. A job is tried on at most
    1 + FARM_MAX_RETRIES hosts in all, as in the embedded dispatcher."""
    job = Job(**job_fields)
    arch = Architecture.parse(job.arch)
    earlier = [Attempt(*a) for a in tried]
    done = {a.host for a in earlier}
    candidates = [
        h for h in _served.values() if h.produces(arch, job.variant) and h.name in allowed and h.name not in done
    ]
    # Progress comes from the threads that talk to hosts (an SSH connection's reader, a local
    # agent's stderr drain), where Celery's per-thread request is not this task's: the task's
    # id and worker are taken here, in the task's own thread.
    task_id, worker = task.request.id, task.request.hostname
    where: dict[str, str | None] = {"host": None}

    def say(message: str) -> None:
        task.update_state(task_id=task_id, state="PROGRESS",
                          meta={"host": where["host"], "message": message, "worker": worker})

    def started(job: Job, host) -> None:
        where["host"] = host.name

    attempts = 1 + settings().max_retries
    _running[job.id] = cancel = Cancellation()
    try:
        outcome = execute(job, candidates, say, _slots, started, _judges[0], attempts - len(earlier), earlier, cancel)
    finally:
        del _running[job.id]
    if job.id in _handed_back and outcome.record.status == "cancelled":
        _handed_back.discard(job.id)
        log.warning("%s: handed back to the queue (this worker is stopping)", job.id)
        raise task.retry(args=[job_fields, allowed, tried], countdown=0, **readable(job, allowed))
    tried_now = earlier + outcome.attempts
    others = set(allowed) - {a.host for a in tried_now}
    if outcome.record.status in RETRYABLE and outcome.attempts and len(tried_now) < attempts and others:
        say(f"{outcome.record.status}: handing the job to another host")
        raise task.retry(args=[job_fields, allowed, [list(t) for t in tried_now]], countdown=1,
                         **readable(job, allowed))
    return seal(outcome, settings().result_key())


@control_command(args=[("job_ids", list), ("reason", str)], signature="JOB_IDS REASON")
def farm_cancel(state, job_ids: list, reason: str = "cancelled") -> dict:
    """Remote control command: stop these jobs where this worker runs them (they end `cancelled`)."""
    hit = [job_id for job_id in job_ids if job_id in _running]
    for job_id in hit:
        _running[job_id].cancel(str(reason))
    return {"ok": f"cancelled {len(hit)} job(s)"}


@worker_shutting_down.connect
def _stopping(sig=None, how=None, exitcode=None, **kwargs) -> None:
    """A worker told to stop gives its jobs FARM_WORKER_GRACE seconds (none when told to stop at
    once), then stops the rest on their hosts and hands them back to the queue: never lost,
    never run to completion twice."""
    grace = 0 if how == "Cold" else settings().worker_grace
    if _running:
        log.warning("stopping: %d job(s) running, %d s to finish before they are handed back", len(_running), grace)
    threading.Thread(target=_hand_back, args=(grace,), name="farm-hand-back", daemon=True).start()


def _hand_back(grace: float) -> None:
    deadline = time.monotonic() + grace
    while _running and time.monotonic() < deadline:
        time.sleep(0.2)
    for job_id, cancel in list(_running.items()):
        _handed_back.add(job_id)
        cancel.cancel("the worker stopped before the job ended (handed back to the queue)")


def _nightly(task) -> dict:
    """The Celery task: one nightly pass (the worker's ``nightly_pass``), its jobs sent to the
    workers through this broker; its JSON summary."""
    from celery.utils.log import get_task_logger

    if _nightly_pass[0] is None:  # only a worker serving farm.coordinator receives it
        raise FarmError("this worker runs no nightly passes (farm worker --coordinator does)")
    return _nightly_pass[0](task.app.conf.broker_url, get_task_logger(NIGHTLY).info)


# --- the coordinator side -------------------------------------------------------------


def workers(app: Celery, timeout: float = 2.0) -> dict[str, list[str]]:
    """The workers that answer now and the queues each serves; OperationalError (one line) when
    the broker cannot be reached or refuses us (a wrong password, TLS that does not verify)."""
    try:
        answers = app.control.inspect(timeout=timeout).active_queues() or {}
    except BROKER_ERRORS as e:
        raise OperationalError(f"broker {_shown(app.conf.broker_url)}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'unreachable'}") from None
    return {worker: sorted(q["name"] for q in queues) for worker, queues in answers.items()}


def live_queues(app: Celery, timeout: float = 2.0) -> set[str]:
    """The queues served by workers that answer now."""
    return {q for queues in workers(app, timeout).values() for q in queues}


def check_broker(broker: str) -> None:
    """The broker answers (before a run is created): OperationalError (one line) otherwise."""
    app = make_app(broker)
    try:
        with app.connection_for_write() as connection:
            connection.ensure_connection(max_retries=1, timeout=5)
        app.backend.client.ping()
    except BROKER_ERRORS as e:
        raise OperationalError(f"broker {_shown(broker)}: {type(e).__name__}: "
                               f"{str(e).splitlines()[0] if str(e) else 'unreachable'}") from None


def _shown(url: str) -> str:
    """A broker URL without its password, for messages."""
    from farm.config import without_password

    return without_password(url)


def dispatch(
    work: list[tuple[Job, list]],
    ledger: Ledger,
    broker: str,
    progress: Callable[[str, str], None] | None = None,
    resume: bool = False,
    cancels: dict[str, Cancellation] | None = None,
) -> list[JobRecord]:
    """Send each job to its arch's queue and wait for all of them.

    Resuming, a job a worker finished is collected and one a live worker still works on is
    waited for, not sent again; one Redis does not know (lost with a restarted Redis) is sent.
    A job no live worker can take fails at once, naming its queue. ``cancels`` (by job id):
    a cancelled job is not waited for (`farm runs cancel` recorded it and told the workers).
    """
    app = make_app(broker)
    live = live_queues(app)
    sent = {}
    for job, hosts in work:
        queue = arch_queue(job.arch, job.variant)
        served = [h.name for h in hosts if host_queue(h.name) in live]
        if resume:
            known = app.AsyncResult(job.id)
            if known.state in celery.states.READY_STATES or (known.state != "PENDING" and served):
                sent[job.id] = Sent(job, [h.name for h in hosts], known)
                continue
        if not served:
            why = "no healthy host" if not hosts else "no live worker serves a healthy host"
            keep(ledger, _failed(job, f"{why} of {queue} (start one: farm worker --hosts HOST,...)"))
            continue
        if job.targeted:  # the host's own queue: the worker serving it takes the job
            queue = host_queue(served[0])
        sent[job.id] = Sent(job, served, app.send_task(TASK, args=[dataclasses.asdict(job), served, []], queue=queue,
                                                       task_id=job.id, **readable(job, served)))
    return wait(app, sent, ledger, progress, cancels or {})


def cancel(broker: str, job_ids: list[str], reason: str) -> None:
    """Tell the workers to stop these jobs: revoked (a worker drops them from its queue) and
    cancelled where they run (the ``farm_cancel`` remote control command)."""
    app = make_app(broker)
    try:
        app.control.revoke(job_ids)
        app.control.broadcast(CANCEL, arguments={"job_ids": job_ids, "reason": reason})
    except BROKER_ERRORS as e:
        raise OperationalError(f"broker unreachable ({e}): the jobs are recorded cancelled, "
                               "but the workers were not told; they finish them, and the results are dropped") from None


def wait(app: Celery, sent: dict, ledger: Ledger, progress: Callable[[str, str], None] | None = None,
         cancels: dict[str, Cancellation] | None = None) -> list[JobRecord]:
    """Poll results until every sent job is done; keep each in the ledger as it ends.

    While the broker is unreachable (a Redis restart) it keeps trying for
    ``BROKER_PATIENCE`` seconds, then stops with an error naming `farm runs resume`.
    """
    say = progress or (lambda job_id, message: None)
    cancels = cancels or {}
    key = settings().result_key()
    judges = Judges.for_slots(len(sent))
    done: list[JobRecord] = []
    shown: dict[str, str] = {}
    unreachable_since = None
    while sent:
        for job_id in [j for j in sent if j in cancels and cancels[j].cancelled]:
            del sent[job_id]
            done.append(ledger.job(job_id))
            say(job_id, f"cancelled: {cancels[job_id].reason}")
        try:
            for job_id, result in list(sent.items()):
                record = _look(job_id, result, ledger, say, shown, key, judges)
                if record is not None:
                    done.append(record)
                    del sent[job_id]
            unreachable_since = None
        except BROKER_ERRORS as e:
            now = time.monotonic()
            unreachable_since = unreachable_since or now
            if now - unreachable_since > BROKER_PATIENCE:
                run = ledger.job(next(iter(sent))).run
                raise OperationalError(f"broker unreachable for {BROKER_PATIENCE} s ({e}); "
                                       f"the workers go on: collect with farm runs resume {run}") from None
            for job_id in sent:
                if shown.get(job_id) != "broker unreachable":
                    shown[job_id] = "broker unreachable"
                    say(job_id, "broker unreachable, waiting for it")
        if sent:
            time.sleep(POLL)
    return done


@dataclasses.dataclass
class Sent:
    """A job the coordinator sent: its plan, the hosts it allowed, Celery's handle of its result."""

    job: Job
    allowed: list[str]
    result: Any  # a celery AsyncResult


def _look(job_id: str, sent: Sent, ledger: Ledger, say, shown: dict, key: bytes, judges: Judges) -> JobRecord | None:
    """One look at a job's result: progress is shown, an end is checked, judged and kept."""
    result = sent.result
    state = result.state
    if state in ("STARTED", "PROGRESS", "RETRY"):
        info = result.info if isinstance(result.info, dict) else {}
        message = str(info.get("message") or state.lower())[:500]
        if shown.get(job_id) != message:
            shown[job_id] = message
            if isinstance(info.get("host"), str) and info["host"] in sent.allowed:
                ledger.start_job(job_id, info["host"])
            say(job_id, message)
    elif state == "SUCCESS":
        return keep(ledger, open_sealed(result.result, sent.job, sent.allowed, key, judges))
    elif state in ("FAILURE", "REVOKED"):
        return keep(ledger, _failed(sent.job, f"worker: {state.lower()}: {str(result.result)[:500]}"))
    return None


def _failed(job, reason: str) -> Outcome:
    return Outcome(JobRecord(job.id, job.run, job.arch, job.variant, status="failed", reasons=[reason],
                             started=time.time()))
