"""What the demo checkpoint's benchmarks share (bundle_speed, bundle_int8_accuracy, batch_norm_folding,
predict_throughput): eetool run as a command, its class means and thresholds at budgets 0.25 and 0.5 made once with
the CLI and cached, and a call timed by the wall clock. Imported from beside them, as each runs as a script."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

BUDGETS = (0.25, 0.5)


def eetool(*args: str) -> str:
    """One eetool command's stdout; a failure ends the benchmark with exit code 2 and eetool's stderr."""
    proc = subprocess.run([sys.executable, "-m", "eetool", *args, "-q"], capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(f"eetool {' '.join(args)} failed: {proc.stderr}")
        sys.exit(2)
    return proc.stdout


def demo_means_and_thresholds(cache: Path, data: str = "demo") -> tuple[Path, Path]:
    """The demo checkpoint's class means (calibrated on the training split of ``data``) and its thresholds at
    BUDGETS, under ``cache``: made where missing, else reused."""
    cache.mkdir(parents=True, exist_ok=True)
    means, thresholds = cache / "means.safetensors", cache / "thresholds.yaml"
    if not means.exists():
        eetool("calibrate-means", "-c", "demo", "-d", data, "--split", "train", "-o", str(means))
    if not thresholds.exists():
        eetool("fit-thresholds", "--means", str(means), "-o", str(thresholds),
               *(a for b in BUDGETS for a in ("--budget", str(b))))
    return means, thresholds


def timed(run: Callable[[], Any]) -> float:
    """Wall seconds of one call."""
    start = time.perf_counter()
    run()
    return time.perf_counter() - start
