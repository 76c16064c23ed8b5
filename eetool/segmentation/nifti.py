"""A reader for single-file NIfTI-1 volumes (``.nii`` or ``.nii.gz``), enough for the brain-atlas source: the
header and the data's size are checked before anything is allocated, and anything else is refused with a
one-line error. No nibabel.

Checks: docs/segmentation.md (more data)
"""

from __future__ import annotations

import gzip
import math
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eetool.core.errors import InputError

HEADER_BYTES = 348
FIRST_DATA_BYTE = 352  # the header and the 4-byte extension flag of a single-file NIfTI-1
MAX_VOXEL_BYTES = 1 << 30  # 1 GiB: atlases are tens of megabytes
DEFLATE_MAX_RATIO = 1032  # deflate compresses at most 1032:1

# NIfTI-1 datatype codes eetool reads, by the numpy type of one voxel (little-endian; swapped as needed)
DATATYPES: dict[int, str] = {2: "u1", 4: "i2", 8: "i4", 16: "f4", 64: "f8", 256: "i1", 512: "u2", 768: "u4"}


@dataclass(frozen=True)
class Volume:
    """Voxels indexed [z, y, x] (NIfTI stores x fastest), as stored, with the header's intensity scaling."""

    voxels: np.ndarray
    slope: float  # value = voxel * slope + intercept; slope 1 and intercept 0 when the header sets none
    intercept: float

    @property
    def scaled(self) -> bool:
        return (self.slope, self.intercept) != (1.0, 0.0)

    def values(self) -> np.ndarray:
        """The voxels with the scaling applied (float64 when there is one)."""
        return self.voxels.astype(np.float64) * self.slope + self.intercept if self.scaled else self.voxels


def read_nifti(path: Path) -> Volume:
    hint = "give a single-file NIfTI-1 volume (.nii or .nii.gz), e.g. Debian mricron-data's templates"
    try:
        with path.open("rb") as raw:
            gzipped = raw.read(2) == b"\x1f\x8b"
        stored = path.stat().st_size
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as f:
            header = f.read(HEADER_BYTES)
            if len(header) < HEADER_BYTES:
                raise InputError(f"{path} is not a NIfTI-1 file (shorter than its 348-byte header)", hint)
            order = _byte_order(header)
            if order is None:
                raise InputError(f"{path} is not a NIfTI-1 file (its header size is not 348)", hint)
            if header[344:348] != b"n+1\0":
                raise InputError(f"{path} is not a single-file NIfTI-1 volume (magic {header[344:348]!r})", hint)
            shape, dtype, offset = _layout(path, header, order)
            slope, intercept = struct.unpack(order + "2f", header[112:120])
            nbytes = math.prod(shape) * dtype.itemsize
            if nbytes > MAX_VOXEL_BYTES:
                raise InputError(f"{path} declares {nbytes} bytes of voxels, over eetool's {MAX_VOXEL_BYTES}",
                                 "use a smaller volume")
            possible = stored * DEFLATE_MAX_RATIO if gzipped else stored - offset
            if nbytes > possible:
                raise InputError(f"{path} is truncated (its header declares {nbytes} bytes of voxels)",
                                 "re-download or reinstall the file")
            f.read(offset - HEADER_BYTES)  # the extension flag and any extensions
            data = f.read(nbytes)
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read {path}: {e}", "re-download or reinstall the file") from None
    if len(data) != nbytes:
        raise InputError(f"{path} is truncated ({len(data)} of {nbytes} bytes of voxels)",
                         "re-download or reinstall the file")
    voxels = np.frombuffer(data, dtype=dtype).reshape(shape[::-1]).astype(dtype.newbyteorder("="))
    if voxels.dtype.kind == "f" and not np.isfinite(voxels).all():
        raise InputError(f"{path} has voxels that are not finite numbers", "give a volume of finite values")
    if not math.isfinite(slope) or slope == 0:  # the standard: a slope of 0 (or none) means no scaling
        slope, intercept = 1.0, 0.0
    if not math.isfinite(intercept):
        raise InputError(f"{path} has intensity intercept {intercept}", "give a volume with a finite scl_inter")
    return Volume(voxels, float(slope), float(intercept))


def _byte_order(header: bytes) -> str | None:
    for order in ("<", ">"):
        if struct.unpack(order + "i", header[:4])[0] == HEADER_BYTES:
            return order
    return None


def _layout(path: Path, header: bytes, order: str) -> tuple[tuple[int, ...], np.dtype, int]:
    """The spatial shape (x, y, z), the voxel type and the first data byte, checked."""
    dim = struct.unpack(order + "8h", header[40:56])
    datatype, bitpix = struct.unpack(order + "2h", header[70:74])
    (vox_offset,) = struct.unpack(order + "f", header[108:112])
    if not 1 <= dim[0] <= 7 or any(d < 1 for d in dim[1:dim[0] + 1]):
        raise InputError(f"{path} has dimensions {list(dim[:dim[0] + 1] if 0 <= dim[0] <= 7 else dim)}",
                         "give a volume with 1 to 7 dimensions of at least one voxel each")
    if any(d != 1 for d in dim[4:dim[0] + 1]):
        raise InputError(f"{path} has {dim[0]} dimensions {list(dim[1:dim[0] + 1])}, not one 3-D volume",
                         "give a single 3-D volume (no time series)")
    if datatype not in DATATYPES:
        raise InputError(f"{path} has NIfTI datatype {datatype}, which eetool does not read",
                         "give integer or float voxels (datatypes 2, 4, 8, 16, 64, 256, 512, 768)")
    dtype = np.dtype(("<" if order == "<" else ">") + DATATYPES[datatype])
    if bitpix != 8 * dtype.itemsize:
        raise InputError(f"{path} has bitpix {bitpix} for datatype {datatype} ({8 * dtype.itemsize} bits)",
                         "fix the header")
    if not math.isfinite(vox_offset) or vox_offset != int(vox_offset) or not (
            FIRST_DATA_BYTE <= vox_offset <= 1 << 24):
        raise InputError(f"{path} has vox_offset {vox_offset}", "a single-file NIfTI-1 has its data at byte 352 "
                         "or later")
    spatial = tuple(int(d) for d in dim[1:min(dim[0], 3) + 1])
    return spatial + (1,) * (3 - len(spatial)), dtype, int(vox_offset)
