"""Every command block of README.md and docs/ is either run here on small inputs or marked as long with its time.

The markers and the rules are in tests/doc_examples.py. A page's runnable blocks run in order, with bash,
in one scratch folder; a block that fails fails its page's test with the block, its exit status and stderr.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.doc_examples import ROOT, Block, bad_markers, blocks, pages, unmarked_shell_blocks

PAGE_TIMEOUT_S = 1200
RUNNABLE = [p for p in pages() if any(b.kind == "run" for b in blocks(p))]
# `pip install ...` in a runnable block is the reader's install, which this environment already has
PIP_INSTALL = re.compile(r"^\s*pip install [^\n&]*(?:&&\s*|\n|$)", re.M)


def test_every_shell_block_is_marked() -> None:
    unmarked = [where for page in pages() for where in unmarked_shell_blocks(page)]
    assert not unmarked, ("shell blocks without <!-- doc-test: run|long TIME|not run REASON --> right above them: "
                          f"{unmarked}")


def test_markers_say_what_happens() -> None:
    problems = [problem for page in pages() for problem in bad_markers(page)]
    assert not problems, problems


def test_there_are_runnable_examples() -> None:
    assert len(RUNNABLE) >= 8, [str(p) for p in RUNNABLE]


def _fashion_mnist() -> bool:
    data_dir = os.environ.get("EETOOL_DATA_DIR")
    candidates = [Path(data_dir) / "fashion-mnist"] if data_dir else [Path("/usr/share/datasets/fashion-mnist")]
    return any(c.is_dir() for c in candidates)


def _scratch(folder: Path) -> dict[str, str]:
    """A folder that looks like the clone's root to the examples, and an environment whose eetool is this one."""
    for name in ("tests", "eetool", "bench"):
        (folder / name).symlink_to(ROOT / name)
    bindir = folder.parent / f"{folder.name}-bin"
    bindir.mkdir()
    wrapper = bindir / "eetool"
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m eetool "$@"\n')
    wrapper.chmod(0o755)
    return {**os.environ, "PATH": f"{bindir}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
            "EETOOL_LM_CACHE": str(folder / ".lm-cache")}


def _script(block: Block, tiny_lm: Path | None) -> str:
    body = PIP_INSTALL.sub("", block.body)
    if "demo-lm" in body:
        assert tiny_lm is not None
        body = re.sub(r"(?<![\w-])demo-lm(?![\w-])", str(tiny_lm), body)
    return body


@pytest.mark.docs  # about 20 CPU-minutes in all: `-m "not docs"` leaves them out locally; CI runs them
@pytest.mark.parametrize("page", RUNNABLE, ids=[str(p.relative_to(ROOT)) for p in RUNNABLE])
def test_page_examples_run(page: Path, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    runnable = [b for b in blocks(page) if b.kind == "run"]
    if any(b.needs == "fashion-mnist" for b in runnable) and not _fashion_mnist():
        runnable = [b for b in runnable if b.needs != "fashion-mnist"]
        if not runnable:
            pytest.skip("needs Debian's dataset-fashion-mnist")
    lm = None
    if any("demo-lm" in b.body for b in runnable):
        pytest.importorskip("transformers")
        lm = request.getfixturevalue("tiny_lm_folder")  # conftest: the tiny test LM of tests/lm_helpers.py
    work = tmp_path / "clone"
    work.mkdir()
    env = _scratch(work)
    started = time.monotonic()
    for block in runnable:
        left = PAGE_TIMEOUT_S - (time.monotonic() - started)
        proc = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", _script(block, lm)], cwd=work, env=env,
                              capture_output=True, text=True, timeout=max(left, 1))
        assert proc.returncode == 0, (f"{block.page}:{block.line} failed with exit {proc.returncode}\n"
                                      f"{block.body}\nstderr:\n{proc.stderr[-3000:]}")
