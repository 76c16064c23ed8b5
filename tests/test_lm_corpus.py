"""Text is read in pieces and tokenised only as far as --max-tokens needs, with the same tokens and the same
fingerprint as a whole-text pass."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.lm_helpers import DATA

pytest.importorskip("transformers")

from eetool.core.errors import InputError  # noqa: E402
from eetool.lm import corpus  # noqa: E402
from eetool.lm.corpus import load_corpus  # noqa: E402


class Recording:
    """A tokenizer that remembers how many characters it was given each time."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


@pytest.fixture(scope="module")
def long_text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # About 870 KB: Hamlet's first act a hundred times, with a BOM and a line without an end.
    path = tmp_path_factory.mktemp("text") / "long.txt"
    path.write_bytes("\ufeff".encode() + ((DATA / "hamlet-act1.txt").read_text() * 100 + "no line end").encode())
    return path


@pytest.mark.parametrize("max_tokens", [32, 1000, 3000, 20_000])
def test_max_tokens_tokenises_a_prefix_with_the_whole_texts_tokens(tiny_lm: Any, long_text: Path,
                                                                   monkeypatch: pytest.MonkeyPatch,
                                                                   max_tokens: int) -> None:
    monkeypatch.setattr(corpus, "READ_CHUNK", 4096)  # many pieces, so that cuts fall inside the text
    whole = load_corpus([str(long_text)], tiny_lm.tokenizer, context=32)
    recording = Recording(tiny_lm.tokenizer)
    limited = load_corpus([str(long_text)], recording, context=32, max_tokens=max_tokens)
    wanted = -(-max_tokens // 32)
    assert torch.equal(limited.contexts, whole.contexts[:wanted])
    assert limited.fingerprint == whole.fingerprint  # the digest still covers the whole file
    text_chars = len(long_text.read_text(encoding="utf-8-sig"))
    # Tokenised: prefixes of a few characters per token kept, never the whole file.
    assert max(recording.lengths) < min(text_chars, 4 * 8 * (max_tokens + corpus.TOKEN_SLACK) + 4 * 4096)


def test_a_bad_byte_far_into_a_file_is_still_refused(tiny_lm: Any, long_text: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_bytes(long_text.read_bytes() + b"\xff")
    with pytest.raises(InputError, match="not UTF-8"):
        load_corpus([str(bad)], tiny_lm.tokenizer, context=32, max_tokens=64)
    nul = tmp_path / "nul.txt"
    nul.write_bytes(long_text.read_bytes() + b"\x00")
    with pytest.raises(InputError, match="NUL"):
        load_corpus([str(nul)], tiny_lm.tokenizer, context=32, max_tokens=64)
