"""An exported bundle under onnxruntime against eetool predict's PyTorch pass, and the runtime's install size.

    python bench/bundle_speed.py                       # batch 1 and 256, budgets 0.25 and 0.5, one thread
    python bench/bundle_speed.py --install-size        # also pip install runtime/ into fresh venvs and measure it
    python bench/bundle_speed.py --only-install-size   # that alone, no timing
    python bench/bundle_speed.py --int8                # also the int8 bundles (export --quantize int8) against float

On the shipped checkpoint and the demo test split (decoded once: decoding is not timed), with class means
calibrated on the demo training split and thresholds at budgets 0.25 and 0.5 (made once with the CLI and cached
under ``--cache``), the bundle exported from them and a plain bundle of the same checkpoint. In interleaved rounds
(one thread for both: torch.set_num_threads(1) and onnxruntime's intra-op threads 1), each round runs in turn:
eetool's plain model and each point (eetool.prediction.Predictor with its batch norms folded, the pass of `eetool
predict`), then the bundles' plain model and each point (eetool_runtime.bundle.Bundle, the pass of
`eetool-runtime predict`). Reported per batch size and point: images/s of each, the bundle's speed-up over eetool
at the same point (median over rounds of the ratio within a round), and speed-up x cost of each against its own
plain model (1.0: the time tracks the MACs).
Goals (issue 23): bundle/eetool >= 3 at batch 1 and >= 1.5 at batch 256; the bundle's speed-up x cost >= 0.7 at
batch 1 and >= 0.8 at batch 256; the runtime's install under 150 MB (as pip installs it; also measured with
``--no-compile`` after one prediction, and without onnxruntime's requirements that running a bundle never imports:
see install_size).

At batch 1 the bundle runs each image through its single-image graph (schema 3: the stages nested in If branches,
one onnxruntime call); the same bundle driven stage graph by stage graph (a call per exit, as schema 2 ran an image)
joins the same rounds, and each point reports the single graph's speed over it (the median of the rounds' ratios,
with its range) and the stage calls' speed-up x cost.

With ``--int8``, int8 versions of both bundles (``--quantize int8``, calibrated on 512 samples of the demo training
split) join the same rounds, and each point (and the plain model) also reports the int8 bundle's speed over the
float bundle's: the median over rounds of the ratio within a round, with its range (ratios only: > 1 means int8 is
faster).
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from demo_points import BUDGETS, demo_means_and_thresholds, eetool, timed  # bench/, beside this script

ROOT = Path(__file__).resolve().parents[1]
GOALS = {1: (3.0, 0.7), 256: (1.5, 0.8)}  # batch -> (bundle/eetool, bundle speed-up x cost)


def artifacts(cache: Path, int8: bool) -> dict[str, Path]:
    means, thresholds = demo_means_and_thresholds(cache)
    made = {"means": means, "thresholds": thresholds, "bundle": cache / "bundle", "plain": cache / "plain-bundle"}
    if int8:
        made.update({"bundle-int8": cache / "bundle-int8", "plain-int8": cache / "plain-bundle-int8"})
    if not made["bundle"].exists():
        eetool("export", "-c", "demo", "--means", str(means), "--thresholds", str(thresholds),
               "-o", str(made["bundle"]))
    if not made["plain"].exists():
        eetool("export", "-c", "demo", "-o", str(made["plain"]))
    quantize = ["--quantize", "int8", "--calibration-data", "demo"]
    if "bundle-int8" in made and not made["bundle-int8"].exists():
        eetool("export", "-c", "demo", "--means", str(means), "--thresholds", str(thresholds),
               "-o", str(made["bundle-int8"]), *quantize)
    if "plain-int8" in made and not made["plain-int8"].exists():
        eetool("export", "-c", "demo", "-o", str(made["plain-int8"]), *quantize)
    return made


def speeds(made: dict[str, Path], batch: int, samples: int, rounds: int) -> dict[str, Any]:
    import numpy as np
    import torch
    from eetool_runtime.bundle import Bundle

    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.classification.prediction import Predictor
    from eetool.core.checkpoint import load_checkpoint
    from eetool.core.datasets import Preprocess, load_dataset

    torch.set_num_threads(1)
    ckpt = load_checkpoint("demo")
    ckpt.model.eval()
    em, rule, (cost_model, _), chosen, _, _ = early_exit_setup(ckpt, str(made["means"]), None,
                                                                str(made["thresholds"]), "all", "cpu")
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    ds = load_dataset("demo", "test")
    assert ds.images is not None
    images = ds.images[:samples].expand(-1, 3, -1, -1).contiguous()  # as decoded from files: RGB
    batches = list(images.split(batch))
    np_batches = [b.numpy() for b in batches]
    bundle, plain_bundle = Bundle(made["bundle"], threads=1), Bundle(made["plain"], threads=1)
    thresholds = [list(p["thresholds"]) for _, p in chosen]
    # as `eetool predict` runs them: batch norm folded into the convolutions
    ours = [Predictor(ckpt.model).folded()] + [Predictor(ckpt.model, em, rule, t).folded() for t in thresholds]

    def eetool_run(predictor: Predictor) -> Callable[[], Any]:
        def run() -> list[Any]:
            with torch.inference_mode():
                return [predictor(preprocess(b)) for b in batches]
        return run

    def bundle_run(b: Bundle, t: list[float]) -> Callable[[], Any]:
        return lambda: [b(x, t) for x in np_batches]

    runs = [eetool_run(p) for p in ours] + [bundle_run(plain_bundle, [])] + [bundle_run(bundle, t) for t in thresholds]
    int8 = "bundle-int8" in made
    if int8:  # after the float runs, so that the indices above hold; the same rounds time them
        bundle8, plain8 = Bundle(made["bundle-int8"], threads=1), Bundle(made["plain-int8"], threads=1)
        runs += [bundle_run(plain8, [])] + [bundle_run(bundle8, t) for t in thresholds]
    staged = batch == 1  # at batch 1, also the stage graphs a call each, as bundles before schema 3 ran an image
    if staged:
        stage_driver = Bundle(made["bundle"], threads=1)
        stage_driver.network = None
        first_staged = len(runs)
        runs += [bundle_run(stage_driver, t) for t in thresholds]
    # exit counts (costs) from one untimed pass of each point, which also warms both up
    costs = []
    for run in runs[len(ours) + 1:2 * len(ours)]:
        exits = np.concatenate([o.exit_index for o in run()])
        costs.append(float(np.mean(np.array(cost_model.normalised_exit_costs())[exits])))
    for run in runs[:len(ours) + 1] + runs[2 * len(ours):]:
        run()
    # the share of images whose exit the single-image graph and the stage calls agree on (1.0 but for rounding)
    same_exits = [float(np.mean([bundle(x, t).exit_index[0] == stage_driver(x, t).exit_index[0] for x in np_batches]))
                  for t in thresholds] if staged else []
    seconds = [[timed(run) for run in runs] for _ in range(rounds)]
    k = len(ours)
    out: dict[str, Any] = {"batch": batch, "samples": samples, "rounds": rounds, "points": []}
    for i, (budget, cost) in enumerate(zip(BUDGETS, costs, strict=True)):
        eet = [r[1 + i] for r in seconds]
        bun = [r[k + 1 + i] for r in seconds]
        ratio = [e / b for e, b in zip(eet, bun, strict=True)]
        eet_up = [r[0] / r[1 + i] for r in seconds]
        bun_up = [r[k] / r[k + 1 + i] for r in seconds]
        out["points"].append({
            "budget": budget, "cost": round(cost, 4),
            "eetool_images_per_s": round(samples / statistics.median(eet), 1),
            "bundle_images_per_s": round(samples / statistics.median(bun), 1),
            "bundle_over_eetool": round(statistics.median(ratio), 2),
            "bundle_over_eetool_range": [round(min(ratio), 2), round(max(ratio), 2)],
            "eetool_speedup_x_cost": round(statistics.median(eet_up) * cost, 2),
            "bundle_speedup_x_cost": round(statistics.median(bun_up) * cost, 2),
            "goals_met": (statistics.median(ratio) >= GOALS[batch][0]
                          and statistics.median(bun_up) * cost >= GOALS[batch][1]) if batch in GOALS else None,
        })
    out["plain"] = {"eetool_images_per_s": round(samples / statistics.median(r[0] for r in seconds), 1),
                    "bundle_images_per_s": round(samples / statistics.median(r[k] for r in seconds), 1)}
    if staged:
        for i, row in enumerate(out["points"]):
            ratio = [r[first_staged + i] / r[k + 1 + i] for r in seconds]  # stage driver seconds / bundle seconds
            row["single_graph_over_stage_calls"] = round(statistics.median(ratio), 2)
            row["single_graph_over_stage_calls_range"] = [round(min(ratio), 2), round(max(ratio), 2)]
            row["single_graph_same_exits"] = same_exits[i]
            row["stage_calls_speedup_x_cost"] = round(
                statistics.median(r[k] / r[first_staged + i] for r in seconds) * row["cost"], 2)
    if int8:
        for i, row in enumerate([out["plain"], *out["points"]]):
            ratio = [r[k + i] / r[2 * k + i] for r in seconds]  # float seconds / int8 seconds: int8's speed-up
            row["int8_over_float_bundle"] = round(statistics.median(ratio), 2)
            row["int8_over_float_bundle_range"] = [round(min(ratio), 2), round(max(ratio), 2)]
    return out


def _dist_size(name: str, seen: set[str]) -> int:
    """Bytes on disk of a distribution and everything it requires (no extras), each counted once."""
    from packaging.requirements import Requirement

    key = name.lower().replace("_", "-")
    if key in seen:
        return 0
    seen.add(key)
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        return 0
    size = 0
    for f in dist.files or []:
        path = Path(str(dist.locate_file(f)))
        if path.is_file():
            size += path.stat().st_size
    for req in dist.requires or []:
        r = Requirement(req)
        if r.marker is None or r.marker.evaluate({"extra": ""}):
            size += _dist_size(r.name, seen)
    return size


# What a fresh venv holds before anything is installed: not the runtime's.
VENV_OWN = ("pip", "setuptools")
# onnxruntime's requirements that running a bundle never imports (its converters and quantisation tools do).
ONNXRUNTIME_TOOLS_ONLY = ("protobuf", "flatbuffers", "packaging")
# Per distribution: bytes of its files, and of those its compiled bytecode (.pyc).
SIZES = """import importlib.metadata as m, json, pathlib
out = {}
for d in m.distributions():
    root = pathlib.Path(str(d.locate_file("")))
    files = {pathlib.Path(str(d.locate_file(f))).resolve() for f in d.files or []}
    # the folders it installs, whole: the bytecode Python wrote there on import since is in no file list
    for top in {f.parts[0] for f in d.files or [] if len(f.parts) > 1 and f.parts[0] != ".."}:
        files |= {p.resolve() for p in (root / top).rglob("*")}
    files = {p for p in files if p.is_file()}
    out[d.metadata["Name"]] = [sum(p.stat().st_size for p in files),
                               sum(p.stat().st_size for p in files if p.suffix == ".pyc")]
print(json.dumps(out))
"""


def _venv_sizes(python: Path) -> dict[str, list[int]]:
    sizes = json.loads(subprocess.run([str(python), "-c", SIZES], check=True, capture_output=True,
                                      text=True).stdout)
    return {k: v for k, v in sizes.items() if k.lower() not in VENV_OWN}


def _mb(n: int) -> float:
    return round(n / 2**20, 1)


def _summary(sizes: dict[str, list[int]]) -> dict[str, Any]:
    total = sum(v[0] for v in sizes.values())
    return {"mb": _mb(total), "goal_met": total / 2**20 < 150,
            "by_distribution_mb": {k: _mb(v[0]) for k, v in sorted(sizes.items(), key=lambda kv: -kv[1][0])},
            "of_which_bytecode_mb": _mb(sum(v[1] for v in sizes.values()))}


def install_size(bundle: Path) -> dict[str, Any]:
    """The runtime pip-installed into fresh venvs (pip and setuptools, which every venv holds, left out), beside
    the distributions eetool itself requires in this environment: as ``pip install runtime/`` installs it (pip
    compiles every module to bytecode); with ``--no-compile``, measured after one prediction through ``bundle``
    (a plain bundle: Python writes the bytecode of what a prediction imports, the same modules as at a point); and
    that again without onnxruntime's requirements that a bundle's run never imports, after a second prediction
    that shows it runs without them."""
    with tempfile.TemporaryDirectory() as tmp:
        image = Path(tmp) / "input.png"
        default, lean = Path(tmp) / "default", Path(tmp) / "lean"
        for venv in (default, lean):
            subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
        subprocess.run([str(default / "bin" / "python"), "-m", "pip", "install", "-q", str(ROOT / "runtime")],
                       check=True)
        as_installed = _venv_sizes(default / "bin" / "python")
        subprocess.run([str(lean / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile",
                        str(ROOT / "runtime")], check=True)
        subprocess.run([str(lean / "bin" / "python"), "-c", "import sys; from PIL import Image; "
                        "Image.new('L', (28, 28), 128).save(sys.argv[1])", str(image)], check=True)
        predict = [str(lean / "bin" / "eetool-runtime"), "predict", str(bundle), str(image)]
        # as on a box where Python writes bytecode (the default; this environment may have turned it off)
        writes_bytecode = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        subprocess.run(predict, check=True, capture_output=True, env=writes_bytecode)
        no_compile = _venv_sizes(lean / "bin" / "python")
        subprocess.run([str(lean / "bin" / "python"), "-m", "pip", "uninstall", "-q", "-y",
                        *ONNXRUNTIME_TOOLS_ONLY], check=True)
        subprocess.run(predict, check=True, capture_output=True, env=writes_bytecode)
        without_tools = _venv_sizes(lean / "bin" / "python")
    eetool_bytes = _dist_size("eetool", set())
    return {"eetool_mb": _mb(eetool_bytes), "runtime": _summary(as_installed),
            "runtime_no_compile_after_one_prediction": _summary(no_compile),
            "runtime_no_compile_without_onnxruntime_tools_requirements": _summary(without_tools)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cache", default="results/bundle-speed")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--samples-batch-1", type=int, default=300)
    parser.add_argument("--install-size", action="store_true")
    parser.add_argument("--only-install-size", action="store_true", help="the install size, no timing")
    parser.add_argument("--int8", action="store_true", help="also the int8 bundles, against the float ones")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 256], choices=[1, 256])
    args = parser.parse_args()
    made = artifacts(Path(args.cache), args.int8)
    load = os.getloadavg()[0]
    doc = {"load_average": round(load, 2),
           "runs": [] if args.only_install_size else
           [speeds(made, batch, args.samples_batch_1 if batch == 1 else 2000, args.rounds) for batch in args.batches]}
    if args.install_size or args.only_install_size:
        doc["install"] = install_size(made["plain"])
    print(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
