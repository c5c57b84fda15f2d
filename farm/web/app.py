"""The dashboard: server-rendered pages (Starlette + Jinja2), a JSON API behind each, Prometheus /metrics.

Handlers are synchronous: Starlette runs them in its thread pool, so SQLite and file work never
blocks the event loop (a slow tree recompute holds up only the requests that need the tree).

Reading needs no authentication. Actions (POST /api/hosts/NAME/release,
POST /api/runs/N/jobs/JOB/rerun) need
``Authorization: Bearer <token>`` with the token of FARM_DASHBOARD_TOKEN(_FILE),
compared in constant time; without a configured token actions are disabled.
"""

from __future__ import annotations

import datetime
import hmac
import threading
from pathlib import Path

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from starlette.templating import Jinja2Templates

from farm.errors import FarmError
from farm.ledger import Ledger
from farm.web import views
from farm.web.queries import Queries

TEMPLATES = Path(__file__).parent / "templates"


def _when(stamp: float | None) -> str:
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"


def _ago(stamp: float | None) -> str:
    if not stamp:
        return "never"
    seconds = max(0, datetime.datetime.now().timestamp() - stamp)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds)} s ago"


def create_app(ledger: Ledger, inventory=None, tree: Path | None = None, token: str | None = None) -> Starlette:
    """The dashboard over ``ledger``; ``inventory`` lists the hosts, ``tree`` is a libvirt checkout (or None)."""
    queries = Queries(ledger)
    tree_coverage = views.TreeCoverage(tree)
    templates = Jinja2Templates(directory=str(TEMPLATES))
    templates.env.filters["when"] = _when
    templates.env.filters["ago"] = _ago
    templates.env.globals["actions"] = token is not None

    def page(request: Request, name: str, **context) -> Response:
        return templates.TemplateResponse(request, name, context)

    def coverage_page(request: Request) -> Response:
        return page(request, "coverage.html", view=views.coverage(queries, tree_coverage), nav="coverage")

    def coverage_api(request: Request) -> Response:
        return JSONResponse(views.coverage_json(views.coverage(queries, tree_coverage)))

    def hosts_page(request: Request) -> Response:
        return page(request, "hosts.html", hosts=views.hosts(queries, inventory), nav="hosts")

    def hosts_api(request: Request) -> Response:
        return JSONResponse(views.hosts(queries, inventory))

    def _page_number(request: Request) -> int:
        try:
            return int(request.query_params.get("page", "1"))
        except ValueError:
            raise HTTPException(400, "page: a number") from None

    def runs_page(request: Request) -> Response:
        return page(request, "runs.html", view=views.runs_page(queries, _page_number(request)), nav="runs")

    def runs_api(request: Request) -> Response:
        return JSONResponse(views.runs_page(queries, _page_number(request)))

    def _run(request: Request) -> dict:
        try:
            return views.run_detail(ledger, int(request.path_params["run"]))
        except (FarmError, OverflowError, ValueError):  # unknown, or beyond SQLite's integers
            raise HTTPException(404, f"no run {request.path_params['run']}") from None

    def run_page(request: Request) -> Response:
        return page(request, "run.html", run=_run(request), nav="runs")

    def run_api(request: Request) -> Response:
        return JSONResponse(_run(request))

    def metrics(request: Request) -> Response:
        return PlainTextResponse(views.metrics(queries, inventory, tree_coverage),
                                 media_type="text/plain; version=0.0.4")

    def artifact(request: Request) -> Response:
        return _file_under(ledger.artifacts, request.path_params["path"])

    def tree_file(request: Request) -> Response:
        tree_coverage.cells()
        if tree_coverage.directory is None:
            raise HTTPException(404, "no libvirt tree configured")
        name = request.path_params["name"]
        if "/" in name or not name.endswith(".replies"):
            raise HTTPException(404, "not a dump of the tree")
        return _file_under(tree_coverage.directory, name)

    def release_host(request: Request) -> Response:
        _authorize(request, token)
        name = request.path_params["name"]
        known = {h.name for h in inventory.hosts} if inventory else set()
        if name not in known and name not in queries.hosts_health():
            raise HTTPException(404, f"no host {name!r}")
        return JSONResponse({"released": ledger.release_host(name).to_json()})

    def rerun_job(request: Request) -> Response:
        """Probe a job's QEMU release and arch again, as a new run (in the background)."""
        _authorize(request, token)
        if inventory is None:
            raise HTTPException(409, "the dashboard has no inventory to run jobs on (--inventory)")
        try:
            record = ledger.run(request.path_params["run"])
        except (FarmError, OverflowError, ValueError):  # no server paths in answers
            raise HTTPException(404, f"no run {request.path_params['run']}") from None
        job = next((j for j in record.jobs if j.id == request.path_params["job"]), None)
        if job is None:
            raise HTTPException(404, f"no job {request.path_params['job']!r} in run {record.id}")
        started = rerun(ledger, inventory, record, job)
        if "error" in started:
            raise HTTPException(409, started["error"])
        return JSONResponse(started, status_code=202)

    routes = [
        Route("/", coverage_page),
        Route("/coverage", coverage_page),
        Route("/hosts", hosts_page),
        Route("/runs", runs_page),
        Route("/runs/{run:int}", run_page),
        Route("/api/coverage", coverage_api),
        Route("/api/hosts", hosts_api),
        Route("/api/runs", runs_api),
        Route("/api/runs/{run:int}", run_api),
        Route("/api/hosts/{name}/release", release_host, methods=["POST"]),
        Route("/api/runs/{run:int}/jobs/{job}/rerun", rerun_job, methods=["POST"]),
        Route("/metrics", metrics),
        Route("/artifacts/{path:path}", artifact),
        Route("/tree/{name}", tree_file),
    ]

    async def http_error(request: Request, exc: Exception) -> Response:
        if not isinstance(exc, HTTPException):  # registered for HTTPException only
            raise exc
        if request.url.path.startswith("/api/"):
            return JSONResponse({"error": exc.detail}, status_code=exc.status_code, headers=exc.headers)
        return PlainTextResponse(str(exc.detail), status_code=exc.status_code, headers=exc.headers)

    return Starlette(routes=routes, exception_handlers={HTTPException: http_error})


def rerun(ledger: Ledger, inventory, record, job, wait: float = 30.0) -> dict:
    """Start a new run of ``job``'s release (at the run's QEMU git ref, if any) and arch in a thread;
    {"run", "job"} once it is planned."""
    from farm.config import settings
    from farm.jobs import PROBE_TIMEOUT
    from farm.run import probe

    planned = threading.Event()
    answer: dict = {}

    def on_start(run: int, jobs) -> None:
        answer.update(run=run, job=jobs[0].id if jobs else None)
        planned.set()

    def work() -> None:
        try:
            probe(inventory, record.qemu, job.arch, ledger, job.variant, record.timeout or PROBE_TIMEOUT,
                  broker=settings().broker, on_start=on_start, qemu_ref=record.qemu_ref)
        except Exception as e:  # reported to the caller while it waits; logged otherwise
            answer.setdefault("error", str(e))
            planned.set()

    threading.Thread(target=work, name=f"farm-rerun-{job.id}", daemon=True).start()
    planned.wait(wait)
    return answer


def _authorize(request: Request, token: str | None) -> None:
    if token is None:
        raise HTTPException(403, "actions are disabled: no dashboard token configured (FARM_DASHBOARD_TOKEN_FILE)")
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
        raise HTTPException(401, "a valid bearer token is needed", headers={"WWW-Authenticate": "Bearer"})


def _file_under(root: Path, relative: str) -> Response:
    """A file below ``root`` only (no way out by .. or symlinks)."""
    try:
        root = root.resolve()
        target = (root / relative).resolve()
        found = target.is_relative_to(root) and target.is_file()  # a regular file: no FIFO, no device
    except (OSError, ValueError):  # a NUL byte, a name too long, a loop of links
        found = False
    if not found:
        raise HTTPException(404, "no such file")
    media = "application/json" if target.suffix == ".json" else "text/plain; charset=utf-8"
    return FileResponse(target, media_type=media)
