"""`farm probe --arch all` against the same four qemucapsprobe runs started by a shell.

Toolchains cached (the first round builds them if needed and is not counted).
Baselines, in the same run: the four probes started in parallel by a shell (the
limit here) and one after another (the manual way). Prints medians and both
ratios. Goal: farm <= 1.15x the parallel shell.

    python benchmarks/bench_probe.py [--rounds N] [--qemu 7.2.0]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHS = {"x86_64": "x86_64", "aarch64": "aarch64", "ppc64": "ppc64", "s390x": "s390x"}


def timed(argv: list[str], env: dict | None = None) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, env=env)
    return time.perf_counter() - start, done


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--qemu", default="7.2.0")
    args = parser.parse_args()

    state = tempfile.mkdtemp(prefix="farm-bench-")
    env = {**os.environ, "FARM_STATE_DIR": state}
    farm = [sys.executable, "-m", "farm", "probe", "--qemu", args.qemu, "--arch", "all", "--json", "--quiet"]
    _, warm = timed(farm, env)  # builds or finds the toolchain
    jobs = json.loads(warm.stdout)["jobs"]
    provenance = json.loads((Path(jobs[0]["artifact"]).parent / "provenance.json").read_text())
    probe = provenance["libvirt"]["probe"]
    binaries = {j["arch"]: f"/usr/bin/qemu-system-{ARCHS[j['arch']]}" for j in jobs}

    out = tempfile.mkdtemp(prefix="farm-bench-shell-")
    commands = [f"{shlex.quote(probe)} {shlex.quote(b)} > {out}/{a}.replies" for a, b in binaries.items()]
    parallel = ["sh", "-c", " & ".join(commands) + " & wait"]
    sequential = ["sh", "-c", " && ".join(commands)]

    times: dict[str, list[float]] = {"farm": [], "parallel": [], "sequential": []}
    for _ in range(args.rounds):
        for what, argv in (("farm", farm), ("parallel", parallel), ("sequential", sequential)):
            t, done = timed(argv, env)
            if what != "farm" and done.returncode != 0:
                print(f"{what} shell failed: {done.stderr[-500:]}")
                return 1
            times[what].append(t)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"four probes ({', '.join(binaries)}), QEMU {args.qemu}, {args.rounds} rounds, toolchains cached")
    for what in ("farm", "parallel", "sequential"):
        print(f"  {what:<10} median {med[what]:.2f} s  (min {min(times[what]):.2f})")
    print(f"farm / parallel shell:   {med['farm'] / med['parallel']:.2f}x (goal <= 1.15x)")
    print(f"farm / sequential shell: {med['farm'] / med['sequential']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
