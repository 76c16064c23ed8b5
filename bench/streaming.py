"""calibrate-means over a folder of real PNG files: peak memory against N, streamed or held in memory.

    python bench/fashion_mnist_pngs.py /tmp/fmnist-png       # once: 70,000 PNG files
    python bench/streaming.py /tmp/fmnist-png                # N = 5k, 20k, 60k; memory, stream with 0-2 workers
    python bench/streaming.py /tmp/fmnist-png --sizes 5000 20000 --torchrun   # also 2 processes at 5000

Each run is ``python -m eetool calibrate-means`` on N training images (an --indices file) with a
small untrained ResNet-20 (width 4) and three exits pooled to 2 x 2, so that decoding, not the model, is much
of the work. The peak resident
memory is sampled every 20 ms over the process and its children (DataLoader workers, torchrun's ranks):
``peak_mb`` is the largest sum, ``peak_main_mb`` the largest single process. Throughput is N x 2 passes over
the wall time, start-up included. On a shared machine the times are noisy; the memory is not.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

from eetool.core.artifacts import Provenance
from eetool.core.checkpoint import ModelSpec, save_checkpoint

ROOT = Path(__file__).resolve().parent.parent
TRAIN_IMAGES = 60_000


def tiny_checkpoint(folder: Path) -> str:
    spec = ModelSpec(arch="resnet20", num_classes=10, input_shape=(1, 28, 28), mean=[0.29], std=[0.35],
                     arch_args={"width": 4})
    torch.manual_seed(0)
    path = folder / "tiny.safetensors"
    save_checkpoint(str(path), spec.build(), spec, Provenance(kind="checkpoint", args={"made_by": "bench"}))
    return str(path)


def measure(cmd: list[str], env: dict[str, str]) -> dict[str, float]:
    """Wall time and peak resident memory (sum over the process tree, and its largest process)."""
    start = time.perf_counter()
    proc = psutil.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    peak = peak_main = 0
    while proc.poll() is None:
        try:
            rss = [p.memory_info().rss for p in [proc, *proc.children(recursive=True)]]
        except psutil.Error:  # a worker came or went between listing and reading
            continue
        peak, peak_main = max(peak, sum(rss)), max(peak_main, max(rss))
        time.sleep(0.02)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr.read() if proc.stderr else "")
        sys.exit(2)
    return {"seconds": round(seconds, 1), "peak_mb": round(peak / 2**20), "peak_main_mb": round(peak_main / 2**20)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("root", help="the folder bench/fashion_mnist_pngs.py wrote")
    ap.add_argument("--sizes", type=int, nargs="+", default=[5_000, 20_000, 60_000])
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--side", type=int, default=28, help="decode each image at SIDE x SIDE (--resize and --crop; "
                    "112 makes an image 16 times the memory of 28, as photographs are larger than Fashion-MNIST)")
    ap.add_argument("--runs", nargs="+", default=["memory", "stream0", "stream1", "stream2"],
                    choices=["memory", "stream0", "stream1", "stream2"], help="which loading runs at each size")
    ap.add_argument("--torchrun", action="store_true", help="also 1 process on 1 thread against 2 processes under "
                    "torchrun (one thread each), in memory, at the first size")
    args = ap.parse_args()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        ckpt = tiny_checkpoint(folder)
        for n in args.sizes:
            indices = folder / f"every-{n}.txt"  # evenly spread over the class-sorted folder: every class
            indices.write_text("\n".join(str(i * TRAIN_IMAGES // n) for i in range(n)) + "\n")
            base = ["-m", "eetool", "calibrate-means", "-c", ckpt, "-d", f"folder:{args.root}", "--split", "train",
                    "--indices", str(indices), "-b", str(args.batch_size), "--exits", "quartiles",
                    "--pool-spatial", "2", "--resize", str(args.side), "--crop", str(args.side), "-q", "--force"]
            loading = {"memory": ("memory", ["--data-loading", "memory", "--workers", "1"]),
                       **{f"stream{w}": (f"stream, {w} workers", ["--data-loading", "stream", "--workers", str(w)])
                          for w in (0, 1, 2)}}
            runs = [loading[name] for name in args.runs]
            if args.torchrun and n == args.sizes[0]:
                runs += [("memory, 1 thread", ["--data-loading", "memory", "--workers", "1", "--threads", "1"]),
                         ("memory, torchrun x2", ["--data-loading", "memory", "--workers", "1"])]
            for name, flags in runs:
                launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
                            if "torchrun" in name else [sys.executable])
                out = folder / "means.safetensors"
                result = measure([*launcher, *base, *flags, "-o", str(out)], env)
                rows.append({"n": n, "side": args.side, "run": name, **result,
                             "images_per_s": round(2 * n / result["seconds"], 1)})
                print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"load_average": os.getloadavg(), "cores": os.cpu_count()}))


if __name__ == "__main__":
    main()
