"""prune-dataset end to end: the artifacts it writes (checked against the records they hold), reuse of
records for another ratio or variant, class balance, subsets, retraining on what is kept, and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import invoke, ok, one_error_line, sha256
from safetensors.torch import save_file

from eetool.classification import dataset_pruning as dp
from eetool.commands.prune_dataset import METHOD_NAMES
from eetool.core.artifacts import Provenance, read_tensors
from eetool.core.checkpoint import ModelSpec, save_checkpoint
from eetool.core.datasets import load_dataset
from eetool.core.errors import ExitCode

FAST = ("--batch-size", "20", "--no-augment", "--lr", "0.05", "--device", "cpu", "--no-progress")


@pytest.fixture(scope="module")
def easy_data(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Class c has brightness 24c + 10 under noise: 200 train and 50 test images that train quickly."""
    gen = torch.Generator().manual_seed(0)
    tensors = {}
    for split, n in (("train", 200), ("test", 50)):
        labels = torch.arange(n) % 10
        noise = torch.randint(-8, 9, (n, 1, 28, 28), generator=gen)
        tensors[f"{split}.images"] = (labels.view(n, 1, 1, 1) * 24 + 10 + noise).clamp(0, 255).to(torch.uint8)
        tensors[f"{split}.labels"] = labels
    path = tmp_path_factory.mktemp("easy") / "easy.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt", "classes": "\n".join(f"c{k}" for k in range(10))})
    return str(path)


@pytest.fixture(scope="module")
def eeprune(tmp_path_factory: pytest.TempPathFactory, tiny_checkpoint: str, easy_data: str) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("eeprune") / "kept.safetensors"
    result = ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.1", "--epochs", "3",
                       "-o", out, "--pruned-output", out.with_name("pruned.safetensors"), "--format", "json", *FAST))
    assert "pruning phase: eeprune" in result.stderr and result.stderr.endswith(
        f"wrote {out}, {out.with_name('pruned.safetensors')}, {out.with_suffix('.yaml')}\n")
    return out, json.loads(result.stdout)


def test_method_names_match_the_library() -> None:
    assert METHOD_NAMES == dp.METHODS


def test_eeprune_prunes_exactly_the_samples_above_the_threshold(eeprune: tuple[Path, dict], tiny_checkpoint: str,
                                                               easy_data: str) -> None:
    out, doc = eeprune
    tensors, prov, _ = read_tensors(str(out), "indices")
    kept, pruned, qualified = tensors["indices"], tensors["pruned"], tensors["records.qualified"]
    assert doc["schema"] == "eetool/indices@1"
    assert (doc["samples"], doc["pruned"], doc["kept"]) == (200, 20, 180)
    assert sorted(torch.cat([kept, pruned]).tolist()) == list(range(200))
    assert kept.dtype == torch.int64 and pruned.dtype == torch.int64
    # Direct re-computation: the pruned are the 20 highest qualified log-odds, and t lies between them and the rest.
    t = doc["threshold"]
    assert bool((dp.confidence(qualified[pruned]) > t).all())
    assert bool((dp.confidence(qualified[kept]) <= t).all())
    assert doc["qualified"] == int(torch.isfinite(qualified).sum()) >= 20
    assert prov.checkpoint_sha256 == sha256(tiny_checkpoint)
    assert prov.dataset == load_dataset(f"safetensors:{easy_data}", "train").fingerprint
    assert prov.exits == ["layer2.1"] == [doc["exit"]]
    phase = doc["pruning_phase"]
    assert (phase["epochs"], phase["samples_seen"], phase["samples_scored"]) == (3, 600, 200)
    labels = load_dataset(f"safetensors:{easy_data}", "train").labels
    assert [c["pruned"] for c in doc["per_class"]] == torch.bincount(labels[pruned], minlength=10).tolist()


def test_the_pruned_output_and_the_summary(eeprune: tuple[Path, dict]) -> None:
    out, doc = eeprune
    pruned, prov, _ = read_tensors(str(out.with_name("pruned.safetensors")), "indices")
    assert torch.equal(pruned["indices"], read_tensors(str(out), "indices")[0]["pruned"])
    assert prov.args["role"] == "pruned"
    summary = yaml.safe_load(out.with_suffix(".yaml").read_text())
    assert summary["schema"] == "eetool/indices@1"
    assert summary["threshold"] == doc["threshold"] and summary["per_class"] == doc["per_class"]
    assert summary["provenance"]["kind"] == "indices"
    assert "&id" not in out.with_suffix(".yaml").read_text()  # no YAML anchors for repeated values
    assert not Path(f"{out}.resume").exists()  # the resumable state goes once the outputs are written


def test_train_on_what_is_kept_reports_the_samples_seen(eeprune: tuple[Path, dict], tiny_checkpoint: str,
                                                        easy_data: str, tmp_path: Path) -> None:
    out, doc = eeprune
    result = ok(invoke("train", "-d", easy_data, "--indices", out, "--arch-args", "{width: 4}", "--epochs", "1",
                       "-o", tmp_path / "m.safetensors", "--format", "json", *FAST))
    assert json.loads(result.stdout)["samples_seen"] == doc["kept"]


@pytest.mark.parametrize("method", ["eeprune", "eeprune-loss", "eeprune-soft"])
def test_records_serve_another_ratio_and_variant_exactly_as_training_again_would(
        method: str, eeprune: tuple[Path, dict], tiny_checkpoint: str, easy_data: str, tmp_path: Path) -> None:
    out, _ = eeprune
    reused = ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.05", "-m", method,
                       "--from-scores", out, "-o", tmp_path / "r.safetensors", "--format", "json", *FAST))
    doc = json.loads(reused.stdout)
    assert doc["pruning_phase"]["reused_from"] == str(out)
    assert "training" not in reused.stderr and "epoch" not in reused.stderr
    fresh = ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.05", "-m", method,
                      "--epochs", "3", "-o", tmp_path / "f.safetensors", "--format", "json", *FAST))
    a, _, _ = read_tensors(str(tmp_path / "r.safetensors"), "indices")
    b, _, _ = read_tensors(str(tmp_path / "f.safetensors"), "indices")
    assert torch.equal(a["indices"], b["indices"])
    assert json.loads(fresh.stdout)["threshold"] == doc["threshold"]


def test_records_are_reused_with_another_checkpoint_of_the_same_model_and_refused_for_another(
        eeprune: tuple[Path, dict], tiny_spec: ModelSpec, easy_data: str, tmp_path: Path) -> None:
    """Records of a phase trained afresh depend on the architecture, not on the checkpoint's weights."""
    out, _ = eeprune
    torch.manual_seed(1)
    same = tmp_path / "same-model.safetensors"
    save_checkpoint(str(same), tiny_spec.build(), tiny_spec, Provenance(kind="checkpoint"))
    ok(invoke("prune-dataset", "-c", same, "-d", easy_data, "--ratio", "0.05", "--from-scores", out,
              "-o", tmp_path / "r.safetensors", "-q"))
    wider = ModelSpec(**{**vars(tiny_spec), "arch_args": {"width": 8}})
    other = tmp_path / "wider.safetensors"
    save_checkpoint(str(other), wider.build(), wider, Provenance(kind="checkpoint"))
    line = one_error_line(invoke("prune-dataset", "-c", other, "-d", easy_data, "--ratio", "0.05", "--from-scores",
                                 out, "-o", tmp_path / "o.safetensors"), ExitCode.PROVENANCE)
    assert "records of a resnet20 {'width': 4}" in line and "{'width': 8}" in line


def test_eeprune_soft_and_loss_rank_by_their_formulas(eeprune: tuple[Path, dict], tiny_checkpoint: str,
                                                      easy_data: str, tmp_path: Path) -> None:
    out, _ = eeprune
    records = {k.removeprefix("records."): v for k, v in read_tensors(str(out), "indices")[0].items()
               if k.startswith("records.")}
    ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.3", "-m", "eeprune-loss",
              "--from-scores", out, "-o", tmp_path / "loss.safetensors", "-q"))
    pruned = read_tensors(str(tmp_path / "loss.safetensors"), "indices")[0]["pruned"]
    total = records["early_loss"] + records["final_loss"]
    kept = torch.ones(200, dtype=torch.bool)
    kept[pruned] = False
    assert pruned.numel() == 60 and float(total[pruned].max()) <= float(total[kept].min())


def test_balanced_prunes_the_same_fraction_of_every_class(eeprune: tuple[Path, dict], tiny_checkpoint: str,
                                                          easy_data: str, tmp_path: Path) -> None:
    out, _ = eeprune
    result = ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.1", "-m", "random",
                       "--balanced", "-o", tmp_path / "b.safetensors", "--format", "json"))
    doc = json.loads(result.stdout)
    assert [c["pruned"] for c in doc["per_class"]] == [2] * 10
    assert doc["pruning_phase"]["samples_seen"] == 0


def test_random_is_seeded(tiny_checkpoint: str, easy_data: str, tmp_path: Path) -> None:
    def pruned(seed: int, name: str) -> list[int]:
        ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.2", "-m", "random",
                  "--seed", seed, "-o", tmp_path / name, "-q"))
        return read_tensors(str(tmp_path / name), "indices")[0]["pruned"].tolist()

    assert pruned(1, "a.safetensors") == pruned(1, "b.safetensors") != pruned(2, "c.safetensors")


def test_a_subset_is_pruned_in_positions_of_the_full_split(tiny_checkpoint: str, easy_data: str,
                                                           tmp_path: Path) -> None:
    subset = list(range(0, 200, 2))
    (tmp_path / "subset.txt").write_text("\n".join(map(str, subset)))
    ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--indices", tmp_path / "subset.txt",
              "--ratio", "0.5", "-m", "random", "-o", tmp_path / "k.safetensors", "-q"))
    tensors, prov, _ = read_tensors(str(tmp_path / "k.safetensors"), "indices")
    assert sorted(tensors["indices"].tolist() + tensors["pruned"].tolist()) == subset
    assert prov.inputs["indices"] == sha256(tmp_path / "subset.txt")
    result = ok(invoke("train", "-d", easy_data, "--indices", tmp_path / "k.safetensors", "--arch-args",
                       "{width: 4}", "--epochs", "1", "-o", tmp_path / "m.safetensors", "--format", "json", *FAST))
    assert json.loads(result.stdout)["samples_seen"] == 50


@pytest.mark.parametrize(("method", "extra", "seen", "scored"), [
    ("el2n", ["--models", "2"], 400, 400),
    ("forgetting", [], 200, 0),
    ("svp", ["--proxy-arch", "resnet8", "--proxy-arch-args", "{width: 2}"], 200, 0),
])
def test_baselines_report_the_cost_of_their_pruning_phase(method: str, extra: list[str], seen: int, scored: int,
                                                          tiny_checkpoint: str, easy_data: str,
                                                          tmp_path: Path) -> None:
    result = ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.25", "-m", method,
                       "--epochs", "1", *extra, "-o", tmp_path / "k.safetensors", *FAST))
    assert "pruning phase" in result.stdout and "class" in result.stdout  # the text table
    _, prov, _ = read_tensors(str(tmp_path / "k.safetensors"), "indices")
    phase = prov.args["pruning_phase"]
    assert (phase["samples_seen"], phase["samples_scored"]) == (seen, scored)
    assert prov.exits == []


def test_an_unmet_ratio_keeps_the_training_for_a_resume(tiny_checkpoint: str, easy_data: str,
                                                        tmp_path: Path) -> None:
    out = tmp_path / "kept.safetensors"
    line = one_error_line(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.95",
                                 "--epochs", "1", "-o", out, "-q", *FAST), ExitCode.USAGE)
    assert "ever met all three EEPrune conditions" in line and "--resume" in line
    assert not out.exists() and not out.with_suffix(".yaml").exists()
    assert Path(f"{out}.resume").is_dir()
    result = ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.01", "--epochs", "1",
                       "--resume", "-o", out, *FAST))
    assert "already finished; reusing it" in result.stderr and "epoch 1/1" not in result.stderr
    assert out.exists() and not Path(f"{out}.resume").exists()


def test_from_weights_starts_from_the_checkpoint(tiny_checkpoint: str, easy_data: str, tmp_path: Path) -> None:
    """The tiny checkpoint holds the initialisation of seed 0, so the runs use seed 1."""

    def records(*extra: str) -> torch.Tensor:
        out = tmp_path / f"k{len(extra)}.safetensors"
        ok(invoke("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.1", "-m", "eeprune-loss",
                  "--epochs", "1", "--seed", "1", "-o", out, "-q", *extra, *FAST))
        return read_tensors(str(out), "indices")[0]["records.final_loss"]

    assert not torch.equal(records(), records("--from-weights"))


def test_an_interrupted_pruning_phase_resumes_to_the_same_result(tiny_checkpoint: str, easy_data: str,
                                                                  tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    from eetool.core import training_loop as training

    args = ("prune-dataset", "-c", tiny_checkpoint, "-d", easy_data, "--ratio", "0.2", "-m", "eeprune-soft",
            "--epochs", "2", *FAST)
    ok(invoke(*args, "-o", tmp_path / "straight.safetensors", "-q"))
    real_save = training._save_state

    def save_then_stop(*a: object, **kw: object) -> None:
        real_save(*a, **kw)  # type: ignore[arg-type]
        raise KeyboardInterrupt  # right after the first epoch's state is safe

    monkeypatch.setattr(training, "_save_state", save_then_stop)
    out = tmp_path / "kept.safetensors"
    interrupted = invoke(*args, "-o", out, "-q")
    assert interrupted.exit_code == ExitCode.INTERRUPTED and interrupted.stdout == ""
    assert interrupted.stderr.strip().endswith(f"in {out}.resume: rerun with --resume)")
    assert not out.exists() and Path(f"{out}.resume", "run0.pt").is_file()
    monkeypatch.setattr(training, "_save_state", real_save)
    resumed = ok(invoke(*args, "-o", out, "--resume"))
    assert "resuming after epoch 1 of 2" in resumed.stderr
    a = read_tensors(str(tmp_path / "straight.safetensors"), "indices")[0]
    b = read_tensors(str(out), "indices")[0]
    assert torch.equal(a["indices"], b["indices"])
    assert torch.allclose(a["records.early_margin"], b["records.early_margin"])
