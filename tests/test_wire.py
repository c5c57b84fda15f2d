"""The coordinator believes nothing a worker says that it did not check (farm/dispatch/wire.py):
results forged, tampered with, oversized or claiming more than their dump shows are failed jobs
saying why, with nothing written outside the artifact store. Real dumps from libvirt's tree; one
forgery goes through a real redis-server and a real `farm worker`."""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest

from farm.dispatch.wire import open_sealed, seal
from farm.jobs import Attempt, Job, Outcome
from farm.ledger import JobRecord
from tests.helpers import farm
from tests.standin import QEMU, RECORDED, standin_builddir
from tests.test_faults import local_inventory

KEY = b"k" * 32
JOB = Job(1, QEMU, "x86_64")


def outcome(status="ok", dump: str | None = None, host="x86-a", **record) -> Outcome:
    r = JobRecord(JOB.id, 1, "x86_64", None, host, status=status, verdict="real", started=1.0, finished=2.0,
                  provenance={"job": JOB.id, "host": {"name": host, "arch": "x86_64", "facts": {"kvm": {"usable": True}}}},
                  **record)
    return Outcome(r, dump, attempts=[Attempt(host, status, "")])


def reopen(sealed: dict, allowed=("x86-a",), job: Job = JOB) -> Outcome:
    return open_sealed(sealed, job, list(allowed), KEY)


def reseal(payload: dict) -> dict:
    """A payload sealed with the right key (what only a worker of this farm can make)."""
    import hashlib
    import hmac

    body = json.dumps(payload)
    return {"result": body, "mac": hmac.new(KEY, body.encode(), hashlib.sha256).hexdigest()}


@pytest.fixture(scope="module")
def real_dump() -> str:
    if not RECORDED.is_file():
        pytest.skip("libvirt 11.3.0's test data is not in the cache (./bootstrap)")
    return RECORDED.read_text()


def test_a_sealed_result_opens_and_the_coordinator_judges_the_dump_itself(real_dump):
    got = reopen(seal(outcome(dump=real_dump), KEY))
    assert (got.record.status, got.record.verdict, got.name) == ("ok", "real", "caps_9.2.0_x86_64.replies")
    assert got.dump == real_dump


def test_a_result_claiming_ok_for_a_fake_dump_is_judged_fake(real_dump):
    tcg = real_dump.replace('"enabled": true', '"enabled": false')
    got = reopen(seal(outcome(dump=tcg), KEY))
    assert got.record.status in ("fake", "invalid")
    assert "the worker judged it ok; the coordinator judged it" in got.record.log[-1]


def test_a_result_whose_dump_is_another_release_is_filed_under_the_coordinators_name(real_dump):
    job = Job(1, "9.1.0", "x86_64")
    sealed = seal(outcome(dump=real_dump), KEY)
    payload = json.loads(sealed["result"])
    payload["job"] = job.id
    got = open_sealed(reseal(payload), job, ["x86-a"], KEY)
    assert (got.record.status, got.name) == ("wrong-version", "caps_9.2.0_x86_64.replies")


@pytest.mark.parametrize("forge, why", [
    (lambda s: {**s, "mac": "0" * 64}, "its seal does not verify"),
    (lambda s: {**s, "result": s["result"].replace('"ok"', '"fake"', 1)}, "its seal does not verify"),
    (lambda s: {"record": {"status": "ok"}, "name": "../../../../tmp/pwned"}, "not a sealed farm result"),
    (lambda s: "ok", "not a sealed farm result"),
    (lambda s: None, "not a sealed farm result"),
    (lambda s: {"result": "x" * (25 << 20), "mac": s["mac"]}, "larger than 24 MiB"),
])
def test_a_forged_or_tampered_result_is_a_failed_job_saying_why(real_dump, forge, why):
    got = reopen(forge(seal(outcome(dump=real_dump), KEY)))
    assert got.record.status == "failed" and got.dump is None and got.name is None
    assert got.record.reasons[0].startswith("worker result rejected: ") and why in got.record.reasons[0]


@pytest.mark.parametrize("change, why", [
    (lambda p: p.update(job="run-9-x86_64"), "it is the result of job 'run-9-x86_64', not of run-1-x86_64"),
    (lambda p: p.update(host="elsewhere"), "host 'elsewhere' was not allowed"),
    (lambda p: p["attempts"].append({"host": "../etc", "status": "failed", "reason": ""}), "malformed"),
    (lambda p: p.update(name="../../x"), "malformed"),
    (lambda p: p.update(status="root"), "malformed"),
    (lambda p: p.update(dump=None), "it says ok but brings no dump"),
    (lambda p: p.update(dump="!!!not base64"), "its dump is damaged"),
    (lambda p: p.update(dump=base64.b64encode(zlib.compress(b"\0" * (65 << 20))).decode()), "larger than 64 MiB"),
    (lambda p: p.update(dump=base64.b64encode(zlib.compress(b"\xff\xfe")).decode()), "its dump is damaged"),
    (lambda p: p.update(reasons=["x" * 5000]), "malformed"),
    (lambda p: p.update(log=["x"] * 6000), "malformed"),
    (lambda p: p["provenance"]["host"].update(facts={"big": "x" * (2 << 20)}), "provenance is larger"),
    (lambda p: p["provenance"].update(root="yes"), "malformed"),
    (lambda p: p["provenance"].update(farm={"version": "0", "coordinator": "evil", "pid": "me"}), "malformed"),
])
def test_a_sealed_result_that_claims_what_the_coordinator_did_not_plan_is_refused(real_dump, change, why):
    payload = json.loads(seal(outcome(dump=real_dump), KEY)["result"])
    change(payload)
    got = reopen(reseal(payload))
    assert got.record.status == "failed" and got.name is None
    assert why in got.record.reasons[0], got.record.reasons


def test_a_sealed_result_nested_a_hundred_thousand_deep_is_refused_not_a_traceback(real_dump):
    import hashlib
    import hmac

    body = seal(outcome(dump=real_dump), KEY)["result"]
    body = body[:-1] + ', "deep": ' + "[" * 100_000 + "]" * 100_000 + "}"
    got = reopen({"result": body, "mac": hmac.new(KEY, body.encode(), hashlib.sha256).hexdigest()})
    assert got.record.status == "failed" and "malformed" in got.record.reasons[0]


def test_a_failed_result_without_a_dump_is_taken_as_the_workers_failure():
    got = reopen(seal(outcome(status="failed", reasons=["host 'x86-a': unreachable"]), KEY))
    assert (got.record.status, got.record.reasons) == ("failed", ["host 'x86-a': unreachable"])
    assert got.attempts == [Attempt("x86-a", "failed", "", False)]


def test_a_forged_result_in_real_redis_is_refused_and_writes_nothing(env, redis_server, workers, tmp_path):
    """Someone with only Redis access writes celery-task-meta-<job> while the real job runs: the
    coordinator refuses it (failed, saying why), writes no file where it names, and the worker's
    later genuine result does not overwrite the first final one."""
    import redis

    standin = standin_builddir(tmp_path / "standin", delay=8)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["x86-a"])
    workers.start("x86-a", str(inventory))
    target = tmp_path / "pwned.replies"
    cli = subprocess.Popen(
        [sys.executable, "-m", "farm", "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory),
         "--broker", redis_server.url, "--json", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    forged = {"record": {"id": JOB.id, "run": 1, "arch": "x86_64", "variant": None, "status": "ok",
                         "verdict": "real", "artifact": str(target)},
              "name": f"../../../../../../..{target}", "dump": base64.b64encode(zlib.compress(b"x")).decode()}
    client = redis.Redis.from_url(redis_server.url)
    deadline = time.monotonic() + 30
    while not client.exists(f"celery-task-meta-{JOB.id}"):
        assert time.monotonic() < deadline, "the job never started"
        time.sleep(0.05)
    meta = json.dumps({"status": "SUCCESS", "result": forged, "traceback": None, "children": [], "task_id": JOB.id})
    deadline = time.monotonic() + 60
    while cli.poll() is None:  # the worker writes its progress over it: write it again until the coordinator looks
        client.set(f"celery-task-meta-{JOB.id}", meta)
        time.sleep(0.02)
        if time.monotonic() > deadline:
            os.killpg(cli.pid, signal.SIGKILL)
            pytest.fail("farm probe did not end")
    out, err = cli.communicate()
    (job,) = json.loads(out)["jobs"]
    assert (job["status"], job["artifact"]) == ("failed", None), err
    assert job["reasons"][0] == "worker result rejected: not a sealed farm result (a worker of another farm " \
                                "version, or forged)"
    assert not target.exists()
    time.sleep(10)  # the genuine result lands meanwhile
    code, shown, _ = farm(env, "runs", "show", "1", "--json")
    assert shown["jobs"][0]["status"] == "failed"
    assert not list(Path(env["FARM_STATE_DIR"]).glob("artifacts/**/*.replies"))
