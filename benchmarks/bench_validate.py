"""`farm replies validate` against libvirt's scripts/qemu-replies-tool.py.

Both check the same 29 dumps of libvirt 11.3.0's tests/qemucapabilitiesdata,
as separate processes (start-up included), alternating, several rounds; the
verdicts must agree file by file. Prints medians and the ratio farm/tool.
Goal: ratio <= 0.5.

    python benchmarks/bench_validate.py [--rounds N] [--tree PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

CACHE = Path(
    os.environ.get("FARM_CACHE") or ("/var/cache/farm" if os.geteuid() == 0 else Path.home() / ".cache" / "farm")
)


def timed(argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run(argv, capture_output=True, text=True)
    return time.perf_counter() - start, result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--tree", type=Path, default=CACHE / "src" / "libvirt-11.3.0")
    args = parser.parse_args()

    files = sorted(str(p) for p in (args.tree / "tests" / "qemucapabilitiesdata").glob("*.replies"))
    tool = [sys.executable, str(args.tree / "scripts" / "qemu-replies-tool.py"), *files]
    farm = [sys.executable, "-m", "farm", "replies", "validate", "--json", *files]

    tool_times, farm_times = [], []
    for _ in range(args.rounds):
        t, tool_result = timed(tool)
        tool_times.append(t)
        t, farm_result = timed(farm)
        farm_times.append(t)

    tool_ok = {line.split("'")[1]: line.endswith("OK") for line in tool_result.stdout.splitlines() if "' ..." in line}
    farm_ok = {r["file"]: r["valid"] for r in json.loads(farm_result.stdout)}
    if tool_ok != farm_ok:
        print("verdicts differ:", {f for f in files if tool_ok.get(f) != farm_ok.get(f)})
        return 1

    tool_median, farm_median = statistics.median(tool_times), statistics.median(farm_times)
    print(f"files: {len(files)} ({sum(os.path.getsize(f) for f in files) / 1e6:.1f} MB), rounds: {args.rounds}, "
          f"same verdicts: yes ({sum(farm_ok.values())} valid)")
    print(f"qemu-replies-tool.py   median {tool_median:.3f} s  (min {min(tool_times):.3f})")
    print(f"farm replies validate  median {farm_median:.3f} s  (min {min(farm_times):.3f})")
    print(f"ratio farm/tool: {farm_median / tool_median:.2f}x (goal <= 0.50x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
