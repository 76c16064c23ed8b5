"""Helpers the CLI tests share: run a command, and check a success or a one-line error."""

from __future__ import annotations

import hashlib
from pathlib import Path

from typer.testing import CliRunner, Result

from eetool.cli import app

runner = CliRunner()


def invoke(*args: object) -> Result:
    return runner.invoke(app, [str(a) for a in args])


def ok(result: Result) -> Result:
    assert result.exit_code == 0, result.stderr
    return result


def one_error_line(result: Result, code: int) -> str:
    """The single stderr line of a refused command, which prints nothing on stdout."""
    assert result.exit_code == code, f"exit {result.exit_code}, expected {code}: {result.stderr}"
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ") and "(hint: " in lines[0], lines[0]
    assert result.stdout == ""
    return lines[0]


def sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()
