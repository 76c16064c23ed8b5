"""README.md, docs/ and CHANGELOG.md stay in step with the code: commands, options, exit codes, changelog."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import typer

from eetool.cli import app
from eetool.commands import COMMANDS
from eetool.core.errors import ExitCode

ROOT = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)


def _read(name: str) -> str:
    path = ROOT / name
    assert path.is_file(), f"{name} is missing"
    return path.read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def readme() -> str:
    return _read("README.md")


def _invocations(block: str) -> list[list[str]]:
    """The `eetool ...` command lines of a fenced block, continuations joined, as argument lists."""
    joined = re.sub(r"\\\n", " ", block)
    found = []
    for line in joined.splitlines():
        line = re.sub(r"^\s*\$\s+", "", line).strip()
        for segment in re.split(r"\s(?:\||&&|;|>|2>)\s", line):
            if not segment.startswith("eetool"):
                continue
            try:
                words = shlex.split(segment, comments=True)
            except ValueError:
                words = segment.split()
            if words and words[0] == "eetool":
                found.append(words[1:])
    return found


def test_readme_lists_every_command(readme: str) -> None:
    lines = readme.splitlines()
    missing = [name for name in COMMANDS if not any(line.startswith(f"| `{name}`") for line in lines)]
    assert not missing, f"README.md's table of subcommands lacks rows starting with | `NAME` for: {missing}"


def test_failures_page_lists_every_exit_code() -> None:
    lines = _read("docs/failures.md").splitlines()
    missing = [f"{code.value} {code.name}" for code in ExitCode
               if not any(f"| {code.value} |" in line and code.name.lower() in line.lower() for line in lines)]
    assert not missing, f"docs/failures.md's exit code table lacks rows like '| 3 | `BAD_INPUT` | ...' for: {missing}"


def test_commands_page_lists_every_command() -> None:
    lines = _read("docs/commands.md").splitlines()
    missing = [name for name in COMMANDS if not any(line.startswith(f"| `{name}`") for line in lines)]
    assert not missing, f"docs/commands.md's table of subcommands lacks rows starting with | `NAME` for: {missing}"


def test_readme_quickstart_runs_real_commands(readme: str) -> None:
    sections = re.split(r"^#+ ", readme, flags=re.M)
    quickstart = [s for s in sections if re.match(r"quick[ -]?start", s, re.I)]
    assert quickstart, "README.md has no Quickstart section"
    blocks = FENCE.findall(quickstart[0])
    assert any(_invocations(b) for b in blocks), "README.md's Quickstart has no fenced block with an eetool command"


PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").rglob("*.md") if p.name != "cli.md")]


@pytest.mark.parametrize("page", PAGES)
def test_pages_use_real_subcommands_and_options(page: str) -> None:
    """Every `eetool ...` line in a fenced block of README.md and docs/ (the generated docs/cli.md aside)."""
    text = _read(page)
    group = typer.main.get_command(app)
    subcommands = group.commands  # type: ignore[attr-defined]
    root_opts = {opt for p in group.params for opt in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
    problems = []
    for block in FENCE.findall(text):
        for args in _invocations(block):
            if not args or args[0].startswith("-"):
                problems += [f"eetool {a}" for a in args if a.startswith("-") and a.split("=")[0] not in root_opts]
                continue
            sub = subcommands.get(args[0])
            if sub is None:
                problems.append(f"eetool {args[0]}: no such command")
                continue
            opts = {opt for p in sub.params for opt in (*p.opts, *p.secondary_opts)} | {"-h", "--help"}
            problems += [f"eetool {args[0]} {a}: no such option" for a in args[1:]
                         if a.startswith("-") and a != "-" and not re.fullmatch(r"-\d.*", a)
                         and a.split("=")[0] not in opts]
    assert not problems, f"{page} shows commands the CLI does not have: {problems}"


def test_changelog_keeps_a_changelog() -> None:
    text = _read("CHANGELOG.md")
    assert "## [Unreleased]" in text, "CHANGELOG.md needs a '## [Unreleased]' section"
    assert "keepachangelog.com" in text, "CHANGELOG.md should link to https://keepachangelog.com/"
