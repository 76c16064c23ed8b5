"""The weight-pruning report and masks artifacts (eetool.classification.pruning_artifacts): what is saved loads
back equal, and a file that is not what it claims is refused with a one-line error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from eetool.classification.pruning_artifacts import (
    MASKS_KIND,
    REPORT_KEYS,
    REPORT_KIND,
    PruningMasks,
    PruningReport,
)
from eetool.classification.weight_pruning import MASK_SHAPES_KEY
from eetool.core.artifacts import Provenance
from eetool.core.errors import EetoolError, InputError, ProvenanceError


def masks_of(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    # sizes that are not multiples of 8, so the last byte of each is partly padding
    return {"conv.weight": torch.rand(3, 2, 3, 3, generator=g) > 0.4, "fc.weight": torch.rand(5, 7, generator=g) > 0.6,
            "fc.bias": torch.rand(1, generator=g) > 0.5}


def test_masks_load_back_equal_and_packed_one_bit_a_weight(tmp_path: Path) -> None:
    masks = masks_of(0)
    path = str(tmp_path / "m.safetensors")
    PruningMasks(masks, Provenance(kind=MASKS_KIND, checkpoint_sha256="ab" * 32)).save(path)
    loaded = PruningMasks.load(path)
    assert loaded.masks.keys() == masks.keys()
    assert all(torch.equal(loaded.masks[k], masks[k]) for k in masks)
    assert loaded.provenance.checkpoint_sha256 == "ab" * 32
    on_disk = load_file(path)
    assert {k: v.numel() for k, v in on_disk.items()} == {"conv.weight": 7, "fc.weight": 5, "fc.bias": 1}


def test_masks_whose_shapes_do_not_fit_their_bits_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "m.safetensors")
    PruningMasks(masks_of(1), Provenance(kind=MASKS_KIND)).save(path)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, "pt") as f:
        meta = dict(f.metadata())
    shapes = json.loads(meta[MASK_SHAPES_KEY])
    shapes["fc.weight"] = [50, 7]  # 350 bits recorded, 40 stored
    save_file(tensors, path, metadata={**meta, MASK_SHAPES_KEY: json.dumps(shapes)})
    with pytest.raises(InputError, match="shape of every mask"):
        PruningMasks.load(path)


def test_masks_of_other_than_booleans_are_not_saved(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not a mask of booleans"):
        PruningMasks({"w": torch.ones(4)}, Provenance(kind=MASKS_KIND)).save(str(tmp_path / "m.safetensors"))
    assert not (tmp_path / "m.safetensors").exists()


def test_a_report_loads_back_and_one_lacking_its_keys_is_refused(tmp_path: Path) -> None:
    doc = {k: f"value of {k}" for k in REPORT_KEYS} | {"steps": [{"round": 1, "sparsity": 0.1}]}
    path = str(tmp_path / "r.yaml")
    PruningReport(doc, Provenance(kind=REPORT_KIND)).save(path)
    assert PruningReport.load(path).doc == doc
    with pytest.raises(InputError, match="lacks accuracy"):
        PruningReport({k: v for k, v in doc.items() if k != "accuracy"}, Provenance(kind=REPORT_KIND)).save(
            str(tmp_path / "bad.yaml"))
    assert not (tmp_path / "bad.yaml").exists()


def test_another_kind_is_refused_as_a_provenance_error(tmp_path: Path) -> None:
    masks_path, report_path = str(tmp_path / "m.safetensors"), str(tmp_path / "r.yaml")
    PruningMasks(masks_of(2), Provenance(kind=MASKS_KIND)).save(masks_path)
    PruningReport({k: 0 for k in REPORT_KEYS}, Provenance(kind=REPORT_KIND)).save(report_path)
    with pytest.raises(ProvenanceError, match="masks"):
        PruningReport.load(masks_path)
    Path(report_path).rename(tmp_path / "r.safetensors")
    with pytest.raises(EetoolError):
        PruningMasks.load(str(tmp_path / "r.safetensors"))
