"""The one training loop: from scratch, fine-tuning, and (in later commands) exit heads.

``fit`` takes the parameters to optimise and a ``step`` function that turns a batch into a
loss and the logits to score, so a frozen-backbone or multi-exit loss plugs in without a second
loop. State is saved atomically after every epoch and a run resumes from it exactly.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from eetool.core.artifacts import atomic_write
from eetool.core.choices import OPTIMIZERS, SCHEDULES
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.distributed import World, all_sum, broadcast_from_main, gather_rows, reported_by_main, share
from eetool.core.errors import InputError, UsageError
from eetool.core.reporting import Reporter

FLOAT32_MAX = float(torch.finfo(torch.float32).max)


@dataclass
class TrainConfig:
    epochs: int = 15
    batch_size: int = 128
    optimizer: str = "sgd"  # SGD with Nesterov momentum, or AdamW
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.0
    mixup: float = 0.0  # Beta(alpha, alpha) mixing; 0 turns it off
    augment: bool = True  # random crop (4-pixel padding) and horizontal flip
    seed: int = 0
    samples: int = 0  # a training budget in samples seen, instead of whole epochs (0: --epochs decides)

    def planned_epochs(self, dataset_size: int) -> int:
        return math.ceil(self.samples / dataset_size) if self.samples else self.epochs

    def total_steps(self, dataset_size: int) -> int:
        if self.samples:
            whole, rest = divmod(self.samples, dataset_size)
            return whole * math.ceil(dataset_size / self.batch_size) + math.ceil(rest / self.batch_size)
        return self.epochs * math.ceil(dataset_size / self.batch_size)

    def check_world(self, world: World) -> None:
        """Settings that cannot train under torchrun: mixup pairs samples across the whole batch, which the
        processes share out."""
        if world.distributed and self.mixup > 0:
            raise UsageError("--mixup pairs samples across the whole batch, which torchrun shares out among "
                             "its processes", "run without --mixup, or as one process without torchrun")

    def validate(self) -> None:
        if self.optimizer not in OPTIMIZERS:
            raise UsageError(f"unknown optimizer {self.optimizer!r}", f"use one of {', '.join(OPTIMIZERS)}")
        if self.schedule not in SCHEDULES:
            raise UsageError(f"unknown schedule {self.schedule!r}", f"use one of {', '.join(SCHEDULES)}")
        for name in ("epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be at least 1", "give a positive number")
        if self.samples < 0:
            raise UsageError("--samples must not be negative", "give the number of samples to train on")
        for name in ("lr", "momentum", "weight_decay", "warmup_epochs", "label_smoothing", "mixup"):
            if not abs(getattr(self, name)) <= FLOAT32_MAX:  # nan and inf too; torch cannot step with more
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)} is not a finite 32-bit number",
                                 "give a number such as 0.1")
        if self.lr <= 0:
            raise UsageError("--lr must be positive", "e.g. --lr 0.1 for SGD, 1e-3 for AdamW")
        if not 0 <= self.momentum < 1:
            raise UsageError(f"--momentum must be in [0, 1), not {self.momentum}", "e.g. 0.9, or 0 for plain SGD")
        # Negative values would make the optimiser grow the weights, or the schedule and mixup undefined.
        for name, example in (("weight_decay", "5e-4, or 0 for none"), ("mixup", "0.2, or 0 for none"),
                              ("warmup_epochs", "1, or 0 for none")):
            if getattr(self, name) < 0:
                raise UsageError(f"--{name.replace('_', '-')} must not be negative, not {getattr(self, name)}",
                                 f"e.g. {example}")
        # A warm-up longer than the training is allowed: the schedule clamps it, so the rate rises for the whole run.
        if not 0 <= self.label_smoothing < 1:
            raise UsageError("--label-smoothing must be in [0, 1)", "e.g. 0.1")


# A step maps (model, inputs, labels, soft targets or None) to (loss, logits used for accuracy).
Step = Callable[[nn.Module, torch.Tensor, torch.Tensor, "Mix | None"], tuple[torch.Tensor, torch.Tensor]]


class Tracker(Protocol):
    """Per-sample records kept during training (see ``fit``)."""

    def after_step(self, positions: torch.Tensor) -> None: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None: ...


@dataclass
class Mix:
    """Mixup of a batch with a permutation of itself: the loss is lam*L(y) + (1-lam)*L(y[perm])."""

    perm: torch.Tensor
    lam: float


def cross_entropy_step(label_smoothing: float = 0.0) -> Step:
    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mix: Mix | None) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing)
        if mix is not None:
            mixed_in = F.cross_entropy(logits, y[mix.perm], label_smoothing=label_smoothing)
            loss = mix.lam * loss + (1 - mix.lam) * mixed_in
        return loss, logits

    return step


@dataclass
class EpochRecord:
    epoch: int
    loss: float
    train_accuracy: float
    samples_seen: int
    seconds: float
    eval_accuracy: float | None = None


@dataclass
class TrainResult:
    history: list[EpochRecord] = field(default_factory=list)
    samples_seen: int = 0
    seconds: float = 0.0

    @property
    def last(self) -> EpochRecord:
        return self.history[-1]


def augment_batch(images: torch.Tensor, generator: torch.Generator, pad: int = 4) -> torch.Tensor:
    """Random crop with zero padding and a random horizontal flip, vectorised over the uint8 batch."""
    return Augmentation.draw(images.shape[0], generator, images.shape[2], images.shape[3], pad).apply(images)


@dataclass
class Augmentation:
    """Each sample's crop rows and columns (a flip reverses the columns), drawn for a whole batch so that
    under torchrun every process draws what one process would and applies its share (``select``)."""

    rows: torch.Tensor  # (n, h)
    cols: torch.Tensor  # (n, w)
    pad: int

    @classmethod
    def draw(cls, n: int, generator: torch.Generator, h: int, w: int, pad: int = 4) -> Augmentation:
        dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=generator)
        rows = dy + torch.arange(h)
        cols = dx + torch.arange(w)
        flip = torch.rand(n, generator=generator) < 0.5
        return cls(rows, torch.where(flip[:, None], cols.flip(1), cols), pad)

    def select(self, share: slice) -> Augmentation:
        return Augmentation(self.rows[share], self.cols[share], self.pad)

    def apply(self, images: torch.Tensor) -> torch.Tensor:
        n, c = images.shape[:2]
        pad = self.pad
        padded = F.pad(images, (pad, pad, pad, pad))
        return padded[torch.arange(n)[:, None, None, None], torch.arange(c)[None, :, None, None],
                      self.rows[:, None, :, None], self.cols[:, None, None, :]]


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise UsageError("nothing to train: every parameter is frozen", "unfreeze at least one module")
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0,
                           weight_decay=cfg.weight_decay)


def make_schedule(opt: torch.optim.Optimizer, cfg: TrainConfig, steps_per_epoch: int,
                  total_steps: int | None = None) -> torch.optim.lr_scheduler.LRScheduler:
    total = total_steps or cfg.epochs * steps_per_epoch
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    if cfg.schedule == "onecycle":
        # OneCycleLR peaks at step pct_start * total - 1 and divides by zero if that is the first or last step.
        if total < 3:
            raise UsageError(f"--schedule onecycle needs at least 3 steps, not {total}",
                             "train for more epochs or smaller batches, or use --schedule cosine")
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total,
                                                   pct_start=max(warmup, 2) / total)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(opt, factor)


@torch.no_grad()
def accuracy(model: nn.Module, data: Dataset, preprocess: Preprocess, device: torch.device,
             batch_size: int = 512, world: World = World()) -> float:
    """Top-1 accuracy; under torchrun each rank scores its share of the batches and the counts are summed."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64)  # correct, scored
    for images, labels, _ in data.batches(batch_size, world=world):
        counts[0] += int((model(preprocess(images, device)).argmax(1).cpu() == labels).sum())
        counts[1] += int((labels >= 0).sum())  # a sample's label, or a segmentation mask's labelled pixels
    all_sum(counts, world)
    model.train(was_training)
    return float(counts[0]) / max(float(counts[1]), 1.0)


def fit(model: nn.Module, data: Dataset, preprocess: Preprocess, cfg: TrainConfig, *,
        device: torch.device | str = "cpu", params: Iterable[nn.Parameter] | None = None, step: Step | None = None,
        eval_data: Dataset | None = None, resume_path: str | None = None, resume: bool = False,
        reporter: Reporter | None = None, on_epoch: Callable[[EpochRecord], None] | None = None,
        tracker: Tracker | None = None, world: World = World()) -> TrainResult:
    """Train ``model`` in place; with ``resume_path`` the state is saved after every epoch. A ``tracker`` receives
    each batch's dataset positions after its step, and is saved and resumed with the model. Under torchrun
    (``world``) it trains under DistributedDataParallel with ``cfg.batch_size`` the global batch.

    Method: docs/scale-out.md#how-the-processes-share-the-work"""
    cfg.validate()
    cfg.check_world(world)
    reporter = reporter or Reporter()
    device = torch.device(device)
    step = step or cross_entropy_step(cfg.label_smoothing)
    model.to(device)
    trained = [p for p in (params if params is not None else model.parameters()) if p.requires_grad]
    opt = make_optimizer(trained, cfg)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    epochs = cfg.planned_epochs(len(data))
    sched = make_schedule(opt, cfg, steps_per_epoch, cfg.total_steps(len(data)))
    gen = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult()
    start_epoch = 0
    if resume:
        if not resume_path or not Path(resume_path).is_file():
            raise InputError(f"no resumable state at {resume_path}", "run without --resume to start afresh")
        start_epoch = _load_state(resume_path, model, opt, sched, gen, result, cfg, data.fingerprint, tracker)
        reporter.log(f"resuming after epoch {start_epoch} of {epochs}")
    with _distributed(model, trained, device, world) as trainee:
        started = time.perf_counter() - result.seconds
        for epoch in range(start_epoch, epochs):
            trainee.train()
            t0 = time.perf_counter()
            totals = torch.zeros(3, dtype=torch.float64)  # loss x samples, correct, scored (labelled targets)
            seen = 0
            touched: list[torch.Tensor] = [torch.empty(0, dtype=torch.int64)]  # the positions this rank trained on
            order = list(torch.randperm(len(data), generator=gen).split(cfg.batch_size))
            if cfg.samples:  # a budget in samples ends inside the last epoch, with a partial batch
                order = _within_budget(order, cfg.samples - result.samples_seen)
            shares = [share(len(pos), world) for pos in order]
            local = data.batches_at([pos[part] for pos, part in zip(order, shares, strict=True)])
            with reporter.bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}") as bar:
                for (images, labels, positions), batch, part in zip(local, order, shares, strict=True):
                    if cfg.augment:  # drawn for the whole batch, as one process draws it
                        images = Augmentation.draw(len(batch), gen, images.shape[2], images.shape[3]
                                                   ).select(part).apply(images)
                    x, y = preprocess(images, device), labels.to(device)
                    mix = None
                    if cfg.mixup > 0:
                        lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
                        mix = Mix(torch.randperm(x.shape[0], generator=gen).to(device), lam)
                        x = lam * x + (1 - lam) * x[mix.perm]
                    loss, logits = step(trainee, x, y, mix)
                    n = int(y.shape[0])
                    # this rank's share of the batch's mean loss; an empty share adds nothing (its mean is nan)
                    weight = n / len(batch)
                    local_loss = loss * weight if n else loss.nan_to_num(0.0) * 0.0
                    batch_totals = torch.tensor([float(local_loss.detach()) * len(batch),
                                                 int((logits.detach().argmax(1) == y).sum()), int((y >= 0).sum())],
                                                dtype=torch.float64)
                    all_sum(batch_totals, world)
                    loss_value = float(batch_totals[0]) / len(batch)
                    if not math.isfinite(loss_value):  # before the step: the weights stay those of the last good one
                        raise _diverged(f"the loss is {loss_value} in epoch {epoch + 1}", world)
                    opt.zero_grad(set_to_none=True)
                    (local_loss * world.size).backward()  # DDP averages the ranks' gradients: their sum, over N
                    opt.step()
                    sched.step()
                    if tracker is not None:
                        tracker.after_step(positions)
                        touched.append(positions)
                    seen += len(batch)
                    totals += batch_totals
                    bar.advance(1, loss=float(totals[0]) / seen, acc=float(totals[1]) / max(float(totals[2]), 1.0))
            if tracker is not None and world.distributed:
                _merge_records(tracker, torch.cat(touched), len(data), world)
            # A last step can overflow the weights with a finite loss; no state or checkpoint of them is written.
            if not all(bool(torch.isfinite(p).all()) for group in opt.param_groups for p in group["params"]):
                raise _diverged(f"the weights are not finite after epoch {epoch + 1}", world)
            broadcast_from_main(list(model.buffers()), world)  # rank 0's running statistics, saved and scored
            result.samples_seen += seen
            record = EpochRecord(epoch + 1, float(totals[0]) / seen, float(totals[1]) / max(float(totals[2]), 1.0),
                                 result.samples_seen, time.perf_counter() - t0)
            if eval_data is not None:
                record.eval_accuracy = accuracy(model, eval_data, preprocess, device, world=world)
            result.history.append(record)
            result.seconds = time.perf_counter() - started
            msg = f"epoch {record.epoch}/{epochs}: loss {record.loss:.4f}, train acc {record.train_accuracy:.4f}"
            if record.eval_accuracy is not None:
                msg += f", eval acc {record.eval_accuracy:.4f}"
            reporter.log(msg + f", {record.samples_seen} samples seen, {record.seconds:.1f}s")
            if resume_path and world.main:
                _save_state(resume_path, model, opt, sched, gen, result, cfg, data.fingerprint, epoch + 1, tracker)
            if on_epoch:
                on_epoch(record)
    model.eval()
    return result


def _merge_records(tracker: Tracker, touched: torch.Tensor, n: int, world: World) -> None:
    """Every rank's per-sample records of an epoch on every rank. An epoch presents each sample once, on one
    rank, so each sample's row comes from the rank that trained on it (rows no rank touched, past a budget's
    end, are the same on every rank already)."""
    trained_on = gather_rows(torch.ones(len(touched), dtype=torch.float64), touched, n, world) > 0
    merged = {}
    for name, records in tracker.state_dict().items():
        # float64 carries every record (booleans, counts, log-odds, -inf) exactly through the sum
        rows = gather_rows(records[touched].to(torch.float64), touched, n, world)
        merged[name] = torch.where(trained_on, rows.to(records.dtype), records)
    tracker.load_state_dict(merged)


def _within_budget(order: list[torch.Tensor], left: int) -> list[torch.Tensor]:
    """The batches of ``order`` that a budget of ``left`` samples reaches, the last one cut short."""
    kept = []
    for pos in order:
        if left <= 0:
            break
        kept.append(pos[:left])
        left -= len(kept[-1])
    return kept


@contextmanager
def _distributed(model: nn.Module, trained: list[nn.Parameter], device: torch.device,
                 world: World) -> Iterator[nn.Module]:
    """``model`` under DistributedDataParallel in a world of several processes (``model`` itself in one), its
    batch norm synchronised over the processes meanwhile. Parameters that are not trained stop requiring
    gradients meanwhile, since DDP expects a gradient for every parameter that requires one (a frozen backbone
    runs without)."""
    if not world.distributed:
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    from eetool.core.sync_batch_norm import synchronised_batch_norm

    ids = {id(p) for p in trained}
    frozen = [p for p in model.parameters() if p.requires_grad and id(p) not in ids]
    for p in frozen:
        p.requires_grad_(False)
    try:
        with synchronised_batch_norm(model):
            yield DistributedDataParallel(model, device_ids=[device] if device.type == "cuda" else None)
    finally:
        for p in frozen:
            p.requires_grad_(True)


def _diverged(what: str, world: World = World()) -> BaseException:
    """Training that ran away is the training options' doing (the rate, mostly), so a usage error (exit 2).
    Under torchrun every rank sees it at once; rank 0 alone says so."""
    return reported_by_main(UsageError(f"training diverged: {what}; no output was written",
                                       "lower --lr (e.g. 10 times)"), world)


def write_state(path: str, state: Mapping[str, object]) -> None:
    """Resumable state, written atomically: an interrupted write leaves the previous epoch's."""
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write(path, buf.getvalue())


def read_state(path: str | Path, expected: Mapping[str, object]) -> dict[str, Any]:
    """Resumable state, refused when unreadable or when its ``expected`` entries (the settings and data of the
    run that saved it) differ from this run's."""
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # any unreadable file is the same problem for the user
        raise InputError(f"cannot read resumable state {path} ({type(e).__name__})",
                         "delete it and start afresh") from None
    if any(state.get(key) != value for key, value in expected.items()):
        raise UsageError(f"{path} was saved by a run with other settings or data",
                         "resume with the same flags, or delete it to start afresh")
    return state


def _save_state(path: str, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                gen: torch.Generator,
                result: TrainResult, cfg: TrainConfig, data_fingerprint: str, epoch: int,
                tracker: Tracker | None = None) -> None:
    write_state(path, {
        "epoch": epoch,
        "config": asdict(cfg),
        "data": data_fingerprint,
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "generator": gen.get_state(),
        # Dropout and the mixup weights draw from the global generators: a resumed run continues them too.
        "rng": torch.get_rng_state(),
        "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "history": [asdict(r) for r in result.history],
        "samples_seen": result.samples_seen,
        "seconds": result.seconds,
        "tracker": tracker.state_dict() if tracker is not None else {},
    })


def _load_state(path: str, model: nn.Module, opt: torch.optim.Optimizer, sched: torch.optim.lr_scheduler.LRScheduler,
                gen: torch.Generator,
                result: TrainResult, cfg: TrainConfig, data_fingerprint: str, tracker: Tracker | None = None) -> int:
    state = read_state(path, {"config": asdict(cfg), "data": data_fingerprint})
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    gen.set_state(state["generator"])
    if "rng" in state:  # absent from states saved before the global random state was kept
        torch.set_rng_state(state["rng"])
    if state.get("cuda_rng") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    if tracker is not None:
        tracker.load_state_dict(state.get("tracker", {}))
    result.history = [EpochRecord(**r) for r in state["history"]]
    result.samples_seen = int(state["samples_seen"])
    result.seconds = float(state["seconds"])
    return int(state["epoch"])
