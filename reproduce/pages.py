"""Results pages: each reproduction writes its docs/results/<experiment>.md from a template under reproduce/pages/.

A template is the page's fixed prose with ``{{ name }}`` where a generated part (a table, a figure's caption line, a
figure from the run) goes; ``write_page`` fills every mark and refuses a template whose marks and parts differ, so a
page is never written half generated.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "pages"
PAGES = Path(__file__).resolve().parents[1] / "docs" / "results"
MARK = re.compile(r"\{\{ *([a-z_]+) *\}\}")


def render(template: str, parts: dict[str, str]) -> str:
    """The template with every ``{{ name }}`` replaced by ``parts[name]``; every part must be used exactly so."""
    marks = set(MARK.findall(template))
    if marks != set(parts):
        raise ValueError(f"template marks {sorted(marks)} and generated parts {sorted(parts)} differ")
    return MARK.sub(lambda m: parts[m.group(1)], template)


def write_page(name: str, parts: dict[str, str], page: Path | None = None) -> Path:
    """Fill reproduce/pages/NAME.md and write it (atomically) to ``page``, by default docs/results/NAME.md."""
    text = render((TEMPLATES / f"{name}.md").read_text(encoding="utf-8"), parts)
    page = page or PAGES / f"{name}.md"
    temporary = page.with_name(f".{page.name}.tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, page)
    return page
