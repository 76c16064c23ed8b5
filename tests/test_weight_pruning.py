"""Weight pruning of early-exit networks (classification.weight_pruning) and the effective costs of pruned networks."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from eetool.classification import weight_pruning as wp
from eetool.classification.exit_heads import ExitHeads, HeadsSpec
from eetool.core.checkpoint import ModelSpec
from eetool.core.costs import count_macs, effective, effective_macs, is_pruned, measure
from eetool.core.datasets import Dataset, Preprocess
from eetool.core.exits import build_exit_model
from eetool.core.training_loop import TrainConfig

FINETUNE = TrainConfig(epochs=1, batch_size=16, optimizer="adamw", lr=1e-3, augment=False, samples=16)


def network(spec: ModelSpec, exits: str = "half") -> tuple[object, ExitHeads]:
    torch.manual_seed(0)
    em = build_exit_model(spec.build(), exits)
    shapes = [list(s) for s in em.exit_shapes(spec.input_shape)]
    return em, ExitHeads(HeadsSpec("sdn", list(em.exits), shapes, spec.num_classes, 4, False, [1.0] * len(shapes)))


def data(n: int = 32) -> Dataset:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=gen)
    return Dataset("random", "train", images, torch.arange(n) % 10, [str(k) for k in range(10)], "tests")


def pruner(spec: ModelSpec, approach: str, rounds: int = 1, final_phases: str = "both") -> wp.Pruner:
    em, heads = network(spec)
    settings = wp.Settings(approach, rounds, 0.3, FINETUNE, final_phases=final_phases)
    return wp.Pruner(em, heads, [1.0] * len(heads.spec.exits), settings, data(), Preprocess(spec.input_shape,
                     spec.mean, spec.std), eval_data=data(16))  # type: ignore[arg-type]


def remaining(layers: list[wp.Layer]) -> int:
    return sum(int((la.weight != 0).sum()) for la in layers)


def test_sparsity_after_k_rounds_is_exact(tiny_spec: ModelSpec) -> None:
    em, heads = network(tiny_spec)
    layers = wp.prunable_layers(em.model, heads)  # type: ignore[attr-defined]
    total = sum(la.weight.numel() for la in layers)
    masks = wp.nonzero_masks(layers)
    expected = total
    for k in range(1, 4):
        count = wp.prune_round(layers, masks, 0.3)
        assert count == round(0.3 * expected)
        expected -= count
        assert remaining(layers) == expected == wp.remaining_after(total, 0.3, k)
        assert sum(int(m.sum()) for m in masks.values()) == expected
        assert abs(expected - total * 0.7 ** k) <= k  # (1 - a)^k up to the rounding of each round's count
        assert not any(hasattr(la.module, "weight_orig") for la in layers)  # permanent between rounds


def test_the_ranking_is_global(tiny_spec: ModelSpec) -> None:
    em, heads = network(tiny_spec)
    layers = wp.prunable_layers(em.model, heads)  # type: ignore[attr-defined]
    before = torch.cat([la.weight.detach().abs().reshape(-1) for la in layers])
    wp.prune_round(layers, wp.nonzero_masks(layers), 0.3)
    pruned = torch.cat([(la.weight == 0).reshape(-1) for la in layers])
    assert int(pruned.sum()) == round(0.3 * before.numel())
    # The pruned weights are the smallest magnitudes over every layer of backbone and heads together.
    assert before[pruned].max() <= before[~pruned].min()
    assert before[pruned].max() < torch.sort(before).values[int(pruned.sum()) + 10]  # as a direct ranking says
    sparsity = [row["sparsity"] for row in wp.layer_sparsity(layers)]
    assert max(sparsity) - min(sparsity) > 0.2  # one layer ends much sparser than another
    parts = {part: wp.sparsity_of([la for la in layers if la.part == part]) for part in (wp.BACKBONE, wp.HEADS)}
    assert parts[wp.BACKBONE] > 0 and parts[wp.HEADS] > 0


def test_first_conv_and_final_layer_stay_out_when_asked(tiny_spec: ModelSpec) -> None:
    em, heads = network(tiny_spec)
    layers = wp.prunable_layers(em.model, heads, first_conv_in=False, final_layer_in=False)  # type: ignore[attr-defined]
    out = [la for la in layers if not la.takes_part]
    assert [la.name for la in out] == ["stem.0", "fc"]
    wp.prune_round(wp.participating(layers, (wp.BACKBONE, wp.HEADS)), wp.nonzero_masks(layers), 0.5)
    assert all(int((la.weight == 0).sum()) == 0 for la in out)
    assert all(isinstance(la.module, nn.Conv2d | nn.Linear) for la in layers)


def test_masks_round_trip_bit_packed(tiny_spec: ModelSpec) -> None:
    em, heads = network(tiny_spec)
    layers = wp.prunable_layers(em.model, heads)  # type: ignore[attr-defined]
    masks = wp.nonzero_masks(layers)
    wp.prune_round(layers, masks, 0.37)
    packed, meta = wp.pack_masks(masks)
    assert all(p.dtype == torch.uint8 and p.numel() == -(-masks[k].numel() // 8) for k, p in packed.items())
    unpacked = wp.unpack_masks(packed, meta)
    assert unpacked.keys() == masks.keys()
    assert all(torch.equal(unpacked[k], masks[k]) for k in masks)


def test_fine_tuning_keeps_pruned_weights_at_zero(tiny_spec: ModelSpec) -> None:
    p = pruner(tiny_spec, "joint")
    p.run()
    for layer in p.layers:
        assert torch.equal(layer.weight != 0, p.masks[layer.key].to(layer.weight.device))
    assert p.records[-1]["sparsity"]["taking_part"] == pytest.approx(0.3, abs=1e-4)
    assert set(p.records[-1]["accuracy"]) == {*p.exit_model.exits, "final"}


def test_ordered_leaves_the_pruned_backbone_alone_in_the_head_phase(tiny_spec: ModelSpec) -> None:
    p = pruner(tiny_spec, "ordered", rounds=2, final_phases="backbone")
    heads_before = {k: v.clone() for k, v in p.heads.state_dict().items()}
    for index in range(2):  # the backbone phase: the heads are not touched
        p.run_step(index)
    assert all(torch.equal(v, heads_before[k]) for k, v in p.heads.state_dict().items())
    backbone = {k: v.clone() for k, v in p.model.state_dict().items()}
    backbone_sparsity = p.records[-1]["sparsity"]["backbone"]
    assert p.records[-1]["sparsity"]["heads"] == 0
    p.run(after_step=None)
    assert [r["phase"] for r in p.records] == ["backbone", "backbone", "train-heads", "heads", "heads"]
    assert all(torch.equal(v, backbone[k]) for k, v in p.model.state_dict().items())  # batch norm included
    heads_layers = [la for la in p.layers if la.part == wp.HEADS]
    assert wp.sparsity_of(heads_layers) == pytest.approx(1 - 0.7 ** 2, abs=1e-3)
    assert p.records[-1]["sparsity"]["backbone"] == backbone_sparsity


def test_ordered_prunes_the_final_layer_in_both_phases(tiny_spec: ModelSpec) -> None:
    p = pruner(tiny_spec, "ordered", rounds=2)
    final = next(la for la in p.layers if la.final)
    assert final.part == wp.BACKBONE and final.module is p.model.fc  # type: ignore[union-attr]
    for index in range(3):  # the backbone phase, then the heads trained on it
        p.run_step(index)
    backbone = {k: v.clone() for k, v in p.model.state_dict().items()}
    final_zeros = final.weight == 0
    ranked = [la for la in p.layers if la.part == wp.HEADS or la.final]
    before = torch.cat([la.weight.detach().abs().reshape(-1) for la in ranked])
    already = torch.cat([(la.weight == 0).reshape(-1) for la in ranked])
    p.run_step(3)  # heads round 1: heads and final layer ranked together, then fine-tuned together
    assert p.records[-1]["pruned"] == round(0.3 * int((~already).sum()))
    pruned = torch.cat([~p.masks[la.key].reshape(-1) for la in ranked])
    newly = pruned & ~already
    assert before[newly].max() <= before[~pruned].min()  # one ranking over heads and final layer
    assert int(newly[-final.weight.numel():].sum()) > 0  # the final layer lost weights in this phase too
    assert bool((final.weight == 0)[final_zeros].all())  # and kept the zeros of the backbone phase
    for key, value in p.model.state_dict().items():  # the rest of the backbone (batch norm too) is fixed
        assert torch.equal(value, backbone[key]) != key.startswith("fc."), key


def test_the_final_layer_trains_alone_on_a_frozen_backbone(tiny_spec: ModelSpec) -> None:
    from eetool.classification.head_training import ExitTrainer

    em, heads = network(tiny_spec)
    trainer = ExitTrainer(em, heads, None, [1.0] * len(heads.spec.exits), joint=False,  # type: ignore[arg-type]
                          final_layer=em.model.fc)  # type: ignore[attr-defined]
    x = torch.randn(4, *tiny_spec.input_shape)
    y = torch.arange(4) % 10
    trainer.train()
    loss, _ = trainer.step(trainer, x, y, None)
    loss.backward()
    fc = em.model.fc  # type: ignore[attr-defined]
    assert fc.weight.grad is not None and fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for n, p in em.model.named_parameters() if not n.startswith("fc."))  # type: ignore[attr-defined]
    # The final exit's term of the loss is the model's own cross-entropy, as a plain forward pass computes it.
    outs, logits = trainer.outputs(x)
    torch.testing.assert_close(logits, em.model.eval()(x))  # type: ignore[attr-defined]
    heads_loss = sum(torch.nn.functional.cross_entropy(o, y) for o in outs)
    torch.testing.assert_close(loss, heads_loss + torch.nn.functional.cross_entropy(logits, y))
    assert {id(p) for p in trainer.trainable_parameters()} == {id(p) for p in [*heads.parameters(),
                                                                               *fc.parameters()]}


def test_joint_ranks_backbone_and_heads_together(tiny_spec: ModelSpec) -> None:
    p = pruner(tiny_spec, "joint")
    p.run_step(0)  # the heads trained on the unpruned backbone
    before = torch.cat([la.weight.detach().abs().reshape(-1) for la in p.layers])
    p.run_step(1)
    assert p.records[-1]["pruned"] == round(0.3 * before.numel())
    # After fine-tuning the weights moved, but the masks are the joint ranking of the weights before it.
    pruned = torch.cat([~p.masks[la.key].reshape(-1) for la in p.layers])
    assert before[pruned].max() <= before[~pruned].min()
    assert p.records[-1]["sparsity"]["heads"] > 0 and p.records[-1]["sparsity"]["backbone"] > 0


def test_resume_equals_an_uninterrupted_run(tiny_spec: ModelSpec) -> None:
    whole = pruner(tiny_spec, "ordered")
    whole.run()
    first = pruner(tiny_spec, "ordered")
    first.run_step(0)
    buf = io.BytesIO()
    torch.save(first.state_dict(), buf)
    buf.seek(0)
    resumed = pruner(tiny_spec, "ordered")
    resumed.load_state_dict(torch.load(buf, weights_only=True))
    torch.manual_seed(1234)  # the global generator as a new process would leave it
    resumed.run()
    for a, b in ((whole.model, resumed.model), (whole.heads, resumed.heads)):
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    strip = [{k: v for k, v in r.items() if k != "seconds"} for r in whole.records]
    assert strip == [{k: v for k, v in r.items() if k != "seconds"} for r in resumed.records]


def test_effective_cost_is_dense_cost_times_density_per_layer(tiny_spec: ModelSpec) -> None:
    em, heads = network(tiny_spec)
    model = em.model  # type: ignore[attr-defined]
    dense = count_macs(model, tiny_spec.input_shape)
    assert not is_pruned(model) and effective_macs(model, tiny_spec.input_shape, dense) == dense
    costs = measure(em, tiny_spec.input_shape)  # type: ignore[arg-type]
    assert effective(costs, em, tiny_spec.input_shape) is costs  # type: ignore[arg-type]
    layers = wp.prunable_layers(model, heads)
    wp.prune_round(layers, wp.nonzero_masks(layers), 0.5)
    shapes: dict[nn.Module, torch.Size] = {}
    hooks = [m.register_forward_hook(lambda m, i, o: shapes.__setitem__(m, o.shape)) for m in model.modules()
             if isinstance(m, nn.Conv2d | nn.Linear)]
    with torch.no_grad():
        model(torch.zeros(1, *tiny_spec.input_shape))
    for h in hooks:
        h.remove()
    saved = 0
    for m, shape in shapes.items():
        if isinstance(m, nn.Conv2d):  # one multiply-add per output element, input channel and kernel position
            macs = shape.numel() * m.in_channels // m.groups * m.kernel_size[0] * m.kernel_size[1]
        else:  # ptflops counts a linear layer's bias as one more operation per output
            macs = m.in_features * m.out_features + m.out_features
        saved += round(macs * float((m.weight == 0).double().mean()))
    assert is_pruned(model)
    assert effective_macs(model, tiny_spec.input_shape, dense) == dense - saved
    sparse = effective(costs, em, tiny_spec.input_shape)  # type: ignore[arg-type]
    assert sparse.model_macs == dense - saved and sparse.basis == "effective"
    assert sparse.normalised_exit_costs()[-1] == pytest.approx((dense - saved) / dense, rel=1e-12)
    assert sparse.model_macs < dense - 0.1 * dense  # a real saving (batch norm and ReLU keep their dense cost)
