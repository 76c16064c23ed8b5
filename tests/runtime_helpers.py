"""What the tests of the PyTorch-free runtime share: a process environment in which ``import torch`` fails and the
runtime (runtime/) is importable, and a bundle with one of its files changed."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The runtime must not need torch: this sitecustomize makes every import of torch fail in its process.
BLOCK_TORCH = '''
import importlib.abc, sys
class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith(("torch.", "torchvision")):
            raise ImportError(f"{name} is blocked: the runtime must run without PyTorch")
sys.meta_path.insert(0, _NoTorch())
'''


def no_torch_env(blocker: Path) -> dict[str, str]:
    """The environment of a runtime process, its torch blocker written into the empty folder ``blocker``."""
    (blocker / "sitecustomize.py").write_text(BLOCK_TORCH)
    return {**os.environ, "PYTHONPATH": f"{blocker}{os.pathsep}{ROOT / 'runtime'}"}


def bundle_with_a_byte_changed(bundle: Path, copy: Path, name: str) -> Path:
    """A copy of ``bundle`` at ``copy`` whose file ``name`` has one byte changed near its end (SHA256SUMS left as
    exported, so the runtime must refuse it)."""
    shutil.copytree(bundle, copy)
    data = bytearray((copy / name).read_bytes())
    data[-10] ^= 0xFF
    (copy / name).write_bytes(bytes(data))
    return copy
