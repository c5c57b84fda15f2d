"""farm.jobs pieces a dispatcher shares between its jobs: host slots (given back as soon as the
host's part of a job is over) and the judges (dumps assessed in worker processes when a
process runs many jobs at once). Real dumps from libvirt's tree; real processes."""

from __future__ import annotations

import os
import threading
import time

import pytest

from farm.inventory import Host
from farm.jobs import HostSlots, Job, Judges, assess
from tests.standin import RECORDED


def recorded() -> str:
    if not RECORDED.is_file():
        pytest.skip(f"{RECORDED} missing: run ./bootstrap test (it fetches libvirt 11.3.0)")
    return RECORDED.read_text()


def summary(a) -> tuple:
    i = a.inspection
    return str(a.name), a.wrong_version, i.verdict, i.reasons, i.warnings, str(i.facts.qemu_version)


def test_judging_processes_assess_exactly_as_the_job_thread_does():
    text = recorded()
    damaged = text.replace('"libvirt-5"', '"libvirt-6"', 1)
    cases = [(Job(1, "9.2.0", "x86_64"), text),  # real, ok
             (Job(2, "9.1.0", "x86_64"), text),  # another release: wrong-version, filed under 9.2.0
             (Job(3, "9.2.0", "x86_64"), damaged)]  # ids out of order: invalid, with the line
    judges = Judges(2)
    try:
        answers = [judges(job, dump) for job, dump in cases]
        pids = judges._pool.submit(os.getpid).result(), os.getpid()
    finally:
        judges.close()
    assert pids[0] != pids[1], "the judges ran in this process"
    assert [summary(a) for a in answers] == [summary(assess(job, dump)) for job, dump in cases]
    assert answers[0].inspection.verdict.value == "real" and answers[0].wrong_version is None
    assert answers[1].wrong_version == "asked for QEMU 9.1.0, the binary is QEMU 9.2.0"
    assert str(answers[1].name) == "caps_9.2.0_x86_64.replies"
    assert answers[2].inspection.verdict.value == "invalid"
    assert any("expected 'libvirt-5'" in r for r in answers[2].inspection.reasons)


def test_a_dispatcher_judges_in_processes_only_when_it_runs_many_jobs_at_once():
    assert Judges.for_slots(1).processes == 0 and Judges.for_slots(2).processes == 0
    many = Judges.for_slots(32)
    assert many.processes == min(os.cpu_count() or 1, 4)
    assert Judges.for_slots(3) is many  # one warm set of processes per coordinator process


def host(name: str, max_jobs: int = 1) -> Host:
    return Host.model_validate({"name": name, "transport": "local", "arch": "x86_64", "max_jobs": max_jobs})


def test_a_slot_given_back_early_takes_the_next_job_and_is_given_back_once():
    slots = HostSlots([host("a")])
    taken = threading.Event()
    second = []

    def next_job() -> None:
        with slots.take([host("a")]) as (h, _):
            second.append(h.name)
            taken.set()

    with slots.take([host("a")]) as (h, release):
        assert h.name == "a"
        waiting = threading.Thread(target=next_job)
        waiting.start()
        time.sleep(0.2)
        assert not taken.is_set(), "a busy host took a second job"
        release()  # the host's part is over (judging goes on here)
        assert taken.wait(5), "the slot given back did not take the waiting job"
        release()  # again, and at the end of the block: no extra slot appears
    waiting.join(5)
    assert second == ["a"] and slots._free == {"a": 1} and slots.size == 1


def test_a_judging_process_that_dies_is_replaced_and_the_dump_still_judged():
    import signal

    text = recorded()
    job = Job(1, "9.2.0", "x86_64")
    judges = Judges(1)
    try:
        assert judges(job, text).inspection.verdict.value == "real"
        (worker,) = judges._pool._processes
        os.kill(worker, signal.SIGKILL)  # e.g. the OOM killer
        time.sleep(0.5)
        assert judges(job, text).inspection.verdict.value == "real"
        assert judges(job, text).inspection.verdict.value == "real"
        assert worker not in judges._pool._processes
    finally:
        judges.close()


def test_a_slot_given_back_goes_to_the_first_job_in_line_that_can_use_that_host():
    a, b = host("a"), host("b")
    slots = HostSlots([a, b])
    got: dict[str, str] = {}
    done = {name: threading.Event() for name in ("only-b", "a-or-b", "only-a")}

    def job(name: str, candidates: list) -> None:
        with slots.take(candidates) as (h, _):
            got[name] = h.name
            done[name].set()
            time.sleep(0.2)

    with slots.take([a]) as (first_a, release_a), slots.take([b]) as (first_b, release_b):
        assert (first_a.name, first_b.name) == ("a", "b")
        threads = []
        for name, candidates in (("only-b", [b]), ("a-or-b", [a, b]), ("only-a", [a])):
            threads.append(threading.Thread(target=job, args=(name, candidates)))
            threads[-1].start()
            time.sleep(0.1)  # in this order in line
        release_a()  # "only-b" cannot use a: the next in line that can, "a-or-b", gets it
        assert done["a-or-b"].wait(5) and got["a-or-b"] == "a"
        assert not done["only-b"].is_set() and not done["only-a"].is_set()
        release_b()
        assert done["only-b"].wait(5) and got["only-b"] == "b"
    for t in threads:
        t.join(5)
    assert got == {"a-or-b": "a", "only-b": "b", "only-a": "a"}
    assert slots._free == {"a": 1, "b": 1} and slots._line == []


def standin_hosts(tmp_path, count: int) -> list[Host]:
    """Local hosts whose libvirt probe replays libvirt's recorded dump at once (tests/standin.py)."""
    from tests.standin import standin_builddir

    recorded()
    build = standin_builddir(tmp_path / "standin", delay=0)
    return [Host.model_validate({"name": f"standin-{i}", "transport": "local", "arch": "x86_64",
                                 "toolchain": {"libvirt": f"builddir:{build}", "qemu": "system",
                                               "cache_dir": str(tmp_path / "cache")}})
            for i in range(count)]


def test_the_host_slot_is_free_while_its_dump_is_judged(tmp_path):
    from farm.jobs import execute

    (h,) = standin_hosts(tmp_path, 1)
    slots = HostSlots([h])
    seen = []

    def judges(job, text):
        seen.append(slots._free[h.name])  # the host's slot while judging
        return assess(job, text)

    outcome = execute(Job(1, "9.2.0", "x86_64"), [h], slots=slots, judges=judges)
    assert outcome.record.status == "ok", outcome.record.reasons
    assert seen == [1], "the host was still held while its dump was judged"


def test_the_embedded_dispatcher_judges_in_processes_with_many_slots(tmp_path):
    from farm.dispatch import embedded
    from farm.ledger import JobRecord, Ledger

    hosts = standin_hosts(tmp_path, 3)
    ledger = Ledger(tmp_path / "state")
    work = []
    for _ in range(3):
        run = ledger.new_run("9.2.0", ["x86_64"], None, None, "embedded")
        job = Job(run, "9.2.0", "x86_64")
        ledger.add_job(JobRecord(job.id, run, job.arch, job.variant))
        work.append((job, hosts))
    records = embedded.dispatch(work, ledger)
    assert [(r.status, r.verdict) for r in records] == [("ok", "real")] * 3
    pool = Judges.for_slots(3)._pool
    assert pool is not None and pool._processes, "the dumps were not judged in judging processes"
