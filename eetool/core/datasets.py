"""The one dataset loader: ``--data NAME[:PATH]`` (IDX, CIFAR, folder, safetensors, the demo) decoded into uint8
N x C x H x W tensors, or folder images streamed (``eetool.core.streaming``); ``--indices`` subsets.

Sources: docs/data-sources.md
"""

from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
import torch.nn.functional as F

from eetool.core.distributed import World, shard_batches
from eetool.core.errors import EetoolError, InputError, ModelMismatchError, UsageError
from eetool.core.loading import IN_MEMORY_LIMIT_BYTES, DataLoading, DataOptions, Geometry
from eetool.core.sources import (
    DATA_ROOT_ENV,
    DATA_SOURCES,
    DEBIAN_PACKAGES,
    DEFAULT_PATHS,
    SOURCES,
    demo_path,
)

if TYPE_CHECKING:
    from eetool.core.streaming import FolderImages

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]
KMNIST_CLASSES = ["o", "ki", "su", "tsu", "na", "ha", "ma", "ya", "re", "wo"]


@dataclass
class Dataset:
    """Images (uint8, N x C x H x W), labels (int64, -1 where unlabelled) and where they came from.
    Streamed folder data has no ``images`` tensor: ``stream`` decodes its batches."""

    name: str
    split: str
    images: torch.Tensor | None
    labels: torch.Tensor
    classes: list[str]
    source: str
    fingerprint: str = ""
    classes_named: bool = True  # False: the source names no classes, and ``classes`` counts up to its top label
    indices: torch.Tensor | None = None  # positions in the full split, when restricted by --indices
    stream: FolderImages | None = None
    geometry: Geometry | None = None  # how folder images were decoded; None for sources stored as tensors

    def __post_init__(self) -> None:
        if not self.fingerprint:
            assert self.images is not None, "streamed data carries its folder fingerprint"
            self.fingerprint = fingerprint(self.name, self.split, self.images, self.labels)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """C, H, W of every image."""
        if self.stream is not None:
            return self.stream.image_shape
        assert self.images is not None
        c, h, w = (int(s) for s in self.images.shape[1:])
        return c, h, w

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def spec(self) -> str:
        return f"{self.name}/{self.split}"

    def subset(self, indices: torch.Tensor) -> Dataset:
        """The samples at ``indices`` (positions in this dataset); the fingerprint records the subset."""
        idx = indices.to(torch.int64)
        base = self.indices[idx] if self.indices is not None else idx
        h = hashlib.sha256(self.fingerprint.encode())
        h.update(idx.numpy().tobytes())
        return Dataset(self.name, self.split, None if self.images is None else self.images[idx], self.labels[idx],
                       self.classes, self.source, fingerprint=f"{self.fingerprint}+{h.hexdigest()[:12]}",
                       classes_named=self.classes_named,
                       indices=base, stream=None if self.stream is None else self.stream.subset(idx),
                       geometry=self.geometry)

    def batches(self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None,
                world: World | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels, positions) batches; positions index this dataset. With a ``world``
        of several processes, only this rank's share of the batches (``eetool.core.distributed``)."""
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
        positions = list(order.split(batch_size))
        if world is not None:
            positions = shard_batches(positions, world)
        yield from self.batches_at(positions, contiguous=not shuffle)

    def batches_at(self, positions: list[torch.Tensor], *, contiguous: bool = False
                   ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Yield (uint8 images, labels, positions) for each tensor of ``positions``, in turn (a
        ``contiguous`` run of positions is sliced, not gathered)."""
        if self.stream is not None:
            decoded = self.stream.batches([pos for pos in positions if len(pos)])
            for pos in positions:  # an empty share (a batch smaller than torchrun's world) decodes nothing
                try:
                    images = next(decoded) if len(pos) else torch.empty((0, *self.image_shape), dtype=torch.uint8)
                except EetoolError as e:
                    e.own_share = True  # under torchrun these files are this rank's alone: it reports the error
                    raise
                yield images, self.labels[pos], pos
            return
        assert self.images is not None
        for pos in positions:
            if contiguous and len(pos):  # a slice avoids a gather copy
                start, end = int(pos[0]), int(pos[0]) + len(pos)
                yield self.images[start:end], self.labels[start:end], pos
            else:
                yield self.images[pos], self.labels[pos], pos

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the images in [0, 1], in float64 running sums."""
        c = self.image_shape[0]
        total = torch.zeros(c, dtype=torch.float64)
        total_sq = torch.zeros(c, dtype=torch.float64)
        count = 0
        for images, _, _ in self.batches(4096 if self.stream is None else 256):
            x = images.to(torch.float64) / 255.0
            total += x.sum(dim=(0, 2, 3))
            total_sq += (x * x).sum(dim=(0, 2, 3))
            count += x.shape[0] * x.shape[2] * x.shape[3]
        mean = total / count
        std = (total_sq / count - mean * mean).clamp_min(1e-12).sqrt()
        return [round(float(v), 6) for v in mean], [round(float(v), 6) for v in std]


def fingerprint(name: str, split: str, images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256(f"{name}|{split}|{tuple(images.shape)}".encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.contiguous().numpy().tobytes())
    return f"{name}/{split}:{h.hexdigest()[:16]}"


class Preprocess:
    """uint8 batches to model input: channels, size and normalisation from the checkpoint."""

    def __init__(self, input_shape: tuple[int, int, int], mean: list[float], std: list[float]) -> None:
        self.input_shape = tuple(input_shape)
        c = self.input_shape[0]
        self.mean = torch.tensor(_per_channel(mean, c), dtype=torch.float32).view(1, c, 1, 1)
        self.std = torch.tensor(_per_channel(std, c), dtype=torch.float32).view(1, c, 1, 1)

    def __call__(self, images: torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
        x = images.to(device, non_blocking=True).float().div_(255.0)
        c, h, w = self.input_shape
        if x.shape[1] != c:
            if x.shape[1] == 1:
                x = x.expand(-1, c, -1, -1)
            elif c == 1:  # ITU-R 601 luma, as PIL's convert("L")
                weights = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x[:, :3] * weights).sum(1, keepdim=True)
            else:
                raise InputError(f"images have {x.shape[1]} channels, the model takes {c}", "use matching data")
        if x.shape[-2:] != (h, w):
            x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)


def _per_channel(values: list[float], c: int) -> list[float]:
    if len(values) == c:
        return list(values)
    if len(values) == 1:
        return list(values) * c
    if c == 1:
        return [sum(values) / len(values)]
    raise UsageError(f"normalisation has {len(values)} values for {c} channels", "give one value or one per channel")


# ---------------------------------------------------------------------------------------------
# Sources


def parse_spec(spec: str) -> tuple[str, str | None]:
    """``NAME[:PATH]``; a bare path to a .safetensors file or a folder is accepted too."""
    name, sep, path = spec.partition(":")
    if name in SOURCES:
        return name, (path or None) if sep else None
    if spec.endswith(".safetensors"):
        return "safetensors", spec
    if Path(spec).is_dir():
        return "folder", spec
    raise UsageError(f"unknown dataset {spec!r}", f"use one of {', '.join(SOURCES)} as NAME[:PATH]")


def load_dataset(spec: str, split: str = "test", indices: str | None = None, options: DataOptions | None = None,
                 geometry: Geometry | None = None) -> Dataset:
    """Load ``--data`` and ``--split``, optionally restricted by an ``--indices`` file. Folder images are
    decoded with ``geometry`` (the model's recipe; without one, at the first image's size) and held or
    streamed as ``options`` say."""
    if split not in ("train", "test"):
        raise UsageError(f"unknown split {split!r}", "use --split train or --split test")
    name, path = parse_spec(spec)
    loader = cast("Callable[..., Dataset]", DATA_SOURCES.get(name).load())
    ds = loader(name, path, split, options or DataOptions(), geometry)
    if len(ds) == 0:
        raise InputError(f"dataset {spec} has no {split} samples", "check the path and --split")
    if indices:
        ds = ds.subset(load_indices(indices, ds))
    if ds.stream is not None:  # folder images: decoded now, or streamed batch by batch, the --indices subset only
        options = options or DataOptions()
        if options.loading == DataLoading.memory or (options.loading == DataLoading.auto
                                                     and ds.stream.nbytes() <= IN_MEMORY_LIMIT_BYTES):
            ds = replace(ds, images=ds.stream.decode_all(), stream=None)
    return ds


# The loaders DATA_SOURCES registers (eetool.core.sources), each called as loader(name, path, split, options,
# geometry); the IDX, CIFAR, safetensors and demo files take no folder-image options.
def load_idx_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                    ) -> Dataset:
    return _load_idx(name, source_root(name, path), split)


def load_cifar_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                      ) -> Dataset:
    return _load_cifar(name, source_root(name, path), split)


def load_folder_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                       ) -> Dataset:
    if not path:
        raise UsageError("--data folder needs a path", "write --data folder:PATH (PATH/train/<class>/*.png ...)")
    return _load_folder(Path(path), split, options, geometry)


def load_safetensors_source(name: str, path: str | None, split: str, options: DataOptions,
                            geometry: Geometry | None) -> Dataset:
    if not path:
        raise UsageError("--data safetensors needs a path", "write --data safetensors:FILE")
    return _load_safetensors(path, split, name="safetensors")


def load_demo_source(name: str, path: str | None, split: str, options: DataOptions, geometry: Geometry | None
                     ) -> Dataset:
    return _load_safetensors(str(demo_path("demo-data.safetensors")), split, name="demo")


def source_root(name: str, path: str | None) -> Path:
    if path:
        root = Path(path)
    elif os.environ.get(DATA_ROOT_ENV):
        root = Path(os.environ[DATA_ROOT_ENV]) / name
    elif name in DEFAULT_PATHS:
        root = Path(DEFAULT_PATHS[name])
    else:
        raise UsageError(f"no folder given for {name}", f"write --data {name}:PATH or set {DATA_ROOT_ENV}")
    if not root.is_dir():
        package = DEBIAN_PACKAGES.get(name)
        hint = f"apt-get install {package}" if package else f"write --data {name}:PATH"
        raise InputError(f"dataset folder {root} does not exist", hint)
    return root


def find_idx_file(root: Path, stems: tuple[str, ...]) -> Path:
    for stem in stems:
        for candidate in (root / stem, root / f"{stem}.gz", root / stem.replace("-idx", ".idx")):
            if candidate.is_file():
                return candidate
    raise InputError(f"{root} has no {stems[0]}[.gz]", "point --data NAME:PATH at the folder with the IDX files")


# Deflate compresses at most 1032:1, so a gzip file cannot hold more than this many bytes per byte of its own.
DEFLATE_MAX_RATIO = 1032


def read_idx(path: Path) -> torch.Tensor:
    """IDX (LeCun's MNIST format) of unsigned bytes, gzipped or not.

    The header's sizes are checked against the file before the data is read, and a gzip file is decompressed
    no further than the header declares: a crafted header or a gzip bomb is refused, not allocated.
    """
    gzipped = path.suffix == ".gz"
    opener = gzip.open if gzipped else open
    try:
        stored = path.stat().st_size
        with opener(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4 or head[0] != 0 or head[1] != 0 or head[2] != 0x08:
                raise InputError(f"{path} is not an IDX file of unsigned bytes", "check the file")
            ndim = head[3]
            sizes = f.read(4 * ndim)
            if len(sizes) < 4 * ndim:
                raise InputError(f"{path} is truncated (its header is cut short)", "re-download the dataset")
            dims = [int.from_bytes(sizes[4 * i: 4 * i + 4], "big") for i in range(ndim)]
            count = math.prod(dims)
            offset = 4 + 4 * ndim
            possible = stored * DEFLATE_MAX_RATIO if gzipped else stored - offset
            if count > possible:
                holds = f"its {stored} compressed bytes cannot hold them" if gzipped else f"it holds {possible}"
                raise InputError(f"{path} is truncated (its header declares {count} bytes of data, {holds})",
                                 "re-download the dataset")
            data = f.read(count + 1)  # one byte more than declared tells a file that is too long
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read {path}: {e}", "re-download or reinstall the dataset") from None
    if len(data) != count:
        raise InputError(f"{path} is truncated or too long ({'over ' if len(data) > count else ''}{len(data)} "
                         f"of {count} bytes)", "re-download the dataset")
    if count == 0:  # torch.frombuffer refuses an empty buffer; the caller reports an empty dataset
        return torch.empty(dims, dtype=torch.uint8)
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(*dims)


def _load_idx(name: str, root: Path, split: str) -> Dataset:
    prefix = "train" if split == "train" else "t10k"
    images = read_idx(find_idx_file(root, (f"{prefix}-images-idx3-ubyte",)))
    labels = read_idx(find_idx_file(root, (f"{prefix}-labels-idx1-ubyte",))).to(torch.int64)
    if images.shape[0] != labels.shape[0]:
        raise InputError(f"{root}: {images.shape[0]} images but {labels.shape[0]} labels", "check the files")
    classes = {"fashion-mnist": FASHION_MNIST_CLASSES, "kmnist": KMNIST_CLASSES}.get(name, [str(i) for i in range(10)])
    return Dataset(name, split, images.unsqueeze(1).contiguous(), labels, classes, str(root))


CIFAR_PIXELS = 3 * 32 * 32


def _load_cifar(name: str, root: Path, split: str) -> Dataset:
    import numpy as np

    folder = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}[name]
    if (root / folder).is_dir():
        root = root / folder
    if name == "cifar10":
        files = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
        label_key, meta_file, names_key = b"labels", "batches.meta", b"label_names"
    else:
        files = ["train" if split == "train" else "test"]
        label_key, meta_file, names_key = b"fine_labels", "meta", b"fine_label_names"
    images: list[np.ndarray] = []
    labels: list[int] = []
    for fname in files:
        path = root / fname
        batch = _unpickle(path)
        data, batch_labels = batch.get(b"data"), batch.get(label_key)
        if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.size % CIFAR_PIXELS:
            raise InputError(f"{path} is not a CIFAR batch (its data is not uint8 rows of 3 x 32 x 32 pixels)",
                             "re-extract the archive")
        data = data.reshape(-1, 3, 32, 32)
        if not isinstance(batch_labels, list | np.ndarray) or len(batch_labels) != data.shape[0]:
            count = len(batch_labels) if isinstance(batch_labels, list | np.ndarray) else "no"
            raise InputError(f"{path} is not a CIFAR batch ({data.shape[0]} images but {count} labels)",
                             "re-extract the archive")
        if not all(isinstance(v, int | np.integer) and not isinstance(v, bool) for v in batch_labels):
            raise InputError(f"{path} is not a CIFAR batch (its labels are not integers)", "re-extract the archive")
        images.append(data)
        labels.extend(int(v) for v in batch_labels)
    meta_path = root / meta_file
    names = _unpickle(meta_path).get(names_key)
    if not isinstance(names, list) or not all(isinstance(n, bytes | str) for n in names):
        raise InputError(f"{meta_path} is not a CIFAR meta file (no list {names_key.decode()})",
                         "re-extract the archive")
    classes = [n.decode() if isinstance(n, bytes) else n for n in names]
    return Dataset(name, split, torch.from_numpy(np.concatenate(images)), torch.tensor(labels, dtype=torch.int64),
                   classes, str(root))


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles what CIFAR's batches hold (dicts, lists, numbers, strings and numpy arrays) and nothing else:
    a pickle names any callable it likes, so admitting more would let a data file run code."""

    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> Callable[..., object]:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"it names {module}.{name}")
        import importlib

        if name == "_reconstruct":
            try:
                return importlib.import_module("numpy._core.multiarray")._reconstruct  # numpy 2
            except ImportError:  # numpy 1
                return importlib.import_module("numpy.core.multiarray")._reconstruct
        return getattr(importlib.import_module("numpy"), name)


def _unpickle(path: Path) -> dict[bytes, object]:
    # CIFAR's official format is a Python 2 pickle (protocol 2) of numpy arrays and lists.
    if not path.is_file():
        raise InputError(f"{path} does not exist", "point --data cifar10:PATH at the extracted cifar-10-batches-py")
    try:
        with open(path, "rb") as f:
            out = _CifarUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            OverflowError, MemoryError) as e:
        raise InputError(f"{path} is not a CIFAR batch ({e})", "re-extract the archive") from None
    if not isinstance(out, dict):
        raise InputError(f"{path} is not a CIFAR batch (it holds a {type(out).__name__}, not a dict)",
                         "re-extract the archive")
    return out


def _load_folder(root: Path, split: str, options: DataOptions, geometry: Geometry | None) -> Dataset:
    """The folder's files, labels and fingerprint; nothing is decoded yet (``load_dataset`` decides how)."""
    from eetool.core.streaming import FolderImages, first_image_geometry, folder_fingerprint, list_folder

    listing = list_folder(root, split)
    geometry = geometry or first_image_geometry(listing.files[0])
    return Dataset("folder", split, None, torch.tensor(listing.labels, dtype=torch.int64), listing.classes,
                   str(listing.base), fingerprint=folder_fingerprint(split, listing),
                   stream=FolderImages(tuple(listing.files), geometry, options.worker_count()), geometry=geometry)


def _load_safetensors(path: str, split: str, name: str) -> Dataset:
    """A file with ``images`` (uint8 N[xC]xHxW) and ``labels``, or ``<split>.images`` and ``<split>.labels``."""
    from eetool.core.artifacts import read_safetensors

    tensors, meta = read_safetensors(path)
    for key in (f"{split}.images", "images"):
        if key in tensors:
            images = tensors[key]
            labels = tensors.get(key.replace("images", "labels"))
            break
    else:
        raise InputError(f"{path} has no '{split}.images' or 'images' tensor", "store images as uint8 N x C x H x W")
    if images.dtype != torch.uint8:
        raise InputError(f"{path}: images are {images.dtype}, not uint8", "store images as uint8 in [0, 255]")
    if images.dim() == 3:
        images = images.unsqueeze(1)
    if images.dim() != 4 or images.shape[1] not in (1, 3, 4) or images.shape[2] < 1 or images.shape[3] < 1:
        raise InputError(f"{path}: images have shape {tuple(images.shape)}",
                         "store images as N x C x H x W with 1, 3 or 4 channels and at least 1 x 1 pixels")
    if labels is None:
        labels = torch.full((images.shape[0],), -1, dtype=torch.int64)
    if labels.dim() != 1 or labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise InputError(f"{path}: labels are {labels.dtype} of shape {tuple(labels.shape)}",
                         "store labels as a 1-D integer tensor (-1 where unlabelled)")
    if labels.shape[0] != images.shape[0]:
        raise InputError(f"{path}: {images.shape[0]} images but {labels.shape[0]} labels", "store one label per image")
    labels = labels.to(torch.int64)
    if bool((labels < -1).any()):
        raise InputError(f"{path} has label {int(labels.min())}", "labels are 0..K-1, or -1 where unlabelled")
    classes = meta.get("classes", "").split("\n") if meta.get("classes") else []
    if not classes:
        classes = [str(i) for i in range(int(labels.max()) + 1 if labels.numel() and labels.max() >= 0 else 0)]
    return Dataset(meta.get("name", name) if name == "demo" else name, split, images, labels, classes, path)


def load_indices(path: str, ds: Dataset) -> torch.Tensor:
    """An ``--indices`` file's positions in ``ds`` (eetool.core.sample_indices reads and checks it)."""
    from eetool.core.sample_indices import SampleIndices

    return SampleIndices.load(path).positions_in(ds.spec, len(ds), ds.fingerprint)


def require_labels(ds: Dataset, hint: str) -> None:
    """Refuse a dataset with unlabelled samples (label -1) where every sample needs its label."""
    if bool((ds.labels < 0).any()):
        raise InputError(f"{ds.spec} has unlabelled samples", hint)


def check_labels(ds: Dataset, num_classes: int) -> None:
    labelled = ds.labels[ds.labels >= 0]
    if labelled.numel() and int(labelled.max()) >= num_classes:
        raise ModelMismatchError(
            f"{ds.spec} has labels up to {int(labelled.max())} but the model has {num_classes} classes",
            "use the dataset the checkpoint was trained for",
        )
