"""eetool predict end to end on the tiny checkpoint: its records against evaluate's per-sample pass, the output formats
(and that they are flushed batch by batch), and every kind of bad input."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from cli_helpers import invoke, ok, one_error_line
from PIL import Image

from eetool.classification.early_exit_evaluation import early_exit_setup
from eetool.classification.rules import Thresholded
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import ExitCode
from eetool.core.inference import evaluate_exits

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ["input", "class", "class_name", "confidence", "exit", "exit_index", "cost"]


@dataclass
class Made:
    folder: Path
    ckpt: str
    data: str
    means: Path
    thresholds: Path  # two operating points
    pngs: Path  # the tiny test split as PNG files, ImageFolder layout: pngs/test/<class>/<i>.png


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> Made:
    d = tmp_path_factory.mktemp("predict")
    means = d / "means.safetensors"
    ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", means, "-q"))
    thresholds = d / "thresholds.yaml"
    ok(invoke("fit-thresholds", "--means", means, "-o", thresholds, "--budget", 0.4, "--budget", 0.7, "-q"))
    ds = load_dataset(tiny_data, "test")
    assert ds.images is not None
    for i, (image, label) in enumerate(zip(ds.images, ds.labels.tolist(), strict=True)):
        folder = d / "pngs" / "test" / f"c{label}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / f"{i:03d}.png")
    return Made(d, tiny_checkpoint, tiny_data, means, thresholds, d / "pngs")


def early_args(made: Made, point: int) -> list[object]:
    return ["--means", made.means, "--thresholds", made.thresholds, "--point", point]


def jsonl(text: str) -> list[dict]:
    lines = text.splitlines()
    assert all(line.startswith("{") for line in lines)
    return [json.loads(line) for line in lines]


def evaluate_pass(made: Made, data: str, point: int) -> tuple[torch.Tensor, torch.Tensor, list[float]]:
    """evaluate's own early-exit pass (the library call `eetool evaluate` times) on ``data``'s test split."""
    ckpt = load_checkpoint(made.ckpt)
    em, rule, (cost_model, _), chosen, _, _ = early_exit_setup(ckpt, str(made.means), None, str(made.thresholds),
                                                                str(point), "cpu")
    ds = load_dataset(data, "test", None, None, None if not data.startswith("folder:") else _geometry(ckpt))
    run = evaluate_exits(em, ds, Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std),
                         Thresholded(rule, chosen[0][1]["thresholds"]), batch_size=16)
    return run.predictions, run.exit_index, cost_model.normalised_exit_costs()


def _geometry(ckpt: object) -> object:
    from eetool.core.loading import DataOptions

    spec = ckpt.spec  # type: ignore[attr-defined]
    return DataOptions().geometry(spec.arch, spec.input_shape[1:], spec.resize)


# ---------------------------------------------------------------------------------------------
# The same predictions as evaluate


@pytest.mark.parametrize("point", [0, 1])
def test_predict_on_a_dataset_equals_evaluates_pass(made: Made, point: int) -> None:
    result = ok(invoke("predict", "-c", made.ckpt, "-d", made.data, *early_args(made, point), "--batch-size", 7))
    recs = jsonl(result.stdout)
    classes, exits, costs = evaluate_pass(made, made.data, point)
    assert [r["class"] for r in recs] == classes.tolist()
    assert [r["exit_index"] for r in recs] == exits.tolist()
    assert len(set(exits.tolist())) > 1, "the point lets samples leave at more than one exit"
    assert [r["cost"] for r in recs] == [round(costs[e], 6) for e in exits.tolist()]
    labels = load_dataset(made.data, "test").labels.tolist()
    assert [r["label"] for r in recs] == labels
    assert [r["input"] for r in recs] == [f"safetensors/test#{i}" for i in range(len(labels))]
    for r in recs:
        assert list(r)[:7] == FIELDS
        assert r["class_name"] == f"c{r['class']}"
        assert 0 < r["confidence"] <= 1
    # the summary: one line on stderr with the exit shares and the mean cost
    mean_cost = sum(costs[e] for e in exits.tolist()) / len(exits)
    assert f"mean cost {mean_cost:.4f}" in result.stderr and f"predicted {len(labels)} inputs" in result.stderr


def test_predict_on_png_files_equals_evaluate_on_the_folder_dataset(made: Made) -> None:
    """Files are decoded as folder datasets are: the same pixels, so the same classes and exits."""
    result = ok(invoke("predict", "-c", made.ckpt, made.pngs, *early_args(made, 1), "--batch-size", 5))
    recs = jsonl(result.stdout)
    classes, exits, _ = evaluate_pass(made, f"folder:{made.pngs}", 1)
    files = sorted(str(p) for p in made.pngs.rglob("*.png"))
    assert [r["input"] for r in recs] == files  # recursive, sorted
    assert [r["class"] for r in recs] == classes.tolist()
    assert [r["exit_index"] for r in recs] == exits.tolist()
    assert all("label" not in r for r in recs)


def test_confidence_is_the_rules_at_the_exit_and_the_softmax_at_the_head(made: Made) -> None:
    from eetool.core.exits import build_exit_model

    recs = jsonl(ok(invoke("predict", "-c", made.ckpt, "-d", made.data, *early_args(made, 1), "--top-k", 3)).stdout)
    ckpt = load_checkpoint(made.ckpt)
    em, rule, _, chosen, _, _ = early_exit_setup(ckpt, str(made.means), None, str(made.thresholds), "1", "cpu")
    ds = load_dataset(made.data, "test")
    x = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)(ds.images)
    with torch.no_grad():
        feats, logits = build_exit_model(ckpt.model.eval(), ",".join(em.exits)).features(x)
        head = torch.softmax(logits, 1)
        for i, r in enumerate(recs):
            e = r["exit_index"]
            if e == len(em.exits):
                want = head[i].max()
                top = head[i].topk(3)
            else:
                want, _ = rule.scores(e, feats[e][i:i + 1])
                assert want.item() > chosen[0][1]["thresholds"][e]
                from eetool.classification.prediction import exit_probabilities

                top = exit_probabilities(rule, e, feats[e][i:i + 1])[0].topk(3)
            assert r["confidence"] == pytest.approx(float(want), abs=2e-6)
            assert [t["class"] for t in r["top_k"]] == top.indices.tolist()
            assert [t["probability"] for t in r["top_k"]] == pytest.approx(top.values.tolist(), abs=2e-6)


def test_the_plain_model_without_thresholds(made: Made) -> None:
    recs = jsonl(ok(invoke("predict", "-c", made.ckpt, "-d", made.data, "--top-k", 1)).stdout)
    ckpt = load_checkpoint(made.ckpt)
    ds = load_dataset(made.data, "test")
    with torch.no_grad():
        p = torch.softmax(ckpt.model.eval()(Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)(
            ds.images)), 1)
    assert [r["class"] for r in recs] == p.argmax(1).tolist()
    assert {(r["exit"], r["exit_index"], r["cost"]) for r in recs} == {("head", 0, 1.0)}
    assert [r["confidence"] for r in recs] == pytest.approx(p.max(1).values.tolist(), abs=2e-6)


# ---------------------------------------------------------------------------------------------
# Formats, stdin, -o


@pytest.mark.parametrize(("fmt", "sep"), [("csv", ","), ("tsv", "\t")])
def test_csv_and_tsv_are_well_formed_tables(made: Made, fmt: str, sep: str) -> None:
    text = ok(invoke("predict", "-c", made.ckpt, "-d", made.data, *early_args(made, 0), "--format", fmt,
                     "--top-k", 2)).stdout
    rows = list(csv.reader(io.StringIO(text), delimiter=sep))
    assert rows[0] == [*FIELDS, "label", "top1_class", "top1_class_name", "top1_probability", "top2_class",
                       "top2_class_name", "top2_probability"]
    assert len(rows) == 65 and all(len(r) == len(rows[0]) for r in rows)
    recs = jsonl(ok(invoke("predict", "-c", made.ckpt, "-d", made.data, *early_args(made, 0), "--top-k", 2)).stdout)
    for row, rec in zip(rows[1:], recs, strict=True):
        assert row[:8] == [str(rec[f]) for f in [*FIELDS, "label"]]
        assert row[8] == str(rec["top_k"][0]["class"])


def test_paths_on_stdin(made: Made) -> None:
    files = sorted(str(p) for p in made.pngs.rglob("*.png"))[::-3]  # any order: kept as given
    result = ok(invoke_stdin("\n".join(files) + "\n\n", "predict", "-c", made.ckpt, "-"))
    assert [r["input"] for r in jsonl(result.stdout)] == files


def invoke_stdin(text: str, *args: object) -> object:
    from cli_helpers import runner

    from eetool.cli import app

    return runner.invoke(app, [str(a) for a in args], input=text)


def test_output_file_is_written_whole_and_not_replaced_without_force(made: Made, workdir: Path) -> None:
    result = ok(invoke("predict", "-c", made.ckpt, "-d", made.data, "-o", "out.jsonl"))
    assert result.stdout == ""
    assert len(jsonl(Path("out.jsonl").read_text())) == 64
    assert not [p for p in os.listdir(".") if p.startswith(".out.jsonl")]
    one_error_line(invoke("predict", "-c", made.ckpt, "-d", made.data, "-o", "out.jsonl"), ExitCode.OUTPUT)


def test_records_are_flushed_batch_by_batch(made: Made, tmp_path: Path) -> None:
    """The first batches' records reach the reader while the run still waits for a later input: a named pipe
    that no one has written yet, given last."""
    files = sorted(str(p) for p in made.pngs.rglob("*.png"))[:8]
    fifo = tmp_path / "later.png"
    os.mkfifo(fifo)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "eetool", "predict", "-c", made.ckpt, *files, str(fifo),
                             "--batch-size", "4", "--format", "csv"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(9)]  # the header and two batches
        assert proc.poll() is None, "the run had already ended"
        assert lines[0].startswith("input,class,") and [line.split(",")[0] for line in lines[1:]] == files
        with open(fifo, "wb"):  # an empty file: it cannot be decoded
            pass
        rest, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert rest == ""
    assert proc.returncode == ExitCode.INPUTS_FAILED
    assert f"skipped: cannot decode image {fifo}" in err


# ---------------------------------------------------------------------------------------------
# Bad inputs


def _oversized_png(path: Path) -> None:
    """A valid 1 x 1 PNG whose header declares 100000 x 100000 pixels (past PIL's limit)."""
    buffer = io.BytesIO()
    Image.new("L", (1, 1)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = (100000).to_bytes(4, "big") * 2
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


@pytest.fixture()
def bad_inputs(made: Made, tmp_path: Path) -> tuple[list[str], dict[str, str]]:
    """Good files with every kind of bad one between them: what each bad one's line says."""
    good = sorted(str(p) for p in made.pngs.rglob("*.png"))[:3]
    (tmp_path / "text.png").write_text("not an image")
    whole = Path(good[0]).read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    _oversized_png(tmp_path / "huge.png")
    (tmp_path / "unreadable.png").write_bytes(whole)
    (tmp_path / "unreadable.png").chmod(0)
    bad = {str(tmp_path / "missing.png"): "cannot decode image", str(tmp_path / "text.png"): "cannot decode image",
           str(tmp_path / "truncated.png"): "cannot decode image",
           str(tmp_path / "huge.png"): "10000000000 pixels"}
    if os.geteuid() != 0:  # root reads any file
        bad[str(tmp_path / "unreadable.png")] = "cannot decode image"
    order = [good[0], *bad, good[1], good[2]]
    return order, bad


def test_each_bad_input_is_one_line_and_the_others_are_predicted(made: Made, bad_inputs: tuple) -> None:
    order, bad = bad_inputs
    result = invoke("predict", "-c", made.ckpt, *order)
    assert result.exit_code == ExitCode.INPUTS_FAILED, result.stderr
    assert [r["input"] for r in jsonl(result.stdout)] == [p for p in order if p not in bad]
    lines = result.stderr.splitlines()
    skipped = [line for line in lines if line.startswith("skipped: ")]
    assert len(skipped) == len(bad)
    for line, (path, says) in zip(skipped, bad.items(), strict=True):
        assert path in line and says in line and "(hint: " in line, line
    assert lines[-1].startswith(f"error: {len(bad)} of {len(order)} inputs could not be read")


def test_on_error_stop_ends_at_the_first_bad_input(made: Made, bad_inputs: tuple, workdir: Path) -> None:
    order, bad = bad_inputs
    result = invoke("predict", "-c", made.ckpt, *order, "--on-error", "stop", "--batch-size", 1, "-o", "out.jsonl")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert result.stderr.splitlines()[-1].startswith(f"error: cannot decode image {next(iter(bad))}")
    assert [r["input"] for r in jsonl(Path("out.jsonl").read_text())] == order[:1]


def test_no_inputs_is_an_error(made: Made, tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    line = one_error_line(invoke("predict", "-c", made.ckpt, tmp_path / "empty"), ExitCode.BAD_INPUT)
    assert "no inputs to predict on" in line
    assert "no inputs to predict on" in one_error_line(invoke_stdin("", "predict", "-c", made.ckpt, "-"),
                                                       ExitCode.BAD_INPUT)
    assert "INPUTS or --data" in one_error_line(invoke("predict", "-c", made.ckpt), ExitCode.USAGE)


def test_several_points_need_point(made: Made) -> None:
    line = one_error_line(invoke("predict", "-c", made.ckpt, "-d", made.data, "--means", made.means, "--thresholds",
                                 made.thresholds), ExitCode.USAGE)
    assert "2 operating points" in line and "--point" in line
