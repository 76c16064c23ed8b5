"""A full disk (a file-size limit, RLIMIT_FSIZE) while an artifact is written, and a reader that closes the pipe
before a command writes its data: each ends with its documented exit code and one line (or none), without a
partial artifact, a temp file or a changed input. Real processes: the limit and the pipe are the kernel's."""

from __future__ import annotations

import hashlib
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OUTPUT = 6  # eetool's documented exit codes (README: failures and exit codes)
BROKEN_PIPE = 141


def eetool(args: list[str], cwd: Path, fsize: int | None = None, stdout: int = subprocess.PIPE
           ) -> subprocess.CompletedProcess[bytes]:
    def limit() -> None:
        if fsize is not None:
            resource.setrlimit(resource.RLIMIT_FSIZE, (fsize, fsize))

    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-m", "eetool", *args], cwd=cwd, env=env, stdout=stdout,
                          stderr=subprocess.PIPE, preexec_fn=limit, timeout=600)


def digests(*paths: Path) -> dict[str, str]:
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*"))) if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


@pytest.fixture(scope="module")
def lm_inputs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pytest.importorskip("transformers")
    from tests.lm_helpers import DATA, make_tiny_lm

    folder = tmp_path_factory.mktemp("lm-inputs")
    make_tiny_lm(folder / "tiny-lm")
    shutil.copy(DATA / "hamlet-act1.txt", folder / "hamlet.txt")
    made = eetool(["init-exit-head", "-m", "tiny-lm", "-t", "hamlet.txt", "--context", "32", "-o", "head.safetensors",
                   "-q"], folder)
    assert made.returncode == 0, made.stderr.decode()
    return folder


CLASSIFICATION = {
    "train-checkpoint": ["train", "-d", "{data}", "-o", "model.safetensors", "--arch-args", "{{width: 4}}",
                         "--epochs", "1"],
    "calibrate-means": ["calibrate-means", "-c", "{ckpt}", "-d", "{data}", "-o", "means.safetensors"],
    "train-exits-heads": ["train-exits", "-c", "{ckpt}", "-d", "{data}", "-o", "heads.safetensors", "--exits",
                          "half"],
    "prune-dataset-set": ["prune-dataset", "-c", "{ckpt}", "-d", "{data}", "-o", "kept.safetensors", "--ratio",
                          "0.3", "--method", "random"],
}


@pytest.mark.parametrize("name", list(CLASSIFICATION))
def test_a_full_disk_leaves_no_partial_artifact(name: str, tiny_checkpoint: str, tiny_data: str,
                                                tmp_path: Path) -> None:
    args = [a.format(ckpt=tiny_checkpoint, data=tiny_data) for a in CLASSIFICATION[name]]
    before = digests(Path(tiny_checkpoint), Path(tiny_data))
    done = eetool([*args, "-q"], tmp_path, fsize=2048)  # smaller than any of these artifacts
    err = done.stderr.decode()
    assert done.returncode == OUTPUT, err
    assert err.count("\n") == 1 and err.startswith("error: cannot write") and "File too large" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no artifact, temp file, lock or resume state
    assert digests(Path(tiny_checkpoint), Path(tiny_data)) == before


@pytest.mark.parametrize("model_output", [False, True], ids=["head", "model-folder"])
def test_a_full_disk_while_lm_training_writes(lm_inputs: Path, tmp_path: Path, model_output: bool) -> None:
    # The resume state (heads and optimiser state, the whole model's without freezing) is written before the head
    # and the model folder, so it is what meets the limit first; test_owned_folders.py fails the folder's own write.
    work = tmp_path / "work"
    shutil.copytree(lm_inputs, work)
    before = digests(work)
    extra = ["--no-freeze", "--model-output", "trained-model"] if model_output else []
    done = eetool(["train-exit-head", "-m", "tiny-lm", "--head", "head.safetensors", "-t", "hamlet.txt", "--context",
                   "32", "--steps", "1", "-o", "trained.safetensors", *extra, "-q"], work, fsize=4096)
    err = done.stderr.decode()
    assert done.returncode == OUTPUT, err
    assert err.count("\n") == 1 and err.startswith("error: cannot write") and "File too large" in err, err
    assert digests(work) == before  # inputs intact, and nothing new


STREAMS = {
    "evaluate": ["evaluate", "-c", "{ckpt}", "-d", "{data}", "--repeats", "1"],
    "calibrate-means": ["calibrate-means", "-c", "{ckpt}", "-d", "{data}", "-o", "means.safetensors"],
    "inspect": ["inspect", "{ckpt}"],
    "archs": ["archs"],
    "env": ["env"],
}


@pytest.mark.parametrize("fmt", ["text", "json"])
@pytest.mark.parametrize("name", list(STREAMS))
def test_a_reader_that_closes_the_pipe_ends_the_command_quietly(name: str, fmt: str, tiny_checkpoint: str,
                                                                tiny_data: str, tmp_path: Path) -> None:
    args = [a.format(ckpt=tiny_checkpoint, data=tiny_data) for a in STREAMS[name]]
    read, write = os.pipe()
    os.close(read)  # `| true`: the reader is gone before the command writes
    try:
        done = eetool([*args, "--format", fmt, "-q"], tmp_path, stdout=write)
    finally:
        os.close(write)
    assert done.returncode == BROKEN_PIPE, done.stderr.decode()
    assert done.stderr == b""
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp or lock file left
