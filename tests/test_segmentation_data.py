"""Segmentation sources beyond the scenes: the NIfTI-1 reader (on tiny volumes written here), the brain-atlas
slices (on a tiny synthetic atlas, and on Debian mricron-data's when installed) and folders of PNG pairs."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import invoke, one_error_line
from PIL import Image

from eetool.core.datasets import load_dataset
from eetool.core.errors import InputError
from eetool.segmentation import IGNORE
from eetool.segmentation.atlas import GAP_SLICES, SIDE, class_names, slab_split
from eetool.segmentation.nifti import read_nifti

MRICRON = Path("/usr/share/mricron/templates")
NIFTI_CODES = {np.dtype("u1"): (2, 8), np.dtype("i2"): (4, 16), np.dtype("f4"): (16, 32)}


def write_nifti(path: Path, voxels: np.ndarray, *, order: str = "<", slope: float = 0.0, intercept: float = 0.0,
                magic: bytes = b"n+1\0", dims: tuple[int, ...] | None = None, datatype: int | None = None,
                vox_offset: float = 352.0, cut: int = 0) -> None:
    """``voxels`` indexed [z, y, x] as a single-file NIfTI-1 (gzipped when the name ends in .gz)."""
    code, bitpix = NIFTI_CODES[voxels.dtype]
    dim = dims or (3, *voxels.shape[::-1])
    header = bytearray(348)
    struct.pack_into(order + "i", header, 0, 348)
    struct.pack_into(order + "8h", header, 40, *dim, *[1] * (8 - len(dim)))
    struct.pack_into(order + "2h", header, 70, datatype or code, bitpix)
    struct.pack_into(order + "3f", header, 108, vox_offset, slope, intercept)
    header[344:348] = magic
    data = bytes(header) + b"\0" * 4 + voxels.astype(voxels.dtype.newbyteorder(order)).tobytes()
    data = data[:len(data) - cut]
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


@pytest.mark.parametrize(("name", "order"), [("v.nii", "<"), ("v.nii.gz", "<"), ("v.nii.gz", ">")])
def test_nifti_reader_returns_the_voxels_in_z_y_x_order(tmp_path: Path, name: str, order: str) -> None:
    voxels = np.arange(2 * 3 * 4, dtype=np.int16).reshape(2, 3, 4) - 5
    write_nifti(tmp_path / name, voxels, order=order)
    volume = read_nifti(tmp_path / name)
    assert volume.voxels.shape == (2, 3, 4) and not volume.scaled
    np.testing.assert_array_equal(volume.voxels, voxels)


def test_nifti_scaling_is_applied_and_a_zero_slope_means_none(tmp_path: Path) -> None:
    voxels = np.array([[[0, 1, 2, 250]]], dtype=np.uint8)
    write_nifti(tmp_path / "s.nii", voxels, slope=0.5, intercept=-1.0)
    np.testing.assert_allclose(read_nifti(tmp_path / "s.nii").values(), voxels * 0.5 - 1)
    write_nifti(tmp_path / "z.nii", voxels, slope=0.0, intercept=7.0)
    np.testing.assert_array_equal(read_nifti(tmp_path / "z.nii").values(), voxels)


@pytest.mark.parametrize(("options", "says"), [
    ({"magic": b"ni1\0"}, "not a single-file NIfTI-1"),
    ({"order": "<", "cut": 3}, "truncated"),
    ({"dims": (4, 4, 3, 2, 5)}, "not one 3-D volume"),
    ({"datatype": 32}, "datatype 32"),
    ({"vox_offset": 100.0}, "vox_offset"),
    ({"dims": (3, 30000, 30000, 30000)}, "truncated|over eetool"),  # refused from the header, nothing allocated
])
def test_nifti_reader_refuses_what_it_does_not_expect(tmp_path: Path, options: dict, says: str) -> None:
    write_nifti(tmp_path / "bad.nii.gz", np.zeros((2, 3, 4), dtype=np.uint8), **options)
    with pytest.raises(InputError, match=says):
        read_nifti(tmp_path / "bad.nii.gz")


def test_a_file_that_is_not_nifti_is_refused(tmp_path: Path) -> None:
    (tmp_path / "x.nii").write_bytes(b"\0" * 400)
    with pytest.raises(InputError, match="header size"):
        read_nifti(tmp_path / "x.nii")


def test_slab_split_keeps_test_slices_away_from_training_slices() -> None:
    train, test = slab_split(146, "train"), slab_split(146, "test")
    assert train and test and not set(train) & set(test)
    assert min(abs(a - b) for a in train for b in test) == GAP_SLICES + 1
    assert len(train) + len(test) < 146  # the gaps are dropped


def write_atlas(root: Path, *, labels_text: str | None = "1 Left_Thing 2001\n2 Right_Thing 2002\n") -> None:
    """A 40-slice head of 20 x 24 voxels: a bright disc with two labelled halves where it is inside."""
    z, y, x = np.mgrid[0:40, 0:24, 0:20]
    inside = (y - 12) ** 2 + (x - 10) ** 2 < 64
    t1 = np.where(inside, 100 + z, 0).astype(np.int16)
    atlas = np.where(inside & (z >= 5) & (z < 35), np.where(x < 10, 1, 2), 0).astype(np.uint8)
    root.mkdir(exist_ok=True)
    write_nifti(root / "ch2.nii.gz", t1)
    write_nifti(root / "aal.nii.gz", atlas)
    if labels_text is not None:
        (root / "aal.nii.txt").write_text(labels_text)


def test_brain_atlas_slices_are_square_labelled_and_split_by_slab(tmp_path: Path) -> None:
    write_atlas(tmp_path / "atlas")
    train = load_dataset(f"brain-atlas:{tmp_path / 'atlas'}", "train")
    test = load_dataset(f"brain-atlas:{tmp_path / 'atlas'}", "test")
    assert train.classes == ["background", "Left_Thing", "Right_Thing"]
    assert (len(train), len(test)) == (len(slab_split(30, "train")), len(slab_split(30, "test")))
    assert train.images.shape == (len(train), 1, SIDE, SIDE) and train.images.dtype == torch.uint8
    assert set(train.labels.unique().tolist()) == {0, 1, 2}
    # the T1 brightness grows with z, so each slice's brightest pixel tells which slice it was: none is shared
    assert not set(train.images.amax((1, 2, 3)).tolist()) & set(test.images.amax((1, 2, 3)).tolist())
    # labels sit where the image is bright (the disc), background where it is dark, up to the resampled rim
    disc = train.images[:, 0] > 100
    assert (train.labels[disc] > 0).float().mean() > 0.95 and (train.labels[~disc] == 0).float().mean() > 0.95
    again = load_dataset(f"brain-atlas:{tmp_path / 'atlas'}", "train")
    assert again.fingerprint == train.fingerprint and train.fingerprint != test.fingerprint


def test_brain_atlas_names_unnamed_regions(tmp_path: Path) -> None:
    assert class_names(tmp_path / "none.txt", 3) == ["background", "region 1", "region 2", "region 3"]
    write_atlas(tmp_path / "atlas", labels_text="2 Right_Thing\n")
    assert load_dataset(f"brain-atlas:{tmp_path / 'atlas'}", "test").classes == ["background", "region 1",
                                                                                 "Right_Thing"]


def test_brain_atlas_refuses_mismatched_grids(tmp_path: Path) -> None:
    write_atlas(tmp_path / "atlas")
    write_nifti(tmp_path / "atlas" / "aal.nii.gz", np.zeros((4, 4, 4), dtype=np.uint8))
    with pytest.raises(InputError, match="same grid"):
        load_dataset(f"brain-atlas:{tmp_path / 'atlas'}", "train")


@pytest.mark.skipif(not (MRICRON / "aal.nii.gz").is_file(), reason="Debian mricron-data is not installed")
def test_brain_atlas_from_mricron_data() -> None:
    train, test = load_dataset("brain-atlas", "train"), load_dataset("brain-atlas", "test")
    assert len(train.classes) == 117 and train.classes[1] == "Precentral_L" and train.classes[116] == "Vermis_10"
    assert (len(train), len(test)) == (76, 28)
    assert int(train.labels.max()) == 116 and int(train.labels.min()) == 0
    assert len(train.labels.unique()) > 100  # most regions survive the resampling to 112 x 112


# ---------------------------------------------------------------------------------------------
# segmentation-folder


def write_pairs(root: Path, split: str = "train", count: int = 4, size: tuple[int, int] = (12, 10),
                mode: str = "L") -> None:
    (root / split / "images").mkdir(parents=True, exist_ok=True)
    (root / split / "masks").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        mask = np.zeros(size[::-1], dtype=np.uint8)
        mask[2:6, 1 + i:5 + i] = 1 + i % 2
        mask[0, :] = 255
        pixels = (mask * 60).astype(np.uint8)
        image = Image.fromarray(pixels if mode == "L" else np.stack([pixels] * 3, -1))
        image.save(root / split / "images" / f"s{i}.png")
        Image.fromarray(mask).save(root / split / "masks" / f"s{i}.png")


def test_segmentation_folder_pairs_images_and_masks_by_name(tmp_path: Path) -> None:
    write_pairs(tmp_path)
    (tmp_path / "classes.txt").write_text("bg\nleft\nright\n")
    ds = load_dataset(f"segmentation-folder:{tmp_path}", "train")
    assert ds.images.shape == (4, 1, 10, 12) and ds.labels.shape == (4, 10, 12)
    assert ds.classes == ["bg", "left", "right"]
    assert set(ds.labels.unique().tolist()) == {IGNORE, 0, 1, 2}
    assert torch.equal(ds.images[:, 0][ds.labels >= 0], (ds.labels[ds.labels >= 0] * 60).to(torch.uint8))


def test_segmentation_folder_reads_colour_images_and_the_ignore_label(tmp_path: Path) -> None:
    write_pairs(tmp_path, mode="RGB")
    (tmp_path / "segmentation.yaml").write_text("ignore_label: 2\n")
    (tmp_path / "classes.txt").write_text("bg\nleft\nright\n")
    with pytest.raises(InputError, match="mask label 255"):  # 255 is now a label, and beyond the classes 0..2
        load_dataset(f"segmentation-folder:{tmp_path}", "train")
    (tmp_path / "classes.txt").write_text("\n".join(str(k) for k in range(256)))
    ds = load_dataset(f"segmentation-folder:{tmp_path}", "train")
    assert ds.images.shape == (4, 3, 10, 12) and int((ds.labels == IGNORE).sum()) == 2 * 4 * 4
    assert int((ds.labels == 255).sum()) == 4 * 12


@pytest.mark.parametrize(("spoil", "says"), [
    (lambda root: (root / "train/masks/s1.png").unlink(), "s1.png has no mask"),
    (lambda root: (root / "train/images/s2.png").unlink(), "s2.png has no image"),
    (lambda root: Image.fromarray(np.zeros((9, 12), np.uint8)).save(root / "train/masks/s3.png"),
     "s3.png is 12 x 9 pixels, its image 12 x 10"),
    (lambda root: Image.fromarray(np.full((10, 12), 9, np.uint8)).save(root / "train/masks/s0.png"),
     "mask label 9"),
    (lambda root: Image.fromarray(np.zeros((10, 12, 3), np.uint8)).save(root / "train/masks/s0.png"),
     "s0.png has PIL mode RGB"),
    (lambda root: Image.fromarray(np.zeros((8, 12), np.uint8)).save(root / "train/images/s1.png"),
     "s1.png is 12 x 8 pixels, the first image 12 x 10"),
    (lambda root: (root / "segmentation.yaml").write_text("ignore_label: x\n"), "is not an integer"),
])
def test_bad_segmentation_folders_are_refused_in_one_line_naming_the_file(tmp_path: Path, spoil, says: str) -> None:
    data = tmp_path / "data"
    write_pairs(data)
    (data / "classes.txt").write_text("bg\nleft\nright\n")
    spoil(data)
    out = tmp_path / "net.safetensors"
    line = one_error_line(invoke("train", "-d", f"segmentation-folder:{data}", "-o", out, "--epochs", "1", "-q"), 3)
    assert says in line
    assert not out.exists()
