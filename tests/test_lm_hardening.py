"""Language-model training refuses a diverging loss and writes nothing; crafted GGUF headers are read within
their bounds (the bad-input table in test_errors.py holds the refused files)."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

from tests.cli_helpers import invoke, ok, one_error_line
from tests.lm_helpers import DATA

pytest.importorskip("transformers")

from eetool.core.errors import ExitCode, InputError  # noqa: E402
from eetool.lm import exit_lm_training as training  # noqa: E402
from eetool.lm.model_files import SIZE_LIMITS, check_gguf  # noqa: E402

HAMLET = DATA / "hamlet-act1.txt"


def test_the_divergence_bound_is_relative_to_the_first_loss_with_a_floor() -> None:
    assert training.diverged_above(0.5) == training.DIVERGENCE_FLOOR
    assert training.diverged_above(5.0) == 5.0 * training.DIVERGENCE_FACTOR
    assert 4e31 > training.diverged_above(10.0)


def test_a_loss_past_the_bound_ends_training_and_writes_nothing(tiny_lm_folder: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    head = tmp_path / "head.safetensors"
    ok(invoke("init-exit-head", "-m", tiny_lm_folder, "-t", HAMLET, "--context", "32", "-o", head, "-q"))
    before = sorted(p.name for p in tmp_path.iterdir())
    # A bound below any loss: the first step's loss already counts as diverged.
    monkeypatch.setattr(training, "DIVERGENCE_FACTOR", 0.0)
    monkeypatch.setattr(training, "DIVERGENCE_FLOOR", 0.0)
    line = one_error_line(invoke("train-exit-head", "-m", tiny_lm_folder, "--head", head, "-t", HAMLET, "--context",
                                 "32", "--steps", "3", "-o", tmp_path / "trained.safetensors", "--report",
                                 tmp_path / "curve.yaml", "-q"), ExitCode.USAGE)
    assert "training diverged" in line and "at step 1" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def kv_string(key: str, value: str) -> bytes:
    return (struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", 8) + struct.pack("<Q", len(value))
            + value.encode())


def kv_u32(key: str, value: int) -> bytes:
    return struct.pack("<Q", len(key)) + key.encode() + struct.pack("<I", 4) + struct.pack("<I", value)


def tensor_info(name: str, shape: list[int], offset: int) -> bytes:
    return (struct.pack("<Q", len(name)) + name.encode() + struct.pack("<I", len(shape))
            + b"".join(struct.pack("<Q", d) for d in shape) + struct.pack("<I", 0) + struct.pack("<Q", offset))


def write_gguf(path: Path, kvs: list[bytes], tensors: list[bytes], data: int = 4096) -> Path:
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
                     + bytes(data))
    return path


def test_a_well_formed_gguf_header_passes_and_its_sizes_are_checked(tmp_path: Path) -> None:
    good = write_gguf(tmp_path / "good.gguf", [kv_string("general.architecture", "llama"),
                                               kv_u32("llama.block_count", 4)],
                      [tensor_info("token_embd.weight", [32, 64], 0)])
    check_gguf(good)
    limit = SIZE_LIMITS["num_hidden_layers"]
    huge = write_gguf(tmp_path / "huge.gguf", [kv_string("general.architecture", "llama"),
                                               kv_u32("llama.block_count", limit + 1)], [])
    with pytest.raises(InputError, match=f"num_hidden_layers = {limit + 1}"):
        check_gguf(huge)
    far = write_gguf(tmp_path / "far.gguf", [], [tensor_info("w", [1 << 40, 1 << 20], 0)])
    with pytest.raises(InputError, match="does not fit"):
        check_gguf(far)
    dims = write_gguf(tmp_path / "dims.gguf", [], [tensor_info("w", [1] * 5, 0)])
    with pytest.raises(InputError, match="5 dimensions"):
        check_gguf(dims)
    short = tmp_path / "short.gguf"
    short.write_bytes(good.read_bytes()[:30])
    with pytest.raises(InputError, match="not a valid GGUF file"):
        check_gguf(short)
