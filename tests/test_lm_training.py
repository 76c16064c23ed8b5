"""train-exit-head on a tiny random Llama-style model: freezing trains only the two heads on cached states that
equal recomputed ones, the loss is the sum of the two heads' cross-entropies, no freezing moves the trunk, a
resumed run ends where an uninterrupted one does, and the CLI's outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from tests.lm_helpers import DATA, make_tiny_lm

pytest.importorskip("transformers")

from eetool.cli import app  # noqa: E402
from eetool.lm.class_aware_head import ExitHead  # noqa: E402
from eetool.lm.corpus import load_corpus  # noqa: E402
from eetool.lm.exit_lm_training import (  # noqa: E402
    CurvePoint,
    ExitLM,
    TrainSettings,
    batch_indices,
    cache_states,
    train_exit_lm,
)
from eetool.lm.models import LanguageModel, load_language_model  # noqa: E402

runner = CliRunner()
HAMLET, MACBETH = str(DATA / "hamlet-act1.txt"), str(DATA / "macbeth-act1.txt")
LAYER = 2


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture()
def lm(folder: Path) -> LanguageModel:
    """A fresh copy each test: training changes the model in place."""
    return load_language_model(str(folder))


@pytest.fixture(scope="module")
def contexts(folder: Path) -> torch.Tensor:
    return load_corpus([HAMLET], load_language_model(str(folder)).tokenizer, context=32).contexts


def random_head(lm: LanguageModel, norm: bool = True) -> ExitHead:
    g = torch.Generator().manual_seed(1)
    return ExitHead(torch.randn(lm.vocab_size, lm.hidden_size, generator=g) * 0.1,
                    torch.randn(lm.vocab_size, generator=g) * 0.1, LAYER, norm, {"init": "random"})


def test_batches_walk_through_seeded_permutations() -> None:
    steps = [batch_indices(s, 4, 10, seed=3) for s in range(5)]  # 20 positions: two permutations of 10
    flat = torch.cat(steps)
    assert sorted(flat[:10].tolist()) == list(range(10)) and sorted(flat[10:].tolist()) == list(range(10))
    assert torch.equal(batch_indices(2, 4, 10, seed=3), steps[2])  # a step's batch depends on the seed and step alone
    assert not torch.equal(torch.cat([batch_indices(s, 4, 10, seed=4) for s in range(5)]), flat)


@pytest.mark.parametrize("norm", [True, False])
def test_loss_is_the_sum_of_the_two_heads_cross_entropies(lm: LanguageModel, contexts: torch.Tensor,
                                                          norm: bool) -> None:
    head = random_head(lm, norm)
    ids = contexts[:3]
    with torch.no_grad():  # transformers' own hidden states and logits: the whole model, no eetool hook
        out = lm.model(input_ids=ids, output_hidden_states=True)
        early = out.hidden_states[LAYER]
        early = lm.final_norm(early) if norm else early
        exit_logits = early[:, :-1] @ head.weight.T + head.bias
        expected_exit = torch.nn.functional.cross_entropy(exit_logits.reshape(-1, lm.vocab_size),
                                                          ids[:, 1:].reshape(-1))
        expected_final = torch.nn.functional.cross_entropy(out.logits[:, :-1].reshape(-1, lm.vocab_size),
                                                           ids[:, 1:].reshape(-1))
    model = ExitLM(lm, head, freeze=True)
    exit_loss, final_loss = model.loss(*model.states(ids), ids[:, 1:])
    torch.testing.assert_close(exit_loss, expected_exit, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(final_loss, expected_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("limit_mb", [64, 0])  # in memory, and in a temp file
def test_cached_states_equal_recomputed_ones(lm: LanguageModel, contexts: torch.Tensor, limit_mb: int) -> None:
    import contextlib

    model = ExitLM(lm, random_head(lm), freeze=True)
    with contextlib.ExitStack() as stack:
        (train, held), on_disk = cache_states(model, [contexts[:20], contexts[20:27]], batch_size=6,
                                              limit_mb=limit_mb, device=torch.device("cpu"), stack=stack)
        assert on_disk == (limit_mb == 0)
        for cached, ids in ((train, contexts[:20]), (held, contexts[20:27])):
            with torch.no_grad():
                out = lm.model(input_ids=ids, output_hidden_states=True)
            torch.testing.assert_close(cached.exit, lm.final_norm(out.hidden_states[LAYER])[:, :-1], rtol=1e-5,
                                       atol=1e-5)
            torch.testing.assert_close(cached.final, out.hidden_states[-1][:, :-1], rtol=1e-5, atol=1e-5)
            assert torch.equal(cached.targets, ids[:, 1:])


def test_freezing_trains_only_the_two_heads(lm: LanguageModel, contexts: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    head = random_head(lm)
    model = ExitLM(lm, head, freeze=True)
    result = train_exit_lm(model, contexts[:40], contexts[40:48], TrainSettings(steps=4, lr=1e-2, batch_size=4,
                                                                                eval_every=2))
    after = lm.model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed == {"lm_head.weight"}  # the embedding it was tied to, and every block, bit-identical
    assert not torch.equal(model.exit_weight.detach(), head.weight)
    assert not torch.equal(model.exit_bias.detach(), head.bias)
    assert [p.step for p in result.curve] == [0, 2, 4]
    assert result.cache_mb > 0


def test_no_freezing_trains_the_trunk_and_keeps_the_tying(lm: LanguageModel, contexts: torch.Tensor) -> None:
    before = {k: v.clone() for k, v in lm.model.state_dict().items()}
    model = ExitLM(lm, random_head(lm), freeze=False)
    result = train_exit_lm(model, contexts[:16], contexts[16:20],
                           TrainSettings(steps=2, lr=1e-2, batch_size=4, freeze=False, eval_every=2))
    after = lm.model.state_dict()
    blocks = [k for k in before if k.startswith("model.layers.")]
    assert all(not torch.equal(before[k], after[k]) for k in blocks if k.endswith("mlp.up_proj.weight"))
    assert lm.lm_head.data_ptr() == lm.model.get_input_embeddings().weight.data_ptr()  # type: ignore[operator]
    assert result.cache_mb == 0


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(folder: Path, contexts: torch.Tensor,
                                                            tmp_path: Path) -> None:
    settings = TrainSettings(steps=6, lr=1e-2, batch_size=4, eval_every=3)
    train, held = contexts[:24], contexts[24:30]

    def run(path: Path, resume: bool = False, stop_at: int | None = None) -> ExitLM:
        lm = load_language_model(str(folder))
        model = ExitLM(lm, random_head(lm), freeze=True)

        def stop(point: CurvePoint) -> None:
            if stop_at is not None and point.step == stop_at:
                raise KeyboardInterrupt

        try:
            train_exit_lm(model, train, held, settings, resume_path=str(path), resume=resume, on_point=stop,
                          identity={"text": "hamlet"})
        except KeyboardInterrupt:
            pass
        return model

    whole = run(tmp_path / "whole.pt")
    run(tmp_path / "cut.pt", stop_at=3)  # interrupted after the state of step 3 was saved
    resumed = run(tmp_path / "cut.pt", resume=True)
    for a, b in ((whole.exit_weight, resumed.exit_weight), (whole.exit_bias, resumed.exit_bias),
                 (whole.final_weight, resumed.final_weight)):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=0, atol=1e-7)
    with pytest.raises(Exception, match="other settings"):  # another text cannot resume it
        lm = load_language_model(str(folder))
        train_exit_lm(ExitLM(lm, random_head(lm), freeze=True), train, held, settings,
                      resume_path=str(tmp_path / "cut.pt"), resume=True, identity={"text": "macbeth"})


def test_train_exit_head_cli_writes_a_head_evaluate_lm_scores_as_the_curve_says(folder: Path, tmp_path: Path) -> None:
    head, trained, report, model_out = (tmp_path / "head.safetensors", tmp_path / "trained.safetensors",
                                        tmp_path / "curve.yaml", tmp_path / "model")
    made = runner.invoke(app, ["init-exit-head", "-m", str(folder), "-t", HAMLET, "--context", "32", "-o", str(head),
                               "-q", "--layer", str(LAYER)])
    assert made.exit_code == 0, made.stderr
    result = runner.invoke(app, ["train-exit-head", "-m", str(folder), "--head", str(head), "-t", HAMLET,
                                 "--eval-text", MACBETH, "--context", "32", "--steps", "4", "--eval-every", "2",
                                 "--lr", "1e-2", "-o", str(trained), "--report", str(report),
                                 "--model-output", str(model_out), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema"] == "eetool/lm-training@1"
    assert [p["step"] for p in doc["curve"]] == [0, 2, 4]
    assert "step 4: exit accuracy" in result.stderr  # logs on stderr, data on stdout
    assert not Path(f"{trained}.resume.pt").exists()
    import yaml

    assert yaml.safe_load(report.read_text())["curve"] == doc["curve"]
    new_head, prov = ExitHead.load(str(trained))
    assert new_head.info["trained"]["steps"] == 4 and new_head.info["trained"]["freeze"] is True
    assert prov.inputs["lm-exit-head"] == doc["start_head_sha256"]
    # The model folder holds the trained final head; evaluate-lm scores both heads as the last point says
    # (at temperature 1, so that it scores every context, as the curve does).
    scored = runner.invoke(app, ["evaluate-lm", "-m", str(model_out), "-t", MACBETH, "--context", "32", "--head",
                                 str(trained), "--temperature", "1", "--format", "json"])
    assert scored.exit_code == 0, scored.stderr
    rows = {r["head"]: r for r in json.loads(scored.stdout)["heads"]}
    last = doc["curve"][-1]
    assert rows["trained"]["accuracy"] == pytest.approx(last["exit_accuracy"], abs=1e-4)
    assert rows["final"]["accuracy"] == pytest.approx(last["final_accuracy"], abs=1e-4)
    # Without the model folder the source model is named: frozen blocks 1..K read the same states.
    again = runner.invoke(app, ["train-exit-head", "-m", str(folder), "--head", str(head), "-t", HAMLET,
                                "--context", "32", "--steps", "1", "-o", str(tmp_path / "t2.safetensors"), "-q"])
    assert again.exit_code == 0, again.stderr
    assert ExitHead.load(str(tmp_path / "t2.safetensors"))[1].model_sha256 == load_language_model(str(folder)).sha256


def test_train_exit_head_plot_draws_the_curve_to_a_png(folder: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    from PIL import Image

    head, plot = tmp_path / "head.safetensors", tmp_path / "curve.png"
    made = runner.invoke(app, ["init-exit-head", "-m", str(folder), "-t", HAMLET, "--context", "32", "-o", str(head),
                               "-q", "--layer", str(LAYER)])
    assert made.exit_code == 0, made.stderr
    result = runner.invoke(app, ["train-exit-head", "-m", str(folder), "--head", str(head), "-t", HAMLET,
                                 "--context", "32", "--steps", "2", "--eval-every", "1", "-o",
                                 str(tmp_path / "trained.safetensors"), "--plot", str(plot), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    assert json.loads(result.stdout)["schema"] == "eetool/lm-training@1"  # the PNG stays off stdout
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(plot) as png:
        assert png.width > 100 and png.height > 100
