"""Training the early-exit LM (thesis section 5.5.3): the exit's and the final LM head under the sum of their
next-token cross-entropies. "freezing" trains the two heads on states cached once; "no freezing" trains every
parameter. Batches depend only on the seed and the step, so a resumed run continues exactly.

Method: docs/language-models.md#training-the-early-exit-lm-train-exit-head
"""

from __future__ import annotations

import math
import os
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

from eetool.core.errors import InputError, UsageError
from eetool.core.reporting import Reporter

if TYPE_CHECKING:
    import torch

    from eetool.lm.class_aware_head import ExitHead
    from eetool.lm.models import LanguageModel


@dataclass
class TrainSettings:
    steps: int
    lr: float = 1e-4
    batch_size: int = 8
    seed: int = 0
    freeze: bool = True
    eval_every: int = 50
    weight_decay: float = 0.0
    cache_mb: int = 4096  # cached states beyond this many MB go to a temp file instead of memory
    train_final_head: bool = True  # with freezing the two heads' updates are independent; False skips the final's

    def validate(self) -> None:
        if self.steps <= 0:
            raise UsageError(f"--steps {self.steps} trains nothing", "give a number of steps >= 1, e.g. --steps 200")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise UsageError(f"--lr {self.lr} is not a positive learning rate", "give e.g. --lr 1e-4")
        if self.batch_size <= 0 or self.eval_every <= 0:
            raise UsageError("--batch-size and --eval-every must be >= 1", "give e.g. --batch-size 8 --eval-every 50")


# Training has diverged when the loss (the two heads' cross-entropies summed) is not finite, or exceeds
# DIVERGENCE_FACTOR times the loss of the run's first step and DIVERGENCE_FLOOR nats: a uniform guess over
# the largest vocabulary eetool reads costs 2 ln(2^22) = 30.5 nats.
DIVERGENCE_FACTOR = 100.0
DIVERGENCE_FLOOR = 100.0


def diverged_above(first_loss: float) -> float:
    """The loss above which a run whose first step's loss was ``first_loss`` has diverged."""
    return max(DIVERGENCE_FACTOR * first_loss, DIVERGENCE_FLOOR)


@dataclass
class CurvePoint:
    step: int
    exit_accuracy: float
    final_accuracy: float
    train_loss: float | None  # mean summed loss of the steps since the last point (None at step 0)
    seconds: float  # training seconds so far (evaluation excluded)


@dataclass
class TrainResult:
    curve: list[CurvePoint] = field(default_factory=list)
    cache_seconds: float = 0.0  # computing the cached states (freezing)
    cache_mb: float = 0.0
    cache_on_disk: bool = False
    seconds_per_step: float = 0.0
    cpu_seconds_per_step: float = 0.0  # this process's CPU time (all threads) of the steps this run made: a
    # measure of the work that other jobs on a shared machine do not inflate as they inflate wall time


def batch_indices(step: int, batch_size: int, count: int, seed: int) -> torch.Tensor:
    """The contexts of step ``step``: positions step*B .. step*B+B-1 of the concatenated permutations of
    0..count-1, permutation e drawn from a generator seeded with (seed, e)."""
    import torch

    start = step * batch_size
    out: list[torch.Tensor] = []
    while len(out) == 0 or sum(len(o) for o in out) < batch_size:
        taken = sum(len(o) for o in out)
        epoch, offset = divmod(start + taken, count)
        perm = torch.randperm(count, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        out.append(perm[offset: offset + batch_size - taken])
    return torch.cat(out)


def next_token_losses(exit_logits: torch.Tensor, final_logits: torch.Tensor, targets: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean next-token cross-entropy of each head (logits n x V, targets n)."""
    import torch

    ce = torch.nn.functional.cross_entropy
    return ce(exit_logits, targets), ce(final_logits, targets)


class ExitLM:
    """The model with its exit head, set up to train: ``exit_weight``/``exit_bias`` and the final head
    ``final_weight`` (under freezing an untied trainable copy of the model's LM head)."""

    def __init__(self, lm: LanguageModel, head: ExitHead, freeze: bool) -> None:
        import torch

        self.lm, self.layer, self.final_norm, self.freeze = lm, head.layer, head.final_norm, freeze
        self.exit_weight = torch.nn.Parameter(head.weight.detach().clone())
        self.exit_bias = torch.nn.Parameter(head.bias.detach().clone())
        model = lm.model
        if freeze:
            for p in model.parameters():
                p.requires_grad_(False)
            untied = torch.nn.Parameter(lm.lm_head.detach().clone())
            model.get_output_embeddings().weight = untied  # type: ignore[operator, union-attr]
            model.config.tie_word_embeddings = False  # type: ignore[union-attr]
        else:
            for p in model.parameters():
                p.requires_grad_(True)

    @property
    def final_weight(self) -> torch.nn.Parameter:
        return self.lm.lm_head  # type: ignore[return-value]

    def trainable(self, train_final_head: bool = True) -> list[torch.nn.Parameter]:
        head = [self.exit_weight, self.exit_bias]
        if self.freeze:
            return [*head, self.final_weight] if train_final_head else head
        return [*head, *self.lm.model.parameters()]

    def states(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(exit states, final states), B x (C-1) x D: what each head reads at the positions that have a next
        token. Runs the whole trunk (the final head needs block L); gradients flow unless frozen."""
        import torch

        from eetool.lm.stats import block_output

        with torch.no_grad() if self.freeze else torch.enable_grad(), \
                block_output(self.lm, self.layer, stop=False) as kept:
            last = self.lm.model.get_decoder()(input_ids=ids, use_cache=False).last_hidden_state  # type: ignore[operator]
            early = kept[0]
            if self.final_norm:
                early = self.lm.final_norm(early)
        return early[:, :-1], last[:, :-1]

    def loss(self, exit_states: torch.Tensor, final_states: torch.Tensor, targets: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
        d = exit_states.shape[-1]
        exit_logits = exit_states.reshape(-1, d) @ self.exit_weight.T + self.exit_bias
        final_logits = final_states.reshape(-1, d) @ self.final_weight.T
        return next_token_losses(exit_logits, final_logits, targets.reshape(-1))

    def head_state(self) -> dict[str, torch.Tensor]:
        return {"weight": self.exit_weight.detach().clone(), "bias": self.exit_bias.detach().clone()}


@dataclass
class CachedStates:
    """The states both heads read, for every context (N x (C-1) x D each), and the targets (N x (C-1))."""

    exit: torch.Tensor
    final: torch.Tensor
    targets: torch.Tensor

    @property
    def bytes(self) -> int:
        return 2 * self.exit.numel() * self.exit.element_size()


def _allocate(shape: tuple[int, ...], in_memory: bool, stack: ExitStack) -> torch.Tensor:
    """A float32 tensor in memory, or mapped from a temp file that is unlinked at once (the mapping keeps it;
    nothing is left behind however the run ends)."""
    import torch

    if in_memory:
        return torch.empty(shape)
    fd, path = tempfile.mkstemp(prefix="eetool-lm-states-", suffix=".f32")
    try:
        size = math.prod(shape)
        os.ftruncate(fd, size * 4)
        tensor = torch.from_file(path, shared=True, size=size, dtype=torch.float32).view(shape)
    finally:
        os.close(fd)
        os.unlink(path)
    return tensor


def cache_states(model: ExitLM, contexts: list[torch.Tensor], *, batch_size: int, limit_mb: int,
                 device: torch.device, stack: ExitStack, reporter: Reporter | None = None
                 ) -> tuple[list[CachedStates], bool]:
    """One pass through the trunk over each set of contexts: the cached states (and whether they went to disk
    because together they exceed ``limit_mb``)."""
    import torch

    reporter = reporter or Reporter()
    d = model.lm.hidden_size
    need = sum(2 * c.shape[0] * (c.shape[1] - 1) * d * 4 for c in contexts)
    in_memory = need <= limit_mb * 2**20
    if not in_memory:
        reporter.log(f"the cached states take {need / 2**20:.0f} MB, over --cache-mb {limit_mb}: they go to a temp "
                     f"file in {tempfile.gettempdir()}")
    out = []
    for ctx in contexts:
        n, c = ctx.shape
        cached = CachedStates(_allocate((n, c - 1, d), in_memory, stack), _allocate((n, c - 1, d), in_memory, stack),
                              ctx[:, 1:].clone())
        with reporter.bar(n, "caching the states the heads read") as bar, torch.inference_mode():
            for start in range(0, n, batch_size):
                ids = ctx[start: start + batch_size].to(device)
                early, last = model.states(ids)
                cached.exit[start: start + len(ids)] = early.float().cpu()
                cached.final[start: start + len(ids)] = last.float().cpu()
                bar.advance(len(ids))
        out.append(cached)
    return out, not in_memory


def score(model: ExitLM, held_out: torch.Tensor | CachedStates, *, batch_size: int, device: torch.device
          ) -> tuple[float, float]:
    """Next-token accuracy of the exit head and of the final head on held-out contexts (or their cached states)."""
    import torch

    correct = torch.zeros(2, dtype=torch.int64)
    total = 0
    n = held_out.targets.shape[0] if isinstance(held_out, CachedStates) else held_out.shape[0]
    d = model.lm.hidden_size
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            if isinstance(held_out, CachedStates):
                early = held_out.exit[start: start + batch_size].to(device)
                last = held_out.final[start: start + batch_size].to(device)
                targets = held_out.targets[start: start + batch_size].to(device)
            else:
                ids = held_out[start: start + batch_size].to(device)
                early, last = model.states(ids)
                targets = ids[:, 1:]
            targets = targets.reshape(-1)
            exit_pred = (early.reshape(-1, d) @ model.exit_weight.T + model.exit_bias).argmax(1)
            final_pred = (last.reshape(-1, d) @ model.final_weight.T).argmax(1)
            correct[0] += int((exit_pred == targets).sum())
            correct[1] += int((final_pred == targets).sum())
            total += int(targets.numel())
    return float(correct[0]) / total, float(correct[1]) / total


def train_exit_lm(model: ExitLM, train: torch.Tensor, held_out: torch.Tensor, settings: TrainSettings, *,
                  device: torch.device | None = None, cache: bool | None = None, resume_path: str | None = None,
                  resume: bool = False, identity: dict[str, Any] | None = None, reporter: Reporter | None = None,
                  on_point: Callable[[CurvePoint], None] | None = None,
                  cached: tuple[CachedStates, CachedStates] | None = None) -> TrainResult:
    """Train ``model`` in place for ``settings.steps`` steps on ``train`` (N x C token ids), scoring both heads on
    ``held_out`` at step 0, every ``eval_every`` steps and at the end. ``cache``: trunk states computed once
    (``cached``: already computed); ``resume_path``: state saved at every point, ``identity`` checked on resume;
    ``on_point`` hears each saved point."""
    import torch

    settings.validate()
    reporter = reporter or Reporter()
    device = device or torch.device("cpu")
    cache = settings.freeze if cache is None else cache
    if (cache or cached is not None) and not settings.freeze:
        raise UsageError("cached states need a frozen trunk", "train with --freeze, or without the cache")
    model.lm.model.to(device)
    for p in (model.exit_weight, model.exit_bias):
        p.data = p.data.to(device)
    params = model.trainable(settings.train_final_head)
    # The fused AdamW: on SmolLM2's 49,152 x 576 heads it updates in 0.04 s a step rather than 0.26 s (one thread)
    opt = torch.optim.AdamW(params, lr=settings.lr, weight_decay=settings.weight_decay,
                            fused=device.type in ("cpu", "cuda"))
    result = TrainResult()
    expected = {"settings": asdict(settings), **(identity or {})}
    first = 0
    if resume:
        if not resume_path or not os.path.isfile(resume_path):
            raise InputError(f"no resumable state at {resume_path}", "run without --resume to start afresh")
        first = _load_state(resume_path, expected, model, opt, result)
        reporter.log(f"resuming after step {first} of {settings.steps}")
    with ExitStack() as stack:
        train_states: CachedStates | None = None
        eval_source: torch.Tensor | CachedStates = held_out
        if cached is not None:
            train_states, eval_source = cached
        elif cache:
            start = time.perf_counter()
            (train_states, eval_states), on_disk = cache_states(model, [train, held_out],
                                                                batch_size=settings.batch_size,
                                                                limit_mb=settings.cache_mb, device=device, stack=stack,
                                                                reporter=reporter)
            eval_source = eval_states
            result.cache_seconds = time.perf_counter() - start
            result.cache_mb = (train_states.bytes + eval_states.bytes) / 2**20
            result.cache_on_disk = on_disk
        if first == 0:
            exit_acc, final_acc = score(model, eval_source, batch_size=settings.batch_size, device=device)
            result.curve.append(CurvePoint(0, exit_acc, final_acc, None, 0.0))
            _announce(result.curve[-1], reporter, on_point)
        losses: list[float] = []
        trained = result.curve[-1].seconds if result.curve else 0.0
        t0, cpu0 = time.perf_counter(), time.process_time()
        cpu = 0.0
        bound: float | None = None  # the loss above which training has diverged, set by this run's first step
        with reporter.bar(settings.steps - first, "training") as bar:
            for step in range(first, settings.steps):
                idx = batch_indices(step, settings.batch_size, train.shape[0], settings.seed)
                if train_states is not None:
                    early, last = train_states.exit[idx].to(device), train_states.final[idx].to(device)
                    targets = train_states.targets[idx].to(device)
                else:
                    ids = train[idx].to(device)
                    early, last = model.states(ids)
                    targets = ids[:, 1:]
                exit_loss, final_loss = model.loss(early, last, targets)
                loss = exit_loss + final_loss
                value = float(loss.detach())
                if bound is None and math.isfinite(value):
                    bound = diverged_above(value)
                if not math.isfinite(value) or (bound is not None and value > bound):
                    raise UsageError(f"training diverged: the loss is {value:.4g} at step {step + 1} (the bound is "
                                     f"{bound:.4g}); no output was written", "lower --lr (e.g. 10 times)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses.append(value)
                bar.advance(1, loss=value)
                done = step + 1
                if done % settings.eval_every == 0 or done == settings.steps:
                    trained += time.perf_counter() - t0
                    cpu += time.process_time() - cpu0
                    exit_acc, final_acc = score(model, eval_source, batch_size=settings.batch_size, device=device)
                    point = CurvePoint(done, exit_acc, final_acc, sum(losses) / len(losses), trained)
                    losses = []
                    result.curve.append(point)
                    if resume_path:
                        _save_state(resume_path, expected, done, model, opt, result)
                    _announce(point, reporter, on_point)
                    t0, cpu0 = time.perf_counter(), time.process_time()
    end = result.curve[-1]
    result.seconds_per_step = end.seconds / end.step if end.step else 0.0
    result.cpu_seconds_per_step = cpu / (settings.steps - first) if settings.steps > first else 0.0
    return result


def _announce(point: CurvePoint, reporter: Reporter, on_point: Callable[[CurvePoint], None] | None) -> None:
    loss = "" if point.train_loss is None else f", loss {point.train_loss:.4f}"
    reporter.log(f"step {point.step}: exit accuracy {point.exit_accuracy:.4f}, final accuracy "
                 f"{point.final_accuracy:.4f}{loss}")
    if on_point:
        on_point(point)


def _save_state(path: str, expected: dict[str, Any], step: int, model: ExitLM, opt: torch.optim.Optimizer,
                result: TrainResult) -> None:
    from eetool.core.training_loop import write_state

    trained = ({"final_weight": model.final_weight.detach().cpu()} if model.freeze
               else {k: v.detach().cpu() for k, v in model.lm.model.state_dict().items()})
    write_state(path, {**expected, "step": step, "exit": {k: v.cpu() for k, v in model.head_state().items()},
                       "trained": trained, "optimizer": opt.state_dict(),
                       "curve": [asdict(p) for p in result.curve]})


def _load_state(path: str, expected: dict[str, Any], model: ExitLM, opt: torch.optim.Optimizer,
                result: TrainResult) -> int:
    import torch

    from eetool.core.training_loop import read_state

    state = read_state(path, expected)
    with torch.no_grad():
        model.exit_weight.copy_(state["exit"]["weight"])
        model.exit_bias.copy_(state["exit"]["bias"])
        if model.freeze:
            model.final_weight.copy_(state["trained"]["final_weight"])
        else:
            model.lm.model.load_state_dict(state["trained"])
    opt.load_state_dict(state["optimizer"])
    result.curve = [CurvePoint(**p) for p in state["curve"]]
    return int(state["step"])


def save_model_folder(lm: LanguageModel, folder: str) -> None:
    """The trained model as a Hugging Face folder (config, safetensors weights, tokenizer) that ``--model``
    reads, marked as eetool's: written to a temp folder beside it and renamed into place; a folder already
    there (--force) is replaced only when eetool wrote it."""
    import shutil

    from eetool.core.errors import OutputError
    from eetool.core.owned_folders import publish_folder

    target = os.path.abspath(folder)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", dir=os.path.dirname(target))
    try:
        lm.model.save_pretrained(tmp)  # type: ignore[operator]
        lm.tokenizer.save_pretrained(tmp)
        publish_folder(tmp, target, "lm-model")
    except OSError as e:
        raise OutputError(f"cannot write the model folder {folder}: {e.strerror}",
                          "check the disk space and permissions") from None
    finally:
        if os.path.exists(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
