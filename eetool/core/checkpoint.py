"""The one checkpoint loader (and writer): eetool's safetensors checkpoints record how to build the model, so
later commands need only ``--checkpoint FILE``; foreign weights load with ``--arch`` and friends; ``demo`` is
the embedded one.

Format: docs/architectures.md
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from eetool.core.architectures import (
    IMAGENET_INPUT_SHAPE,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MAX_CLASSES,
    MAX_INPUT_CHANNELS,
    MAX_INPUT_SIDE,
    TORCHVISION_ARCHS,
    TORCHVISION_SEGMENTATION_ARCHS,
    ModelOptions,
    is_custom_arch,
)
from eetool.core.artifacts import (
    CheckpointIdentity,
    Provenance,
    read_safetensors,
    require_file,
    sha256_file,
    write_tensors,
)
from eetool.core.builders import build_model, first_conv, last_linear
from eetool.core.errors import InputError, ModelMismatchError, UsageError
from eetool.core.sources import demo_path

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
    # Folder images: shorter side resized to this before the centre crop to the input size (eetool.core.loading);
    # None: the architecture's default. Left out of the JSON when None, so that older files keep their hashes.
    resize: int | None = None

    def _fields(self) -> dict[str, object]:
        return {k: v for k, v in asdict(self).items() if not (k == "resize" and v is None)}

    def to_json(self) -> str:
        return json.dumps(self._fields(), sort_keys=True)

    def computation_json(self) -> str:
        """What decides the model's outputs (everything but the class names), canonically."""
        return json.dumps({k: v for k, v in self._fields().items() if k != "classes"}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, where: str = "checkpoint") -> ModelSpec:
        """Read and check a spec from a file's metadata: wrong types or missing keys are bad input, not a crash."""
        hint = "re-make it with `eetool train` or `eetool import`"
        try:
            d = json.loads(text)
            spec = cls(arch=d["arch"], num_classes=d["num_classes"], input_shape=tuple(d["input_shape"]),
                       mean=list(d["mean"]), std=list(d["std"]), arch_args=dict(d.get("arch_args") or {}),
                       classes=list(d.get("classes") or []), resize=d.get("resize"))
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"{where} has unreadable {SPEC_KEY} metadata ({type(e).__name__}: {e})", hint) from None
        spec.check(where, hint)
        return spec

    def check(self, where: str, hint: str) -> None:
        """Sizes and values within bounds before anything is built or allocated from them."""
        def bad(what: str) -> InputError:
            return InputError(f"{where}: {what}", hint)

        if not isinstance(self.arch, str) or not self.arch:
            raise bad("the architecture is not a name")
        if not _whole(self.num_classes) or not 1 <= self.num_classes <= MAX_CLASSES:
            raise bad(f"{self.num_classes!r} classes is not a number from 1 to {MAX_CLASSES:,}")
        shape = self.input_shape
        if (len(shape) != 3 or not all(_whole(v) and v >= 1 for v in shape) or shape[0] > MAX_INPUT_CHANNELS
                or max(shape[1:]) > MAX_INPUT_SIDE):
            raise bad(f"input shape {list(shape)} is not C,H,W within {MAX_INPUT_CHANNELS} channels and "
                      f"{MAX_INPUT_SIDE} pixels a side")
        for name, values in (("mean", self.mean), ("std", self.std)):
            if (len(values) not in (1, shape[0]) or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                            and math.isfinite(v) for v in values)):
                raise bad(f"normalisation {name} {values!r} is not 1 or {shape[0]} finite numbers")
        if min(self.std) <= 0:
            raise bad(f"normalisation std {self.std!r} is not positive")
        if self.resize is not None and (not _whole(self.resize) or not 1 <= self.resize <= MAX_INPUT_SIDE):
            raise bad(f"resize {self.resize!r} is not a number of pixels from 1 to {MAX_INPUT_SIDE}")
        names_ok = all(isinstance(c, str) for c in self.classes)
        if self.classes and (len(self.classes) != self.num_classes or not names_ok):
            raise bad(f"{len(self.classes)} class names for {self.num_classes} classes")

    def build(self) -> nn.Module:
        return build_model(self.arch, self.num_classes, self.input_shape[0], self.arch_args)


def _whole(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass
class Checkpoint:
    path: str
    sha256: str  # the file's sha256; for weights the file does not describe alone, with the options that built them
    spec: ModelSpec
    model: nn.Module
    provenance: Provenance | None = None
    model_sha256: str = ""  # of the spec's computation and the weights: the same for a foreign file and its import

    @property
    def label(self) -> str:
        return f"{Path(self.path).name} ({self.spec.arch}, sha256 {self.sha256[:12]})"

    @property
    def identity(self) -> CheckpointIdentity:
        return CheckpointIdentity(self.sha256, self.model_sha256)


def resolve_path(ref: str) -> str:
    return str(demo_path(DEMO_CHECKPOINT)) if ref == "demo" else ref


def load_checkpoint(ref: str, options: ModelOptions | None = None) -> Checkpoint:
    """Load a checkpoint in eval mode. ``options`` describe foreign weights; for an eetool checkpoint
    --input-shape, --mean and --std override its metadata and the rest must agree with it."""
    options = options or ModelOptions()
    path = resolve_path(ref)
    p = require_file(path, "checkpoint", "check the path, or use --checkpoint demo")
    suffix = p.suffix.lower()
    provenance = None
    stored: ModelSpec | None = None
    if suffix == ".safetensors":
        state, meta = read_safetensors(path)
        if SPEC_KEY in meta:
            stored = ModelSpec.from_json(meta[SPEC_KEY], ref)
            provenance = Provenance.from_metadata(meta) if "eetool.kind" in meta else None
    elif suffix in (".pt", ".pth", ".bin", ".ckpt"):
        state = _load_torch_state(path)
    else:
        raise InputError(f"checkpoint {ref} is neither .safetensors nor .pt/.pth",
                         "save the state dict as .safetensors or .pt")
    spec = _stored_spec(ref, stored, options) if stored is not None else _foreign_spec(ref, state, options)
    spec.check(ref, "check --input-shape, --mean and --std")
    model = _load_state(spec, state, ref)
    model.eval()
    file_sha = sha256_file(path)
    sha = file_sha if spec == stored else hashlib.sha256(f"{file_sha}\n{spec.computation_json()}".encode()).hexdigest()
    return Checkpoint(path=path, sha256=sha, spec=spec, model=model, provenance=provenance,
                      model_sha256=model_sha256(spec, model))


def model_sha256(spec: ModelSpec, model: nn.Module) -> str:
    """sha256 of what the model computes: its spec (without class names) and every tensor of its state."""
    h = hashlib.sha256(spec.computation_json().encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"\n{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _stored_spec(ref: str, stored: ModelSpec, options: ModelOptions) -> ModelSpec:
    spec = stored
    if is_custom_arch(spec.arch) and options.arch != spec.arch:
        # A file never names code to run: only the user does, on the command line or in --config.
        raise UsageError(f"{ref} records the custom architecture {spec.arch!r}, which eetool imports only when you "
                         "name it", f"pass --arch {spec.arch} if you trust that code")
    if options.arch and options.arch != spec.arch:
        raise ModelMismatchError(f"{ref} holds a {spec.arch}, not {options.arch}",
                                 "drop --arch: eetool checkpoints record it")
    if options.num_classes and options.num_classes != spec.num_classes:
        raise ModelMismatchError(f"{ref} has {spec.num_classes} classes, not {options.num_classes}",
                                 "drop --num-classes: eetool checkpoints record it")
    if options.arch_args and options.arch_args != spec.arch_args:
        raise ModelMismatchError(f"{ref} was built with --arch-args {json.dumps(spec.arch_args)}, not "
                                 f"{json.dumps(options.arch_args)}", "drop --arch-args: eetool checkpoints record them")
    return ModelSpec(arch=spec.arch, num_classes=spec.num_classes,
                     input_shape=tuple(options.input_shape) if options.input_shape else spec.input_shape,  # type: ignore[arg-type]
                     mean=list(options.mean) if options.mean else spec.mean,
                     std=list(options.std) if options.std else spec.std,
                     arch_args=spec.arch_args, classes=spec.classes, resize=spec.resize)


def _foreign_spec(ref: str, state: dict[str, torch.Tensor], options: ModelOptions) -> ModelSpec:
    """The spec of weights that do not record it: the options, and what the weights' shapes tell."""
    if not options.arch:
        raise UsageError(f"{ref} does not record its architecture",
                         "pass --arch (see `eetool archs`), or make it an eetool checkpoint once with `eetool import`")
    arch, arch_args = options.arch, dict(options.arch_args)
    imagenet_like = arch in TORCHVISION_ARCHS or arch in TORCHVISION_SEGMENTATION_ARCHS
    num_classes, in_channels = options.num_classes, None
    skeleton = _skeleton(ModelSpec(arch, num_classes or 1000, (3, 1, 1), [0.5], [0.5], arch_args))
    if skeleton is not None:
        inferred = _inferred_shapes(skeleton, _strip_prefixes(state, set(skeleton.state_dict())))
        num_classes = num_classes or inferred.get("num_classes")
        in_channels = inferred.get("in_channels")
        stem_kernel = inferred.get("stem_kernel")
        if imagenet_like and "stem_kernel" not in arch_args and stem_kernel != inferred.get("kernel"):
            arch_args["stem_kernel"] = stem_kernel  # e.g. a 3x3 stem for small images
    if options.input_shape:
        shape = tuple(options.input_shape)
    elif imagenet_like:
        shape = (in_channels or IMAGENET_INPUT_SHAPE[0], *IMAGENET_INPUT_SHAPE[1:])
    else:
        raise UsageError(f"{ref} does not record its input shape", "pass --input-shape C,H,W (e.g. 1,28,28)")
    imagenet_norm = imagenet_like and shape[0] == 3
    mean = options.mean or list(IMAGENET_MEAN if imagenet_norm else [0.5] * shape[0])
    std = options.std or list(IMAGENET_STD if imagenet_norm else [0.5] * shape[0])
    if not (options.mean and options.std) and not imagenet_norm:
        warnings.warn(f"{ref}: no --mean/--std given, normalising with mean {mean} and std {std}; pass the ones "
                      "the weights were trained with", UserWarning, stacklevel=2)
    # resize stays unset: the architecture's default (torchvision's 256 for 224) applies, and the weights keep the
    # model sha256 they had before the spec could record it (artifacts made from them stay valid)
    return ModelSpec(arch=arch, arch_args=arch_args, num_classes=num_classes or (1000 if imagenet_like else 10),
                     input_shape=shape, mean=list(mean), std=list(std))  # type: ignore[arg-type]


def _skeleton(spec: ModelSpec) -> nn.Module | None:
    """The model without memory (on the meta device): its names and shapes, whatever sizes it is asked for.
    None for a user's factory that cannot be built there (it is then built for real)."""
    try:
        with torch.device("meta"):
            return spec.build()
    except UsageError:
        raise
    except Exception:
        if is_custom_arch(spec.arch):
            return None
        raise


def _inferred_shapes(skeleton: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Input channels, stem kernel and classes, read from the weights of the first convolution and last linear layer."""
    out: dict[str, int] = {}
    conv = first_conv(skeleton)
    if conv is not None and (w := state.get(f"{conv[0]}.weight")) is not None and w.dim() == 4:
        out |= {"in_channels": int(w.shape[1]), "stem_kernel": int(w.shape[2]), "kernel": conv[1].kernel_size[0]}
    linear = last_linear(skeleton)
    if linear is not None and (w := state.get(f"{linear[0]}.weight")) is not None and w.dim() == 2:
        out["num_classes"] = int(w.shape[0])
    classifier = getattr(skeleton, "classifier", None)  # a segmentation network: its last 1x1 convolution
    if linear is None and isinstance(classifier, nn.Module):
        convs = [n for n, m in classifier.named_modules() if isinstance(m, nn.Conv2d)]
        if convs and (w := state.get(f"classifier.{convs[-1]}.weight")) is not None and w.dim() == 4:
            out["num_classes"] = int(w.shape[0])
    return out


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


def _unwrap_state(obj: object, path: str) -> dict[str, torch.Tensor]:
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


def _load_state(spec: ModelSpec, state: dict[str, torch.Tensor], ref: str) -> nn.Module:
    """Build the model and load the weights, after checking every name and shape on a skeleton of the model,
    so that no size read from a file allocates anything before it is known to fit."""
    skeleton = _skeleton(spec)
    model = None
    if skeleton is None:
        model = spec.build()
        skeleton = model
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    floating = {k for k, v in skeleton.state_dict().items() if v.is_floating_point()}
    state = _strip_prefixes(state, set(expected))
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    hint = "check --arch, --arch-args and --num-classes against how the weights were made"
    for k, v in state.items():
        if k in expected and tuple(v.shape) != expected[k]:
            raise ModelMismatchError(
                f"weights do not fit {spec.arch}: {k} is {tuple(v.shape)} in {ref} but {expected[k]} in the model",
                hint)
    if missing or unexpected:
        detail = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelMismatchError(
            f"weights do not fit {spec.arch}: {len(missing)} missing and {len(unexpected)} unexpected tensors "
            f"({detail})",
            hint,
        )
    for k, v in state.items():
        if k in floating and not v.is_floating_point():  # load_state_dict would cast them without a word
            raise ModelMismatchError(f"weights do not fit {spec.arch}: {k} holds {v.dtype} values in {ref}, the "
                                     "model's are floating-point numbers", "give the model's real (float) weights")
        # A float64 sum of float32 values cannot overflow, so it is finite exactly when every value is.
        if v.is_floating_point() and not (math.isfinite(float(v.sum(dtype=torch.float64)))
                                          or bool(torch.isfinite(v).all())):
            raise InputError(f"{ref} holds NaN or infinite values in {k}",
                             "the weights are damaged or their training diverged: use a good checkpoint")
    model = model or spec.build()
    model.load_state_dict(state)
    return model


def save_checkpoint(path: str, model: nn.Module, spec: ModelSpec, prov: Provenance) -> None:
    """Write an eetool checkpoint atomically; ``prov`` records how the weights were made."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    write_tensors(path, state, prov, extra={SPEC_KEY: spec.to_json()})
