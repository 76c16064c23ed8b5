"""The artifact module's guards: bounded YAML, provenance without holes, and outputs kept off the demo files."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from eetool.core import artifacts
from eetool.core.artifacts import (
    CheckpointIdentity,
    Provenance,
    check_output,
    dump_yaml,
    load_yaml,
    read_yaml_text,
    verify,
)
from eetool.core.errors import InputError, OutputError, ProvenanceError, UsageError
from eetool.core.sources import demo_path


def laughs(levels: int, width: int = 9) -> str:
    lines = [f"l0: &l0 [{', '.join(['lol'] * width)}]"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]" for i in range(1, levels)]
    return "\n".join(lines) + "\n"


def test_alias_expansion_is_bounded_but_small_anchors_load() -> None:
    with pytest.raises(InputError, match="aliases expand it past"):
        load_yaml(laughs(9), "laughs.yaml")  # 9^9 values
    with pytest.raises(UsageError, match="--arch-args is refused"):
        load_yaml(laughs(9), "--arch-args", UsageError)
    assert load_yaml(laughs(3, width=2), "small") == {"l0": ["lol"] * 2, "l1": [["lol"] * 2] * 2,
                                                      "l2": [[["lol"] * 2] * 2] * 2}
    shared = load_yaml("base: &b {lr: 0.1}\nrun: {<<: *b, epochs: 3}\n", "config")
    assert shared == {"base": {"lr": 0.1}, "run": {"lr": 0.1, "epochs": 3}}


def test_the_bound_counts_expanded_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "MAX_YAML_NODES", 13)
    four = "a: &a [1, 2, 3]\nb: [*a, *a]\n"  # 1 document + 2 keys + (1 + 3) list + (1 + 2 x 4) = 16 nodes
    with pytest.raises(InputError):
        load_yaml(four, "x")
    monkeypatch.setattr(artifacts, "MAX_YAML_NODES", 16)
    assert load_yaml(four, "x") == {"a": [1, 2, 3], "b": [[1, 2, 3], [1, 2, 3]]}


def test_a_value_that_holds_itself_and_deep_nesting_are_refused() -> None:
    with pytest.raises(InputError, match="holds it"):
        load_yaml("a: &a [1, *a]\n", "loop.yaml")
    with pytest.raises(InputError, match="nests too deep"):
        load_yaml("[" * 5000 + "]" * 5000, "deep.yaml")
    with pytest.raises(yaml.YAMLError):  # syntax errors are the caller's to word
        load_yaml("a: [1\n", "broken.yaml")


def test_artifacts_round_trip_through_the_bounded_loader() -> None:
    prov = Provenance(kind="thresholds", checkpoint_sha256="ab" * 32, exits=["e1"], dataset="d", args={"x": [1, 2]})
    result = {"points": [{"budget": 0.5, "thresholds": [0.25]}], "again": {"x": [1, 2]}}
    doc = load_yaml(dump_yaml(result, prov).decode(), "t.yaml")
    assert doc["points"] == result["points"] and doc["again"] == {"x": [1, 2]}
    assert Provenance.from_dict(doc["provenance"]) == prov


def test_yaml_files_are_read_no_further_than_the_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(artifacts, "MAX_YAML_BYTES", 64)
    (tmp_path / "small.yaml").write_text("a: 1\n")
    assert read_yaml_text(tmp_path / "small.yaml") == "a: 1\n"
    (tmp_path / "big.yaml").write_text("a: 1\n" * 20)
    with pytest.raises(InputError, match="larger than the 64 bytes"):
        read_yaml_text(tmp_path / "big.yaml")
    if Path("/dev/zero").exists():  # never ends: refused all the same
        with pytest.raises(InputError, match="larger than"):
            read_yaml_text("/dev/zero")


PROV = Provenance(kind="class-means", checkpoint_sha256="ab" * 32, exits=["e1", "e2"], dataset="d/test:1",
                  inputs={"exit-heads": "cd" * 32})


def test_verify_accepts_what_matches_and_what_it_is_not_asked() -> None:
    verify("m", PROV, checkpoint=CheckpointIdentity("ab" * 32), exits=["e1", "e2"], dataset="d/test:1",
           inputs={"exit-heads": "cd" * 32})
    verify("m", Provenance(kind="indices", dataset="d/test:1"), dataset="d/test:1")  # no checkpoint asked about


@pytest.mark.parametrize(("emptied", "asked", "says"), [
    ("checkpoint_sha256", {"checkpoint": CheckpointIdentity("ab" * 32)}, "records no checkpoint"),
    ("exits", {"exits": ["e1", "e2"]}, "records no exits"),
    ("dataset", {"dataset": "d/test:1"}, "records no dataset"),
    ("inputs", {"inputs": {"exit-heads": "cd" * 32}}, "records no exit-heads artifact"),
])
def test_verify_refuses_an_empty_field_it_is_asked_about(emptied: str, asked: dict[str, object], says: str) -> None:
    empty = {"checkpoint_sha256": "", "exits": [], "dataset": "", "inputs": {}}[emptied]
    hollow = Provenance(**{**vars(PROV), emptied: empty})
    with pytest.raises(ProvenanceError, match=says) as refused:
        verify("m.safetensors", hollow, **asked)  # type: ignore[arg-type]
    assert "eetool calibrate-means" in str(refused.value)


def test_no_output_lands_in_the_demo_folder(tmp_path: Path) -> None:
    for target in (demo_path("demo-data.safetensors"), demo_path("demo-resnet20-fashion-mnist.safetensors"),
                   demo_path("new.yaml")):
        with pytest.raises(OutputError, match="demo folder"):
            check_output(str(target), force=True)
    link = tmp_path / "data.safetensors"
    link.symlink_to(demo_path("demo-data.safetensors"))
    with pytest.raises(OutputError, match="demo folder"):
        check_output(str(link), force=True)
    check_output(str(tmp_path / "fine.yaml"), force=False)


def test_a_key_twice_is_refused_but_a_merged_key_may_be_overridden() -> None:
    assert load_yaml("base: &b {lr: 0.1}\nrun: {<<: *b, lr: 0.2}\n", "config")["run"] == {"lr": 0.2}
    with pytest.raises(InputError, match="the key 'lr' appears twice"):
        load_yaml("lr: 0.1\nepochs: 3\nlr: 0.2\n", "config")
