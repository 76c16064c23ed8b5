"""Budgeted classification in onnxruntime: exported bundles, float and int8, against the plain family exported too.

``make budgeted`` times eetool's own PyTorch pass. An edge box runs the bundle (``eetool export``, run by
``eetool-runtime``), where onnxruntime makes every network faster, the plain ones too; so the int8 bundle is set
against the plain family exported the same way, not against PyTorch. This script exports, from what ``make budgeted``
left in FOLDER, every plain network of the family as a plain bundle (``bundle-plain-<name>/``) and each early-exit
configuration found (``CONFIGS``) as a float and an int8 bundle (``bundle-<stem>/``, ``bundle-<stem>-int8/``; int8
calibrated on the training split, its thresholds refitted by ``export``), then times every bundle and every
operating point on the whole test split in the same interleaved rounds (one onnxruntime thread, batch 256), and
writes ``bundles.yaml``: per run its accuracy, MACs and seconds per round. ``reproduce/budgeted.py`` reads it into
the results page. Every export is a file: a rerun skips what exists.

    python reproduce/budgeted_bundles.py results/budgeted --data fashion-mnist --rounds 3
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

REFERENCE = "plain-resnet20-w16.safetensors"
# stem: (the network, its exit heads, its thresholds), as make budgeted names them; the SDN-headed configurations
# are the ones a bundle serves best (an exit is a head and a softmax), and the ones ahead of the family in PyTorch.
CONFIGS = {
    "sdn": (REFERENCE, "heads.safetensors", "thresholds-sdn.yaml"),
    "joint-resnet20-w16": ("joint-resnet20-w16.safetensors", "joint-resnet20-w16-heads.safetensors",
                           "joint-resnet20-w16-thresholds.yaml"),
    "joint-resnet20-w8": ("joint-resnet20-w8.safetensors", "joint-resnet20-w8-heads.safetensors",
                          "joint-resnet20-w8-thresholds.yaml"),
    "distill-resnet20-w8": ("distill-resnet20-w8.safetensors", "distill-resnet20-w8-heads.safetensors",
                            "distill-resnet20-w8-thresholds.yaml"),
}
BATCH = 256


def _eetool(*args: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "eetool", *args, "-q", "--no-progress"], capture_output=True,
                          text=True)
    if proc.returncode:
        raise SystemExit(f"eetool {' '.join(args)} failed (exit {proc.returncode}): {proc.stderr.strip()}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def export_all(folder: Path, data: str, threads: int, calibration_samples: int,
               configs: list[str]) -> dict[str, dict[str, Any]]:
    """Every bundle to time, made where missing: name -> {path, kind (family | point), method, checkpoint}."""
    common = ("-d", data, "--threads", str(threads))
    bundles: dict[str, dict[str, Any]] = {}
    for plain in sorted(folder.glob("plain-*.safetensors")):
        out = folder / f"bundle-{plain.stem}"
        if not out.is_dir():
            _eetool("export", "-c", str(plain), "-o", str(out), *common)
        bundles[out.name] = {"path": out, "kind": "family", "method": "family", "checkpoint": plain}
    for stem in configs:
        network, heads, thresholds = CONFIGS[stem]
        files = [folder / network, folder / heads, folder / thresholds]
        if not all(f.is_file() for f in files):
            continue
        model = ("-c", str(files[0]), "--exit-heads", str(files[1]), "--thresholds", str(files[2]))
        for precision in ("float", "int8"):
            out = folder / (f"bundle-{stem}" if precision == "float" else f"bundle-{stem}-int8")
            if not out.is_dir():
                quantize = (("--quantize", "int8", "--calibration-data", data, "--calibration-samples",
                             str(calibration_samples)) if precision == "int8" else ())
                _eetool("export", *model, "-o", str(out), *common, *quantize)
            bundles[out.name] = {"path": out, "kind": "point", "method": f"{stem} ({precision})",
                                 "checkpoint": files[0]}
    return bundles


def test_images(data: str) -> tuple[Any, Any, str]:
    """The test split as the runtime gets it from image files (uint8 RGB), its labels and its fingerprint."""
    from eetool.core.datasets import load_dataset

    ds = load_dataset(data, "test")
    if ds.images is None:
        raise SystemExit(f"{data}: the test split is not held in memory as images")
    images = ds.images.expand(-1, 3, -1, -1).contiguous().numpy()
    return images, ds.labels.numpy(), ds.fingerprint


def macs_of(folder: Path) -> dict[str, float]:
    """Each network's MACs per sample, by checkpoint sha256, read from make budgeted's evaluations (the plain
    model's point and every compared network)."""
    out: dict[str, float] = {}
    for path in folder.glob("eval-*.yaml"):
        doc = yaml.safe_load(path.read_text())
        for p in doc["points"]:
            if p["name"] == "plain":
                out[doc["checkpoint_sha256"]] = float(p["macs"])
        for c in doc.get("compared", []):
            out[c["checkpoint_sha256"]] = float(c["macs"])
    return out


def time_all(bundles: dict[str, dict[str, Any]], images: Any, labels: Any, rounds: int, threads: int,
             macs: dict[str, float]) -> list[dict[str, Any]]:
    """Every bundle at every operating point (a plain bundle once), timed over the whole split in ``rounds``
    interleaved rounds; accuracy and mean MACs from the first round (the runs are deterministic)."""
    import numpy as np
    from eetool_runtime.bundle import Bundle

    runs: list[dict[str, Any]] = []
    for name, b in bundles.items():
        bundle = Bundle(b["path"], threads=threads)
        network = sha256(b["checkpoint"])
        if network not in macs:
            raise SystemExit(f"{b['checkpoint'].name}: no evaluation of make budgeted counts its MACs")
        points = [(i, p, bundle.thresholds(i)) for i, p in enumerate(bundle.points)] or [(None, None, [])]
        for i, p, thresholds in points:
            runs.append({"bundle": name, "method": b["method"], "kind": b["kind"], "session": bundle,
                         "name": name if i is None else f"{i}: budget {p['budget']:g}", "thresholds": thresholds,
                         "network_macs": macs[network], "seconds": []})
    for r in range(rounds):
        for run in runs:
            bundle, thresholds = run["session"], run["thresholds"]
            start = time.perf_counter()
            outs = [bundle(images[k:k + BATCH], thresholds) for k in range(0, len(images), BATCH)]
            run["seconds"].append(time.perf_counter() - start)
            if r == 0:
                classes = np.concatenate([o.classes for o in outs])
                exits = np.concatenate([o.exit_index for o in outs])
                run["accuracy"] = float(np.mean(classes == labels))
                run["macs"] = run["network_macs"] * float(np.asarray(bundle.costs)[exits].mean())
        print(f"round {r + 1}/{rounds} done", file=sys.stderr)
    return [{k: v for k, v in run.items() if k not in ("session", "thresholds", "network_macs")} for run in runs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, help="make budgeted's results (plain-*.safetensors, heads, thresholds)")
    p.add_argument("--data", default="fashion-mnist")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="onnxruntime (and export) threads")
    p.add_argument("--calibration-samples", type=int, default=512)
    p.add_argument("--configs", nargs="+", choices=list(CONFIGS), default=list(CONFIGS),
                   help="the early-exit configurations to export and time (those whose files exist)")
    a = p.parse_args()
    if not (a.folder / REFERENCE).is_file():
        raise SystemExit(f"{a.folder / REFERENCE} is missing: run make budgeted-family first")
    bundles = export_all(a.folder, a.data, a.threads, a.calibration_samples, a.configs)
    images, labels, fingerprint = test_images(a.data)
    load = [os.getloadavg()[0]]
    runs = time_all(bundles, images, labels, a.rounds, a.threads, macs_of(a.folder))
    load.append(os.getloadavg()[0])
    import onnxruntime

    doc = {"runtime": f"onnxruntime {onnxruntime.__version__}", "threads": a.threads, "batch": BATCH,
           "rounds": a.rounds, "samples": int(len(labels)), "data": fingerprint,
           "reference": f"bundle-{Path(REFERENCE).stem}",
           "load": [round(x, 2) for x in load], "runs": runs}
    out = a.folder / "bundles.yaml"
    tmp = out.with_suffix(".tmp")
    tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
    tmp.replace(out)
    print(out)


if __name__ == "__main__":
    main()
