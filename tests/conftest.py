"""Shared fixtures: a small real-shaped checkpoint and small datasets, made fresh per session."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

from eetool.core.artifacts import Provenance
from eetool.core.checkpoint import ModelSpec, save_checkpoint

CLASSES = [f"c{k}" for k in range(10)]


@pytest.fixture(scope="session")
def tiny_spec() -> ModelSpec:
    return ModelSpec(arch="resnet20", num_classes=10, input_shape=(1, 28, 28), mean=[0.3], std=[0.35],
                     arch_args={"width": 4}, classes=CLASSES)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory, tiny_spec: ModelSpec) -> str:
    """An untrained ResNet-20 of width 4 (fast), saved as an eetool checkpoint."""
    torch.manual_seed(0)
    model = tiny_spec.build()
    path = tmp_path_factory.mktemp("ckpt") / "tiny.safetensors"
    save_checkpoint(str(path), model, tiny_spec, Provenance(kind="checkpoint", args={"made_by": "tests"}))
    return str(path)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A safetensors dataset of 96 train and 64 test 28x28 images (random pixels, balanced labels)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for split, n in (("train", 96), ("test", 64)):
        tensors[f"{split}.images"] = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
        tensors[f"{split}.labels"] = torch.arange(n, dtype=torch.int64) % 10
    path = tmp_path_factory.mktemp("data") / "tiny-data.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "classes": "\n".join(CLASSES)})
    return str(path)


@pytest.fixture(scope="module")
def tiny_lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny randomly initialised Llama-style model folder (tests/lm_helpers.py), made once per test module."""
    from tests.lm_helpers import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture(scope="module")
def tiny_lm(tiny_lm_folder: Path) -> Any:
    """The tiny model loaded as eetool loads a language model (shared by a module's tests: do not train it)."""
    from eetool.lm.models import load_language_model

    return load_language_model(str(tiny_lm_folder))


@pytest.fixture()
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture(scope="session")
def load_script() -> Callable[[str], ModuleType]:
    """Imports a script of the repository (``reproduce/segmentation.py``) as a module, its folder on the path as
    when it is run (the reproduction scripts import the step runner beside them)."""
    def load(relative: str) -> ModuleType:
        script = Path(__file__).resolve().parents[1] / relative
        sys.path.insert(0, str(script.parent))
        spec = importlib.util.spec_from_file_location(f"{script.parent.name}_{script.stem}", script)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        return module

    return load
