"""E²CM (thesis 2.3): class means, distances, normalisers, confidences and the exit rule, each checked against
a direct re-computation from the exit features (eqs. 2.2-2.7) on the tiny checkpoint and data."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from eetool.classification.e2cm import (
    NEAREST,
    SOFTMAX,
    ClassMeans,
    ClassMeanSums,
    MeansRule,
    Pooling,
    calibrate,
    choose_rules,
    decide,
    distance_macs,
    distances,
)
from eetool.classification.rules import Thresholded, rule_scores
from eetool.core.artifacts import Provenance
from eetool.core.checkpoint import Checkpoint, load_checkpoint
from eetool.core.datasets import Dataset, Preprocess, load_dataset
from eetool.core.errors import InputError, UsageError
from eetool.core.exits import ExitModel, build_exit_model
from eetool.core.inference import run_early_exit

K = 10


@dataclasses.dataclass
class Setup:
    ckpt: Checkpoint
    em: ExitModel
    data: Dataset
    preprocess: Preprocess
    features: list[torch.Tensor]  # per exit: N x C x H x W, all samples in one batch
    logits: torch.Tensor


@pytest.fixture(scope="module")
def setup(tiny_checkpoint: str, tiny_data: str) -> Setup:
    ckpt = load_checkpoint(tiny_checkpoint)
    em = build_exit_model(ckpt.model, "every")
    data = load_dataset(f"safetensors:{tiny_data}", "train")
    preprocess = Preprocess(ckpt.spec.input_shape, ckpt.spec.mean, ckpt.spec.std)
    with torch.no_grad():
        features, logits = em.features(preprocess(data.images))
    return Setup(ckpt, em, data, preprocess, features, logits)


@pytest.fixture(scope="module")
def calibrated(setup: Setup) -> ClassMeans:
    calib = calibrate(setup.em, setup.data, setup.preprocess, K, batch_size=32)
    return ClassMeans(list(setup.em.exits), calib.means, calib.normalisers, calib.counts, Pooling(),
                      [1000 * (s + 1) for s in range(len(setup.em.exits) + 1)], calib)


def brute_means(features: list[torch.Tensor], labels: torch.Tensor) -> list[torch.Tensor]:
    """Eq. 2.2: per exit, the mean of each class's flattened features."""
    return [torch.stack([f.flatten(1)[labels == k].double().mean(0) for k in range(K)]) for f in features]


def brute_confidences(features: list[torch.Tensor], means: list[torch.Tensor], normalisers: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor]:
    """Eqs. 2.3-2.7 sample by sample and class by class, in float64."""
    n = features[0].shape[0]
    conf = torch.empty(n, len(features), dtype=torch.float64)
    pred = torch.empty(n, len(features), dtype=torch.int64)
    for j, f in enumerate(features):
        x = f.flatten(1).double()
        for i in range(n):
            d = torch.stack([torch.linalg.vector_norm(x[i] - means[j][k].double()) for k in range(K)])
            p = torch.softmax(-d / normalisers[j].double(), 0)
            conf[i, j], pred[i, j] = p.max(), p.argmax()
    return conf, pred


# ---------------------------------------------------------------------------------------------
# Class means (eq. 2.2)


def test_class_means_are_per_class_means_of_the_exit_features(setup: Setup, calibrated: ClassMeans) -> None:
    expected = brute_means(setup.features, setup.data.labels)
    assert len(calibrated.means) == len(setup.em.exits) == len(expected)
    for got, want, f in zip(calibrated.means, expected, setup.features, strict=True):
        assert got.dtype == torch.float32 and got.shape == (K, f[0].numel())
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert calibrated.counts.tolist() == torch.bincount(setup.data.labels, minlength=K).tolist()


def test_pooled_class_means_are_means_of_max_pooled_features(setup: Setup) -> None:
    pooling = Pooling(spatial=2, channels=2)
    first = torch.arange(40)  # four samples of each class
    calib = calibrate(setup.em, setup.data.subset(first), setup.preprocess, K, pooling=pooling, batch_size=16)
    pooled = []
    for f in setup.features:
        f = f[first]
        size = f.shape[1] // 2  # channel groups of consecutive channels, each reduced by its max
        grouped = torch.stack([f[:, g * size:(g + 1) * size].amax(1) for g in range(2)], 1)
        pooled.append(F.adaptive_max_pool2d(grouped, 2))
    for got, want, p in zip(calib.means, brute_means(pooled, setup.data.labels[first]), pooled, strict=True):
        assert got.shape == (K, 2 * 2 * 2) and p.shape[1:] == (2, 2, 2)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
    assert calib.dims == [8] * len(setup.em.exits)


def test_pooling_leaves_small_maps_and_indivisible_requests_alone_or_refuses() -> None:
    x = torch.randn(3, 4, 2, 2)
    torch.testing.assert_close(Pooling(spatial=7).apply(x), x.flatten(1))  # already at most 7 x 7
    torch.testing.assert_close(Pooling(channels=8).apply(x), x.flatten(1))  # fewer channels than asked
    assert Pooling(spatial=1, channels=1).apply(x).tolist() == x.flatten(1).amax(1, keepdim=True).tolist()
    assert Pooling(spatial=1).out_dim((4, 5, 5)) == 4
    from eetool.core.errors import UsageError

    with pytest.raises(UsageError, match="does not divide"):
        Pooling(channels=3).apply(x)


def test_class_mean_sums_of_shards_merge_to_one_pass() -> None:
    gen = torch.Generator().manual_seed(1)
    dims = [5, 3]
    feats = [torch.randn(50, d, generator=gen) for d in dims]
    labels = torch.randint(0, 4, (50,), generator=gen)
    labels[:4] = torch.arange(4)  # every class present
    whole = ClassMeanSums(dims, 4)
    whole.update(feats, labels)
    shards = [ClassMeanSums(dims, 4) for _ in range(3)]
    for shard, idx in zip(shards, torch.tensor_split(torch.randperm(50, generator=gen), 3), strict=True):
        shard.update([f[idx] for f in feats], labels[idx])
    merged = shards[0]
    merged.merge(shards[1])
    merged.merge(shards[2])
    assert torch.equal(merged.counts, whole.counts)
    for a, b in zip(merged.sums, whole.sums, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    for got, f in zip(merged.means(), feats, strict=True):
        want = torch.stack([f[labels == k].mean(0) for k in range(4)])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_class_without_samples_is_a_bad_input(setup: Setup) -> None:
    first = setup.data.labels[:20]
    without_7 = setup.data.subset(torch.nonzero(first != 7).flatten())
    with pytest.raises(InputError, match="class 7"):
        calibrate(setup.em, without_7, setup.preprocess, K)


def test_unlabelled_data_is_a_bad_input(setup: Setup) -> None:
    labels = setup.data.labels.clone()
    labels[::5] = -1
    unlabelled = dataclasses.replace(setup.data, labels=labels, fingerprint="")
    with pytest.raises(InputError, match="unlabelled"):
        calibrate(setup.em, unlabelled, setup.preprocess, K)


# ---------------------------------------------------------------------------------------------
# Distances, normalisers and confidences (eqs. 2.3-2.7)


def test_distances_are_euclidean() -> None:
    gen = torch.Generator().manual_seed(2)
    x, means = torch.randn(40, 30, generator=gen), torch.randn(6, 30, generator=gen) * 2
    loops = torch.tensor([[float(torch.linalg.vector_norm(x[i].double() - means[k].double())) for k in range(6)]
                          for i in range(40)])
    torch.testing.assert_close(distances(x, means), torch.cdist(x, means), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(distances(x, means), loops.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(distances(x, means, (means * means).sum(1)), distances(x, means))
    on_a_mean = distances(means[2:3], means)  # ||x||^2 - 2 x.c + ||c||^2 may cancel below zero
    assert not torch.isnan(on_a_mean).any() and float(on_a_mean[0, 2]) < 1e-2


def test_decide_is_max_and_argmax_of_the_softmax_of_normalised_distances() -> None:
    gen = torch.Generator().manual_seed(3)
    d = torch.rand(20, 5, generator=gen) * 4
    normaliser = torch.rand(5, generator=gen) + 0.5
    conf, pred = decide(d, normaliser)
    for i in range(20):
        scores = [-float(d[i, k]) / float(normaliser[k]) for k in range(5)]
        exps = [torch.exp(torch.tensor(s - max(scores), dtype=torch.float64)) for s in scores]
        probs = [float(e / sum(exps)) for e in exps]
        assert float(conf[i]) == pytest.approx(max(probs), rel=1e-5)
        assert int(pred[i]) == probs.index(max(probs))


def clear_nearest(d: torch.Tensor, margin: float = 1e-3) -> torch.Tensor:
    """The samples whose nearest class mean is nearer than the next by ``margin``: float rounding cannot swap them."""
    two = d.double().topk(2, dim=1, largest=False).values
    return (two[:, 1] - two[:, 0]) > margin


def test_nearest_predicts_the_nearest_class_mean_with_the_softmax_confidence() -> None:
    gen = torch.Generator().manual_seed(4)
    x, means = torch.randn(200, 16, generator=gen), torch.randn(6, 16, generator=gen)
    normaliser = torch.rand(6, generator=gen) * 3 + 0.2  # very unequal: the two rules often disagree
    d = distances(x, means)
    conf, pred = decide(d, normaliser, NEAREST)
    soft_conf, soft_pred = decide(d, normaliser, SOFTMAX)
    clear = clear_nearest(torch.cdist(x, means))
    assert int(clear.sum()) > 150
    assert pred[clear].tolist() == torch.cdist(x, means).argmin(1)[clear].tolist()
    assert torch.equal(conf, soft_conf)  # eq. 2.5 whatever the label
    assert int((pred != soft_pred).sum()) >= 10, "the normalisers should make the rules disagree"


def test_auto_chooses_per_exit_the_rule_more_accurate_on_the_labels() -> None:
    labels = torch.tensor([0, 1, 2, 3, 4, 5])
    right, wrong = labels.clone(), (labels + 1) % 6
    # exit 0: softmax right on 5 of 6, nearest on 3; exit 1: the other way; exit 2: both right on 4 (a tie)
    softmax = torch.stack([torch.where(labels < 5, right, wrong), torch.where(labels < 3, right, wrong),
                           torch.where(labels < 4, right, wrong)], 1)
    nearest = torch.stack([torch.where(labels < 3, right, wrong), torch.where(labels < 5, right, wrong),
                           torch.where(labels >= 2, right, wrong)], 1)
    by_rule = {SOFTMAX: softmax, NEAREST: nearest}
    assert choose_rules(by_rule, labels, "auto") == [SOFTMAX, NEAREST, SOFTMAX]
    assert choose_rules(by_rule, None, "auto") == [SOFTMAX] * 3  # nothing to choose with
    assert choose_rules(by_rule, labels, NEAREST) == [NEAREST] * 3
    assert choose_rules(by_rule, labels, SOFTMAX) == [SOFTMAX] * 3
    with pytest.raises(UsageError, match="prediction rule"):
        choose_rules(by_rule, labels, "argmax")


def test_calibration_predicts_with_the_rule_auto_chose(setup: Setup, calibrated: ClassMeans) -> None:
    calib = calibrate(setup.em, setup.data, setup.preprocess, K, batch_size=32, predict="auto")
    labels = setup.data.labels
    softmax, nearest = calib.rule_predictions[SOFTMAX], calib.rule_predictions[NEAREST]
    assert calibrated.calibration is not None
    assert torch.equal(softmax, calibrated.calibration.prediction)  # the default: eq. 2.7 everywhere
    for j, f in enumerate(setup.features):
        d = torch.cdist(f.flatten(1).double(), calib.means[j].double())
        clear = clear_nearest(d)
        assert nearest[clear, j].tolist() == d.argmin(1)[clear].tolist()
        hits = {rule: int((p[:, j] == labels).sum()) for rule, p in calib.rule_predictions.items()}
        want = NEAREST if hits[NEAREST] > hits[SOFTMAX] else SOFTMAX
        assert calib.rules[j] == want
        assert torch.equal(calib.prediction[:, j], calib.rule_predictions[want][:, j])
    assert calibrate(setup.em, setup.data, setup.preprocess, K, batch_size=32, predict=NEAREST).rules == \
        [NEAREST] * len(setup.em.exits)


def test_calibration_without_room_for_the_distances_predicts_the_same_by_each_rule(setup: Setup) -> None:
    cached = calibrate(setup.em, setup.data, setup.preprocess, K, batch_size=32, predict="auto")
    third_pass = calibrate(setup.em, setup.data, setup.preprocess, K, batch_size=32, predict="auto",
                           raw_cache_bytes=0)
    assert third_pass.rules == cached.rules
    assert torch.equal(third_pass.prediction, cached.prediction)
    for rule in (SOFTMAX, NEAREST):
        assert torch.equal(third_pass.rule_predictions[rule], cached.rule_predictions[rule])


def test_normalisers_are_mean_distances_over_all_samples(setup: Setup, calibrated: ClassMeans) -> None:
    assert calibrated.normalisers.shape == (len(setup.em.exits), K)
    for j, f in enumerate(setup.features):
        d = torch.cdist(f.flatten(1).double(), calibrated.means[j].double())  # N x K, every sample
        torch.testing.assert_close(calibrated.normalisers[j].double(), d.mean(0), rtol=1e-4, atol=1e-5)


def test_calibration_confidences_follow_eqs_2_3_to_2_7(setup: Setup, calibrated: ClassMeans) -> None:
    calib = calibrated.calibration
    assert calib is not None
    n, j = len(setup.data), len(setup.em.exits)
    assert calib.confidence.shape == calib.prediction.shape == (n, j)
    assert calib.final_prediction.tolist() == setup.logits.argmax(1).tolist()
    assert torch.equal(calib.labels, setup.data.labels)
    few = [0, 1, 17, 50, 95]
    conf, pred = brute_confidences([f[few] for f in setup.features], calib.means, calib.normalisers)
    torch.testing.assert_close(calib.confidence[few].double(), conf, rtol=1e-4, atol=1e-6)
    assert torch.equal(calib.prediction[few], pred)
    assert bool((calib.confidence >= 1 / K - 1e-6).all()) and bool((calib.confidence <= 1).all())


def test_calibration_without_room_for_the_distances_gives_the_same(setup: Setup, calibrated: ClassMeans) -> None:
    """A raw-distance cache over its memory limit is replaced by a third pass; the results must not change."""
    third_pass = calibrate(setup.em, setup.data, setup.preprocess, K, batch_size=32, raw_cache_bytes=0)
    cached = calibrated.calibration
    assert cached is not None
    torch.testing.assert_close(third_pass.normalisers, cached.normalisers)
    torch.testing.assert_close(third_pass.confidence, cached.confidence, rtol=1e-5, atol=1e-6)
    assert torch.equal(third_pass.prediction, cached.prediction)
    assert torch.equal(third_pass.final_prediction, cached.final_prediction)


def test_rule_scores_agree_with_the_calibration_cache(setup: Setup, calibrated: ClassMeans) -> None:
    first = torch.arange(30)
    conf, pred, final = rule_scores(setup.em, setup.data.subset(first), setup.preprocess, MeansRule(calibrated),
                                    batch_size=12)
    c = calibrated.calibration
    assert c is not None
    torch.testing.assert_close(conf, c.confidence[first], rtol=1e-5, atol=1e-6)
    assert torch.equal(pred, c.prediction[first]) and torch.equal(final, c.final_prediction[first])


def mixed_rules(calibrated: ClassMeans) -> ClassMeans:
    """The class means predicting by the nearest mean at even exits and eq. 2.7 at odd ones."""
    return dataclasses.replace(calibrated, rules=[NEAREST if j % 2 == 0 else SOFTMAX
                                                  for j in range(len(calibrated.exits))])


def test_rule_scores_predict_by_each_exits_rule(setup: Setup, calibrated: ClassMeans) -> None:
    cm = mixed_rules(calibrated)
    conf, pred, _ = rule_scores(setup.em, setup.data, setup.preprocess, MeansRule(cm), batch_size=32)
    c = calibrated.calibration
    assert c is not None
    torch.testing.assert_close(conf, c.confidence, rtol=1e-5, atol=1e-6)
    for j, f in enumerate(setup.features):
        d = torch.cdist(f.flatten(1).double(), cm.means[j].double())
        clear = clear_nearest(d)
        want = d.argmin(1) if cm.rules[j] == NEAREST else c.prediction[:, j]
        assert pred[clear, j].tolist() == want[clear].tolist(), j


def test_exit_stats_mark_each_exit_and_the_head(calibrated: ClassMeans) -> None:
    c = calibrated.calibration
    assert c is not None
    stats = calibrated.exit_stats(c.confidence, c.prediction, c.final_prediction, c.labels)
    j = len(calibrated.exits)
    assert stats.correct.shape == (len(c.labels), j + 1)
    for i in (0, 5, 60):
        assert stats.correct[i].tolist() == [int(c.prediction[i, e]) == int(c.labels[i]) for e in range(j)] + [
            int(c.final_prediction[i]) == int(c.labels[i])]
    assert stats.costs.tolist() == pytest.approx(calibrated.cost_model().normalised_exit_costs())


# ---------------------------------------------------------------------------------------------
# The artifact


def test_class_means_round_trip(calibrated: ClassMeans, tmp_path: Path) -> None:
    path = str(tmp_path / "means.safetensors")
    cm = dataclasses.replace(calibrated, pooling=Pooling(spatial=3, channels=None),
                             provenance=Provenance(kind="class-means", checkpoint_sha256="ab" * 32,
                                                   exits=list(calibrated.exits),
                                                   dataset="safetensors/train:0123456789abcdef",
                                                   args={"batch_size": 32}))
    cm.save(path)
    loaded = ClassMeans.load(path)
    prov = loaded.provenance
    assert prov.kind == "class-means" and prov.checkpoint_sha256 == "ab" * 32
    assert prov.dataset == "safetensors/train:0123456789abcdef" and prov.args == {"batch_size": 32}
    assert loaded.exits == cm.exits and prov.exits == cm.exits
    assert loaded.pooling == Pooling(spatial=3, channels=None)
    assert loaded.stage_macs == cm.stage_macs
    assert all(torch.equal(a, b) for a, b in zip(loaded.means, cm.means, strict=True))
    assert torch.equal(loaded.normalisers, cm.normalisers) and torch.equal(loaded.counts, cm.counts)
    a, b = loaded.calibration, cm.calibration
    assert a is not None and b is not None
    for name in ("confidence", "prediction", "final_prediction", "labels"):
        got, want = getattr(a, name), getattr(b, name)
        assert got.dtype == want.dtype and torch.equal(got, want), name
    assert loaded.cost_model().exit_costs() == cm.cost_model().exit_costs()


def test_class_means_without_calibration_cache_round_trip(calibrated: ClassMeans, tmp_path: Path) -> None:
    path = str(tmp_path / "means.safetensors")
    dataclasses.replace(calibrated, calibration=None,
                        provenance=Provenance(kind="class-means", exits=list(calibrated.exits))).save(path)
    loaded = ClassMeans.load(path)
    assert loaded.calibration is None and loaded.pooling == Pooling()
    assert all(torch.equal(a, b) for a, b in zip(loaded.means, calibrated.means, strict=True))


def test_effective_stage_costs_round_trip_and_are_what_thresholds_fit_on(calibrated: ClassMeans,
                                                                         tmp_path: Path) -> None:
    """A pruned network's class means carry its effective stage MACs: the statistics thresholds are fitted on use
    them, normalised by the dense MACs; class means without them (unpruned, or made before) stay dense."""
    assert calibrated.cost_model(effective=True) == calibrated.cost_model()
    half = [m // 2 for m in calibrated.stage_macs]
    cm = dataclasses.replace(calibrated, effective_stage_macs=half,
                             provenance=Provenance(kind="class-means", exits=list(calibrated.exits)))
    path = str(tmp_path / "means.safetensors")
    cm.save(path)
    loaded = ClassMeans.load(path)
    assert loaded.effective_stage_macs == half
    dense, sparse = loaded.cost_model(), loaded.cost_model(effective=True)
    assert sparse.basis == "effective" and sparse.reference_macs == sum(calibrated.stage_macs)
    expected = [(b + o) / sum(calibrated.stage_macs) for b, o in zip(
        [sum(half[:j + 1]) for j in range(len(half))],
        [sum(dense.overhead_macs[:j + 1]) for j in range(len(cm.exits))] + [sum(dense.overhead_macs)], strict=True)]
    assert sparse.normalised_exit_costs() == pytest.approx(expected)
    c = loaded.calibration
    assert c is not None
    stats = loaded.exit_stats(c.confidence, c.prediction, c.final_prediction, c.labels)
    assert stats.costs.tolist() == pytest.approx(expected)


def test_prediction_rules_round_trip_and_old_artifacts_read_as_softmax(calibrated: ClassMeans,
                                                                        tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    path = str(tmp_path / "means.safetensors")
    cm = dataclasses.replace(mixed_rules(calibrated), provenance=Provenance(kind="class-means",
                                                                            exits=list(calibrated.exits)))
    cm.save(path)
    assert ClassMeans.load(path).rules == cm.rules
    # as written before the rules were recorded: the same file without the key
    with safe_open(path, "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a mapping)
    old = str(tmp_path / "old.safetensors")
    save_file(tensors, old, metadata={k: v for k, v in meta.items() if k != "eetool.predict"})
    loaded = ClassMeans.load(old)
    assert loaded.rules == [SOFTMAX] * len(cm.exits)
    assert MeansRule(loaded).rules == [SOFTMAX] * len(cm.exits)
    bad = str(tmp_path / "bad.safetensors")
    save_file(tensors, bad, metadata=meta | {"eetool.predict": '["nearest"]'})  # one rule for every exit
    with pytest.raises(InputError, match="eetool.predict"):
        ClassMeans.load(bad)


def test_class_means_missing_a_tensor_is_a_bad_input(calibrated: ClassMeans, tmp_path: Path) -> None:
    path = str(tmp_path / "means.safetensors")
    # Provenance naming one exit more than the file holds means for.
    dataclasses.replace(calibrated, provenance=Provenance(kind="class-means",
                                                          exits=[*calibrated.exits, "layer9.9"])).save(path)
    with pytest.raises(InputError, match="incomplete class-means"):
        ClassMeans.load(path)


# ---------------------------------------------------------------------------------------------
# The exit rule in real early-exit inference (eq. 2.6)


def thresholds_between_confidences(conf: torch.Tensor, quantile: float) -> list[float]:
    """Per exit, a threshold halfway between two distinct confidences near the quantile, far from any confidence
    so that float rounding of the two implementations cannot put a sample on the other side."""
    out = []
    for col in conf.T:
        values = torch.unique(col)
        gaps = values[1:] - values[:-1]
        start = int(quantile * (len(values) - 1))
        gap_at = start + int(torch.argmax((gaps[start:] > 1e-5).to(torch.uint8)))
        assert gaps[gap_at] > 1e-5
        out.append(float((values[gap_at] + values[gap_at + 1]) / 2))
    return out


def test_means_rule_exits_where_eq_2_6_says(setup: Setup, calibrated: ClassMeans) -> None:
    conf, pred = brute_confidences(setup.features, calibrated.means, calibrated.normalisers)
    thresholds = thresholds_between_confidences(conf, 0.7)
    x = setup.preprocess(setup.data.images)
    got_pred, got_exit = run_early_exit(setup.em, x, Thresholded(MeansRule(calibrated), thresholds))
    j = len(setup.em.exits)
    head = setup.logits.argmax(1)
    for i in range(len(setup.data)):
        passed = [e for e in range(j) if float(conf[i, e]) > thresholds[e]]
        want_exit = passed[0] if passed else j
        want_pred = int(pred[i, want_exit]) if passed else int(head[i])
        assert (int(got_exit[i]), int(got_pred[i])) == (want_exit, want_pred), i
    counts = torch.bincount(got_exit, minlength=j + 1)
    assert (counts[:j] > 0).sum() >= 3, "the thresholds should spread the samples over several exits"


def test_early_exits_predict_by_the_rule_of_the_exit_taken(setup: Setup, calibrated: ClassMeans) -> None:
    """What the calibration cache says a sample leaving at exit j predicts (what fit-thresholds fits on) is what
    early-exit inference gives it, whichever rule the exit has: thresholds of 1 before j and 0 at j send every
    sample out at j."""
    cm = mixed_rules(calibrated)
    _, soft_pred = brute_confidences(setup.features, cm.means, cm.normalisers)
    x = setup.preprocess(setup.data.images)
    disagreeing = 0
    for j, f in enumerate(setup.features):
        thresholds = [1.0] * j + [0.0] * (len(cm.exits) - j)
        got_pred, got_exit = run_early_exit(setup.em, x, Thresholded(MeansRule(cm), thresholds))
        assert got_exit.tolist() == [j] * len(setup.data)
        d = torch.cdist(f.flatten(1).double(), cm.means[j].double())
        clear = clear_nearest(d)
        want = d.argmin(1) if cm.rules[j] == NEAREST else soft_pred[:, j]
        assert got_pred[clear].tolist() == want[clear].tolist(), j
        if cm.rules[j] == NEAREST:
            disagreeing += int((clear & (d.argmin(1) != soft_pred[:, j])).sum())
    assert disagreeing > 0, "at some nearest-mean exit the nearest mean should differ from eq. 2.7's label"


def test_thresholds_of_one_give_the_plain_model(setup: Setup, calibrated: ClassMeans) -> None:
    x = setup.preprocess(setup.data.images)
    j = len(setup.em.exits)
    got_pred, got_exit = run_early_exit(setup.em, x, Thresholded(MeansRule(calibrated), [1.0] * j))
    with torch.no_grad():
        plain = setup.ckpt.model(x).argmax(1)
    assert got_exit.tolist() == [j] * len(setup.data)
    assert got_pred.tolist() == plain.tolist()


def test_thresholds_of_zero_exit_everyone_at_the_first_exit(setup: Setup, calibrated: ClassMeans) -> None:
    x = setup.preprocess(setup.data.images)
    got_pred, got_exit = run_early_exit(setup.em, x, Thresholded(MeansRule(calibrated), [0.0] * len(setup.em.exits)))
    assert got_exit.tolist() == [0] * len(setup.data)
    # argmax of softmax(-d / normaliser): the class nearest after each class's normalisation, not the nearest
    d = torch.cdist(setup.features[0].flatten(1).double(), calibrated.means[0].double())
    assert got_pred.tolist() == (d / calibrated.normalisers[0].double()).argmin(1).tolist()


# ---------------------------------------------------------------------------------------------
# Cost model


def test_cost_model_adds_the_distance_overhead_of_each_exit(setup: Setup, calibrated: ClassMeans) -> None:
    from eetool.core.costs import measure

    cm = dataclasses.replace(calibrated, stage_macs=measure(setup.em, setup.ckpt.spec.input_shape).stage_macs)
    model = cm.cost_model()
    dims = [f[0].numel() for f in setup.features]
    assert model.overhead_macs == [distance_macs(d, K) for d in dims]
    assert all(o > K * d for o, d in zip(model.overhead_macs, dims, strict=True))  # at least the dot products
    costs = model.normalised_exit_costs()
    assert len(costs) == len(cm.exits) + 1
    assert all(a <= b for a, b in zip(costs, costs[1:], strict=False))
    assert costs[-1] == pytest.approx(1 + sum(model.overhead_macs) / model.model_macs)
    assert cm.memory_bytes() == [K * d * 4 for d in dims]


def test_measuring_costs_leaves_the_model_as_it_was(setup: Setup, tiny_checkpoint: str) -> None:
    """Counting MACs stage by stage must not touch the shared BatchNorm statistics the class means depend on."""
    from eetool.core.costs import measure

    ckpt = load_checkpoint(tiny_checkpoint)
    em = build_exit_model(ckpt.model, "every")
    before = {k: v.clone() for k, v in ckpt.model.state_dict().items()}
    measure(em, ckpt.spec.input_shape)
    after = ckpt.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not any(m.training for m in ckpt.model.modules())
