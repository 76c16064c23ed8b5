"""eetool export and the PyTorch-free runtime (runtime/, eetool-runtime): the bundle's manifest against its sources,
its refusal to replace what it did not write and to write graphs that disagree with eetool's pass, and the runtime's
parity with eetool predict (classes and exit indices) with ``import torch`` made to fail."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import yaml
from cli_helpers import invoke, ok, one_error_line, sha256
from PIL import Image
from runtime_helpers import bundle_with_a_byte_changed, no_torch_env

from eetool.core.errors import ExitCode

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@dataclass
class Demo:
    folder: Path
    means: Path
    thresholds: Path
    bundle: Path
    pngs: Path  # the demo test split, 2000 PNG files
    env: dict[str, str]  # a runtime process's: torch blocked, the runtime importable


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, no_torch: dict[str, str]) -> Demo:
    from eetool.core.datasets import load_dataset

    d = tmp_path_factory.mktemp("export-demo")
    (d / "calibration.txt").write_text("\n".join(str(i) for i in range(1500)))
    means, thresholds, bundle = d / "means.safetensors", d / "thresholds.yaml", d / "bundle"
    ok(invoke("calibrate-means", "-c", "demo", "-d", "demo", "--split", "train", "--indices", d / "calibration.txt",
              "-o", means, "-q"))
    ok(invoke("fit-thresholds", "--means", means, "-o", thresholds, "--budget", 0.25, "--budget", 0.5, "-q"))
    ok(invoke("export", "-c", "demo", "--means", means, "--thresholds", thresholds, "-o", bundle, "-q"))
    ds = load_dataset("demo", "test")
    assert ds.images is not None
    (d / "pngs").mkdir()
    for i, image in enumerate(ds.images):
        Image.fromarray(image[0].numpy(), mode="L").save(d / "pngs" / f"{i:04d}.png")
    return Demo(d, means, thresholds, bundle, d / "pngs", no_torch)


@pytest.fixture(scope="module")
def no_torch(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The environment of a runtime process: torch blocked, the runtime importable."""
    return no_torch_env(tmp_path_factory.mktemp("blocker"))


def runtime(demo: Demo | dict[str, str], *args: object, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = demo.env if isinstance(demo, Demo) else demo
    return subprocess.run([sys.executable, "-m", "eetool_runtime", "predict", *(str(a) for a in args)],
                          capture_output=True, text=True, env=env, input=stdin, timeout=600)


def records(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_the_torch_blocker_blocks(no_torch: dict[str, str]) -> None:
    proc = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, env=no_torch)
    assert proc.returncode != 0 and "blocked" in proc.stderr


# ---------------------------------------------------------------------------------------------
# The bundle


def test_manifest_records_the_model_the_points_and_every_files_sha256(demo: Demo) -> None:
    from eetool.classification.early_exit_evaluation import early_exit_setup
    from eetool.core.checkpoint import load_checkpoint

    doc = yaml.safe_load((demo.bundle / "manifest.yaml").read_text())
    ckpt = load_checkpoint("demo")
    em, _, (cost_model, _), chosen, _, _ = early_exit_setup(ckpt, str(demo.means), None, str(demo.thresholds),
                                                             "all", "cpu")
    assert doc["format"] == "eetool-bundle" and doc["method"] == "e2cm"
    assert doc["classes"] == ckpt.spec.classes
    assert doc["input"]["shape"] == ["batch", 3, 28, 28]
    assert doc["preprocessing"]["mean"] == ckpt.spec.mean and doc["preprocessing"]["crop"] == [28, 28]
    assert [s["exit"] for s in doc["stages"]] == [*em.exits, "head"]
    assert [s["cost"] for s in doc["stages"]] == [round(c, 6) for c in cost_model.normalised_exit_costs()]
    assert [p["thresholds"] for p in doc["points"]] == [p["thresholds"] for _, p in chosen]
    assert [p["budget"] for p in doc["points"]] == [0.25, 0.5]
    sources = doc["provenance"]["sources"]
    assert sources["class-means"]["sha256"] == sha256(demo.means)
    assert sources["thresholds"]["sha256"] == sha256(demo.thresholds)
    assert sources["checkpoint"]["sha256"] == ckpt.sha256
    on_disk = {p.name for p in demo.bundle.iterdir()}
    assert on_disk == {*doc["files"], "manifest.yaml", "SHA256SUMS", ".eetool-folder"}  # the marker: eetool wrote it
    assert all(sha256(demo.bundle / name) == sha for name, sha in doc["files"].items())
    sums = dict(reversed(line.split("  ")) for line in (demo.bundle / "SHA256SUMS").read_text().splitlines())
    assert sums == {**doc["files"], "manifest.yaml": sha256(demo.bundle / "manifest.yaml")}
    assert doc["schema"] == 3 and doc["batch_1"] == {"graph": "batch_1.onnx", "inputs": ["images", "thresholds"],
                                                     "outputs": ["class", "confidence", "exit_index", "probabilities"]}


def test_single_image_graph_runs_a_stage_only_after_its_exit_let_the_image_on(demo: Demo) -> None:
    """batch_1.onnx nests the stage graphs: its main graph holds stage 0 and one If on exit 0's decision; that If's
    then branch (the image leaves) runs no stage, its else branch holds stage 1 (the same convolutions, weights in
    that branch) and the If on exit 1, and so on to the head. So a stage runs only for an image that went on."""
    import onnx
    from onnx import numpy_helper

    doc = yaml.safe_load((demo.bundle / "manifest.yaml").read_text())
    graph = onnx.load(str(demo.bundle / "batch_1.onnx")).graph
    for j, stage in enumerate(doc["stages"]):
        own = onnx.load(str(demo.bundle / stage["stage"])).graph
        convs = [numpy_helper.to_array(t) for t in own.initializer if t.name.endswith("weight") and t.dims[-1] == 3]
        convolutions = [n.op_type for n in own.node].count("Conv")
        assert [n.op_type for n in graph.node].count("Conv") == convolutions and (convolutions > 0) == bool(convs)
        nested = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        assert all(any(np.array_equal(w, v) for v in nested.values()) for w in convs), stage["stage"]
        branches = [n for n in graph.node if n.op_type == "If"]
        if j == len(doc["stages"]) - 1:
            assert branches == [] and {"Softmax", "ArgMax"} <= {n.op_type for n in graph.node}
            break
        assert len(branches) == 1
        branch = {a.name: onnx.helper.get_attribute_value(a) for a in branches[0].attribute}
        leave, go_on = branch["then_branch"], branch["else_branch"]
        assert leave.name == f"exit_{j}" and not {"Conv", "If"} & {n.op_type for n in leave.node}
        graph = go_on


def test_export_replaces_only_a_bundle_it_wrote_and_only_with_force(tiny_checkpoint: str, tmp_path: Path) -> None:
    target = tmp_path / "plain"
    ok(invoke("export", "-c", tiny_checkpoint, "-o", target, "-q", "--check-samples", 16))
    assert "already exists" in one_error_line(invoke("export", "-c", tiny_checkpoint, "-o", target), ExitCode.OUTPUT)
    ok(invoke("export", "-c", tiny_checkpoint, "-o", target, "-q", "--force", "--check-samples", 16))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain"]  # no temp folder left beside it
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    line = one_error_line(invoke("export", "-c", tiny_checkpoint, "-o", mine, "--force"), ExitCode.OUTPUT)
    assert "not written by eetool" in line
    assert (mine / "notes.txt").read_text() == "keep"


def test_export_refuses_a_bundle_that_disagrees_with_eetools_pass(tiny_checkpoint: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    import eetool.classification.bundle_export as export

    real = export.run_bundle

    def off_by_one(*args: object, **kwargs: object) -> export.BundleRun:
        out = real(*args, **kwargs)  # type: ignore[arg-type]
        out.classes[3] = (out.classes[3] + 1) % 10
        return out

    monkeypatch.setattr(export, "run_bundle", off_by_one)
    result = invoke("export", "-c", tiny_checkpoint, "-o", tmp_path / "b", "--check-samples", 16, "-q")
    line = one_error_line(result, ExitCode.PROVENANCE)
    assert "disagrees with eetool's pass on 1 of 16" in line and "sample 3" in line
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# The runtime


@pytest.mark.parametrize("point", [0, 1])
def test_runtime_matches_eetool_predict_on_the_demo_test_set(demo: Demo, point: int) -> None:
    """Classes and exit indices: equal on at least 99.9% of the 2000 inputs, every difference a confidence within
    1e-5 of its threshold (none seen here so far)."""
    ours = records(ok(invoke("predict", "-c", "demo", "--means", demo.means, "--thresholds", demo.thresholds,
                             "--point", point, demo.pngs, "--batch-size", 256)).stdout)
    proc = runtime(demo, demo.bundle, demo.pngs, "--point", point, "--batch-size", 256)
    assert proc.returncode == 0, proc.stderr
    _assert_parity(ours, records(proc.stdout), yaml.safe_load(demo.thresholds.read_text())["points"][point])


@pytest.mark.parametrize("point", [0, 1])
def test_runtime_single_image_graph_matches_eetool_predict(demo: Demo, point: int) -> None:
    """At batch 1 the runtime runs the single-image graph (the stages nested in If branches): on 500 demo test
    inputs, classes and exit indices as eetool predict's, under the same allowance as the stage graphs'."""
    files = sorted(demo.pngs.iterdir())[:500]
    ours = records(ok(invoke("predict", "-c", "demo", "--means", demo.means, "--thresholds", demo.thresholds,
                             "--point", point, *files)).stdout)
    proc = runtime(demo, demo.bundle, *files, "--point", point, "--batch-size", 1)
    assert proc.returncode == 0, proc.stderr
    _assert_parity(ours, records(proc.stdout), yaml.safe_load(demo.thresholds.read_text())["points"][point])


def _assert_parity(ours: list[dict], theirs: list[dict], point: dict) -> None:
    """Classes and exit indices: equal on at least 99.9% of the inputs, every difference a confidence within 1e-5 of
    its threshold; where they are equal, the same cost, exit and class name, and confidences within 1e-4."""
    assert [r["input"] for r in theirs] == [r["input"] for r in ours]
    thresholds = point["thresholds"]
    differ = [(a, b) for a, b in zip(ours, theirs, strict=True)
              if (a["class"], a["exit_index"]) != (b["class"], b["exit_index"])]
    near = [(a, b) for a, b in differ
            if any(r["exit_index"] < len(thresholds) and abs(r["confidence"] - thresholds[r["exit_index"]]) <= 1e-5
                   for r in (a, b))]
    assert len(differ) <= len(ours) // 1000 and len(near) == len(differ), (
        f"{len(differ)} of {len(ours)} differ, {len(near)} of them within 1e-5 of a threshold: {differ[:3]}")
    assert len({r["exit_index"] for r in theirs}) > 3, "samples leave at several exits"
    same = [(a["cost"], a["exit"], a["class_name"]) == (b["cost"], b["exit"], b["class_name"])
            for a, b in zip(ours, theirs, strict=True)
            if (a["class"], a["exit_index"]) == (b["class"], b["exit_index"])]
    assert all(same)
    assert max(abs(a["confidence"] - b["confidence"]) for a, b in zip(ours, theirs, strict=True)) < 1e-4


def test_runtime_batch_size_does_not_change_results(demo: Demo) -> None:
    files = sorted(str(p) for p in demo.pngs.iterdir())[:40]
    one = runtime(demo, demo.bundle, *files, "--point", 1, "--batch-size", 1, "--top-k", 3)
    many = runtime(demo, demo.bundle, *files, "--point", 1, "--batch-size", 16, "--top-k", 3)
    assert one.returncode == many.returncode == 0, one.stderr + many.stderr
    a, b = records(one.stdout), records(many.stdout)
    assert [(r["class"], r["exit_index"]) for r in a] == [(r["class"], r["exit_index"]) for r in b]
    assert all(len(r["top_k"]) == 3 and r["top_k"][0]["probability"] >= r["top_k"][2]["probability"] for r in a)


def test_runtime_refuses_a_changed_threshold_or_graph(demo: Demo, tmp_path: Path) -> None:
    changed = tmp_path / "threshold"
    shutil.copytree(demo.bundle, changed)
    manifest = (changed / "manifest.yaml").read_text()
    doc = yaml.safe_load(manifest)
    doc["points"][0]["thresholds"][0] = 0.5
    (changed / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = runtime(demo, changed, demo.pngs / "0000.png", "--point", 0)
    assert proc.returncode == ExitCode.PROVENANCE and proc.stdout == ""
    assert proc.stderr.startswith("error: ") and "manifest.yaml has changed since export" in proc.stderr
    for name in ("stage_3.onnx", "batch_1.onnx"):  # a stage's graph, the single-image graph
        graph = bundle_with_a_byte_changed(demo.bundle, tmp_path / name.removesuffix(".onnx"), name)
        proc = runtime(demo, graph, demo.pngs / "0000.png", "--point", 0)
        assert proc.returncode == ExitCode.PROVENANCE and f"{name} has changed since export" in proc.stderr


def _resealed(bundle: Path, folder: Path, edit: object) -> Path:
    """A copy of ``bundle`` with its manifest edited and SHA256SUMS made to match: what a changed manifest's sums do
    not catch, the runtime must refuse by what it says."""
    shutil.copytree(bundle, folder)
    doc = yaml.safe_load((folder / "manifest.yaml").read_text())
    edit(doc)  # type: ignore[operator]
    (folder / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    sums = (folder / "SHA256SUMS").read_text().splitlines()
    (folder / "SHA256SUMS").write_text("".join(
        f"{sha256(folder / 'manifest.yaml')}  manifest.yaml\n" if line.endswith("  manifest.yaml") else f"{line}\n"
        for line in sums))
    return folder


def test_runtime_refuses_an_older_schema_and_unknown_stage_outputs(demo: Demo, tmp_path: Path) -> None:
    """A schema 1 bundle (a graph per decision beside each stage) or 2 (without the single-image graph) is refused
    with the advice to export it again; a manifest of schema 3 without its single-image graph, or with a stage
    whose recorded outputs are not the ones the runtime reads, as inconsistent."""
    image = demo.pngs / "0000.png"
    for schema in (1, 2):
        old = _resealed(demo.bundle, tmp_path / f"schema-{schema}",
                        lambda doc, schema=schema: doc.update(schema=schema))
        proc = runtime(demo, old, image, "--point", 0)
        assert proc.returncode == ExitCode.PROVENANCE and proc.stdout == "" and len(proc.stderr.splitlines()) == 1
        assert f"schema {schema} (" in proc.stderr and "export the bundle again" in proc.stderr
    no_network = _resealed(demo.bundle, tmp_path / "no-network", lambda doc: doc.pop("batch_1"))
    proc = runtime(demo, no_network, image, "--point", 0)
    assert proc.returncode == ExitCode.PROVENANCE and "records no single-image graph" in proc.stderr

    def drop_probabilities(doc: dict) -> None:
        doc["stages"][2]["outputs"] = doc["stages"][2]["outputs"][:3]

    outputs = _resealed(demo.bundle, tmp_path / "outputs", drop_probabilities)
    proc = runtime(demo, outputs, image, "--point", 0)
    assert proc.returncode == ExitCode.PROVENANCE and "stage 2's graph gives" in proc.stderr


def test_runtime_bad_inputs_as_eetool_predict(demo: Demo, tmp_path: Path) -> None:
    good = [str(demo.pngs / "0000.png"), str(demo.pngs / "0001.png")]
    (tmp_path / "text.png").write_text("not an image")
    order = [good[0], str(tmp_path / "text.png"), str(tmp_path / "missing.png"), good[1]]
    ours = invoke("predict", "-c", "demo", *order)
    theirs = runtime(demo, demo.bundle, *order, "--point", 0)
    assert ours.exit_code == theirs.returncode == ExitCode.INPUTS_FAILED
    skipped = [line for line in theirs.stderr.splitlines() if line.startswith("skipped: ")]
    assert skipped == [line for line in ours.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 2 and [r["input"] for r in records(theirs.stdout)] == good
    assert theirs.stderr.splitlines()[-1] == ours.stderr.splitlines()[-1]
    stop = runtime(demo, demo.bundle, *order, "--point", 0, "--on-error", "stop", "--batch-size", 1, "-o",
                   tmp_path / "out.jsonl")
    assert stop.returncode == ExitCode.BAD_INPUT
    assert [r["input"] for r in records((tmp_path / "out.jsonl").read_text())] == good[:1]
    empty = runtime(demo, demo.bundle, "-", "--point", 0, stdin="\n")
    assert empty.returncode == ExitCode.BAD_INPUT and "no inputs to predict on" in empty.stderr
    several = runtime(demo, demo.bundle, good[0])
    assert several.returncode == ExitCode.USAGE and "--point" in several.stderr


def test_runtime_writes_csv_as_eetool_predict(demo: Demo) -> None:
    files = [str(p) for p in sorted(demo.pngs.iterdir())[:20]]
    ours = ok(invoke("predict", "-c", "demo", "--means", demo.means, "--thresholds", demo.thresholds, "--point", 0,
                     *files, "--format", "csv")).stdout.splitlines()
    theirs = runtime(demo, demo.bundle, *files, "--point", 0, "--format", "csv").stdout.splitlines()
    assert theirs[0] == ours[0]

    def without_confidence(line: str) -> list[str]:
        cells = line.split(",")
        return cells[:3] + cells[4:]

    assert [without_confidence(x) for x in theirs] == [without_confidence(x) for x in ours]
    assert np.allclose([float(x.split(",")[3]) for x in theirs[1:]], [float(x.split(",")[3]) for x in ours[1:]],
                       atol=1e-5)


@pytest.mark.parametrize("method", ["sdn", "entropy", "e2cm+sdn"])
def test_exit_heads_export_and_run_as_eetool_predict(method: str, heads_made: dict[str, Path],
                                                     no_torch: dict[str, str], tmp_path: Path) -> None:
    """Trained heads (and E²CM with them, combined): the bundle's classes and exit indices are eetool predict's."""
    thresholds = tmp_path / "thresholds.yaml"
    means = ["--means", heads_made["means"]] if method == "e2cm+sdn" else []
    ok(invoke("fit-thresholds", "--method", method, "--exit-heads", heads_made["heads"], *means, "-c",
              heads_made["ckpt"], "-d", heads_made["data"], "--budget", 0.6, "-o", thresholds, "-q"))
    model = ["-c", heads_made["ckpt"], "--exit-heads", heads_made["heads"], *means, "--thresholds", thresholds]
    ok(invoke("export", *model, "-d", heads_made["data"], "-o", tmp_path / "bundle", "-q"))
    ours = records(ok(invoke("predict", *model, heads_made["pngs"])).stdout)
    for batch in ("64", "1"):  # the stage graphs, and the single-image graph
        proc = runtime(no_torch, tmp_path / "bundle", heads_made["pngs"], "--batch-size", batch)
        assert proc.returncode == 0, proc.stderr
        theirs = records(proc.stdout)
        assert [(r["class"], r["exit_index"]) for r in theirs] == [(r["class"], r["exit_index"]) for r in ours]
    assert len({r["exit_index"] for r in ours}) > 1


@pytest.fixture(scope="module")
def heads_made(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> dict[str, Path]:
    from eetool.core.datasets import load_dataset

    d = tmp_path_factory.mktemp("export-heads")
    heads, means = d / "heads.safetensors", d / "means.safetensors"
    ok(invoke("train-exits", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "--epochs", 1,
              "--no-augment", "-o", heads, "-q"))
    ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "--exits", "half", "-o", means, "-q"))
    ds = load_dataset(tiny_data, "test")
    assert ds.images is not None
    (d / "pngs").mkdir()
    for i, image in enumerate(ds.images):
        Image.fromarray(image[0].numpy(), mode="L").save(d / "pngs" / f"{i:03d}.png")
    return {"ckpt": Path(tiny_checkpoint), "data": Path(tiny_data), "heads": heads, "means": means,
            "pngs": d / "pngs"}


# ---------------------------------------------------------------------------------------------
# int8 (export --quantize int8)

CALIBRATION_SAMPLES = 256


@pytest.fixture(scope="module")
def int8_bundle(demo: Demo) -> Path:
    bundle = demo.folder / "bundle-int8"
    ok(invoke("export", "-c", "demo", "--means", demo.means, "--thresholds", demo.thresholds, "-o", bundle,
              "--quantize", "int8", "--calibration-data", "demo", "--calibration-samples", CALIBRATION_SAMPLES, "-q"))
    return bundle


@pytest.mark.parametrize("point", [0, 1])
def test_int8_bundle_agrees_with_the_float_bundle_without_torch(demo: Demo, int8_bundle: Path, point: int) -> None:
    """The runtime, torch blocked, on the first 600 demo test images: the int8 bundle's classes are the float
    bundle's on at least 95% of them (quantisation moves features, so some samples cross a threshold or flip a
    close class: agreement, not equality), and it still lets samples leave at several exits."""
    files = [str(p) for p in sorted(demo.pngs.iterdir())[:600]]
    runs = [runtime(demo, bundle, *files, "--point", point, "--batch-size", 64) for bundle in (demo.bundle,
                                                                                               int8_bundle)]
    assert all(proc.returncode == 0 for proc in runs), runs[1].stderr
    assert "int8 stages" in runs[1].stderr and "int8" not in runs[0].stderr
    floats, int8s = records(runs[0].stdout), records(runs[1].stdout)
    assert [r["input"] for r in int8s] == files
    same_class = sum(a["class"] == b["class"] for a, b in zip(floats, int8s, strict=True)) / len(files)
    same_exit = sum(a["exit_index"] == b["exit_index"] for a, b in zip(floats, int8s, strict=True)) / len(files)
    assert same_class >= 0.95, f"classes agree on {same_class:.1%}, exits on {same_exit:.1%}"
    assert len({r["exit_index"] for r in int8s}) > 3


def test_int8_graphs_are_quantised_and_the_decisions_float(demo: Demo, int8_bundle: Path) -> None:
    """Each stage's part of its graph is quantised; the exit decision joined to it is the float bundle's, node for
    node and weight for weight."""
    import onnx
    from onnx import numpy_helper

    def decision(graph: onnx.GraphProto) -> tuple[list[str], dict[str, np.ndarray]]:
        ops = [n.op_type for n in graph.node if n.name.startswith("decision/")]
        weights = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.startswith("decision/")}
        return ops, weights

    doc = yaml.safe_load((int8_bundle / "manifest.yaml").read_text())
    for j, stage in enumerate(doc["stages"]):
        graph = onnx.load(str(int8_bundle / stage["stage"])).graph
        ops = {n.op_type for n in graph.node if not n.name.startswith("decision/")}
        assert {"QuantizeLinear", "DequantizeLinear"} <= ops and ops & {"Conv", "Gemm", "MatMul"}, stage["stage"]
        int8_ops, int8_weights = decision(graph)
        float_ops, float_weights = decision(onnx.load(str(demo.bundle / stage["stage"])).graph)
        assert int8_ops == float_ops and (len(float_ops) > 5) == (j < len(doc["stages"]) - 1), stage["stage"]
        assert not {"QuantizeLinear", "DequantizeLinear"} & set(int8_ops)
        assert int8_weights.keys() == float_weights.keys()
        assert all(np.array_equal(int8_weights[k], float_weights[k]) for k in float_weights)
    assert doc["points"] == yaml.safe_load((demo.bundle / "manifest.yaml").read_text())["points"]


def test_int8_manifest_records_the_quantization_and_its_calibration_data(int8_bundle: Path) -> None:
    """method, calibration data (the fingerprint of the very samples: the seeded draw re-made here) and samples;
    and the export's own check against the float bundle."""
    import torch

    from eetool.core.datasets import load_dataset

    record = yaml.safe_load((int8_bundle / "manifest.yaml").read_text())["provenance"]["quantization"]
    train = load_dataset("demo", "train")
    chosen = torch.randperm(len(train), generator=torch.Generator().manual_seed(0))[:CALIBRATION_SAMPLES]
    assert record["method"] == "int8" and record["format"] == "QDQ"
    assert record["calibration"] == {"data": "demo/train", "samples": CALIBRATION_SAMPLES,
                                     "fingerprint": train.subset(chosen.sort().values).fingerprint}
    check = record["check"]
    assert check["data"] == "demo/test" and len(check["points"]) == 2
    assert all(p["class_agreement"] >= check["min_agreement"] == 0.95 for p in check["points"])


def test_runtime_verifies_the_int8_provenance(demo: Demo, int8_bundle: Path, tmp_path: Path) -> None:
    """A changed quantization record is refused by its sha256; one rewritten with consistent sums but without its
    calibration data, or with a method this runtime does not know, is refused by what it says."""
    image = demo.pngs / "0000.png"
    changed = tmp_path / "changed"
    shutil.copytree(int8_bundle, changed)
    doc = yaml.safe_load((changed / "manifest.yaml").read_text())
    doc["provenance"]["quantization"]["calibration"]["samples"] = 10_000
    (changed / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = runtime(demo, changed, image, "--point", 0)
    assert proc.returncode == ExitCode.PROVENANCE and "manifest.yaml has changed since export" in proc.stderr

    no_calibration = _resealed(int8_bundle, tmp_path / "no-calibration",
                               lambda doc: doc["provenance"]["quantization"].pop("calibration"))
    proc = runtime(demo, no_calibration, image, "--point", 0)
    assert proc.returncode == ExitCode.PROVENANCE and proc.stdout == ""
    assert "int8 stages without their calibration data" in proc.stderr and len(proc.stderr.splitlines()) == 1
    unknown = _resealed(int8_bundle, tmp_path / "int4",
                        lambda doc: doc["provenance"]["quantization"].update(method="int4"))
    proc = runtime(demo, unknown, image, "--point", 0)
    assert proc.returncode == ExitCode.PROVENANCE and "does not know ('int4')" in proc.stderr


def test_int8_export_is_refused_when_it_disagrees_with_the_float_bundle(tiny_checkpoint: str, tiny_data: str,
                                                                        tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    import eetool.classification.bundle_quantization as quantization

    real = quantization.run_bundle

    def int8_flips_classes(folder: Path, doc: dict, images: np.ndarray, thresholds: list[float],
                           stage_folder: Path | None = None) -> object:
        out = real(folder, doc, images, thresholds, stage_folder)
        if stage_folder is None:  # the int8 bundle: a tenth of its classes changed
            out.classes[::10] = (out.classes[::10] + 1) % 10
        return out

    monkeypatch.setattr(quantization, "run_bundle", int8_flips_classes)
    result = invoke("export", "-c", tiny_checkpoint, "-o", tmp_path / "b", "--check-samples", 40, "--quantize", "int8",
                    "--calibration-data", tiny_data, "--calibration-samples", 16, "-q")
    line = one_error_line(result, ExitCode.PROVENANCE)
    assert "agree with the float bundle's on 90.0% of 40 check samples" in line
    assert list(tmp_path.iterdir()) == []


def test_a_foreign_torchvision_resnet18_state_dict(no_torch: dict[str, str], tmp_path: Path) -> None:
    """Foreign weights (a torchvision ResNet-18 state dict, the model options on every command), 3 channels at
    224 x 224 from 28 x 28 PNG files (resized and cropped by the ImageNet recipe): runtime and eetool predict agree."""
    import torch
    import torchvision

    from eetool.core.datasets import load_dataset

    torch.manual_seed(0)
    weights = tmp_path / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), weights)
    model = ["-c", weights, "--arch", "resnet18", "--num-classes", 10]
    (tmp_path / "calibration.txt").write_text("\n".join(str(i) for i in range(160)))
    means, thresholds = tmp_path / "means.safetensors", tmp_path / "thresholds.yaml"
    ok(invoke("calibrate-means", *model, "-d", "demo", "--split", "train", "--indices", tmp_path / "calibration.txt",
              "--exits", "quartiles", "--pool-spatial", 4, "-o", means, "-q"))
    ok(invoke("fit-thresholds", "--means", means, "--budget", 0.5, "-o", thresholds, "-q"))
    early = [*model, "--means", means, "--thresholds", thresholds]
    ok(invoke("export", *early, "-o", tmp_path / "bundle", "--check-samples", 32, "-q"))
    ds = load_dataset("demo", "test")
    assert ds.images is not None
    (tmp_path / "pngs").mkdir()
    for i, image in enumerate(ds.images[:48]):
        Image.fromarray(image[0].numpy(), mode="L").save(tmp_path / "pngs" / f"{i:02d}.png")
    ours = records(ok(invoke("predict", *early, tmp_path / "pngs", "--batch-size", 16)).stdout)
    proc = runtime(no_torch, tmp_path / "bundle", tmp_path / "pngs", "--batch-size", 16)
    assert proc.returncode == 0, proc.stderr
    theirs = records(proc.stdout)
    limits = yaml.safe_load(thresholds.read_text())["points"][0]["thresholds"]
    differ = [(a, b) for a, b in zip(ours, theirs, strict=True)
              if (a["class"], a["exit_index"]) != (b["class"], b["exit_index"])]
    assert all(any(r["exit_index"] < len(limits) and abs(r["confidence"] - limits[r["exit_index"]]) <= 1e-5
                   for r in pair) for pair in differ), differ
    assert len(differ) <= len(ours) // 1000, f"{len(differ)} of {len(ours)} differ, each within 1e-5 of a threshold"
