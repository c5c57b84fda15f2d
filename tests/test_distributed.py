"""The distributed farm: `farm probe` with a broker, real redis-server, real `farm worker`
(Celery) processes driving local hosts; the probes are the real qemucapsprobe under KVM.
"""

from __future__ import annotations

import time

import pytest

from tests.helpers import farm, needs_kvm, needs_x86

pytestmark = [pytest.mark.slow, needs_kvm, needs_x86]


def test_distributed_results_equal_the_embedded_ones(env, redis_server, workers):
    workers.start("local-x86_64")
    workers.start("local-s390x,local-ppc64")
    code, dist, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64,s390x,ppc64", "--broker", redis_server.url, "--json")
    assert dist is not None, err
    code2, emb, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64,s390x,ppc64", "--json")
    assert emb is not None, err
    assert code == code2 == 1  # the s390x and ppc64 fakes
    summary = lambda out: {j["arch"]: (j["status"], j["verdict"], j["host"]) for j in out["jobs"]}  # noqa: E731
    assert summary(dist) == summary(emb) == {
        "x86_64": ("ok", "real", "local-x86_64"),
        "s390x": ("fake", "fake", "local-s390x"),
        "ppc64": ("fake", "fake", "local-ppc64"),
    }
    for job in dist["jobs"]:
        assert job["artifact"] and job["artifact"].endswith(f"caps_7.2.0_{job['arch']}.replies")
    code, shown, _ = farm(env, "runs", "show", str(dist["run"]), "--json")
    assert shown["mode"] == "distributed" and shown["status"] == "done"


def test_an_arch_without_a_live_worker_fails_fast(env, redis_server, workers):
    workers.start("local-x86_64")
    started = time.monotonic()
    code, out, err = farm(env, "probe", "--qemu", "7.2.0", "--arch", "x86_64,aarch64", "--broker", redis_server.url, "--json")
    elapsed = time.monotonic() - started
    assert out is not None, err
    jobs = {j["arch"]: j for j in out["jobs"]}
    assert jobs["x86_64"]["status"] == "ok"
    assert jobs["aarch64"]["status"] == "failed"
    assert "no live worker serves a healthy host of arch.aarch64" in jobs["aarch64"]["reasons"][0]
    assert elapsed < 60  # seconds, not the job time limit


def test_resume_collects_what_workers_finished(env, redis_server, workers, tmp_path):
    """The CLI killed mid-run: the ledger tells what finished; resume completes the rest once."""
    import os
    import signal
    import subprocess
    import sys

    workers.start("local-x86_64,local-s390x")
    cli = subprocess.Popen(
        [sys.executable, "-m", "farm", "probe", "--qemu", "7.2.0", "--arch", "x86_64,s390x", "--broker",
         redis_server.url, "--json", "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )
    time.sleep(2.0)  # jobs sent, probes running
    os.killpg(cli.pid, signal.SIGKILL)
    cli.wait()
    code, shown, _ = farm(env, "runs", "show", "1", "--json")
    assert shown["status"] in ("running", "interrupted") and len(shown["jobs"]) == 2
    time.sleep(5)  # the workers finish meanwhile
    code, out, err = farm(env, "runs", "resume", "1", "--broker", redis_server.url, "--json")
    assert out is not None, err
    assert {j["arch"]: j["status"] for j in out["jobs"]} == {"x86_64": "ok", "s390x": "fake"}
    code, shown, _ = farm(env, "runs", "show", "1", "--json")
    assert shown["status"] == "done"


def test_a_targeted_job_goes_to_its_hosts_own_queue(env, redis_server, workers, tmp_path):
    """Two workers serve x86_64; --hosts sends the job to the named host's queue only.
    The probe is the replaying stand-in (tests/standin.py)."""
    from tests.standin import QEMU, standin_builddir
    from tests.test_faults import local_inventory

    standin = standin_builddir(tmp_path / "standin", delay=0.5)
    inventory = str(local_inventory(tmp_path / "inventory.yaml", standin, ["x86-a", "x86-b"]))
    workers.start("x86-a", inventory)
    workers.start("x86-b", inventory)
    for target in ("x86-b", "x86-a"):
        code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--hosts", target,
                              "--inventory", inventory, "--broker", redis_server.url, "--json")
        assert out is not None, err
        (job,) = out["jobs"]
        assert (job["status"], job["host"]) == ("ok", target)
    code, _, err = farm(env, "probe", "--qemu", QEMU, "--hosts", "nosuch", "--inventory", inventory)
    assert code == 2 and "nosuch" in err
