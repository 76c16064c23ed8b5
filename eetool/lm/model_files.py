"""Checks of a language model's files before transformers reads them: headers and small JSON files only, read
bounded, each size against the file and sane limits, refused with a one-line error (exit 3) naming the file.

Limits: docs/failures.md
"""

from __future__ import annotations

import json
import math
import re
import struct
from pathlib import Path
from typing import Any

from eetool.core.errors import InputError

MODEL_HINT = "give a Hugging Face model folder (config.json, *.safetensors, tokenizer), a .gguf file or demo-lm"
# Sizes a config (or a GGUF header) may give: above any released causal LM, far below what would exhaust memory.
SIZE_LIMITS = {
    "num_hidden_layers": 1024,
    "hidden_size": 65_536,
    "intermediate_size": 1 << 20,
    "vocab_size": 1 << 22,
    "max_position_embeddings": 1 << 24,
    "num_attention_heads": 1024,
    "num_key_value_heads": 1024,
    "head_dim": 8192,
}
MAX_CONFIG_BYTES = 1 << 20  # config.json, generation_config.json
MAX_TOKENIZER_BYTES = 256 << 20  # tokenizer.json of the largest vocabularies is some tens of MB
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on its JSON header
FLOAT_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
OTHER_DTYPES = {"I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4, "U64": 8,
                "F8_E4M3": 1, "F8_E5M2": 1}
TOKENIZER_MODELS = ("BPE", "WordPiece", "WordLevel", "Unigram")  # the tokenizers library's models
_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def check_config(folder: Path) -> dict[str, Any]:
    """A model folder's config.json (returned) and the tokenizer's JSON files, bounded and checked."""
    config = read_json(folder / "config.json", MAX_CONFIG_BYTES, "config")
    check_sizes(folder / "config.json", config)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json"):
        if (folder / name).exists():
            doc = read_json(folder / name, MAX_TOKENIZER_BYTES, "tokenizer file")
            if name == "tokenizer.json":
                check_tokenizer(folder / name, doc)
    return config


def check_tokenizer(path: Path, doc: dict[str, Any]) -> None:
    """The keys of tokenizer.json that transformers and tokenizers index unchecked: ``added_tokens`` (objects with
    ``id`` and ``content``), ``model`` (a known ``type``, a ``vocab``, for BPE ``merges``) and ``version`` 1.0
    where given; a missing one is a one-line error naming it."""

    def bad(problem: str) -> InputError:
        return InputError(f"{path} {problem}", "give the tokenizer.json that came with the model, or re-download it "
                                               "(this one is damaged or not a tokenizer's)")

    if "version" in doc and doc["version"] != "1.0":
        raise bad(f"is of version {doc['version']!r}, where the tokenizers library reads version '1.0'")
    added = doc.get("added_tokens")
    if added is None:
        raise bad("lacks the key 'added_tokens' (the list of the tokens added to the vocabulary, [] for none)")
    if not isinstance(added, list):
        raise bad(f"has added_tokens of type {type(added).__name__}, not a list")
    for n, token in enumerate(added):
        if not isinstance(token, dict):
            raise bad(f"has added_tokens[{n}] of type {type(token).__name__}, not an object")
        for key, kind in (("id", int), ("content", str)):
            if key not in token:
                raise bad(f"lacks the key '{key}' in added_tokens[{n}]")
            if not isinstance(token[key], kind) or isinstance(token[key], bool):
                wanted = "a whole number" if kind is int else "a string"
                raise bad(f"has added_tokens[{n}].{key} = {token[key]!r}, not {wanted}")
    model = doc.get("model")
    if model is None:
        raise bad("lacks the key 'model' (the tokenizer's vocabulary and how it splits text)")
    if not isinstance(model, dict):
        raise bad(f"has a model of type {type(model).__name__}, not an object")
    model_type = model.get("type")
    if model_type is not None and model_type not in TOKENIZER_MODELS:
        raise bad(f"has a model of type {model_type!r}, not one of {', '.join(TOKENIZER_MODELS)}")
    if "vocab" not in model:
        raise bad("lacks the key 'vocab' in its model")
    vocab_type, wanted = (list, "a list") if model_type == "Unigram" else (dict, "an object")
    if not isinstance(model["vocab"], vocab_type):
        raise bad(f"has a model vocab of type {type(model['vocab']).__name__}, not {wanted}")
    if model_type == "BPE":
        if "merges" not in model:
            raise bad("lacks the key 'merges' in its BPE model")
        if not isinstance(model["merges"], list):
            raise bad(f"has BPE merges of type {type(model['merges']).__name__}, not a list")


def check_weights(folder: Path, config: dict[str, Any]) -> None:
    """Every safetensors header of a model folder, and the config's sizes against the tensors they declare."""
    weights = sorted(folder.glob("*.safetensors"))
    if not weights:
        pickled = sorted(p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        if pickled:
            raise InputError(f"model folder {folder} holds only pickled weights ({pickled[0]}), which eetool does "
                             "not read: a pickle can run code", "convert them to model.safetensors with a tool you "
                             "trust, or give a folder with safetensors weights")
        raise InputError(f"model folder {folder} holds no *.safetensors weights", MODEL_HINT)
    tensors: dict[str, tuple[str, list[int]]] = {}
    for path in weights:
        tensors.update(safetensors_header(path))
    layers = {int(m.group(1)) for name in tensors if (m := _LAYER.search(name))}
    declared = config.get("num_hidden_layers")
    if isinstance(declared, int) and layers and declared > max(layers) + 1:
        raise InputError(f"{folder / 'config.json'} says num_hidden_layers = {declared}, but the weights hold "
                         f"{max(layers) + 1} blocks", "give the config.json that belongs to these weights")
    for name, (_, shape) in tensors.items():
        if name.endswith("embed_tokens.weight") and len(shape) == 2:
            for key, found in (("vocab_size", shape[0]), ("hidden_size", shape[1])):
                if isinstance(config.get(key), int) and config[key] != found:
                    raise InputError(f"{folder / 'config.json'} says {key} = {config[key]}, but {name} is "
                                     f"{shape[0]} x {shape[1]}", "give the config.json that belongs to these weights")


def read_json(path: Path, limit: int, what: str) -> dict[str, Any]:
    """A JSON object from a file no larger than ``limit`` bytes."""
    try:
        size = path.stat().st_size
        if size > limit:
            raise InputError(f"{path} is {size:,} bytes, more than the {limit:,} a {what} may have", MODEL_HINT)
        with open(path, "rb") as f:
            doc = json.loads(f.read(limit + 1))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None
    except (ValueError, RecursionError) as e:  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InputError(f"{path} is not a valid JSON {what} ({_first_line(e)})", MODEL_HINT) from None
    if not isinstance(doc, dict):
        raise InputError(f"{path} is not a JSON object, which a {what} is", MODEL_HINT)
    return doc


def check_sizes(path: Path, sizes: dict[str, Any]) -> None:
    """Every size a config gives is a whole number from 1 to its limit."""
    for key, limit in SIZE_LIMITS.items():
        if key not in sizes or sizes[key] is None:
            continue
        value = sizes[key]
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= limit:
            raise InputError(f"{path} says {key} = {value!r}, not a whole number from 1 to {limit:,}",
                             "give the configuration that belongs to the model (this one is damaged or not a model's)")


def safetensors_header(path: Path) -> dict[str, tuple[str, list[int]]]:
    """The tensors a safetensors file declares (name -> dtype, shape), checked against the file: a bounded
    header, known dtypes, floating-point weights, and data offsets inside the file that match the shapes and do
    not overlap."""
    def bad(problem: str) -> InputError:
        return InputError(f"{path} is not a valid safetensors file ({problem})",
                          "re-download or re-convert the model's weights")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise bad("shorter than its 8-byte header length")
            length = struct.unpack("<Q", head)[0]
            if length > min(MAX_HEADER_BYTES, size - 8):
                raise bad(f"its header claims {length:,} bytes, the file holds {size - 8:,} after the length")
            doc = json.loads(f.read(length))
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None
    except (ValueError, RecursionError) as e:
        raise bad(f"its header is not JSON: {_first_line(e)}") from None
    if not isinstance(doc, dict):
        raise bad("its header is not a JSON object")
    data_bytes = size - 8 - length
    spans: list[tuple[int, int, str]] = []
    found: dict[str, tuple[str, list[int]]] = {}
    for name, entry in doc.items():
        if name == "__metadata__":
            continue
        if not isinstance(entry, dict):
            raise bad(f"entry {name!r} is not an object")
        dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
        if dtype not in FLOAT_DTYPES and dtype not in OTHER_DTYPES:
            raise bad(f"tensor {name} has the unknown dtype {dtype!r}")
        if name.endswith(".weight") and dtype not in FLOAT_DTYPES:
            raise InputError(f"{path}: weight {name} holds {dtype} values, not floating-point numbers",
                             "give a model with float32, float16 or bfloat16 weights")
        if not (isinstance(shape, list) and len(shape) <= 8
                and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise bad(f"tensor {name} has the shape {shape!r}")
        if not (isinstance(offsets, list) and len(offsets) == 2
                and all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
                and 0 <= offsets[0] <= offsets[1] <= data_bytes):
            raise bad(f"tensor {name} lies at {offsets!r}, outside the {data_bytes:,} bytes of data")
        itemsize = FLOAT_DTYPES.get(dtype) or OTHER_DTYPES[dtype]
        if offsets[1] - offsets[0] != math.prod(shape) * itemsize:
            raise bad(f"tensor {name} of shape {shape} {dtype} takes {offsets[1] - offsets[0]:,} bytes")
        spans.append((offsets[0], offsets[1], name))
        found[name] = (dtype, shape)
    spans.sort()
    for (_, end, first), (start, _, second) in zip(spans, spans[1:], strict=False):
        if start < end:
            raise bad(f"tensors {first} and {second} overlap")
    return found


# GGUF (https://github.com/ggml-org/ggml/blob/master/docs/gguf.md): little-endian header, then key-value
# metadata, then tensor infos. Value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string,
# 9 array, 10 u64, 11 i64, 12 f64.
_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
MAX_GGUF_STRING = 1 << 24
MAX_GGUF_DIMS = 4  # GGML_MAX_DIMS
# Sizes the GGUF metadata gives under ``<arch>.<key>``, checked like a config's.
_GGUF_SIZES = {"block_count": "num_hidden_layers", "embedding_length": "hidden_size",
               "feed_forward_length": "intermediate_size", "context_length": "max_position_embeddings",
               "attention.head_count": "num_attention_heads", "attention.head_count_kv": "num_key_value_heads",
               "vocab_size": "vocab_size"}


def check_gguf(path: Path) -> None:
    """A GGUF file's header, metadata and tensor infos, every count checked against the bytes left in the file
    and every size against SIZE_LIMITS, before transformers reads it."""
    def bad(problem: str) -> InputError:
        return InputError(f"{path} is not a valid GGUF file ({problem})", "re-download the model file")

    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None

    def take(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise bad("it ends inside its header")
        return data

    def unpack(fmt: str) -> Any:
        return struct.unpack(fmt, take(struct.calcsize(fmt)))[0]

    def string() -> str:
        n = unpack("<Q")
        if n > min(MAX_GGUF_STRING, size - f.tell()):
            raise bad(f"a string claims {n:,} bytes")
        return take(n).decode("utf-8", errors="replace")

    def value(kind: int) -> Any:
        if kind in _GGUF_SCALARS:
            return unpack(_GGUF_SCALARS[kind])
        if kind == _GGUF_STRING:
            return string()
        if kind == _GGUF_ARRAY:
            inner, count = unpack("<I"), unpack("<Q")
            if inner == _GGUF_ARRAY or (inner not in _GGUF_SCALARS and inner != _GGUF_STRING):
                raise bad(f"an array of value type {inner}")
            least = 8 if inner == _GGUF_STRING else struct.calcsize(_GGUF_SCALARS[inner])
            if count * least > size - f.tell():
                raise bad(f"an array claims {count:,} values")
            for _ in range(count):  # arrays (the vocabulary) are skipped, not kept
                value(inner)
            return None
        raise bad(f"unknown value type {kind}")

    with f:
        if take(4) != b"GGUF":
            raise bad("no GGUF magic")
        version = unpack("<I")
        if version not in (2, 3):
            raise bad(f"version {version}; eetool reads versions 2 and 3")
        tensors, entries = unpack("<Q"), unpack("<Q")
        # A tensor info takes at least 8 + 1 + 4 + 8 + 4 + 8 bytes, a key-value pair 8 + 1 + 4 + 1.
        if tensors * 33 > size or entries * 14 > size:
            raise bad(f"its header claims {tensors:,} tensors and {entries:,} metadata entries in {size:,} bytes")
        metadata: dict[str, Any] = {}
        for _ in range(entries):
            key = string()
            metadata[key] = value(unpack("<I"))
        arch = metadata.get("general.architecture")
        sizes = {name: metadata[f"{arch}.{key}"] for key, name in _GGUF_SIZES.items() if f"{arch}.{key}" in metadata}
        check_sizes(path, sizes)
        for _ in range(tensors):
            name = string()
            dims = unpack("<I")
            if not 1 <= dims <= MAX_GGUF_DIMS:
                raise bad(f"tensor {name} has {dims} dimensions")
            shape = [unpack("<Q") for _ in range(dims)]
            unpack("<I")  # the ggml type
            offset = unpack("<Q")
            if offset > size or math.prod(shape) > 8 * size:  # even 1-bit types hold 8 values a byte
                raise bad(f"tensor {name} of shape {shape} at {offset:,} does not fit in the file")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
