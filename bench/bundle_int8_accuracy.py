"""Accuracy and cost of an int8 bundle (eetool export --quantize int8) against the float bundle and eetool evaluate,
at the same operating points.

    python bench/bundle_int8_accuracy.py --data fashion-mnist:/usr/share/datasets/fashion-mnist

On the shipped checkpoint: class means calibrated on the training split of --data, thresholds fitted on them at
budgets 0.25 and 0.5, the float bundle and the int8 bundle (calibrated on --calibration-samples samples of the
training split) exported from them (all made once with the CLI and cached under ``--cache``). Then, on the whole
test split: `eetool evaluate`'s accuracy and cost at each point (its JSON), and the float and int8 bundles'
(eetool_runtime.bundle.Bundle on the decoded images, as `eetool-runtime predict` runs them), with the share of
samples whose class and exit agree between the two bundles. Accuracy only: speed is bench/bundle_speed.py's.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from demo_points import demo_means_and_thresholds, eetool  # bench/, beside this script


def artifacts(cache: Path, data: str, samples: int) -> dict[str, Path]:
    means, thresholds = demo_means_and_thresholds(cache, data)
    made = {"means": means, "thresholds": thresholds, "float": cache / "bundle", "int8": cache / "bundle-int8"}
    model = ["-c", "demo", "--means", str(means), "--thresholds", str(thresholds)]
    if not made["float"].exists():
        eetool("export", *model, "-d", data, "-o", str(made["float"]))
    if not made["int8"].exists():
        eetool("export", *model, "-d", data, "-o", str(made["int8"]), "--quantize", "int8", "--calibration-data",
               data, "--calibration-samples", str(samples))
    return made


def measure(made: dict[str, Path], data: str) -> dict[str, Any]:
    import numpy as np
    from eetool_runtime.bundle import Bundle

    from eetool.core.datasets import load_dataset

    evaluated = json.loads(eetool("evaluate", "-c", "demo", "-d", data, "--split", "test", "--means",
                                  str(made["means"]), "--thresholds", str(made["thresholds"]), "--repeats", "1",
                                  "--format", "json"))
    ds = load_dataset(data, "test")
    assert ds.images is not None
    images = ds.images.expand(-1, 3, -1, -1).contiguous().numpy()  # as decoded from files: RGB
    labels = ds.labels.numpy()
    float_bundle, int8_bundle = Bundle(made["float"]), Bundle(made["int8"])
    costs = np.array(float_bundle.costs)
    quantization = int8_bundle.manifest["provenance"]["quantization"]
    out: dict[str, Any] = {"data": ds.fingerprint, "samples": len(ds),
                           "calibration": quantization["calibration"], "points": []}
    points = [p for p in evaluated["points"] if "budget" in p]
    for i, point in enumerate(points):
        thresholds = float_bundle.thresholds(i)

        def run(bundle: Bundle, t: list[float] = thresholds) -> Any:
            return [bundle(images[k:k + 256], t) for k in range(0, len(images), 256)]

        f = run(float_bundle)
        q = run(int8_bundle)
        f_classes, q_classes = np.concatenate([o.classes for o in f]), np.concatenate([o.classes for o in q])
        f_exits, q_exits = np.concatenate([o.exit_index for o in f]), np.concatenate([o.exit_index for o in q])
        out["points"].append({
            "budget": point["budget"],
            "accuracy": {"evaluate": point["accuracy"], "float_bundle": round(float(np.mean(f_classes == labels)), 4),
                         "int8_bundle": round(float(np.mean(q_classes == labels)), 4)},
            "cost": {"evaluate": point["cost"], "float_bundle": round(float(costs[f_exits].mean()), 4),
                     "int8_bundle": round(float(costs[q_exits].mean()), 4)},
            "int8_agrees_with_float": {"class": round(float(np.mean(f_classes == q_classes)), 4),
                                       "exit": round(float(np.mean(f_exits == q_exits)), 4)},
        })
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="demo")
    parser.add_argument("--cache", default="results/bundle-int8")
    parser.add_argument("--calibration-samples", type=int, default=512)
    args = parser.parse_args()
    made = artifacts(Path(args.cache), args.data, args.calibration_samples)
    doc = {"load_average": round(os.getloadavg()[0], 2), **measure(made, args.data)}
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
