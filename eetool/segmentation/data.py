"""Segmentation sources: per-pixel label masks (int16, N x H x W, ``IGNORE`` where unlabelled) in a ``Dataset``:
``fashion-mnist-scenes[:PATH]`` and ``segmentation:FILE`` here; ``brain-atlas`` and ``segmentation-folder`` share
the label checks of ``masks_dataset``.

Sources: docs/data-sources.md#segmentation-sources-in-detail
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from eetool.core.datasets import FASHION_MNIST_CLASSES, Dataset, find_idx_file, read_idx, source_root
from eetool.core.errors import InputError, ModelMismatchError, UsageError
from eetool.core.loading import DataOptions, Geometry
from eetool.segmentation import IGNORE

if TYPE_CHECKING:
    from eetool.core.checkpoint import ModelSpec

SCENE_SIDE = 64
GARMENT_SIDE = 28
SOLID = 24  # garment pixels at least this bright carry the garment's label; fainter ones are its rim (ignored)
SCENE_COUNTS = {"train": 6000, "test": 1000}
SCENE_SEEDS = {"train": 20240, "test": 20241}
SCENE_CLASSES = ["background", *FASHION_MNIST_CLASSES]
DEFAULT_IGNORE_LABEL = 255  # in files: the usual convention (Cityscapes, ADE20K)
MAX_CLASSES = 32767  # masks are int16 in memory


def is_segmentation(ds: Dataset) -> bool:
    """Per-pixel masks (N x H x W) instead of one label per sample."""
    return ds.labels.dim() == 3


# The loaders eetool.core.sources registers, called as loader(name, path, split, options, geometry): the
# options and geometry of folder images do not apply to scenes or mask files.
def load_scenes_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                       ) -> Dataset:
    return fashion_mnist_scenes(source_root("fashion-mnist", path), split)


def load_masks_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                      ) -> Dataset:
    if not path:
        raise UsageError("--data segmentation needs a path", "write --data segmentation:FILE.safetensors")
    return _load_masks_file(path, split)


def fashion_mnist_scenes(root: Path, split: str, count: int | None = None) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    garments = read_idx(find_idx_file(root, (f"{prefix}-images-idx3-ubyte",)))
    labels = read_idx(find_idx_file(root, (f"{prefix}-labels-idx1-ubyte",)))
    if garments.dim() != 3 or tuple(garments.shape[1:]) != (GARMENT_SIDE, GARMENT_SIDE):
        raise InputError(f"{root}: {prefix} images are {tuple(garments.shape)}, not N x 28 x 28",
                         "point --data fashion-mnist-scenes:PATH at the Fashion-MNIST IDX files")
    if labels.dim() != 1 or labels.shape[0] != garments.shape[0] or garments.shape[0] == 0:
        raise InputError(f"{root}: {garments.shape[0]} images but {labels.numel()} labels", "check the files")
    if int(labels.max()) >= len(FASHION_MNIST_CLASSES):
        raise InputError(f"{root}: label {int(labels.max())} is not a Fashion-MNIST class", "check the files")
    scenes, masks = make_scenes(garments.numpy(), labels.numpy(), count or SCENE_COUNTS[split], SCENE_SEEDS[split])
    return Dataset("fashion-mnist-scenes", split, torch.from_numpy(scenes), torch.from_numpy(masks),
                   list(SCENE_CLASSES), str(root))


def make_scenes(garments: np.ndarray, labels: np.ndarray, count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``count`` scenes (uint8 count x 1 x 64 x 64) and their masks (int16 count x 64 x 64), from one seed."""
    rng = np.random.default_rng(seed)
    items = rng.integers(2, 5, size=count)
    picks = rng.integers(0, garments.shape[0], size=(count, 4))
    corners = rng.integers(0, SCENE_SIDE - GARMENT_SIDE + 1, size=(count, 4, 2))
    scenes = np.zeros((count, 1, SCENE_SIDE, SCENE_SIDE), dtype=np.uint8)
    masks = np.zeros((count, SCENE_SIDE, SCENE_SIDE), dtype=np.int16)
    for s in range(count):
        for t in range(items[s]):
            g = garments[picks[s, t]]
            y, x = corners[s, t]
            window = (slice(y, y + GARMENT_SIDE), slice(x, x + GARMENT_SIDE))
            covered = g > 0
            scenes[s, 0][window][covered] = g[covered]
            masks[s][window][covered] = IGNORE
            masks[s][window][g >= SOLID] = int(labels[picks[s, t]]) + 1
    return scenes, masks


def _load_masks_file(path: str, split: str) -> Dataset:
    from eetool.core.architectures import MAX_INPUT_SIDE
    from eetool.core.artifacts import read_safetensors

    tensors, meta = read_safetensors(path)
    hint = "store images (uint8 N x C x H x W) and masks (integer N x H x W) as described in `eetool --help`"
    for key in (f"{split}.images", "images"):
        if key in tensors:
            images, masks = tensors[key], tensors.get(key.replace("images", "masks"))
            break
    else:
        raise InputError(f"{path} has no '{split}.images' or 'images' tensor", hint)
    if masks is None:
        raise InputError(f"{path} has images but no masks", "store the label masks as 'masks' (N x H x W)")
    if images.dtype != torch.uint8:
        raise InputError(f"{path}: images are {images.dtype}, not uint8", "store images as uint8 in [0, 255]")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if (images.dim() != 4 or images.shape[1] not in (1, 3, 4) or min(images.shape[2:]) < 1
            or max(images.shape[2:]) > MAX_INPUT_SIDE):
        raise InputError(f"{path}: images have shape {tuple(images.shape)}",
                         f"store images as N x C x H x W with 1, 3 or 4 channels and 1 to {MAX_INPUT_SIDE} pixels "
                         "a side")
    if masks.dtype.is_floating_point or masks.dtype.is_complex or masks.dtype == torch.bool:
        raise InputError(f"{path}: masks are {masks.dtype}", "store masks as integers (class ids)")
    want = (images.shape[0], *images.shape[2:])
    if tuple(masks.shape) != want:
        raise InputError(f"{path}: masks have shape {tuple(masks.shape)}, the images need {want}",
                         "store one mask of the image's height and width per image")
    ignore_text = meta.get("ignore_label", str(DEFAULT_IGNORE_LABEL))
    try:
        ignore_label = int(ignore_text)
    except ValueError:
        raise InputError(f"{path}: ignore_label {ignore_text!r} is not an integer",
                         f"set the metadata ignore_label to an integer (default {DEFAULT_IGNORE_LABEL})") from None
    classes = meta["classes"].split("\n") if meta.get("classes") else []
    return masks_dataset(LabelledMasks("segmentation", split, path, images, masks, classes, ignore_label),
                         "fix the masks, or set the metadata ignore_label or classes")


@dataclass(frozen=True)
class LabelledMasks:
    """Images and their masks as a file or folder holds them, before the labels are checked and converted."""

    name: str
    split: str
    source: str
    images: torch.Tensor  # uint8 N x C x H x W
    masks: torch.Tensor  # integer N x H x W, already checked to be the images' size
    classes: list[str]  # empty: the highest label decides how many
    ignore_label: int


def masks_dataset(raw: LabelledMasks, fix: str) -> Dataset:
    """Check the labels against the classes (the ignore label aside) and convert the masks to int16 with
    ``IGNORE``; ``fix`` is the hint for a label out of range."""
    masks, ignore_label, path = raw.masks, raw.ignore_label, raw.source
    labelled = masks[masks != ignore_label]
    low = int(labelled.min()) if labelled.numel() else 0
    high = int(labelled.max()) if labelled.numel() else -1
    num_classes = len(raw.classes) or high + 1
    if not 2 <= num_classes <= MAX_CLASSES:
        raise InputError(f"{path} has {num_classes} classes", f"segmentation takes 2 to {MAX_CLASSES} classes")
    if low < 0 or high >= num_classes:
        bad = low if low < 0 else high
        raise InputError(f"{path} has mask label {bad}, outside the classes 0..{num_classes - 1} and not the ignore "
                         f"label {ignore_label}", fix)
    converted = torch.where(masks == ignore_label, 0, masks).to(torch.int16)  # in range now: labels fit int16
    converted[masks == ignore_label] = IGNORE
    return Dataset(raw.name, raw.split, raw.images.contiguous(), converted.contiguous(),
                   raw.classes or [str(k) for k in range(num_classes)], path, classes_named=bool(raw.classes))


def check_masks(ds: Dataset, spec: ModelSpec) -> None:
    """Refuse data that is not segmentation, whose masks are not of the model's input size (the predictions are
    made at that size), whose labels go beyond the model's classes, or that names other classes than the model:
    another number of them, or (where the checkpoint names its classes) other names or another order."""
    num_classes, input_size = spec.num_classes, spec.input_shape[1:]
    if not is_segmentation(ds):
        raise ModelMismatchError(f"{ds.spec} holds one label per image, the segmentation model needs per-pixel masks",
                                 "use segmentation data (--data fashion-mnist-scenes or segmentation:FILE)")
    if tuple(ds.labels.shape[1:]) != tuple(input_size):
        raise ModelMismatchError(f"{ds.spec} has masks of {ds.labels.shape[1]} x {ds.labels.shape[2]} pixels, the "
                                 f"model predicts {input_size[0]} x {input_size[1]}",
                                 "use data of the size the checkpoint was trained on")
    if ds.labels.numel() and int(ds.labels.max()) >= num_classes:
        raise ModelMismatchError(f"{ds.spec} has mask labels up to {int(ds.labels.max())} but the model has "
                                 f"{num_classes} classes", "use the dataset the checkpoint was trained for")
    if not ds.classes_named:  # only numbers up to the top label: nothing more to compare
        return
    if len(ds.classes) != num_classes:
        raise ModelMismatchError(f"{ds.spec} has {len(ds.classes)} classes but the model has {num_classes}",
                                 "use the dataset the checkpoint was trained for, or train a checkpoint on this one")
    differ = [k for k, (ours, theirs) in enumerate(zip(ds.classes, spec.classes, strict=False)) if ours != theirs]
    if spec.classes and differ:
        k = differ[0]
        raise ModelMismatchError(f"{ds.spec} names class {k} {ds.classes[k]!r} where the model has "
                                 f"{spec.classes[k]!r} ({len(differ)} of {num_classes} classes differ)",
                                 "use the dataset the checkpoint was trained for, with its classes in the same order")
