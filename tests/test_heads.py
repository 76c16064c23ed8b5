"""Exit heads and their training: pooling, shapes, MAC counts, loss weights, the artifact, and what the
trainer changes (only the heads with a frozen backbone, everything jointly)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from eetool.classification.exit_heads import (
    ExitHead,
    ExitHeads,
    ExitHeadsArtifact,
    HeadsSpec,
    MixedPool,
    parse_weights,
    sdn_weights,
)
from eetool.classification.head_training import ExitTrainer, exit_accuracies
from eetool.core.artifacts import Provenance, write_tensors
from eetool.core.checkpoint import load_checkpoint
from eetool.core.datasets import Preprocess, load_dataset
from eetool.core.errors import InputError, ProvenanceError, UsageError
from eetool.core.exits import build_exit_model
from eetool.core.training_loop import TrainConfig, fit

K = 10


# ---------------------------------------------------------------------------------------------
# MixedPool and ExitHead


def test_mixed_pool_mixes_max_and_average_pooling() -> None:
    pool = MixedPool(4)
    with torch.no_grad():
        pool.mix.fill_(0.7)
    x = torch.randn(3, 5, 14, 14)
    alpha = torch.sigmoid(torch.tensor(0.7))
    want = alpha * F.adaptive_max_pool2d(x, 4) + (1 - alpha) * F.adaptive_avg_pool2d(x, 4)
    torch.testing.assert_close(pool(x), want.flatten(1))
    assert pool(x).shape == (3, 5 * 16)


def test_mixed_pool_leaves_small_maps_and_vectors_as_they_are_but_flat() -> None:
    pool = MixedPool(4)
    small = torch.randn(2, 3, 4, 4)
    torch.testing.assert_close(pool(small), small.flatten(1))
    vector = torch.randn(2, 7)
    torch.testing.assert_close(pool(vector), vector)


def test_mixed_pool_pools_when_either_side_is_larger() -> None:
    x = torch.randn(2, 3, 4, 9)
    assert MixedPool(4)(x).shape == (2, 3 * 16)


def test_exit_head_concatenates_the_distances() -> None:
    head = ExitHead((8, 14, 14), K, kind="sdn", pool_size=4, distances=K)
    assert isinstance(head.branch, nn.Identity)
    assert head.linear.in_features == 8 * 16 + K
    x, d = torch.randn(2, 8, 14, 14), torch.randn(2, K)
    want = head.linear(torch.cat([head.pool(x), d], 1))
    torch.testing.assert_close(head(x, d), want)
    assert ExitHead((8, 14, 14), K, kind="sdn", pool_size=4).linear.in_features == 8 * 16


def test_branchy_head_has_a_convolution_branch() -> None:
    head = ExitHead((8, 14, 14), K, kind="branchy", pool_size=4)
    assert isinstance(head.branch, nn.Sequential)
    conv = head.branch[0]
    assert isinstance(conv, nn.Conv2d) and conv.in_channels == conv.out_channels == 8 and conv.kernel_size == (3, 3)
    assert head(torch.randn(2, 8, 14, 14)).shape == (2, K)
    # a vector has no spatial map to convolve
    assert isinstance(ExitHead((16,), K, kind="branchy", pool_size=4).branch, nn.Identity)


def test_unknown_head_kind_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        ExitHeads(HeadsSpec("mlp", ["a"], [[4, 8, 8]], K))


# ---------------------------------------------------------------------------------------------
# MACs


def direct_macs(kind: str, shape: list[int], pool_size: int, distances: int) -> int:
    n = math.prod(shape)
    conv = 0
    if kind == "branchy" and len(shape) == 3:
        c, h, w = shape
        conv = c * c * 9 * h * w + 2 * n
    pooled = len(shape) == 3 and (shape[1] > pool_size or shape[2] > pool_size)
    pool = 2 * n if pooled else 0
    width = shape[0] * min(shape[1], pool_size) * min(shape[2], pool_size) if len(shape) == 3 else shape[0]
    return conv + pool + (width + distances) * K


@pytest.mark.parametrize("kind", ["sdn", "branchy"])
@pytest.mark.parametrize("with_distances", [False, True])
def test_macs_match_a_direct_count(kind: str, with_distances: bool) -> None:
    shapes = [[4, 28, 28], [8, 14, 14], [16, 4, 4], [16, 2, 2], [16]]
    heads = ExitHeads(HeadsSpec(kind, list("abcde"), shapes, K, pool_size=4, with_distances=with_distances))
    d = K if with_distances else 0
    assert heads.macs() == [direct_macs(kind, s, 4, d) for s in shapes]
    # spelled out once: 4x28x28 pooled to 4x4x4, linear 64 -> 10
    if kind == "sdn" and not with_distances:
        assert heads.macs()[0] == 2 * 4 * 28 * 28 + 64 * 10
        assert heads.macs()[2] == 16 * 16 * 10  # already 4x4: no pooling
    if kind == "branchy" and not with_distances:
        assert heads.macs()[1] == 8 * 8 * 9 * 14 * 14 + 2 * 8 * 14 * 14 + 2 * 8 * 14 * 14 + 128 * 10


def test_macs_linear_part_is_in_times_out() -> None:
    heads = ExitHeads(HeadsSpec("sdn", ["a"], [[32]], K))
    head = heads.heads[0]
    assert isinstance(head, ExitHead)
    assert heads.macs() == [head.linear.in_features * head.linear.out_features] == [320]


# ---------------------------------------------------------------------------------------------
# Loss weights


def test_sdn_weights() -> None:
    assert sdn_weights(6) == [0.15, 0.3, 0.45, 0.6, 0.75, 0.9]
    assert sdn_weights(8)[-2:] == [1.0, 1.0]  # capped at 1


def test_parse_weights() -> None:
    assert parse_weights(None, 3) == [1.0, 1.0, 1.0]
    assert parse_weights("", 2) == [1.0, 1.0]
    assert parse_weights("sdn", 3) == sdn_weights(3)
    assert parse_weights("0.5,1,2", 3) == [0.5, 1.0, 2.0]


@pytest.mark.parametrize("text", ["1,2", "1,2,3,4", "1,x,2", "1,-1,2", "1,nan,2", "1,inf,2", ",,"])
def test_parse_weights_refuses_bad_text(text: str) -> None:
    with pytest.raises(UsageError):
        parse_weights(text, 3)


# ---------------------------------------------------------------------------------------------
# The artifact


def heads_prov() -> Provenance:
    return Provenance(kind="exit-heads", checkpoint_sha256="0" * 64, exits=["a", "b"])


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    spec = HeadsSpec("branchy", ["a", "b"], [[4, 14, 14], [8, 7, 7]], K, pool_size=2, with_distances=True,
                     weights=[0.5, 1.0])
    heads = ExitHeads(spec)
    with torch.no_grad():
        for p in heads.parameters():
            p.add_(torch.randn_like(p))
        heads.heads[0].branch[1].running_mean.add_(1.0)  # buffers travel too
    path = str(tmp_path / "heads.safetensors")
    ExitHeadsArtifact(heads, heads_prov()).save(path)
    artifact = ExitHeadsArtifact.load(path)
    loaded, prov = artifact.heads, artifact.provenance
    assert prov.kind == "exit-heads" and prov.exits == ["a", "b"] and prov.checkpoint_sha256 == "0" * 64
    assert loaded.spec == spec and not loaded.training
    feats = [torch.randn(3, 4, 14, 14), torch.randn(3, 8, 7, 7)]
    dists = [torch.rand(3, K), torch.rand(3, K)]
    heads.eval()
    for got, want in zip(loaded(feats, dists), heads(feats, dists), strict=True):
        torch.testing.assert_close(got, want)


def test_load_heads_refuses_another_kind(tmp_path: Path, tiny_checkpoint: str) -> None:
    with pytest.raises(ProvenanceError):
        ExitHeadsArtifact.load(tiny_checkpoint)
    path = str(tmp_path / "means.safetensors")
    write_tensors(path, {"x": torch.zeros(1)}, Provenance(kind="class-means"))
    with pytest.raises(ProvenanceError):
        ExitHeadsArtifact.load(path)


def test_load_heads_refuses_corrupt_files(tmp_path: Path) -> None:
    path = tmp_path / "heads.safetensors"
    ExitHeadsArtifact(ExitHeads(HeadsSpec("sdn", ["a"], [[4, 8, 8]], K)), heads_prov()).save(str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError):
        ExitHeadsArtifact.load(str(path))


def test_load_heads_refuses_missing_tensors_or_spec(tmp_path: Path) -> None:
    spec = HeadsSpec("sdn", ["a"], [[4, 8, 8]], K)
    state = ExitHeads(spec).state_dict()
    no_linear = str(tmp_path / "partial.safetensors")
    write_tensors(no_linear, {k: v for k, v in state.items() if "linear" not in k}, heads_prov(),
                  extra={"eetool.heads": spec.to_json()})
    no_spec = str(tmp_path / "no-spec.safetensors")
    write_tensors(no_spec, dict(state), heads_prov())
    for path in (no_linear, no_spec):
        with pytest.raises(InputError):
            ExitHeadsArtifact.load(path)


# ---------------------------------------------------------------------------------------------
# Training


def make_trainer(checkpoint: str, *, joint: bool, exits: str = "half",
                 weights: list[float] | None = None) -> tuple[ExitTrainer, Preprocess]:
    ckpt = load_checkpoint(checkpoint)
    em = build_exit_model(ckpt.model, exits)
    shapes = [list(s) for s in em.exit_shapes(ckpt.spec.input_shape)]
    torch.manual_seed(0)
    heads = ExitHeads(HeadsSpec("branchy", list(em.exits), shapes, ckpt.spec.num_classes))
    w = weights if weights is not None else [0.5 + j for j in range(len(em.exits))]
    pre = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    return ExitTrainer(em, heads, None, w, joint=joint), pre


CFG = TrainConfig(epochs=1, batch_size=32, optimizer="adamw", lr=1e-2, augment=False)


def snapshot(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_frozen_training_changes_only_the_heads(tiny_checkpoint: str, tiny_data: str) -> None:
    trainer, pre = make_trainer(tiny_checkpoint, joint=False)
    backbone, heads = snapshot(trainer.backbone), snapshot(trainer.heads)
    assert any("running_mean" in k for k in backbone)  # batch-norm statistics are in the comparison
    fit(trainer, load_dataset(tiny_data, "train"), pre, CFG, params=trainer.trainable_parameters(),
        step=trainer.step)
    for k, v in trainer.backbone.state_dict().items():
        assert torch.equal(v, backbone[k]), f"backbone {k} changed"
    assert all(p.grad is None for p in trainer.backbone.parameters())
    changed = [k for k, v in trainer.heads.state_dict().items() if not torch.equal(v, heads[k])]
    assert any("linear" in k for k in changed) and any("branch.0" in k for k in changed)
    # the heads' own batch norm trains
    assert any("running_mean" in k for k in changed)


def test_frozen_trainer_keeps_the_backbone_in_eval_mode(tiny_checkpoint: str) -> None:
    trainer, _ = make_trainer(tiny_checkpoint, joint=False)
    trainer.train()
    assert trainer.heads.training and not trainer.backbone.training
    assert not any(m.training for m in trainer.backbone.modules())
    assert {id(p) for p in trainer.trainable_parameters()} == {id(p) for p in trainer.heads.parameters()}


def test_joint_training_changes_the_backbone(tiny_checkpoint: str, tiny_data: str) -> None:
    trainer, pre = make_trainer(tiny_checkpoint, joint=True)
    backbone = {k: p.detach().clone() for k, p in trainer.backbone.named_parameters()}
    fit(trainer, load_dataset(tiny_data, "train"), pre, CFG, params=trainer.trainable_parameters(),
        step=trainer.step)
    changed = [k for k, p in trainer.backbone.named_parameters() if not torch.equal(p, backbone[k])]
    assert len(changed) == len(backbone)


@pytest.mark.parametrize("joint", [False, True])
def test_loss_is_the_weighted_sum_of_cross_entropies(tiny_checkpoint: str, tiny_data: str, joint: bool) -> None:
    trainer, pre = make_trainer(tiny_checkpoint, joint=joint)
    trainer.train()
    assert trainer.heads.training and trainer.backbone.training == joint
    ds = load_dataset(tiny_data, "train")
    x, y = pre(ds.images[:16]), ds.labels[:16]
    state = snapshot(trainer)
    loss, logits = trainer.step(trainer, x, y, None)
    trainer.load_state_dict(state)  # undo the batch-norm updates of that training-mode pass
    with torch.no_grad():
        feats, model_logits = trainer.exit_model.features(x)
        outs = trainer.heads(feats)
    want = sum(w * F.cross_entropy(o, y) for w, o in zip(trainer.weights, outs, strict=True))
    if joint:
        want = want + F.cross_entropy(model_logits, y)
    torch.testing.assert_close(loss.detach(), torch.as_tensor(want), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.detach(), outs[-1], rtol=1e-5, atol=1e-6)
    assert loss.requires_grad


def test_exit_accuracies_match_a_per_sample_count(tiny_checkpoint: str, tiny_data: str) -> None:
    trainer, pre = make_trainer(tiny_checkpoint, joint=False, exits="every")
    ds = load_dataset(tiny_data, "test")
    accs = exit_accuracies(trainer, ds, pre, batch_size=24)
    assert len(accs) == len(trainer.heads.heads) + 1
    trainer.eval()
    correct = [0] * len(accs)
    with torch.no_grad():
        for i in range(len(ds)):
            outs, logits = trainer.outputs(pre(ds.images[i:i + 1]))
            for j, o in enumerate([*outs, logits]):
                correct[j] += int(o.argmax(1).item() == ds.labels[i].item())
    assert accs == pytest.approx([c / len(ds) for c in correct])


@pytest.mark.parametrize("shape", [(5, 3, 28, 28), (5, 3, 14, 14), (5, 3, 7, 7), (4, 2, 13, 11), (3, 2, 9, 6),
                                   (2, 3, 5, 6), (1, 4, 28, 28)])
def test_exact_pools_equal_the_adaptive_nchw_kernels_bit_for_bit(shape: tuple[int, int, int, int]) -> None:
    from eetool.classification.exit_heads import avg_plan, exact_pools

    gen = torch.Generator().manual_seed(0)
    plan = avg_plan(shape[2], shape[3], 4)
    for scale in (1e-3, 1.0, 1e3):
        x = torch.randn(shape, generator=gen) * scale
        pooled_max, pooled_avg = exact_pools(x, 4, plan)
        assert torch.equal(pooled_max, F.adaptive_max_pool2d(x, 4))
        assert torch.equal(pooled_avg, F.adaptive_avg_pool2d(x, 4))
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = float("nan"), float("-inf")  # a NaN spreads to its windows, as adaptively
    pooled_max, pooled_avg = exact_pools(x, 4, plan)
    torch.testing.assert_close(pooled_max, F.adaptive_max_pool2d(x, 4), rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(pooled_avg, F.adaptive_avg_pool2d(x, 4), rtol=0, atol=0, equal_nan=True)


def test_avg_plan_uses_the_faster_kernels_on_the_demo_exits() -> None:
    """28 -> 4 and 7 -> 4 as sum poolings (windows of 7, and of 2, 3, 3, 2), 14 -> 4 (windows of 4 starting at
    0, 3, 7, 10: no plain pooling) by the channels-last kernel, whose single division by 16 is exact."""
    from eetool.classification.exit_heads import avg_plan

    for size, sum_pool in ((28, ((7, 7), (7, 7), (0, 0))), (7, ((3, 3), (2, 2), (1, 1)))):
        plan = avg_plan(size, size, 4)
        assert plan is not None and plan.sum_pool == sum_pool
    plan = avg_plan(14, 14, 4)
    assert plan is not None and plan.sum_pool is None
    assert avg_plan(9, 6, 4) is not None and avg_plan(10, 10, 3) is not None


def test_mixed_pool_is_the_same_with_and_without_autograd() -> None:
    torch.manual_seed(0)
    pool = MixedPool(4)
    with torch.no_grad():
        pool.mix.fill_(0.3)
    x = torch.randn(6, 5, 14, 14)
    with torch.no_grad():
        fast = pool(x)
    assert torch.equal(fast, pool(x).detach())


def test_mixed_pool_inference_follows_a_changed_mix() -> None:
    """alpha is kept between inference calls: an in-place change (an optimiser step, loading weights) and a new
    tensor put in its place must both be seen."""
    torch.manual_seed(0)
    pool = MixedPool(4)
    x = torch.randn(2, 3, 14, 14)

    def both_paths_agree() -> None:
        with torch.inference_mode():
            fast = pool(x)
        assert torch.equal(fast, pool(x).detach())

    both_paths_agree()
    with torch.no_grad():
        pool.mix.fill_(2.0)
    both_paths_agree()
    pool.load_state_dict({"mix": torch.tensor([-1.5])})
    both_paths_agree()
    pool.mix.data = torch.tensor([0.25])
    both_paths_agree()


def test_heads_files_keep_the_metadata_keys_of_every_release(tmp_path: Path) -> None:
    """The on-disk keys are a format, not a module path: the layout change once renamed them by accident, and
    files written under either name must load with their spec and exits."""
    from safetensors import safe_open

    spec = HeadsSpec("sdn", ["a"], [[4, 8, 8]], K)
    heads = ExitHeads(spec)
    current = tmp_path / "heads.safetensors"
    ExitHeadsArtifact(heads, heads_prov()).save(str(current))
    with safe_open(str(current), "pt") as f:
        meta = f.metadata()
    assert set(meta) >= {"format", "eetool.kind", "eetool.exits", "eetool.heads"}
    assert not any(k.startswith(("eetool.core.", "eetool.classification.")) for k in meta)
    renamed = tmp_path / "renamed.safetensors"
    prov = heads_prov()
    prov_meta = {("eetool.core.exits" if k == "eetool.exits" else k): v for k, v in prov.to_metadata().items()}
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in heads.state_dict().items()}, str(renamed),
              metadata={**prov_meta, "eetool.classification.exit_heads": spec.to_json()})
    for path in (current, renamed):
        loaded = ExitHeadsArtifact.load(str(path))
        assert loaded.heads.spec.exits == spec.exits
        assert loaded.provenance.exits == prov.exits
