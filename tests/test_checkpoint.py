"""The checkpoint loader: eetool checkpoints, foreign state dicts in their usual wrappers, and refusals."""

from __future__ import annotations

import hashlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from eetool.core.architectures import ModelOptions
from eetool.core.artifacts import Provenance
from eetool.core.builders import build_model
from eetool.core.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from eetool.core.errors import InputError, ModelMismatchError, UsageError

SHAPE = (1, 12, 12)


def trained_looking(seed: int = 0, num_classes: int = 10) -> nn.Module:
    """A width-4 ResNet-20 with random weights and BatchNorm statistics (all of its state matters)."""
    torch.manual_seed(seed)
    model = build_model("resnet20", num_classes, 1, {"width": 4})
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def outputs(model: nn.Module) -> torch.Tensor:
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        return model.eval()(x)


def foreign_kwargs() -> dict:
    return {"arch": "resnet20", "arch_args": {"width": 4}, "input_shape": SHAPE}


def test_round_trip(tmp_path: Path) -> None:
    model = trained_looking()
    spec = ModelSpec(arch="resnet20", num_classes=10, input_shape=SHAPE, mean=[0.2], std=[0.3],
                     arch_args={"width": 4}, classes=[f"k{i}" for i in range(10)])
    path = tmp_path / "m.safetensors"
    save_checkpoint(str(path), model, spec, Provenance(kind="checkpoint", dataset="toy/train:abc"))
    ckpt = load_checkpoint(str(path))
    assert ckpt.spec == spec
    assert ckpt.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert ckpt.provenance is not None and ckpt.provenance.dataset == "toy/train:abc"
    assert not ckpt.model.training
    assert torch.equal(outputs(ckpt.model), outputs(model))
    for k, v in model.state_dict().items():
        assert torch.equal(ckpt.model.state_dict()[k], v)


def test_flags_override_an_eetool_checkpoint(tiny_checkpoint: str) -> None:
    ckpt = load_checkpoint(tiny_checkpoint, ModelOptions(input_shape=(1, 16, 16), mean=[0.1], std=[0.9]))
    assert ckpt.spec.input_shape == (1, 16, 16) and ckpt.spec.mean == [0.1] and ckpt.spec.std == [0.9]
    with pytest.raises(ModelMismatchError):
        load_checkpoint(tiny_checkpoint, ModelOptions(arch="resnet32"))
    with pytest.raises(ModelMismatchError):
        load_checkpoint(tiny_checkpoint, ModelOptions(num_classes=7))


def test_pt_state_dict_with_arch(tmp_path: Path) -> None:
    model = trained_looking()
    path = tmp_path / "weights.pt"
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
    assert ckpt.spec.arch == "resnet20" and ckpt.spec.num_classes == 10 and ckpt.spec.input_shape == SHAPE
    assert ckpt.provenance is None
    assert torch.equal(outputs(ckpt.model), outputs(model))


@pytest.mark.parametrize("wrap", [
    lambda s: {f"module.{k}": v for k, v in s.items()},  # DataParallel
    lambda s: {f"model.{k}": v for k, v in s.items()},  # Lightning
    lambda s: {"state_dict": s, "epoch": 3},
    lambda s: {"model": s, "optimizer": {"lr": 0.1}},
    lambda s: {"model_state_dict": s},
    lambda s: {"net": {f"module.{k}": v for k, v in s.items()}},
    lambda s: {"state_dict": {f"model.{k}": v for k, v in s.items()}},  # a Lightning checkpoint
], ids=["module", "model", "state_dict", "model-key", "model_state_dict", "net+module", "lightning"])
def test_wrapped_state_dicts(tmp_path: Path, wrap) -> None:  # type: ignore[no-untyped-def]
    model = trained_looking()
    path = tmp_path / "weights.pth"
    torch.save(wrap(model.state_dict()), path)
    ckpt = load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
    assert torch.equal(outputs(ckpt.model), outputs(model))


def test_foreign_safetensors_with_prefix(tmp_path: Path) -> None:
    model = trained_looking()
    path = tmp_path / "weights.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in model.state_dict().items()}, str(path))
    with pytest.raises(UsageError):
        load_checkpoint(str(path))  # nothing says what architecture this is
    ckpt = load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
    assert torch.equal(outputs(ckpt.model), outputs(model))


def test_foreign_weights_need_arch_and_shape(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(trained_looking().state_dict(), path)
    with pytest.raises(UsageError):
        load_checkpoint(str(path))
    with pytest.raises(UsageError):  # eetool's CIFAR ResNets have no standard input size
        load_checkpoint(str(path), ModelOptions(arch="resnet20", arch_args={"width": 4}))


def test_torchvision_weights_default_to_imagenet(tmp_path: Path) -> None:
    model = build_model("mobilenet_v3_small", 1000, 3)
    path = tmp_path / "mnv3.pt"
    torch.save(model.state_dict(), path)
    ckpt = load_checkpoint(str(path), ModelOptions(arch="mobilenet_v3_small"))
    assert ckpt.spec.input_shape == (3, 224, 224) and ckpt.spec.num_classes == 1000
    assert ckpt.spec.mean == pytest.approx([0.485, 0.456, 0.406])


def test_whole_pickled_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "whole.pt"
    torch.save(trained_looking(), path)
    with pytest.raises(InputError) as err:
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
    assert "whole model" in err.value.problem
    assert err.value.hint is not None and "state_dict()" in err.value.hint and "weights_only=False" in err.value.hint


@pytest.mark.parametrize("content", [b"abc" * 10, b"", bytes(range(256)) * 3, b"\x80\x02}q\x00(X\x01"])
def test_garbage_pt_is_bad_input_not_a_pickled_model(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "junk.pt"
    path.write_bytes(content)
    with pytest.raises(InputError) as err:
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
    assert "whole model" not in err.value.problem


def test_truncated_pt(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(trained_looking().state_dict(), path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))


def test_pt_without_tensors(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(InputError):
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))


@pytest.mark.parametrize("kwargs", [
    {"num_classes": 5},  # the fc layer is 10 x 16 in the file
    {"arch_args": {"width": 8}},
    {"arch": "resnet32"},  # more blocks than the file has
])
def test_weights_that_do_not_fit(tmp_path: Path, kwargs: dict) -> None:
    path = tmp_path / "weights.pt"
    torch.save(trained_looking().state_dict(), path)
    with pytest.raises(ModelMismatchError):
        load_checkpoint(str(path), ModelOptions(**{**foreign_kwargs(), **kwargs}))


def test_missing_and_unexpected_tensors(tmp_path: Path) -> None:
    state = trained_looking().state_dict()
    path = tmp_path / "weights.pt"
    torch.save({k: v for k, v in state.items() if k != "fc.bias"}, path)
    with pytest.raises(ModelMismatchError):
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
    torch.save({**state, "extra.weight": torch.zeros(2)}, path)
    with pytest.raises(ModelMismatchError):
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_safetensors(tmp_path: Path, tiny_checkpoint: str, damage: str) -> None:
    data = Path(tiny_checkpoint).read_bytes()
    path = tmp_path / "bad.safetensors"
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x10\x00" * 50, "empty": b""}[damage])
    with pytest.raises(InputError):
        load_checkpoint(str(path))


def test_missing_file_and_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(InputError):
        load_checkpoint(str(tmp_path / "absent.safetensors"))
    path = tmp_path / "weights.onnx"
    path.write_bytes(b"x")
    with pytest.raises(InputError):
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))


# ---------------------------------------------------------------------------------------------
# Custom architectures


CUSTOM = textwrap.dedent('''
    from torch import nn


    def make(num_classes, width=3):
        return nn.Sequential(nn.Conv2d(1, width, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(1),
                             nn.Linear(width, num_classes))


    def not_a_model(num_classes):
        return "nope"
''')


@pytest.fixture()
def custom_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    name = "eetool_test_custom_arch"
    (tmp_path / f"{name}.py").write_text(CUSTOM)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    yield name
    sys.modules.pop(name, None)


def test_custom_architecture(tmp_path: Path, custom_module: str) -> None:
    arch = f"{custom_module}:make"
    model = build_model(arch, 4, 1, {"width": 5})
    assert model[0].out_channels == 5 and model[-1].out_features == 4
    spec = ModelSpec(arch=arch, num_classes=4, input_shape=SHAPE, mean=[0.5], std=[0.5], arch_args={"width": 5})
    path = tmp_path / "custom.safetensors"
    save_checkpoint(str(path), model, spec, Provenance(kind="checkpoint"))
    with pytest.raises(UsageError, match="imports only when you name it"):
        load_checkpoint(str(path))  # a file never names code to run
    ckpt = load_checkpoint(str(path), ModelOptions(arch=arch))
    assert torch.equal(outputs(ckpt.model), outputs(model))


def test_bad_custom_architectures(custom_module: str) -> None:
    for arch, args in ((f"{custom_module}:absent", {}), ("no_such_module_here:make", {}),
                       (f"{custom_module}:not_a_model", {}), (f"{custom_module}:make", {"depth": 3})):
        with pytest.raises(UsageError):
            build_model(arch, 4, 1, args)


def test_bad_arch_args_and_names() -> None:
    with pytest.raises(UsageError):
        build_model("resnet20", 10, 1, {"widht": 4})
    with pytest.raises(UsageError):
        build_model("resnet18", 10, 3, {"no_such_argument": 1})
    with pytest.raises(UsageError, match="never downloads"):
        build_model("resnet18", 10, 3, {"weights": "IMAGENET1K_V1"})
    with pytest.raises(UsageError, match="stem_pool applies to ResNets"):
        build_model("vgg11", 10, 1, {"stem_pool": False})
    with pytest.raises(UsageError, match="width"):
        build_model("resnet20", 10, 1, {"width": 10**9})
    with pytest.raises(UsageError):
        build_model("alexnet9000", 10, 3)


# ---------------------------------------------------------------------------------------------
# The checkpoints people already have: torchvision classifiers adapted to their weights


def torchvision_resnet18_one_channel(small_stem: bool) -> nn.Module:
    """What a plain PyTorch script for Fashion-MNIST makes: resnet18(num_classes=10) with a one-channel stem."""
    import torchvision

    torch.manual_seed(1)
    model = torchvision.models.resnet18(num_classes=10)
    if small_stem:
        model.conv1 = nn.Conv2d(1, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    else:
        model.conv1 = nn.Conv2d(1, 64, 7, 2, 3, bias=False)
    return model.eval()


@pytest.mark.parametrize("small_stem", [False, True], ids=["7x7-stem", "3x3-stem-no-pool"])
def test_torchvision_weights_with_one_channel_and_ten_classes(tmp_path: Path, small_stem: bool) -> None:
    model = torchvision_resnet18_one_channel(small_stem)
    path = tmp_path / "resnet18-fmnist.pt"
    torch.save(model.state_dict(), path)
    args = {"stem_stride": 1, "stem_pool": False} if small_stem else {}
    ckpt = load_checkpoint(str(path), ModelOptions(arch="resnet18", arch_args=args, input_shape=(1, 28, 28),
                                                   mean=[0.286], std=[0.353]))
    assert ckpt.spec.num_classes == 10  # read from fc.weight
    assert ckpt.spec.arch_args == ({"stem_kernel": 3, **args} if small_stem else {})  # the kernel from conv1.weight
    x = torch.randn(2, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(ckpt.model(x), model(x))
    # the same weights with the channels left to the weights: torchvision's 224 x 224 default
    assert load_checkpoint(str(path), ModelOptions(arch="resnet18", arch_args=args)).spec.input_shape == (1, 224, 224)


def test_foreign_identity_is_the_weights_and_the_options(tmp_path: Path) -> None:
    path = tmp_path / "weights.pt"
    torch.save(trained_looking().state_dict(), path)
    file_sha = hashlib.sha256(path.read_bytes()).hexdigest()
    a = load_checkpoint(str(path), ModelOptions(**foreign_kwargs(), mean=[0.2], std=[0.3]))
    again = load_checkpoint(str(path), ModelOptions(**foreign_kwargs(), mean=[0.2], std=[0.3]))
    other = load_checkpoint(str(path), ModelOptions(**foreign_kwargs(), mean=[0.5], std=[0.3]))
    assert a.sha256 == again.sha256 and a.model_sha256 == again.model_sha256
    assert a.sha256 != file_sha and other.sha256 != a.sha256 and other.model_sha256 != a.model_sha256
    # An eetool copy of the same weights and spec computes the same: the same model sha256, another file sha256.
    copy = tmp_path / "copy.safetensors"
    save_checkpoint(str(copy), a.model, a.spec, Provenance(kind="checkpoint", checkpoint_sha256=a.sha256))
    imported = load_checkpoint(str(copy))
    assert imported.model_sha256 == a.model_sha256 and imported.sha256 != a.sha256
    assert imported.sha256 == hashlib.sha256(copy.read_bytes()).hexdigest()
    # Overriding what the copy records makes it another model again.
    assert load_checkpoint(str(copy), ModelOptions(mean=[0.5])).model_sha256 == other.model_sha256


def test_a_file_never_names_code_to_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    called: list[object] = []
    monkeypatch.setattr(os, "system", lambda *a: called.append(a) or 0)
    spec = ModelSpec(arch="os:system", num_classes=10, input_shape=SHAPE, mean=[0.5], std=[0.5],
                     arch_args={"command": "touch pwned"})
    path = tmp_path / "evil.safetensors"
    save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "pt", "eetool.model": spec.to_json()})
    with pytest.raises(UsageError, match="--arch os:system"):
        load_checkpoint(str(path))
    assert called == []


@pytest.mark.parametrize("change, says", [
    ({"input_shape": [1, 60000, 60000]}, "input shape"),
    ({"input_shape": [1, 28]}, "input shape"),
    ({"num_classes": 10**9}, "classes"),
    ({"num_classes": "10"}, "classes"),
    ({"mean": [0.5, 0.5]}, "mean"),
    ({"std": [0.0]}, "std"),
    ({"classes": ["a", "b"]}, "class names"),
    ({"arch": None}, "architecture"),
])
def test_metadata_sizes_and_types_are_checked_before_building(tmp_path: Path, tiny_checkpoint: str, change: dict,
                                                              says: str) -> None:
    from safetensors import safe_open

    with safe_open(tiny_checkpoint, framework="pt") as f:
        meta = dict(f.metadata())
        state = {k: f.get_tensor(k) for k in f.keys()}
    meta["eetool.model"] = json.dumps({**json.loads(meta["eetool.model"]), **change})
    path = tmp_path / "edited.safetensors"
    save_file(state, str(path), metadata=meta)
    with pytest.raises(InputError, match=says):
        load_checkpoint(str(path))


def test_unreadable_spec_metadata_is_bad_input(tmp_path: Path) -> None:
    path = tmp_path / "edited.safetensors"
    for text in ("{not json", "[1, 2]", json.dumps({"arch": "resnet20"})):
        save_file({"w": torch.zeros(1)}, str(path), metadata={"format": "pt", "eetool.model": text})
        with pytest.raises(InputError, match="eetool.model"):
            load_checkpoint(str(path))


def test_weights_are_checked_on_a_skeleton_before_the_model_is_allocated(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Options asking for a far larger model than the weights (here 16 GB of classifier) are refused on a
    skeleton on the meta device: the real model is never built."""
    path = tmp_path / "weights.pt"
    torch.save(trained_looking().state_dict(), path)
    devices: list[str] = []
    real_build = ModelSpec.build

    def build(self: ModelSpec) -> nn.Module:
        devices.append(str(torch.get_default_device()))
        return real_build(self)

    monkeypatch.setattr(ModelSpec, "build", build)
    with pytest.raises(ModelMismatchError):
        load_checkpoint(str(path), ModelOptions(arch="resnet20", arch_args={"width": 1024}, num_classes=1_000_000,
                                                input_shape=SHAPE))
    assert devices and set(devices) == {"meta"}
    load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
    assert devices[-1] == "cpu"  # weights that fit are then loaded into a real model


def test_non_finite_weights_are_refused(tmp_path: Path) -> None:
    state = trained_looking().state_dict()
    state["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")
    path = tmp_path / "weights.pt"
    torch.save(state, path)
    with pytest.raises(InputError, match="NaN or infinite values in layer1.0.conv1.weight"):
        load_checkpoint(str(path), ModelOptions(**foreign_kwargs()))
