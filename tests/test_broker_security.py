"""The broker as a real farm runs it: a Redis that asks for a password, and one that speaks only
TLS (rediss://, the server's certificate checked against the farm's CA). Real redis-server, real
`farm worker`; the stand-in probe. A wrong password or an unknown CA is one line (exit 3) before any
run exists, and the password is never printed."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.helpers import farm
from tests.services import Redis, Workers
from tests.standin import QEMU, standin_builddir
from tests.test_faults import local_inventory

PASSWORD = "s3cret-redis-pass-7d1e"


def certificates(directory: Path, name: str = "ca") -> Path:
    """A CA and a server certificate for 127.0.0.1 signed by it (openssl)."""
    directory.mkdir(parents=True, exist_ok=True)

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=directory)

    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=farm test {name}",
            "-keyout", "ca.key", "-out", "ca.pem")
    openssl("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", "server.key",
            "-out", "server.csr")
    (directory / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-days", "2", "-extfile", "san.ext", "-out", "server.pem")
    return directory


@pytest.fixture(params=["password", "tls"])
def secured(request, tmp_path):
    tls = certificates(tmp_path / "tls") if request.param == "tls" else None
    server = Redis(tmp_path, password=PASSWORD, tls=tls)
    server.start()
    yield server
    server.stop()


def test_a_farm_runs_on_a_broker_with_a_password_and_tls_and_never_shows_the_password(env, secured, tmp_path):
    inventory = local_inventory(tmp_path / "inventory.yaml", standin_builddir(tmp_path / "standin", 0), ["x86-a"])
    pool = Workers(env, secured.url, tmp_path)
    try:
        pool.start("x86-a", str(inventory))
        code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory),
                              "--broker", secured.url, "--json")
        assert code == 0 and out["jobs"][0]["status"] == "ok", err
        code, status, err = farm(env, "status", "--inventory", str(inventory), "--broker", secured.url, "--json")
        assert code == 0 and status["hosts"][0]["served"] is True, err
        assert PASSWORD not in err + str(status)
        assert PASSWORD not in (tmp_path / "worker-0.log").read_text()
    finally:
        pool.stop_all()


def test_a_wrong_password_is_one_line_before_any_run_exists(env, secured, tmp_path):
    wrong = secured.url.replace(PASSWORD, "wrong-password")
    inventory = local_inventory(tmp_path / "inventory.yaml", standin_builddir(tmp_path / "standin", 0), ["x86-a"])
    code, _, err = farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory),
                        "--broker", wrong)
    lines = err.strip().splitlines()
    assert code == 3 and len(lines) == 1 and lines[0].startswith("farm: broker "), err
    assert "wrong-password" not in err and PASSWORD not in err
    code, runs, _ = farm(env, "runs", "list", "--json")
    assert runs == []
    code, _, err = farm(env, "status", "--broker", wrong)
    assert code == 3 and len(err.strip().splitlines()) == 1 and "wrong-password" not in err, err


def test_a_tls_broker_whose_certificate_another_ca_signed_is_refused(env, tmp_path):
    server = Redis(tmp_path, password=PASSWORD, tls=certificates(tmp_path / "tls"))
    server.start()
    try:
        other = certificates(tmp_path / "other", "another ca")
        url = server.url.replace(str(tmp_path / "tls" / "ca.pem"), str(other / "ca.pem"))
        code, _, err = farm(env, "status", "--broker", url)
        assert code == 3 and len(err.strip().splitlines()) == 1 and "certificate verify failed" in err.lower(), err
    finally:
        server.stop()
