"""An interrupt names the resume state only once some was saved: a hint to --resume from a file that was never
written would end in 'no resumable state'."""

from __future__ import annotations

from pathlib import Path

import pytest

import eetool.core.training_loop as training_module
from eetool.core.errors import ExitCode
from eetool.core.options import state_saved
from eetool.core.owned_folders import make_owned_folder
from tests.cli_helpers import invoke


def test_state_saved_needs_a_file_or_a_folder_with_more_than_the_marker(tmp_path: Path) -> None:
    assert not state_saved("")
    assert not state_saved(str(tmp_path / "none.pt"))
    folder = make_owned_folder(tmp_path / "state", "test")
    assert not state_saved(str(folder))
    (folder / "state.pt").write_bytes(b"x")
    assert state_saved(str(folder))
    (tmp_path / "file.pt").write_bytes(b"x")
    assert state_saved(str(tmp_path / "file.pt"))


@pytest.mark.parametrize("saved", [False, True], ids=["before-any-state", "after-the-first-state"])
def test_the_resume_hint_only_once_state_exists(saved: bool, tiny_data: str, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    save_state = training_module._save_state

    def interrupt(*args: object, **kwargs: object) -> None:
        if saved:
            save_state(*args, **kwargs)  # type: ignore[arg-type]
        raise KeyboardInterrupt

    monkeypatch.setattr(training_module, "_save_state", interrupt)
    out = tmp_path / "model.safetensors"
    result = invoke("train", "-d", tiny_data, "-o", out, "--arch-args", "{width: 4}", "--epochs", "2", "-q")
    assert result.exit_code == ExitCode.INTERRUPTED
    line = result.stderr.strip()
    assert line.startswith("interrupted: no output was written")
    assert ("rerun with --resume" in line) is saved
    assert Path(f"{out}.resume.pt").exists() is saved
