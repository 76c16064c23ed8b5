"""evaluate-lm beyond the thesis: one temperature per head fitted on held-out tokens, and the accuracy-cost curve of a
confidence threshold on an exit head, against direct recomputation on synthetic data and on a tiny random Llama."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.lm_helpers import DATA

pytest.importorskip("transformers")

from eetool.cli import app  # noqa: E402
from eetool.lm.class_aware_head import ExitHead  # noqa: E402
from eetool.lm.corpus import load_corpus  # noqa: E402
from eetool.lm.curve import curve, exit_stats, token_costs  # noqa: E402
from eetool.lm.head_evaluation import Score, fit_temperatures  # noqa: E402
from eetool.lm.models import LanguageModel  # noqa: E402
from eetool.lm.temperature import fit_temperature, mean_nll, split_for_temperature  # noqa: E402

runner = CliRunner()
HAMLET, MACBETH = str(DATA / "hamlet-act1.txt"), str(DATA / "macbeth-act1.txt")
LAYER = 2  # of the tiny model's 4
MARGIN = 1e-5  # of a confidence recomputed through transformers' hidden states, around a threshold


@pytest.fixture(scope="module")
def head_file(tiny_lm_folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("head") / "head.safetensors"
    made = runner.invoke(app, ["init-exit-head", "-m", str(tiny_lm_folder), "-t", HAMLET, "-o", str(out),
                               "--context", "32", "--layer", str(LAYER), "-q"])
    assert made.exit_code == 0, made.stderr
    return out


def direct_logits(lm: LanguageModel, head: ExitHead, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Exit and final logits of every prediction (n x V each), through transformers' own hidden states."""
    with torch.no_grad():
        out = lm.model(input_ids=ids, output_hidden_states=True)
        states = out.hidden_states[head.layer][:, :-1]
        if head.final_norm:
            states = lm.final_norm(states)
        exit_logits = head.logits(states)
        return exit_logits.reshape(-1, exit_logits.shape[-1]), out.logits[:, :-1].reshape(-1, lm.vocab_size)


def test_fitted_temperature_minimises_nll_against_a_grid() -> None:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4000, 50, generator=gen) * 4
    # the targets are drawn from softmax(logits / 3): the NLL-minimising temperature is near 3
    targets = torch.multinomial(torch.softmax(logits / 3, 1), 1, generator=gen)[:, 0]
    fit = fit_temperature(logits, targets)
    grid = torch.logspace(-2, 3, 400).tolist()
    best_on_grid = min(mean_nll(logits, targets, t) for t in grid)
    assert fit.mean_nll <= best_on_grid + 1e-6
    assert fit.mean_nll == pytest.approx(mean_nll(logits, targets, fit.temperature), rel=1e-6)
    assert abs(math.log(fit.temperature / 3)) < 0.1
    assert fit.mean_nll < fit.mean_nll_raw - 0.1 and fit.tokens == 4000


def test_temperature_fit_leaves_out_impossible_targets() -> None:
    logits = torch.tensor([[2.0, 0.0, -math.inf], [0.0, 2.0, 0.0], [1.0, 0.0, 0.0]])
    targets = torch.tensor([2, 1, 0])
    fit = fit_temperature(logits, targets)
    alone = fit_temperature(logits[1:], targets[1:])
    assert fit.tokens == 2 and fit.temperature == pytest.approx(alone.temperature, rel=1e-6)


def test_score_at_a_temperature_is_the_scaled_softmax() -> None:
    gen = torch.Generator().manual_seed(1)
    logits, targets = torch.randn(2, 5, 7, generator=gen) * 3, torch.randint(0, 7, (2, 5), generator=gen)
    score = Score("x", temperature=2.5)
    score.add(logits[0], targets[0])
    score.add(logits[1], targets[1])
    flat, flat_targets = logits.reshape(-1, 7), targets.reshape(-1)
    nll = float(torch.nn.functional.cross_entropy(flat / 2.5, flat_targets))
    assert score.scaled_perplexity == pytest.approx(math.exp(nll), rel=1e-5)
    assert score.perplexity == pytest.approx(math.exp(float(torch.nn.functional.cross_entropy(flat, flat_targets))),
                                             rel=1e-5)
    confidence, correct = score.per_token()
    torch.testing.assert_close(confidence, torch.softmax(flat / 2.5, 1).max(1).values)
    assert torch.equal(correct, flat.argmax(1) == flat_targets)


def mean_cost(leaves: torch.Tensor, leave: float, go_on: float) -> float:
    return float((leaves.double() * leave + (~leaves).double() * go_on).mean())


def brute_force_best(confidence: torch.Tensor, exit_correct: torch.Tensor, final_correct: torch.Tensor,
                     costs: tuple[float, float], budget: float) -> float:
    """The most accurate threshold within the budget, over every threshold that separates the confidences."""
    candidates = [1.0, *torch.nextafter(confidence.unique(), torch.tensor(-1.0)).tolist()]
    best = -1.0
    for t in candidates:
        leaves = confidence > t
        cost = mean_cost(leaves, *costs)
        accuracy = float(torch.where(leaves, exit_correct, final_correct).double().mean())
        if cost <= budget + 1e-12:
            best = max(best, accuracy)
    return best


def test_curve_points_are_the_best_threshold_within_each_budget() -> None:
    gen = torch.Generator().manual_seed(2)
    n = 300
    confidence = (torch.rand(n, generator=gen) * 100).round() / 100  # ties, as a saturated softmax gives
    exit_correct = torch.rand(n, generator=gen) < confidence  # confident answers are right more often
    final_correct = torch.rand(n, generator=gen) < 0.6
    costs = (0.6, 1.2)
    stats = exit_stats(confidence, exit_correct, final_correct, costs)
    budgets = [0.6, 0.7, 0.8, 0.9, 1.0]
    points = curve(stats, budgets, sweep_step=0.05)
    asked = [p for p in points if p.budget is not None]
    assert sorted(p.budget for p in asked) == budgets
    for p in asked:
        leaves = confidence > p.threshold
        assert p.cost == pytest.approx(mean_cost(leaves, 0.6, 1.2), abs=1e-12)
        assert p.cost <= p.budget + 1e-12
        assert p.exit_share == pytest.approx(float(leaves.double().mean()), abs=1e-12)
        assert p.exit_accuracy == pytest.approx(float(exit_correct[leaves].double().mean()), abs=1e-12)
        assert p.accuracy == pytest.approx(brute_force_best(confidence, exit_correct, final_correct, costs, p.budget),
                                           abs=1e-12)
    hull = [p for p in points if p.budget is None]
    assert len(hull) >= 2 and all(a.cost < b.cost and a.accuracy < b.accuracy for a, b in itertools.pairwise(hull))


def test_token_costs_count_the_blocks_and_the_heads(tiny_lm: LanguageModel) -> None:
    costs = token_costs(tiny_lm, 32)
    d, kv, ffn, heads, head_dim = 32, 16, 64, 4, 8  # tests/lm_helpers.py's config
    block = d * d * 2 + d * kv * 2 + 3 * d * ffn + 2 * heads * head_dim * 33 / 2
    head = tiny_lm.vocab_size * d
    assert costs.block == block and costs.head == head
    leave, go_on = costs.exit_costs(LAYER)
    assert leave == pytest.approx((LAYER * block + head) / (4 * block + head))
    assert go_on == pytest.approx((4 * block + 2 * head) / (4 * block + head))


def test_evaluate_lm_curve_equals_a_direct_recomputation(tiny_lm_folder: Path, tiny_lm: LanguageModel,
                                                         head_file: Path, tmp_path: Path) -> None:
    plot = tmp_path / "curve.png"
    result = runner.invoke(app, ["evaluate-lm", "-m", str(tiny_lm_folder), "-t", MACBETH, "--head", str(head_file),
                                 "--context", "32", "--temperature", "1.5", "--budget", "0.8", "--budget", "1",
                                 "--sweep", "--plot", str(plot), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    assert plot.read_bytes().startswith(b"\x89PNG")
    doc = json.loads(result.stdout)
    row = next(r for r in doc["heads"] if r["head"] == "head")
    head, _ = ExitHead.load(str(head_file))
    ids = load_corpus([MACBETH], tiny_lm.tokenizer, context=32).contexts
    assert doc["scored_contexts"] == len(ids)  # a fixed temperature scores every context
    exit_logits, final_logits = direct_logits(tiny_lm, head, ids)
    targets = ids[:, 1:].reshape(-1)
    confidence = torch.softmax(exit_logits / 1.5, 1).max(1).values
    exit_correct, final_correct = exit_logits.argmax(1) == targets, final_logits.argmax(1) == targets
    leave, go_on = token_costs(tiny_lm, 32).exit_costs(head.layer)
    assert row["curve"]["cost_leaving"] == pytest.approx(leave, abs=1e-6)
    points = row["curve"]["points"]
    assert {p["budget"] for p in points} >= {0.8, 1.0}
    n = len(targets)
    for p in points:
        # Each threshold lies one float32 step below a confidence; recomputed through another path, a confidence
        # can move by a few steps, so tokens within MARGIN of the threshold may fall either side.
        leaves = confidence > p["threshold"] + MARGIN
        unsure = int(((confidence - p["threshold"]).abs() <= MARGIN).sum())
        assert unsure <= 3
        assert abs(p["exit_share"] - float(leaves.double().mean())) <= unsure / n + 2e-6
        assert abs(p["cost"] - mean_cost(leaves, leave, go_on)) <= unsure / n * (go_on - leave) + 2e-6
        overall = torch.where(leaves, exit_correct, final_correct)
        assert abs(p["accuracy"] - float(overall.double().mean())) <= unsure / n + 2e-6
        if p["budget"] is not None:
            assert p["cost"] <= p["budget"] + 1e-6
    scaled = float(torch.nn.functional.cross_entropy(exit_logits / 1.5, targets))
    assert row["temperature"] == 1.5 and row["perplexity_at_temperature"] == pytest.approx(math.exp(scaled), rel=1e-4)


def test_temperature_auto_fits_on_held_out_contexts_and_scores_the_rest(tiny_lm_folder: Path, tiny_lm: LanguageModel,
                                                                        head_file: Path) -> None:
    result = runner.invoke(app, ["evaluate-lm", "-m", str(tiny_lm_folder), "-t", MACBETH, "--head", str(head_file),
                                 "--context", "32", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    rows = {r["head"]: r for r in doc["heads"]}
    head, _ = ExitHead.load(str(head_file))
    ids = load_corpus([MACBETH], tiny_lm.tokenizer, context=32).contexts
    scored, fitting = split_for_temperature(ids)
    assert doc["temperature"] == "auto" and doc["temperature_contexts"] == len(fitting) >= 2
    assert rows["head"]["tokens"] == scored.shape[0] * 31
    fit_exit, fit_final = direct_logits(tiny_lm, head, fitting)
    fit_targets = fitting[:, 1:].reshape(-1)
    for name, logits in (("head", fit_exit), ("final", fit_final)):
        expected = fit_temperature(logits, fit_targets)
        assert rows[name]["temperature"] == pytest.approx(expected.temperature, rel=1e-3)
    # scored on the other contexts, at the fitted temperature
    score_exit, _ = direct_logits(tiny_lm, head, scored)
    nll = float(torch.nn.functional.cross_entropy(score_exit / rows["head"]["temperature"],
                                                  scored[:, 1:].reshape(-1)))
    assert rows["head"]["perplexity_at_temperature"] == pytest.approx(math.exp(nll), rel=1e-3)


def test_fit_temperatures_fits_each_head_on_its_own_logits(tiny_lm: LanguageModel, head_file: Path) -> None:
    head, _ = ExitHead.load(str(head_file))
    ids = load_corpus([MACBETH], tiny_lm.tokenizer, context=32).contexts[:4]
    fits = fit_temperatures(tiny_lm, ids, {"a": head}, batch_size=3)
    exit_logits, final_logits = direct_logits(tiny_lm, head, ids)
    targets = ids[:, 1:].reshape(-1)
    assert fits["a"].temperature == pytest.approx(fit_temperature(exit_logits, targets).temperature, rel=1e-3)
    assert fits["final"].temperature == pytest.approx(fit_temperature(final_logits, targets).temperature, rel=1e-3)
