"""Bad inputs through the CLI, table-driven: each gives its documented exit code, exactly one line on stderr
("error: ... (hint: ...)"), no traceback, nothing on stdout, and leaves no file behind (not even a temp file)."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import pickle
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file
from typer.testing import CliRunner, Result

from eetool.cli import app
from eetool.core.artifacts import Provenance, write_tensors
from eetool.core.checkpoint import ModelSpec
from eetool.core.errors import ExitCode
from eetool.core.sources import demo_path

runner = CliRunner()

USAGE, BAD_INPUT, MISMATCH, PROVENANCE, OUTPUT = (ExitCode.USAGE, ExitCode.BAD_INPUT, ExitCode.MODEL_MISMATCH,
                                                  ExitCode.PROVENANCE, ExitCode.OUTPUT)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, tiny_spec: ModelSpec, tiny_checkpoint: str,
           tiny_data: str) -> Path:
    """Every bad input file, made once; tests must leave this folder as they found it."""
    d = tmp_path_factory.mktemp("bad-inputs")
    torch.manual_seed(0)
    model = tiny_spec.build()
    torch.save(model.state_dict(), d / "state.pt")  # foreign weights that fit resnet20 width 4, 10 classes
    torch.save({k: v.to(torch.int64) if k == "stem.0.weight" else v for k, v in model.state_dict().items()},
               d / "int-state.pt")
    torch.save(model, d / "whole-model.pt")  # a pickled nn.Module
    torch.save({"epoch": 3, "names": ["a", "b"], "lr": 0.1}, d / "no-tensors.pt")
    (d / "plain-pickle.pt").write_bytes(pickle.dumps({"epoch": 3, "names": {"a", "b"}}, protocol=4))
    blob = Path(tiny_checkpoint).read_bytes()
    (d / "truncated.safetensors").write_bytes(blob[: len(blob) // 2])
    (d / "random.safetensors").write_bytes(os.urandom(4096))
    (d / "random.dat").write_bytes(os.urandom(4096))
    (d / "random.dat.pt").write_bytes(os.urandom(4096))
    u8 = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    save_file({"test.images": u8[:0], "test.labels": torch.zeros(0, dtype=torch.int64)}, str(d / "empty.safetensors"))
    save_file({"test.images": u8.float(), "test.labels": torch.zeros(4, dtype=torch.int64)},
              str(d / "float-images.safetensors"))
    save_file({"test.images": u8, "test.labels": torch.tensor([0, 1, 2, 25])}, str(d / "labels-25.safetensors"))
    save_file({"test.images": u8}, str(d / "unlabelled.safetensors"))
    (d / "empty.txt").write_text("")
    os.mkfifo(d / "fifo.txt")  # a reader that opened it would wait for a writer for ever
    (d / "zeros.txt").symlink_to("/dev/zero")  # and one that read it would never reach the end
    for user_folder in ("user-folder", "user.safetensors.resume"):  # folders a user made: eetool never deletes them
        (d / user_folder).mkdir()
        (d / user_folder / "notes.txt").write_text("mine\n")
    (d / "out-of-range.txt").write_text("0\n1\n64\n")
    (d / "negative.txt").write_text("0\n-1\n")
    (d / "repeated.txt").write_text("0\n5\n5\n")
    (d / "not-integers.txt").write_text("0\n1.5\nseven\n")
    write_tensors(str(d / "indices-other-data.safetensors"), {"indices": torch.arange(4)},
                  Provenance(kind="indices", dataset="mnist/test:0123456789abcdef"))
    (d / "evaluation.yaml").write_text(
        "schema: eetool/evaluation@1\nsamples: 64\nprovenance:\n  kind: evaluation\n  schema: 1\n  args: {}\n")
    (d / "plain.yaml").write_text("just: a mapping\n")
    (d / "unknown-key.yaml").write_text("format: json\nepochs: 3\n")
    (d / "repeats-true.yaml").write_text("repeats: true\n")
    (d / "repeats-twice.yaml").write_text("repeats: 2\nrepeats: 3\n")
    (d / "invalid.yaml").write_text("format: [json\n")
    (d / "bad-value.yaml").write_text("threads: 0\n")
    (d / "not-mapping.yaml").write_text("- format\n- json\n")
    (d / "seed.yaml").write_text("seed: 1\n")
    # E²CM artifacts of the tiny checkpoint, and broken ones
    save_file({"test.images": u8, "test.labels": torch.tensor([0, 1, 0, 1])}, str(d / "two-classes.safetensors"))
    means = d / "means.safetensors"
    made = runner.invoke(app, ["calibrate-means", "-c", tiny_checkpoint, "-d", tiny_data, "-o", str(means), "-q"])
    assert made.exit_code == 0, made.stderr
    made = runner.invoke(app, ["fit-thresholds", "--means", str(means), "-o", str(d / "thresholds.yaml"),
                               "--budget", "0.5", "-q"])
    assert made.exit_code == 0, made.stderr
    blob = means.read_bytes()
    (d / "truncated-means.safetensors").write_bytes(blob[: len(blob) // 2])
    from eetool.classification.e2cm import ClassMeans

    made = runner.invoke(app, ["prune-dataset", "-c", tiny_checkpoint, "-d", tiny_data, "-m", "random", "--ratio",
                               "0.5", "-o", str(d / "random-kept.safetensors"), "-q"])
    assert made.exit_code == 0, made.stderr
    made = runner.invoke(app, ["prune-dataset", "-c", tiny_checkpoint, "-d", tiny_data, "-m", "eeprune-loss",
                               "--epochs", "1", "--ratio", "0.5", "-o", str(d / "loss-kept.safetensors"), "-q"])
    assert made.exit_code == 0, made.stderr
    (d / "first-half.txt").write_text("\n".join(str(i) for i in range(48)))
    cm = ClassMeans.load(str(means))
    cm.calibration = None
    cm.save(str(d / "means-without-cache.safetensors"))
    make_hand_edited_artifacts(d, tiny_checkpoint, tiny_data)
    make_crafted_data(d)
    make_lm_inputs(d)
    make_hostile_checkpoints(d, tiny_checkpoint)
    zeroed = tiny_spec.build()  # a checkpoint pruned beyond any sparsity prune-weights can ask for
    with torch.no_grad():
        for m in zeroed.modules():
            if isinstance(m, torch.nn.Conv2d | torch.nn.Linear):
                m.weight.zero_()
    from eetool.core.checkpoint import save_checkpoint

    save_checkpoint(str(d / "zeroed.safetensors"), zeroed, tiny_spec, Provenance(kind="checkpoint"))
    # Not a CIFAR ResNet (no channel-pruned widths to record) and of another input shape than the tiny data's.
    rgb = ModelSpec(arch="mobilenet_v3_small", num_classes=10, input_shape=(3, 32, 32), mean=[0.5] * 3,
                    std=[0.25] * 3)
    save_checkpoint(str(d / "mobilenet.safetensors"), rgb.build(), rgb, Provenance(kind="checkpoint"))
    # The tiny data's input shape, but five classes: a network for another task, not a peer of the tiny checkpoint.
    five = ModelSpec(arch="resnet8", num_classes=5, input_shape=(1, 28, 28), mean=[0.3], std=[0.35],
                     arch_args={"width": 4})
    save_checkpoint(str(d / "five-classes.safetensors"), five.build(), five, Provenance(kind="checkpoint"))
    make_segmentation_inputs(d)
    return d


def make_segmentation_inputs(d: Path) -> None:
    """A tiny segmentation checkpoint (3 classes, 16 x 16) and mask files, good and bad."""
    from eetool.core.checkpoint import save_checkpoint

    seg = ModelSpec(arch="eeseg", num_classes=3, input_shape=(1, 16, 16), mean=[0.5], std=[0.25],
                    arch_args={"width": 4, "head_width": 4}, classes=["bg", "a", "b"])
    save_checkpoint(str(d / "seg.safetensors"), seg.build(), seg, Provenance(kind="checkpoint"))
    made = runner.invoke(app, ["fit-thresholds", "--method", "adp-c", "--threshold", "0.9", "-c",
                               str(d / "seg.safetensors"), "-o", str(d / "seg-thresholds.yaml"), "-q"])
    assert made.exit_code == 0, made.stderr
    for name, edit in {  # hand edits a reader must refuse
        "above-one": lambda t: t["thresholds"][0].__setitem__(0, 1.5),
        "other-method": lambda t: t.__setitem__("method", "e2cm"),
        "other-classes": lambda t: t.__setitem__("classes", ["bg", "b", "a"]),
    }.items():
        edited_yaml(d / "seg-thresholds.yaml", d / f"seg-thresholds-{name}.yaml", edit)
    images = torch.zeros(8, 1, 16, 16, dtype=torch.uint8)
    masks = torch.zeros(8, 16, 16, dtype=torch.uint8)
    masks[:, 4:8, 4:8] = 1
    masks[:, 0, :] = 255
    meta = {"classes": "bg\na\nb"}
    save_file({"images": images, "masks": masks}, str(d / "seg-data.safetensors"), metadata=meta)
    save_file({"images": images, "masks": masks[:, :, :15].contiguous()}, str(d / "seg-mask-size.safetensors"),
              metadata=meta)
    save_file({"images": images, "masks": masks * 9}, str(d / "seg-label-out.safetensors"), metadata=meta)
    for name, classes in {"four-classes": "bg\na\nb\nc", "other-order": "bg\nb\na", "unnamed": None}.items():
        # labels 0 and 1 only: within every one of these class lists, so only the list itself can be refused
        save_file({"images": images, "masks": masks}, str(d / f"seg-data-{name}.safetensors"),
                  metadata={"classes": classes} if classes else None)
    # CBT's class statistics (as `calibrate-means` writes them) for this checkpoint, for another one, and of
    # another number of classes
    from eetool.core.artifacts import sha256_file
    from eetool.segmentation.model import EXIT_NAMES
    from eetool.segmentation.pixel_thresholds import ClassStats
    from eetool.segmentation.statistics import KIND, SegmentationClassStatistics

    def statistics(name: str, classes: list[str], checkpoint_sha256: str) -> None:
        stats = ClassStats.empty(len(EXIT_NAMES), len(classes))
        SegmentationClassStatistics(stats, classes, Provenance(kind=KIND, checkpoint_sha256=checkpoint_sha256,
                                                               exits=list(EXIT_NAMES), dataset="seg-data")
                                    ).save(str(d / name))

    statistics("seg-stats.safetensors", ["bg", "a", "b"], sha256_file(d / "seg.safetensors"))
    statistics("seg-stats-other-checkpoint.safetensors", ["bg", "a", "b"], "0" * 64)
    statistics("seg-stats-two-classes.safetensors", ["bg", "a"], sha256_file(d / "seg.safetensors"))


def make_hostile_checkpoints(d: Path, tiny_checkpoint: str) -> None:
    """Checkpoints whose metadata names code to run or sizes to allocate, and weights that are not numbers."""
    def spec_edit(change: dict[str, Any]) -> Callable[[dict[str, torch.Tensor], dict[str, str]], None]:
        def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
            meta["eetool.model"] = json.dumps({**json.loads(meta["eetool.model"]), **change})
        return edit

    marker = d / "pwned"  # would appear in the inputs folder, which the table checks is left unchanged
    edited_tensors(Path(tiny_checkpoint), d / "runs-os-system.safetensors",
                   spec_edit({"arch": "os:system", "arch_args": {"command": f"touch {marker}"}}))
    edited_tensors(Path(tiny_checkpoint), d / "huge-input.safetensors",
                   spec_edit({"input_shape": [1, 60000, 60000]}))
    edited_tensors(Path(tiny_checkpoint), d / "huge-width.safetensors", spec_edit({"arch_args": {"width": 10**9}}))

    def nan_weight(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        tensors["layer1.0.conv1.weight"][0, 0, 0, 0] = float("nan")

    edited_tensors(Path(tiny_checkpoint), d / "nan-weights.safetensors", nan_weight)


LAUGHS = "".join(f"{a}: &{a} [{', '.join([f'*{p}' if p else 'lol'] * 9)}]\n"
                 for p, a in zip(["", *"abcdefgh"], "abcdefghi", strict=True))  # 9^9 values from 396 bytes
LAUGHS_FLAG = "{" + LAUGHS.strip().replace("\n", ", ") + "}"


def edited_yaml(source: Path, target: Path, edit: Callable[[dict[str, Any]], object]) -> None:
    doc = yaml.safe_load(source.read_text())
    edit(doc)
    target.write_text(yaml.safe_dump(doc, sort_keys=False))


def edited_tensors(source: Path, target: Path, edit: Callable[[dict[str, torch.Tensor], dict[str, str]], object]
                   ) -> None:
    with safe_open(str(source), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    edit(tensors, meta)
    save_file(tensors, str(target), metadata=meta)


def make_hand_edited_artifacts(d: Path, tiny_checkpoint: str, tiny_data: str) -> None:
    """Artifacts as a hand edit leaves them: wrong types, missing keys, inconsistent shapes, empty provenance."""
    from eetool.classification.exit_heads import ExitHeads, ExitHeadsArtifact, HeadsSpec
    from eetool.core.artifacts import sha256_file
    from eetool.core.checkpoint import load_checkpoint
    from eetool.core.datasets import load_dataset
    from eetool.core.exits import build_exit_model

    (d / "laughs.yaml").write_text(LAUGHS)
    assert len(LAUGHS) < 400
    t = d / "thresholds.yaml"

    def point(key: str, value: object) -> Callable[[dict[str, Any]], object]:
        return lambda doc: doc["points"][0].__setitem__(key, value)

    def provenance(key: str, value: object) -> Callable[[dict[str, Any]], object]:
        return lambda doc: doc["provenance"].__setitem__(key, value)

    exits = len(yaml.safe_load(t.read_text())["points"][0]["thresholds"])
    for name, edit in {
        "nan": point("thresholds", [float("nan")] * exits),
        "inf": point("thresholds", [float("inf")] * exits),
        "strings": point("thresholds", ["high"] * exits),
        "wrong-count": point("thresholds", [0.5] * (exits + 1)),
        "no-budget": lambda doc: doc["points"][0].pop("budget"),
        "points-not-a-list": lambda doc: doc.__setitem__("points", "all"),
        "no-checkpoint": provenance("checkpoint_sha256", ""),
        "unknown-method": lambda doc: doc.__setitem__("method", "magic"),
        "no-exits": provenance("exits", []),
        "no-inputs": provenance("inputs", {}),
        "exits-a-number": provenance("exits", 5),
    }.items():
        edited_yaml(t, d / f"thresholds-{name}.yaml", edit)

    means = d / "means.safetensors"

    def tensor(key: str, change: Callable[[torch.Tensor], torch.Tensor]) -> Callable[..., object]:
        return lambda tensors, meta: tensors.__setitem__(key, change(tensors[key]))

    def nan_first(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x.view(-1)[0] = float("nan")
        return x

    for name, edit in {
        "means-rows": tensor("means.0", lambda x: x[:-1]),
        "normalisers-rows": tensor("normalisers", lambda x: x[:-1]),
        "calibration-short": tensor("calibration.confidence", lambda x: x[:-1]),
        "nan": tensor("means.0", nan_first),
        "no-checkpoint": lambda tensors, meta: meta.__setitem__("eetool.checkpoint_sha256", ""),
        "args-not-json": lambda tensors, meta: meta.__setitem__("eetool.args", "{not json"),
        "unknown-kind": lambda tensors, meta: meta.__setitem__("eetool.kind", "magic"),
    }.items():
        edited_tensors(means, d / f"means-{name}.safetensors", edit)

    ckpt = load_checkpoint(tiny_checkpoint)
    em = build_exit_model(ckpt.model, "half")
    spec = HeadsSpec("sdn", list(em.exits), [list(s) for s in em.exit_shapes(ckpt.spec.input_shape)], 10)
    heads = d / "heads.safetensors"
    made_for = Provenance(kind="exit-heads", checkpoint_sha256=sha256_file(tiny_checkpoint), exits=list(em.exits))
    ExitHeadsArtifact(ExitHeads(spec), made_for).save(str(heads))

    def heads_spec(change: Callable[[dict[str, Any]], object]) -> Callable[..., object]:
        def edit(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
            d = json.loads(meta["eetool.heads"])
            change(d)
            meta["eetool.heads"] = json.dumps(d)
        return edit

    for name, edit in {
        "classes-a-string": heads_spec(lambda s: s.__setitem__("num_classes", "ten")),
        "no-kind": heads_spec(lambda s: s.pop("kind")),
        "unknown-kind": heads_spec(lambda s: s.__setitem__("kind", "magic")),
        "huge-shape": heads_spec(lambda s: s.__setitem__("in_shapes", [[4, 10**6, 10**6]] * len(s["exits"]))),
        "linear-misshapen": tensor("heads.0.linear.weight", lambda x: x[:, :-1].contiguous()),
        "no-checkpoint": lambda tensors, meta: meta.__setitem__("eetool.checkpoint_sha256", ""),
    }.items():
        edited_tensors(heads, d / f"heads-{name}.safetensors", edit)

    test_split = load_dataset(tiny_data, "test").fingerprint
    write_tensors(str(d / "indices-float.safetensors"), {"indices": torch.tensor([0.0, 1.0])},
                  Provenance(kind="indices", dataset=test_split))
    write_tensors(str(d / "indices-2d.safetensors"), {"indices": torch.tensor([[0, 1], [2, 3]])},
                  Provenance(kind="indices", dataset=test_split))
    write_tensors(str(d / "indices-no-dataset.safetensors"), {"indices": torch.tensor([0, 1])},
                  Provenance(kind="indices"))

    kept = d / "loss-kept.safetensors"

    def phase_model(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
        args = json.loads(meta["eetool.args"])
        args["pruning_phase"]["model"]["arch"] = "resnet32"
        meta["eetool.args"] = json.dumps(args)
        meta["eetool.checkpoint_sha256"] = "0" * 64

    for name, edit in {
        "other-model": phase_model,
        "missing": lambda tensors, meta: tensors.pop("records.early_loss"),
        "short": tensor("records.early_loss", lambda x: x[:-1]),
        "as-text": tensor("records.early_correct", lambda x: x.double()),
        "no-dataset": lambda tensors, meta: meta.__setitem__("eetool.dataset", ""),
    }.items():
        edited_tensors(kept, d / f"records-{name}.safetensors", edit)


class RunsAShellCommand:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def make_lm_inputs(d: Path) -> None:
    """A tiny Llama-style model with an exit head after block 2, the head of another model, and a model folder
    that is not a causal LM."""
    from transformers import ResNetConfig

    from tests.lm_helpers import make_tiny_lm

    make_tiny_lm(d / "tiny-lm")
    make_tiny_lm(d / "other-lm", seed=1)
    ResNetConfig().save_pretrained(d / "resnet-config")
    for model, head in (("tiny-lm", "lm-head"), ("other-lm", "other-lm-head")):
        made = runner.invoke(app, ["init-exit-head", "-m", str(d / model), "-t", LM_TEXT, "--context", "32",
                                   "--n0", "0", "-o", str(d / f"{head}.safetensors"), "-q"])
        assert made.exit_code == 0, made.stderr
    make_crafted_lms(d)


def make_crafted_lms(d: Path) -> None:
    """Copies of the tiny model with one file damaged, each in its own folder, and crafted GGUF headers."""
    import shutil

    from safetensors.torch import load_file

    from eetool.lm.class_aware_head import ExitHead

    tiny = d / "tiny-lm"
    weights = load_file(str(tiny / "model.safetensors"))

    def variant(name: str) -> Path:
        shutil.copytree(tiny, d / name)
        return d / name

    def config(folder: Path, **changes: object) -> None:
        doc = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**doc, **changes}))

    config(variant("lm-million-layers"), num_hidden_layers=1_000_000)
    config(variant("lm-zero-layers"), num_hidden_layers=0)
    config(variant("lm-more-layers-than-weights"), num_hidden_layers=6)
    config(variant("lm-hidden-size-string"), hidden_size="32")
    blob = (tiny / "model.safetensors").read_bytes()
    (variant("lm-truncated-weights") / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    header_length = int.from_bytes(blob[:8], "little")
    header = json.loads(blob[8:8 + header_length])

    def rewrite(name: str, edit: object) -> None:
        new = dict(header)
        edit(new)  # type: ignore[operator]
        text = json.dumps(new).encode()
        (variant(name) / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text
                                                          + blob[8 + header_length:])

    first, second = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])[:2]
    rewrite("lm-huge-shape", lambda h: h.__setitem__(first, {**h[first], "shape": [1 << 40, 1 << 20]}))
    rewrite("lm-overlapping-tensors", lambda h: h.__setitem__(
        second, {**h[second], "data_offsets": [h[first]["data_offsets"][0],
                                               h[first]["data_offsets"][0] + h[second]["data_offsets"][1]
                                               - h[second]["data_offsets"][0]]}))
    int_weights = {k: (v.to(torch.int64) if k.endswith("embed_tokens.weight") else v) for k, v in weights.items()}
    save_file(int_weights, str(variant("lm-int64-weight") / "model.safetensors"))
    nan_weights = dict(weights)
    nan_weights["model.embed_tokens.weight"] = torch.full_like(weights["model.embed_tokens.weight"], math.nan)
    save_file(nan_weights, str(variant("lm-nan-embedding") / "model.safetensors"))
    pickled = variant("lm-pickled-weights")
    (pickled / "model.safetensors").unlink()
    torch.save(weights, pickled / "pytorch_model.bin")
    (variant("lm-malformed-tokenizer") / "tokenizer.json").write_text('{"version": "1.0", "added_tokens": ')
    tokenizer = json.loads((tiny / "tokenizer.json").read_text())
    for name, edit in {  # valid JSON that lacks what transformers indexes without a check (a KeyError there)
        "no-added-tokens": lambda t: t.pop("added_tokens"),
        "added-token-without-id": lambda t: t["added_tokens"][0].pop("id"),
        "no-model": lambda t: t.pop("model"),
        "bpe-without-merges": lambda t: t["model"].pop("merges"),
    }.items():
        edited = json.loads(json.dumps(tokenizer))
        edit(edited)
        (variant(f"lm-tokenizer-{name}") / "tokenizer.json").write_text(json.dumps(edited))
    (d / "huge-count.gguf").write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1 << 60, 0))
    (d / "huge-string.gguf").write_bytes(b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, 1 << 62) + b"key")
    nan_head, _ = ExitHead.load(str(d / "lm-head.safetensors"))
    nan_head.weight[0, 0] = math.nan
    nan_head.save(str(d / "nan-lm-head.safetensors"), ExitHead.load(str(d / "lm-head.safetensors"))[1])


def make_crafted_data(d: Path) -> None:
    """Datasets whose sizes or contents a reader must refuse before acting on them."""
    u8 = torch.zeros(4, 1, 28, 28, dtype=torch.uint8)
    labels = torch.zeros(4, dtype=torch.int64)
    for name, tensors in {
        "two-channels": {"test.images": torch.zeros(4, 2, 28, 28, dtype=torch.uint8), "test.labels": labels},
        "zero-size": {"test.images": torch.zeros(4, 1, 0, 0, dtype=torch.uint8), "test.labels": labels},
        "labels-2d": {"test.images": u8, "test.labels": torch.zeros(4, 2, dtype=torch.int64)},
        "labels-float": {"test.images": u8, "test.labels": torch.tensor([0.0, 1.5, 2.0, 3.0])},
        "size-32": {"test.images": torch.zeros(4, 1, 32, 32, dtype=torch.uint8), "test.labels": labels},
    }.items():
        save_file(tensors, str(d / f"{name}.safetensors"))
    idx = d / "mnist-huge"
    idx.mkdir()
    (idx / "t10k-images-idx3-ubyte").write_bytes(bytes([0, 0, 8, 3]) + b"\xff" * 12 + bytes(64))
    (idx / "t10k-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1, 0, 0, 0, 1, 0]))
    cifar = d / "cifar-code"
    cifar.mkdir()
    (cifar / "test_batch").write_bytes(pickle.dumps({b"x": RunsAShellCommand(d / "code-ran")}, protocol=2))
    (cifar / "batches.meta").write_bytes(pickle.dumps({b"label_names": [b"a"]}, protocol=2))
    bomb = d / "image-bomb" / "cls"
    bomb.mkdir(parents=True)
    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 2, 0, 0, 0)
    (bomb / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + struct.pack(">I", 13) + b"IHDR" + header
                                 + struct.pack(">I", zlib.crc32(b"IHDR" + header)))
    # 1 x 120,000 pixels, under Pillow's limit; resized to 28 pixels on its shorter side it would be 28 x 3,360,000
    tall = d / "image-tall" / "cls"
    tall.mkdir(parents=True)
    Image.fromarray(np.zeros((120_000, 1), dtype=np.uint8)).save(tall / "a.png")
    (d / "images").mkdir()  # image files a predict run reads from their folder
    for name in ("a", "b"):
        Image.fromarray(np.full((28, 28), 100, dtype=np.uint8)).save(d / "images" / f"{name}.png")


@dataclass
class Case:
    id: str
    args: list[str]  # formatted with ckpt, data, inp (the inputs folder) and out (an empty output folder)
    code: ExitCode
    says: str = ""  # a part of the error line
    marks: list[pytest.MarkDecorator] = field(default_factory=list)
    skip: Callable[[Path], str | None] | None = None  # given the output folder, a reason to skip or None

    def param(self) -> object:
        return pytest.param(self, id=self.id, marks=self.marks)


EVAL = ["evaluate", "-c", "{ckpt}", "-d", "{data}", "-o", "{out}/result.yaml"]
FOREIGN = ["evaluate", "-d", "{data}", "-o", "{out}/result.yaml", "--input-shape", "1,28,28", "--arch-args",
           "{{width: 4}}"]
TRAIN = ["train", "-d", "{data}", "-o", "{out}/model.safetensors", "--arch-args", "{{width: 4}}", "--epochs", "1"]
CALIBRATE = ["calibrate-means", "-c", "{ckpt}", "-d", "{data}", "-o", "{out}/means.safetensors"]
FIT = ["fit-thresholds", "--means", "{inp}/means.safetensors", "-o", "{out}/thresholds.yaml"]
MEANS = ["--means", "{inp}/means.safetensors"]
PRUNE = ["prune-dataset", "-c", "{ckpt}", "-d", "{data}", "-o", "{out}/kept.safetensors", "--ratio", "0.3"]
RECORDS = ["--from-scores", "{inp}/random-kept.safetensors"]
DEMO_CHECKPOINT = str(demo_path("demo-resnet20-fashion-mnist.safetensors"))
DEMO_DATA = str(demo_path("demo-data.safetensors"))
EXITS = ["train-exits", "-c", "{ckpt}", "-d", "{data}"]
SCRATCH = ["-o", "{out}/h.safetensors", "--from-scratch", "--joint", "--arch-args", "{{width: 4}}"]
SCRATCH_EXITS = ["train-exits", "-d", "{data}", "-o", "{out}/h.safetensors", "--from-scratch", "--arch-args",
                 "{{width: 4}}"]
SEG_DATA = "segmentation:{inp}/seg-data.safetensors"
SEG_EVAL = ["evaluate", "-c", "{inp}/seg.safetensors", "-o", "{out}/result.yaml", "--repeats", "1"]
SEG_PREDICT = ["predict", "-c", "{inp}/seg.safetensors", "-d", SEG_DATA, "--output-dir", "{out}/masks"]
CBT = ["fit-thresholds", "--method", "cbt", "-c", "{inp}/seg.safetensors", "-d", SEG_DATA, "-o", "{out}/t.yaml"]
CBT_MEANS = [*CBT[:5], "-o", "{out}/t.yaml", "--means"]  # then the statistics file
# every command that reads segmentation data with an eeseg checkpoint, -d DATA to follow (train-exits, which
# takes torchvision networks: tests/test_segmentation_torchvision.py)
SEG_DATA_READERS = [
    SEG_EVAL,
    ["calibrate-means", "-c", "{inp}/seg.safetensors", "-o", "{out}/m.safetensors"],
    [*CBT[:5], "-o", "{out}/t.yaml"],
    ["train", "-c", "{inp}/seg.safetensors", "-o", "{out}/s.safetensors", "--epochs", "1"],
]
LM_TEXT = str(Path(__file__).parent / "data" / "hamlet-act1.txt")
LM_MODEL = ["init-exit-head", "-m", "{inp}/tiny-lm", "-o", "{out}/head.safetensors", "--context", "32"]
LM_INIT = [*LM_MODEL, "-t", LM_TEXT]
LM_TRAIN = ["train-exit-head", "-m", "{inp}/tiny-lm", "--context", "32", "-o", "{out}/trained.safetensors",
            "--head", "{inp}/lm-head.safetensors", "--steps", "2"]
LM_EVAL = ["evaluate-lm", "-m", "{inp}/tiny-lm", "-t", LM_TEXT, "--context", "32"]
LM_READERS = [[arg for arg in args if arg not in ("-m", "{inp}/tiny-lm")]  # every command that reads a model folder
              for args in (LM_INIT, [*LM_TRAIN, "-t", LM_TEXT], [*LM_EVAL, "--head", "{inp}/lm-head.safetensors"])]


def _root_can_write(out: Path) -> str | None:
    return "this user writes into a 0o555 folder (root)" if os.access(out / "read-only", os.W_OK) else None


def _no_torch_pruning(out: Path) -> str | None:
    return None if importlib.util.find_spec("torch_pruning") else "Torch-Pruning is not installed"


def _cuda_present(out: Path) -> str | None:
    return "a CUDA device is present" if torch.cuda.is_available() else None


EXPORT = ["export", "-c", "{ckpt}", "-o", "{out}/bundle", "--check-samples", "8"]
INT8 = [*EXPORT, "--quantize", "int8", "--calibration-data", "{data}", "--calibration-split", "train"]
PRUNE_WEIGHTS = ["prune-weights", "-c", "{ckpt}", "-d", "{data}", "-o", "{out}/pruned.safetensors", "--rounds", "1",
                 "--finetune-samples", "8", "--exits", "half"]

CASES = [
    # segmentation
    Case("seg-mask-size-mismatch", [*SEG_EVAL, "-d", "segmentation:{inp}/seg-mask-size.safetensors"], BAD_INPUT,
         says="masks have shape"),
    Case("seg-label-out-of-range", [*SEG_EVAL, "-d", "segmentation:{inp}/seg-label-out.safetensors"], BAD_INPUT,
         says="outside the classes"),
    Case("seg-on-classification-data", [*SEG_EVAL, "-d", "{data}"], MISMATCH, says="one label per image"),
    # segmentation data whose class list is not the checkpoint's, in every command that reads both
    *[Case(f"seg-{args[0]}-data-{name}", [*args, "-d", f"segmentation:{{inp}}/seg-data-{name}.safetensors"], MISMATCH,
           says=says) for args in SEG_DATA_READERS
      for name, says in (("four-classes", "has 4 classes but the model has 3"),
                         ("other-order", "names class 1 'b' where the model has 'a' (2 of 3 classes differ)"))],
    Case("seg-evaluate-with-means", [*SEG_EVAL, "-d", SEG_DATA, *MEANS], USAGE, says="--means"),
    Case("seg-evaluate-classification-thresholds", [*SEG_EVAL, "-d", SEG_DATA, "--thresholds",
                                                    "{inp}/thresholds.yaml"], PROVENANCE,
         says="not segmentation-thresholds"),
    Case("cbt-alpha-not-below-beta", [*CBT, "--alpha", "0.99", "--beta", "0.9"], USAGE, says="not below --beta"),
    Case("cbt-alpha-equals-beta", [*CBT, "--alpha", "0.9", "--beta", "0.9"], USAGE, says="not below --beta"),
    Case("cbt-search-over-without-budget", [*CBT, "--search-over", "beta"], USAGE, says="with --budget"),
    Case("cbt-search-over-unknown", [*CBT, "--budget", "0.8", "--search-over", "gamma"], USAGE,
         says="unknown --search-over"),
    Case("cbt-search-over-beta-alpha-one", [*CBT, "--budget", "0.8", "--search-over", "beta", "--alpha", "1"], USAGE,
         says="not below --beta 1"),
    Case("cbt-alpha-negative", [*CBT, "--alpha", "-0.5"], USAGE, says="outside [0, 1]"),
    Case("cbt-beta-above-one", [*CBT, "--beta", "1.5"], USAGE, says="outside [0, 1]"),
    Case("adp-c-threshold-above-one", [*CBT[:2], "adp-c", *CBT[3:], "--threshold", "2"], USAGE,
         says="outside [0, 1]"),
    # every pixel leaving at the first exit costs about a third of the tiny network
    Case("cbt-budget-unmet", [*CBT, "--budget", "0.05"], USAGE, says="cannot be met"),
    Case("adp-c-budget-unmet", [*CBT[:2], "adp-c", *CBT[3:], "--budget", "0.05"], USAGE, says="cannot be met"),
    Case("cbt-several-budgets", [*CBT, "--budget", "0.5", "--budget", "0.6"], USAGE, says="one --budget"),
    Case("cbt-budget-not-positive", [*CBT, "--budget", "-0.5"], USAGE, says="not a positive cost"),
    Case("adp-c-budget-without-data", [*CBT[:2], "adp-c", *CBT[3:5], "-o", "{out}/t.yaml", "--budget", "0.5"], USAGE,
         says="needs --data"),
    Case("cbt-without-data", [*CBT[:5], "-o", "{out}/t.yaml"], USAGE, says="needs --data"),
    Case("cbt-on-a-classifier", [*CBT[:4], "{ckpt}", *CBT[5:]], MISMATCH, says="is a classifier"),
    Case("sdn-on-a-segmentation-network", ["fit-thresholds", "--method", "sdn", "--exit-heads",
                                           "{inp}/heads.safetensors", "-c", "{inp}/seg.safetensors", "-d", "{data}",
                                           "--budget", "0.5", "-o", "{out}/t.yaml"], MISMATCH,
         says="is a segmentation network"),
    Case("calibrate-means-segmentation-on-classification-data", ["calibrate-means", "-c", "{inp}/seg.safetensors",
                                                                 "-d", "{data}", "-o", "{out}/m.safetensors"],
         MISMATCH, says="one label per image"),
    Case("calibrate-means-segmentation-with-clusters", ["calibrate-means", "-c", "{inp}/seg.safetensors", "-d",
                                                        SEG_DATA, "-o", "{out}/m.safetensors", "--clusters", "3"],
         USAGE, says="--clusters apply to classifiers"),
    Case("cbt-means-of-another-checkpoint", [*CBT_MEANS, "{inp}/seg-stats-other-checkpoint.safetensors"], PROVENANCE,
         says="made from checkpoint 000000000000"),
    Case("e2cm-sdn-means-at-other-exits", ["fit-thresholds", "--method", "e2cm+sdn", *MEANS, "--exit-heads",
                                           "{inp}/heads.safetensors", "-c", "{ckpt}", "-d", "{data}", "-o",
                                           "{out}/t.yaml", "--budget", "0.5"], PROVENANCE,
         says="`eetool calibrate-means --exits "),
    Case("cbt-with-classification-means", [*CBT_MEANS, "{inp}/means.safetensors"], PROVENANCE,
         says="class-means artifact, not segmentation-class-statistics"),
    Case("seg-thresholds-above-one", [*SEG_EVAL, "-d", SEG_DATA, "--thresholds",
                                      "{inp}/seg-thresholds-above-one.yaml"], BAD_INPUT, says="outside 0..1"),
    Case("seg-thresholds-of-another-method", [*SEG_EVAL, "-d", SEG_DATA, "--thresholds",
                                              "{inp}/seg-thresholds-other-method.yaml"], BAD_INPUT,
         says="names the method 'e2cm'"),
    Case("seg-thresholds-of-other-classes", [*SEG_EVAL, "-d", SEG_DATA, "--thresholds",
                                             "{inp}/seg-thresholds-other-classes.yaml"], PROVENANCE,
         says="fitted for the classes"),
    Case("cbt-with-thresholds-as-means", [*CBT_MEANS, "{inp}/thresholds.yaml"], PROVENANCE,
         says="thresholds artifact, not segmentation-class-statistics"),
    Case("cbt-means-of-other-classes", [*CBT_MEANS, "{inp}/seg-stats-two-classes.safetensors"], BAD_INPUT,
         says="holds no 4 x 3 x 3 float64 sums"),
    Case("cbt-means-and-data-without-budget", [*CBT, "--means", "{inp}/seg-stats.safetensors"], USAGE,
         says="--data is not read"),
    Case("adp-c-data-without-budget", [*CBT[:2], "adp-c", *CBT[3:]], USAGE, says="--data is not read"),
    Case("cbt-means-with-split", [*CBT_MEANS, "{inp}/seg-stats.safetensors", "--split", "test"], USAGE,
         says="--split selects samples of --data, which this run does not read"),
    Case("adp-c-with-indices", [*CBT[:2], "adp-c", *CBT[3:5], "-o", "{out}/t.yaml", "--indices",
                                "{inp}/seg.safetensors"], USAGE, says="--indices selects samples of --data"),
    Case("cbt-means-without-checkpoint", ["fit-thresholds", "--method", "cbt", "--means", "{inp}/seg-stats.safetensors",
                                          "-o", "{out}/t.yaml"], USAGE, says="needs --checkpoint"),
    Case("adp-c-with-means", [*CBT[:2], "adp-c", *CBT[3:5], "-o", "{out}/t.yaml", "--means",
                              "{inp}/seg-stats.safetensors"], USAGE, says="--means do not apply"),
    Case("e2cm-with-segmentation-statistics", ["fit-thresholds", "--means", "{inp}/seg-stats.safetensors", "-o",
                                               "{out}/t.yaml", "--budget", "0.5"], PROVENANCE,
         says="segmentation-class-statistics artifact, not class-means"),
    Case("evaluate-classifier-on-masks", [*EVAL, "-d", SEG_DATA], MISMATCH, says="per-pixel masks"),
    Case("train-classifier-on-masks", ["train", "-d", SEG_DATA, "-o", "{out}/m.safetensors", "--arch", "resnet20",
                                       "--arch-args", "{{width: 4}}", "--epochs", "1"], MISMATCH,
         says="per-pixel masks"),
    # init-exit-head and evaluate-lm
    Case("lm-layer-zero", [*LM_INIT, "--layer", "0"], USAGE, says="--layer 0"),
    Case("lm-layer-of-the-final-head", [*LM_INIT, "--layer", "4"], USAGE, says="outside 1..3"),
    Case("lm-empty-text", [*LM_MODEL, "-t", "{inp}/empty.txt"], BAD_INPUT, says="fewer than 32 tokens"),
    Case("lm-binary-text", [*LM_MODEL, "-t", "{inp}/random.dat"], BAD_INPUT, says="not UTF-8"),
    Case("lm-missing-text", [*LM_MODEL, "-t", "{inp}/no-such.txt"], BAD_INPUT, says="does not exist"),
    Case("lm-text-a-fifo", [*LM_MODEL, "-t", "{inp}/fifo.txt"], BAD_INPUT, says="not a regular file"),
    Case("lm-text-a-device", [*LM_MODEL, "-t", "{inp}/zeros.txt"], BAD_INPUT, says="not a regular file"),
    Case("thresholds-a-folder", [*EVAL, *MEANS, "--thresholds", "{inp}/user-folder"], BAD_INPUT,
         says="is a folder, not a file"),
    Case("checkpoint-a-fifo", ["evaluate", "-c", "{inp}/fifo.txt", "-d", "{data}"], BAD_INPUT,
         says="not a regular file"),
    Case("lm-folder-without-text", [*LM_MODEL, "-t", "{inp}/image-bomb"], BAD_INPUT, says="no *.txt"),
    *[Case(f"lm-{name}", ["init-exit-head", "-m", "{inp}/" + folder, "-t", LM_TEXT, "-o", "{out}/head.safetensors"],
           BAD_INPUT, says=says) for name, folder, says in (
        ("config-of-a-million-layers", "lm-million-layers", "num_hidden_layers = 1000000"),
        ("config-of-zero-layers", "lm-zero-layers", "num_hidden_layers = 0"),
        ("config-of-more-layers-than-the-weights", "lm-more-layers-than-weights", "the weights hold 4 blocks"),
        ("config-size-a-string", "lm-hidden-size-string", "hidden_size = '32'"),
        ("truncated-weights", "lm-truncated-weights", "not a valid safetensors file"),
        ("weights-of-a-huge-shape", "lm-huge-shape", "takes"),
        ("overlapping-weights", "lm-overlapping-tensors", "overlap"),
        ("int64-weight", "lm-int64-weight", "holds I64 values"),
        ("nan-embedding", "lm-nan-embedding", "not finite numbers (model.embed_tokens.weight)"),
        ("pickled-weights", "lm-pickled-weights", "only pickled weights"),
        ("malformed-tokenizer", "lm-malformed-tokenizer", "tokenizer.json is not a valid JSON"),
        ("gguf-of-2-to-the-60-tensors", "huge-count.gguf", "claims 1,152,921,504,606,846,976 tensors"),
        ("gguf-string-past-the-end", "huge-string.gguf", "a string claims"),
    )],
    # a tokenizer.json that lacks a key, in every command that reads a model folder
    *[Case(f"lm-{args[0]}-tokenizer-{name}", [*args, "-m", f"{{inp}}/lm-tokenizer-{name}"], BAD_INPUT,
           says=f"tokenizer.json lacks the key {says}") for args in LM_READERS for name, says in (
        ("no-added-tokens", "'added_tokens'"), ("added-token-without-id", "'id' in added_tokens[0]"),
        ("no-model", "'model'"), ("bpe-without-merges", "'merges' in its BPE model"))],
    Case("lm-nan-exit-head", [*LM_EVAL, "--head", "{inp}/nan-lm-head.safetensors"], BAD_INPUT,
         says="nan-lm-head.safetensors holds a weight that is not finite"),
    Case("lm-not-a-causal-lm", ["init-exit-head", "-m", "{inp}/resnet-config", "-t", LM_TEXT, "-o",
                                "{out}/head.safetensors"], MISMATCH, says="not a causal language model"),
    Case("lm-folder-without-config", ["init-exit-head", "-m", "{inp}/cifar-code", "-t", LM_TEXT, "-o",
                                      "{out}/head.safetensors"], BAD_INPUT, says="no config.json"),
    Case("lm-model-not-a-model-file", ["init-exit-head", "-m", "{inp}/empty.txt", "-t", LM_TEXT, "-o",
                                       "{out}/head.safetensors"], BAD_INPUT, says="neither"),
    Case("lm-missing-model", ["init-exit-head", "-m", "{inp}/no-such-model", "-t", LM_TEXT, "-o",
                              "{out}/head.safetensors"], BAD_INPUT, says="does not exist"),
    Case("lm-mix-without-alpha", [*LM_INIT, "--mix", "copy"], USAGE, says="--mix and --alpha"),
    Case("lm-alpha-without-mix", [*LM_INIT, "--alpha", "0.4"], USAGE, says="--mix and --alpha"),
    Case("lm-alpha-not-a-number", [*LM_INIT, "--mix", "random", "--alpha", "nan"], USAGE,
         says="nan is not a number from 0 to 1"),
    Case("fit-step-infinite", [*FIT, "--sweep", "--step", "inf"], USAGE, says="inf is not a number from"),
    Case("lm-alpha-above-one", [*LM_INIT, "--mix", "random", "--alpha", "1.5"], USAGE, says="--alpha"),
    Case("lm-n0-negative", [*LM_INIT, "--n0", "-1"], USAGE, says="--n0"),
    Case("lm-n0-not-a-number", [*LM_INIT, "--n0", "big"], USAGE, says="--n0"),
    Case("lm-n0-auto-on-one-context", [*LM_INIT, "--max-tokens", "32"], BAD_INPUT, says="at least 2 contexts"),
    Case("lm-output-exists", [*LM_INIT[:3], "-o", "{out}/existing.yaml", "-t", LM_TEXT], OUTPUT,
         says="already exists"),
    Case("lm-head-to-stdout", [*LM_INIT[:3], "-o", "-", "-t", LM_TEXT], USAGE, says="binary"),
    Case("lm-head-of-another-model", [*LM_EVAL, "--head", "{inp}/other-lm-head.safetensors"], PROVENANCE,
         says="made for model"),
    Case("lm-head-for-another-layer", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--layer", "3"], PROVENANCE,
         says="block 2, not 3"),
    Case("lm-head-of-another-kind", [*LM_EVAL, "--head", "{inp}/means.safetensors"], PROVENANCE,
         says="not lm-exit-head"),
    Case("lm-head-truncated", [*LM_EVAL, "--head", "{inp}/truncated.safetensors"], BAD_INPUT,
         says="not a readable safetensors"),
    Case("lm-no-head", LM_EVAL, USAGE, says="--head"),
    Case("lm-budget-zero", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--budget", "0"], USAGE,
         says="outside (0, 1]"),
    Case("lm-budget-above-one", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--budget", "1.5"], USAGE,
         says="outside (0, 1]"),
    Case("lm-budget-below-the-exit", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--budget", "0.3"], USAGE,
         says="cannot be met"),
    Case("lm-temperature-zero", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--temperature", "0"], USAGE,
         says="not a positive number"),
    Case("lm-temperature-negative", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--temperature", "-2"], USAGE,
         says="not a positive number"),
    Case("lm-temperature-not-a-number", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--temperature", "hot"],
         USAGE, says="neither auto nor a number"),
    Case("lm-temperature-auto-on-one-context", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--max-tokens",
                                                "32"], BAD_INPUT, says="at least 2 contexts"),
    Case("lm-plot-without-a-curve", [*LM_EVAL, "--head", "{inp}/lm-head.safetensors", "--plot", "{out}/c.png"],
         USAGE, says="no curve"),
    # train-exit-head
    Case("lm-train-zero-steps", [*LM_TRAIN, "-t", LM_TEXT, "--steps", "0"], USAGE, says="--steps 0"),
    Case("lm-train-empty-text", [*LM_TRAIN, "-t", "{inp}/empty.txt"], BAD_INPUT, says="fewer than 32 tokens"),
    Case("lm-train-head-of-another-model", [*LM_TRAIN[:3], "-t", LM_TEXT, "--context", "32", "-o",
                                            "{out}/trained.safetensors", "--head", "{inp}/other-lm-head.safetensors"],
         PROVENANCE, says="made for model"),
    Case("lm-train-head-of-another-kind", [*LM_TRAIN[:3], "-t", LM_TEXT, "--context", "32", "-o",
                                           "{out}/trained.safetensors", "--head", "{inp}/means.safetensors"],
         PROVENANCE, says="not lm-exit-head"),
    Case("lm-train-no-freeze-without-model-output", [*LM_TRAIN, "-t", LM_TEXT, "--no-freeze"], USAGE,
         says="--model-output"),
    Case("lm-train-model-output-is-the-model", [*LM_TRAIN, "-t", LM_TEXT, "--model-output", "{inp}/tiny-lm"],
         OUTPUT, says="is the input"),
    Case("lm-train-model-output-holds-the-inputs", [*LM_TRAIN, "-t", LM_TEXT, "--no-freeze", "--model-output", "{inp}",
                                                    "--force"], OUTPUT, says="holds the input"),
    Case("lm-train-model-output-inside-the-model", [*LM_TRAIN, "-t", LM_TEXT, "--model-output", "{inp}/tiny-lm/new",
                                                    "--force"], OUTPUT, says="lies inside the input"),
    Case("lm-train-model-output-holds-the-head", [*LM_TRAIN, "-t", LM_TEXT, "--model-output", "{out}", "--force"],
         OUTPUT, says="holds the output"),
    Case("lm-train-model-output-a-user-folder", [*LM_TRAIN, "-t", LM_TEXT, "--model-output", "{inp}/user-folder",
                                                 "--force"], OUTPUT, says="not written by eetool"),
    Case("lm-train-model-output-a-file", [*LM_TRAIN, "-t", LM_TEXT, "--model-output", "{out}/existing.yaml",
                                          "--force"], OUTPUT, says="is a file"),
    Case("lm-train-one-context", [*LM_TRAIN, "-t", LM_TEXT, "--max-tokens", "32"], BAD_INPUT,
         says="one context"),
    Case("lm-train-resume-without-state", [*LM_TRAIN, "-t", LM_TEXT, "--resume"], BAD_INPUT,
         says="no resumable state"),
    # prune-weights
    Case("prune-weights-amount-one", [*PRUNE_WEIGHTS, "--amount", "1"], USAGE, says="--amount"),
    Case("prune-weights-amount-zero", [*PRUNE_WEIGHTS, "--amount", "0"], USAGE, says="--amount"),
    Case("prune-weights-amount-negative", [*PRUNE_WEIGHTS, "--amount", "-0.1"], USAGE, says="--amount"),
    Case("prune-weights-amount-prunes-nothing", [*PRUNE_WEIGHTS, "--amount", "1e-12"], USAGE,
         says="prunes none of the"),
    Case("prune-weights-zero-rounds", [*PRUNE_WEIGHTS, "--rounds", "0"], USAGE, says="--rounds"),
    Case("prune-weights-a-trillion-rounds", [*PRUNE_WEIGHTS, "--rounds", "1000000000000"], USAGE,
         says="'--rounds'"),
    Case("train-a-billion-epochs", [*TRAIN[:-1], "1000000000"], USAGE, says="'--epochs'"),
    Case("lm-train-a-billion-steps", [*LM_TRAIN[:-1], "1000000000", "-t", LM_TEXT], USAGE, says="'--steps'"),
    Case("evaluate-a-million-repeats", [*EVAL, "--repeats", "1000000"], USAGE, says="'--repeats'"),
    Case("prune-dataset-a-million-models", [*PRUNE, "--method", "el2n", "--models", "1000000"], USAGE,
         says="'--models'"),
    Case("prune-weights-resume-folder-a-user-made", [*PRUNE_WEIGHTS[:5], "-o", "{inp}/user.safetensors",
                                                     *PRUNE_WEIGHTS[7:]], OUTPUT, says="not written by eetool"),
    Case("prune-dataset-resume-folder-a-user-made", [*PRUNE[:5], "-o", "{inp}/user.safetensors", *PRUNE[7:],
                                                     "--method", "el2n"], OUTPUT, says="not written by eetool"),
    Case("prune-weights-heads-of-another-checkpoint", ["prune-weights", "-c", DEMO_CHECKPOINT, "-d", "{data}", "-o",
                                                       "{out}/pruned.safetensors", "--exit-heads",
                                                       "{inp}/heads.safetensors"], PROVENANCE,
         says="made from checkpoint"),
    Case("prune-weights-heads-and-other-exits", ["prune-weights", "-c", "{ckpt}", "-d", "{data}", "-o",
                                                 "{out}/pruned.safetensors", "--exit-heads", "{inp}/heads.safetensors",
                                                 "--exits", "half"], USAGE, says="--exits"),
    Case("prune-weights-already-pruned", ["prune-weights", "-c", "{inp}/zeroed.safetensors", "-d", "{data}", "-o",
                                          "{out}/pruned.safetensors"], USAGE, says="already 100.0% sparse"),
    Case("prune-weights-channel-masks", [*PRUNE_WEIGHTS, "--structure", "channel", "--masks-output",
                                         "{out}/masks.safetensors"], USAGE, says="no zeros to mask"),
    Case("prune-weights-channel-ordered", [*PRUNE_WEIGHTS, "--structure", "channel", "--approach", "ordered"], USAGE,
         says="--approach joint"),
    Case("prune-weights-channel-plot", [*PRUNE_WEIGHTS, "--structure", "channel", "--plot", "{out}/p.png"], USAGE,
         says="--plot"),
    Case("prune-weights-channel-not-savable", ["prune-weights", "-c", "{inp}/mobilenet.safetensors", "-d", "{data}",
                                               "-o", "{out}/pruned.safetensors", "--structure", "channel"], MISMATCH,
         says="mobilenet_v3_small cannot be saved"),
    Case("prune-weights-channel-segmentation", ["prune-weights", "-c", "{inp}/seg.safetensors", "-d", SEG_DATA, "-o",
                                                "{out}/pruned.safetensors", "--structure", "channel"], MISMATCH),
    Case("prune-weights-unstructured-segmentation", ["prune-weights", "-c", "{inp}/seg.safetensors", "-d", SEG_DATA,
                                                     "-o", "{out}/pruned.safetensors"], MISMATCH),
    Case("prune-weights-final-phases-joint", [*PRUNE_WEIGHTS, "--final-layer-phases", "backbone"], USAGE,
         says="--approach ordered"),
    Case("prune-weights-final-phases-unknown", [*PRUNE_WEIGHTS, "--approach", "ordered", "--final-layer-phases",
                                                "heads"], USAGE, says="--final-layer-phases"),
    Case("prune-weights-channel-amount-out-of-reach", [*PRUNE_WEIGHTS, "--structure", "channel", "--amount", "0.999"],
         USAGE, says="at most (removing 98% of every layer's channels), not 0.1%", skip=_no_torch_pruning),
    Case("prune-weights-channel-round-to-wider-than-every-layer", [*PRUNE_WEIGHTS, "--structure", "channel",
                                                                   "--round-to", "1000"],
         USAGE, says="reaches 100.0% of the MACs at most", skip=_no_torch_pruning),
    Case("prune-weights-round-to-unstructured", [*PRUNE_WEIGHTS, "--round-to", "8"], USAGE, says="--round-to"),
    Case("evaluate-baseline-other-input", [*EVAL, "--baseline", "{inp}/mobilenet.safetensors"], MISMATCH,
         says="cannot be timed on the same data"),
    Case("evaluate-compare-other-input", [*EVAL, "--compare", "{inp}/mobilenet.safetensors"], MISMATCH,
         says="cannot be timed on the same data"),
    Case("evaluate-compare-other-classes", [*EVAL, "--compare", "{ckpt}", "--compare",
                                            "{inp}/five-classes.safetensors"], MISMATCH, says="into 5 classes"),
    Case("evaluate-compare-segmentation", [*EVAL, "--compare", "{inp}/seg.safetensors"], MISMATCH,
         says="is a segmentation network"),
    Case("evaluate-compare-on-segmentation", ["evaluate", "-c", "{inp}/seg.safetensors", "-d", SEG_DATA, "--compare",
                                              "{ckpt}"], USAGE, says="--compare apply to classifiers"),
    Case("prune-weights-output-not-safetensors", ["prune-weights", "-c", "{ckpt}", "-d", "{data}", "-o",
                                                  "{out}/pruned.pt"], USAGE, says=".safetensors"),
    Case("prune-weights-masks-to-stdout", [*PRUNE_WEIGHTS, "--masks-output", "-"], USAGE, says="stdout"),
    Case("prune-weights-resume-without-state", [*PRUNE_WEIGHTS, "--resume"], BAD_INPUT, says="no resumable state"),
    # checkpoints
    Case("checkpoint-missing", ["evaluate", "-c", "{inp}/missing.safetensors", "-d", "{data}", "-o", "{out}/r.yaml"],
         BAD_INPUT),
    Case("checkpoint-missing-pt", [*FOREIGN, "-c", "{inp}/missing.pt", "--arch", "resnet20"], BAD_INPUT),
    Case("checkpoint-truncated-safetensors", ["evaluate", "-c", "{inp}/truncated.safetensors", "-d", "{data}"],
         BAD_INPUT),
    Case("checkpoint-random-bytes-safetensors", ["evaluate", "-c", "{inp}/random.safetensors", "-d", "{data}"],
         BAD_INPUT),
    Case("checkpoint-wrong-suffix", ["evaluate", "-c", "{inp}/random.dat", "-d", "{data}"], BAD_INPUT),
    Case("pt-pickles-whole-model", [*FOREIGN, "-c", "{inp}/whole-model.pt", "--arch", "resnet20"], BAD_INPUT,
         says="whole model"),
    Case("pt-pickle-without-tensors", [*FOREIGN, "-c", "{inp}/no-tensors.pt", "--arch", "resnet20"], BAD_INPUT,
         says="no state dict of tensors"),
    Case("pt-plain-pickle", [*FOREIGN, "-c", "{inp}/plain-pickle.pt", "--arch", "resnet20"], BAD_INPUT,
         says="not a readable torch file"),
    Case("pt-random-bytes", [*FOREIGN, "-c", "{inp}/random.dat.pt", "--arch", "resnet20"], BAD_INPUT,
         says="not a readable torch file"),
    Case("weights-do-not-fit-arch", [*FOREIGN, "-c", "{inp}/state.pt", "--arch", "resnet32"], MISMATCH,
         says="do not fit resnet32"),
    Case("weights-do-not-fit-width", [*FOREIGN[:-1], "{{width: 8}}", "-c", "{inp}/state.pt", "--arch", "resnet20"],
         MISMATCH),
    Case("foreign-wrong-num-classes", [*FOREIGN, "-c", "{inp}/state.pt", "--arch", "resnet20", "--num-classes", "7"],
         MISMATCH),
    Case("foreign-without-arch", [*FOREIGN, "-c", "{inp}/state.pt"], USAGE),
    Case("foreign-without-input-shape", ["evaluate", "-c", "{inp}/state.pt", "-d", "{data}", "--arch", "resnet20"],
         USAGE),
    Case("eetool-checkpoint-other-arch", [*EVAL, "--arch", "resnet32"], MISMATCH),
    Case("eetool-checkpoint-other-num-classes", [*EVAL, "--num-classes", "100"], MISMATCH),
    Case("unknown-architecture", [*FOREIGN, "-c", "{inp}/state.pt", "--arch", "resnet21"], USAGE),
    Case("custom-architecture-not-importable", [*FOREIGN, "-c", "{inp}/state.pt", "--arch", "no_such_module:build"],
         USAGE),
    # datasets
    Case("dataset-unknown-name", ["evaluate", "-c", "{ckpt}", "-d", "imagenet-1k", "-o", "{out}/r.yaml"], USAGE),
    Case("dataset-folder-missing", ["evaluate", "-c", "{ckpt}", "-d", "mnist:{inp}/no-such-folder"], BAD_INPUT),
    Case("dataset-image-folder-missing", ["evaluate", "-c", "{ckpt}", "-d", "folder:{inp}/no-such-folder"], BAD_INPUT),
    Case("dataset-file-missing", ["evaluate", "-c", "{ckpt}", "-d", "safetensors:{inp}/missing.safetensors"],
         BAD_INPUT),
    Case("dataset-empty", ["evaluate", "-c", "{ckpt}", "-d", "{inp}/empty.safetensors", "-o", "{out}/r.yaml"],
         BAD_INPUT),
    Case("dataset-images-not-uint8", ["evaluate", "-c", "{ckpt}", "-d", "{inp}/float-images.safetensors"], BAD_INPUT),
    Case("dataset-labels-beyond-classes", ["evaluate", "-c", "{ckpt}", "-d", "{inp}/labels-25.safetensors",
                                           "-o", "{out}/r.yaml"], MISMATCH),
    Case("dataset-bad-split", [*EVAL, "--split", "validation"], USAGE),
    # --indices
    Case("indices-empty", [*EVAL, "--indices", "{inp}/empty.txt"], BAD_INPUT),
    Case("indices-out-of-range", [*EVAL, "--indices", "{inp}/out-of-range.txt"], BAD_INPUT),
    Case("indices-negative", [*EVAL, "--indices", "{inp}/negative.txt"], BAD_INPUT),
    Case("indices-repeated", [*EVAL, "--indices", "{inp}/repeated.txt"], BAD_INPUT),
    Case("indices-not-integers", [*EVAL, "--indices", "{inp}/not-integers.txt"], BAD_INPUT),
    Case("indices-missing-file", [*EVAL, "--indices", "{inp}/missing.txt"], BAD_INPUT),
    Case("indices-made-for-another-dataset", [*EVAL, "--indices", "{inp}/indices-other-data.safetensors"],
         PROVENANCE, says="mnist/test"),
    Case("indices-artifact-of-wrong-kind", [*EVAL, "--indices", "{ckpt}"], PROVENANCE),
    Case("indices-given-an-evaluation-yaml", [*EVAL, "--indices", "{inp}/evaluation.yaml"], PROVENANCE),
    # outputs
    Case("output-exists-without-force", [*EVAL[:-1], "{out}/existing.yaml"], OUTPUT, says="--force"),
    Case("output-folder-missing", [*EVAL[:-1], "{out}/no-such-folder/r.yaml"], OUTPUT),
    Case("output-is-a-folder", [*EVAL[:-1], "{out}", "--force"], OUTPUT),
    Case("output-folder-unwritable", [*EVAL[:-1], "{out}/read-only/r.yaml"], OUTPUT, skip=_root_can_write),
    Case("output-is-the-checkpoint", [*EVAL[:-1], "{ckpt}", "--force"], OUTPUT),
    Case("output-is-the-dataset", [*EVAL[:-1], "{data}", "--force"], OUTPUT, says="also an input"),
    Case("output-is-the-indices", [*EVAL[:-1], "{inp}/repeated.txt", "--force", "--indices", "{inp}/repeated.txt"],
         OUTPUT),
    Case("output-is-the-config", [*EVAL[:-1], "{inp}/seed.yaml", "--force", "--config", "{inp}/seed.yaml"], OUTPUT,
         says="also an input"),
    Case("output-stdout-and-json", [*EVAL[:-1], "-", "--format", "json"], USAGE),
    Case("train-output-exists", [*TRAIN[:4], "{out}/existing.yaml", *TRAIN[5:]], OUTPUT),
    Case("train-output-is-the-dataset", [*TRAIN[:4], "{data}", *TRAIN[5:], "--force"], OUTPUT),
    Case("train-output-to-stdout", [*TRAIN[:4], "-", *TRAIN[5:]], USAGE),
    Case("train-resume-without-state", [*TRAIN, "--resume"], BAD_INPUT),
    Case("train-unknown-optimizer", [*TRAIN, "--optimizer", "lbfgs"], USAGE),
    Case("train-unknown-architecture", [*TRAIN, "--arch", "resnet21"], USAGE),
    Case("train-labels-beyond-classes-of-checkpoint", ["train", "-d", "{inp}/labels-25.safetensors", "--split", "test",
                                                       "-c", "{ckpt}", "-o", "{out}/m.safetensors"], MISMATCH),
    Case("train-unlabelled-data", ["train", "-d", "{inp}/unlabelled.safetensors", "--split", "test",
                                   "-o", "{out}/m.safetensors"], BAD_INPUT, says="unlabelled"),
    Case("evaluate-unlabelled-data", [*EVAL[:4], "{inp}/unlabelled.safetensors", *EVAL[5:]], BAD_INPUT,
         says="unlabelled"),
    # flag values
    Case("input-shape-two-numbers", [*FOREIGN[:6], "1,28", "-c", "{inp}/state.pt", "--arch", "resnet20"], USAGE),
    Case("input-shape-not-numbers", [*EVAL, "--input-shape", "one,28,28"], USAGE),
    Case("input-shape-zero", [*EVAL, "--input-shape", "1,0,28"], USAGE),
    Case("arch-args-not-a-mapping", [*FOREIGN[:-1], "[4]", "-c", "{inp}/state.pt", "--arch", "resnet20"], USAGE),
    Case("arch-args-invalid-yaml", [*FOREIGN[:-1], "{{width: [}}", "-c", "{inp}/state.pt", "--arch", "resnet20"],
         USAGE),
    Case("arch-args-unknown-argument", [*FOREIGN[:-1], "{{depth: 4}}", "-c", "{inp}/state.pt", "--arch", "resnet20"],
         USAGE),
    Case("train-arch-args-unknown-argument", [*TRAIN[:-3], "{{nosuch: 1}}", "--epochs", "1"], USAGE),
    Case("mean-not-numbers", [*EVAL, "--mean", "a,b"], USAGE),
    Case("device-cuda-without-cuda", [*EVAL, "--device", "cuda"], USAGE, skip=_cuda_present),
    Case("device-unknown", [*EVAL, "--device", "tpu"], USAGE),
    Case("format-unknown", [*EVAL, "--format", "xml"], USAGE),
    Case("threads-zero", [*EVAL, "--threads", "0"], USAGE),
    Case("batch-size-not-a-number", [*EVAL, "--batch-size", "many"], USAGE),
    Case("required-option-missing", ["evaluate", "-c", "{ckpt}", "-o", "{out}/r.yaml"], USAGE, says="--data"),
    Case("unknown-option", [*EVAL, "--epochs", "3"], USAGE),
    Case("unknown-command", ["evaluation", "-c", "{ckpt}"], USAGE),
    # --config
    Case("config-unknown-key", [*EVAL, "--config", "{inp}/unknown-key.yaml"], USAGE, says="unknown key 'epochs'"),
    Case("config-a-switch-for-a-count", [*EVAL, "--config", "{inp}/repeats-true.yaml"], USAGE,
         says="bad value True for 'repeats'"),
    Case("config-a-key-twice", [*EVAL, "--config", "{inp}/repeats-twice.yaml"], BAD_INPUT,
         says="the key 'repeats' appears twice"),
    Case("config-invalid-yaml", [*EVAL, "--config", "{inp}/invalid.yaml"], BAD_INPUT),
    Case("config-missing", [*EVAL, "--config", "{inp}/missing.yaml"], BAD_INPUT),
    Case("config-bad-value", [*EVAL, "--config", "{inp}/bad-value.yaml"], USAGE),
    Case("config-not-a-mapping", [*EVAL, "--config", "{inp}/not-mapping.yaml"], USAGE),
    # inspect
    Case("inspect-unknown-exit", ["inspect", "--checkpoint", "{ckpt}", "--exits", "layer9.0"], USAGE),
    Case("inspect-exits-out-of-order", ["inspect", "--checkpoint", "{ckpt}", "--exits", "layer2.0,layer1.0"], USAGE),
    Case("inspect-exit-twice", ["inspect", "--checkpoint", "{ckpt}", "--exits", "layer1.0,layer1.0"], USAGE),
    Case("inspect-nothing", ["inspect"], USAGE),
    Case("inspect-missing-file", ["inspect", "{inp}/missing.yaml"], BAD_INPUT),
    Case("inspect-yaml-without-provenance", ["inspect", "{inp}/plain.yaml"], BAD_INPUT),
    Case("inspect-artifact-args-not-json", ["inspect", "{inp}/means-args-not-json.safetensors"], PROVENANCE,
         says="malformed provenance"),
    Case("inspect-artifact-of-unknown-kind", ["inspect", "{inp}/means-unknown-kind.safetensors"], PROVENANCE,
         says="unknown kind 'magic'"),
    Case("inspect-binary-file", ["inspect", "{inp}/random.dat"], BAD_INPUT),
    Case("inspect-random-safetensors", ["inspect", "{inp}/random.safetensors"], BAD_INPUT),
    # calibrate-means
    Case("calibrate-class-without-samples", [*CALIBRATE[:4], "{inp}/two-classes.safetensors", *CALIBRATE[5:],
                                             "--split", "test"], BAD_INPUT, says="no calibration samples of class 2"),
    Case("calibrate-labels-beyond-classes", [*CALIBRATE[:4], "{inp}/labels-25.safetensors", *CALIBRATE[5:],
                                             "--split", "test"], MISMATCH),
    Case("calibrate-pool-channels-not-dividing", [*CALIBRATE, "--pool-channels", "3"], USAGE, says="does not divide"),
    Case("calibrate-pool-spatial-zero", [*CALIBRATE, "--pool-spatial", "0"], USAGE),
    Case("calibrate-unknown-exit", [*CALIBRATE, "--exits", "layer9.0"], USAGE),
    Case("calibrate-output-exists", [*CALIBRATE[:-1], "{out}/existing.yaml"], OUTPUT, says="--force"),
    Case("calibrate-output-is-the-checkpoint", [*CALIBRATE[:-1], "{ckpt}", "--force"], OUTPUT, says="also an input"),
    Case("calibrate-output-missing", ["calibrate-means", "-c", "{ckpt}", "-d", "{data}"], USAGE, says="--output"),
    # fit-thresholds
    Case("means-missing", ["fit-thresholds", "--means", "{inp}/missing.safetensors", "-o", "{out}/t.yaml",
                           "--budget", "0.5"], BAD_INPUT),
    Case("means-truncated", ["fit-thresholds", "--means", "{inp}/truncated-means.safetensors", "-o", "{out}/t.yaml",
                             "--budget", "0.5"], BAD_INPUT),
    Case("means-given-a-checkpoint", ["fit-thresholds", "--means", "{ckpt}", "-o", "{out}/t.yaml", "--budget", "0.5"],
         PROVENANCE, says="checkpoint artifact, not class-means"),
    Case("means-given-thresholds", ["fit-thresholds", "--means", "{inp}/thresholds.yaml", "-o", "{out}/t.yaml",
                                    "--budget", "0.5"], PROVENANCE, says="thresholds artifact, not class-means"),
    Case("means-without-calibration-cache", ["fit-thresholds", "--means", "{inp}/means-without-cache.safetensors",
                                             "-o", "{out}/t.yaml", "--budget", "0.5"], USAGE, says="calibration"),
    Case("fit-without-budget", FIT, USAGE, says="no budget"),
    Case("fit-unreachable-budget", [*FIT, "--budget", "0.001"], USAGE, says="reachable budgets are"),
    Case("fit-budget-above-one", [*FIT, "--budget", "1.5"], USAGE, says="reachable budgets are"),
    Case("fit-unknown-search", [*FIT, "--budget", "0.5", "--search", "anneal"], USAGE, says="unknown search"),
    Case("fit-step-zero", [*FIT, "--sweep", "--step", "0"], USAGE),
    Case("fit-unknown-overhead", [*FIT, "--budget", "0.5", "--overhead", "guessed"], USAGE,
         says="unknown --overhead"),
    Case("fit-measured-overhead-without-checkpoint", [*FIT, "--budget", "0.5", "--overhead", "measured"], USAGE,
         says="--checkpoint and --data"),
    Case("fit-checkpoint-without-validation", [*FIT, "--budget", "0.5", "-c", "{ckpt}"], USAGE),
    Case("fit-validation-without-data", [*FIT, "--budget", "0.5", "--validation", "-c", "{ckpt}"], USAGE),
    Case("fit-output-is-the-means", [*FIT[:-1], "{inp}/means.safetensors", "--budget", "0.5", "--force"], OUTPUT,
         says="also an input"),
    Case("fit-output-exists", [*FIT[:-1], "{out}/existing.yaml", "--budget", "0.5"], OUTPUT, says="--force"),
    Case("fit-output-to-stdout-and-json", [*FIT[:-1], "-", "--budget", "0.5", "--format", "json"], USAGE),
    # evaluate with early exits
    Case("means-without-thresholds", [*EVAL, *MEANS], USAGE, says="--means and --thresholds"),
    Case("thresholds-without-means", [*EVAL, "--thresholds", "{inp}/thresholds.yaml"], USAGE),
    Case("thresholds-given-an-evaluation-yaml", [*EVAL, *MEANS, "--thresholds", "{inp}/evaluation.yaml"], PROVENANCE,
         says="evaluation artifact, not thresholds"),
    Case("thresholds-given-class-means", [*EVAL, *MEANS, "--thresholds", "{inp}/means.safetensors"], PROVENANCE,
         says="class-means artifact, not thresholds"),
    Case("thresholds-given-a-plain-yaml", [*EVAL, *MEANS, "--thresholds", "{inp}/plain.yaml"], PROVENANCE),
    Case("thresholds-missing", [*EVAL, *MEANS, "--thresholds", "{inp}/missing.yaml"], BAD_INPUT),
    Case("evaluate-means-truncated", [*EVAL, "--means", "{inp}/truncated-means.safetensors", "--thresholds",
                                      "{inp}/thresholds.yaml"], BAD_INPUT),
    Case("evaluate-point-out-of-range", [*EVAL, *MEANS, "--thresholds", "{inp}/thresholds.yaml", "--point", "1"],
         USAGE, says="--point"),
    Case("output-is-the-thresholds", [*EVAL[:-1], "{inp}/thresholds.yaml", "--force", *MEANS, "--thresholds",
                                      "{inp}/thresholds.yaml"], OUTPUT, says="also an input"),
    # prune-dataset
    Case("prune-unknown-method", [*PRUNE, "-m", "best"], USAGE, says="unknown --method"),
    Case("prune-ratio-zero", [*PRUNE, "--ratio", "0"], USAGE, says="--ratio"),
    Case("prune-ratio-one", [*PRUNE, "--ratio", "1"], USAGE, says="--ratio"),
    Case("prune-output-not-safetensors", [*PRUNE, "-o", "{out}/kept.txt"], USAGE, says=".safetensors"),
    Case("prune-output-to-stdout", [*PRUNE, "-o", "-"], USAGE, says=".safetensors"),
    Case("prune-summary-exists", [*PRUNE, "--summary", "{out}/existing.yaml"], OUTPUT, says="--force"),
    Case("prune-pruned-output-is-the-output", [*PRUNE, "--pruned-output", "{out}/kept.safetensors"], USAGE,
         says="same file"),
    Case("prune-soft-weights-three", [*PRUNE, "-m", "eeprune-soft", "--soft-weights", "0.5,0.3,0.2"], USAGE,
         says="four"),
    Case("prune-soft-threshold-not-soft", [*PRUNE, "--soft-threshold", "0.9"], USAGE, says="eeprune-soft"),
    Case("prune-soft-threshold-one", [*PRUNE, "-m", "eeprune-soft", "--soft-threshold", "1"], USAGE),
    Case("prune-svp-from-weights", [*PRUNE, "-m", "svp", "--from-weights"], USAGE, says="proxy"),
    Case("prune-svp-unknown-proxy", [*PRUNE, "-m", "svp", "--proxy-arch", "resnet7"], USAGE),
    Case("prune-unknown-exit", [*PRUNE, "--exit", "layer9.9"], USAGE, says="not an exit point"),
    Case("prune-bad-optimizer", [*PRUNE, "--optimizer", "rmsprop"], USAGE, says="optimizer"),
    Case("prune-resume-without-state", [*PRUNE, "--resume"], BAD_INPUT, says="no resumable state"),
    Case("prune-records-and-epochs", [*PRUNE, *RECORDS, "--epochs", "2"], USAGE, says="--from-scores"),
    Case("prune-records-missing", [*PRUNE, "--from-scores", "{inp}/missing.safetensors"], BAD_INPUT),
    Case("prune-records-are-a-checkpoint", [*PRUNE, "--from-scores", "{ckpt}"], PROVENANCE,
         says="checkpoint artifact, not indices"),
    Case("prune-records-of-another-method", [*PRUNE, *RECORDS, "-m", "el2n"], USAGE, says="random pruning phase"),
    Case("prune-records-of-another-subset", [*PRUNE, *RECORDS, "-m", "random", "--indices", "{inp}/first-half.txt"],
         USAGE, says="--indices"),
    Case("prune-records-of-another-exit", [*PRUNE, "--from-scores", "{inp}/loss-kept.safetensors", "--exit",
                                           "before"], USAGE, says="records from the exit after layer2.1"),
    Case("prune-records-of-other-data", [*PRUNE, "--from-scores", "{inp}/indices-other-data.safetensors"],
         PROVENANCE, says="made for dataset"),
    Case("prune-records-of-another-model", [*PRUNE, "-m", "eeprune-loss", "--from-scores",
                                            "{inp}/records-other-model.safetensors"], PROVENANCE,
         says="records of a resnet32"),
    Case("prune-records-missing-one", [*PRUNE, "-m", "eeprune-loss", "--from-scores",
                                       "{inp}/records-missing.safetensors"], BAD_INPUT, says="no 'early_loss' record"),
    Case("prune-records-of-another-length", [*PRUNE, "-m", "eeprune-loss", "--from-scores",
                                             "{inp}/records-short.safetensors"], BAD_INPUT, says="one value for each"),
    Case("prune-records-of-another-type", [*PRUNE, "-m", "eeprune-soft", "--from-scores",
                                           "{inp}/records-as-text.safetensors"], BAD_INPUT, says="not bools"),
    Case("prune-records-without-dataset", [*PRUNE, "-m", "eeprune-loss", "--from-scores",
                                           "{inp}/records-no-dataset.safetensors"], PROVENANCE,
         says="records no dataset"),
    # YAML a reader must not expand: a "billion laughs" of 396 bytes
    Case("config-billion-laughs", [*EVAL, "--config", "{inp}/laughs.yaml"], BAD_INPUT, says="aliases"),
    Case("flag-billion-laughs", [*FOREIGN[:-1], LAUGHS_FLAG.replace("{", "{{").replace("}", "}}"), "-c",
                                 "{inp}/state.pt", "--arch", "resnet20"], USAGE, says="aliases"),
    Case("thresholds-billion-laughs", [*EVAL, *MEANS, "--thresholds", "{inp}/laughs.yaml"], BAD_INPUT,
         says="aliases"),
    Case("inspect-billion-laughs", ["inspect", "{inp}/laughs.yaml"], BAD_INPUT, says="aliases"),
    # hand-edited thresholds
    *(Case(f"thresholds-{name}", [*EVAL, *MEANS, "--thresholds", f"{{inp}}/thresholds-{name}.yaml"], code, says=says)
      for name, code, says in (
          ("nan", BAD_INPUT, "not finite numbers"), ("inf", BAD_INPUT, "not finite numbers"),
          ("strings", BAD_INPUT, "not finite numbers"), ("wrong-count", BAD_INPUT, "thresholds for"),
          ("no-budget", BAD_INPUT, "no budget"), ("points-not-a-list", BAD_INPUT, "no list of operating points"),
          ("no-checkpoint", PROVENANCE, "records no checkpoint"), ("no-exits", PROVENANCE, "records no exits"),
          ("no-inputs", PROVENANCE, "records no class-means"), ("exits-a-number", PROVENANCE, "malformed"),
          ("unknown-method", BAD_INPUT, "unknown method 'magic'"))),
    # hand-edited class means
    *(Case(f"means-{name}", [*EVAL, "--means", f"{{inp}}/means-{name}.safetensors", "--thresholds",
                             "{inp}/thresholds.yaml"], code, says=says)
      for name, code, says in (
          ("means-rows", BAD_INPUT, "means.0 is"), ("normalisers-rows", BAD_INPUT, "normalisers are"),
          ("calibration-short", BAD_INPUT, "calibration.confidence"), ("nan", BAD_INPUT, "finite"),
          ("no-checkpoint", PROVENANCE, "records no checkpoint"))),
    # hand-edited exit heads
    *(Case(f"heads-{name}", [*EVAL, *MEANS, "--thresholds", "{inp}/thresholds.yaml", "--exit-heads",
                             f"{{inp}}/heads-{name}.safetensors"], code, says=says)
      for name, code, says in (
          ("classes-a-string", BAD_INPUT, "not positive integers"), ("no-kind", BAD_INPUT, "incomplete"),
          ("unknown-kind", BAD_INPUT, "'magic'"), ("huge-shape", BAD_INPUT, "in_shape"),
          ("linear-misshapen", BAD_INPUT, "size mismatch"))),
    Case("heads-without-checkpoint", ["fit-thresholds", "--method", "entropy", "--exit-heads",
                                      "{inp}/heads-no-checkpoint.safetensors", "-c", "{ckpt}", "-d", "{data}",
                                      "--budget", "0.6", "-o", "{out}/t.yaml"], PROVENANCE,
         says="records no checkpoint"),
    # indices artifacts
    Case("indices-float", [*EVAL, "--indices", "{inp}/indices-float.safetensors"], BAD_INPUT, says="1-D integer"),
    Case("indices-2d", [*EVAL, "--indices", "{inp}/indices-2d.safetensors"], BAD_INPUT, says="1-D integer"),
    Case("indices-without-dataset", [*EVAL, "--indices", "{inp}/indices-no-dataset.safetensors"], PROVENANCE,
         says="records no dataset"),
    # data of the wrong shapes and crafted sizes
    Case("dataset-two-channels", [*EVAL[:4], "{inp}/two-channels.safetensors", *EVAL[5:]], BAD_INPUT,
         says="1, 3 or 4 channels"),
    Case("dataset-zero-size-images", [*EVAL[:4], "{inp}/zero-size.safetensors", *EVAL[5:]], BAD_INPUT),
    Case("dataset-labels-2d", [*EVAL[:4], "{inp}/labels-2d.safetensors", *EVAL[5:]], BAD_INPUT, says="1-D integer"),
    Case("dataset-labels-float", [*EVAL[:4], "{inp}/labels-float.safetensors", *EVAL[5:]], BAD_INPUT,
         says="torch.float32"),
    Case("dataset-idx-header-beyond-file", [*EVAL[:4], "mnist:{inp}/mnist-huge", *EVAL[5:]], BAD_INPUT,
         says="declares"),
    Case("dataset-cifar-pickle-runs-code", [*EVAL[:4], "cifar10:{inp}/cifar-code", *EVAL[5:]], BAD_INPUT,
         says="not a CIFAR batch"),
    Case("dataset-image-decompression-bomb", [*EVAL[:4], "folder:{inp}/image-bomb", *EVAL[5:]], BAD_INPUT),
    Case("dataset-image-too-long-once-resized", [*EVAL[:4], "folder:{inp}/image-tall", *EVAL[5:]], BAD_INPUT,
         says="would be 28 x 3360000 resized to 28 pixels"),
    Case("predict-image-too-long-once-resized", ["predict", "-c", "{ckpt}", "{inp}/image-tall/cls/a.png",
                                                 "--on-error", "stop", "-q"], BAD_INPUT, says="would be 28 x 3360000"),
    # outputs that would replace an image the run reads, with --force
    Case("predict-output-is-an-image-of-an-input-folder", ["predict", "-c", "{ckpt}", "{inp}/images", "-o",
                                                           "{inp}/images/a.png", "--force"], OUTPUT,
         says="is an image the run reads from the input folder"),
    Case("predict-segmentation-output-is-an-image-of-an-input-folder",
         ["predict", "-c", "{inp}/seg.safetensors", "{inp}/images", "--output-dir", "{out}/masks", "-o",
          "{inp}/images/b.png", "--force"], OUTPUT, says="is an image the run reads from the input folder"),
    Case("evaluate-output-is-an-image-of-the-data-folder", [*EVAL[:4], "folder:{inp}/image-tall", "-o",
                                                            "{inp}/image-tall/cls/a.png", "--force"], OUTPUT,
         says="is an image the run reads from the input folder"),
    # foreign checkpoints and files that name code or sizes
    Case("checkpoint-names-os-system", ["inspect", "{inp}/runs-os-system.safetensors"], USAGE,
         says="--arch os:system"),
    Case("checkpoint-names-os-system-evaluate", [*EVAL[:2], "{inp}/runs-os-system.safetensors", *EVAL[3:]], USAGE,
         says="imports only when you name it"),
    Case("checkpoint-input-shape-60000", [*EVAL[:2], "{inp}/huge-input.safetensors", *EVAL[3:]], BAD_INPUT,
         says="input shape"),
    Case("checkpoint-width-a-billion", [*EVAL[:2], "{inp}/huge-width.safetensors", *EVAL[3:]], USAGE,
         says="width"),
    Case("checkpoint-nan-weights", [*EVAL[:2], "{inp}/nan-weights.safetensors", *EVAL[3:]], BAD_INPUT,
         says="NaN or infinite values in layer1.0.conv1.weight"),
    Case("foreign-torchvision-weights-download", [*FOREIGN[:-1], "{{weights: DEFAULT}}", "-c", "{inp}/state.pt",
                                                  "--arch", "resnet18"], USAGE, says="never downloads"),
    Case("eetool-checkpoint-other-arch-args", [*EVAL, "--arch-args", "{{width: 8}}"], MISMATCH),
    Case("input-shape-beyond-limits", [*EVAL, "--input-shape", "1,60000,60000"], USAGE, says="limits"),
    Case("mean-nan", [*EVAL, "--mean", "nan"], USAGE, says="finite"),
    Case("std-zero", [*EVAL, "--std", "0"], USAGE, says="--std"),
    Case("num-classes-beyond-limits", [*EVAL, "--num-classes", "2000000"], USAGE),
    Case("calibrate-foreign-without-arch", [*CALIBRATE[:2], "{inp}/state.pt", *CALIBRATE[3:]], USAGE,
         says="eetool import"),
    Case("train-exits-foreign-without-input-shape", ["train-exits", "-c", "{inp}/state.pt", "-d", "{data}", "-o",
                                                     "{out}/h.safetensors", "--arch", "resnet20"], USAGE,
         says="--input-shape"),
    Case("import-to-stdout", ["import", "-c", "{inp}/state.pt", "-o", "-"], USAGE),
    Case("import-not-safetensors", ["import", "-c", "{ckpt}", "-o", "{out}/m.pt"], USAGE, says=".safetensors"),
    Case("import-without-arch", ["import", "-c", "{inp}/state.pt", "-o", "{out}/m.safetensors"], USAGE,
         says="--arch"),
    Case("import-wrong-class-count", ["import", "-c", "{ckpt}", "-o", "{out}/m.safetensors", "--classes", "a,b"],
         USAGE, says="--classes"),
    Case("import-integer-weights", ["import", "-c", "{inp}/int-state.pt", "-o", "{out}/m.safetensors", "--arch",
                                    "resnet20", "--arch-args", "{{width: 4}}", "--num-classes", "10", "--input-shape",
                                    "1,28,28"], MISMATCH, says="holds torch.int64 values"),
    Case("import-over-the-checkpoint", ["import", "-c", "{ckpt}", "-o", "{ckpt}", "--force"], OUTPUT,
         says="also an input"),
    # the embedded demo files are inputs no output may replace
    Case("output-is-the-demo-checkpoint", [*EVAL[:-1], DEMO_CHECKPOINT, "--force"], OUTPUT, says="demo"),
    Case("output-is-the-demo-data", [*EVAL[:4], "demo", "-o", DEMO_DATA, "--force"], OUTPUT, says="demo"),
    Case("output-into-the-demo-folder", [*EVAL[:-1], str(demo_path("new.yaml"))], OUTPUT, says="demo"),
    # binary outputs never go to stdout
    Case("calibrate-output-to-stdout", [*CALIBRATE[:-1], "-"], USAGE, says="binary"),
    Case("train-exits-output-to-stdout", [*EXITS, "-o", "-"], USAGE, says="binary"),
    Case("train-exits-backbone-output-to-stdout", [*EXITS, "-o", "{out}/heads.safetensors", "--joint",
                                                   "--backbone-output", "-"], USAGE, says="--backbone-output -"),
    Case("train-exits-backbone-output-is-the-output", [*EXITS, "-o", "{out}/heads.safetensors", "--joint",
                                                       "--backbone-output", "{out}/heads.safetensors"], USAGE,
         says="same file"),
    # train-exits --from-scratch and --distill: a backbone from one source, the settings training it needs
    Case("train-exits-without-checkpoint", ["train-exits", "-d", "{data}", "-o", "{out}/h.safetensors"], USAGE,
         says="--checkpoint"),
    Case("train-exits-from-scratch-and-checkpoint", [*EXITS, *SCRATCH, "--backbone-output", "{out}/b.safetensors"],
         USAGE, says="--from-scratch"),
    Case("train-exits-from-scratch-without-joint", [*SCRATCH_EXITS, "--backbone-output", "{out}/b.safetensors"],
         USAGE, says="--joint"),
    Case("train-exits-from-scratch-without-backbone-output", [*SCRATCH_EXITS, "--joint"], USAGE,
         says="--backbone-output"),
    Case("train-exits-from-scratch-segmentation-arch", [*SCRATCH_EXITS, "--joint", "--backbone-output",
                                                        "{out}/b.safetensors", "--arch", "eeseg"], USAGE,
         says="segmentation"),
    Case("train-exits-from-scratch-with-means", [*SCRATCH_EXITS, "--joint", "--backbone-output", "{out}/b.safetensors",
                                                 *MEANS], USAGE, says="--means"),
    Case("train-exits-distill-without-joint", [*EXITS, "-o", "{out}/h.safetensors", "--distill", "0.5"], USAGE,
         says="--distill needs --joint"),
    Case("train-exits-distill-above-one", [*SCRATCH_EXITS, "--joint", "--backbone-output", "{out}/b.safetensors",
                                           "--distill", "1.5"], USAGE, says="--distill"),
    Case("train-exits-distill-temperature-zero", [*EXITS, "-o", "{out}/h.safetensors", "--joint",
                                                  "--backbone-output", "{out}/b.safetensors", "--distill", "0.5",
                                                  "--distill-temperature", "0"], USAGE,
         says="--distill-temperature"),
    Case("prune-pruned-output-to-stdout", [*PRUNE, "--pruned-output", "-"], USAGE),
    Case("prune-summary-to-stdout", [*PRUNE, "--summary", "-"], USAGE, says="--summary"),
    # training options that are not numbers, or out of their range
    Case("train-lr-nan", [*TRAIN, "--lr", "nan"], USAGE, says="--lr nan is not a finite"),
    Case("train-lr-inf", [*TRAIN, "--lr", "inf"], USAGE, says="--lr inf is not a finite"),
    Case("train-lr-beyond-float32", [*TRAIN, "--lr", "1e300"], USAGE, says="--lr"),
    Case("train-momentum-negative", [*TRAIN, "--momentum", "-0.5"], USAGE, says="--momentum"),
    Case("train-momentum-one", [*TRAIN, "--momentum", "1"], USAGE, says="--momentum"),
    Case("train-weight-decay-negative", [*TRAIN, "--weight-decay", "-1"], USAGE, says="--weight-decay"),
    Case("train-weight-decay-nan", [*TRAIN, "--weight-decay", "nan"], USAGE, says="--weight-decay"),
    Case("train-mixup-negative", [*TRAIN, "--mixup", "-1"], USAGE, says="--mixup"),
    Case("train-warmup-negative", [*TRAIN, "--warmup-epochs", "-1"], USAGE, says="--warmup-epochs"),
    Case("train-label-smoothing-nan", [*TRAIN, "--label-smoothing", "nan"], USAGE, says="--label-smoothing"),
    Case("train-exits-lr-nan", [*EXITS, "-o", "{out}/heads.safetensors", "--lr", "nan"], USAGE, says="--lr"),
    Case("prune-lr-inf", [*PRUNE, "--lr", "inf"], USAGE, says="--lr"),
    Case("prune-weight-decay-negative", [*PRUNE, "--weight-decay", "-1"], USAGE, says="--weight-decay"),
    Case("seed-negative", [*EVAL, "--seed", "-1"], USAGE, says="--seed"),
    Case("seed-beyond-64-bits", [*TRAIN, "--seed", str(2**70)], USAGE, says="--seed"),
    Case("threads-absurd", [*EVAL, "--threads", "100000"], USAGE, says="--threads"),
    Case("prune-unlabelled", ["prune-dataset", "-c", "{ckpt}", "-d", "safetensors:{inp}/unlabelled.safetensors",
                              "--split", "test", "-o", "{out}/k.safetensors", "--ratio", "0.5", "-m", "random"],
         BAD_INPUT, says="unlabelled"),
    # an input hashed for the provenance before it is read: the usual one-line error, not an internal one
    Case("export-means-missing", [*EXPORT, "--means", "{out}/missing.safetensors", "--thresholds",
                                  "{out}/missing.yaml"], BAD_INPUT, says="missing.safetensors does not exist"),
    Case("export-int8-without-calibration-data", [*INT8[:-4]], USAGE, says="needs --calibration-data"),
    Case("export-quantize-unknown", [*EXPORT, "--quantize", "int4"], USAGE, says="--quantize"),
    Case("export-calibration-data-without-quantize", [*EXPORT, *INT8[-4:]], USAGE, says="only with --quantize"),
    Case("export-calibration-data-of-other-classes", [*INT8[:-3], "{inp}/two-classes.safetensors",
                                                      "--calibration-split", "test"], MISMATCH, says="classes"),
    Case("export-calibration-data-of-another-size", [*INT8[:-3], "{inp}/size-32.safetensors",
                                                     "--calibration-split", "test"], MISMATCH, says="32 x 32"),
    Case("export-calibration-samples-zero", [*INT8, "--calibration-samples", "0"], USAGE,
         says="--calibration-samples"),
    # predict on a segmentation checkpoint: masks into --output-dir
    Case("predict-segmentation-without-output-dir", [*SEG_PREDICT[:-2]], USAGE, says="--output-dir is needed"),
    Case("predict-output-dir-with-a-classifier", ["predict", "-c", "{ckpt}", "-d", "{data}", "--output-dir",
                                                  "{out}/masks"], USAGE, says="this checkpoint is a classifier"),
    Case("predict-segmentation-top-k", [*SEG_PREDICT, "--top-k", "2"], USAGE, says="--top-k apply to classifiers"),
    Case("predict-segmentation-means", [*SEG_PREDICT, "--means", "{inp}/means.safetensors"], USAGE,
         says="--means apply to classifiers"),
    Case("predict-segmentation-point-1", [*SEG_PREDICT, "--thresholds", "{inp}/seg-thresholds.yaml", "--point", "1"],
         USAGE, says="holds one operating point"),
    Case("predict-segmentation-decide-at-without-thresholds", [*SEG_PREDICT, "--decide-at", "feature"], USAGE,
         says="--decide-at applies to early exits"),
    Case("predict-segmentation-decide-at-other-rule", [*SEG_PREDICT, "--thresholds", "{inp}/seg-thresholds.yaml",
                                                       "--decide-at", "feature"], PROVENANCE,
         says="fitted for --decide-at pixel"),
    Case("predict-segmentation-output-dir-is-a-file", [*SEG_PREDICT[:-1], "{out}/existing.yaml"], OUTPUT,
         says="is not a folder"),
    Case("predict-segmentation-classifier-data", [*SEG_PREDICT[:3], "-d", "{data}", *SEG_PREDICT[5:]], MISMATCH,
         says="one label per image"),
    # export of a segmentation checkpoint: the plain network only
    Case("export-segmentation-pixel-exits", ["export", "-c", "{inp}/seg.safetensors", "--thresholds",
                                             "{inp}/seg-thresholds.yaml", "-o", "{out}/bundle"], USAGE,
         says="pixel exits do not export yet"),
    Case("export-segmentation-means", ["export", "-c", "{inp}/seg.safetensors", "--means", "{inp}/means.safetensors",
                                       "-o", "{out}/bundle"], USAGE, says="--means apply to classifiers"),
    Case("export-segmentation-int8", ["export", "-c", "{inp}/seg.safetensors", "--quantize", "int8",
                                      "--calibration-data", "{data}", "-o", "{out}/bundle"], USAGE,
         says="--quantize and --calibration-data apply to classifier bundles"),
    Case("predict-decide-at-with-a-classifier", ["predict", "-c", "{ckpt}", "-d", "{data}", "--decide-at", "pixel"],
         USAGE, says="--decide-at applies to segmentation thresholds"),
]


def snapshot(*folders: Path) -> dict[str, tuple[int, int]]:
    """Every file (hidden ones too) under the folders, with its size and modification time."""
    out = {}
    for folder in folders:
        for dirpath, _, files in os.walk(folder):
            for name in files:
                p = Path(dirpath) / name
                st = p.stat()
                out[str(p)] = (st.st_size, st.st_mtime_ns)
    return out


def check_one_error_line(result: Result, code: int) -> str:
    assert "Traceback" not in result.stderr, result.stderr
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}: {result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got {len(lines)}: {result.stderr!r}"
    line = lines[0]
    assert line.startswith("error: "), line
    assert "(hint: " in line and not line.endswith("(hint: )"), f"no hint in {line!r}"
    assert result.stdout == "", f"stdout should be empty on error: {result.stdout!r}"
    return line


def test_the_table_is_long_enough() -> None:
    assert len(CASES) >= 25
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", [c.param() for c in CASES])
def test_bad_input(case: Case, inputs: Path, tiny_checkpoint: str, tiny_data: str, workdir: Path) -> None:
    out = workdir / "out"
    out.mkdir()
    (out / "existing.yaml").write_text("keep me\n")
    (out / "read-only").mkdir()
    (out / "read-only").chmod(0o555)
    try:
        if case.skip and (reason := case.skip(out)):
            pytest.skip(reason)
        args = [a.format(ckpt=tiny_checkpoint, data=tiny_data, inp=inputs, out=out) for a in case.args]
        folders = (workdir, inputs, Path(tiny_checkpoint).parent, Path(tiny_data).parent)
        before = snapshot(*folders)
        result = runner.invoke(app, args)
        after = snapshot(*folders)
        line = check_one_error_line(result, case.code)
        assert case.says in line
        assert after == before, f"files changed: {set(after.items()) ^ set(before.items())}"
    finally:
        (out / "read-only").chmod(0o755)


def test_unwritable_output_folder_even_for_root(tiny_checkpoint: str, tiny_data: str, workdir: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """Root writes into a 0o555 folder, so tell eetool the folder is not writable the way the kernel would."""
    locked = workdir / "locked"
    locked.mkdir()
    real_access = os.access

    def access(path: str | os.PathLike[str], mode: int, **kwargs: object) -> bool:
        if mode & os.W_OK and Path(path).resolve() == locked.resolve():
            return False
        return real_access(path, mode, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "access", access)
    result = runner.invoke(app, ["evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", str(locked / "r.yaml")])
    assert "not writable" in check_one_error_line(result, ExitCode.OUTPUT)
    assert list(locked.iterdir()) == []


def test_failed_write_leaves_no_temp_file(tiny_checkpoint: str, tiny_data: str, workdir: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails half-way (disk full) removes its temp file and keeps the old output."""
    import eetool.core.artifacts

    (workdir / "r.yaml").write_text("old\n")

    def replace(src: str, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(eetool.core.artifacts.os, "replace", replace)
    result = runner.invoke(app, ["evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-o", "r.yaml", "--force"])
    assert "No space left" in check_one_error_line(result, ExitCode.OUTPUT)
    assert sorted(p.name for p in workdir.iterdir()) == ["r.yaml"]
    assert (workdir / "r.yaml").read_text() == "old\n"


# ---------------------------------------------------------------------------------------------
# Internal errors: a bug (here, a user's model whose forward raises) is one line pointing at --debug, exit 1


BOOM = '''
from torch import nn


class Boom(nn.Module):
    def __init__(self, num_classes=10, in_channels=1):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 2, 3)
        self.fc = nn.Linear(2, num_classes)

    def forward(self, x):
        raise RuntimeError("boom in forward\\nsecond line")


def build(num_classes=10, in_channels=1):
    return Boom(num_classes, in_channels)
'''


@pytest.fixture()
def boom(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Foreign weights of a custom architecture (package.module:callable) whose forward raises."""
    folder = tmp_path / "models"
    folder.mkdir()
    name = f"eetool_boom_{tmp_path.name.replace('-', '_')}"  # a fresh module per test: imports are cached
    (folder / f"{name}.py").write_text(BOOM)
    monkeypatch.syspath_prepend(str(folder))
    import importlib

    module = importlib.import_module(name)
    save_file(module.build().state_dict(), str(folder / "boom.safetensors"))
    return ["--checkpoint", str(folder / "boom.safetensors"), "--arch", f"{name}:build", "--input-shape", "1,8,8",
            "--mean", "0.5", "--std", "0.5"]


COMMAND_OF_BOOM = [
    pytest.param(["inspect"], id="inspect"),
    pytest.param(["evaluate", "-d", "{data}"], id="evaluate"),
]


@pytest.mark.parametrize("command", COMMAND_OF_BOOM)
def test_internal_error_is_one_line_with_a_debug_hint(command: list[str], boom: list[str], tiny_data: str,
                                                      workdir: Path) -> None:
    result = runner.invoke(app, [a.format(data=tiny_data) for a in command] + boom)
    assert result.exit_code == ExitCode.INTERNAL
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("internal error: RuntimeError: boom in forward")
    assert "second line" not in lines[0]
    assert "--debug" in lines[0] and "(hint: " in lines[0]
    assert result.stdout == ""
    assert [p.name for p in workdir.iterdir()] == ["models"]


def test_internal_error_with_debug_shows_the_traceback(boom: list[str]) -> None:
    result = runner.invoke(app, ["inspect", *boom, "--debug"])
    assert result.exit_code == ExitCode.INTERNAL
    assert result.stderr.startswith("Traceback (most recent call last):")
    assert 'raise RuntimeError("boom in forward' in result.stderr
    assert result.stderr.splitlines()[-1].startswith("internal error: RuntimeError: boom in forward")
    assert result.stdout == ""


def test_usage_error_with_debug_shows_the_traceback(tiny_checkpoint: str) -> None:
    result = runner.invoke(app, ["inspect", "--checkpoint", tiny_checkpoint, "--exits", "nowhere", "--debug"])
    assert result.exit_code == ExitCode.USAGE
    assert "Traceback" in result.stderr and "UsageError" in result.stderr
    assert result.stderr.splitlines()[-1].startswith("error: 'nowhere' is not an exit point")


def test_warnings_stay_off_an_error_and_off_quiet_runs(tiny_checkpoint: str, tiny_data: str, workdir: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A library warning before a failure stays off stderr (unless -v), so the error is still one line."""
    import warnings

    import eetool.core.datasets

    real = eetool.core.datasets.load_dataset

    def noisy(*args: object, **kwargs: object) -> object:
        warnings.warn("something deprecated", UserWarning, stacklevel=1)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(eetool.core.datasets, "load_dataset", noisy)
    bad = ["evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "--indices", "missing.txt"]
    check_one_error_line(runner.invoke(app, bad), ExitCode.BAD_INPUT)
    verbose = runner.invoke(app, [*bad, "-v"])
    assert verbose.stderr.splitlines()[0] == "warning: UserWarning: something deprecated"
    assert verbose.stderr.splitlines()[-1].startswith("error: ")
    ok = runner.invoke(app, ["evaluate", "-c", tiny_checkpoint, "-d", tiny_data])
    assert ok.exit_code == 0
    assert ok.stderr == "warning: UserWarning: something deprecated\n"
    quiet = runner.invoke(app, ["evaluate", "-c", tiny_checkpoint, "-d", tiny_data, "-q"])
    assert quiet.exit_code == 0
    assert quiet.stderr == ""  # -q: only data on stdout and errors on stderr


def test_predict_output_named_on_stdin_is_an_input(inputs: Path, tiny_checkpoint: str, workdir: Path) -> None:
    """An image listed on stdin is an input as much as one named on the command line: -o never replaces it."""
    before = snapshot(inputs)
    listed = f"{inputs / 'images' / 'a.png'}\n{inputs / 'images' / 'b.png'}\n"
    result = runner.invoke(app, ["predict", "-c", tiny_checkpoint, "-", "-o", str(inputs / "images" / "b.png"),
                                 "--force"], input=listed)
    assert "is also an input" in check_one_error_line(result, OUTPUT)
    assert snapshot(inputs) == before


@pytest.mark.parametrize("existing", [False, True], ids=["folder-it-made", "users-folder"])
def test_an_interrupted_mask_prediction_leaves_no_masks(existing: bool, inputs: Path, workdir: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Interrupted after the masks of its first batch were written, before their records: the run removes the masks
    it created, and --output-dir when it made it; a folder it did not make stays, with the user's files."""
    from eetool.core.prediction_io import RecordWriter

    def interrupt(self: RecordWriter, records: list[dict[str, Any]]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(RecordWriter, "write", interrupt)
    masks = workdir / "masks"
    if existing:
        masks.mkdir()
        (masks / "notes.txt").write_text("mine\n")
    result = runner.invoke(app, ["predict", "-c", str(inputs / "seg.safetensors"), str(inputs / "images"),
                                 "--output-dir", str(masks), "-b", "1", "-o", str(workdir / "records.jsonl")])
    assert result.exit_code == ExitCode.INTERRUPTED, result.stderr
    assert "no output was written" in result.stderr
    assert [p.name for p in workdir.rglob("*")] == (["masks", "notes.txt"] if existing else [])


def test_channel_pruning_without_torch_pruning_is_refused_before_any_work(tiny_checkpoint: str, tiny_data: str,
                                                                          workdir: Path,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "torch_pruning", None)  # as if the prune extra were not installed
    result = runner.invoke(app, [*(a.format(ckpt=tiny_checkpoint, data=tiny_data, out=workdir)
                                   for a in PRUNE_WEIGHTS), "--structure", "channel"])
    assert "pip install 'eetool[prune]'" in check_one_error_line(result, USAGE)
    assert list(workdir.iterdir()) == []
