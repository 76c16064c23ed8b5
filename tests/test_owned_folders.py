"""eetool replaces or removes only folders it wrote, and never one that holds or lies inside an input."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from cli_helpers import invoke, ok, one_error_line
from lm_helpers import DATA, make_tiny_lm

from eetool.core.errors import ExitCode, OutputError
from eetool.core.owned_folders import (
    MARKER,
    check_folder_output,
    fresh_state_folder,
    is_owned,
    make_owned_folder,
    publish_folder,
    remove_owned_folder,
    remove_state_folder,
)


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_made_folder_is_owned_and_a_user_folder_is_not(tmp_path: Path) -> None:
    mine = make_owned_folder(tmp_path / "mine", "test")
    assert is_owned(mine) and (mine / MARKER).is_file()
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    assert not is_owned(theirs)
    (theirs / MARKER).write_text("something else\n")  # a file of that name that eetool did not write
    assert not is_owned(theirs)
    link = tmp_path / "link"
    link.symlink_to(mine)
    assert not is_owned(link)  # a link is never eetool's folder, even to one


def test_remove_leaves_a_user_folder_alone(tmp_path: Path) -> None:
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    (theirs / "notes.txt").write_text("mine")
    assert not remove_owned_folder(theirs)
    warnings: list[str] = []
    remove_state_folder(theirs, warnings.append)
    assert (theirs / "notes.txt").read_text() == "mine" and "remove it yourself" in warnings[0]
    with pytest.raises(OutputError, match="not written by eetool"):
        fresh_state_folder(theirs, "test")
    mine = make_owned_folder(tmp_path / "mine", "test")
    assert remove_owned_folder(mine) and not mine.exists()


@pytest.mark.parametrize(("target", "says"), [
    ("work", "holds the input"),  # the folder that holds the model and the text
    ("work/model", "is the input"),
    ("work/model/sub", "lies inside the input"),
    (".", "holds the input"),
    ("out", "holds the output"),
])
def test_a_folder_output_never_overlaps_the_runs_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                       target: str, says: str) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "work" / "model").mkdir(parents=True)
    (tmp_path / "work" / "text.txt").write_text("text")
    (tmp_path / "out").mkdir()
    with pytest.raises(OutputError, match=says):
        check_folder_output(target, flag="--model-output", force=True, inputs=("work/model", "work/text.txt", None),
                            outputs=("out/head.safetensors",))


def test_a_folder_output_is_replaced_only_when_eetool_wrote_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                                ) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "theirs").mkdir()
    with pytest.raises(OutputError, match="already exists"):
        check_folder_output("theirs", flag="-o", force=False)
    with pytest.raises(OutputError, match="not written by eetool"):
        check_folder_output("theirs", flag="-o", force=True)
    make_owned_folder(tmp_path / "mine", "test")
    check_folder_output("mine", flag="-o", force=True)
    check_folder_output("new", flag="-o", force=False)
    with pytest.raises(OutputError, match="is or holds the current folder"):
        check_folder_output(str(tmp_path), flag="-o", force=True)
    with pytest.raises(OutputError, match="does not exist"):
        check_folder_output("missing/new", flag="-o", force=False)


def test_publish_replaces_its_own_folder_and_refuses_a_users(tmp_path: Path) -> None:
    first = tmp_path / ".tmp1"
    first.mkdir()
    (first / "a.txt").write_text("1")
    publish_folder(first, tmp_path / "model", "test")
    second = tmp_path / ".tmp2"
    second.mkdir()
    (second / "a.txt").write_text("2")
    publish_folder(second, tmp_path / "model", "test")
    assert (tmp_path / "model" / "a.txt").read_text() == "2" and is_owned(tmp_path / "model")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # nothing left beside it
    third = tmp_path / ".tmp3"
    third.mkdir()
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("mine")
    with pytest.raises(OutputError, match="not written by eetool"):
        publish_folder(third, tmp_path / "theirs", "test")
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "mine"


@pytest.fixture(scope="module")
def lm_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("lm") / "tiny-lm")


def test_train_exit_head_model_output_dot_deletes_nothing(lm_folder: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # The reported case: run in a folder that holds the model, the head and the text, --model-output . --force.
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(lm_folder, work / "tiny-lm")
    shutil.copy(DATA / "hamlet-act1.txt", work / "hamlet.txt")
    (work / "unrelated.txt").write_text("keep me\n")
    monkeypatch.chdir(work)
    ok(invoke("init-exit-head", "-m", "tiny-lm", "-t", "hamlet.txt", "--context", "32", "-o", "head.safetensors",
              "-q"))
    before = tree(work)
    line = one_error_line(invoke("train-exit-head", "-m", "tiny-lm", "--head", "head.safetensors", "-t", "hamlet.txt",
                                 "--context", "32", "--steps", "1", "--no-freeze", "--model-output", ".", "--force",
                                 "-o", "trained.safetensors"), ExitCode.OUTPUT)
    assert "holds the input" in line
    assert tree(work) == before


def test_train_exit_head_replaces_its_own_model_folder_with_force(lm_folder: Path, tmp_path: Path) -> None:
    head, model_out = tmp_path / "head.safetensors", tmp_path / "model"
    ok(invoke("init-exit-head", "-m", lm_folder, "-t", DATA / "hamlet-act1.txt", "--context", "32", "-o", head, "-q"))
    train = ["train-exit-head", "-m", lm_folder, "--head", head, "-t", DATA / "hamlet-act1.txt", "--context", "32",
             "--steps", "1", "--no-freeze", "--model-output", model_out, "-q"]
    ok(invoke(*train, "-o", tmp_path / "a.safetensors"))
    assert is_owned(model_out) and (model_out / "config.json").is_file()
    ok(invoke(*train, "-o", tmp_path / "b.safetensors", "--force"))
    assert is_owned(model_out) and (model_out / "config.json").is_file()
    # The trained folder is a model eetool reads back.
    ok(invoke("evaluate-lm", "-m", model_out, "-t", DATA / "hamlet-act1.txt", "--context", "32", "--max-tokens",
              "256", "--head", tmp_path / "b.safetensors", "-q"))


def test_a_failed_model_folder_write_leaves_no_folder_and_no_temp(lm_folder: Path, tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import errno

    from transformers import PreTrainedModel

    def full_disk(self: object, folder: str, **kwargs: object) -> None:
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise OSError(errno.EFBIG, "File too large")

    head = tmp_path / "head.safetensors"
    ok(invoke("init-exit-head", "-m", lm_folder, "-t", DATA / "hamlet-act1.txt", "--context", "32", "-o", head, "-q"))
    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full_disk)
    line = one_error_line(invoke("train-exit-head", "-m", lm_folder, "--head", head, "-t", DATA / "hamlet-act1.txt",
                                 "--context", "32", "--steps", "1", "--no-freeze", "--model-output",
                                 tmp_path / "model", "-o", tmp_path / "trained.safetensors", "-q"), ExitCode.OUTPUT)
    assert "cannot write the model folder" in line and "File too large" in line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["head.safetensors", "trained.safetensors.resume.pt"]
