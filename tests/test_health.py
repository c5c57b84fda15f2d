"""Host health: infrastructure failures counted per host, quarantine, release; configuration errors
recorded but not counted; a failure followed by the host working is past.

The broken hosts are real: a local host whose libvirt build directory does not exist, so every job on
it fails before probing (an outage: counted), and a local host whose agent Python does not exist (it
is reached, but misconfigured: not counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

from tests.helpers import REPO, farm, served_dashboard


def test_a_host_failing_again_and_again_is_quarantined_until_released(env, tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text(
        "hosts:\n"
        "  - name: broken\n"
        "    transport: local\n"
        "    arch: x86_64\n"
        f"    toolchain:\n      libvirt: builddir:{tmp_path / 'no-such-build'}\n"
    )
    args = ("probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory), "--json")
    for attempt in range(1, 4):
        code, out, err = farm(env, *args)
        (job,) = out["jobs"]
        assert (code, job["status"]) == (1, "failed")
        assert "no executable tests/qemucapsprobe" in job["reasons"][0]
        code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
        (host,) = status["hosts"]
        assert host["failures"] == attempt and host["quarantined"] is (attempt == 3)
        assert "no executable tests/qemucapsprobe" in host["last_failure_reason"]
        assert host["last_failure_kind"] == "outage" and host["failing_now"] is True

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


def test_a_misconfigured_host_is_recorded_but_never_quarantined_and_its_failure_passes(env, tmp_path):
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  - name: nopython\n    transport: local\n    arch: x86_64\n"
                         "    agent_python: /nonexistent/python3\n")
    args = ("probe", "--qemu", "7.2.0", "--arch", "x86_64", "--inventory", str(inventory), "--json")
    for _ in range(4):  # more than FARM_QUARANTINE_AFTER (3)
        code, out, err = farm(env, *args)
        (job,) = out["jobs"]
        assert (code, job["status"]) == (1, "failed") and job["host"] == "nopython", err
        assert "cannot run /nonexistent/python3" in job["reasons"][0]
    code, checked, _ = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 1 and checked[0]["error_kind"] == "config"
    code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
    (host,) = status["hosts"]
    assert (host["failures"], host["quarantined"], host["state"]) == (0, False, "misconfigured")
    assert host["last_failure_kind"] == "config" and "cannot run /nonexistent/python3" in host["last_failure_reason"]
    text = subprocess.run([sys.executable, "-m", "farm", "status", "--inventory", str(inventory)], env=env,
                          capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "configuration error" in text and "past" not in text

    # fixed: the host works again, and its last failure is past
    inventory.write_text(inventory.read_text().replace("/nonexistent/python3", "python3"))
    code, checked, err = farm(env, "hosts", "check", "--inventory", str(inventory), "--json")
    assert code == 0, err
    code, status, _ = farm(env, "status", "--inventory", str(inventory), "--json")
    (host,) = status["hosts"]
    assert (host["state"], host["failing_now"]) == ("ok", False)
    assert "cannot run /nonexistent/python3" in host["last_failure_reason"]  # kept, as the past
    text = subprocess.run([sys.executable, "-m", "farm", "status", "--inventory", str(inventory)],
                          env={**env, "COLUMNS": "250"}, capture_output=True, text=True, cwd=REPO, check=True).stdout
    assert "past: " in text and "configuration error" in text and " ok " in text
    with served_dashboard(env, tmp_path / "dashboard.log", "--inventory", str(inventory)) as (url, _):
        with urllib.request.urlopen(url + "/api/hosts", timeout=30) as r:
            (shown,) = json.loads(r.read())
        with urllib.request.urlopen(url + "/hosts", timeout=30) as r:
            page = r.read().decode()
    assert (shown["health"], shown["failing_now"], shown["last_failure_kind"]) == ("ok", False, "config")
    assert "past (seen working since)" in page and "(configuration error)" in page
