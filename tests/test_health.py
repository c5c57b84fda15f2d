"""Host health: infrastructure failures counted per host, quarantine, release.

The broken host is real: a local host whose agent Python does not exist, so every
job on it fails before probing (an infrastructure failure, not a verdict).
"""

from __future__ import annotations

from tests.helpers import farm


def test_a_host_failing_again_and_again_is_quarantined_until_released(env, tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "hosts:\n"
        "  - name: broken\n"
        "    transport: local\n"
        "    arch: x86_64\n"
        "    agent_python: /nonexistent/python3\n"
    )
    args = ("probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory), "--json")
    for attempt in range(1, 4):
        code, out, err = farm(env, *args)
        (job,) = out["jobs"]
        assert (code, job["status"]) == (1, "failed")
        assert "cannot run /nonexistent/python3" in job["reasons"][0]
        code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
        (host,) = status["hosts"]
        assert host["failures"] == attempt and host["quarantined"] is (attempt == 3)
        assert "cannot run" in host["last_failure_reason"]

    code, out, _ = farm(env, *args)  # quarantined: the job fails at once, the host is not tried
    (job,) = out["jobs"]
    assert job["status"] == "failed" and "no healthy host can probe x86_64" in job["reasons"][0]
    assert job["host"] is None

    code, released, _ = farm(env, "hosts", "release", "broken", "--inventory", str(inventory), "--json")
    assert code == 0 and released[0]["quarantined"] is False and released[0]["failures"] == 0
    code, out, _ = farm(env, *args)
    assert out["jobs"][0]["host"] == "broken"  # tried again (and fails again)
    code, _, err = farm(env, "hosts", "release", "nosuch", "--inventory", str(inventory))
    assert code == 2 and "nosuch" in err
