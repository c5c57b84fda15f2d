"""farm dashboard, served for real (`farm dashboard` in a subprocess on a free port) over a ledger made by
real `farm probe` runs (the replaying stand-in probe on a local host, and a host whose toolchain is broken
until it is quarantined); its JSON API over HTTP, and its pages in Debian's Chromium driven by Playwright."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers import farm, served_dashboard
from tests.paths import CACHE
from tests.standin import QEMU, RECORDED, standin_builddir

CHROMIUM = Path("/usr/bin/chromium")
TOKEN = "dashboard-secret-4c1f9e0b7a"
ARTIFACTS = CACHE / "artifacts" / "test_dashboard"  # screenshots kept after the run


class Served:
    def __init__(self, url: str, state: Path, process: subprocess.Popen, log: Path):
        self.url, self.state, self.process, self.log = url, state, process, log

    def get(self, path: str, headers: dict | None = None) -> tuple[int, str, dict]:
        request = urllib.request.Request(self.url + path, headers=headers or {})
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, r.read().decode(), dict(r.headers)
        except urllib.error.HTTPError as e:
            return e.code, e.read().decode(), dict(e.headers)

    def json(self, path: str):
        status, body, _ = self.get(path)
        assert status == 200, (path, status, body)
        return json.loads(body)

    def post(self, path: str, token: str | None = None) -> tuple[int, dict]:
        headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
        request = urllib.request.Request(self.url + path, data=b"", method="POST", headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())


@pytest.fixture(scope="module")
def served(tmp_path_factory, libvirt11):
    if not RECORDED.is_file():
        pytest.skip(f"{RECORDED} missing: run ./bootstrap test (it fetches libvirt 11.3.0)")
    tmp = tmp_path_factory.mktemp("dashboard")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARM_")}
    env.update(FARM_STATE_DIR=str(tmp / "state"), FARM_CACHE_DIR=str(CACHE))
    standin = standin_builddir(tmp / "standin", delay=0)
    inventory = tmp / "inventory.yaml"
    inventory.write_text(
        "hosts:\n"
        f"  - name: standin-1\n    transport: local\n    arch: x86_64\n"
        f"    toolchain:\n      libvirt: builddir:{standin}\n      qemu: system\n"
        f"  - name: broken-1\n    transport: local\n    arch: s390x\n"
        f"    toolchain:\n      libvirt: builddir:{tmp / 'no-such-build'}\n      qemu: system\n"
    )
    # run 1: x86_64 real (the stand-in replays a KVM dump), s390x failed; runs 2, 3: s390x failed again,
    # which quarantines broken-1
    code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "all", "--inventory", str(inventory), "--json")
    assert out is not None, err
    assert sorted((j["arch"], j["status"]) for j in out["jobs"]) == [("s390x", "failed"), ("x86_64", "ok")], out
    for _ in range(2):
        code, out, err = farm(env, "probe", "--qemu", QEMU, "--arch", "s390x", "--inventory", str(inventory), "--json")
        assert out is not None and out["jobs"][0]["status"] == "failed", err
    token_file = tmp / "dashboard.token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    env["FARM_DASHBOARD_TOKEN_FILE"] = str(token_file)
    log = tmp / "dashboard.log"
    with served_dashboard(env, log, "--inventory", str(inventory), "--libvirt", str(libvirt11)) as (url, process):
        yield Served(url, tmp / "state", process, log)


# --- the JSON API ------------------------------------------------------------------------------


def test_api_runs_and_run_detail(served):
    runs = served.json("/api/runs")
    assert runs["total"] == 3 and [r["run"] for r in runs["runs"]] == [3, 2, 1]
    assert runs["runs"][2]["counts"] == {"failed": 1, "ok": 1} and runs["runs"][2]["status"] == "done"
    run = served.json("/api/runs/1")
    jobs = {j["arch"]: j for j in run["jobs"]}
    assert (jobs["x86_64"]["status"], jobs["x86_64"]["verdict"], jobs["x86_64"]["host"]) == ("ok", "real", "standin-1")
    assert "no executable tests/qemucapsprobe" in " ".join(jobs["s390x"]["reasons"])
    assert jobs["x86_64"]["seconds"] is not None and run["publications"] == []
    # the dump and its provenance are served from the artifact store, byte for byte
    status, body, _ = served.get(jobs["x86_64"]["dump"])
    assert status == 200 and body == Path(jobs["x86_64"]["artifact"]).read_text()
    status, body, _ = served.get(jobs["x86_64"]["provenance"])
    assert status == 200 and json.loads(body)["host"]["name"] == "standin-1"
    assert served.get("/api/runs/99")[0] == 404


def test_api_coverage_farm_and_tree(served):
    cov = served.json("/api/coverage")
    farm_cells = {(c["version"], c["column"]): c for c in cov["sources"]["farm"]["cells"]}
    assert farm_cells[("9.2.0", "x86_64")]["state"] == "real"
    assert farm_cells[("9.2.0", "s390x")]["state"] == "failed"
    assert farm_cells[("9.2.0", "aarch64")]["state"] == "missing"
    tree = {(c["version"], c["column"]): c for c in cov["sources"]["tree"]["cells"]}
    assert tree[("9.2.0", "x86_64")]["state"] == "real"
    assert tree[("9.1.0", "riscv64")]["state"] == "fake"  # libvirt keeps riscv64 fake
    assert cov["sources"]["tree"]["counts"]["real"] >= 15
    status, body, _ = served.get(tree[("9.2.0", "x86_64")]["dump"])
    assert status == 200 and body == (RECORDED.read_text())


def test_api_hosts_health_and_quarantine(served):
    hosts = {h["name"]: h for h in served.json("/api/hosts")}
    assert hosts["standin-1"]["health"] == "ok" and hosts["standin-1"]["arch"] == "x86_64"
    assert hosts["standin-1"]["last_seen"] is not None
    broken = hosts["broken-1"]
    assert (broken["health"], broken["quarantined"], broken["failures"]) == ("quarantined", True, 3)
    assert "no executable tests/qemucapsprobe" in broken["last_failure_reason"]


def test_metrics(served):
    status, text, headers = served.get("/metrics")
    assert status == 200 and headers["content-type"].startswith("text/plain")
    lines = set(text.splitlines())
    assert 'farm_coverage_cells{source="farm",state="real"} 1' in lines
    assert 'farm_coverage_cells{source="farm",state="failed"} 1' in lines
    assert 'farm_host_quarantined{host="broken-1",arch="s390x"} 1' in lines
    assert 'farm_host_healthy{host="standin-1",arch="x86_64"} 1' in lines
    assert "farm_runs 3" in lines
    names = {line.split("{")[0].split(" ")[0] for line in lines if line and not line.startswith("#")}
    assert names and all(n.startswith("farm_") for n in names)


def test_nothing_outside_the_artifact_store_is_served(served):
    for path in ("/artifacts/../ledger.sqlite", "/artifacts/%2e%2e/ledger.sqlite", "/tree/..%2fmeson.build",
                 "/tree/caps_1.0.0_x86_64.replies"):
        assert served.get(path)[0] == 404, path


def test_release_needs_the_token_and_it_is_never_shown(served):
    assert served.post("/api/hosts/broken-1/release")[0] == 401
    assert served.post("/api/hosts/broken-1/release", "wrong")[0] == 401
    assert served.post("/api/hosts/nosuch/release", TOKEN)[0] == 404
    assert {h["name"]: h for h in served.json("/api/hosts")}["broken-1"]["quarantined"] is True
    status, body = served.post("/api/hosts/broken-1/release", TOKEN)
    assert status == 200 and body["released"]["quarantined"] is False
    hosts = {h["name"]: h for h in served.json("/api/hosts")}
    assert (hosts["broken-1"]["quarantined"], hosts["broken-1"]["failures"]) == (False, 0)
    seen = served.log.read_text() + "".join(served.get(p)[1] for p in ("/", "/hosts", "/metrics", "/api/hosts"))
    assert TOKEN not in seen


# --- in a real browser ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} missing: ./bootstrap installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=str(CHROMIUM), headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"],
        )
        try:
            yield b
        finally:
            b.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    try:
        yield context.new_page()
    finally:
        context.close()


def _cell(page, source: str, version: str, column: str):
    return page.locator(f'table.matrix[data-source="{source}"] td[data-version="{version}"][data-column="{column}"]')


def test_coverage_page_in_chromium(served, page, tmp_path):
    page.goto(served.url + "/coverage")
    assert page.title() == "Coverage · farm"
    real = _cell(page, "farm", "9.2.0", "x86_64")
    assert real.inner_text().strip() == "real"
    assert real.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(47, 158, 68)"  # green
    failed = _cell(page, "farm", "9.2.0", "s390x")
    assert failed.inner_text().strip() == "failed"
    assert "no executable tests/qemucapsprobe" in failed.get_attribute("title")
    assert _cell(page, "farm", "9.2.0", "aarch64").get_attribute("data-state") == "missing"
    assert _cell(page, "tree", "9.2.0", "x86_64").inner_text().strip() == "real"
    riscv = _cell(page, "tree", "9.1.0", "riscv64")
    assert riscv.inner_text().strip() == "fake"
    assert page.get_by_text("libvirt tree").first.is_visible()
    for path in (tmp_path / "coverage.png", ARTIFACTS / "coverage.png"):
        path.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(path), full_page=True)
    assert (ARTIFACTS / "coverage.png").stat().st_size > 10_000
    # a cell leads to its dump
    real.locator("a").click()
    page.wait_for_load_state()
    assert page.url.endswith("/caps_9.2.0_x86_64.replies") and '"execute": "qmp_capabilities"' in page.content()


def test_runs_hosts_and_run_pages_in_chromium(served, page, tmp_path):
    page.goto(served.url + "/runs")
    rows = page.locator("table#runs tr")
    assert rows.count() == 4  # header + 3 runs
    assert "1 ok" in rows.nth(3).inner_text() and "1 failed" in rows.nth(3).inner_text()
    page.get_by_role("link", name="1", exact=True).click()
    page.wait_for_url("**/runs/1")
    assert page.locator("h1").inner_text().startswith("Run 1: QEMU 9.2.0")
    jobs = page.locator("table#jobs").inner_text()
    assert "standin-1" in jobs and "real" in jobs and "no executable tests/qemucapsprobe" in jobs
    log = page.get_by_text("log of run-1-x86_64")
    log.click()  # the job's log unfolds: the agent's steps on the host
    assert "qemucapsprobe" in page.locator("tr.log pre").first.inner_text()
    assert page.get_by_text("Not published.").is_visible()
    page.get_by_role("link", name="Hosts").click()
    page.wait_for_url("**/hosts")
    assert "ok" in page.locator('tr[data-host="standin-1"]').inner_text()
    broken = page.locator('tr[data-host="broken-1"]').inner_text()
    assert "s390x" in broken and ("quarantined" in broken or "ok" in broken)  # another test may release it
    page.screenshot(path=str(tmp_path / "hosts.png"), full_page=True)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tmp_path / "hosts.png", ARTIFACTS / "hosts.png")


def test_rerun_a_job_needs_the_token_and_makes_a_new_run(served):
    """Last in this module: it adds a run to the shared ledger."""
    first = min(served.json("/api/runs")["runs"], key=lambda r: r["run"])
    job = f"run-{first['run']}-x86_64"
    path = f"/api/runs/{first['run']}/jobs/{job}/rerun"
    assert served.post(path)[0] == 401
    assert served.post(f"/api/runs/{first['run']}/jobs/nosuch/rerun", TOKEN)[0] == 404
    status, body = served.post(path, TOKEN)
    assert status == 202 and body["run"] > first["run"], body
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run = served.json(f"/api/runs/{body['run']}")
        if run["status"] == "done":
            break
        time.sleep(0.5)
    assert run["status"] == "done"
    assert [(j["arch"], j["status"], j["verdict"]) for j in run["jobs"]] == [("x86_64", "ok", "real")]
