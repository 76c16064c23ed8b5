"""evaluate --compare: other plain networks beside the evaluated checkpoint, on the same data and timed in the same
rounds. Their accuracy against a direct evaluation of each, their MACs against the cost model's ratio, their
speed-ups against injected times, and the rows in the text table, the JSON, the YAML artifact and the plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import invoke, ok, sha256

from eetool.core.artifacts import Provenance
from eetool.core.checkpoint import ModelSpec, load_checkpoint, save_checkpoint
from eetool.core.costs import count_macs
from eetool.core.datasets import load_dataset

SAMPLES = 256


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Two small untrained networks for the demo images: a ResNet-8 with another normalisation than the evaluated
    checkpoint's (each network must get its own), and a wider ResNet-20; and the first SAMPLES test images."""
    d = tmp_path_factory.mktemp("peers")
    made = {}
    for name, arch, width, mean, std in (("resnet8-w4", "resnet8", 4, 0.5, 0.2), ("resnet20-w8", "resnet20", 8, 0.3,
                                                                                  0.35)):
        spec = ModelSpec(arch=arch, num_classes=10, input_shape=(1, 28, 28), mean=[mean], std=[std],
                         arch_args={"width": width})
        torch.manual_seed(1)
        save_checkpoint(str(d / f"{name}.safetensors"), spec.build(), spec, Provenance(kind="checkpoint"))
        made[name] = str(d / f"{name}.safetensors")
    (d / "indices.txt").write_text("\n".join(str(i) for i in range(SAMPLES)))
    made["indices"] = str(d / "indices.txt")
    return made


def direct_accuracy(checkpoint: str, indices: int) -> float:
    """The checkpoint's accuracy on the first demo test images, computed here: pixels to [0, 1], the checkpoint's
    own normalisation, the argmax of its outputs."""
    ckpt = load_checkpoint(checkpoint)
    data = load_dataset("demo", "test")
    images, labels = data.images[:indices].float() / 255, data.labels[:indices]
    mean = torch.tensor(ckpt.spec.mean).view(1, -1, 1, 1)
    std = torch.tensor(ckpt.spec.std).view(1, -1, 1, 1)
    with torch.no_grad():
        predictions = ckpt.model.eval()((images - mean) / std).argmax(1)
    return float((predictions == labels).double().mean())


def evaluate_args(checkpoint: str, peers: dict[str, str], *extra: object) -> list[object]:
    return ["evaluate", "-c", checkpoint, "-d", "demo", "--indices", peers["indices"], "--repeats", "1",
            "--no-progress", *extra]


def test_compared_networks_are_evaluated_as_on_their_own(peers: dict[str, str], tiny_checkpoint: str,
                                                          workdir: Path) -> None:
    pytest.importorskip("matplotlib")
    compared = ["demo", peers["resnet8-w4"]]
    args = evaluate_args(tiny_checkpoint, peers, *(a for c in compared for a in ("--compare", c)))
    doc = json.loads(ok(invoke(*args, "-o", "evaluation.yaml", "--plot", "plot.png", "--format", "json")).stdout)
    rows = doc["compared"]
    assert [r["name"] for r in rows] == ["demo-resnet20-fashion-mnist.safetensors", "resnet8-w4.safetensors"]
    main_macs = count_macs(load_checkpoint(tiny_checkpoint).model, (1, 28, 28))
    for ref, row in zip(compared, rows, strict=True):
        ckpt = load_checkpoint(ref)
        assert row["checkpoint_sha256"] == ckpt.sha256 and row["arch"] == ckpt.spec.arch
        # one sample's margin: batches of another size may round a near tie the other way
        assert abs(row["accuracy"] - direct_accuracy(ref, SAMPLES)) <= 1 / SAMPLES
        macs = count_macs(ckpt.model, (1, 28, 28))
        assert row["macs"] == macs and row["cost"] == pytest.approx(macs / main_macs, rel=1e-5)
        assert row["effective_cost"] == row["cost"]  # no zero weights
        assert row["throughput"] > 0 and len(row["seconds"]) == 1
    assert rows[0]["accuracy"] > 0.8  # the shipped checkpoint, as trained; the untrained tiny ones are near chance
    artifact = yaml.safe_load(Path("evaluation.yaml").read_text())
    assert artifact["compared"] == rows and artifact["points"] == doc["points"]
    assert Path("plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = ok(invoke(*args)).stdout
    assert "compared: demo-resnet20-fashion-mnist.safetensors" in text and "compared: resnet8-w4.safetensors" in text
    alone = json.loads(ok(invoke(*evaluate_args(tiny_checkpoint, peers, "--format", "json"))).stdout)
    assert "compared" not in alone and "compared:" not in ok(invoke(*evaluate_args(tiny_checkpoint, peers))).stdout


def fake_times_by_size(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Each plain run takes one second per 10,000 parameters of its model, and the rounds get slower (a machine
    getting busier: 1x, 2x, 3x), which speed-ups within a round do not see. Returns the parameters of each run."""
    import eetool.core.inference as inference

    real_predict = inference.predict
    timed: list[int] = []

    def predict(model, data, *args, **kwargs):  # type: ignore[no-untyped-def]
        result = real_predict(model, data, *args, **kwargs)
        if kwargs.get("reporter") is not None:  # a timed run (the warm-up passes no reporter)
            params = sum(p.numel() for p in model.parameters())
            timed.append(params)
            result.seconds = params / 10_000 * sum(t == timed[0] for t in timed)  # the round's number, from 1
        return result

    monkeypatch.setattr(inference, "predict", predict)
    return timed


def parameters(checkpoint: str) -> int:
    """Of the network evaluate times: the checkpoint's with its batch norms folded (the default)."""
    from eetool.core.batch_norm_folding import fold_batch_norm

    return sum(p.numel() for p in fold_batch_norm(load_checkpoint(checkpoint).model).parameters())


def rounded(speed_up: float) -> object:
    """A speed-up as the evaluation rounds it, to 3 decimals."""
    return pytest.approx(speed_up, abs=5.01e-4)


def test_speed_ups_are_ratios_within_each_round(peers: dict[str, str], tiny_checkpoint: str,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    timed = fake_times_by_size(monkeypatch)
    small, wide = peers["resnet8-w4"], peers["resnet20-w8"]
    doc = json.loads(ok(invoke(*evaluate_args(tiny_checkpoint, peers, "--repeats", "3", "--compare", small,
                                              "--compare", wide, "--baseline", wide, "--format", "json"))).stdout)
    main = parameters(tiny_checkpoint)
    # every round runs the plain model, the compared networks in the order given, then the baseline
    assert timed == [main, parameters(small), parameters(wide), parameters(wide)] * 3
    plain, (row_small, row_wide) = doc["points"][0], doc["compared"]
    for row, peer in ((row_small, small), (row_wide, wide)):
        ratio = main / parameters(peer)
        assert row["speedup"] == rounded(ratio)
        assert row["speedup_min"] == rounded(ratio) and row["speedup_max"] == rounded(ratio)
        # and against the baseline, as the plain model and the operating points are
        assert row["speedup_vs_baseline"] == rounded(parameters(wide) / parameters(peer))
        assert row["macs_ratio"] == pytest.approx(doc["baseline"]["macs"] / row["macs"], rel=1e-3)
    assert row_wide["speedup_vs_baseline"] == 1.0  # the same network in the same round
    assert plain["speedup"] == 1.0 and plain["speedup_vs_baseline"] == rounded(parameters(wide) / main)
    assert row_wide["seconds"] == pytest.approx([parameters(wide) / 10_000 * k for k in (1, 2, 3)], rel=1e-3)


def test_the_evaluated_checkpoint_itself_is_compared_with_a_warning(peers: dict[str, str],
                                                                     tiny_checkpoint: str) -> None:
    result = ok(invoke(*evaluate_args(tiny_checkpoint, peers, "--compare", tiny_checkpoint, "--format", "json")))
    assert f"warning: --compare {tiny_checkpoint} is the checkpoint being evaluated" in result.stderr
    doc = json.loads(result.stdout)
    (row,) = doc["compared"]
    assert row["accuracy"] == doc["points"][0]["accuracy"] and row["cost"] == 1.0
    assert row["checkpoint_sha256"] == sha256(tiny_checkpoint)


def test_compared_networks_beside_early_exits(peers: dict[str, str], workdir: Path) -> None:
    """With operating points: the compared rows come after them, and the points are as without --compare."""
    ok(invoke("calibrate-means", "-c", "demo", "-d", "demo", "--split", "train", "--indices", peers["indices"],
              "-o", "means.safetensors", "--no-progress", "-q"))
    ok(invoke("fit-thresholds", "--means", "means.safetensors", "--budget", "0.5", "-o", "t.yaml", "-q"))
    args = evaluate_args("demo", peers, "--means", "means.safetensors", "--thresholds", "t.yaml", "--format", "json")
    doc = json.loads(ok(invoke(*args, "--compare", peers["resnet8-w4"])).stdout)
    alone = json.loads(ok(invoke(*args)).stdout)
    assert [p["name"] for p in doc["points"]] == ["plain", "0: budget 0.5"]
    for with_compare, without in zip(doc["points"], alone["points"], strict=True):
        assert with_compare["accuracy"] == without["accuracy"] and with_compare["cost"] == without["cost"]
    (row,) = doc["compared"]
    assert row["cost"] == pytest.approx(count_macs(load_checkpoint(peers["resnet8-w4"]).model, (1, 28, 28))
                                        / doc["points"][0]["macs"], rel=1e-5)
    assert row["accuracy"] == pytest.approx(direct_accuracy(peers["resnet8-w4"], SAMPLES), abs=1 / SAMPLES)
