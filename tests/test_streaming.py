"""Folder data: the torchvision ImageNet recipe, held in memory or streamed by DataLoader workers alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from eetool.core import datasets
from eetool.core.artifacts import read_tensors
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import InputError
from eetool.core.loading import DataLoading, DataOptions, Geometry, default_resize
from eetool.core.streaming import centre_crop, decode_image
from tests.cli_helpers import invoke, ok, one_error_line

MEMORY = DataOptions(loading=DataLoading.memory, workers=0)
STREAM = DataOptions(loading=DataLoading.stream, workers=2)


def mixed_folder(root: Path, classes: int = 2, repeats: int = 1) -> Path:
    """RGB and grayscale PNGs and JPEGs, portrait and landscape, of many sizes, in ``classes`` classes."""
    rng = np.random.RandomState(0)
    sizes = [(40, 30), (30, 41), (23, 23), (64, 17), (17, 50), (33, 36), (8, 12), (45, 45), (29, 60)] * repeats
    for i, (h, w) in enumerate(sizes):
        cls = root / (("dog", "cat")[i % 2] if classes == 2 else f"c{i % classes}")
        cls.mkdir(parents=True, exist_ok=True)
        if i % 3 == 2:
            Image.fromarray(rng.randint(0, 256, (h, w)).astype(np.uint8), "L").save(cls / f"{i}.png")
        else:
            pixels = rng.randint(0, 256, (h, w, 3)).astype(np.uint8)
            Image.fromarray(pixels, "RGB").save(cls / f"{i}.{'jpg' if i % 2 else 'png'}")
    return root


def test_the_recipe_is_torchvisions(tmp_path: Path) -> None:
    """Every image of mixed sizes gives the same model input as torchvision's ImageFolder with Resize(int),
    CenterCrop, ToTensor and Normalize: the pixels are the same, so the top-1 of a torchvision ImageNet
    checkpoint would be its reference evaluation's (pretrained weights cannot be downloaded here)."""
    from torchvision import datasets as tv_datasets
    from torchvision import transforms

    root = mixed_folder(tmp_path)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    for resize, crop in ((32, (28, 28)), (20, (24, 16))):  # the second crop is larger than the resized images
        reference = tv_datasets.ImageFolder(str(root), transforms.Compose([
            transforms.Resize(resize), transforms.CenterCrop(crop), transforms.ToTensor(),
            transforms.Normalize(mean, std)]))
        ds = load_dataset(f"folder:{root}", "test", options=MEMORY, geometry=Geometry(resize, crop))
        ours = Preprocess((3, *crop), mean, std)(ds.images)
        assert ds.classes == reference.classes
        for i, (x, label) in enumerate(reference):
            assert int(ds.labels[i]) == label
            torch.testing.assert_close(ours[i], x, rtol=0, atol=1e-6)


def test_default_recipes() -> None:
    assert default_resize("resnet50", (224, 224)) == 256  # torchvision's reference evaluation
    assert default_resize("resnet20", (28, 28)) == 28
    image = torch.arange(2 * 3 * 5, dtype=torch.uint8).view(2, 3, 5)
    assert torch.equal(centre_crop(image, (3, 3)), image[:, :, 1:4])
    padded = centre_crop(image, (5, 5))  # zero borders, as torchvision pads a small image
    assert torch.equal(padded[:, 1:4], image) and not padded[:, 0].any() and not padded[:, 4].any()


@pytest.mark.parametrize("indices", [None, [7, 0, 3, 8]])
def test_memory_and_stream_give_the_same_batches(tmp_path: Path, indices: list[int] | None) -> None:
    root = mixed_folder(tmp_path / "data")
    geometry = Geometry(36, (32, 32))
    spec = f"folder:{root}"
    held = load_dataset(spec, "test", options=MEMORY, geometry=geometry)
    streamed = load_dataset(spec, "test", options=STREAM, geometry=geometry)
    if indices is not None:
        held, streamed = held.subset(torch.tensor(indices)), streamed.subset(torch.tensor(indices))
    assert held.images is not None and held.stream is None
    assert streamed.images is None and streamed.stream is not None
    assert held.fingerprint == streamed.fingerprint and len(held) == len(streamed)
    assert held.image_shape == streamed.image_shape == (3, 32, 32)
    for shuffle in (False, True):
        pairs = zip(held.batches(4, shuffle=shuffle, generator=torch.Generator().manual_seed(5)),
                    streamed.batches(4, shuffle=shuffle, generator=torch.Generator().manual_seed(5)), strict=True)
        for (xa, ya, pa), (xb, yb, pb) in pairs:
            assert torch.equal(xa, xb) and torch.equal(ya, yb) and torch.equal(pa, pb)
    assert held.channel_stats() == streamed.channel_stats()


def test_auto_streams_beyond_the_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = mixed_folder(tmp_path)
    geometry = Geometry(16, (16, 16))
    assert load_dataset(f"folder:{root}", "test", options=DataOptions(workers=0), geometry=geometry).stream is None
    monkeypatch.setattr(datasets, "IN_MEMORY_LIMIT_BYTES", 9 * 3 * 16 * 16 - 1)  # one byte short of 9 images
    assert load_dataset(f"folder:{root}", "test", options=DataOptions(workers=0), geometry=geometry).stream is not None


def test_fingerprint_follows_names_sizes_and_times(tmp_path: Path) -> None:
    root = mixed_folder(tmp_path)
    first = load_dataset(f"folder:{root}", "test", options=STREAM).fingerprint
    assert load_dataset(f"folder:{root}", "test", options=STREAM).fingerprint == first
    touched = root / "dog" / "0.png"
    stat = touched.stat()
    os.utime(touched, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    assert load_dataset(f"folder:{root}", "test", options=STREAM).fingerprint != first


def test_a_bad_image_is_one_error_from_a_worker(tmp_path: Path) -> None:
    root = mixed_folder(tmp_path)
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG but not really")
    ds = load_dataset(f"folder:{root}", "test", options=STREAM, geometry=Geometry(16, (16, 16)))
    with pytest.raises(InputError, match=r"cannot decode image .*broken\.png") as caught:
        for _ in ds.batches(4):
            pass
    assert caught.value.hint == "remove or re-encode the file"
    with pytest.raises(InputError, match=r"broken\.png"):
        decode_image(str(root / "cat" / "broken.png"), Geometry(16, (16, 16)))


def test_calibrate_means_is_the_same_streamed(tmp_path: Path, tiny_checkpoint: str) -> None:
    """The CLI end to end: class means from a folder held in memory equal those streamed by a worker."""
    root = mixed_folder(tmp_path / "data", classes=10, repeats=3)
    outputs = []
    for loading, workers in (("memory", "0"), ("stream", "1")):
        out = tmp_path / f"{loading}.safetensors"
        ok(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", f"folder:{root}", "--split", "test", "-o", out,
                  "--data-loading", loading, "--workers", workers, "-b", "4", "-q", "--format", "json"))
        outputs.append(read_tensors(str(out), "class-means"))
    (held, held_prov, _), (streamed, streamed_prov, _) = outputs
    assert held.keys() == streamed.keys()
    for key in held:
        assert torch.equal(held[key], streamed[key]), key
    assert held_prov.dataset == streamed_prov.dataset


@pytest.mark.parametrize(("flags", "code"), [(["--crop", "0"], 2), (["--crop", "a,b"], 2), (["--workers", "-1"], 2),
                                             (["--data-loading", "disk"], 2)])
def test_bad_loading_flags(tmp_path: Path, tiny_checkpoint: str, flags: list[str], code: int) -> None:
    root = mixed_folder(tmp_path / "data")
    result = invoke("evaluate", "-c", tiny_checkpoint, "-d", f"folder:{root}", *flags)
    if "--crop" in flags:
        one_error_line(result, code)
    else:  # click refuses a value out of range or choice before eetool sees it
        assert result.exit_code == code and result.stdout == ""


def test_streamed_corrupt_image_via_cli(tmp_path: Path, tiny_checkpoint: str) -> None:
    root = mixed_folder(tmp_path / "data")
    (root / "cat" / "broken.png").write_bytes(b"\x89PNG but not really")
    out = tmp_path / "means.safetensors"
    line = one_error_line(invoke("calibrate-means", "-c", tiny_checkpoint, "-d", f"folder:{root}", "--split", "test",
                                 "-o", out, "--data-loading", "stream", "--workers", "1"), 3)
    assert "broken.png" in line and not out.exists()


def test_a_torchvision_checkpoint_sees_what_torchvisions_reference_evaluation_sees(tmp_path: Path) -> None:
    """Weights of a torchvision ResNet-18 (untrained: pretrained ones cannot be downloaded here) on a folder of
    JPEGs of mixed sizes: eetool applies torchvision's recipe (resize 256, crop 224) to them, and its logits
    and its top-1 through `eetool evaluate` are those of the model fed by torchvision's own transforms."""
    from torchvision import datasets as tv_datasets
    from torchvision import models, transforms

    from eetool.core.architectures import IMAGENET_MEAN, IMAGENET_STD, ModelOptions
    from eetool.core.checkpoint import load_checkpoint

    rng = np.random.RandomState(1)
    for i, (h, w) in enumerate([(300, 250), (240, 320), (200, 410)]):
        folder = tmp_path / "data" / "test" / f"k{i % 3}"
        folder.mkdir(parents=True, exist_ok=True)
        smooth = np.kron(rng.randint(0, 256, (h // 10 + 1, w // 10 + 1, 3)), np.ones((10, 10, 1)))[:h, :w]
        Image.fromarray(smooth.astype(np.uint8), "RGB").save(folder / f"{i}.jpg", quality=90)
    torch.manual_seed(0)
    reference_model = models.resnet18(num_classes=3).eval()
    weights = tmp_path / "resnet18.pt"
    torch.save(reference_model.state_dict(), weights)
    reference = tv_datasets.ImageFolder(str(tmp_path / "data" / "test"), transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]))
    x = torch.stack([image for image, _ in reference])
    labels = torch.tensor(reference.targets)
    with torch.no_grad():
        reference_logits = reference_model(x)

    ckpt = load_checkpoint(str(weights), ModelOptions(arch="resnet18"))
    geometry = DataOptions().geometry(ckpt.spec.arch, (224, 224), ckpt.spec.resize)
    assert geometry == Geometry(256, (224, 224)) and ckpt.spec.input_shape == (3, 224, 224)
    ds = load_dataset(f"folder:{tmp_path / 'data'}", "test", options=MEMORY, geometry=geometry)
    with torch.no_grad():
        logits = ckpt.model(Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)(ds.images))
    torch.testing.assert_close(logits, reference_logits, rtol=1e-4, atol=1e-4)

    result = ok(invoke("evaluate", "-c", weights, "--arch", "resnet18", "-d", f"folder:{tmp_path / 'data'}",
                       "--repeats", "1", "--format", "json", "--workers", "0"))
    top1 = float((reference_logits.argmax(1) == labels).double().mean())
    assert json.loads(result.stdout)["points"][0]["accuracy"] == round(top1, 6)
