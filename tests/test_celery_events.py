"""Celery's own monitoring sees the farm: `farm worker` sends task events and the coordinator the
task-sent event, so Flower, `celery events` and `celery inspect` show each farm.probe task with a
readable line (`farm.probe x86_64 9.2.0 run 1`, `hosts=standin-1`) instead of the job's raw fields.

Real redis-server, real `farm worker` and `farm probe` processes, Celery's real event receiver and
remote control; only the probe is the stand-in (tests/standin.py: it replays a recorded real dump,
since this machine cannot be every arch)."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

from celery import Celery

from farm.dispatch.distributed import readable
from farm.jobs import Job
from tests.standin import QEMU, standin_builddir
from tests.test_faults import local_inventory, start_probe

JOB = "run-1-x86_64"
ARGS = f"x86_64 {QEMU} run 1"


class Events:
    """Celery's event receiver (as `celery events` and Flower use it) in a thread, keeping every event."""

    def __init__(self, broker: str):
        self.app = Celery("monitor", broker=broker, set_as_current=False)
        self.seen: list[dict] = []
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.receiver = None

    def _run(self) -> None:
        with self.app.connection_for_read() as connection:
            self.receiver = self.app.events.Receiver(connection, handlers={"*": self.seen.append})
            self.receiver.consume_from = None
            self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def __enter__(self) -> Events:
        self.thread.start()
        assert self.ready.wait(30)
        time.sleep(1)  # the receiver's queue is bound before the first event is sent
        return self

    def __exit__(self, *exc) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(15)

    def of(self, job_id: str) -> dict[str, dict]:
        return {e["type"]: e for e in list(self.seen) if e.get("uuid") == job_id}

    def wait_for(self, job_id: str, kind: str, timeout: float) -> dict[str, dict]:
        deadline = time.monotonic() + timeout
        while kind not in self.of(job_id) and time.monotonic() < deadline:
            time.sleep(0.2)
        return self.of(job_id)


def test_a_running_farm_probe_task_is_seen_by_celerys_event_receiver_and_inspect(env, redis_server, workers, tmp_path):
    standin = standin_builddir(tmp_path / "standin", delay=20)
    inventory = local_inventory(tmp_path / "inventory.yaml", standin, ["standin-1"])
    workers.start("standin-1", str(inventory))
    with Events(redis_server.url) as events:
        cli = start_probe(env, "--inventory", str(inventory), "--broker", redis_server.url)

        # while it runs, remote control lists it: its job's fields, and (safe) its readable line
        active: list[dict] = []
        deadline = time.monotonic() + 60
        while not active and time.monotonic() < deadline:
            replies = events.app.control.inspect(timeout=2).active() or {}
            active = [t for tasks in replies.values() for t in tasks if t["id"] == JOB]
        assert active, f"inspect().active() never listed {JOB}"
        (task,) = active
        assert task["name"] == "farm.probe"
        assert {k: task["args"][0][k] for k in ("arch", "qemu", "run")} == {"arch": "x86_64", "qemu": QEMU, "run": 1}
        safe = events.app.control.inspect(timeout=5).active(safe=True) or {}
        assert [(t["name"], t["args"], t["kwargs"]) for tasks in safe.values() for t in tasks if t["id"] == JOB] \
            == [("farm.probe", ARGS, "hosts=standin-1")]

        # and so does the `celery inspect` command line, against the farm's broker
        shown = subprocess.run([str(Path(sys.executable).parent / "celery"), "--broker", redis_server.url,
                                "inspect", "active", "--json"], capture_output=True, text=True, timeout=60)
        assert JOB in shown.stdout and '"arch": "x86_64"' in shown.stdout, shown.stdout + shown.stderr

        out, err = cli.communicate(timeout=180)
        (job,) = json.loads(out)["jobs"]
        assert (job["status"], job["verdict"]) == ("ok", "real"), (job, err[-2000:])
        seen = events.wait_for(JOB, "task-succeeded", 30)

    assert {"task-sent", "task-received", "task-started", "task-succeeded"} <= set(seen), sorted(seen)
    received, sent = seen["task-received"], seen["task-sent"]
    assert f"{received['name']} {received['args']}" == f"farm.probe {ARGS}"
    assert received["kwargs"] == "hosts=standin-1"
    assert (sent["name"], sent["args"], sent["queue"]) == ("farm.probe", ARGS, "arch.x86_64")
    assert seen["task-started"]["timestamp"] <= seen["task-succeeded"]["timestamp"]
    assert seen["task-succeeded"]["hostname"].startswith("farm-standin-1@")


def test_the_readable_line_names_arch_variant_release_ref_and_hosts():
    job = Job(run=7, qemu="10.1.0", arch="x86_64", variant="amdsev", qemu_ref="abc123")
    assert readable(job, ["a", "b"]) == {"argsrepr": "x86_64+amdsev 10.1.0 ref abc123 run 7",
                                         "kwargsrepr": "hosts=a,b"}
