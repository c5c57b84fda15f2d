"""What a worker sends the coordinator: one job's result, sealed with the farm's result key.

Anyone who can write to Redis can write a Celery result. So a worker seals what it sends
(HMAC-SHA256 with the per-farm result key, ``FARM_RESULT_KEY_FILE``), and the coordinator
opens it: the seal must verify, the payload must parse into ``WireResult`` (bounded sizes, no
unknown fields), the job must be the one it sent, the host one it allowed. Then it decides for
itself: the dump's name and path come from its own plan, and the dump is judged again, here.
A result that fails any of this is a ``failed`` job saying why, never a traceback.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import time
import zlib
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError

from farm.hosts import inflate
from farm.jobs import RETRYABLE, Attempt, Job, Judges, Outcome, assess, judge
from farm.ledger import FINAL, JobRecord, JobStatus
from farm.provenance import Provenance

log = logging.getLogger(__name__)

MAX_SEALED = 24 << 20  # characters of a sealed result (the dump travels compressed: ~100 KB)
MAX_PROVENANCE = 1 << 20  # characters of a result's provenance as JSON
Line = Annotated[str, StringConstraints(max_length=4096)]
HostName = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")]


class WireAttempt(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    host: HostName
    status: JobStatus
    reason: Line
    misconfigured: bool = False


class WireResult(BaseModel):
    """One job's result as a worker reports it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    job: Annotated[str, StringConstraints(max_length=200)]
    status: JobStatus
    host: HostName | None = None
    reasons: list[Line] = Field(default_factory=list, max_length=64)
    log: list[Line] = Field(default_factory=list, max_length=5000)
    started: float | None = None
    finished: float | None = None
    provenance: Provenance | None = None
    attempts: list[WireAttempt] = Field(default_factory=list, max_length=32)
    dump: Annotated[str, StringConstraints(max_length=MAX_SEALED)] | None = None  # base64 of zlib


def seal(outcome: Outcome, key: bytes) -> dict:
    """A worker's outcome as the task's result: the payload and its MAC."""
    r = outcome.record
    payload = WireResult(
        job=r.id, status=r.status, host=r.host, reasons=[x[:4096] for x in r.reasons[:64]],
        log=[x[:4096] for x in r.log[-5000:]], started=r.started, finished=r.finished, provenance=r.provenance,
        attempts=[WireAttempt(host=a.host, status=a.status, reason=a.reason[:4096], misconfigured=a.misconfigured)
                  for a in outcome.attempts],
        dump=base64.b64encode(zlib.compress(outcome.dump.encode(), 6)).decode() if outcome.dump is not None else None,
    )
    body = payload.model_dump_json()
    return {"result": body, "mac": _mac(key, body)}


def _mac(key: bytes, body: str) -> str:
    return hmac.new(key, body.encode(), hashlib.sha256).hexdigest()


class Rejected(Exception):
    """A worker's result the coordinator does not take."""


def open_sealed(data: object, job: Job, allowed: list[str], key: bytes, judges: Judges | None = None) -> Outcome:
    """The coordinator's outcome of ``job`` from a worker's sealed result: checked, judged here.
    A result that does not hold is a failed job naming why (and logged)."""
    try:
        return _open(data, job, set(allowed), key, judges)
    except Rejected as e:
        log.warning("%s: worker result rejected: %s", job.id, e)
        record = JobRecord(job.id, job.run, job.arch, job.variant, status="failed",
                           reasons=[f"worker result rejected: {e}"], started=time.time(), finished=time.time())
        return Outcome(record)


def _open(data: object, job: Job, allowed: set[str], key: bytes, judges: Judges | None) -> Outcome:
    if not isinstance(data, dict) or not isinstance(data.get("result"), str) or not isinstance(data.get("mac"), str):
        raise Rejected("not a sealed farm result (a worker of another farm version, or forged)")
    body = data["result"]
    if len(body) > MAX_SEALED:
        raise Rejected(f"larger than {MAX_SEALED >> 20} MiB")
    if not hmac.compare_digest(_mac(key, body), data["mac"]):
        raise Rejected("its seal does not verify with this farm's result key (forged, or the worker "
                       "has another FARM_RESULT_KEY_FILE)")
    try:
        result = WireResult.model_validate(json.loads(body))
        if result.provenance is not None and len(result.provenance.model_dump_json()) > MAX_PROVENANCE:
            raise ValueError(f"its provenance is larger than {MAX_PROVENANCE >> 10} KiB")
    except (ValueError, ValidationError, RecursionError) as e:
        raise Rejected(f"malformed: {(str(e) or type(e).__name__).splitlines()[0]}") from None
    if not result.status.final or any(not a.status.final for a in result.attempts):
        raise Rejected(f"a result cannot be {result.status}")
    if result.job != job.id:
        raise Rejected(f"it is the result of job {result.job!r}, not of {job.id}")
    for host in [result.host, *(a.host for a in result.attempts)]:
        if host is not None and host not in allowed:
            raise Rejected(f"host {host!r} was not allowed to run it (allowed: {', '.join(sorted(allowed))})")
    provenance: dict = result.provenance.to_json() if result.provenance is not None else {}
    record = JobRecord(job.id, job.run, job.arch, job.variant, result.host, status=result.status.value,
                       reasons=list(result.reasons), started=result.started, finished=result.finished or time.time(),
                       provenance=provenance,
                       log=list(result.log))
    outcome = Outcome(record, attempts=[Attempt(a.host, a.status.value, a.reason, a.misconfigured)
                                        for a in result.attempts])
    if result.dump is None:
        if result.status not in (*RETRYABLE, "cancelled"):
            raise Rejected(f"it says {result.status.value} but brings no dump")
        return outcome
    try:
        outcome.dump = inflate(result.dump)
    except ValueError as e:
        raise Rejected(f"its dump is damaged: {e}") from None
    claimed = (result.status, record.verdict)
    facts = (provenance.get("host") or {}).get("facts")
    outcome.name = str(judge(job, record, (judges or assess)(job, outcome.dump),
                             facts if isinstance(facts, dict) else {}, provenance))
    if claimed[0] != record.status and claimed[0] in FINAL:
        record.log.append(f"the worker judged it {claimed[0]}; the coordinator judged it {record.status}")
        log.warning("%s: the worker judged it %s, the coordinator %s", job.id, claimed[0], record.status)
    return outcome
