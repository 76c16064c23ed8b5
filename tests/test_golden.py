"""Golden outputs: the JSON that the main commands print on small seeded inputs, compared with files recorded under
tests/golden/ so that a refactoring that changes any result fails here.

Each command runs with --seed 0 on the embedded demo checkpoint and data restricted to 200 samples, a tiny
segmentation network trained for two epochs on square scenes, and the tiny test language model. Timings are dropped,
as are file hashes (the floats they hash are compared instead) and the temporary folder's path. Integers, strings
and booleans must match exactly; floats within a relative 1e-4 (and an absolute 1e-6, one unit of the six decimals
most outputs are rounded to), so another machine of the same kind passes. Goldens are recorded on one thread and
every case also runs on two, whose other summation order stands in for another machine's: no case may hinge on an
order statistic of near-equal values (as EEPrune's threshold on an untrained network did).

To record new goldens after a change that is meant to change results, run
``EETOOL_UPDATE_GOLDEN=1 python -m pytest tests/test_golden.py`` and commit the files it writes (each test then
reports that it wrote its file instead of comparing).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import invoke, ok
from tests.lm_helpers import make_tiny_lm
from tests.test_segmentation import write_mask_file

GOLDEN = Path(__file__).parent / "golden"
REPO = Path(__file__).resolve().parents[1]
UPDATE = os.environ.get("EETOOL_UPDATE_GOLDEN") == "1"
LM_TEXT = Path(__file__).parent / "data" / "hamlet-act1.txt"
COMMON = ("--format", "json", "-q", "--seed", "0", "--device", "cpu", "--no-progress")
TIMING = re.compile(r"seconds|throughput|speedup|per_second")  # keys of measured times and rates
RELATIVE, ABSOLUTE = 1e-4, 1e-6


def normalised(value: Any, tmp: str) -> Any:
    """The document without timings and hashes, with the temporary folder and the repository as placeholders."""
    if isinstance(value, dict):
        return {k: normalised(v, tmp) for k, v in value.items() if not TIMING.search(k) and not k.endswith("sha256")}
    if isinstance(value, list):
        return [normalised(v, tmp) for v in value]
    if isinstance(value, str):
        return value.replace(tmp, "<tmp>").replace(str(REPO), "<repo>")
    return value


# Goldens are recorded on one thread; two threads sum in another order, as another machine's kernels do.
THREADS = [1] if UPDATE else [1, 2]


@pytest.fixture(scope="module", params=THREADS, ids=[f"{t} thread{'s' * (t > 1)}" for t in THREADS])
def outputs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every command's normalised JSON, run once in the order the later ones need."""
    d = tmp_path_factory.mktemp("golden")

    def run(tmp: Path, *args: object) -> Any:
        found = invoke(*args, *COMMON, "--threads", str(request.param))
        return normalised(json.loads(ok(found).stdout), str(tmp))

    idx = d / "idx.txt"
    idx.write_text("".join(f"{i}\n" for i in range(0, 2000, 10)))
    demo = ("-c", "demo", "-d", "demo", "--indices", idx)
    out: dict[str, Any] = {}
    out["calibrate-means"] = run(d, "calibrate-means", *demo, "-o", d / "means.safetensors")
    out["fit-thresholds-e2cm"] = run(d, "fit-thresholds", "--means", d / "means.safetensors", "--budget", "0.5",
                                     "-o", d / "e2cm.yaml")
    out["evaluate-e2cm"] = run(d, "evaluate", *demo, "--split", "test", "--means", d / "means.safetensors",
                               "--thresholds", d / "e2cm.yaml", "--repeats", "1")
    out["train-exits"] = run(d, "train-exits", *demo, "--exits", "half", "--no-augment", "--epochs", "1",
                             "-o", d / "heads.safetensors")
    out["fit-thresholds-sdn"] = run(d, "fit-thresholds", "--method", "sdn", "--exit-heads", d / "heads.safetensors",
                                    *demo, "--budget", "0.6", "-o", d / "sdn.yaml")
    # From the shipped weights: an untrained network's confidences all sit near 1/K, where the order statistic
    # that is EEPrune's threshold moved by 7% between machines (and between one and two threads on one machine).
    out["prune-dataset"] = run(d, "prune-dataset", *demo, "--from-weights", "--ratio", "0.05", "--epochs", "1",
                               "--no-augment", "--batch-size", "20", "-o", d / "kept.safetensors")
    out["prune-weights"] = run(d, "prune-weights", *demo, "--exits", "half", "--rounds", "1", "--finetune-samples",
                               "16", "--no-augment", "-o", d / "pruned.safetensors")
    write_mask_file(d / "scenes.safetensors")
    scenes = f"segmentation:{d / 'scenes.safetensors'}"
    out["train-segmentation"] = run(d, "train", "-d", scenes, "-o", d / "eeseg.safetensors", "--epochs", "2",
                                    "--batch-size", "8", "--optimizer", "adamw", "--lr", "0.01",
                                    "--arch-args", "{width: 8, head_width: 8}")
    out["fit-thresholds-cbt"] = run(d, "fit-thresholds", "--method", "cbt", "-c", d / "eeseg.safetensors",
                                    "-d", scenes, "--alpha", "0.5", "--beta", "0.9", "-o", d / "cbt.yaml")
    out["evaluate-cbt"] = run(d, "evaluate", "-c", d / "eeseg.safetensors", "-d", scenes, "--split", "train",
                              "--thresholds", d / "cbt.yaml", "--repeats", "1")
    make_tiny_lm(d / "lm")
    out["init-exit-head"] = run(d, "init-exit-head", "-m", d / "lm", "-t", LM_TEXT, "--context", "32",
                                "-o", d / "head.safetensors")
    return out


def differences(got: Any, want: Any, where: str = "") -> list[str]:
    """Where two documents differ: types, keys, lengths, exact integers and strings, floats beyond the tolerance."""
    if isinstance(want, dict) and isinstance(got, dict):
        if got.keys() != want.keys():
            return [f"{where}: keys {sorted(got)} != {sorted(want)}"]
        return [d for k in want for d in differences(got[k], want[k], f"{where}.{k}")]
    if isinstance(want, list) and isinstance(got, list):
        if len(got) != len(want):
            return [f"{where}: {len(got)} items != {len(want)}"]
        return [d for i, (g, w) in enumerate(zip(got, want, strict=True)) for d in differences(g, w, f"{where}[{i}]")]
    if isinstance(want, float) or isinstance(got, float):
        if isinstance(got, bool) or not isinstance(got, int | float) or isinstance(want, bool) \
                or not isinstance(want, int | float):
            return [f"{where}: {got!r} != {want!r}"]
        return [] if math.isclose(got, want, rel_tol=RELATIVE, abs_tol=ABSOLUTE) else [f"{where}: {got!r} != {want!r}"]
    return [] if type(got) is type(want) and got == want else [f"{where}: {got!r} != {want!r}"]


NAMES = ["calibrate-means", "fit-thresholds-e2cm", "evaluate-e2cm", "train-exits", "fit-thresholds-sdn",
         "prune-dataset", "prune-weights", "train-segmentation", "fit-thresholds-cbt", "evaluate-cbt",
         "init-exit-head"]


def test_the_names_cover_every_output(outputs: dict[str, Any]) -> None:
    assert list(outputs) == NAMES


@pytest.mark.parametrize("name", NAMES)
def test_output_matches_its_golden(outputs: dict[str, Any], name: str) -> None:
    path = GOLDEN / f"{name}.json"
    if UPDATE:
        GOLDEN.mkdir(exist_ok=True)
        path.write_text(json.dumps(outputs[name], indent=2) + "\n")
        pytest.skip(f"EETOOL_UPDATE_GOLDEN=1: wrote {path.relative_to(REPO)}")
    assert path.exists(), f"no golden {path}: record it with EETOOL_UPDATE_GOLDEN=1 (see this module's docstring)"
    found = differences(outputs[name], json.loads(path.read_text()), name)
    assert not found, "\n".join(found[:20])


def test_the_comparison_catches_a_changed_value() -> None:
    want = {"a": 1, "b": [0.5, "x"], "c": 0.3}
    assert not differences({"a": 1, "b": [0.5 * (1 + 1e-6), "x"], "c": 0.3}, want)
    assert differences({"a": 2, "b": [0.5, "x"], "c": 0.3}, want)
    assert differences({"a": 1, "b": [0.5001, "x"], "c": 0.3}, want)
    assert differences({"a": 1, "b": [0.5, "y"], "c": 0.3}, want)
    assert differences({"a": 1, "b": [0.5], "c": 0.3}, want)
    assert differences({"a": 1, "b": [0.5, "x"]}, want)
    assert differences({"a": 1.0, "b": [0.5, "x"], "c": 0.3}, {"a": True, "b": [0.5, "x"], "c": 0.3})
