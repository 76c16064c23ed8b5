"""eetool predict on a segmentation checkpoint (an eeseg network trained briefly on scenes of the demo garments):
its masks against the early-exit pass's per-pixel predictions on the same data, each record's exit shares, cost and
pixel accuracy recomputed directly, the per-image costs against the pass's own total and evaluate's mean cost,
files against the same scenes as --data, the palette, and the output folder's rules."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, ok, one_error_line
from PIL import Image
from safetensors.torch import save_file

from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import ExitCode
from eetool.segmentation import IGNORE
from eetool.segmentation.class_thresholds import SegmentationThresholds
from eetool.segmentation.data import SCENE_CLASSES, make_scenes
from eetool.segmentation.mask_prediction import file_mask_names, image_macs, voc_palette
from eetool.segmentation.model import EXIT_NAMES
from eetool.segmentation.networks import early_exit_forward, plain_macs

BATCH = 16


@dataclass
class Made:
    folder: Path
    ckpt: str
    data: str  # segmentation:FILE of 40 scenes the network did not train on
    thresholds: dict[str, Path]  # by name: adp-c, cbt, cbt-feature
    pngs: Path  # the same 40 scenes as PNG files


def scenes_file(path: Path, split: str, count: int, seed: int) -> None:
    garments = load_dataset("demo", split)
    assert garments.images is not None
    images, masks = make_scenes(garments.images[:, 0].numpy(), garments.labels.numpy(), count, seed)
    stored = np.where(masks == IGNORE, 255, masks).astype(np.uint8)  # the file's ignore label
    save_file({"images": torch.from_numpy(images), "masks": torch.from_numpy(stored)}, str(path),
              metadata={"classes": "\n".join(SCENE_CLASSES)})


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Made:
    d = tmp_path_factory.mktemp("segpredict")
    scenes_file(d / "train.safetensors", "train", 240, seed=1)
    scenes_file(d / "test.safetensors", "test", 40, seed=2)
    train = f"segmentation:{d / 'train.safetensors'}"
    ckpt = d / "eeseg.safetensors"
    ok(invoke("train", "-d", train, "-o", ckpt, "--epochs", 3, "--batch-size", 16, "--optimizer", "adamw", "--lr",
              0.01, "--arch-args", "{width: 8, head_width: 8}", "-q"))
    thresholds = {"adp-c": d / "adp-c.yaml", "cbt": d / "cbt.yaml", "cbt-feature": d / "cbt-feature.yaml"}
    ok(invoke("fit-thresholds", "--method", "adp-c", "--threshold", 0.7, "-c", ckpt, "-o", thresholds["adp-c"], "-q"))
    ok(invoke("fit-thresholds", "--method", "cbt", "--alpha", 0.5, "--beta", 0.9, "-c", ckpt, "-d", train, "-o",
              thresholds["cbt"], "-q"))
    ok(invoke("fit-thresholds", "--method", "cbt", "--alpha", 0.5, "--beta", 0.9, "-c", ckpt, "-d", train,
              "--decide-at", "feature", "-o", thresholds["cbt-feature"], "-q"))
    data = f"segmentation:{d / 'test.safetensors'}"
    ds = load_dataset(data, "test")
    assert ds.images is not None
    (d / "pngs").mkdir()
    for i, image in enumerate(ds.images):
        Image.fromarray(image[0].numpy()).save(d / "pngs" / f"scene{i:02d}.png")
    return Made(d, str(ckpt), data, thresholds, d / "pngs")


def jsonl(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def read_mask(path: str) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "P" and image.size == (64, 64)
        return np.asarray(image)


def pass_on_data(made: Made, name: str | None) -> tuple[list[torch.Tensor], list[torch.Tensor], list[int]]:
    """The evaluation pass on the test scenes at predict's batch size: the class maps, the exit indices and each
    image's MACs (plain: the plain network's), with the pass's own total checked against the per-image ones."""
    ckpt = load_checkpoint(made.ckpt)
    model = ckpt.model.eval()
    ds = load_dataset(made.data, "test")
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    classes, exits, macs = [], [], []
    with torch.no_grad():
        for images, _, _ in ds.batches(BATCH):
            x = preprocess(images, torch.device("cpu"))
            if name is None:
                classes += list(model(x).max(1).indices)
                exits += [torch.full((64, 64), 3, dtype=torch.uint8)] * len(x)
                macs += [plain_macs(model, ckpt.spec.input_shape)] * len(x)
                continue
            fitted = SegmentationThresholds.load_for(str(made.thresholds[name]), ckpt, model.num_classes)
            r = early_exit_forward(model, x, fitted.thresholds, decide_at=fitted.record.get("decide_at", "pixel"))
            per_image = image_macs(model, r.exit_index, ckpt.spec.input_shape)
            assert int(per_image.sum()) == r.macs  # the pass's cost, split by image
            classes += list(r.exit_predictions[-1])
            exits += list(r.exit_index)
            macs += per_image.long().tolist()
    return classes, exits, macs


@pytest.mark.parametrize("name", [None, "adp-c", "cbt", "cbt-feature"])
def test_masks_and_records_equal_the_evaluation_pass(made: Made, name: str | None, tmp_path: Path) -> None:
    args = ["--thresholds", made.thresholds[name]] if name else []
    out = ok(invoke("predict", "-c", made.ckpt, "-d", made.data, "--output-dir", tmp_path / "masks", "--batch-size",
                    BATCH, *args, "-q"))
    records = jsonl(out.stdout)
    classes, exits, macs = pass_on_data(made, name)
    ckpt = load_checkpoint(made.ckpt)
    dense = plain_macs(ckpt.model, ckpt.spec.input_shape)
    ds = load_dataset(made.data, "test")
    assert [r["input"] for r in records] == [f"{ds.spec}#{i}" for i in range(40)]
    left_early = 0.0
    for i, r in enumerate(records):
        assert r["mask"] == str(tmp_path / "masks" / f"segmentation-test-{i:02d}.png")
        assert np.array_equal(read_mask(r["mask"]), classes[i].numpy())
        counts = torch.bincount(exits[i].flatten().long(), minlength=4).tolist()
        assert r["exit_shares"] == {e: pytest.approx(c / 4096, abs=1e-6) for e, c in zip(EXIT_NAMES, counts,
                                                                                            strict=True)}
        assert r["cost"] == pytest.approx(macs[i] / dense, abs=1e-6)
        labelled = ds.labels[i] != IGNORE
        right = (classes[i] == ds.labels[i].long())[labelled].double().mean()
        assert r["pixel_accuracy"] == pytest.approx(float(right), abs=1e-6)
        left_early += 1 - r["exit_shares"]["final"]
    if name is None:
        assert all(r["cost"] == 1.0 for r in records)
    else:  # the thresholds let pixels out early, and the images' costs differ
        assert left_early / 40 > 0.05, left_early / 40
        assert len({r["cost"] for r in records}) > 5
        assert min(r["cost"] for r in records) < 0.97  # exits' heads cost too: an image may cost more than 1


def test_mean_cost_is_evaluates(made: Made, tmp_path: Path) -> None:
    out = ok(invoke("predict", "-c", made.ckpt, "-d", made.data, "--output-dir", tmp_path / "masks", "--batch-size",
                    BATCH, "--thresholds", made.thresholds["cbt"], "-q"))
    evaluated = ok(invoke("evaluate", "-c", made.ckpt, "-d", made.data, "--batch-size", BATCH, "--thresholds",
                          made.thresholds["cbt"], "--repeats", 1, "--format", "json", "-q"))
    early = json.loads(evaluated.stdout)["points"][1]
    records = jsonl(out.stdout)
    assert np.mean([r["cost"] for r in records]) == pytest.approx(early["cost"], abs=1e-5)
    for e in EXIT_NAMES:  # every image has the same number of pixels: the pixel shares are the images' mean
        assert np.mean([r["exit_shares"][e] for r in records]) == pytest.approx(early["exit_shares"][e], abs=1e-5)


def test_png_files_give_the_masks_of_the_same_scenes_as_data(made: Made, tmp_path: Path) -> None:
    args = ["--thresholds", made.thresholds["cbt"], "--batch-size", BATCH, "-q"]
    files = jsonl(ok(invoke("predict", "-c", made.ckpt, made.pngs, "--output-dir", tmp_path / "f", *args)).stdout)
    data = jsonl(ok(invoke("predict", "-c", made.ckpt, "-d", made.data, "--output-dir", tmp_path / "d",
                           *args)).stdout)
    assert [r["input"] for r in files] == [str(made.pngs / f"scene{i:02d}.png") for i in range(40)]
    assert [Path(r["mask"]).name for r in files] == [f"scene{i:02d}.png" for i in range(40)]
    assert "pixel_accuracy" not in files[0]
    same = sum(int((read_mask(f["mask"]) == read_mask(d["mask"])).sum()) for f, d in zip(files, data, strict=True))
    assert same / (40 * 4096) >= 0.999
    with Image.open(files[0]["mask"]) as mask:
        assert mask.getpalette()[:9] == [0, 0, 0, 128, 0, 0, 0, 128, 0]  # PASCAL VOC's first colours


FOLDER_PALETTE = [v for k in range(11) for v in (k * 20, 255 - k * 20, 7)]  # 11 scene classes, none VOC's


def palette_folder(data: str, root: Path) -> str:
    """The first 3 test scenes of ``data`` written as a segmentation folder under ``root`` whose masks are palette
    PNGs (FOLDER_PALETTE); its --data source."""
    ds = load_dataset(data, "test")
    assert ds.images is not None
    for sub in ("images", "masks"):
        (root / "test" / sub).mkdir(parents=True)
    (root / "classes.txt").write_text("\n".join(SCENE_CLASSES) + "\n")
    for i in range(3):
        Image.fromarray(ds.images[i, 0].numpy()).save(root / "test" / "images" / f"s{i}.png")
        mask = Image.fromarray(torch.where(ds.labels[i] == IGNORE, 0, ds.labels[i]).to(torch.uint8).numpy())
        mask.putpalette(FOLDER_PALETTE)
        mask.save(root / "test" / "masks" / f"s{i}.png")
    return f"segmentation-folder:{root}"


def test_a_folder_sources_palette_is_kept(made: Made, tmp_path: Path) -> None:
    source = palette_folder(made.data, tmp_path / "folder")
    out = ok(invoke("predict", "-c", made.ckpt, "-d", source, "--output-dir", tmp_path / "m", "-q"))
    records = jsonl(out.stdout)
    assert len(records) == 3
    with Image.open(records[0]["mask"]) as written:
        assert written.getpalette()[:33] == FOLDER_PALETTE


def test_csv_has_a_share_column_per_exit(made: Made, tmp_path: Path) -> None:
    out = ok(invoke("predict", "-c", made.ckpt, made.pngs / "scene00.png", "--output-dir", tmp_path,
                    "--thresholds", made.thresholds["adp-c"], "--format", "csv", "-q"))
    header, row = out.stdout.splitlines()
    assert header == "input,mask,share_exit1,share_exit2,share_exit3,share_final,cost"
    values = row.split(",")
    assert values[1] == str(tmp_path / "scene00.png")
    assert sum(float(v) for v in values[2:6]) == pytest.approx(1.0, abs=1e-5)


def test_masks_are_not_replaced_without_force_nor_ever_over_an_input(made: Made, tmp_path: Path) -> None:
    one = made.pngs / "scene01.png"
    ok(invoke("predict", "-c", made.ckpt, one, "--output-dir", tmp_path, "-q"))
    first = (tmp_path / "scene01.png").read_bytes()
    line = one_error_line(invoke("predict", "-c", made.ckpt, one, "--output-dir", tmp_path), ExitCode.OUTPUT)
    assert "already exists" in line and "--force" in line
    ok(invoke("predict", "-c", made.ckpt, one, "--output-dir", tmp_path, "--thresholds", made.thresholds["adp-c"],
              "--force", "-q"))
    assert read_mask(str(tmp_path / "scene01.png")).shape == (64, 64) and first
    before = one.read_bytes()
    line = one_error_line(invoke("predict", "-c", made.ckpt, one, "--output-dir", made.pngs, "--force"),
                          ExitCode.OUTPUT)
    assert "is also an input" in line and one.read_bytes() == before
    assert not list(tmp_path.glob(".*.tmp"))


def test_bad_files_are_skipped_or_stop_the_run(made: Made, tmp_path: Path) -> None:
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    inputs = [made.pngs / "scene00.png", bad, made.pngs / "scene02.png"]
    skipped = invoke("predict", "-c", made.ckpt, *inputs, "--output-dir", tmp_path / "skip", "-q")
    assert skipped.exit_code == ExitCode.INPUTS_FAILED, skipped.stderr
    assert [Path(r["mask"]).name for r in jsonl(skipped.stdout)] == ["scene00.png", "scene02.png"]
    assert sorted(p.name for p in (tmp_path / "skip").iterdir()) == ["scene00.png", "scene02.png"]
    assert "broken.png" in skipped.stderr
    stopped = invoke("predict", "-c", made.ckpt, *inputs, "--output-dir", tmp_path / "stop", "--on-error", "stop",
                     "--batch-size", 1, "-q")
    assert stopped.exit_code == ExitCode.BAD_INPUT, stopped.stderr
    assert [Path(r["mask"]).name for r in jsonl(stopped.stdout)] == ["scene00.png"]
    assert [p.name for p in (tmp_path / "stop").iterdir()] == ["scene00.png"]


def test_mask_names_of_files_are_unique() -> None:
    assert file_mask_names(["a/x.png", "b/x.jpg", "x-2.png", "c/x.png"]) == ["x.png", "x-2.png", "x-2-2.png",
                                                                                "x-3.png"]


def test_the_fixed_palette_is_pascal_vocs() -> None:
    palette = voc_palette()
    assert len(palette) == 768
    assert palette[3 * 15:3 * 16] == [192, 128, 128]  # VOC's "person"
    assert len({tuple(palette[i:i + 3]) for i in range(0, 768, 3)}) == 256


def test_torchvision_image_costs_add_up_to_the_pass() -> None:
    from eetool.core.builders import build_model

    torch.manual_seed(0)
    net = build_model("lraspp_mobilenet_v3_large", 4, 3, {"exits": True, "head_width": 8}).eval()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    x[0] *= 0  # an image unlike the others, so that images' pixels leave at different stages
    with torch.no_grad():
        outs = net.forward_exits(x)
    thresholds = torch.stack([o.softmax(1).amax(1).median().expand(4) for o in outs[:3]])
    result = early_exit_forward(net, x, thresholds)
    per_image = image_macs(net, result.exit_index, (3, 32, 32))
    assert abs(float(per_image.sum()) - result.macs) <= 1  # the pass rounds its float total
    assert float(per_image.min()) < float(per_image.max())
