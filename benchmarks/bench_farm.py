"""A simulated farm of SSH hosts driven by the embedded dispatcher: throughput, per-job overhead
and coordinator memory for 1, 8 and 32 hosts, in one run.

Each host is a real sshd in its own network namespace (tests/netns.py), logged into as the
unprivileged ``farm`` user; its libvirt toolchain is ``builddir:`` a replaying stand-in for
qemucapsprobe (tests/standin.py) that sleeps DELAY seconds and prints libvirt's recorded
caps_9.2.0_x86_64.replies (a real KVM dump), so jobs end ``ok``. The coordinator is what
``farm probe`` is without a broker: ``farm.dispatch.embedded.dispatch`` in one process, every
SSH connection reused per host.

For each N, in a child process of its own (so its peak RSS is its own): the first N hosts,
``--rounds`` x N jobs of x86_64 (at least ``--min-jobs``; 4 per host by default: throughput is a
steady-state figure, and with 2 per host half the jobs are the first wave, all starting and
ending together), each job's candidates all N
hosts (max_jobs 1: at most N probes at once). Job ids are ``run-<run>-<arch>``, so every job gets a run of its own in the
ledger (one x86_64 job per run); that changes nothing in what a job does. A warm-up (one job
per host: the SSH connection, the agent upload over SFTP, the agent's cache dir) is not
counted; the peak RSS is reset after it (/proc/self/clear_refs) and read after the measured
jobs.

Reported per N: jobs/s, the ratio to linear (N hosts x 1/DELAY jobs/s: every host busy with
nothing but the stand-in), per-job overhead = (finished - started) of the job record minus
DELAY (p50, p95; the record spans facts, toolchain, probe, the reply with the dump, and judging,
the last after the host's slot is given back), the coordinator-side keep() (artifact + ledger, after the record's end), how the
overhead splits into its steps (medians), and the coordinator's peak RSS.
Goals: overhead p50 <= 0.3 s; throughput at 32 hosts >= 0.8x linear.

Needs root (namespaces, sshd) and ./bootstrap's cache (libvirt 11.3.0's test data).

    python benchmarks/bench_farm.py [--hosts 1,8,32] [--rounds 4] [--min-jobs 8] [--delay 2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

QEMU = "9.2.0"  # the release of the recorded dump the stand-in replays
ARCH = "x86_64"
OVERHEAD_GOAL = 0.3  # s, p50
LINEAR_GOAL = 0.8  # throughput at the largest N / linear


# ---------------------------------------------------------------------------------------------
# the child: one N, one coordinator process


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _cpu_ticks(pid: int | str) -> int:
    """utime + stime + cutime + cstime of a process (its own CPU and that of its reaped children)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0
    fields = text[text.rfind(")") + 2:].split()
    return sum(int(f) for f in fields[11:15])


def _namespace_cpu(namespaces: list[str]) -> float:
    """CPU seconds used so far by the processes in these network namespaces (sshd, sessions, agents)."""
    ticks = 0
    for namespace in namespaces:
        done = subprocess.run(["ip", "netns", "pids", namespace], check=False, capture_output=True, text=True)
        ticks += sum(_cpu_ticks(pid) for pid in done.stdout.split())
    return ticks / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> float:
    """CPU seconds the whole machine has been busy (all cores, /proc/stat)."""
    fields = [int(f) for f in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle, iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _self_cpu() -> float:
    """CPU seconds of the coordinator: its own and its descendants' (the judging processes)."""
    times = os.times()
    helpers = sum(_cpu_ticks(pid) for pid in _descendants(os.getpid())) / os.sysconf("SC_CLK_TCK")
    return times.user + times.system + times.children_user + times.children_system + helpers


def _reset_peak(pid: int | str = "self") -> bool:
    """Reset a process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0)."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _descendants(pid: int) -> list[int]:
    """The live descendants of a process (here: the judging processes and their fork server)."""
    found, todo = [], [pid]
    while todo:
        for task in Path(f"/proc/{todo.pop()}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _peak_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Steps:
    """Time spent per step of each job, keyed by the job's thread (one thread per job)."""

    def __init__(self):
        self.local = threading.local()
        self.lock = threading.Lock()
        self.jobs: list[dict[str, float]] = []

    def begin(self) -> dict[str, float]:
        self.local.steps = defaultdict(float)
        with self.lock:
            self.jobs.append(self.local.steps)
        return self.local.steps

    def add(self, step: str, seconds: float) -> None:
        steps = getattr(self.local, "steps", None)
        if steps is not None:
            steps[step] += seconds

    @contextmanager
    def timed(self, step: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(step, time.perf_counter() - start)

    def wrap(self, owner, attribute: str, step) -> None:
        """Time every call of ``owner.attribute`` as ``step`` (a name, or a function of the call's args)."""
        original = getattr(owner, attribute)

        def wrapper(*args, **kwargs):
            with self.timed(step(*args) if callable(step) else step):
                return original(*args, **kwargs)

        setattr(owner, attribute, wrapper)


def _instrument(steps: Steps) -> None:
    """Time the steps of a job (wrappers only: the farm code runs unchanged)."""
    from farm import jobs
    from farm.dispatch import embedded
    from farm.hosts.agent import Agent

    run_job = jobs.run_job

    def timed_run_job(job, host, progress=None, judges=None, host_done=None):
        steps.begin()
        with steps.timed("run_job"):
            return run_job(job, host, progress, judges, host_done)

    jobs.run_job = timed_run_job
    steps.wrap(embedded, "keep", "keep")
    steps.wrap(jobs, "Agent", "agent()")  # install check (cached per transport after the warm-up)
    steps.wrap(Agent, "call", lambda self, *args, **kw: f"agent {args[0]}" + (f" {args[1]}" if args[0] == "toolchain" else ""))
    steps.wrap(jobs.Judges, "__call__", "judge")  # parsing and inspecting (in a judging process or not)


def child(args: argparse.Namespace) -> int:
    from farm.dispatch import embedded
    from farm.inventory import load_inventory
    from farm.jobs import Job
    from farm.ledger import JobRecord, Ledger

    inventory = load_inventory(Path(args.inventory))
    hosts = inventory.hosts[: args.n]
    ledger = Ledger(Path(args.state))
    rss_start = _status_kib("VmRSS")

    def work(count: int, pinned: bool) -> list[tuple[Job, list]]:
        items = []
        for i in range(count):
            run = ledger.new_run(QEMU, [ARCH], None, args.inventory, "embedded", args.timeout)
            job = Job(run, QEMU, ARCH, None, args.timeout)
            ledger.add_job(JobRecord(job.id, run, job.arch, job.variant))
            items.append((job, [hosts[i]] if pinned else list(hosts)))
        return items

    start = time.perf_counter()
    warm = embedded.dispatch(work(len(hosts), pinned=True), ledger)
    warmup = time.perf_counter() - start
    bad = [r for r in warm if r.status != "ok"]
    if bad:
        print(json.dumps({"error": f"warm-up job {bad[0].id} on {bad[0].host}: {bad[0].status}: {bad[0].reasons}"}))
        return 1

    steps = Steps()
    _instrument(steps)
    items = work(max(args.rounds * len(hosts), args.min_jobs), pinned=False)
    reset = _reset_peak()
    for pid in _descendants(os.getpid()):
        _reset_peak(pid)
    rss_before = _status_kib("VmRSS")
    namespaces = args.namespaces.split(",")[: len(hosts)]
    cpu_hosts, cpu_machine, cpu_self = _namespace_cpu(namespaces), _machine_cpu(), _self_cpu()
    start = time.perf_counter()
    records = embedded.dispatch(items, ledger)
    wall = time.perf_counter() - start
    cpu_self = _self_cpu() - cpu_self
    cpu_machine = _machine_cpu() - cpu_machine
    cpu_hosts = _namespace_cpu(namespaces) - cpu_hosts
    peak = _status_kib("VmHWM") if reset else None
    helpers = _descendants(os.getpid())
    helpers_peak = sum(_peak_kib(pid) for pid in helpers)
    if peak is None:  # no VmHWM reset here: the whole child's peak
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    bad = [r for r in records if r.status != "ok"]
    per_host: dict[str, int] = defaultdict(int)
    for r in records:
        per_host[r.host] += 1
    step_names = sorted({s for job in steps.jobs for s in job})
    print(json.dumps({
        "n": len(hosts),
        "jobs": len(records),
        "failed": [f"{r.id} on {r.host}: {r.status}: {'; '.join(r.reasons)[:200]}" for r in bad],
        "wall": wall,
        "warmup": warmup,
        "seconds": [r.finished - r.started for r in records if r.started and r.finished],
        "probe_seconds": [((r.provenance or {}).get("probe") or {}).get("seconds") or 0.0 for r in records],
        "steps": {s: [job.get(s, 0.0) for job in steps.jobs] for s in step_names},
        "per_host": sorted(per_host.values()),
        "cpu_self": cpu_self,
        "cpu_hosts": cpu_hosts,
        "cpu_machine": cpu_machine,
        "rss_start_kib": rss_start,
        "rss_before_kib": rss_before,
        "peak_kib": peak,
        "helpers": len(helpers),
        "helpers_peak_kib": helpers_peak,
        "peak_reset": reset,
    }))
    return 0


# ---------------------------------------------------------------------------------------------
# the parent: the hosts, one child per N, the table


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    if not values:
        return float("nan")
    k = (len(values) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


def _terminate(signum, frame):
    raise KeyboardInterrupt


def parent(args: argparse.Namespace) -> int:
    from tests import netns
    from tests.standin import RECORDED, standin_builddir

    reason = netns.unavailable()
    if reason:
        print(f"bench_farm: skipped: SSH hosts in network namespaces {reason}")
        return 0
    if not RECORDED.is_file():
        print(f"bench_farm: skipped: no recorded dump at {RECORDED} (run ./bootstrap test first)")
        return 0
    counts = sorted(int(n) for n in args.hosts.split(","))
    signal.signal(signal.SIGTERM, _terminate)  # clean up the namespaces on kill too

    work = Path(tempfile.mkdtemp(prefix="farm-bench-farm-"))
    os.chmod(work, 0o755)  # the farm user reads the stand-in
    results = []
    try:
        standin = work / "standin"
        standin.mkdir()
        recorded = standin / RECORDED.name
        shutil.copyfile(RECORDED, recorded)
        os.chmod(recorded, 0o644)
        standin_builddir(standin, args.delay, recorded)
        print(f"bench_farm: {max(counts)} SSH hosts (namespaces), stand-in qemucapsprobe {args.delay:g} s, "
              f"{args.rounds} jobs per host (at least {args.min_jobs}) per N, {os.cpu_count()} cores", flush=True)
        with netns.ssh_farm() as farm:
            t = time.perf_counter()
            hosts = farm.create(max(counts), prefix="bench")
            print(f"  hosts up in {time.perf_counter() - t:.1f} s", flush=True)
            entries = [h.entry(arch=ARCH, toolchain={"libvirt": f"builddir:{standin}", "qemu": "system",
                                                      "cache_dir": farm.cache_dir()}) for h in hosts]
            inventory = farm.inventory(work / "inventory.yaml", entries)
            for n in counts:
                state = work / f"state-{n}"
                argv = [sys.executable, __file__, "--child", "--n", str(n), "--inventory", str(inventory),
                        "--state", str(state), "--rounds", str(args.rounds), "--min-jobs", str(args.min_jobs), "--delay", str(args.delay),
                        "--timeout", str(args.timeout),
                        "--namespaces", ",".join(h.namespace for h in hosts)]
                proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
                try:
                    out, _ = proc.communicate()
                finally:
                    if proc.poll() is None:
                        proc.kill()
                        proc.wait()
                lines = out.strip().splitlines()
                try:
                    result = json.loads(lines[-1])
                except (IndexError, json.JSONDecodeError):
                    print(f"  N={n}: the child failed (exit {proc.returncode}): {out[-1000:]}")
                    return 1
                if "error" in result:
                    print(f"  N={n}: {result['error']}")
                    return 1
                results.append(result)
                print(f"  N={n}: {result['jobs']} jobs in {result['wall']:.2f} s "
                      f"(warm-up {result['warmup']:.2f} s)", flush=True)
    except KeyboardInterrupt:
        print("bench_farm: interrupted (hosts removed)")
        return 130
    finally:
        shutil.rmtree(work, ignore_errors=True)

    report(results, args)
    return 0


def report(results: list[dict], args: argparse.Namespace) -> None:
    print()
    print(f"{'hosts':>5} {'jobs':>5} {'wall s':>7} {'jobs/s':>7} {'linear':>7} {'ratio':>6} "
          f"{'ovh p50':>8} {'ovh p95':>8} {'keep p50':>9} {'peak RSS':>9} {'jobs/host':>10}")
    for r in results:
        rate = r["jobs"] / r["wall"]
        linear = r["n"] / args.delay
        overhead = [s - args.delay for s in r["seconds"]]
        keep = r["steps"].get("keep", [])
        spread = f"{r['per_host'][0]}-{r['per_host'][-1]}" + ("" if len(r["per_host"]) == r["n"] else
                                                               f" on {len(r['per_host'])}")
        peak = f"{r['peak_kib'] / 1024:.0f} MiB" + ("" if r["peak_reset"] else "*")
        print(f"{r['n']:>5} {r['jobs']:>5} {r['wall']:>7.2f} {rate:>7.2f} {linear:>7.2f} {rate / linear:>5.2f}x "
              f"{percentile(overhead, .5):>7.3f}s {percentile(overhead, .95):>7.3f}s "
              f"{percentile(keep, .5):>8.3f}s {peak:>9} {spread:>10}")
        if r["failed"]:
            print(f"      {len(r['failed'])} jobs not ok, e.g. {r['failed'][0]}")
    print("  overhead = job record (finished - started) - stand-in delay; keep = artifact + ledger after it;")
    print("  judging processes (N > 2: the coordinator's dumps are judged in them, and their fork server): "
          + ", ".join(f"N={r['n']}: {r['helpers']} using {r['helpers_peak_kib'] / 1024:.0f} MiB peak"
                      for r in results) + " (VmHWM summed; shared pages count in each)")
    print("  peak RSS = the coordinator's VmHWM during the measured jobs"
          + ("" if all(r["peak_reset"] for r in results) else " (* whole process: no reset)")
          + "; RSS before them: " + ", ".join(f"{r['rss_before_kib'] / 1024:.0f}" for r in results) + " MiB")
    print()
    print("CPU (all cores; 'others' = what else ran on this machine meanwhile):")
    print("  coord = the coordinator process and its judging processes; hosts = everything in the namespaces")
    print(f"  {'hosts':>5} {'coord s/job':>11} {'hosts s/job':>11} {'machine cores':>13} {'ours':>6} {'others':>6} "
          f"{'cores for linear':>16} {'CPU ceiling':>11}")
    cores = os.cpu_count() or 1
    for r in results:
        ours = (r["cpu_self"] + r["cpu_hosts"]) / r["jobs"]
        linear = r["n"] / args.delay
        print(f"  {r['n']:>5} {r['cpu_self'] / r['jobs']:>11.3f} {r['cpu_hosts'] / r['jobs']:>11.3f} "
              f"{r['cpu_machine'] / r['wall']:>13.2f} {(r['cpu_self'] + r['cpu_hosts']) / r['wall']:>6.2f} "
              f"{_others(r) / r['wall']:>6.2f} {ours * linear:>16.2f} {cores / ours:>7.1f} j/s")
    print(f"  cores for linear = our CPU per job (coordinator + hosts) x N/delay jobs/s; CPU ceiling = jobs/s "
          f"when that CPU is all {cores} cores give")
    busy = [r["n"] for r in results if _others(r) / r["wall"] > 0.25]
    if busy:
        print(f"  NOTE: other processes used > 0.25 cores while measuring N={', '.join(map(str, busy))}: "
              "those figures are disturbed")
    print()
    print("step medians per job (s):")
    names = [s for s in results[-1]["steps"] if s not in ("run_job",)]
    print(f"  {'hosts':>5} " + " ".join(f"{s:>{max(9, len(s))}}" for s in names))
    for r in results:
        cells = []
        for s in names:
            values = r["steps"].get(s, [])
            if s == "agent probe":
                values = [v - args.delay for v in values]  # the stand-in's sleep taken out
            cells.append(f"{percentile(values, .5):>{max(9, len(s))}.3f}")
        print(f"  {r['n']:>5} " + " ".join(cells))
    print("  (agent probe: minus the stand-in delay)")
    print()
    print("where the overhead is (p50, s): the probe as the agent timed it on the host, minus the delay"
          " (the stand-in's start, its sleep running late), and the rest (the job's way there and back)")
    for r in results:
        probe = [p - args.delay for p in r["probe_seconds"]]
        rest = [s - p for s, p in zip(r["seconds"], r["probe_seconds"], strict=False)]
        print(f"  {r['n']:>5} hosts: probe {percentile(probe, .5):.3f}, rest {percentile(rest, .5):.3f}")
    print()
    p50s = {r["n"]: percentile([s - args.delay for s in r["seconds"]], .5) for r in results}
    met = [n for n, p in p50s.items() if p <= OVERHEAD_GOAL]
    last = results[-1]
    ratio = last["jobs"] / last["wall"] / (last["n"] / args.delay)
    print(f"goal: overhead p50 <= {OVERHEAD_GOAL} s: "
          + ", ".join(f"{n} host{'s' if n > 1 else ''} {p:.3f} s" for n, p in p50s.items())
          + (" -> MET" if len(met) == len(p50s) else f" -> MISSED ({'met at N=' + ','.join(map(str, met)) if met else 'met at none'})"))
    print(f"goal: throughput at {last['n']} hosts >= {LINEAR_GOAL}x linear: {ratio:.2f}x -> "
          + ("MET" if ratio >= LINEAR_GOAL else "MISSED"))


def _others(r: dict) -> float:
    """CPU seconds used by processes other than the coordinator and the hosts while measuring."""
    return max(0.0, r["cpu_machine"] - r["cpu_self"] - r["cpu_hosts"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hosts", default="1,8,32", help="host counts, comma-separated (default 1,8,32)")
    parser.add_argument("--rounds", type=int, default=4, help="jobs per host (default 4)")
    parser.add_argument("--min-jobs", type=int, default=8, help="at least this many jobs per N (default 8)")
    parser.add_argument("--delay", type=float, default=2.0, help="stand-in probe seconds (default 2.0)")
    parser.add_argument("--timeout", type=float, default=120.0, help="probe timeout of each job")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--n", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--inventory", help=argparse.SUPPRESS)
    parser.add_argument("--state", help=argparse.SUPPRESS)
    parser.add_argument("--namespaces", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args)
    if os.geteuid() != 0:
        print("bench_farm: skipped: needs root (network namespaces, sshd, a test user)")
        return 0
    return parent(args)


if __name__ == "__main__":
    sys.exit(main())
