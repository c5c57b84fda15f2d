# PYTHON_ARGCOMPLETE_OK
"""The farm command line: parse, call the library, render (text or --json).

Exit codes: 0 ok, 1 findings (an invalid dump, a fake where libvirt expects
real hardware, a file that needs formatting, an alarming coverage cell), 2 usage errors.

Rich output never interprets text from dumps, hosts or logs: the console has
markup, emoji and highlighting off, and styles are given as ``Text`` objects.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from pathlib import Path
from typing import Any

import farm
from farm.errors import FarmError, UsageError

OK, FINDINGS, USAGE, OPERATIONAL = 0, 1, 2, 3
INTERRUPTED = 130


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    _complete(parser)
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):  # a dump's lone surrogate is printed escaped, not a traceback
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return USAGE
    signal.signal(signal.SIGTERM, _terminated)  # stopped like Ctrl-C: jobs stopped, the run resumable
    try:
        return args.func(args)
    except UsageError as e:
        print(f"farm: {e}", file=sys.stderr)
        return USAGE
    except FarmError as e:
        print(f"farm: {e}", file=sys.stderr)
        return OPERATIONAL
    except KeyboardInterrupt:
        print("farm: interrupted", file=sys.stderr)
        return INTERRUPTED
    except BrokenPipeError:
        return OK


def _complete(parser: argparse.ArgumentParser) -> None:
    """Bash completion (argcomplete): when bash asks (``_ARGCOMPLETE`` set, by
    ``eval "$(register-python-argcomplete farm)"``), print the completions and exit; else nothing."""
    if "_ARGCOMPLETE" not in os.environ:
        return
    import argcomplete

    argcomplete.autocomplete(parser, always_complete_options=False)  # options after a "-"


def _terminated(signum, frame) -> None:
    raise KeyboardInterrupt


# --- farm replies -------------------------------------------------------------


def cmd_validate(args) -> int:
    from farm.caps import dump

    results = dump.validate_files(args.files)
    if args.json:
        _print_json(
            [
                {
                    "file": d.path,
                    "valid": d.valid,
                    "layout": d.layout.value if d.layout else None,
                    "problems": [{"line": p.line, "kind": p.kind, "message": p.message} for p in d.problems],
                }
                for d in results
            ]
        )
    else:
        for d in results:
            if d.valid:
                print(f"{d.path}: OK ({d.layout.value if d.layout else '?'} layout)")
            else:
                print("\n".join(d.errors()))
    return OK if all(d.valid for d in results) else FINDINGS


def cmd_inspect(args) -> int:
    from farm.caps import dump
    from farm.caps.inspect import inspect

    results = [inspect(dump.load(f), _dump_name(f)) for f in args.files]
    if args.json:
        _print_json([i.to_json() for i in results])
    else:
        for i in results:
            _print_inspection(i)
    return FINDINGS if any(i.alarming for i in results) else OK


def cmd_fmt(args) -> int:
    from farm.caps import dump

    status = OK
    report = []
    for f in args.files:
        original = dump.read(f)
        d = dump.parse(original, f)
        if not d.reformattable:
            report.append({"file": d.path, "status": "unformattable", "problems": d.errors()})
            status = FINDINGS
            continue
        text = dump.render(d.exchanges)
        if text == original:
            report.append({"file": d.path, "status": "unchanged"})
        elif args.check:
            report.append({"file": d.path, "status": "would reformat"})
            status = FINDINGS
        else:
            _write_atomically(Path(f), text)
            report.append({"file": d.path, "status": "reformatted"})
    if args.json:
        _print_json(report)
    else:
        for r in report:
            print(f"{r['file']}: {r['status']}")
            for line in r.get("problems", []):
                print(f"  {line}")
    return status


def cmd_diff(args) -> int:
    from farm.caps import dump
    from farm.caps.diff import Malformed, diff

    old, new = dump.load(args.old), dump.load(args.new)
    for d in (old, new):
        if not d.reformattable:  # layout, id and schema problems do not hide what the dump says
            first = f"line {d.problems[0].line}: {d.problems[0].message}" if d.problems else "no exchanges"
            print(f"farm: {d.path}: not a dump to compare: {first}", file=sys.stderr)
            return FINDINGS
    try:
        changes = diff(old, new)
    except Malformed as e:
        print(f"farm: {e.path}: not a dump to compare: {e.message}", file=sys.stderr)
        return FINDINGS
    if args.json:
        _print_json(changes.to_json())
    elif args.markdown:
        print(changes.to_markdown())
    else:
        print(changes.to_text())
    return OK


# --- farm coverage --------------------------------------------------------------


def cmd_coverage(args) -> int:
    from farm.coverage import coverage

    cov = coverage(Path(args.tree))
    status = FINDINGS if any(c.inspection.alarming for c in cov.cells) else OK
    if args.json:
        _print_json(cov.to_json())
        return status
    from rich.table import Table
    from rich.text import Text

    style = {"real": "green", "fake": "yellow", "invalid": "bold red"}
    table = Table(title=f"{cov.directory} ({cov.scheme.value} names)")
    table.add_column("QEMU")
    for column in cov.columns:
        table.add_column(column)
    for version in reversed(cov.versions):
        row: list[str | Text] = [str(version)]
        for column in cov.columns:
            cell = cov.cell(version, column)
            if cell is None:
                row.append("")
                continue
            verdict = cell.inspection.verdict.value
            alarm = "!" if cell.inspection.alarming else ""
            row.append(Text(verdict + alarm, style[verdict]))
        table.add_row(*row)
    console = _console()
    console.print(table)
    for cell in cov.cells:
        if cell.inspection.alarming:
            console.print(Text.assemble((Path(cell.inspection.file).name, "bold red"),
                                        ": " + "; ".join(cell.inspection.reasons)))
    for stray in cov.strays:
        console.print(Text.assemble(("ignored", "yellow"), f": {stray}"))
    return status


# --- farm hosts -------------------------------------------------------------------


def cmd_hosts_list(args) -> int:
    from farm.inventory import resolve_inventory

    inventory = resolve_inventory(args.inventory)
    hosts = [h.model_dump(mode="json") for h in inventory.hosts]
    if args.json:
        _print_json(hosts)
        return OK
    from rich.table import Table

    table = Table(title=str(inventory.source) if getattr(inventory, "source", None) else None)
    for column in ("name", "arch", "transport", "address", "variants", "max jobs", "tags"):
        table.add_column(column)
    for h in hosts:
        address = f"{h.get('user')}@{h.get('address')}:{h.get('port')}" if h.get("transport") == "ssh" else "-"
        table.add_row(
            h["name"],
            h["arch"],
            h["transport"],
            address,
            ",".join(h.get("variants") or []) or "-",
            str(h.get("max_jobs", 1)),
            ",".join(h.get("tags") or []) or "-",
        )
    _console().print(table)
    return OK


def cmd_hosts_check(args) -> int:
    from farm.caps.arch import Architecture
    from farm.hosts import HostConfigError, HostError, transport_for
    from farm.hosts.agent import Agent
    from farm.inventory import resolve_inventory
    from farm.jobs import check_host, host_warnings

    inventory = resolve_inventory(args.inventory)
    hosts = [inventory.host(n) for n in args.hosts] if args.hosts else inventory.hosts
    report = []
    ledger = _ledger()
    for host in hosts:
        entry: dict[str, Any] = {"name": host.name, "arch": host.arch.value, "transport": host.transport, "ok": False}
        try:
            agent = Agent(transport_for(host), host)
            facts = agent.facts()
            entry.update(ok=True, facts=facts, network=agent.network())
            entry["real_dumps"] = bool(facts["kvm"]["usable"]) and Architecture.from_uname(facts.get("arch")) is host.arch
            entry["warnings"] = host_warnings(facts)
            check_host(host, facts)
            ledger.host_seen(host.name)
        except HostError as err:  # reached but misconfigured, or not reached (an outage)
            config = isinstance(err, HostConfigError)
            entry.update(ok=False, error=str(err), error_kind="config" if config else "unreachable")
            ledger.host_failed(host.name, str(err), config=config)
        entry["health"] = ledger.host(host.name).to_json()
        report.append(entry)
    if args.json:
        _print_json(report)
    else:
        from rich.table import Table
        from rich.text import Text

        table = Table(title=f"hosts of {inventory.source}")
        for column in ("host", "arch", "machine", "kernel", "CPU", "/dev/kvm", "real dumps", "QEMU", "probes",
                       "network"):
            table.add_column(column)
        for e in report:
            f = e.get("facts")
            if not f:
                machine = Text("reached", "yellow") if e["error_kind"] == "config" else Text("unreachable", "red")
                error = f"configuration error: {e['error']}" if e["error_kind"] == "config" else e["error"]
                table.add_row(e["name"], e["arch"], machine, error, "", "", "", "", "", "")
                continue
            kvm = f["kvm"]
            qemu = [q for q in f.get("qemu", []) if q.get("arch") == Architecture.parse(e["arch"]).qemu_target]
            table.add_row(
                e["name"], e["arch"], str(f.get("arch", "?")), str(f.get("kernel", "?")),
                str(f.get("cpu_model") or "?")[:40],
                Text("usable", "green") if kvm.get("usable") else Text(str(kvm.get("error") or "missing"), "red"),
                Text("yes", "green") if e["real_dumps"] else Text("no (TCG only)", "yellow"),
                ", ".join(str(q.get("version") or "?") for q in qemu) or Text("none", "red"),
                str(len(f.get("probes", []))),
                _network_cell(e["network"]),
            )
        console = _console()
        console.print(table)
        for e in report:  # reached, facts known, and refused (e.g. of another arch than the inventory says)
            if e.get("facts") and e.get("error"):
                console.print(Text.assemble((e["name"], "yellow"), f": configuration error: {e['error']}"))
            for warning in e.get("warnings", []):
                console.print(Text.assemble((e["name"], "yellow"), f": warning: {warning}"))
    return OK if all(e["ok"] for e in report) else FINDINGS


def _network_cell(network: dict):
    """hosts check's network column: not needed, or needed for what and whether the host has it."""
    from rich.text import Text

    if not network["needs"]:
        return Text("not needed", "green")
    what = ", ".join(f"{k} {v}" for k, v in network["sources"].items())
    failed = [f"{c['endpoint']}: {c.get('error')}" for c in network["checks"] if not c.get("ok")]
    if network["reachable"]:
        return Text.assemble(("needed, reachable", "green"), f" ({what})")
    return Text.assemble(("needed, unreachable", "red"), f" ({'; '.join(failed) or what})")


def cmd_hosts_release(args) -> int:
    from farm.inventory import resolve_inventory

    inventory = resolve_inventory(args.inventory)
    health = [_ledger().release_host(inventory.host(name).name) for name in args.hosts]
    if args.json:
        _print_json([h.to_json() for h in health])
    else:
        for h in health:
            print(f"{h.name}: released (no longer quarantined)")
    return OK


def cmd_status(args) -> int:
    from farm.inventory import resolve_inventory

    inventory = resolve_inventory(args.inventory)
    ledger = _ledger()
    broker = _broker(args)
    live: dict[str, list[str]] = {}
    if broker:
        from farm.dispatch.distributed import make_app, workers

        live = workers(make_app(broker))
    served_hosts = {q.split(".", 1)[1] for queues in live.values() for q in queues if q.startswith("host.")}
    running = ledger.running_jobs()
    hosts = []
    for host in inventory.hosts:
        health = ledger.host(host.name).to_json()
        hosts.append({
            "name": host.name, "arch": host.arch.value, "transport": host.transport, **health,
            "served": (host.name in served_hosts) if broker else None,
            "running": [j.id for j in running if j.host == host.name],
        })
    status = {"mode": "distributed" if broker else "embedded", "hosts": hosts, "workers": live,
              "running": [_job_json(j) | {"id": j.id} for j in running]}
    if args.json:
        _print_json(status)
        return OK
    from rich.table import Table
    from rich.text import Text

    table = Table(title=f"farm status ({status['mode']})")
    for column in ("host", "arch", "health", "last seen", "last failure", "served", "running"):
        table.add_column(column, overflow="fold")
    for h in hosts:
        health = {"quarantined": Text("quarantined", "bold red"),
                  "failing": Text(f"{h['failures']} failure(s)", "yellow"),
                  "misconfigured": Text("configuration error", "yellow"), "ok": Text("ok", "green")}.get(
                      h["state"], h["state"])
        failure: str | Text = "-"
        if h["last_failure"]:
            why = h["last_failure_reason"]
            if h["last_failure_kind"] == "config":
                why = f"configuration error: {why}"
            failure = f"{_when(h['last_failure'])}: {why}"
            if not h["failing_now"]:  # seen working since: a past failure
                failure = Text(f"past: {failure}", "dim")
        served = "-" if h["served"] is None else ("yes" if h["served"] else Text("no worker", "red"))
        table.add_row(h["name"], h["arch"], health, _when(h["last_seen"]), failure, served, ", ".join(h["running"]) or "-")
    console = _console()
    console.print(table)
    for worker, queues in live.items():
        console.print(f"worker {worker}: {', '.join(queues)}")  # plain: the console reads no markup
    return OK


# --- farm probe, farm runs ------------------------------------------------------------


def cmd_probe(args) -> int:
    from farm.inventory import resolve_inventory
    from farm.run import probe

    inventory = resolve_inventory(args.inventory)
    ledger = _ledger()
    broker = _broker(args)
    with _JobProgress(quiet=args.quiet) as progress:
        try:
            record = probe(
                inventory, args.qemu, args.arch, ledger, args.variant, args.timeout, broker=broker,
                progress=progress.update, on_start=progress.start,
                only=[n.strip() for n in args.hosts.split(",") if n.strip()] if args.hosts else None,
                qemu_ref=args.ref,
            )
        except KeyboardInterrupt:
            return _interrupted(progress.run, broker)
    published = None
    if args.publish:
        published = _publish(args, record.id, progress=None if args.quiet else _say)
    if args.json:
        _print_json({"run": record.id, "jobs": [_job_json(j) for j in record.jobs],
                     **({"publication": published.to_json()} if published else {})})
    else:
        _print_run(record)
        if published:
            print(published.message)
    return OK if all(j.status == "ok" for j in record.jobs) else FINDINGS


def cmd_publish(args) -> int:
    publication = _publish(args, args.run, progress=None if args.quiet else _say)
    if args.json:
        _print_json(publication.to_json())
        return OK
    for d in publication.dumps:
        print(f"{d.target.name}: {d.action}" + (f" ({d.commit[:12]} {d.subject})" if d.commit else ""))
    for s in publication.skipped:
        print(f"skipped: {s}")
    for w in publication.warnings:
        print(f"warning: {w}")
    print(publication.message)
    return OK


def _publish(args, run: int, progress=None):
    """farm publish's options (and farm probe --publish's) into publish.publisher.publish."""
    from farm.config import settings
    from farm.publish import publisher

    opts = publisher.options_from_settings(
        settings(), Path(args.libvirt) if args.libvirt else None, mr=args.mr or None,
        patches=Path(args.patches) if args.patches else None, dry_run=args.dry_run or None,
        allow_fake=args.allow_fake or None, allow_distro_build=args.allow_distro_build or None,
        strict=args.strict or None, tests=publisher.run_tests_names(args.tests),
    )
    return publisher.publish(_ledger(), run, opts, progress)


def _say(message: str) -> None:
    print(f"farm: {message}", file=sys.stderr)


def cmd_runs_resume(args) -> int:
    from farm.inventory import resolve_inventory
    from farm.run import resume

    ledger = _ledger()
    inventory = resolve_inventory(args.inventory or ledger.run(args.run).inventory_path)
    broker = _broker(args)
    with _JobProgress(quiet=args.quiet) as progress:
        try:
            record = resume(ledger, args.run, inventory, broker, progress.update, progress.start)
        except KeyboardInterrupt:
            return _interrupted(progress.run, broker)
    if args.json:
        _print_json({"run": record.id, "jobs": [_job_json(j) for j in record.jobs]})
    else:
        _print_run(record)
    return OK if all(j.status == "ok" for j in record.jobs) else FINDINGS


def _interrupted(run: int | None, broker: str | None) -> int:
    """Ctrl-C (or SIGTERM) of a run's driver: say what became of the run and how to finish it."""
    if run is None:
        print("farm: interrupted", file=sys.stderr)
    elif broker:
        print(f"farm: interrupted: the workers go on with run {run}'s jobs; collect their results with: "
              f"farm runs resume {run}", file=sys.stderr)
    else:
        print(f"farm: interrupted: run {run}'s unfinished jobs were stopped; run them again with: "
              f"farm runs resume {run}", file=sys.stderr)
    return INTERRUPTED


def cmd_runs_cancel(args) -> int:
    from farm.run import cancel

    ledger = _ledger()
    jobs = cancel(ledger, args.run, args.jobs or None, _broker(args))
    if args.json:
        _print_json({"run": args.run, "cancelled": [_job_json(j) | {"id": j.id} for j in jobs]})
    elif not jobs:
        print(f"run {args.run}: no unfinished job to cancel")
    else:
        for j in jobs:
            print(f"{j.id}: cancelled")
    return OK


def cmd_worker(args) -> int:
    import functools

    from farm import nightly
    from farm.dispatch.distributed import make_app, serve
    from farm.inventory import resolve_inventory
    from farm.logs import log_uncaught_exceptions

    log_uncaught_exceptions()

    broker = _broker(args)
    if not broker:
        raise UsageError("farm worker needs a broker: --broker URL or FARM_BROKER_URL")
    inventory = resolve_inventory(args.inventory)
    hosts = [inventory.host(name.strip()) for name in (args.hosts or "").split(",") if name.strip()]
    if not hosts and not args.coordinator:
        raise UsageError("--hosts: name at least one host of the inventory (or serve --coordinator only)")
    nightly_pass = functools.partial(nightly.scheduled_pass, inventory) if args.coordinator else None
    serve(make_app(broker), hosts, args.loglevel, nightly_pass)
    return OK


def cmd_beat(args) -> int:
    from farm.dispatch.distributed import beat, make_app

    broker = _broker(args)
    if not broker:
        raise UsageError("farm beat needs a broker: --broker URL or FARM_BROKER_URL")
    beat(make_app(broker), args.loglevel)
    return OK


def cmd_ansible_inventory(args) -> int:
    from farm.ansible_inventory import ansible_host, ansible_list
    from farm.inventory import resolve_inventory

    inventory = resolve_inventory(args.inventory)
    _print_json(ansible_host(inventory, args.host) if args.host else ansible_list(inventory))
    return OK


def cmd_dashboard(args) -> int:
    import uvicorn

    from farm.config import settings
    from farm.inventory import resolve_inventory
    from farm.web.app import create_app

    s = settings()
    tree = Path(args.libvirt) if args.libvirt else s.libvirt_checkout
    app = create_app(_ledger(), resolve_inventory(args.inventory), tree, s.dashboard_secret())
    print(f"farm: dashboard on http://{args.host}:{args.port}/", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return OK


def cmd_nightly(args) -> int:
    """Thin: farm.nightly does the work; without --once, one pass at each time of FARM_NIGHTLY_CRON."""
    import datetime
    import time

    from farm import nightly
    from farm.config import settings
    from farm.inventory import resolve_inventory
    from farm.publish import publisher

    s = settings()
    tree = Path(args.libvirt) if args.libvirt else s.libvirt_checkout
    if args.publish and tree is None:
        raise UsageError("--publish needs a libvirt checkout: --libvirt PATH or FARM_LIBVIRT_CHECKOUT")
    say = None if args.quiet else _say

    def one_pass() -> int:
        result = nightly.run_pass(
            s, resolve_inventory(args.inventory), _ledger(), tree, dry_run=args.dry_run, publish=args.publish,
            broker=_broker(args), say=say, publish_options=lambda: publisher.options_from_settings(s, tree),
        )
        print(nightly.to_json_text(result) if args.json else nightly.render(result), flush=True)
        return FINDINGS if result.failed else OK

    if args.once or args.dry_run:
        return one_pass()
    while True:
        when = nightly.next_time(s.nightly_cron)
        if say:
            say(f"next nightly pass at {when:%Y-%m-%d %H:%M %Z}")
        time.sleep(max(0.0, (when - datetime.datetime.now().astimezone()).total_seconds()))
        try:
            one_pass()
        except FarmError as e:  # a bad night (QEMU's server down) does not end the loop
            print(f"farm: nightly: {e}", file=sys.stderr, flush=True)


def cmd_config_show(args) -> int:
    from farm.config import Loaded

    loaded = Loaded({"broker_url": args.broker, "inventory": args.inventory, "libvirt_checkout": args.libvirt})
    values, origins = loaded.settings.public(), loaded.origins()
    if args.json:
        _print_json({"files": [str(f.path) for f in loaded.files],
                     "settings": {name: {"value": values[name], "source": origins[name]} for name in values}})
        return OK
    from rich.table import Table

    table = Table(title="settings (" + (", ".join(str(f.path) for f in loaded.files) or "no config file") + ")")
    for column in ("setting", "value", "from"):
        table.add_column(column)
    for name, value in values.items():
        table.add_row(name, "" if value is None else value, origins[name])
    _console().print(table)
    return OK


def _ledger():
    from farm.config import settings
    from farm.ledger import Ledger

    s = settings()
    return Ledger(s.state_dir, s.quarantine_after)


def _broker(args) -> str | None:
    from farm.config import settings

    return getattr(args, "broker", None) or settings().broker


def cmd_runs_list(args) -> int:

    runs = _ledger().runs(args.limit)
    if args.json:
        _print_json([{**r.to_json(), "jobs": [_job_json(j) for j in r.jobs]} for r in runs])
        return OK
    from rich.table import Table

    table = Table(title="runs")
    for column in ("run", "QEMU", "archs", "mode", "status", "started", "jobs"):
        table.add_column(column)
    for r in runs:
        counts: dict[str, int] = {}
        for j in r.jobs:
            counts[j.status] = counts.get(j.status, 0) + 1
        table.add_row(
            str(r.id), _qemu(r), ",".join(r.archs) + (f" +{r.variant}" if r.variant else ""), r.mode, r.status,
            _when(r.created), " ".join(f"{n} {s}" for s, n in sorted(counts.items())),
        )
    _console().print(table)
    return OK


def cmd_runs_show(args) -> int:

    ledger = _ledger()
    record = ledger.run(args.run)
    publications = ledger.publications(args.run)
    if args.json:
        _print_json({**record.to_json(), "publications": [p.to_json() for p in publications]})
    else:
        print(f"run {record.id}: QEMU {_qemu(record)}, {record.status}, started {_when(record.created)}, "
              f"inventory {record.inventory}")
        _print_run(record)
        for p in publications:
            print(f"published {_when(p.created)}: {p.status}"
                  + (f", branch {p.branch} of {p.checkout}" if p.branch else f" ({p.checkout})"))
            for c in p.commits:
                print(f"  commit {c}")
            if p.mr_url or p.details.get("mr_action"):
                print(f"  merge request {p.details.get('mr_action') or ''}: {p.mr_url or '(by push options)'}")
            for patch in p.patches:
                print(f"  patch {patch}")
    return OK


class _JobProgress:
    """Live progress of a run's jobs on stderr: on a terminal a rich line per job, else a line per
    step; nothing with ``quiet``."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.enabled = not quiet and sys.stderr.isatty()
        self.tasks: dict[str, object] = {}
        self.run: int | None = None

    def __enter__(self):
        if self.enabled:
            from rich.console import Console
            from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

            self.progress = Progress(
                SpinnerColumn(), TextColumn("{task.fields[job]}", markup=False), TimeElapsedColumn(),
                TextColumn("{task.description}", markup=False),
                console=Console(stderr=True, markup=False, emoji=False, highlight=False), transient=False,
            )
            self.progress.__enter__()
        return self

    def __exit__(self, *exc):
        if self.enabled:
            self.progress.__exit__(*exc)

    def start(self, run: int, jobs) -> None:
        self.run = run
        if self.quiet:
            return
        if not self.enabled:
            print(f"farm: run {run}: {len(jobs)} job(s)", file=sys.stderr)
            return
        for job in jobs:
            self.tasks[job.id] = self.progress.add_task("waiting", job=job.id, total=None)

    def update(self, job_id: str, message: str) -> None:
        if self.quiet:
            return
        if not self.enabled:
            print(f"farm: {job_id}: {message}", file=sys.stderr)
        elif job_id in self.tasks:
            self.progress.update(self.tasks[job_id], description=message[:100])


def _print_run(record) -> None:
    from rich.table import Table
    from rich.text import Text

    from farm.caps.names import column

    style = {"ok": "green", "fake": "bold red", "invalid": "bold red", "wrong-version": "bold red",
             "failed": "red", "timeout": "red", "running": "yellow", "pending": "dim"}
    table = Table(title=f"run {record.id}: QEMU {_qemu(record)}")
    for heading in ("arch", "host", "status", "verdict", "reasons", "artifact"):
        table.add_column(heading, overflow="fold")
    for j in record.jobs:
        table.add_row(
            column(j.arch, j.variant), j.host or "-",
            Text(j.status, style.get(j.status, "white")), j.verdict or "-",
            "\n".join(j.reasons + [f"warning: {w}" for w in j.warnings]) or "-", j.artifact or "-",
        )
    _console().print(table)


def _qemu(record) -> str:
    """A run's QEMU: its release, and the git ref built when it was not the release's tag."""
    return record.qemu + (f" (built at {record.qemu_ref})" if record.qemu_ref else "")


def _job_json(j) -> dict:
    return {k: v for k, v in j.to_json().items() if k in (
        "arch", "variant", "host", "status", "verdict", "reasons", "warnings", "artifact", "seconds")}


def _when(stamp: float | None) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S") if stamp else "-"




# --- helpers ------------------------------------------------------------------------


def _console():
    """stdout's console: as wide as $COLUMNS says (1 to 10000), else the terminal, else 200 columns."""
    from rich.console import Console

    plain = {"markup": False, "emoji": False, "highlight": False}  # text from dumps and hosts is never markup
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and 0 < int(columns) <= 10000:
        return Console(width=int(columns), **plain)
    return Console(**plain) if sys.stdout.isatty() else Console(width=200, **plain)


def _dump_name(path: str):
    """The libvirt name of a file, or None when it does not have one."""
    from farm.caps.names import DumpName

    try:
        return DumpName.parse(Path(path).name)
    except FarmError:
        return None


def _print_inspection(i) -> None:
    f = i.facts
    verdict = i.verdict.value.upper() + (" (!)" if i.alarming else "")
    print(f"{i.file}: {verdict}")
    print(
        f"  QEMU {f.qemu_version} ({f.package or 'no package string'}), target {f.target}, "
        f"accelerator {f.accelerator}, {f.sessions} session(s), {i.layout.value if i.layout else 'no'} layout"
    )
    print(
        f"  {f.machine_types} machine types, {f.cpu_models} CPU models, {f.device_types} QOM types, "
        f"host CPU {'expanded' if f.host_cpu_expanded else 'not expanded'}"
    )
    for r in i.reasons:
        print(f"  reason: {r}")
    for w in i.warnings:
        print(f"  warning: {w}")


def _write_atomically(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.chmod(tmp, path.stat().st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def _print_json(obj) -> None:
    json.dump(obj, sys.stdout, indent=2)
    sys.stdout.write("\n")


def _publish_options(p) -> None:
    p.add_argument("--libvirt", metavar="PATH", help="the libvirt checkout (default: $FARM_LIBVIRT_CHECKOUT)")
    p.add_argument("--mr", action="store_true", help="push to the fork remote and create/update the merge request")
    p.add_argument("--patches", metavar="DIR", help="write a git format-patch series with a cover letter")
    p.add_argument("--dry-run", action="store_true", help="check and compare only: no branch, no commits")
    p.add_argument("--allow-fake", action="store_true", help="publish fakes of archs libvirt expects real")
    p.add_argument("--allow-distro-build", action="store_true", help="publish dumps of QEMU builds upstream does "
                   "not take (distribution builds, micro releases)")
    p.add_argument("--strict", action="store_true", help="refuse the whole run when one of its dumps cannot be "
                   "published (default: skip it and say why)")
    p.add_argument("--tests", metavar="NAME,...", help="capability tests to regenerate (default: all of the tree's)")


def _positive(text: str) -> float:
    """An argparse type: a positive number of seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text}")
    return value


def _port(text: str) -> int:
    """An argparse type: a TCP port, 1-65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"not a port (1-65535): {text!r}")
    return int(text)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farm", description="A probe farm for libvirt's QEMU capabilities data.")
    parser.add_argument("--version", action="version", version=f"farm {farm.version()}",
                        help="print farm's version and exit")
    sub = parser.add_subparsers(metavar="COMMAND")

    def inventory_option(p) -> None:
        p.add_argument("--inventory", metavar="FILE", help="inventory file (default: $FARM_INVENTORY or built-in)")

    def command(parent, name, func, help_):
        p = parent.add_parser(name, help=help_, description=help_)
        p.add_argument("--json", action="store_true", help="print JSON instead of text")
        p.set_defaults(func=func)
        return p

    def group(name, help_):
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=lambda args: (p.print_help(sys.stderr), USAGE)[1])
        return p.add_subparsers(metavar="ACTION")

    rsub = group("replies", "validate, inspect, format and compare .replies dumps")
    p = command(rsub, "validate", cmd_validate, "check dumps as libvirt's qemu-replies-tool.py does")
    p.add_argument("files", nargs="+", metavar="FILE")
    p = command(rsub, "inspect", cmd_inspect, "facts and verdict (real, fake, invalid) of dumps")
    p.add_argument("files", nargs="+", metavar="FILE")
    p = command(rsub, "fmt", cmd_fmt, "rewrite dumps in the current layout, ids renumbered")
    p.add_argument("files", nargs="+", metavar="FILE")
    p.add_argument("--check", action="store_true", help="only report files that would change (exit 1)")
    p = command(rsub, "diff", cmd_diff, "semantic difference of two dumps")
    p.add_argument("old", metavar="OLD")
    p.add_argument("new", metavar="NEW")
    p.add_argument("--markdown", action="store_true", help="Markdown, for merge request descriptions")

    p = command(sub, "coverage", cmd_coverage, "QEMU version x arch matrix of a libvirt checkout")
    p.add_argument("tree", metavar="LIBVIRT_TREE")

    hsub = group("hosts", "the hosts of the inventory")
    p = command(hsub, "list", cmd_hosts_list, "list the inventory's hosts")
    inventory_option(p)
    p = command(hsub, "check", cmd_hosts_check, "ask each host's agent for its facts (arch, /dev/kvm, QEMU)")
    p.add_argument("hosts", nargs="*", metavar="HOST", help="hosts to check (default: all)")
    inventory_option(p)

    p = command(hsub, "release", cmd_hosts_release, "take hosts out of quarantine")
    p.add_argument("hosts", nargs="+", metavar="HOST")
    inventory_option(p)

    p = command(sub, "status", cmd_status, "hosts (health, quarantine), workers and their queues, running jobs")
    inventory_option(p)
    p.add_argument("--broker", metavar="URL", help="default: $FARM_BROKER_URL (unset: embedded, no workers)")

    p = command(sub, "probe", cmd_probe, "probe a QEMU release on the inventory's hosts and judge the dumps")
    p.add_argument("--qemu", required=True, metavar="VERSION", help="QEMU release, e.g. 9.1.0")
    p.add_argument("--ref", metavar="REF", help="a git ref or commit of QEMU to build instead of the tag vVERSION "
                   "(hosts whose toolchain.qemu is git:URL@REF); the dumps are filed under VERSION")
    p.add_argument("--arch", default="all", metavar="ARCHS", help="all (the inventory's), native, or x86_64,s390x,...")
    p.add_argument("--variant", metavar="V", help="a dump variant, e.g. amdsev (hosts that list it)")
    p.add_argument("--hosts", metavar="NAME,...", help="only these hosts (distributed: sent to their own queues)")
    inventory_option(p)
    p.add_argument("--timeout", type=_positive, default=600.0, metavar="SECONDS", help="per probe (default 600)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p.add_argument("--broker", metavar="URL", help="run on Celery workers (default: $FARM_BROKER_URL; unset: embedded)")
    p.add_argument("--publish", action="store_true", help="publish the run's dumps afterwards (as farm publish)")
    _publish_options(p)

    p = command(sub, "publish", cmd_publish, "put a run's dumps into the libvirt checkout: branch, tested "
                "commits, merge request or patches")
    p.add_argument("run", type=int, metavar="RUN")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    _publish_options(p)

    p = command(sub, "worker", cmd_worker, "serve hosts' jobs from the broker (a Celery worker)")
    p.add_argument("--hosts", metavar="NAME,...", help="the inventory hosts this worker drives")
    p.add_argument("--coordinator", action="store_true", help="also serve the farm.coordinator queue: run the "
                   "nightly passes farm beat sends (over this inventory, with this machine's ledger)")
    inventory_option(p)
    p.add_argument("--broker", metavar="URL", help="default: $FARM_BROKER_URL")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")

    p = command(sub, "beat", cmd_beat, "the Celery beat scheduler: send a nightly pass to farm.coordinator at each "
                "FARM_NIGHTLY_CRON time (one farm beat per farm)")
    p.add_argument("--broker", metavar="URL", help="default: $FARM_BROKER_URL")
    p.add_argument("--loglevel", default="INFO", help="Celery log level (default INFO)")

    p = sub.add_parser("ansible-inventory", help="the inventory as Ansible's dynamic inventory (JSON)",
                       description="the inventory as Ansible's dynamic inventory (JSON): groups agents, "
                       "arch_<arch>, tag_<tag>, coordinator; host variables ansible_* and farm_*")
    p.set_defaults(func=cmd_ansible_inventory)
    p.add_argument("--json", action="store_true", help="accepted as by every command: the output is JSON anyway")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="all groups and hosts, with _meta.hostvars (the default)")
    what.add_argument("--host", metavar="NAME", help="one host's variables")
    inventory_option(p)

    p = command(sub, "dashboard", cmd_dashboard, "serve the web dashboard: coverage, hosts, runs, JSON API, /metrics")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8080, help="port (default 8080)")
    inventory_option(p)
    p.add_argument("--libvirt", metavar="PATH", help="libvirt tree to show coverage of (default: $FARM_LIBVIRT_CHECKOUT)")

    p = command(sub, "nightly", cmd_nightly, "probe the QEMU releases (and release candidates) the ledger and the "
                "libvirt tree lack, or have only stale results of; publish when the data changed")
    p.add_argument("--once", action="store_true", help="one pass now (default: a pass at each FARM_NIGHTLY_CRON time)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only: no probe, no publishing")
    inventory_option(p)
    p.add_argument("--libvirt", metavar="PATH", help="libvirt tree whose coverage counts, and that --publish "
                   "publishes into (default: $FARM_LIBVIRT_CHECKOUT; unset: the ledger alone)")
    p.add_argument("--publish", action="store_true", help="publish each run's dumps (as farm publish)")
    p.add_argument("--broker", metavar="URL", help="run on Celery workers (default: $FARM_BROKER_URL; unset: embedded)")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")

    csub = group("config", "farm's settings: the config file, FARM_* variables, options")
    p = command(csub, "show", cmd_config_show, "every setting, its value and where it came from (default, "
                "file PATH, env FARM_X, option), secrets masked")
    p.add_argument("--broker", metavar="URL", help="as a command given --broker would (above $FARM_BROKER_URL)")
    p.add_argument("--inventory", metavar="FILE", help="as a command given --inventory would")
    p.add_argument("--libvirt", metavar="PATH", help="as a command given --libvirt would")

    rsub = group("runs", "the ledger of runs and their jobs")
    p = command(rsub, "list", cmd_runs_list, "recent runs")
    p.add_argument("--limit", type=int, default=20)
    p = command(rsub, "show", cmd_runs_show, "one run: its jobs, verdicts, artifacts")
    p.add_argument("run", type=int, metavar="RUN")
    p = command(rsub, "resume", cmd_runs_resume, "finish a run's unfinished jobs (after an interruption)")
    p.add_argument("run", type=int, metavar="RUN")
    p.add_argument("--inventory", metavar="FILE", help="default: the run's own inventory")
    p.add_argument("--broker", metavar="URL", help="default: $FARM_BROKER_URL")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr")
    p = command(rsub, "cancel", cmd_runs_cancel, "cancel a run's unfinished jobs (all, or the named ones): "
                "recorded cancelled, stopped on their hosts")
    p.add_argument("run", type=int, metavar="RUN")
    p.add_argument("jobs", nargs="*", metavar="JOB", help="job ids (run-3-x86_64) or arch[+variant] columns "
                   "(default: every unfinished job)")
    p.add_argument("--broker", metavar="URL", help="default: $FARM_BROKER_URL (needed for a distributed run)")
    return parser
