"""The dashboard as the network sees it: odd paths and ids are 404s that show no server path, a
libvirt tree being recomputed holds up only the requests that need it, and a FIFO named like a dump
in the tree blocks nothing. `farm dashboard` served for real over a ledger of a real stand-in run."""

from __future__ import annotations

import shutil
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import farm, served_dashboard
from tests.standin import QEMU, standin_builddir
from tests.test_faults import local_inventory


def get(url: str, timeout: float = 60) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def dashboard(env, tmp_path, data11):
    inventory = local_inventory(tmp_path / "inventory.yaml", standin_builddir(tmp_path / "standin", 0), ["x86-a"])
    code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "x86_64", "--inventory", str(inventory), "--quiet")
    assert code == 0, err
    tree = tmp_path / "libvirt" / "tests" / "qemucapabilitiesdata"
    shutil.copytree(data11, tree)
    with served_dashboard(env, tmp_path / "dashboard.log", "--inventory", str(inventory),
                          "--libvirt", str(tmp_path / "libvirt")) as (url, _):
        yield url, Path(env["FARM_STATE_DIR"]), tree


@pytest.mark.parametrize("path", [
    "/artifacts/%00", "/artifacts/run-1/%00/x", "/artifacts/../../../../etc/passwd", "/artifacts/..%2f..%2fetc%2fpasswd",
    "/tree/%00.replies", "/tree/..%2f..%2fledger.sqlite", "/tree/" + "a" * 5000 + ".replies",
    "/runs/99999999999999999999999", "/api/runs/9223372036854775808", "/runs/-1", "/api/runs/7",
    "/nosuch", "/api/hosts/%00/release",
])
def test_odd_paths_and_ids_are_404s_that_show_no_server_path(dashboard, path):
    url, state, tree = dashboard
    code, body = get(url + path)
    assert code in (404, 405), (path, code, body[:200])
    assert str(state) not in body and str(tree) not in body and "Traceback" not in body


def test_a_tree_being_recomputed_holds_up_only_what_needs_the_tree(dashboard):
    url, _, tree = dashboard
    get(url + "/coverage")  # computed once
    (tree / "caps_9.2.0_x86_64.replies").touch()
    tree.touch()  # the tree changed: the next coverage request inspects it all again (~1 s)
    done: list[str] = []
    slow = threading.Thread(target=lambda: (get(url + "/coverage"), done.append("coverage")))
    slow.start()
    time.sleep(0.05)
    for path in ("/api/runs/1", "/runs", "/api/hosts"):
        code, _ = get(url + path)
        assert code == 200
        done.append(path)
    slow.join(60)
    assert done[-1] == "coverage", done  # the others were answered while the tree was inspected


def test_a_fifo_named_like_a_dump_in_the_tree_blocks_no_page(dashboard):
    import os

    url, _, tree = dashboard
    os.mkfifo(tree / "caps_99.0.0_x86_64.replies")
    tree.touch()
    result: list[int] = []
    reader = threading.Thread(target=lambda: result.append(get(url + "/api/coverage", timeout=60)[0]), daemon=True)
    reader.start()
    reader.join(60)
    assert result == [200], "the coverage request hung on the FIFO"
    assert get(url + "/tree/caps_99.0.0_x86_64.replies", timeout=10)[0] == 404
