"""The Wikipedia extract in gensim's test data as plain-text files for `--text`, split by article.

    pip download --no-deps gensim -d wheels/
    python bench/wikipedia_text.py wheels/gensim-*.whl -o wikipedia/

The wheel (read as a zip; gensim is never installed or imported) holds
``gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2``: 206 pages of a
2017 English Wikipedia dump (about 6 MB of MediaWiki markup; CC BY-SA). The reader keeps the articles
(namespace 0, not redirects) and strips the markup with regular expressions: comments, references,
templates, tables, files and categories are dropped; links, bold and italics keep their text; headings
keep their title. It is rough (a template's text, infoboxes included, is lost; a stray brace may stay) but
leaves prose close to the thesis's WikiText-2, which was made from Wikipedia articles the same way.

Writes one UTF-8 file per article, every --every-th article (by position in the dump) under
``evaluation/`` and the others under ``calibration/``, and prints the counts as JSON.
"""

from __future__ import annotations

import argparse
import bz2
import html
import json
import re
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path
from xml.etree import ElementTree

MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
DROPPED_LINKS = ("file:", "image:", "category:", "wikipedia:", "wp:", "help:", "portal:", "template:")


def pages(dump: bytes) -> Iterator[tuple[str, str]]:
    """(title, wikitext) of each article (namespace 0, not a redirect) in a bz2 MediaWiki XML dump."""
    root = ElementTree.fromstring(bz2.decompress(dump))
    ns = root.tag[: root.tag.index("}") + 1] if root.tag.startswith("{") else ""
    for page in root.iter(f"{ns}page"):
        if page.findtext(f"{ns}ns") != "0" or page.find(f"{ns}redirect") is not None:
            continue
        text = page.findtext(f"{ns}revision/{ns}text") or ""
        if text.lstrip().upper().startswith("#REDIRECT"):
            continue
        yield page.findtext(f"{ns}title") or "", text


def _innermost(pattern: str, text: str, repl: str = "") -> str:
    """Remove (or replace) nested constructs innermost first, until none is left."""
    compiled = re.compile(pattern, re.DOTALL)
    while True:
        text, n = compiled.subn(repl, text)
        if not n:
            return text


def _link(match: re.Match[str]) -> str:
    target, _, label = match.group(1).partition("|")
    if target.strip().lower().startswith(DROPPED_LINKS):
        return ""
    return (label or target).split("|")[-1]


def plain_text(wikitext: str) -> str:
    """Prose from MediaWiki markup (see the module docstring for what is kept)."""
    text = re.sub(r"<!--.*?-->", "", wikitext, flags=re.DOTALL)
    text = re.sub(r"<ref[^>]*/>", "", text)
    text = re.sub(r"<ref[^>]*>.*?</ref>", "", text, flags=re.DOTALL)
    text = _innermost(r"\{\{[^{}]*\}\}", text)  # templates, infoboxes included
    text = _innermost(r"\{\|(?:(?!\{\|).)*?\|\}", text)  # tables
    text = _innermost(r"\[\[([^\[\]]*)\]\]", text, _link)  # type: ignore[arg-type]
    text = re.sub(r"\[https?://[^\s\]]+ ?([^\]]*)\]", r"\1", text)  # external links keep their label
    text = re.sub(r"<[^>]+>", "", text)  # other HTML tags (their content stays)
    text = html.unescape(text)
    text = re.sub(r"'{2,}", "", text)  # bold, italics
    lines = []
    for line in text.splitlines():
        line = line.strip()
        heading = re.fullmatch(r"(=+)\s*(.*?)\s*\1", line)
        if heading:
            line = heading.group(2)
        elif line.startswith(("|", "!", "{", "}")):
            continue  # remnants of tables and templates
        line = re.sub(r"^[*#:;]+\s*", "", line)
        lines.append(line)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip() + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="the gensim wheel (.whl), or the .bz2 dump itself")
    parser.add_argument("-o", "--output", required=True, help="folder for calibration/ and evaluation/")
    parser.add_argument("--every", type=int, default=5, help="every n-th article goes to evaluation/")
    parser.add_argument("--min-chars", type=int, default=500, help="articles with less prose are left out")
    args = parser.parse_args()
    source = Path(args.source)
    if source.suffix == ".whl":
        with zipfile.ZipFile(source) as wheel:
            dump = wheel.read(MEMBER)
    else:
        dump = source.read_bytes()
    out = Path(args.output)
    counts = {"calibration": 0, "evaluation": 0}
    chars = dict.fromkeys(counts, 0)
    kept = 0
    for title, wikitext in pages(dump):
        prose = plain_text(wikitext)
        if len(prose) < args.min_chars:
            continue
        split = "evaluation" if kept % args.every == args.every - 1 else "calibration"
        kept += 1
        folder = out / split
        folder.mkdir(parents=True, exist_ok=True)
        name = re.sub(r"[^A-Za-z0-9]+", "_", title).strip("_")[:60]
        (folder / f"{kept:03d}_{name}.txt").write_text(prose, encoding="utf-8")
        counts[split] += 1
        chars[split] += len(prose)
    print(json.dumps({"articles": counts, "characters": chars}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
