"""The one checkpoint loader (and writer) shared by every command.

eetool's own checkpoints are safetensors files whose metadata records the architecture, its
arguments, the number of classes and their names, the input shape and the normalisation, so
later commands need only ``--checkpoint FILE``. Foreign weights (.safetensors, .pt, .pth state
dicts) load with ``--arch`` and friends; ``demo`` names the embedded checkpoint.
"""

from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eetool.archs import IMAGENET_INPUT_SHAPE, IMAGENET_MEAN, IMAGENET_STD, TORCHVISION_ARCHS
from eetool.artifacts import Provenance, read_safetensors, sha256_file, write_tensors
from eetool.errors import InputError, ModelMismatchError, UsageError
from eetool.models import build_model
from eetool.sources import demo_path

DEMO_CHECKPOINT = "demo-resnet20-fashion-mnist.safetensors"
SPEC_KEY = "eetool.model"


@dataclass
class ModelSpec:
    """Everything needed to rebuild a model and feed it: stored in an eetool checkpoint's metadata."""

    arch: str
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: list[float]
    std: list[float]
    arch_args: dict[str, Any] = field(default_factory=dict)
    classes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        d = json.loads(text)
        d["input_shape"] = tuple(d["input_shape"])
        return cls(**d)

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.input_shape[0], self.arch_args)


@dataclass
class Checkpoint:
    path: str
    sha256: str
    spec: ModelSpec
    model: nn.Module
    provenance: Provenance | None = None

    @property
    def label(self) -> str:
        return f"{Path(self.path).name} ({self.spec.arch}, sha256 {self.sha256[:12]})"


def resolve_path(ref: str) -> str:
    return str(demo_path(DEMO_CHECKPOINT)) if ref == "demo" else ref


def load_checkpoint(ref: str, *, arch: str | None = None, arch_args: dict[str, Any] | None = None,
                    num_classes: int | None = None, input_shape: tuple[int, int, int] | None = None,
                    mean: list[float] | None = None, std: list[float] | None = None) -> Checkpoint:
    """Load a checkpoint in eval mode. Flags given for an eetool checkpoint override its metadata."""
    path = resolve_path(ref)
    p = Path(path)
    if not p.is_file():
        raise InputError(f"checkpoint {ref} does not exist", "check the path, or use --checkpoint demo")
    suffix = p.suffix.lower()
    provenance = None
    stored: ModelSpec | None = None
    if suffix == ".safetensors":
        state, meta = read_safetensors(path)
        if SPEC_KEY in meta:
            stored = ModelSpec.from_json(meta[SPEC_KEY])
            provenance = Provenance.from_metadata(meta) if "eetool.kind" in meta else None
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state = _load_torch_state(path)
    else:
        raise InputError(f"checkpoint {ref} is neither .safetensors nor .pt/.pth",
                         "save the state dict as .safetensors or .pt")
    spec = _resolve_spec(ref, stored, arch, arch_args, num_classes, input_shape, mean, std)
    model = spec.build()
    _load_state(model, state, spec, ref)
    model.eval()
    return Checkpoint(path=path, sha256=sha256_file(path), spec=spec, model=model, provenance=provenance)


def _resolve_spec(ref: str, stored: ModelSpec | None, arch: str | None, arch_args: dict[str, Any] | None,
                  num_classes: int | None, input_shape: tuple[int, int, int] | None,
                  mean: list[float] | None, std: list[float] | None) -> ModelSpec:
    if stored is not None:
        spec = stored
        if arch and arch != spec.arch:
            raise ModelMismatchError(f"{ref} holds a {spec.arch}, not {arch}",
                                     "drop --arch: eetool checkpoints record it")
        if num_classes and num_classes != spec.num_classes:
            raise ModelMismatchError(
                f"{ref} has {spec.num_classes} classes, not {num_classes}",
                "drop --num-classes: eetool checkpoints record it",
            )
        spec.input_shape = tuple(input_shape) if input_shape else spec.input_shape  # type: ignore[assignment]
        spec.mean = list(mean) if mean else spec.mean
        spec.std = list(std) if std else spec.std
        return spec
    if not arch:
        raise UsageError(f"{ref} does not record its architecture", "pass --arch (see `eetool archs`)")
    imagenet_like = arch in TORCHVISION_ARCHS
    shape = tuple(input_shape) if input_shape else (IMAGENET_INPUT_SHAPE if imagenet_like else None)
    if shape is None:
        raise UsageError(f"{ref} does not record its input shape", "pass --input-shape C,H,W (e.g. 1,28,28)")
    return ModelSpec(
        arch=arch,
        arch_args=dict(arch_args or {}),
        num_classes=num_classes or (1000 if imagenet_like else 10),
        input_shape=shape,  # type: ignore[arg-type]
        mean=list(mean) if mean else list(IMAGENET_MEAN if imagenet_like else [0.5] * shape[0]),
        std=list(std) if std else list(IMAGENET_STD if imagenet_like else [0.5] * shape[0]),
    )


def _load_torch_state(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # Only a refused class ("Unsupported class" before torch 2.4) means a pickled object: a corrupt file
        # is refused with the same weights_only preamble ("Unsupported operand").
        if "Unsupported global" in str(e) or "Unsupported class" in str(e):
            raise InputError(
                f"{path} pickles a whole model object, which eetool will not unpickle (it can run arbitrary code)",
                "convert it once, if you trust it: python -c \"import torch; m = torch.load('IN', weights_only=False); "
                "torch.save(m.state_dict(), 'OUT.pt')\"",
            ) from None
        raise InputError(f"{path} is not a readable torch file ({str(e).splitlines()[0]})",
                         "re-save the state dict") from None
    except Exception as e:  # garbage also raises IndexError, KeyError, ...: all the same problem for the user
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise InputError(f"{path} is not a readable torch file ({msg})",
                         "re-save it with torch.save(model.state_dict())") from None
    return _unwrap_state(obj, path)


def _unwrap_state(obj: Any, path: str) -> dict[str, torch.Tensor]:
    """Find the state dict in the usual training-script wrappers."""
    for key in ("state_dict", "model", "model_state_dict", "net"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(f"{path} holds no state dict of tensors", "save it with torch.save(model.state_dict(), PATH)")
    return obj


def _strip_prefixes(state: dict[str, torch.Tensor], expected: set[str]) -> dict[str, torch.Tensor]:
    """Drop a ``module.`` (DataParallel) or ``model.`` (Lightning) prefix that the model does not have."""
    for prefix in ("module.", "model.", "_orig_mod."):
        if not (set(state) & expected) and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_state(model: nn.Module, state: dict[str, torch.Tensor], spec: ModelSpec, ref: str) -> None:
    expected = model.state_dict()
    state = _strip_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    hint = "check --arch, --arch-args and --num-classes against how the weights were made"
    for k, v in state.items():
        if k in expected and v.shape != expected[k].shape:
            raise ModelMismatchError(
                f"weights do not fit {spec.arch}: {k} is {tuple(v.shape)} in {ref} but {tuple(expected[k].shape)} "
                f"in the model", hint)
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelMismatchError(
            f"weights do not fit {spec.arch}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"({detail})",
            hint,
        )
    model.load_state_dict(state)


def save_checkpoint(path: str, model: nn.Module, spec: ModelSpec, prov: Provenance) -> None:
    """Write an eetool checkpoint atomically; ``prov`` records how the weights were made."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_tensors(path, state, prov, extra={SPEC_KEY: spec.to_json()})
