"""docs/cli.md is current, and the documentation site builds in strict mode (broken links and anchors fail)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

from eetool.cli_reference import generate

ROOT = Path(__file__).resolve().parents[1]


def test_cli_reference_is_current() -> None:
    page = ROOT / "docs" / "cli.md"
    assert page.is_file() and page.read_text(encoding="utf-8") == generate(), (
        "docs/cli.md is stale: run `make docs-reference` and commit the result")


def test_cli_reference_has_every_command() -> None:
    import typer

    from eetool.cli import app

    text = generate()
    names = typer.main.get_command(app).commands  # type: ignore[attr-defined]
    assert names
    missing = [name for name in names if f"## eetool {name}\n" not in text or f"Usage: eetool {name} " not in text]
    assert not missing, missing


def test_cli_reference_does_not_import_torch() -> None:
    code = ("import sys\nfrom eetool.cli_reference import generate\ngenerate()\n"
            "print(','.join(sorted(m for m in sys.modules if m.split('.')[0] == 'torch')))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


@pytest.mark.skipif(importlib.util.find_spec("mkdocs") is None or importlib.util.find_spec("material") is None,
                    reason="needs mkdocs and mkdocs-material (pip install -e '.[docs]')")
def test_site_builds_strictly(tmp_path: Path) -> None:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "site" / "e2cm" / "index.html").is_file()
