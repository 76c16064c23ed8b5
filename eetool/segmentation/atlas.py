"""``brain-atlas[:PATH]``: axial slices of a T1 brain template labelled by the AAL atlas (Debian mricron-data),
split by slab (``PERIOD``, ``TRAIN_SLICES``, ``GAP_SLICES``, ``TEST_SLICES``) and resized to ``SIDE`` x ``SIDE``.
Deterministic; the fingerprint is of the resulting pixels and masks.

Source: docs/data-sources.md#segmentation-sources-in-detail
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from eetool.core.datasets import Dataset, source_root
from eetool.core.errors import InputError
from eetool.core.loading import DataOptions, Geometry
from eetool.segmentation.nifti import read_nifti

NAME = "brain-atlas"
T1_FILE = "ch2.nii.gz"
ATLAS_FILE = "aal.nii.gz"
LABELS_FILE = "aal.nii.txt"
SIDE = 112
PERIOD, TRAIN_SLICES, GAP_SLICES, TEST_SLICES = 20, 10, 3, 4
MAX_REGIONS = 1000  # AAL has 116, AAL3 170; a label beyond this is not an atlas eetool expects


def slab_split(count: int, split: str) -> list[int]:
    """Positions (0..count-1) of the slices of ``split`` in the slab pattern described in the module's doc."""
    first = 0 if split == "train" else TRAIN_SLICES + GAP_SLICES
    length = TRAIN_SLICES if split == "train" else TEST_SLICES
    return [i for i in range(count) if first <= i % PERIOD < first + length]


def load_atlas_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                      ) -> Dataset:
    """The loader eetool.core.sources registers for ``brain-atlas[:PATH]`` (folder-image options do not apply)."""
    return brain_atlas(source_root(name, path), split)


def brain_atlas(root: Path, split: str) -> Dataset:
    hint = f"point --data {NAME}:PATH at a folder with {T1_FILE} and {ATLAS_FILE} (apt-get install mricron-data)"
    for name in (T1_FILE, ATLAS_FILE):
        if not (root / name).is_file():
            raise InputError(f"{root} has no {name}", hint)
    t1 = read_nifti(root / T1_FILE)
    atlas = read_nifti(root / ATLAS_FILE)
    if t1.voxels.shape != atlas.voxels.shape:
        raise InputError(f"{root}: {T1_FILE} has {_grid(t1.voxels)} voxels and {ATLAS_FILE} {_grid(atlas.voxels)}",
                         "give a T1 template and an atlas on the same grid")
    labels = atlas.values()
    if labels.dtype.kind not in "iu":
        raise InputError(f"{root / ATLAS_FILE} holds {'scaled ' if atlas.scaled else ''}non-integer labels",
                         "give an atlas of integer region labels without intensity scaling")
    if labels.min() < 0 or labels.max() > MAX_REGIONS:
        raise InputError(f"{root / ATLAS_FILE} has labels {int(labels.min())}..{int(labels.max())}",
                         f"give an atlas with labels 0 (background) to at most {MAX_REGIONS}")
    classes = class_names(root / LABELS_FILE, int(labels.max()))
    labelled = np.flatnonzero((labels > 0).reshape(labels.shape[0], -1).any(1))
    chosen = labelled[slab_split(len(labelled), split)]
    intensity = t1.values().astype(np.float64)
    low, high = float(intensity.min()), float(intensity.max())
    scaled = (intensity[chosen] - low) / max(high - low, 1e-12) * 255
    images = _square(torch.from_numpy(np.ascontiguousarray(scaled[:, ::-1], dtype=np.float32)))
    masks = _square(torch.from_numpy(np.ascontiguousarray(labels[chosen][:, ::-1], dtype=np.float32)))
    images = F.interpolate(images[:, None], size=(SIDE, SIDE), mode="bilinear", antialias=True, align_corners=False)
    masks = F.interpolate(masks[:, None], size=(SIDE, SIDE), mode="nearest-exact")[:, 0]
    return Dataset(NAME, split, images.round().clamp(0, 255).to(torch.uint8).contiguous(),
                   masks.to(torch.int16).contiguous(), classes, str(root))


def _grid(voxels: np.ndarray) -> str:
    return " x ".join(str(d) for d in voxels.shape[::-1])


def _square(slices: torch.Tensor) -> torch.Tensor:
    """N x H x W zero-padded to N x S x S, S = max(H, W), the slice centred."""
    h, w = slices.shape[1:]
    side = max(h, w)
    top, left = (side - h) // 2, (side - w) // 2
    return F.pad(slices, (left, side - w - left, top, side - h - top))


def class_names(labels_file: Path, highest: int) -> list[str]:
    """``background`` and one name per label up to the highest in the atlas or the file, from ``value name ...``
    lines; a label the file does not name is ``region k``."""
    names: dict[int, str] = {}
    if labels_file.is_file():
        for number, line in enumerate(labels_file.read_text(errors="replace").splitlines(), 1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2 or not fields[0].isdigit() or not 1 <= int(fields[0]) <= MAX_REGIONS:
                raise InputError(f"{labels_file}:{number} is not 'label name ...' with a label from 1 to "
                                 f"{MAX_REGIONS}: {line[:60]!r}", "fix the line, or remove the file to use "
                                 "'region N' names")
            names[int(fields[0])] = fields[1]
    top = max([highest, *names])
    return ["background", *(names.get(k, f"region {k}") for k in range(1, top + 1))]
