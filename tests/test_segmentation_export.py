"""eetool export of a segmentation checkpoint (an eeseg network trained briefly on scenes of the demo garments) and
eetool-runtime predict on its bundle with ``import torch`` made to fail: the manifest against its sources, the
runtime's masks and records against eetool predict's on the same PNG files (every pixel of another class a tie of
eetool's logits), a tampered bundle refused, bad inputs and options as eetool predict treats them, and an export
refused when onnxruntime and eetool's pass disagree."""

from __future__ import annotations

import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cli_helpers import invoke, ok, one_error_line, sha256
from PIL import Image
from runtime_helpers import bundle_with_a_byte_changed, no_torch_env
from test_segmentation_prediction import FOLDER_PALETTE, jsonl, palette_folder, scenes_file

from eetool.core.errors import ExitCode

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")


@dataclass
class Made:
    ckpt: str
    data: str  # segmentation:FILE of 24 scenes the network did not train on
    bundle: Path
    pngs: Path  # the same 24 scenes as PNG files
    env: dict[str, str]  # a runtime process's: torch blocked, the runtime importable


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    from eetool.core.datasets import load_dataset

    d = tmp_path_factory.mktemp("segexport")
    scenes_file(d / "train.safetensors", "train", 96, seed=1)
    scenes_file(d / "test.safetensors", "test", 24, seed=2)
    ckpt = d / "eeseg.safetensors"
    ok(invoke("train", "-d", f"segmentation:{d / 'train.safetensors'}", "-o", ckpt, "--epochs", 2, "--batch-size",
              16, "--optimizer", "adamw", "--lr", 0.01, "--arch-args", "{width: 8, head_width: 8}", "-q"))
    data = f"segmentation:{d / 'test.safetensors'}"
    ok(invoke("export", "-c", ckpt, "-d", data, "-o", d / "bundle", "-q"))
    ds = load_dataset(data, "test")
    assert ds.images is not None
    (d / "pngs").mkdir()
    for i, image in enumerate(ds.images):
        Image.fromarray(image[0].numpy()).save(d / "pngs" / f"scene{i:02d}.png")
    return Made(str(ckpt), data, d / "bundle", d / "pngs", no_torch_env(tmp_path_factory.mktemp("blocker")))


def runtime(made: Made, *args: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "eetool_runtime", "predict", *(str(a) for a in args)],
                          capture_output=True, text=True, env=made.env, timeout=600)


def read_mask(path: str | Path) -> tuple[np.ndarray, list[int] | None]:
    with Image.open(path) as image:
        assert image.mode == "P"
        return np.asarray(image), image.getpalette()


def test_manifest_records_the_plain_network_its_classes_palette_and_every_files_sha256(made: Made) -> None:
    from eetool.core.checkpoint import load_checkpoint
    from eetool.segmentation.mask_prediction import voc_palette
    from eetool.segmentation.model import EXIT_NAMES

    doc = yaml.safe_load((made.bundle / "manifest.yaml").read_text())
    ckpt = load_checkpoint(made.ckpt)
    assert doc["format"] == "eetool-bundle" and doc["schema"] == 3
    assert doc["task"] == "segmentation" and doc["method"] == "plain" and doc["points"] == []
    assert doc["classes"] == ckpt.spec.classes and len(doc["classes"]) == 11
    assert doc["input"]["shape"] == ["batch", 3, 64, 64]
    assert doc["preprocessing"]["mean"] == ckpt.spec.mean and doc["preprocessing"]["crop"] == [64, 64]
    assert doc["stages"] == [{"stage": "stage_0.onnx", "exit": "final", "outputs": ["classes", "logits"],
                              "cost": 1.0}]
    assert doc["segmentation"]["exits"] == EXIT_NAMES
    # a safetensors source has no palette of its own: the masks take PASCAL VOC's colours, as eetool predict's
    assert doc["segmentation"]["palette"] == {"source": "pascal-voc", "rgb": bytes(voc_palette()).hex()}
    assert doc["provenance"]["sources"]["checkpoint"]["sha256"] == ckpt.sha256
    on_disk = {p.name for p in made.bundle.iterdir()}
    assert on_disk == {"stage_0.onnx", "manifest.yaml", "SHA256SUMS", ".eetool-folder"}
    assert doc["files"] == {"stage_0.onnx": sha256(made.bundle / "stage_0.onnx")}
    sums = dict(reversed(line.split("  ")) for line in (made.bundle / "SHA256SUMS").read_text().splitlines())
    assert sums == {**doc["files"], "manifest.yaml": sha256(made.bundle / "manifest.yaml")}


def test_runtime_masks_and_records_equal_eetool_predicts(made: Made, tmp_path: Path) -> None:
    """The same PNG files through eetool predict and the runtime (torch blocked, batch 5 against eetool's 64): the
    records equal but for the mask folder, the palettes equal, and the class maps equal on at least 99.9% of the
    pixels, every other pixel a tie of eetool's logits (none seen here so far)."""
    from eetool.core.checkpoint import load_checkpoint
    from eetool.core.datasets import Preprocess
    from eetool.segmentation.mask_bundle import TIE_TOLERANCE

    ours = ok(invoke("predict", "-c", made.ckpt, made.pngs, "--output-dir", tmp_path / "eetool", "-q"))
    proc = runtime(made, made.bundle, made.pngs, "--output-dir", tmp_path / "runtime", "--batch-size", 5)
    assert proc.returncode == 0, proc.stderr
    a, b = jsonl(ours.stdout), jsonl(proc.stdout)
    assert [{**r, "mask": Path(r["mask"]).name} for r in a] == [{**r, "mask": Path(r["mask"]).name} for r in b]
    assert [Path(r["mask"]).parent for r in b] == [tmp_path / "runtime"] * 24
    assert b[0]["exit_shares"] == {"exit1": 0.0, "exit2": 0.0, "exit3": 0.0, "final": 1.0} and b[0]["cost"] == 1.0
    ckpt = load_checkpoint(made.ckpt)
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    pixels = differ = ties = 0
    classes_seen: set[int] = set()
    for ra, rb in zip(a, b, strict=True):
        (mine, palette), (theirs, their_palette) = read_mask(ra["mask"]), read_mask(rb["mask"])
        assert palette == their_palette
        pixels += mine.size
        classes_seen |= set(np.unique(mine).tolist())
        where = np.argwhere(mine != theirs)
        differ += len(where)
        if len(where):
            with Image.open(ra["input"]) as image:
                rgb = torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)[None]
            with torch.no_grad():
                logits = ckpt.model.eval()(preprocess(rgb))[0]
            for i, j in where:
                gap = abs(float(logits[int(mine[i, j]), i, j] - logits[int(theirs[i, j]), i, j]))
                ties += gap <= TIE_TOLERANCE * max(1.0, abs(float(logits[int(mine[i, j]), i, j])))
    assert differ <= pixels // 1000 and ties == differ, (
        f"{differ} of {pixels} pixels differ, {ties} of them ties of eetool's logits")
    assert len(classes_seen) > 3, "the masks hold garments, not only background"


def test_runtime_writes_csv_as_eetool_predict(made: Made, tmp_path: Path) -> None:
    files = sorted(str(p) for p in made.pngs.iterdir())[:3]
    ours = ok(invoke("predict", "-c", made.ckpt, *files, "--output-dir", tmp_path, "--format", "csv", "-q"))
    proc = runtime(made, made.bundle, *files, "--output-dir", tmp_path, "--format", "csv", "--force")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ours.stdout.splitlines()
    assert proc.stdout.splitlines()[0] == "input,mask,share_exit1,share_exit2,share_exit3,share_final,cost"


def test_runtime_refuses_a_changed_palette_or_graph(made: Made, tmp_path: Path) -> None:
    image = made.pngs / "scene00.png"
    palette = tmp_path / "palette"
    shutil.copytree(made.bundle, palette)
    doc = yaml.safe_load((palette / "manifest.yaml").read_text())
    doc["segmentation"]["palette"]["rgb"] = "ff" * 768
    (palette / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    proc = runtime(made, palette, image, "--output-dir", tmp_path / "masks")
    assert proc.returncode == ExitCode.PROVENANCE and "manifest.yaml has changed since export" in proc.stderr
    graph = bundle_with_a_byte_changed(made.bundle, tmp_path / "graph", "stage_0.onnx")
    proc = runtime(made, graph, image, "--output-dir", tmp_path / "masks")
    assert proc.returncode == ExitCode.PROVENANCE and "stage_0.onnx has changed since export" in proc.stderr
    assert not (tmp_path / "masks").exists()


def test_runtime_refuses_a_segmentation_manifest_it_cannot_run(made: Made, tmp_path: Path) -> None:
    """A manifest whose SHA256SUMS were remade after a hand edit passes the sha256 check, so the runtime must refuse
    it by what it says: a palette that is not 256 colours, a task it does not know."""
    from eetool.core.bundles import seal

    image = made.pngs / "scene00.png"
    for name, edit, says in [
        ("odd-palette", lambda d: d["segmentation"]["palette"].update(rgb="00" * 31), "1 to 256 colours"),
        ("other-task", lambda d: d.update(task="detection"), "task 'detection'"),
    ]:
        bundle = tmp_path / name
        shutil.copytree(made.bundle, bundle)
        doc = yaml.safe_load((bundle / "manifest.yaml").read_text())
        edit(doc)
        seal(bundle, doc)
        proc = runtime(made, bundle, image, "--output-dir", tmp_path / "masks")
        assert proc.returncode == ExitCode.PROVENANCE and says in proc.stderr, proc.stderr


def test_runtime_bad_inputs_and_options_as_eetool_predict(made: Made, tmp_path: Path) -> None:
    good = [str(made.pngs / "scene00.png"), str(made.pngs / "scene01.png")]
    (tmp_path / "text.png").write_text("not an image")
    order = [good[0], str(tmp_path / "text.png"), str(tmp_path / "missing.png"), good[1]]
    ours = invoke("predict", "-c", made.ckpt, *order, "--output-dir", tmp_path / "eetool")
    theirs = runtime(made, made.bundle, *order, "--output-dir", tmp_path / "runtime")
    assert ours.exit_code == theirs.returncode == ExitCode.INPUTS_FAILED
    skipped = [line for line in theirs.stderr.splitlines() if line.startswith("skipped: ")]
    assert skipped == [line for line in ours.stderr.splitlines() if line.startswith("skipped: ")]
    assert len(skipped) == 2 and [r["input"] for r in jsonl(theirs.stdout)] == good
    assert sorted(p.name for p in (tmp_path / "runtime").iterdir()) == ["scene00.png", "scene01.png"]
    assert theirs.stderr.splitlines()[-1] == ours.stderr.splitlines()[-1]
    stop = runtime(made, made.bundle, *order, "--output-dir", tmp_path / "stop", "--on-error", "stop",
                   "--batch-size", 1, "-o", tmp_path / "out.jsonl")
    assert stop.returncode == ExitCode.BAD_INPUT
    assert [r["input"] for r in jsonl((tmp_path / "out.jsonl").read_text())] == good[:1]
    again = runtime(made, made.bundle, good[0], "--output-dir", tmp_path / "runtime")
    assert again.returncode == ExitCode.OUTPUT and "already exists" in again.stderr
    for args, says in [([], "--output-dir is needed"), (["--top-k", 2], "--top-k apply to classifiers"),
                       (["--point", 0], "holds the plain model")]:
        out = ["--output-dir", tmp_path / "options"] if args else []
        proc = runtime(made, made.bundle, good[0], *out, *args)
        assert proc.returncode == ExitCode.USAGE and says in proc.stderr, proc.stderr
    assert not (tmp_path / "options").exists()


def test_export_refuses_pixel_exits_and_a_graph_that_disagrees(made: Made, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ok(invoke("fit-thresholds", "--method", "adp-c", "--threshold", 0.7, "-c", made.ckpt, "-o",
              tmp_path / "adp-c.yaml", "-q"))
    line = one_error_line(invoke("export", "-c", made.ckpt, "--thresholds", tmp_path / "adp-c.yaml", "-o",
                                 tmp_path / "b"), ExitCode.USAGE)
    assert "pixel exits do not export yet" in line and "the plain network exports" in line

    import eetool.segmentation.mask_bundle as mask_bundle

    real = mask_bundle.MaskPredictor

    class FirstRowShifted(real):  # type: ignore[misc, valid-type]
        def __call__(self, x: torch.Tensor) -> object:
            out = super().__call__(x)
            out.classes[0, 0] = (out.classes[0, 0] + 1) % 11
            return out

    monkeypatch.setattr(mask_bundle, "MaskPredictor", FirstRowShifted)
    result = invoke("export", "-c", made.ckpt, "-d", made.data, "--check-samples", 4, "-o", tmp_path / "b", "-q")
    line = one_error_line(result, ExitCode.PROVENANCE)
    assert "disagrees with eetool's pass on 64 of 16384 check pixels" in line and "image 0 pixel (0, " in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adp-c.yaml"]


def test_a_folder_sources_palette_goes_into_the_bundle_and_its_masks(made: Made, tmp_path: Path) -> None:
    """Exported with --data segmentation-folder whose masks are palette PNGs: the manifest records that palette,
    and the runtime's masks carry it as eetool predict --data's do."""
    root = tmp_path / "folder"
    source = palette_folder(made.data, root)
    ok(invoke("export", "-c", made.ckpt, "-d", source, "-o", tmp_path / "bundle", "-q"))
    doc = yaml.safe_load((tmp_path / "bundle" / "manifest.yaml").read_text())
    assert doc["segmentation"]["palette"] == {"source": f"--data {source} --split test",
                                              "rgb": bytes(FOLDER_PALETTE).hex()}
    ours = jsonl(ok(invoke("predict", "-c", made.ckpt, "-d", source, "--output-dir", tmp_path / "eetool",
                           "-q")).stdout)
    proc = runtime(made, tmp_path / "bundle", root / "test" / "images", "--output-dir", tmp_path / "runtime")
    assert proc.returncode == 0, proc.stderr
    theirs = jsonl(proc.stdout)
    assert len(ours) == len(theirs) == 3
    for a, b in zip(ours, theirs, strict=True):
        assert read_mask(b["mask"])[1] == read_mask(a["mask"])[1] == FOLDER_PALETTE
