"""Where messages go: data to stdout, everything else (progress, logs, warnings) to stderr.

Library functions take a ``Reporter``; the default one is silent, the CLI's writes to stderr
with rich and hides its bars when stderr is not a terminal or ``--no-progress``/``-q`` is given.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID


class Bar(Protocol):
    def advance(self, n: int = 1, **fields: object) -> None: ...


class _NullBar:
    def advance(self, n: int = 1, **fields: object) -> None:
        pass


class Reporter:
    """Silent by default: what the Python API uses unless it is handed the CLI's reporter."""

    def log(self, message: str) -> None:
        pass

    def debug(self, message: str) -> None:
        pass

    def warn(self, message: str) -> None:
        pass

    @contextmanager
    def bar(self, total: int, description: str) -> Iterator[Bar]:
        yield _NullBar()


class _RichBar:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self._progress, self._task = progress, task

    def advance(self, n: int = 1, **fields: object) -> None:
        status = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in fields.items())
        self._progress.update(self._task, advance=n, status=status)


class ConsoleReporter(Reporter):
    """The CLI's reporter: rich on stderr."""

    def __init__(self, *, quiet: bool = False, verbose: bool = False, progress: bool = True) -> None:
        from rich.console import Console

        # soft_wrap: a log line stays one line (grep-able) whatever the terminal width.
        self.console = Console(stderr=True, highlight=False, soft_wrap=True)
        self.quiet, self.verbose = quiet, verbose
        self.show_bars = progress and not quiet and sys.stderr.isatty()

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def debug(self, message: str) -> None:
        if self.verbose:
            self.console.print(message, markup=False, style="dim")

    def warn(self, message: str) -> None:
        if not self.quiet:  # -q: only data on stdout and errors on stderr
            self.console.print(f"warning: {message}", markup=False, style="yellow")

    @contextmanager
    def bar(self, total: int, description: str) -> Iterator[Bar]:
        if not self.show_bars:
            yield _NullBar()
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      TextColumn("{task.fields[status]}"), console=self.console, transient=True) as progress:
            yield _RichBar(progress, progress.add_task(description, total=total, status=""))


def format_table(headers: list[str], rows: list[list[object]]) -> str:
    """A plain aligned text table that reads well in a terminal and splits well with awk."""
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip()
             for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(v: object) -> str:
    if isinstance(v, float):
        # a million and more (a class-aware head's raw perplexity reaches 1e230) in 4 significant digits, not
        # hundreds of integer digits; inf and nan as they are
        return f"{v:.4g}" if abs(v) >= 1e6 else f"{v:.4f}"
    return "" if v is None else str(v)


def counted(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``: a count and its noun, plural unless the count is one."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"


def format_fields(pairs: list[tuple[str, object]]) -> str:
    width = max(len(k) for k, _ in pairs)
    return "\n".join(f"{k.ljust(width)}  {_cell(v)}" for k, v in pairs)
