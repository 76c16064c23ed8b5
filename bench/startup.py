"""Start-up time of `eetool --help`, against `python -c pass` measured in the same run.

    python bench/startup.py [--repeat N]

Prints the median wall time of each command, its ratio to a bare interpreter start, and whether
`eetool --help` imports torch (from `python -X importtime -m eetool --help`). Exits 1 if torch is
imported, and 2 if `eetool --help` fails. The goal is under 0.5 s absolute; the ratio is the number
to compare between machines.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GOAL_S = 0.5
ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchvision")


def time_command(cmd: list[str], repeat: int) -> float:
    """Median wall time of ``cmd`` over ``repeat`` runs, after one warm-up run."""
    times = []
    for i in range(repeat + 1):
        start = time.perf_counter()
        proc = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
        elapsed = time.perf_counter() - start
        if proc.returncode != 0:
            sys.stderr.write(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr.decode(errors='replace')}")
            sys.exit(2)
        if i:  # the first run warms the file cache and .pyc files
            times.append(elapsed)
    return statistics.median(times)


def heavy_imports() -> list[str]:
    """Top-level packages in HEAVY that `python -X importtime -m eetool --help` imports."""
    proc = subprocess.run([sys.executable, "-X", "importtime", "-m", "eetool", "--help"], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr)
        sys.exit(2)
    found = set()
    for line in proc.stderr.splitlines():
        if line.startswith("import time:"):
            module = line.rsplit("|", 1)[-1].strip()
            if module.split(".")[0] in HEAVY:
                found.add(module.split(".")[0])
    return sorted(found)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=15, help="timed runs per command (median reported)")
    args = parser.parse_args()

    commands = {"python -c pass": [sys.executable, "-c", "pass"],
                "python -m eetool --help": [sys.executable, "-m", "eetool", "--help"]}
    script = shutil.which("eetool")
    if script:
        commands["eetool --help"] = [script, "--help"]
    else:
        print("(eetool console script not on PATH; timing python -m eetool only)")

    medians = {name: time_command(cmd, args.repeat) for name, cmd in commands.items()}
    base = medians["python -c pass"]
    print(f"startup, median of {args.repeat} runs ({sys.executable}, Python {sys.version.split()[0]})")
    for name, t in medians.items():
        print(f"  {name:<26} {t * 1000:8.1f} ms  {t / base:6.2f}x python -c pass")
    worst = max(t for name, t in medians.items() if name != "python -c pass")
    print(f"goal: under {GOAL_S:.1f} s absolute: {'met' if worst < GOAL_S else 'NOT met'} ({worst:.3f} s)")

    heavy = heavy_imports()
    if heavy:
        print(f"FAIL: `eetool --help` imports {', '.join(heavy)}")
        return 1
    print("ok: `eetool --help` does not import torch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
