"""Plain text as contexts of C tokens (the thesis's C = 128), tokenised with the model's tokenizer."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

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
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"text {raw} does not exist", "check the path")
    return files


def read_text(path: Path) -> str:
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InputError(f"cannot read {path}: {e.strerror}", "check the path and its permissions") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise InputError(f"{path} is not UTF-8 text", TEXT_HINT) from None
    if "\x00" in text:
        raise InputError(f"{path} is not plain text (it holds NUL bytes)", TEXT_HINT)
    return text


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
        text = read_text(path)
        digest.update(f"{path.name}\n{len(text)}\n".encode())
        digest.update(text.encode())
        used.append(str(path))
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] if text.strip() else []
        whole = len(ids) // context
        if max_tokens is not None:
            whole = min(whole, (max_tokens - total + context - 1) // context)
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
