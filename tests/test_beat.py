"""farm beat: the Celery beat entry sends a nightly pass to `farm worker --coordinator` at each
FARM_NIGHTLY_CRON time. Real redis-server, real worker and beat processes; a local git repository
stands in for QEMU's and a stand-in libvirt probe replays a recorded QEMU 9.2.0 dump."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import farm
from tests.test_nightly import nightly_env  # noqa: F401 (a fixture)

pytestmark = pytest.mark.slow


@pytest.fixture
def beat(workers, tmp_path):
    procs = []

    def start() -> subprocess.Popen:
        log = open(tmp_path / "beat.log", "w")  # noqa: SIM115 (the process keeps it)
        proc = subprocess.Popen([sys.executable, "-m", "farm", "beat", "--broker", workers.broker, "--loglevel", "INFO"],
                                env=workers.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        procs.append(proc)
        return proc

    yield start
    for proc in procs:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def test_beat_sends_the_nightly_pass_to_the_coordinator_worker(nightly_env, workers, beat, tmp_path):  # noqa: F811
    # publishing on: without a libvirt checkout the pass says so (publishing itself: test_nightly_publish)
    workers.env.update(nightly_env, FARM_NIGHTLY_CRON="* * * * *", FARM_BROKER_URL=workers.broker,
                       FARM_NIGHTLY_PUBLISH="1")
    workers.env.pop("FARM_LIBVIRT_CHECKOUT", None)
    workers.start("standin", nightly_env["FARM_INVENTORY"], ["--coordinator"])
    proc = beat()
    runs = []
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        assert proc.poll() is None, (tmp_path / "beat.log").read_text()[-2000:]
        code, runs, err = farm(workers.env, "runs", "list", "--json")
        assert code == 0, err
        if any(r["qemu"] == "9.2.0" and r["jobs"] and all(j["status"] not in ("pending", "running")
                                                          for j in r["jobs"]) for r in runs):
            break
        time.sleep(1)
    logs = (tmp_path / "beat.log").read_text()[-2000:] + (tmp_path / "worker-0.log").read_text()[-3000:]
    by_qemu = {r["qemu"]: r for r in runs}
    assert "9.2.0" in by_qemu, f"no nightly run within 90 s: {runs}\n{logs}"
    assert [(j["arch"], j["status"]) for j in by_qemu["9.2.0"]["jobs"]] == [("x86_64", "ok")], logs
    assert "Sending due task farm-nightly (farm.nightly)" in logs
    deadline = time.monotonic() + 30
    while "no libvirt checkout" not in (tmp_path / "worker-0.log").read_text() and time.monotonic() < deadline:
        time.sleep(0.5)  # the task's summary is logged when the pass ends
    assert "no libvirt checkout: --libvirt PATH or FARM_LIBVIRT_CHECKOUT" in (tmp_path / "worker-0.log").read_text()

    # one scheduler per state directory: a second farm beat is refused by the pid file
    second = subprocess.run([sys.executable, "-m", "farm", "beat", "--broker", workers.broker],
                            env=workers.env, capture_output=True, text=True, timeout=60, check=False)
    assert second.returncode != 0 and "already exists" in second.stdout + second.stderr, second.stderr

    os.killpg(proc.pid, signal.SIGTERM)
    proc.wait(20)
