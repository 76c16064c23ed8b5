"""Dataset sources, subsets, --indices and preprocessing, on small handmade files."""

from __future__ import annotations

import gzip
import io
import os
import pickle
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eetool.core.artifacts import Provenance, write_tensors
from eetool.core.datasets import Dataset, Preprocess, fingerprint, load_dataset, read_idx
from eetool.core.errors import InputError, ProvenanceError, UsageError


def idx_bytes(array: np.ndarray) -> bytes:
    """LeCun's IDX: two zero bytes, type 0x08 (unsigned byte), the number of dimensions, big-endian sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def random_images(n: int, h: int = 5, w: int = 4, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, 256, (n, h, w)).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# IDX


@pytest.mark.parametrize("name", ["images-idx3-ubyte", "images-idx3-ubyte.gz"])
def test_read_idx(tmp_path: Path, name: str) -> None:
    array = random_images(3)
    got = read_idx(write_idx(tmp_path / name, array))
    assert got.dtype == torch.uint8
    assert torch.equal(got, torch.from_numpy(array))


def test_read_idx_of_labels(tmp_path: Path) -> None:
    labels = np.array([3, 1, 4, 1, 5], dtype=np.uint8)
    assert read_idx(write_idx(tmp_path / "labels", labels)).tolist() == labels.tolist()


@pytest.mark.parametrize("damage", ["truncated", "too long", "float type", "nonzero magic", "short header", "empty"])
def test_bad_idx_files(tmp_path: Path, damage: str) -> None:
    data = bytearray(idx_bytes(random_images(3)))
    if damage == "truncated":
        data = data[:-1]
    elif damage == "too long":
        data += b"\x00"
    elif damage == "float type":
        data[2] = 0x0D
    elif damage == "nonzero magic":
        data[0] = 1
    elif damage == "short header":
        data = data[:6]
    else:
        data = bytearray()
    path = tmp_path / "x-idx3-ubyte"
    path.write_bytes(bytes(data))
    with pytest.raises(InputError):
        read_idx(path)


def test_truncated_gzip_is_bad_input(tmp_path: Path) -> None:
    packed = gzip.compress(idx_bytes(random_images(3)))
    path = tmp_path / "x-idx3-ubyte.gz"
    path.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(InputError):
        read_idx(path)
    path.write_bytes(b"not gzip at all")
    with pytest.raises(InputError):
        read_idx(path)


def test_idx_sizes_are_checked_before_the_data_is_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A header declaring 2^32 x 2^32 x 2^32 bytes is refused from the file's size, and a gzip file is read no
    further than its header declares, whatever it would decompress to."""
    huge = bytes([0, 0, 0x08, 3]) + b"\xff\xff\xff\xff" * 3 + b"\x00" * 64
    (tmp_path / "huge-idx3-ubyte").write_bytes(huge)
    with pytest.raises(InputError, match="declares 79228162458924105385300197375 bytes"):
        read_idx(tmp_path / "huge-idx3-ubyte")
    (tmp_path / "huge-idx3-ubyte.gz").write_bytes(gzip.compress(huge))
    with pytest.raises(InputError, match="compressed bytes cannot hold them"):
        read_idx(tmp_path / "huge-idx3-ubyte.gz")
    # a gzip bomb: 3 bytes declared, 64 MiB of zeros after them
    bomb = gzip.compress(idx_bytes(np.zeros(3, np.uint8)) + bytes(64 << 20), compresslevel=1)
    (tmp_path / "bomb-idx1-ubyte.gz").write_bytes(bomb)
    reads: list[int] = []
    real_read = gzip.GzipFile.read

    def counting_read(self: gzip.GzipFile, size: int = -1) -> bytes:
        reads.append(size)
        return real_read(self, size)

    monkeypatch.setattr(gzip.GzipFile, "read", counting_read)
    with pytest.raises(InputError, match="too long"):
        read_idx(tmp_path / "bomb-idx1-ubyte.gz")
    assert reads == [4, 4, 4]  # the magic, the one size, then the 3 declared bytes and one more


def fake_mnist(root: Path, n_train: int = 7, n_test: int = 5) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.RandomState(1)
    out = {}
    for split, prefix, n, suffix in (("train", "train", n_train, ".gz"), ("test", "t10k", n_test, "")):
        images = rng.randint(0, 256, (n, 6, 5)).astype(np.uint8)
        labels = rng.randint(0, 10, n).astype(np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte{suffix}", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte{suffix}", labels)
        out[split] = (images, labels)
    return out


@pytest.mark.parametrize("split", ["train", "test"])
def test_fake_mnist_folder(tmp_path: Path, split: str) -> None:
    written = fake_mnist(tmp_path / "mnist")
    ds = load_dataset(f"mnist:{tmp_path / 'mnist'}", split)
    images, labels = written[split]
    assert ds.images.shape == (len(images), 1, 6, 5)
    assert torch.equal(ds.images[:, 0], torch.from_numpy(images))
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == labels.tolist()
    assert ds.classes == [str(k) for k in range(10)]
    assert ds.split == split and ds.name == "mnist"


def test_fashion_mnist_class_names_and_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake_mnist(tmp_path / "fashion-mnist")
    monkeypatch.setenv("EETOOL_DATA_DIR", str(tmp_path))
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 5 and ds.classes[0] == "T-shirt/top" and ds.classes[9] == "Ankle boot"


def test_idx_counts_must_match(tmp_path: Path) -> None:
    fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(InputError):
        load_dataset(f"mnist:{tmp_path}", "test")


def test_empty_idx_split_is_bad_input(tmp_path: Path) -> None:
    fake_mnist(tmp_path)
    write_idx(tmp_path / "t10k-images-idx3-ubyte", np.zeros((0, 6, 5), dtype=np.uint8))
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.zeros(0, dtype=np.uint8))
    with pytest.raises(InputError):
        load_dataset(f"mnist:{tmp_path}", "test")


def test_missing_sources(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        load_dataset(f"mnist:{tmp_path / 'nowhere'}", "test")
    with pytest.raises(InputError):
        load_dataset(f"kmnist:{tmp_path}", "test")  # a folder without the files
    with pytest.raises(UsageError):
        load_dataset(f"mnist:{tmp_path}", "validation")
    with pytest.raises(UsageError):
        load_dataset("imagenet", "test")


# ---------------------------------------------------------------------------------------------
# Fingerprints, subsets, --indices


def small_dataset(n: int = 12, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=gen)
    return Dataset("toy", "test", images, torch.arange(n) % 3, ["a", "b", "c"], "memory")


def test_fingerprint_follows_content_and_subset() -> None:
    ds = small_dataset()
    same = small_dataset()
    assert ds.fingerprint == same.fingerprint
    changed_images = ds.images.clone()
    changed_images[3, 0, 1, 1] ^= 1
    assert fingerprint("toy", "test", changed_images, ds.labels) != ds.fingerprint
    changed_labels = ds.labels.clone()
    changed_labels[0] = 2
    assert fingerprint("toy", "test", ds.images, changed_labels) != ds.fingerprint
    assert fingerprint("toy", "train", ds.images, ds.labels) != ds.fingerprint
    sub = ds.subset(torch.tensor([1, 2, 3]))
    assert sub.fingerprint != ds.fingerprint
    assert sub.fingerprint != ds.subset(torch.tensor([3, 2, 1])).fingerprint
    assert sub.fingerprint == ds.subset(torch.tensor([1, 2, 3])).fingerprint


def test_subset_keeps_base_indices() -> None:
    ds = small_dataset()
    first = ds.subset(torch.tensor([5, 2, 9, 7]))
    second = first.subset(torch.tensor([3, 0]))
    assert first.indices is not None and first.indices.tolist() == [5, 2, 9, 7]
    assert second.indices is not None and second.indices.tolist() == [7, 5]
    assert torch.equal(second.images, ds.images[[7, 5]])
    assert second.labels.tolist() == ds.labels[[7, 5]].tolist()


def test_batches_cover_every_sample_once() -> None:
    ds = small_dataset(10)
    for shuffle in (False, True):
        seen = []
        for images, labels, pos in ds.batches(4, shuffle=shuffle, generator=torch.Generator().manual_seed(0)):
            assert torch.equal(images, ds.images[pos]) and torch.equal(labels, ds.labels[pos])
            seen += pos.tolist()
        assert sorted(seen) == list(range(10))


@pytest.fixture()
def mnist_root(tmp_path: Path) -> str:
    fake_mnist(tmp_path / "m", n_train=7, n_test=9)
    return f"mnist:{tmp_path / 'm'}"


def test_indices_from_a_text_file(tmp_path: Path, mnist_root: str) -> None:
    full = load_dataset(mnist_root, "test")
    path = tmp_path / "idx.txt"
    path.write_text("4\n0\n  8\n")
    ds = load_dataset(mnist_root, "test", str(path))
    assert len(ds) == 3
    assert ds.indices is not None and ds.indices.tolist() == [4, 0, 8]
    assert torch.equal(ds.images, full.images[[4, 0, 8]])
    assert ds.fingerprint != full.fingerprint


def test_indices_from_an_artifact(tmp_path: Path, mnist_root: str) -> None:
    full = load_dataset(mnist_root, "test")
    path = str(tmp_path / "keep.safetensors")
    write_tensors(path, {"indices": torch.tensor([1, 6, 2])}, Provenance(kind="indices", dataset=full.fingerprint))
    ds = load_dataset(mnist_root, "test", path)
    assert ds.indices is not None and ds.indices.tolist() == [1, 6, 2]
    assert torch.equal(ds.labels, full.labels[[1, 6, 2]])


def test_indices_artifact_for_another_dataset(tmp_path: Path, mnist_root: str) -> None:
    train = load_dataset(mnist_root, "train")
    path = str(tmp_path / "keep.safetensors")
    write_tensors(path, {"indices": torch.tensor([1, 2])}, Provenance(kind="indices", dataset=train.fingerprint))
    with pytest.raises(ProvenanceError):
        load_dataset(mnist_root, "test", path)


def test_indices_artifact_of_another_kind(tmp_path: Path, mnist_root: str) -> None:
    path = str(tmp_path / "keep.safetensors")
    write_tensors(path, {"indices": torch.tensor([1, 2])}, Provenance(kind="evaluation"))
    with pytest.raises(ProvenanceError):
        load_dataset(mnist_root, "test", path)


@pytest.mark.parametrize("text", ["", "\n \n", "0\n9\n", "-1\n", "1\n2\n1\n", "1.5\n", "two\n"])
def test_bad_text_indices(tmp_path: Path, mnist_root: str, text: str) -> None:
    path = tmp_path / "idx.txt"
    path.write_text(text)  # the test split has 9 samples: 9 is out of range
    with pytest.raises(InputError):
        load_dataset(mnist_root, "test", str(path))


@pytest.mark.parametrize("tensor", [torch.tensor([], dtype=torch.int64), torch.tensor([0, 9]),
                                    torch.tensor([3, 3]), torch.tensor([0.0, 1.0]), torch.tensor([[0, 1]])])
def test_bad_indices_artifacts(tmp_path: Path, mnist_root: str, tensor: torch.Tensor) -> None:
    full = load_dataset(mnist_root, "test")
    path = str(tmp_path / "keep.safetensors")
    write_tensors(path, {"indices": tensor}, Provenance(kind="indices", dataset=full.fingerprint))
    with pytest.raises(InputError):
        load_dataset(mnist_root, "test", path)


def test_missing_indices_file(tmp_path: Path, mnist_root: str) -> None:
    with pytest.raises(InputError):
        load_dataset(mnist_root, "test", str(tmp_path / "absent.txt"))


# ---------------------------------------------------------------------------------------------
# Preprocessing


def test_grayscale_to_three_channels_and_normalisation() -> None:
    images = torch.randint(0, 256, (2, 1, 5, 5), dtype=torch.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.25, 2.0]
    got = Preprocess((3, 5, 5), mean, std)(images)
    assert got.shape == (2, 3, 5, 5)
    for n in range(2):
        for c in range(3):
            want = (images[n, 0].double() / 255 - mean[c]) / std[c]
            assert torch.allclose(got[n, c].double(), want, atol=1e-5)


def test_one_mean_for_every_channel() -> None:
    images = torch.randint(0, 256, (1, 3, 4, 4), dtype=torch.uint8)
    got = Preprocess((3, 4, 4), [0.5], [0.25])(images)
    assert torch.allclose(got.double(), (images.double() / 255 - 0.5) / 0.25, atol=1e-5)


def test_colour_to_grayscale_is_luma() -> None:
    images = torch.randint(0, 256, (2, 3, 4, 6), dtype=torch.uint8)
    got = Preprocess((1, 4, 6), [0.0], [1.0])(images)
    r, g, b = (images[:, k].double() / 255 for k in range(3))
    assert torch.allclose(got[:, 0].double(), 0.299 * r + 0.587 * g + 0.114 * b, atol=1e-5)
    # PIL's convert("L") computes the same luma (rounded to a byte).
    pil = np.asarray(Image.fromarray(images[0].permute(1, 2, 0).numpy(), "RGB").convert("L"))
    assert np.abs(got[0, 0].numpy() * 255 - pil).max() <= 1.0


@pytest.mark.parametrize("size", [(5, 4), (7, 9), (24, 20)])
def test_resize_matches_pil(size: tuple[int, int]) -> None:
    images = torch.randint(0, 256, (1, 1, 12, 10), dtype=torch.uint8)
    h, w = size
    got = Preprocess((1, h, w), [0.0], [1.0])(images)
    # PIL's bilinear filter (antialiased when shrinking) on the float image is the reference.
    src = Image.fromarray(images[0, 0].numpy().astype(np.float32) / 255, mode="F")
    want = np.asarray(src.resize((w, h), Image.BILINEAR))
    assert got.shape == (1, 1, h, w)
    assert np.abs(got[0, 0].numpy() - want).max() < 1e-5


def test_preprocess_refusals() -> None:
    with pytest.raises(InputError):
        Preprocess((3, 4, 4), [0.5], [0.5])(torch.zeros(1, 2, 4, 4, dtype=torch.uint8))
    with pytest.raises(UsageError):
        Preprocess((3, 4, 4), [0.5, 0.5], [0.5])


def test_preprocess_leaves_the_batch_alone() -> None:
    images = torch.randint(0, 256, (2, 1, 4, 4), dtype=torch.uint8)
    copy = images.clone()
    Preprocess((1, 4, 4), [0.5], [0.5])(images)
    assert torch.equal(images, copy)


# ---------------------------------------------------------------------------------------------
# Image folders, CIFAR, safetensors, statistics


def write_png(path: Path, array: np.ndarray, mode: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode).save(path)


def test_image_folder(tmp_path: Path) -> None:
    rng = np.random.RandomState(2)
    rgb = [rng.randint(0, 256, (5, 6, 3)).astype(np.uint8) for _ in range(3)]
    gray = rng.randint(0, 256, (5, 6)).astype(np.uint8)
    write_png(tmp_path / "train" / "dog" / "b.png", rgb[0], "RGB")
    write_png(tmp_path / "train" / "dog" / "a.png", rgb[1], "RGB")
    write_png(tmp_path / "train" / "cat" / "z.png", rgb[2], "RGB")
    write_png(tmp_path / "train" / "cat" / "gray.png", gray, "L")
    write_png(tmp_path / "train" / "cat" / "big.png", rng.randint(0, 256, (10, 12, 3)).astype(np.uint8), "RGB")
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    write_png(tmp_path / "test" / "cat" / "q.png", rgb[0], "RGB")

    ds = load_dataset(f"folder:{tmp_path}", "train")
    assert ds.classes == ["cat", "dog"]
    # Sorted by class, then by file name: cat/big, cat/gray, cat/z, dog/a, dog/b.
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]
    assert ds.images.shape == (5, 3, 10, 12)  # the first image's size, the others resized to it
    small = load_dataset(f"folder:{tmp_path}", "test")
    assert len(small) == 1 and torch.equal(small.images[0], torch.from_numpy(rgb[0]).permute(2, 0, 1))


def test_image_folder_pixels_and_grayscale(tmp_path: Path) -> None:
    rng = np.random.RandomState(3)
    rgb = rng.randint(0, 256, (4, 3, 3)).astype(np.uint8)
    gray = rng.randint(0, 256, (4, 3)).astype(np.uint8)
    write_png(tmp_path / "a" / "1.png", rgb, "RGB")
    write_png(tmp_path / "b" / "1.png", gray, "L")
    ds = load_dataset(str(tmp_path), "test")  # a bare folder, one split
    assert ds.name == "folder"
    assert torch.equal(ds.images[0], torch.from_numpy(rgb).permute(2, 0, 1))
    for c in range(3):  # grayscale is repeated to RGB
        assert torch.equal(ds.images[1, c], torch.from_numpy(gray))


def test_bad_image_folders(tmp_path: Path) -> None:
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(InputError):
        load_dataset(f"folder:{tmp_path / 'empty'}", "test")
    (tmp_path / "broken" / "cls").mkdir(parents=True)
    (tmp_path / "broken" / "cls" / "x.png").write_bytes(b"\x89PNG but not really")
    with pytest.raises(InputError):
        load_dataset(f"folder:{tmp_path / 'broken'}", "test")


class Python2Pickler(pickle._Pickler):  # type: ignore[name-defined]
    """Protocol 2 with bytes written as Python 2 strings, as the official CIFAR batches were (Python 3 would call
    _codecs.encode for them, which no CIFAR file does)."""

    dispatch = dict(pickle._Pickler.dispatch)  # type: ignore[attr-defined]

    def save_python2_str(self, obj: bytes) -> None:
        if len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(obj)) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_python2_str


def python2_pickle(obj: object) -> bytes:
    out = io.BytesIO()
    Python2Pickler(out, protocol=2).dump(obj)
    return out.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that declares its size and holds no pixels: what a decompression bomb's header looks like."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore:Image size")
@pytest.mark.parametrize(("width", "height"), [(20_000, 20_000), (10_000, 10_000), (0, 0), (5, 0)])
def test_image_sizes_are_checked_before_decoding(tmp_path: Path, width: int, height: int) -> None:
    """Beyond PIL's limit (10 000 x 10 000 is past its warning, 20 000 x 20 000 past its error) or empty:
    refused from the header, before any pixel is decoded."""
    write_png(tmp_path / "cls" / "a.png", np.zeros((4, 4, 3), np.uint8), "RGB")
    (tmp_path / "cls" / "b.png").write_bytes(png_header(width, height))
    with pytest.raises(InputError, match=r"b\.png"):
        load_dataset(f"folder:{tmp_path}", "test")


def fake_cifar10(root: Path, per_batch: int = 3) -> dict[str, tuple[np.ndarray, list[int]]]:
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.RandomState(4)
    written: dict[str, tuple[np.ndarray, list[int]]] = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.randint(0, 256, (per_batch, 3 * 32 * 32)).astype(np.uint8)
        labels = [int(v) for v in rng.randint(0, 10, per_batch)]
        (folder / name).write_bytes(python2_pickle({b"batch_label": name.encode(), b"data": data, b"labels": labels,
                                                    b"filenames": [f"{i}.png".encode() for i in range(per_batch)]}))
        written[name] = (data, labels)
    (folder / "batches.meta").write_bytes(python2_pickle({b"label_names": [f"class{k}".encode() for k in range(10)]}))
    return written


def test_cifar10(tmp_path: Path) -> None:
    written = fake_cifar10(tmp_path)
    assert b"_codecs" not in (tmp_path / "cifar-10-batches-py" / "test_batch").read_bytes()
    train = load_dataset(f"cifar10:{tmp_path}", "train")
    data = np.concatenate([written[f"data_batch_{i}"][0] for i in range(1, 6)])
    labels = sum((written[f"data_batch_{i}"][1] for i in range(1, 6)), [])
    assert train.images.shape == (15, 3, 32, 32)
    # Each row is 1024 red, then 1024 green, then 1024 blue values, row-major.
    assert torch.equal(train.images[4, 1, 2, 3], torch.tensor(data[4, 1024 + 2 * 32 + 3]))
    assert torch.equal(train.images.flatten(1), torch.from_numpy(data))
    assert train.labels.tolist() == labels
    assert train.classes == [f"class{k}" for k in range(10)]
    test = load_dataset(f"cifar10:{tmp_path / 'cifar-10-batches-py'}", "test")
    assert test.labels.tolist() == written["test_batch"][1]


def test_cifar10_missing_or_corrupt_batch(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"garbage")
    with pytest.raises(InputError):
        load_dataset(f"cifar10:{tmp_path}", "test")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(InputError):
        load_dataset(f"cifar10:{tmp_path}", "train")


class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def test_a_cifar_batch_that_would_run_code_is_refused_unrun(tmp_path: Path) -> None:
    fake_cifar10(tmp_path)
    marker = tmp_path / "ran"
    batch = {b"x": RunsAShellCommand(marker), b"data": np.zeros((1, 3072), np.uint8), b"labels": [0]}
    for made in (python2_pickle(batch), pickle.dumps(batch, protocol=pickle.HIGHEST_PROTOCOL)):
        (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(made)
        with pytest.raises(InputError, match=r"test_batch is not a CIFAR batch \(it names (posix|nt)\.system"):
            load_dataset(f"cifar10:{tmp_path}", "test")
        assert not marker.exists()


@pytest.mark.parametrize(("batch", "says"), [
    ({b"data": np.zeros((2, 3000), np.uint8), b"labels": [0, 1]}, "3 x 32 x 32"),
    ({b"data": np.zeros((2, 3072), np.float32), b"labels": [0, 1]}, "uint8"),
    ({b"labels": [0, 1]}, "3 x 32 x 32"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1, 2]}, "2 images but 3 labels"),
    ({b"data": np.zeros((2, 3072), np.uint8)}, "2 images but no labels"),
    ({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0.5, 1]}, "not integers"),
    ([1, 2, 3], "holds a list"),
])
def test_cifar_batches_of_other_shapes_are_refused(tmp_path: Path, batch: object, says: str) -> None:
    fake_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(python2_pickle(batch))
    with pytest.raises(InputError, match=says):
        load_dataset(f"cifar10:{tmp_path}", "test")


def test_safetensors_dataset(tiny_data: str) -> None:
    ds = load_dataset(tiny_data, "train")
    assert len(ds) == 96 and ds.images.shape[1:] == (1, 28, 28)
    assert ds.labels.tolist() == [k % 10 for k in range(96)]
    assert ds.classes == [f"c{k}" for k in range(10)]


U8 = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)


@pytest.mark.parametrize(("tensors", "says"), [
    ({"images": torch.zeros(4, 2, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)},
     "1, 3 or 4 channels"),
    ({"images": torch.zeros(4, 1, 0, 0, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)},
     "at least 1 x 1"),
    ({"images": torch.zeros(4, 1, 1, 8, 8, dtype=torch.uint8), "labels": torch.zeros(4, dtype=torch.int64)},
     "N x C x H x W"),
    ({"images": U8, "labels": torch.tensor([0.0, 1.7, 2.0, 3.0])}, "labels are torch.float32"),
    ({"images": U8, "labels": torch.zeros(4, 2, dtype=torch.int64)}, "shape \\(4, 2\\)"),
    ({"images": U8, "labels": torch.tensor([True, False, True, True])}, "torch.bool"),
    ({"images": U8, "labels": torch.tensor([0, -1, -2, 1])}, "label -2"),
])
def test_safetensors_datasets_of_other_shapes_and_types_are_refused(tmp_path: Path, tensors: dict[str, torch.Tensor],
                                                                   says: str) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(tmp_path / "d.safetensors"))
    with pytest.raises(InputError, match=says):
        load_dataset(str(tmp_path / "d.safetensors"), "test")


def test_safetensors_dataset_keeps_unlabelled_samples_and_small_integer_labels(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"images": U8, "labels": torch.tensor([0, -1, 2, 1], dtype=torch.int8)}, str(tmp_path / "d.safetensors"))
    ds = load_dataset(str(tmp_path / "d.safetensors"), "test")
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == [0, -1, 2, 1]


def test_channel_stats_against_torch() -> None:
    gen = torch.Generator().manual_seed(5)
    images = torch.randint(0, 256, (9, 3, 7, 5), dtype=torch.uint8, generator=gen)
    images[:, 2] //= 4  # channels with different statistics
    ds = Dataset("toy", "test", images, torch.zeros(9, dtype=torch.int64), ["a"], "memory")
    mean, std = ds.channel_stats()
    x = images.double() / 255
    want_mean = x.mean(dim=(0, 2, 3))
    want_std = x.permute(1, 0, 2, 3).reshape(3, -1).std(dim=1, unbiased=False)
    assert mean == pytest.approx(want_mean.tolist(), abs=1e-6)
    assert std == pytest.approx(want_std.tolist(), abs=1e-6)


FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not FASHION_MNIST.is_dir(), reason="Debian's dataset-fashion-mnist is not installed")
def test_real_fashion_mnist_test_split(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EETOOL_DATA_DIR", raising=False)
    ds = load_dataset("fashion-mnist", "test")
    assert len(ds) == 10000 and ds.images.shape[1:] == (1, 28, 28)
    assert sorted(set(ds.labels.tolist())) == list(range(10))
