"""The ledger: runs and jobs in SQLite, artifacts kept once per job."""

from __future__ import annotations

import sqlite3
import threading

import pytest

from farm.errors import UsageError
from farm.ledger import JobRecord, Ledger


def test_a_job_ends_once_and_its_artifact_is_never_overwritten(tmp_path):
    ledger = Ledger(tmp_path / "state")
    run = ledger.new_run("9.1.0", ["x86_64"], None, "inventory.yaml", "embedded")
    ledger.add_job(JobRecord("run-1-x86_64", run, "x86_64", None))
    ledger.add_job(JobRecord("run-1-x86_64", run, "x86_64", None))  # a redelivery adds nothing
    assert len(ledger.jobs(run)) == 1

    good = tmp_path / "good.replies"
    good.write_text("good\n")
    artifact = ledger.store_artifact(run, "run-1-x86_64", "caps_9.1.0_x86_64.replies", good.read_text(), {"verdict": "real"})
    assert artifact.read_text() == "good\n"
    assert (artifact.parent / "provenance.json").is_file()

    first = ledger.finish_job(JobRecord("run-1-x86_64", run, "x86_64", None, "h1", "ok", "real", ["kvm"], artifact=str(artifact)))
    assert first.status == "ok" and first.finished

    other = tmp_path / "other.replies"
    other.write_text("other\n")
    again = ledger.store_artifact(run, "run-1-x86_64", "caps_9.1.0_x86_64.replies", other.read_text(), {"verdict": "fake"})
    assert again == artifact and artifact.read_text() == "good\n"
    second = ledger.finish_job(JobRecord("run-1-x86_64", run, "x86_64", None, "h2", "failed", None, ["lost"]))
    assert (second.status, second.host, second.verdict) == ("ok", "h1", "real")

    ledger.finish_run(run)
    record = ledger.run(run)
    assert record.status == "done" and record.jobs[0].artifact == str(artifact)
    assert [r.id for r in ledger.runs()] == [run]


def test_unfinished_jobs_leave_the_run_incomplete(tmp_path):
    ledger = Ledger(tmp_path)
    run = ledger.new_run("9.1.0", ["x86_64", "s390x"], None, None, "embedded")
    ledger.add_job(JobRecord("a", run, "x86_64", None))
    ledger.add_job(JobRecord("b", run, "s390x", None))
    ledger.start_job("a", "h1")
    ledger.finish_job(JobRecord("b", run, "s390x", None, "h2", "fake", "fake", ["TCG"]))
    ledger.finish_run(run)
    record = ledger.run(run)
    assert record.status == "incomplete"
    assert {j.id: j.status for j in record.jobs} == {"a": "running", "b": "fake"}


def test_concurrent_writers(tmp_path):
    """Threads of the embedded dispatcher write at once (WAL, busy timeout)."""
    ledger = Ledger(tmp_path)
    run = ledger.new_run("9.1.0", ["x86_64"], None, None, "embedded")

    def work(i: int) -> None:
        ledger.add_job(JobRecord(f"j{i}", run, "x86_64", None))
        ledger.start_job(f"j{i}", "h")
        ledger.finish_job(JobRecord(f"j{i}", run, "x86_64", None, "h", "ok", "real"))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(j.status for j in ledger.jobs(run)) == ["ok"] * 16
    assert sqlite3.connect(ledger.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_unknown_run_is_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="no run 42"):
        Ledger(tmp_path).run(42)


def test_a_ledger_from_before_qemu_refs_gets_the_column(tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    old = sqlite3.connect(state / "ledger.sqlite")
    old.execute("CREATE TABLE runs (id INTEGER PRIMARY KEY AUTOINCREMENT, qemu TEXT NOT NULL, archs TEXT NOT NULL, "
                "variant TEXT, inventory TEXT, mode TEXT NOT NULL DEFAULT 'embedded', timeout REAL, "
                "status TEXT NOT NULL DEFAULT 'running', created REAL NOT NULL, finished REAL)")
    old.execute("INSERT INTO runs (qemu, archs, created) VALUES ('9.1.0', '[\"x86_64\"]', 1)")
    old.commit()
    old.close()
    ledger = Ledger(state)
    assert ledger.run(1).qemu_ref is None
    run = ledger.new_run("10.0.0", ["x86_64"], None, None, "embedded", 600, "0123abcd" * 5)
    assert ledger.run(run).qemu_ref == "0123abcd" * 5
    assert ledger.run(run).to_json()["qemu_ref"] == "0123abcd" * 5
