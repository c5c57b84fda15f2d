"""Replies from an agent that lies: a stand-in agent server (a small program speaking the agent's
serve protocol, run as the host's `agent_python`) answers the job with forged, malformed or
oversized replies. Each is a failed job naming the host and what was wrong, nothing stored, no
thread left hanging, the run done. The real agent cannot be made to send these; that is why this
one is a stand-in."""

from __future__ import annotations

import base64
import json
import zlib
from pathlib import Path

import pytest

from tests.helpers import farm
from tests.standin import QEMU, RECORDED

STANDIN = '''#!/usr/bin/env python3
import json, os, sys
payload = open({payload!r}).read()
print(json.dumps({{"serve": "standin", "pid": os.getpid()}}), flush=True)
for line in sys.stdin:
    request = json.loads(line)
    if "argv" in request:
        if payload == "EXIT":
            sys.exit(0)
        sys.stdout.write(payload.replace("@ID@", str(request["id"])))
        sys.stdout.flush()
'''


def reply(stdout: str, line: str | None = None) -> str:
    """A serve-protocol answer: the stdout of the job subcommand (a string of JSON), exit 0."""
    return json.dumps({"id": "@ID@", "exit": 0, "stdout": stdout}).replace('"@ID@"', "@ID@") + "\n"


def job(**overrides) -> str:
    good = {"ok": True, "facts": {"arch": "x86_64", "kvm": {"usable": True}}, "libvirt": {"source": "x"},
            "qemu": {"path": "/usr/bin/qemu-system-x86_64", "version": "9.2.0"},
            "probe": {"ok": True, "exit_status": 0, "stderr_tail": []},
            "dump": base64.b64encode(zlib.compress(RECORDED.read_bytes())).decode()}
    good.update(overrides)
    return reply(json.dumps(good))


CASES = {
    "a zip bomb for a dump": (lambda: job(dump=base64.b64encode(zlib.compress(b" " * (80 << 20))).decode()),
                              "the dump in its reply is damaged: larger than 64 MiB"),
    "a dump that is not base64": (lambda: job(dump="%%%"), "the dump in its reply is damaged"),
    "facts whose kvm is a string": (lambda: job(facts={"arch": "x86_64", "kvm": "yes"}), "malformed reply: facts.kvm"),
    "an unknown key": (lambda: job(root_please=True), "malformed reply: root_please"),
    "a probe result of the wrong type": (lambda: job(probe={"ok": "maybe"}), "malformed reply: probe.ok"),
    "an enormous stderr line": (lambda: job(probe={"ok": False, "stderr_tail": ["x" * 10000]}), "malformed reply"),
    "stdout that is not JSON": (lambda: reply("I am root now"), "no JSON reply"),
    "JSON that is not an object": (lambda: reply("[1, 2, 3]"), "its reply is not a JSON object"),
    "JSON nested 100000 deep": (lambda: reply("[" * 100000 + "]" * 100000), "no JSON reply"),
    "a reply line of 100 MiB": (lambda: "x" * (100 << 20), "MiB from the agent server"),
    "the server exits": (lambda: "EXIT", "the agent server exited"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_lying_agent_fails_its_job_saying_what_was_wrong(env, tmp_path, case):
    make, expected = CASES[case]
    payload = tmp_path / "payload"
    payload.write_text(make())
    python = tmp_path / "standin-agent"
    python.write_text(STANDIN.format(payload=str(payload)))
    python.chmod(0o755)
    inventory = tmp_path / "inventory.yaml"
    inventory.write_text("hosts:\n  - name: liar\n    transport: local\n    arch: x86_64\n"
                         f"    agent_python: {python}\n    toolchain:\n      libvirt: builddir:/nonexistent\n")
    code, out, err = farm({**env, "FARM_MAX_RETRIES": "0"}, "probe", "--qemu", QEMU, "--arch", "x86_64",
                          "--inventory", str(inventory), "--json", "--quiet")
    assert out is not None, err
    (job_,) = out["jobs"]
    assert (code, job_["status"], job_["artifact"]) == (1, "failed", None), (err, job_)
    assert job_["reasons"][0].startswith("host 'liar'") and expected in job_["reasons"][0], job_["reasons"]
    assert len(job_["reasons"][0]) < 1000 and "Traceback" not in err
    code, shown, _ = farm(env, "runs", "show", str(out["run"]), "--json")
    assert shown["status"] == "done"
    assert not list(Path(env["FARM_STATE_DIR"]).glob("artifacts/**/*.replies"))
