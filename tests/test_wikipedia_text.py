"""bench/wikipedia_text.py: MediaWiki markup of gensim's Wikipedia extract becomes prose for `--text`."""

from __future__ import annotations

import bz2
import importlib.util
from pathlib import Path
from types import ModuleType


def _module() -> ModuleType:
    path = Path(__file__).parent.parent / "bench" / "wikipedia_text.py"
    spec = importlib.util.spec_from_file_location("wikipedia_text", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


MARKUP = """{{Infobox person|name=Ada {{nowrap|Lovelace}}}}
'''Ada Lovelace''' was an [[England|English]] [[mathematician]].<ref name="x">Source {{cite|a}}</ref>
[[File:Ada.jpg|thumb|A portrait of [[Ada Lovelace|Ada]]]]
== Early life ==
<!-- a comment -->
{| class="wikitable"
| cell || {{flag|UK}}
|}
* She wrote the first [http://example.org published] algorithm &amp; more.
[[Category:Mathematicians]]
"""


def test_markup_becomes_prose() -> None:
    text = _module().plain_text(MARKUP)
    assert text == ("Ada Lovelace was an English mathematician.\n\nEarly life\n\n"
                    "She wrote the first published algorithm & more.\n")


def test_only_articles_are_kept() -> None:
    ns = "http://www.mediawiki.org/xml/export-0.10/"
    page = "<page><title>{t}</title><ns>{n}</ns>{r}<revision><text>{x}</text></revision></page>"
    xml = (f'<mediawiki xmlns="{ns}">'
           + page.format(t="Prose", n=0, r="", x="Words.")
           + page.format(t="Gone", n=0, r='<redirect title="Prose"/>', x="#REDIRECT [[Prose]]")
           + page.format(t="Talk:Prose", n=1, r="", x="Talk.")
           + "</mediawiki>")
    assert list(_module().pages(bz2.compress(xml.encode()))) == [("Prose", "Words.")]
