"""The training loop: counting, exact resumption, augmentation, mixup and learning-rate schedules."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from eetool.core.datasets import Dataset, Preprocess, load_dataset
from eetool.core.errors import InputError, UsageError
from eetool.core.training_loop import (
    EpochRecord,
    Mix,
    TrainConfig,
    augment_batch,
    cross_entropy_step,
    fit,
    make_schedule,
)

PRE = Preprocess((1, 28, 28), [0.3], [0.35])


def small_net(num_classes: int = 10) -> nn.Module:
    """Fast, with BatchNorm and Dropout: its result depends on every piece of training state."""
    return nn.Sequential(nn.Conv2d(1, 4, 5, stride=3), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.3),
                         nn.AdaptiveAvgPool2d(2), nn.Flatten(1), nn.Linear(16, num_classes))


def learnable(n: int = 80, seed: int = 0) -> Dataset:
    """Ten classes whose images differ in brightness: a small net learns them in a few epochs."""
    gen = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    noise = torch.randint(0, 40, (n, 1, 28, 28), generator=gen)
    images = (labels.view(-1, 1, 1, 1) * 20 + noise).to(torch.uint8)
    return Dataset("bright", "train", images, labels, [str(k) for k in range(10)], "memory")


def test_fit_counts_and_learns() -> None:
    data = learnable()
    torch.manual_seed(0)
    model = small_net()
    seen: list[EpochRecord] = []
    cfg = TrainConfig(epochs=4, batch_size=16, optimizer="adamw", lr=0.1, weight_decay=0.0, augment=False,
                      warmup_epochs=0)
    result = fit(model, data, PRE, cfg, eval_data=data, on_epoch=seen.append)
    assert result.samples_seen == cfg.epochs * len(data)
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert [r.samples_seen for r in result.history] == [len(data) * k for k in (1, 2, 3, 4)]
    assert seen == result.history
    # chance is a tenth; four epochs reach 0.3 to 0.5 on every seed measured, and the loss falls by a fifth or more
    assert result.history[-1].loss < 0.9 * result.history[0].loss
    assert not model.training
    # The recorded evaluation accuracy is the fraction of right answers, counted here one sample at a time.
    with torch.no_grad():
        right = sum(int(model(PRE(data.images[i:i + 1])).argmax(1)) == int(data.labels[i]) for i in range(len(data)))
    assert result.last.eval_accuracy == pytest.approx(right / len(data))
    assert result.last.eval_accuracy >= 0.2


def test_fit_on_tiny_data_counts_samples(tiny_data: str) -> None:
    data = load_dataset(tiny_data, "train")
    torch.manual_seed(0)
    result = fit(small_net(), data, PRE, TrainConfig(epochs=2, batch_size=40, lr=0.05))
    assert result.samples_seen == 2 * len(data) == 192
    assert all(math.isfinite(r.loss) and 0 <= r.train_accuracy <= 1 for r in result.history)


class Interrupt(KeyboardInterrupt):
    pass


def stop_after_first_epoch(record: EpochRecord) -> None:
    if record.epoch == 1:
        raise Interrupt


@pytest.mark.parametrize("mixup", [0.0, 0.4])
def test_resume_is_exact(tiny_data: str, tmp_path: Path, mixup: float) -> None:
    data = load_dataset(tiny_data, "train")
    cfg = TrainConfig(epochs=2, batch_size=32, lr=0.05, mixup=mixup, seed=3)

    def fresh() -> nn.Module:
        torch.manual_seed(0)  # what the command does before building a model, in every process
        return small_net()

    whole = fresh()
    whole_result = fit(whole, data, PRE, cfg, resume_path=str(tmp_path / "a.pt"))

    interrupted = fresh()
    with pytest.raises(Interrupt):
        fit(interrupted, data, PRE, cfg, resume_path=str(tmp_path / "b.pt"), on_epoch=stop_after_first_epoch)
    resumed = fresh()  # a new process: a new model, the global random state seeded afresh
    result = fit(resumed, data, PRE, cfg, resume_path=str(tmp_path / "b.pt"), resume=True)

    assert result.samples_seen == whole_result.samples_seen == 2 * len(data)
    assert [r.loss for r in result.history] == pytest.approx([r.loss for r in whole_result.history], rel=1e-6)
    for (name, want), got in zip(whole.state_dict().items(), resumed.state_dict().values(), strict=True):
        assert torch.allclose(got.double(), want.double(), atol=1e-6), name


def test_resume_refuses_other_settings_or_data(tiny_data: str, tmp_path: Path) -> None:
    data = load_dataset(tiny_data, "train")
    cfg = TrainConfig(epochs=2, batch_size=48, lr=0.05)
    state = str(tmp_path / "s.pt")
    torch.manual_seed(0)
    with pytest.raises(Interrupt):
        fit(small_net(), data, PRE, cfg, resume_path=state, on_epoch=stop_after_first_epoch)
    with pytest.raises(UsageError):
        fit(small_net(), data, PRE, TrainConfig(epochs=2, batch_size=48, lr=0.01), resume_path=state, resume=True)
    with pytest.raises(UsageError):
        fit(small_net(), load_dataset(tiny_data, "test"), PRE, cfg, resume_path=state, resume=True)
    with pytest.raises(InputError):
        fit(small_net(), data, PRE, cfg, resume_path=str(tmp_path / "absent.pt"), resume=True)
    Path(state).write_bytes(b"not a state")
    with pytest.raises(InputError):
        fit(small_net(), data, PRE, cfg, resume_path=state, resume=True)


def test_bad_configs() -> None:
    for cfg in (TrainConfig(optimizer="lbfgs"), TrainConfig(schedule="step"), TrainConfig(epochs=0),
                TrainConfig(batch_size=0), TrainConfig(lr=0), TrainConfig(label_smoothing=1.0)):
        with pytest.raises(UsageError):
            cfg.validate()


# ---------------------------------------------------------------------------------------------
# Augmentation and mixup


def test_augment_batch_is_crop_and_flip() -> None:
    gen = torch.Generator().manual_seed(0)
    n, c, h, w, pad = 16, 2, 5, 7, 4
    images = torch.randint(1, 256, (n, c, h, w), dtype=torch.uint8, generator=gen)
    got = augment_batch(images, torch.Generator().manual_seed(11), pad=pad)
    # The same draws, in the same order: row offsets, column offsets, flips.
    redraw = torch.Generator().manual_seed(11)
    dy = torch.randint(0, 2 * pad + 1, (n, 1), generator=redraw)
    dx = torch.randint(0, 2 * pad + 1, (n, 1), generator=redraw)
    flip = torch.rand(n, generator=redraw) < 0.5
    assert got.shape == images.shape and got.dtype == torch.uint8
    for i in range(n):
        canvas = torch.zeros(c, h + 2 * pad, w + 2 * pad, dtype=torch.uint8)
        canvas[:, pad:pad + h, pad:pad + w] = images[i]
        crop = canvas[:, int(dy[i]):int(dy[i]) + h, int(dx[i]):int(dx[i]) + w]
        want = crop.flip(-1) if flip[i] else crop
        assert torch.equal(got[i], want), i
    assert 0 < int(flip.sum()) < n  # both branches were checked


def test_augment_without_padding_only_flips() -> None:
    images = torch.randint(0, 256, (32, 1, 4, 6), dtype=torch.uint8)
    got = augment_batch(images, torch.Generator().manual_seed(0), pad=0)
    flipped = [bool(torch.equal(g, x.flip(-1))) for g, x in zip(got, images, strict=True)]
    kept = [bool(torch.equal(g, x)) for g, x in zip(got, images, strict=True)]
    assert all(f or k for f, k in zip(flipped, kept, strict=True))
    assert any(flipped) and any(kept)


def nll(logits: torch.Tensor, y: torch.Tensor, smoothing: float) -> torch.Tensor:
    """Cross-entropy written out: the smoothed target puts smoothing/K on every class, the rest on y."""
    logp = logits.log_softmax(1)
    k = logits.shape[1]
    target = torch.full_like(logp, smoothing / k)
    target[torch.arange(len(y)), y] += 1 - smoothing
    return -(target * logp).sum(1).mean()


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_mixup_loss(smoothing: float) -> None:
    torch.manual_seed(0)
    model = nn.Linear(6, 4)
    x, y = torch.randn(8, 6), torch.randint(0, 4, (8,))
    perm = torch.randperm(8)
    lam = 0.3
    loss, logits = cross_entropy_step(smoothing)(model, x, y, Mix(perm, lam))
    assert torch.allclose(logits, model(x))
    want = lam * nll(logits, y, smoothing) + (1 - lam) * nll(logits, y[perm], smoothing)
    assert torch.allclose(loss, want, atol=1e-6)
    plain, _ = cross_entropy_step(smoothing)(model, x, y, None)
    assert torch.allclose(plain, nll(logits, y, smoothing), atol=1e-6)


def test_fit_mixes_inputs_with_a_permutation_of_the_batch() -> None:
    n = 24
    gen = torch.Generator().manual_seed(0)
    # Each sample its own class, so the labels say which images a mixed input was made of.
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    data = Dataset("ids", "train", images, torch.arange(n), [str(k) for k in range(n)], "memory")
    base = cross_entropy_step()
    checked = []

    def step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mix: Mix | None):  # type: ignore[no-untyped-def]
        assert mix is not None and 0 <= mix.lam <= 1
        assert sorted(mix.perm.tolist()) == list(range(len(y)))
        want = mix.lam * PRE(images[y]) + (1 - mix.lam) * PRE(images[y[mix.perm]])
        checked.append(bool(torch.allclose(x, want, atol=1e-5)))
        return base(model, x, y, mix)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(1), nn.Linear(28 * 28, n))
    fit(net, data, PRE, TrainConfig(epochs=1, batch_size=10, mixup=0.5, augment=False), step=step)
    assert checked == [True, True, True]


# ---------------------------------------------------------------------------------------------
# Schedules


def lrs(cfg: TrainConfig, steps_per_epoch: int) -> list[float]:
    """The learning rate each optimizer step uses, stepping the schedule after each step as fit does."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = make_schedule(opt, cfg, steps_per_epoch)
    out = []
    for _ in range(cfg.epochs * steps_per_epoch):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_then_cosine() -> None:
    lr, w, total = 0.2, 4, 12
    got = lrs(TrainConfig(epochs=3, lr=lr, warmup_epochs=1.0, schedule="cosine"), steps_per_epoch=4)
    # Linear warmup to the full rate over w steps, then half a cosine from the full rate towards 0.
    want = [lr * (s + 1) / w for s in range(w)]
    want += [lr * 0.5 * (1 + math.cos(math.pi * (s - w) / (total - w))) for s in range(w, total)]
    assert got == pytest.approx(want)
    assert max(got) == pytest.approx(lr) and got[-1] > 0


def test_constant_and_no_warmup() -> None:
    assert lrs(TrainConfig(epochs=2, lr=0.1, warmup_epochs=0.5, schedule="constant"), 4) == pytest.approx(
        [0.05, 0.1] + [0.1] * 6)
    got = lrs(TrainConfig(epochs=2, lr=0.1, warmup_epochs=0, schedule="cosine"), 5)
    assert got[0] == pytest.approx(0.1)
    assert all(b < a for a, b in zip(got, got[1:], strict=False))


def test_a_single_step_trains_at_the_full_rate() -> None:
    assert lrs(TrainConfig(epochs=1, lr=0.1, warmup_epochs=1.0, schedule="cosine"), 1) == pytest.approx([0.1])


@pytest.mark.parametrize("warmup_epochs", [0.0, 0.25, 1.0])
def test_onecycle_peaks_after_warmup(warmup_epochs: float) -> None:
    lr, steps = 0.1, 4
    got = lrs(TrainConfig(epochs=3, lr=lr, warmup_epochs=warmup_epochs, schedule="onecycle"), steps)
    peak = got.index(max(got))
    assert max(got) == pytest.approx(lr)
    assert got[0] == pytest.approx(lr / 25)  # OneCycleLR's default div_factor
    assert all(a < b for a, b in zip(got[:peak], got[1:peak + 1], strict=True))
    assert all(a > b for a, b in zip(got[peak:], got[peak + 1:], strict=False))
    assert peak == max(int(warmup_epochs * steps), 2) - 1


def test_onecycle_needs_a_few_steps() -> None:
    with pytest.raises(UsageError):
        lrs(TrainConfig(epochs=1, lr=0.1, schedule="onecycle"), 2)


def test_a_budget_in_samples_stops_inside_an_epoch(tiny_spec, tiny_data: str) -> None:  # type: ignore[no-untyped-def]
    """--samples N trains on exactly N samples (the last batch cut short), and the schedule ends there."""
    from eetool.core.datasets import Preprocess, load_dataset
    from eetool.core.training_loop import TrainConfig, fit, make_optimizer, make_schedule

    data = load_dataset(f"safetensors:{tiny_data}", "train")  # 96 samples
    cfg = TrainConfig(epochs=1, batch_size=40, samples=250, augment=False, optimizer="adamw", lr=1e-3,
                      warmup_epochs=0.5)
    assert cfg.planned_epochs(len(data)) == 3
    assert cfg.total_steps(len(data)) == 2 * 3 + 2  # two whole epochs of 3 batches, then 58 samples in 2
    result = fit(tiny_spec.build(), data, Preprocess((1, 28, 28), [0.3], [0.35]), cfg)
    assert result.samples_seen == 250
    assert [r.samples_seen for r in result.history] == [96, 192, 250]
    model = tiny_spec.build()
    sched = make_schedule(make_optimizer(model.parameters(), cfg), cfg, 3, cfg.total_steps(len(data)))
    for _ in range(cfg.total_steps(len(data))):
        sched.optimizer.step()
        sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(0.0, abs=1e-9)  # the cosine reaches its end with the budget
