"""Re-make the embedded demo images: a class-balanced sample of Fashion-MNIST (MIT licence).

    python -m eetool.core.demo_data fashion-mnist eetool/demo/demo-data.safetensors
"""

from __future__ import annotations

import sys

import torch

from eetool.core.artifacts import atomic_write
from eetool.core.datasets import Dataset, load_dataset

PER_CLASS = {"train": 500, "test": 200}
SEED = 0


def balanced_sample(ds: Dataset, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` random positions of every class, in ascending order."""
    gen = torch.Generator().manual_seed(seed)
    picks = []
    for k in range(ds.num_classes):
        members = torch.nonzero(ds.labels == k).flatten()
        picks.append(members[torch.randperm(members.numel(), generator=gen)[:per_class]])
    return torch.cat(picks).sort().values


def make(spec: str, output: str) -> None:
    from safetensors.torch import save

    tensors, classes = {}, []
    for split, per_class in PER_CLASS.items():
        ds = load_dataset(spec, split)
        idx = balanced_sample(ds, per_class, SEED)
        assert ds.images is not None, "the demo is made from the IDX sources, held in memory"
        tensors[f"{split}.images"] = ds.images[idx].contiguous()
        tensors[f"{split}.labels"] = ds.labels[idx].contiguous()
        tensors[f"{split}.source_indices"] = idx
        classes = ds.classes
    meta = {
        "format": "pt",
        "name": "demo",
        "classes": "\n".join(classes),
        "source": "Fashion-MNIST (Xiao, Rasul and Vollgraf 2017, MIT licence), class-balanced sample, seed 0",
    }
    atomic_write(output, save(tensors, metadata=meta))


if __name__ == "__main__":
    make(sys.argv[1], sys.argv[2])
