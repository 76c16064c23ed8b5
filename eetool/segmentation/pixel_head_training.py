"""`eetool train-exits` on a torchvision segmentation checkpoint: per-pixel exit heads after three backbone
stages, trained on the sum of their cross-entropies with the backbone and classifier frozen. The output is a
whole checkpoint that `fit-thresholds` and `evaluate` take as they take an eeseg one.

Method: docs/segmentation.md
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from eetool.core.errors import ModelMismatchError, UsageError
from eetool.core.reporting import counted, format_fields, format_table
from eetool.core.run_inputs import data_path, open_checkpoint
from eetool.segmentation import IGNORE
from eetool.segmentation.model import EXIT_NAMES, EESegNet, upsample

if TYPE_CHECKING:
    from eetool.core.options import Run
    from eetool.core.training_loop import Mix


@dataclass
class ExitTrainingRequest:
    checkpoint: str
    data: str
    output: str
    split: str
    indices: str | None
    eval_split: str | None
    epochs: int
    samples: int | None
    batch_size: int
    optimizer: str
    lr: float
    weight_decay: float
    schedule: str
    force: bool
    momentum: float = 0.9
    warmup_epochs: float = 1.0
    classification_only: dict[str, Any] = field(default_factory=dict)  # options given that do not apply


def frozen_backbone_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mix: Mix | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss: the sum of the exit heads' per-pixel cross-entropies (ignored pixels left out), the backbone run
    without gradients in evaluation mode; logits: the deepest exit head's."""
    from eetool.segmentation.tv import TorchvisionSegNet

    net = cast(TorchvisionSegNet, model)
    heads = net.require_exits()
    net.backbone.eval()
    net.classifier.eval()
    outs = []
    h, saved = x, dict[str, torch.Tensor]()
    for n, head in enumerate(heads):
        with torch.no_grad():
            h = net.run_stage(n, h, saved)
        outs.append(upsample(head(h), x.shape[-2:]))  # before the next stage runs on h
    target = y.long()
    loss = sum((F.cross_entropy(o, target, ignore_index=IGNORE) for o in outs), start=torch.zeros((), device=x.device))
    return loss, outs[-1]


def train_segmentation_exits(run: Run, req: ExitTrainingRequest) -> None:
    from eetool.core.artifacts import Provenance
    from eetool.core.checkpoint import save_checkpoint
    from eetool.core.datasets import Preprocess
    from eetool.core.training_loop import TrainConfig, fit
    from eetool.segmentation.inputs import load_masks
    from eetool.segmentation.tv import TorchvisionSegNet, dense_costs

    given = [name for name, value in req.classification_only.items() if value]
    if given:
        raise UsageError(f"{', '.join(given)} apply to classifiers, not to a segmentation checkpoint",
                         "a segmentation network gets its three 1x1 exit heads with the backbone frozen: drop them")
    run.check_output(req.output, force=req.force, inputs=(req.checkpoint, req.indices, data_path(req.data)),
                     binary=True)
    cfg = TrainConfig(epochs=req.epochs, batch_size=req.batch_size, optimizer=req.optimizer, lr=req.lr,
                      momentum=req.momentum, weight_decay=req.weight_decay, schedule=req.schedule,
                      warmup_epochs=req.warmup_epochs, augment=False, seed=run.seed,
                      samples=req.samples or 0)
    cfg.validate()  # before any data is loaded
    ckpt = open_checkpoint(run, req.checkpoint)
    if isinstance(ckpt.model, EESegNet):
        raise ModelMismatchError(f"{ckpt.label} is an eeseg network, whose exits are built in and trained with it",
                                 "train it with `eetool train`; train-exits adds heads to torchvision networks")
    base = cast(TorchvisionSegNet, ckpt.model)
    device = run.torch()
    train_data = load_masks(req.data, req.split, req.indices, ckpt)
    eval_data = load_masks(req.data, req.eval_split, None, ckpt) if req.eval_split else None
    spec = replace(ckpt.spec, arch_args={**ckpt.spec.arch_args, "exits": True},
                   classes=ckpt.spec.classes or (list(train_data.classes)
                                                 if len(train_data.classes) == ckpt.spec.num_classes else []))
    torch.manual_seed(run.seed)  # the heads' initialisation
    model = cast(TorchvisionSegNet, spec.build())
    kept = {k: v for k, v in base.state_dict().items() if not k.startswith("exit_heads.")}
    missing, unexpected = model.load_state_dict(kept, strict=False)
    assert not unexpected and all(k.startswith("exit_heads.") for k in missing)
    heads = model.require_exits()
    preprocess = Preprocess(spec.input_shape, spec.mean, spec.std)
    run.reporter.log(f"training {len(heads)} exit heads on {ckpt.label} (backbone frozen) on {train_data.spec}")
    result = fit(model, train_data, preprocess, cfg, device=device, params=list(heads.parameters()),
                 step=frozen_backbone_step, reporter=run.reporter)
    training = {"samples_seen": result.samples_seen, "epochs": len(result.history),
                "seconds": round(result.seconds, 1), "loss": round(result.last.loss, 6)}
    prov = Provenance(kind="checkpoint", checkpoint_sha256=ckpt.sha256, model_sha256=ckpt.model_sha256,
                      dataset=train_data.fingerprint, args={**run.args, "training": training})
    save_checkpoint(req.output, model.cpu(), spec, prov)
    run.wrote(req.output)
    costs = dense_costs(model, spec.input_shape)
    plain = sum(costs.stages)
    mious = exit_mious(model, eval_data, preprocess, req.batch_size, device) if eval_data is not None else None
    rows = [{"exit": name, "head_macs": costs.heads[n] if n < len(costs.heads) else 0,
             # every pixel leaving here: the stages so far and the heads passed
             "cost_normalised": round((sum(costs.stages[:n + 1]) + sum(costs.heads[:n + 1])) / plain, 6),
             "miou": None if mious is None else round(mious[n], 6)} for n, name in enumerate(EXIT_NAMES)]
    doc = {"output": req.output, "arch": spec.arch, **training, "eval_split": req.eval_split, "exits": rows}

    def text(d: dict[str, Any]) -> str:
        return format_fields([
            ("checkpoint with exits", d["output"]),
            ("training", f"frozen backbone, {counted(d['epochs'], 'epoch')}, {d['samples_seen']} images, "
                         f"{d['seconds']:.1f} s"),
        ]) + "\n\n" + format_table(["exit", "head macs", "cost to exit", f"{req.eval_split or 'eval'} mIoU"],
                                   [[r["exit"], f"{r['head_macs']:,}", r["cost_normalised"], r["miou"]]
                                    for r in d["exits"]])

    run.emit(doc, text)


@torch.no_grad()
def exit_mious(model: nn.Module, data: Any, preprocess: Any, batch_size: int, device: torch.device) -> list[float]:
    """Each exit's mIoU (every pixel leaving there) on ``data``."""
    from eetool.segmentation.metrics import confusion, mean_iou
    from eetool.segmentation.tv import TorchvisionSegNet

    net = cast(TorchvisionSegNet, model).eval().to(device)
    k = net.num_classes
    matrices = [torch.zeros(k, k, dtype=torch.int64) for _ in EXIT_NAMES]
    for images, masks, _ in data.batches(batch_size):
        for matrix, out in zip(matrices, net.forward_exits(preprocess(images, device)), strict=True):
            matrix += confusion(out.argmax(1).cpu(), masks, k)
    return [mean_iou(m) for m in matrices]
