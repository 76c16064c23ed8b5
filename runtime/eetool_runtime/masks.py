"""A segmentation bundle (``eetool export`` of a segmentation checkpoint): one mask PNG per input into
``--output-dir`` and one record per input, as ``eetool predict --output-dir`` writes them
(eetool.segmentation.mask_prediction): the mask named after its input, 8 bits a pixel (the class index) with the
bundle's palette, written atomically; the record's exit shares over the network's exits and its cost. The bundle
holds the plain network, so every pixel leaves at the final exit and every image costs 1."""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from eetool_runtime.bundle import Bundle
from eetool_runtime.errors import OutputError, UsageError


def file_mask_names(files: list[str]) -> list[str]:
    """One mask name per input file: its name's stem with .png; a name already taken gets -2, -3, ... (the first
    free one) in input order."""
    taken: set[str] = set()
    names = []
    for path in files:
        stem, n = Path(path).stem, 1
        name = f"{stem}.png"
        while name in taken:
            n += 1
            name = f"{stem}-{n}.png"
        taken.add(name)
        names.append(name)
    return names


def mask_png(classes: np.ndarray, palette: list[int]) -> bytes:
    """An H x W class map (uint8) as an 8-bit palette PNG (the pixel value is the class index)."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(classes, dtype=np.uint8))  # mode L: one byte a pixel
    image.putpalette(palette)  # mode P, the same bytes
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_atomically(path: Path, data: bytes) -> None:
    """``data`` into a temp file beside ``path``, made durable, then renamed onto it: readers see the old file or
    the whole new one."""
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o666 & ~mask)  # mkstemp makes 0600; give the file the usual permissions
        os.replace(tmp, path)
        tmp = None
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror}", "check the disk space and permissions") from None
    finally:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)


def check_outside_bundle(path: Path, bundle: Path, what: str) -> None:
    """An output in the bundle's folder would change the bundle its sha256 sums seal."""
    if bundle.is_dir() and path.resolve().is_relative_to(bundle.resolve()):
        raise OutputError(f"{what} {path} lies inside the bundle {bundle}", "write it outside the bundle's folder")


def check_folder(output_dir: str, bundle: Path) -> Path:
    """--output-dir: an existing folder, or one to create in an existing, writable folder; not in the bundle."""
    folder = Path(output_dir)
    check_outside_bundle(folder, bundle, "--output-dir")
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"--output-dir {output_dir} is not a folder", "give a folder for the mask PNGs")
    parent = folder if folder.is_dir() else (folder.parent if str(folder.parent) else Path("."))
    if not parent.is_dir():
        raise OutputError(f"folder {parent} of --output-dir {output_dir} does not exist", "create it first (mkdir -p)")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder {parent} of --output-dir {output_dir} is not writable", "choose a writable folder")
    return folder


def check_mask_paths(folder: Path, names: list[str], inputs: list[str], force: bool, output: Path | None) -> None:
    """Before any mask is written: none replaces an input or -o, and none exists unless --force."""
    if output is not None and output.resolve().parent == folder.resolve() and output.name in set(names):
        raise OutputError(f"-o {output} is also the mask of an input", "write the records to another file")
    if not folder.is_dir():
        return  # a new folder: nothing in it to replace
    read = {Path(p).resolve() for p in inputs if p != "-" and Path(p).exists()}
    for name in names:
        path = folder / name
        if not path.exists():
            continue
        if path.resolve() in read:
            raise OutputError(f"output {path} is also an input", "write the result to another file")
        if path.is_dir():
            raise OutputError(f"output {path} is a folder", "give a file name")
        if not force:
            raise OutputError(f"output {path} already exists", "pass --force to replace it, or choose another name")


@dataclass
class MaskTally:
    """What the summary on stderr reports."""

    exits: list[str]
    predicted: int = 0
    failed: int = 0
    pixels: list[int] = field(default_factory=list)  # pixels leaving at each exit
    cost: float = 0.0  # summed over the images
    model_seconds: float = 0.0
    decode_seconds: float = 0.0
    write_seconds: float = 0.0  # the mask PNGs'

    def __post_init__(self) -> None:
        self.pixels = [0] * len(self.exits)

    def summary(self) -> str:
        total = max(sum(self.pixels), 1)
        shares = ", ".join(f"{e} {c / total:.1%}" for e, c in zip(self.exits, self.pixels, strict=True))
        rate = self.predicted / self.model_seconds if self.model_seconds > 0 else float("inf")
        overall = self.predicted / (self.model_seconds + self.decode_seconds) if self.predicted else 0.0
        failed = f", {self.failed} failed" if self.failed else ""
        return (f"predicted {self.predicted} masks{failed}; pixels leaving at: {shares}; mean cost "
                f"{self.cost / max(self.predicted, 1):.4f}; {rate:.1f} images/s in the model, {overall:.1f} with "
                f"decoding ({self.decode_seconds:.2f} s decoding, {self.model_seconds:.2f} s model, "
                f"{self.write_seconds:.2f} s writing masks)")


class MaskPredictions:
    """``predict`` on a segmentation bundle: the options it takes checked and the masks' paths checked before any
    is written; then, batch by batch, the masks written and the records made."""

    def __init__(self, args: argparse.Namespace, files: list[str], bundle: Bundle, output: Path | None) -> None:
        if args.output_dir is None:
            raise UsageError("a segmentation bundle writes one mask PNG per input: --output-dir is needed",
                             "add --output-dir DIR")
        if args.top_k:
            raise UsageError("--top-k apply to classifiers, not to a segmentation bundle",
                             "drop --top-k: a segmentation bundle's records carry its mask files")
        bundle.thresholds(args.point)  # a plain bundle: no --point
        self.bundle = bundle
        self.exits = bundle.mask_exits
        self.folder = check_folder(args.output_dir, bundle.folder)
        self.names = file_mask_names(files)
        check_mask_paths(self.folder, self.names, files, args.force, output)
        self.columns = ["input", "mask", *(f"share_{e}" for e in self.exits), "cost"]
        self.tally = MaskTally(self.exits)
        self.final = len(self.exits) - 1
        self.cost = bundle.costs[-1]
        self.made_folder = False
        self.created: list[Path] = []  # the masks this run wrote where no file was

    def start(self) -> None:
        """Create --output-dir where it is missing."""
        if not self.folder.is_dir():
            try:
                self.folder.mkdir()
            except OSError as e:
                raise OutputError(f"cannot create the folder {self.folder}: {e.strerror}",
                                  "check the disk space and permissions") from None
            self.made_folder = True

    def abandon(self) -> None:
        """The run did not finish: remove the masks it created, and --output-dir if it created it and nothing else
        is in it (masks that replaced files under --force stay: what they replaced is gone)."""
        for path in self.created:
            path.unlink(missing_ok=True)
        if self.made_folder and self.folder.is_dir() and not any(self.folder.iterdir()):
            self.folder.rmdir()

    def flatten(self, record: dict[str, Any]) -> dict[str, Any]:
        return {**record, **{f"share_{e}": s for e, s in record["exit_shares"].items()}}

    def __call__(self, names: list[str], positions: list[int], images: np.ndarray) -> list[dict[str, Any]]:
        """The batch's masks written, and its records; ``positions`` are the inputs' places in the file list."""
        start = time.perf_counter()
        classes = self.bundle.class_maps(images)
        self.tally.model_seconds += time.perf_counter() - start
        start = time.perf_counter()
        paths = [str(self.folder / self.names[p]) for p in positions]
        for path, class_map in zip(paths, classes, strict=True):
            if not os.path.exists(path):  # noted before it is written: an interrupt leaves no mask unnoted
                self.created.append(Path(path))
            write_atomically(Path(path), mask_png(class_map, self.bundle.palette))
        self.tally.write_seconds += time.perf_counter() - start
        pixels = int(classes[0].size) if len(classes) else 0
        shares = {e: (1.0 if k == self.final else 0.0) for k, e in enumerate(self.exits)}
        self.tally.pixels[self.final] += pixels * len(names)
        self.tally.cost += self.cost * len(names)
        self.tally.predicted += len(names)
        return [{"input": name, "mask": path, "exit_shares": dict(shares), "cost": round(self.cost, 6)}
                for name, path in zip(names, paths, strict=True)]

    def wrote(self) -> str:
        return f"wrote {self.tally.predicted} masks in {self.folder}"
