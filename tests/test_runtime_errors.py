"""Hostile bundles, inputs and outputs through ``eetool-runtime predict``, table-driven as tests/test_errors.py is
for eetool: each gives its documented exit code (eetool_runtime.errors.ExitCode), one line on stderr, no
traceback, nothing on stdout, and changes no file. A bundle's manifest edited with its sums made to match (what a
sha256 does not catch) is refused by what it says, never by a traceback or an allocation of gigabytes."""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from PIL import Image
from runtime_helpers import no_torch_env
from typer.testing import CliRunner

from eetool.cli import app
from eetool.core.artifacts import Provenance, sha256_file
from eetool.core.checkpoint import ModelSpec, save_checkpoint
from eetool.core.errors import ExitCode

pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

runner = CliRunner()
USAGE, BAD_INPUT, PROVENANCE, OUTPUT = ExitCode.USAGE, ExitCode.BAD_INPUT, ExitCode.PROVENANCE, ExitCode.OUTPUT


def png_of_declared_size(path: Path, width: int, height: int) -> None:
    """A small PNG whose header declares width x height grey pixels (its pixel data far too short)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(bytes(100)))
                     + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, tiny_data: str) -> Path:
    """A tiny classifier's plain bundle and its bundle with exits, a tiny eeseg's bundle, images and edited copies."""
    d = tmp_path_factory.mktemp("runtime-errors")

    def ok(*args: object) -> None:
        result = runner.invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.stderr

    ok("export", "-c", tiny_checkpoint, "-o", d / "plain", "--check-samples", 8, "-q")
    ok("calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", d / "means.safetensors", "-q")
    ok("fit-thresholds", "--means", d / "means.safetensors", "-o", d / "thresholds.yaml", "--budget", 0.5, "-q")
    ok("export", "-c", tiny_checkpoint, "--means", d / "means.safetensors", "--thresholds", d / "thresholds.yaml",
       "-o", d / "exits", "--check-samples", 8, "-q")
    seg = ModelSpec(arch="eeseg", num_classes=3, input_shape=(1, 16, 16), mean=[0.5], std=[0.25],
                    arch_args={"width": 4, "head_width": 4}, classes=["bg", "a", "b"])
    save_checkpoint(str(d / "seg.safetensors"), seg.build(), seg, Provenance(kind="checkpoint"))
    ok("export", "-c", d / "seg.safetensors", "-o", d / "seg", "--check-samples", 4, "-q")
    images = d / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(images / f"{name}.png")
    # 1 x 120,000 pixels, under Pillow's limit; its shorter side resized to 28 would make it 28 x 3,360,000
    Image.fromarray(np.zeros((120_000, 1), np.uint8)).save(d / "tall.png")
    png_of_declared_size(d / "bomb-warning.png", 10_000, 10_000)  # over Pillow's limit, under twice it: a warning
    for bundle, name, edit in EDITS:
        resealed(d / bundle, d / name, edit)
    return d


def resealed(bundle: Path, folder: Path, edit: Callable[[dict[str, Any], Path], object]) -> None:
    """A copy of ``bundle`` edited by ``edit`` (the manifest, and the folder for its files; text it returns is
    added to the manifest as it is), with the manifest's files and SHA256SUMS made to match again."""
    shutil.copytree(bundle, folder)
    doc = yaml.safe_load((folder / "manifest.yaml").read_text())
    added = edit(doc, folder)
    doc["files"] = {name: sha256_file(folder / name) for name in doc["files"]}
    (folder / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False)
                                          + (added if isinstance(added, str) else ""))
    sums = {**doc["files"], "manifest.yaml": sha256_file(folder / "manifest.yaml")}
    (folder / "SHA256SUMS").write_text("".join(f"{sha}  {name}\n" for name, sha in sums.items()))


def other_graph(doc: dict[str, Any], folder: Path) -> None:
    shutil.copy(folder.parent / "plain" / "stage_0.onnx", folder / "stage_0.onnx")


def nested_deep(doc: dict[str, Any], folder: Path) -> str:
    return "deep: " + "[" * 100_000 + "]" * 100_000 + "\n"


def corrupt_graph(doc: dict[str, Any], folder: Path) -> None:
    (folder / "stage_0.onnx").write_bytes(b"not an ONNX graph")


EDITS: list[tuple[str, str, Callable[[dict[str, Any], Path], object]]] = [
    ("plain", "crop-huge", lambda doc, f: doc["preprocessing"].update(crop=[200_000, 200_000])),
    ("plain", "resize-huge", lambda doc, f: doc["preprocessing"].update(resize=200_000)),
    ("plain", "resize-negative", lambda doc, f: doc["preprocessing"].update(resize=-5)),
    ("plain", "crop-of-another-size", lambda doc, f: doc["preprocessing"].update(crop=[32, 32])),
    ("plain", "no-preprocessing", lambda doc, f: doc.pop("preprocessing")),
    ("plain", "no-classes", lambda doc, f: doc.pop("classes")),
    ("plain", "classes-a-string", lambda doc, f: doc.update(classes="abc")),
    ("plain", "stages-a-string", lambda doc, f: doc.update(stages="stage_0.onnx")),
    ("plain", "no-stages", lambda doc, f: doc.update(stages=[])),
    ("plain", "stage-without-cost", lambda doc, f: doc["stages"][0].pop("cost")),
    ("plain", "points-on-the-plain-model", lambda doc, f: doc.update(points=[{"budget": 0.5, "thresholds": [0.5]}])),
    ("plain", "corrupt-graph", corrupt_graph),
    ("plain", "nested-100000-deep", nested_deep),
    ("exits", "thresholds-too-few", lambda doc, f: doc["points"][0].update(thresholds=[0.5])),
    ("exits", "threshold-a-string", lambda doc, f: doc["points"][0]["thresholds"].__setitem__(0, "high")),
    ("exits", "point-without-budget", lambda doc, f: doc["points"][0].pop("budget")),
    ("exits", "points-a-string", lambda doc, f: doc.update(points="many")),
    ("exits", "another-bundles-graph", other_graph),
    ("seg", "seg-without-classes", lambda doc, f: doc.pop("classes")),
    ("seg", "seg-crop-huge", lambda doc, f: doc["preprocessing"].update(crop=[100_000, 100_000])),
]


@dataclass
class Case:
    id: str
    args: list[str]  # formatted with d (the made folder) and out (an empty output folder)
    code: int
    says: str

    def param(self) -> object:
        return pytest.param(self, id=self.id)


IMAGE = "{d}/images/a.png"
CASES = [
    *[Case(f"manifest-{name}", [f"{{d}}/{name}", IMAGE, *(["--output-dir", "{out}/m"] if bundle == "seg" else [])],
           PROVENANCE, says) for (bundle, name, _), says in zip(EDITS, [
               "resize and crop", "resize and crop", "resize and crop", "not the uint8 images of 3 x 32 x 32",
               "resize and crop", "classes is not a list", "classes is not a list", "stages is not a list",
               "stages is not a list", "no cost", "operating point 0", "onnxruntime cannot load", "nests deeper",
               "operating point 0", "operating point 0", "operating point 0", "points is not a list",
               "not what its manifest records", "classes is not a list", "resize and crop"], strict=True)],
    Case("bundle-missing", ["{d}/missing", IMAGE], BAD_INPUT, "does not exist"),
    Case("point-not-a-number", ["{d}/exits", IMAGE, "--point", "x"], USAGE, "'x' is not a whole number"),
    Case("output-is-an-input", ["{d}/plain", "{d}/images/b.png", IMAGE, "-o", IMAGE, "--force"], OUTPUT,
         "is also an input"),
    Case("output-is-an-image-of-an-input-folder", ["{d}/plain", "{d}/images", "-o", "{d}/images/b.png", "--force"],
         OUTPUT, "is also an input"),
    Case("output-replaces-the-bundles-manifest", ["{d}/plain", IMAGE, "-o", "{d}/plain/manifest.yaml", "--force"],
         OUTPUT, "lies inside the bundle"),
    Case("output-dir-inside-the-bundle", ["{d}/seg", IMAGE, "--output-dir", "{d}/seg/masks"], OUTPUT,
         "lies inside the bundle"),
    Case("image-too-long-once-resized", ["{d}/plain", "{d}/tall.png", "--on-error", "stop", "-q"], BAD_INPUT,
         "would be 28 x 3360000 resized"),
]


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return no_torch_env(tmp_path_factory.mktemp("blocker"))


def runtime(env: dict[str, str], *args: object, code: str | None = None) -> subprocess.CompletedProcess[str]:
    command = ["-m", "eetool_runtime", "predict"] if code is None else ["-c", code]
    return subprocess.run([sys.executable, *command, *(str(a) for a in args)], capture_output=True, text=True,
                          env=env, timeout=300)


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_bundle_input_or_output(case: Case, made: Path, env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    before = snapshot(made), snapshot(out)
    proc = runtime(env, *(a.format(d=made, out=out) for a in case.args))
    assert "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode == case.code, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "(hint: " in lines[0], proc.stderr
    assert case.says in lines[0]
    assert proc.stdout == ""
    assert (snapshot(made), snapshot(out)) == before


def test_an_image_over_pillows_limit_is_one_line_without_pillows_warning(made: Path, env: dict[str, str]) -> None:
    proc = runtime(env, made / "plain", made / "bomb-warning.png", made / "images" / "a.png")
    assert proc.returncode == ExitCode.INPUTS_FAILED
    assert len(proc.stdout.splitlines()) == 1
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("skipped: image ") and "declares 10000 x 10000 pixels" in lines[0]
    assert lines[-1].startswith("error: 1 of 2 inputs could not be read")
    assert not any("Warning" in line for line in lines), proc.stderr


def test_a_bug_is_one_line_and_debug_shows_the_traceback(made: Path, env: dict[str, str]) -> None:
    """An error that is no user's (here one made on purpose) ends with exit 1 and one line saying so."""
    code = ("import sys, eetool_runtime.cli as cli\n"
            "def boom(*args): raise ZeroDivisionError('made on purpose')\n"
            "cli.decode_image = boom\n"
            "cli.main(sys.argv[1:])\n")
    args = ["predict", made / "plain", made / "images" / "a.png"]
    proc = runtime(env, *args, code=code)
    assert proc.returncode == ExitCode.INTERNAL and "Traceback" not in proc.stderr
    assert proc.stderr.splitlines() == ["internal error: ZeroDivisionError: made on purpose (hint: rerun with "
                                        "--debug and report the traceback)"]
    debug = runtime(env, *args, "--debug", code=code)
    assert debug.returncode == ExitCode.INTERNAL and "Traceback" in debug.stderr


# A run of the segmentation bundle interrupted after the masks of its first batch were written, before its records
INTERRUPTED = ("import sys, eetool_runtime.cli as cli\n"
               "def interrupt(*args): raise KeyboardInterrupt\n"
               "cli._RecordWriter.write = interrupt\n"
               "cli.main(sys.argv[1:])\n")


def test_an_interrupted_mask_run_leaves_no_masks_and_no_folder_it_made(made: Path, env: dict[str, str],
                                                                        tmp_path: Path) -> None:
    proc = runtime(env, "predict", made / "seg", made / "images", "--output-dir", tmp_path / "masks", "-b", 2, "-o",
                   tmp_path / "records.jsonl", code=INTERRUPTED)
    assert proc.returncode == ExitCode.INTERRUPTED, proc.stderr
    assert proc.stderr.startswith("interrupted: no output was written")
    assert list(tmp_path.iterdir()) == []


def test_an_interrupted_mask_run_keeps_the_users_folder_and_files(made: Path, env: dict[str, str],
                                                                  tmp_path: Path) -> None:
    masks = tmp_path / "masks"
    masks.mkdir()
    (masks / "notes.txt").write_text("mine\n")
    proc = runtime(env, "predict", made / "seg", made / "images", "--output-dir", masks, "-b", 2, code=INTERRUPTED)
    assert proc.returncode == ExitCode.INTERRUPTED, proc.stderr
    assert [p.name for p in masks.iterdir()] == ["notes.txt"]


def test_on_error_stop_keeps_the_masks_of_the_records_written(made: Path, env: dict[str, str],
                                                              tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_text("not an image")
    proc = runtime(env, made / "seg", made / "images" / "a.png", tmp_path / "broken.png", "--output-dir",
                   tmp_path / "masks", "-b", 1, "--on-error", "stop")
    assert proc.returncode == ExitCode.BAD_INPUT, proc.stderr
    assert [p.name for p in (tmp_path / "masks").iterdir()] == ["a.png"]
    assert [yaml.safe_load(line)["mask"] for line in proc.stdout.splitlines()] == [str(tmp_path / "masks" / "a.png")]
