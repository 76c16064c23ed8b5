"""``segmentation-folder:PATH``: image and mask PNG pairs in a folder (``PATH/<split>/images/NAME.png`` with
``PATH/<split>/masks/NAME.png``, optional ``classes.txt`` and ``segmentation.yaml``), paired by name; sizes are
checked from the headers before any pixel is decoded, and masks are never resized.

Layout and checks: docs/data-sources.md#segmentation-sources-in-detail
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from eetool.core.datasets import Dataset
from eetool.core.errors import InputError, UsageError
from eetool.core.loading import DataOptions, Geometry
from eetool.segmentation.data import DEFAULT_IGNORE_LABEL, LabelledMasks, masks_dataset

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MASK_MODES = ("L", "P", "I;16", "I", "1")  # one integer a pixel; RGB masks (colour-coded classes) are not read
METADATA = "segmentation.yaml"
MAX_BYTES = 2 * 2**30  # decoded images and masks held in memory


def load_folder_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                       ) -> Dataset:
    """The loader eetool.core.sources registers for ``segmentation-folder:PATH`` (images keep their size)."""
    if not path:
        raise UsageError("--data segmentation-folder needs a path",
                         "write --data segmentation-folder:PATH (PATH/<split>/images/*.png and masks/*.png)")
    return load_folder(Path(path), split)


def load_folder(root: Path, split: str) -> Dataset:
    from PIL import Image

    images_dir, masks_dir = root / split / "images", root / split / "masks"
    layout = f"put PATH/{split}/images/NAME.png and PATH/{split}/masks/NAME.png side by side"
    for folder in (images_dir, masks_dir):
        if not folder.is_dir():
            raise InputError(f"{folder} is not a folder", layout)
    images = {p.stem: p for p in sorted(images_dir.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    masks = {p.stem: p for p in sorted(masks_dir.iterdir()) if p.suffix.lower() == ".png"}
    for stem, path in sorted(images.items()):
        if stem not in masks:
            raise InputError(f"{path} has no mask {masks_dir / (stem + '.png')}",
                             f"add the mask or remove the image; {layout}")
    for stem, path in sorted(masks.items()):
        if stem not in images:
            raise InputError(f"{path} has no image in {images_dir}", f"add the image or remove the mask; {layout}")
    stems = sorted(images)
    if not stems:
        raise InputError(f"{images_dir} has no images", layout)
    sizes, grey = _check_headers(images, masks, stems)
    height, width = sizes
    channels = 1 if grey else 3
    if len(stems) * (channels + 4) * height * width > MAX_BYTES:
        raise InputError(f"{root / split} holds {len(stems)} images of {width} x {height} pixels, over "
                         f"{MAX_BYTES >> 30} GiB decoded", "use fewer or smaller images")
    image_data = np.empty((len(stems), channels, height, width), dtype=np.uint8)
    mask_data = np.empty((len(stems), height, width), dtype=np.int64)
    for n, stem in enumerate(stems):
        try:
            with Image.open(images[stem]) as img:
                pixels = np.asarray(img.convert("L" if grey else "RGB"))
            with Image.open(masks[stem]) as mask:
                mask_data[n] = np.asarray(mask if mask.mode != "1" else mask.convert("L"), dtype=np.int64)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot decode {images[stem]} or its mask: {e}", "replace the file") from None
        image_data[n] = pixels[None] if grey else pixels.transpose(2, 0, 1)
    return masks_dataset(LabelledMasks("segmentation-folder", split, str(root), torch.from_numpy(image_data),
                                       torch.from_numpy(mask_data), _classes(root), _ignore_label(root)),
                         f"fix the masks, or list every class in {root / 'classes.txt'} or set ignore_label in "
                         f"{root / METADATA}")


def _check_headers(images: dict[str, Path], masks: dict[str, Path], stems: list[str]
                   ) -> tuple[tuple[int, int], bool]:
    """The one image size (height, width) and whether every image is grey; every mask checked against it."""
    from PIL import Image

    from eetool.core.architectures import MAX_INPUT_SIDE

    size: tuple[int, int] | None = None
    grey = True
    for stem in stems:
        try:
            with Image.open(images[stem]) as img:
                image_size, image_mode = img.size, img.mode
            with Image.open(masks[stem]) as mask:
                mask_size, mask_mode = mask.size, mask.mode
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
            raise InputError(f"cannot read {images[stem]} or its mask: {e}", "replace the file") from None
        if min(image_size) < 1 or max(image_size) > MAX_INPUT_SIDE:
            raise InputError(f"{images[stem]} is {image_size[0]} x {image_size[1]} pixels",
                             f"use images of 1 to {MAX_INPUT_SIDE} pixels a side")
        if size is None:
            size = image_size
        elif image_size != size:
            raise InputError(f"{images[stem]} is {image_size[0]} x {image_size[1]} pixels, the first image "
                             f"{size[0]} x {size[1]}", "resize the images (and their masks) to one size")
        if mask_size != image_size:
            raise InputError(f"{masks[stem]} is {mask_size[0]} x {mask_size[1]} pixels, its image "
                             f"{image_size[0]} x {image_size[1]}", "give each image a mask of its own size")
        if mask_mode not in MASK_MODES:
            raise InputError(f"{masks[stem]} has PIL mode {mask_mode}, not one class id a pixel",
                             "store masks as 8- or 16-bit grey or palette PNGs of class ids")
        grey = grey and image_mode in ("L", "1")
    assert size is not None
    return (size[1], size[0]), grey


def _classes(root: Path) -> list[str]:
    path = root / "classes.txt"
    if not path.is_file():
        return []
    names = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    if len(names) < 2:
        raise InputError(f"{path} names {len(names)} classes", "list at least two classes, one a line, class 0 first")
    return names


def _ignore_label(root: Path) -> int:
    import yaml

    path = root / METADATA
    if not path.is_file():
        return DEFAULT_IGNORE_LABEL
    hint = f"write {METADATA} as 'ignore_label: 255' (an integer)"
    try:
        meta = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise InputError(f"{path} is not YAML: {str(e).splitlines()[0]}", hint) from None
    if meta is None:
        return DEFAULT_IGNORE_LABEL
    if not isinstance(meta, dict) or set(meta) - {"ignore_label"}:
        raise InputError(f"{path} holds {sorted(meta) if isinstance(meta, dict) else type(meta).__name__}, "
                         "not just ignore_label", hint)
    value = meta.get("ignore_label", DEFAULT_IGNORE_LABEL)
    if not isinstance(value, int) or isinstance(value, bool):
        raise InputError(f"{path}: ignore_label {value!r} is not an integer", hint)
    return value
