"""Folder images decoded per batch by a DataLoader with worker processes: memory bounded by the batch and the
workers, the same uint8 batches as in memory, and a fingerprint over names, sizes and modification times.

Method: docs/data-sources.md#large-image-folders-streaming-and-the-imagenet-recipe
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.utils.data

from eetool.core.errors import InputError
from eetool.core.loading import Geometry

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
CHANNELS = 3  # every folder image is decoded as RGB
# Batches each worker decodes ahead of the model (DataLoader's prefetch_factor).
PREFETCH = 2
DECODE_HINT = "remove or re-encode the file"
PROBLEM_HINT_SEP = "\0"


def decode_image(path: str, geometry: Geometry) -> torch.Tensor:
    """One image as uint8 3 x crop: the shorter side resized, then a centre crop; the same pixels as
    torchvision's ``Resize(resize)`` and ``CenterCrop(crop)`` on the PIL image. Raises InputError."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            width, height = opened.size  # from the header: checked before anything is decoded
            if width < 1 or height < 1 or width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
                raise InputError(f"image {path} declares {width} x {height} pixels",
                                 f"{DECODE_HINT} (at least 1 x 1, at most {Image.MAX_IMAGE_PIXELS} pixels)")
            size = _resized(width, height, geometry.resize)
            # a long, thin image (1 x 40,000,000 pixels) grows by resizing its shorter side: the same limit holds
            if size[0] * size[1] > (Image.MAX_IMAGE_PIXELS or math.inf):
                raise InputError(f"image {path} of {width} x {height} pixels would be {size[0]} x {size[1]} resized "
                                 f"to {geometry.resize} pixels on its shorter side, over {Image.MAX_IMAGE_PIXELS} "
                                 "pixels", "crop the image nearer to the model's shape, or remove it")
            rgb = opened.convert("RGB")
        if size != (width, height):
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        hwc = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).view(size[1], size[0], CHANNELS)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:  # PIL's decoders raise all three
        raise InputError(f"cannot decode image {path}: {e}", DECODE_HINT) from None
    return centre_crop(hwc.permute(2, 0, 1), geometry.crop)


def _resized(width: int, height: int, shorter: int) -> tuple[int, int]:
    """(width, height) with the shorter side ``shorter``, the longer truncated as torchvision does."""
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def centre_crop(image: torch.Tensor, crop: tuple[int, int]) -> torch.Tensor:
    """C x H x W to C x crop, zero-padded where smaller; offsets rounded as torchvision's CenterCrop."""
    ch, cw = crop
    _, h, w = image.shape
    if ch > h or cw > w:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        padded = torch.zeros(image.shape[0], h + pad_h, w + pad_w, dtype=image.dtype)
        padded[:, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w] = image
        image, h, w = padded, h + pad_h, w + pad_w
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return image[:, top:top + ch, left:left + cw].contiguous()


@dataclass(frozen=True)
class FolderListing:
    base: Path
    classes: list[str]
    files: list[str]
    labels: list[int]
    fingerprint_text: str  # class names, and each file's relative path, size and modification time


def list_folder(root: Path, split: str) -> FolderListing:
    """ImageFolder layout: ROOT/<split>/<class>/<image>, or ROOT/<class>/<image> for a single split.
    One ``scandir`` per class (a million files are listed in seconds, not minutes of pathlib)."""
    base = root / split if (root / split).is_dir() else root
    if not base.is_dir():
        raise InputError(f"image folder {base} does not exist", "use the ImageFolder layout ROOT/<split>/<class>/*.png")
    classes = sorted(d.name for d in base.iterdir() if d.is_dir())
    files, labels, lines = [], [], [f"folder|{chr(0).join(classes)}"]
    for k, c in enumerate(classes):
        try:
            with os.scandir(base / c) as entries:
                images = sorted((e for e in entries if os.path.splitext(e.name)[1].lower() in IMAGE_SUFFIXES),
                                key=lambda e: e.name)
            for entry in images:
                st = entry.stat()
                files.append(entry.path)
                labels.append(k)
                lines.append(f"{c}/{entry.name}|{st.st_size}|{st.st_mtime_ns}")
        except OSError as e:
            raise InputError(f"cannot read image folder {base / c}: {e.strerror}", "check the folder") from None
    if not files:
        raise InputError(f"image folder {base} holds no images",
                         "use the ImageFolder layout ROOT/<split>/<class>/*.png")
    return FolderListing(base, classes, files, labels, "\n".join(lines))


def folder_fingerprint(split: str, listing: FolderListing) -> str:
    """Over class names and each file's relative path, size and modification time: no pixel is read."""
    h = hashlib.sha256(f"{split}\n{listing.fingerprint_text}".encode())
    return f"folder/{split}:{h.hexdigest()[:16]}"


def first_image_geometry(path: str) -> Geometry:
    """Without a model to say the size: the first image's, others resized by their shorter side and cropped to it."""
    from PIL import Image

    try:
        with Image.open(path) as opened:
            width, height = opened.size
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode image {path}: {e}", DECODE_HINT) from None
    if width < 1 or height < 1:
        raise InputError(f"image {path} declares {width} x {height} pixels", DECODE_HINT)
    return Geometry(min(width, height), (height, width))


class _Decoded(torch.utils.data.Dataset[tuple[torch.Tensor, str]]):
    """Map-style: position -> (uint8 image, "") or (empty, the problem and hint). A worker's error travels back as
    data, because DataLoader re-raises exceptions from workers as other types with their traceback as text."""

    def __init__(self, files: Sequence[str], geometry: Geometry) -> None:
        self.files = files
        self.geometry = geometry

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, str]:
        try:
            return decode_image(self.files[i], self.geometry), ""
        except InputError as e:
            return torch.empty(0, dtype=torch.uint8), f"{e.problem}{PROBLEM_HINT_SEP}{e.hint or DECODE_HINT}"


def _collate(items: list[tuple[torch.Tensor, str]]) -> tuple[torch.Tensor, str]:
    problems = [p for _, p in items if p]
    if problems:
        return torch.empty(0, dtype=torch.uint8), problems[0]
    return torch.stack([x for x, _ in items]), ""


@dataclass(frozen=True)
class FolderImages:
    """The files of a folder split and how to decode them; a dataset's images when they are streamed."""

    files: tuple[str, ...]
    geometry: Geometry
    workers: int

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (CHANNELS, *self.geometry.crop)

    def nbytes(self) -> int:
        return len(self.files) * math.prod(self.image_shape)

    def subset(self, positions: torch.Tensor) -> FolderImages:
        return replace(self, files=tuple(self.files[i] for i in positions.tolist()))

    def batches(self, batch_positions: Sequence[torch.Tensor]) -> Iterator[torch.Tensor]:
        """uint8 B x 3 x crop per entry of ``batch_positions``, decoded by the workers in that order."""
        workers = min(self.workers, len(batch_positions))
        loader = torch.utils.data.DataLoader(
            _Decoded(self.files, self.geometry), batch_sampler=[p.tolist() for p in batch_positions],
            num_workers=workers, collate_fn=_collate, prefetch_factor=PREFETCH if workers else None)
        for images, problem in loader:
            if problem:
                raise InputError(*problem.split(PROBLEM_HINT_SEP, 1))
            yield images

    def decode_all(self, batch_size: int = 256) -> torch.Tensor:
        """Every image at once (uint8 N x 3 x crop), for the in-memory path."""
        out = torch.empty(len(self.files), *self.image_shape, dtype=torch.uint8)
        order = torch.arange(len(self.files))
        chunks = list(order.split(batch_size))
        for pos, images in zip(chunks, self.batches(chunks), strict=True):
            out[pos] = images
        return out
