"""Inputs: listed as ``eetool predict`` lists them, decoded as eetool's folder datasets decode them
(``eetool.streaming.decode_image``: RGB, the shorter side resized with PIL's bilinear filter, a centre crop
zero-padded where the image is smaller), in numpy."""

from __future__ import annotations

import math
import os
import sys
import warnings
from collections.abc import Sequence
from typing import IO

import numpy as np

from eetool_runtime.errors import InputError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
DECODE_HINT = "remove or re-encode the file"


def list_inputs(paths: Sequence[str], stdin: IO[str] | None = None) -> list[str]:
    """Files as given, folders as their image files (recursive, sorted), ``-`` as the paths on stdin."""
    out: list[str] = []
    for path in paths:
        if path == "-":
            out += [p for line in (stdin or sys.stdin).read().splitlines() if (p := line.strip())]
        elif os.path.isdir(path):
            found = []
            for root, dirs, files in os.walk(path, onerror=_raise_unreadable):
                dirs.sort()
                found += [os.path.join(root, f) for f in files if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES]
            out += sorted(found)
        else:
            out.append(path)
    if not out:
        given = " ".join(paths) if paths else "nothing"
        raise InputError(f"no inputs to predict on (given: {given})",
                         "name image files or folders of images, or '-' for paths on stdin")
    return out


def _raise_unreadable(e: OSError) -> None:
    raise InputError(f"cannot read folder {e.filename}: {e.strerror}", "check its permissions")


def decode_image(path: str, resize: int, crop: tuple[int, int]) -> np.ndarray:
    """uint8 3 x crop."""
    from PIL import Image

    try:
        with warnings.catch_warnings():  # Pillow warns of a size it still opens; the size is refused just below
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            opened = Image.open(path)
        with opened:
            width, height = opened.size
            if width < 1 or height < 1 or width * height > (Image.MAX_IMAGE_PIXELS or math.inf):
                raise InputError(f"image {path} declares {width} x {height} pixels",
                                 f"{DECODE_HINT} (at least 1 x 1, at most {Image.MAX_IMAGE_PIXELS} pixels)")
            size = _resized(width, height, resize)
            # a long, thin image (1 x 40,000,000 pixels) grows by resizing its shorter side: the same limit holds
            if size[0] * size[1] > (Image.MAX_IMAGE_PIXELS or math.inf):
                raise InputError(f"image {path} of {width} x {height} pixels would be {size[0]} x {size[1]} resized "
                                 f"to {resize} pixels on its shorter side, over {Image.MAX_IMAGE_PIXELS} pixels",
                                 "crop the image nearer to the model's shape, or remove it")
            rgb = opened.convert("RGB")
        if size != (width, height):
            rgb = rgb.resize(size, Image.Resampling.BILINEAR)
        hwc = np.asarray(rgb, dtype=np.uint8)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise InputError(f"cannot decode image {path}: {e}", DECODE_HINT) from None
    return centre_crop(hwc.transpose(2, 0, 1), crop)


def _resized(width: int, height: int, shorter: int) -> tuple[int, int]:
    if width <= height:
        return shorter, int(shorter * height / width)
    return int(shorter * width / height), shorter


def centre_crop(image: np.ndarray, crop: tuple[int, int]) -> np.ndarray:
    ch, cw = crop
    _, h, w = image.shape
    if ch > h or cw > w:
        pad_h, pad_w = max(ch - h, 0), max(cw - w, 0)
        padded = np.zeros((image.shape[0], h + pad_h, w + pad_w), dtype=image.dtype)
        padded[:, pad_h // 2:pad_h // 2 + h, pad_w // 2:pad_w // 2 + w] = image
        image, h, w = padded, h + pad_h, w + pad_w
    top, left = int(round((h - ch) / 2.0)), int(round((w - cw) / 2.0))
    return np.ascontiguousarray(image[:, top:top + ch, left:left + cw])
