"""State that survives accidents: a damaged, empty, lost or misplaced ledger, a state dir farm may
not write, a full disk, a planted symlink in the artifact store, bad settings. Each is one line and
the right exit code, never a traceback; nothing kept is overwritten."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.helpers import farm, needs_root
from tests.standin import QEMU, standin_builddir
from tests.test_faults import local_inventory


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def probe(env: dict, tmp_path: Path, *args: str) -> tuple[int, dict | None, str]:
    inventory = tmp_path / "inventory.yaml"
    if not inventory.exists():
        local_inventory(inventory, standin_builddir(tmp_path / "standin", 0), ["x86-a"])
    return farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory), "--json",
                "--quiet", *args)


@pytest.mark.parametrize("damage", [
    lambda p: p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 2]),
    lambda p: p.write_bytes(b"garbage" * 1000),
    lambda p: p.write_bytes(b"SQLite format 3\0" + os.urandom(8000)),
])
def test_a_damaged_ledger_is_one_line_that_says_what_to_do(env, tmp_path, damage):
    code, out, err = probe(env, tmp_path)
    assert code == 0, err
    ledger = Path(env["FARM_STATE_DIR"]) / "ledger.sqlite"
    for extra in ("-wal", "-shm"):
        Path(f"{ledger}{extra}").unlink(missing_ok=True)
    damage(ledger)
    before = ledger.read_bytes()
    for command in (["runs", "list"], ["runs", "show", "1"], ["status"]):
        code, _, err = farm(env, *command)
        line = one_line(err)
        assert code == 3 and "ledger" in line and str(ledger) in line, (command, err)
    assert ledger.read_bytes() == before  # nothing overwritten


def test_an_empty_ledger_beside_kept_artifacts_is_damaged_and_a_moved_aside_one_numbers_runs_after_them(env, tmp_path):
    code, out, err = probe(env, tmp_path)
    first = out["jobs"][0]["artifact"]
    state = Path(env["FARM_STATE_DIR"])
    (state / "ledger.sqlite").write_bytes(b"")
    code, _, err = farm(env, "runs", "list")
    line = one_line(err)
    assert code == 3 and "it is empty, but the artifact store beside it has runs" in line and "mv " in line
    (state / "ledger.sqlite").rename(state / "ledger.sqlite.damaged")
    code, out, err = probe(env, tmp_path)
    assert code == 0 and out["run"] == 2, err  # not 1 again: run 1's artifacts are kept
    assert out["jobs"][0]["artifact"] != first and Path(out["jobs"][0]["artifact"]).is_file()
    assert Path(first).is_file()


def test_a_ledger_that_is_a_directory_is_refused(env, tmp_path):
    (Path(env["FARM_STATE_DIR"]) / "ledger.sqlite").mkdir(parents=True)
    code, _, err = farm(env, "runs", "list")
    assert code == 3 and one_line(err).endswith("ledger.sqlite: the ledger is not a regular file")


def test_a_state_dir_that_cannot_be_made_is_one_line(env, tmp_path):
    (tmp_path / "file").write_text("")
    code, _, err = farm({**env, "FARM_STATE_DIR": str(tmp_path / "file" / "state")}, "runs", "list")
    assert code == 3 and "cannot create the state dir (FARM_STATE_DIR)" in one_line(err)


@needs_root
def test_a_read_only_state_dir_is_one_line_and_changes_nothing(env, tmp_path):
    probe(env, tmp_path)
    state = Path(env["FARM_STATE_DIR"])
    if subprocess.run(["mount", "--bind", str(state), str(state)]).returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        subprocess.run(["mount", "-o", "remount,ro,bind", str(state)], check=True)
        code, out, err = probe(env, tmp_path)
        assert code == 3 and str(state) in one_line(err), err
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)
    code, runs, _ = farm(env, "runs", "list", "--json")
    assert [r["run"] for r in runs] == [1]


@needs_root
def test_a_full_disk_fails_the_job_saying_so_and_leaves_nothing_running(env, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=400k", "tmpfs", str(state)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        code, out, err = probe(env, tmp_path)  # the ledger fits, the ~1 MB dump does not
        assert out is not None, err
        (job,) = out["jobs"]
        assert (code, job["status"], job["artifact"]) == (1, "failed", None), err
        assert job["reasons"][0].startswith("cannot store the dump: No space left on device"), job["reasons"]
        code, shown, _ = farm(env, "runs", "show", "1", "--json")
        assert shown["status"] == "done" and shown["jobs"][0]["status"] == "failed"
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def test_a_symlink_planted_in_the_artifact_store_is_not_followed(env, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    artifacts = Path(env["FARM_STATE_DIR"]) / "artifacts"
    artifacts.mkdir(parents=True)
    (artifacts / "run-1").symlink_to(elsewhere)
    (artifacts / "run-1").unlink()  # the run number is taken by the store: plant the next one too
    (artifacts / "run-1").mkdir()
    (artifacts / "run-2").symlink_to(elsewhere)
    code, out, err = probe(env, tmp_path)
    (job,) = out["jobs"]
    assert out["run"] == 3  # after the store's highest run
    assert job["status"] == "ok" and Path(job["artifact"]).resolve().is_relative_to(artifacts.resolve())
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize("variable, value, message", [
    ("FARM_MAX_RETRIES", "abc", "FARM_MAX_RETRIES: Input should be a valid integer"),
    ("FARM_MAX_RETRIES", "-1", "FARM_MAX_RETRIES: Input should be greater than or equal to 0"),
    ("FARM_QUARANTINE_AFTER", "0", "FARM_QUARANTINE_AFTER: Input should be greater than or equal to 1"),
    ("FARM_JOB_TIME_LIMIT", "5", "FARM_JOB_TIME_LIMIT: Input should be greater than or equal to 60"),
    ("FARM_WORKER_GRACE", "soon", "FARM_WORKER_GRACE: Input should be a valid integer"),
])
def test_a_bad_setting_is_a_usage_error_naming_it(env, variable, value, message):
    code, _, err = farm({**env, variable: value}, "runs", "list")
    assert code == 2 and one_line(err).startswith(f"farm: {message}"), err


@pytest.mark.parametrize("port", ["80000", "0", "-1", "http"])
def test_a_dashboard_port_out_of_range_is_a_usage_error(env, port):
    code, _, err = farm(env, "dashboard", "--port", port)
    assert code == 2 and "not a port (1-65535)" in err
