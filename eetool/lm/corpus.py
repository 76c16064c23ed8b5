"""Plain text as contexts of C tokens (the thesis's C = 128), tokenised with the model's tokenizer."""

from __future__ import annotations

import codecs
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eetool.core.artifacts import require_file
from eetool.core.errors import InputError

if TYPE_CHECKING:
    import torch

CONTEXT = 128
TEXT_HINT = "give UTF-8 plain-text files, or folders of *.txt files"


@dataclass
class TextCorpus:
    contexts: torch.Tensor  # N x C token ids (int64); each file is cut on its own, its remainder dropped
    files: list[str]
    fingerprint: str  # "text:<files>:<sha256 of the names and bytes, first 16>" : names the corpus in provenance

    @property
    def tokens(self) -> int:
        return int(self.contexts.numel())


def text_files(paths: list[str]) -> list[Path]:
    """The files named, with every *.txt under a named folder (sorted), in the order given."""
    if not paths:
        raise InputError("no text was given", f"pass --text FILE_OR_FOLDER; {TEXT_HINT}")
    files: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            found = sorted(f for f in p.rglob("*.txt") if f.is_file())
            if not found:
                raise InputError(f"folder {raw} holds no *.txt file", TEXT_HINT)
            files.extend(found)
        else:
            files.append(require_file(p, "text"))
    return files


# Text is read in pieces of this many bytes, so that a file larger than memory is hashed without holding it.
READ_CHUNK = 1 << 20
# Tokens past the ones a run keeps that the tokenised prefix must reach: pre-tokenisers look a little ahead,
# so only tokens well before the cut are those of the whole text.
TOKEN_SLACK = 64


def text_chunks(path: Path) -> Iterator[str]:
    """The file's text in pieces, checked as UTF-8 without NUL bytes (a leading BOM dropped)."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    try:
        with open(path, "rb") as f:
            while True:
                data = f.read(READ_CHUNK)
                try:
                    piece = decoder.decode(data, final=not data)
                except UnicodeDecodeError:
                    raise InputError(f"{path} is not UTF-8 text", TEXT_HINT) from None
                if "\x00" in piece:
                    raise InputError(f"{path} is not plain text (it holds NUL bytes)", TEXT_HINT)
                if piece:
                    yield piece
                if not data:
                    return
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None


def _file_tokens(path: Path, tokenizer: Any, digest: Any, needed: int | None) -> list[int]:
    """The token ids of a file (at least ``needed`` of them where the file has that many, not all), and its
    part of the corpus digest (name, length in characters, whole text), read in pieces."""
    length = sum(len(piece) for piece in text_chunks(path))
    digest.update(f"{path.name}\n{length}\n".encode())
    kept: list[str] = []
    kept_chars = 0
    ids: list[int] | None = None
    # Enough characters for ``needed`` tokens at a generous 4 per token, doubled until the prefix gives them.
    want = None if needed is None else 4 * (needed + TOKEN_SLACK) + 4096
    for piece in text_chunks(path):
        digest.update(piece.encode())
        if ids is not None:
            continue
        kept.append(piece)
        kept_chars += len(piece)
        while want is not None and ids is None and kept_chars >= want:
            text = "".join(kept)
            cut = text.rfind("\n", 0, want) + 1 or want  # a line end, where there is one
            prefix = _tokenize(tokenizer, text[:cut])
            if len(prefix) >= needed + TOKEN_SLACK:  # type: ignore[operator]
                ids = prefix[:needed]
            else:
                want *= 2
    return ids if ids is not None else _tokenize(tokenizer, "".join(kept))


def _tokenize(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []


def load_corpus(paths: list[str], tokenizer: Any, *, context: int = CONTEXT, max_tokens: int | None = None
                ) -> TextCorpus:
    """Tokenise the files in order and cut each into contexts of ``context`` tokens, up to ``max_tokens``."""
    import torch

    files = text_files(paths)
    digest = hashlib.sha256()
    pieces: list[torch.Tensor] = []
    total = 0
    used: list[str] = []
    for path in files:
        if max_tokens is not None and total >= max_tokens:
            break
        # The whole contexts still wanted: at most this many tokens of the file are tokenised.
        wanted = None if max_tokens is None else (max_tokens - total + context - 1) // context
        ids = _file_tokens(path, tokenizer, digest, None if wanted is None else wanted * context)
        used.append(str(path))
        whole = len(ids) // context
        if wanted is not None:
            whole = min(whole, wanted)
        if whole:
            pieces.append(torch.tensor(ids[: whole * context], dtype=torch.int64).view(whole, context))
            total += whole * context
    if not pieces:
        raise InputError(f"the text ({', '.join(p.name for p in files[:3])}{', ...' if len(files) > 3 else ''}) "
                         f"has fewer than {context} tokens", f"give more text; {TEXT_HINT}")
    return TextCorpus(torch.cat(pieces), used, f"text:{len(used)}:{digest.hexdigest()[:16]}")


# Held out of the statistics for --n0 auto: every HOLDOUT_EVERY-th context, at most HOLDOUT_MAX of them.
HOLDOUT_EVERY = 10
HOLDOUT_MAX = 64


def split_held_out(contexts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, held out): every HOLDOUT_EVERY-th context is held out, at most HOLDOUT_MAX, and at least one."""
    import torch

    if len(contexts) < 2:
        raise InputError(f"--n0 auto needs at least 2 contexts of {contexts.shape[1]} tokens, the text has "
                         f"{len(contexts)}", "give more text, or a fixed --n0 such as 0.25")
    index = torch.arange(len(contexts))
    held = (index % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) & (index < HOLDOUT_EVERY * HOLDOUT_MAX)
    if not held.any():
        held[-1] = True
    return contexts[~held], contexts[held]
