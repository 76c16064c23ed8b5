"""Helpers the command modules share: turning flags into library objects (imports torch lazily)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from eetool.checkpoint import Checkpoint
    from eetool.options import Run


def open_checkpoint(run: Run, checkpoint: str) -> Checkpoint:
    """The --checkpoint, built with the command's foreign-checkpoint options where the file does not record them."""
    from eetool.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint, run.model_options)


def data_path(spec: str) -> str | None:
    """The file or folder a ``--data NAME[:PATH]`` spec reads, so that no output replaces it."""
    from eetool.sources import SOURCES

    name, sep, path = spec.partition(":")
    if name in SOURCES:
        return (path or None) if sep else None
    return spec


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


def exit_rule(ckpt: Checkpoint, method: str, combine: str, means: str | None, cm: Any, means_prov: Any,
              exit_heads: str | None, heads: Any, heads_prov: Any, device: Any) -> tuple[Any, Any]:
    """The exit model and the (unthresholded) rule of a method, after checking that the class means and
    exit heads were made for this checkpoint and for the same exits."""
    from eetool.artifacts import sha256_file, verify
    from eetool.exits import build_exit_model
    from eetool.rules import HeadsRule, MeansRule

    exits = list(heads.spec.exits) if heads is not None else list(cm.exits)
    if means:
        verify(means, means_prov, checkpoint=ckpt.identity, exits=exits)
    if exit_heads:
        verify(exit_heads, heads_prov, checkpoint=ckpt.identity)
        if heads.spec.with_distances and means:
            verify(exit_heads, heads_prov, inputs={"class-means": sha256_file(means)})
    em = build_exit_model(ckpt.model.to(device), ",".join(exits))
    if method == "e2cm":
        return em, MeansRule(cm, device)
    return em, HeadsRule(heads, method, cm, combine, device)


def load_data(run: Run, data: str, split: str, indices: str | None = None, spec: Any = None) -> Any:
    """``--data`` for the model of ``spec`` (its recipe for folder images), held or streamed as the data
    options say; without a spec, folder images keep the first image's size (or --crop's)."""
    from eetool.datasets import load_dataset
    from eetool.loading import Geometry, default_resize

    opts = run.data_options
    if spec is not None:
        geometry = opts.geometry(spec.arch, (spec.input_shape[1], spec.input_shape[2]), spec.resize)
    elif opts.crop is not None:
        geometry = Geometry(opts.resize or default_resize(run.model_options.arch or "", opts.crop), opts.crop)
    else:
        geometry = None
    return load_dataset(data, split, indices, opts, geometry)


def local_share(run: Run, ds: Any, batch_size: int) -> tuple[Any, Callable[[Any], Any]]:
    """Under torchrun: this rank's whole batches of ``ds`` (as a dataset), and a function that puts every rank's
    per-sample rows back in the order of ``ds``. One process: ``ds`` and the identity."""
    from eetool.distributed import gather_rows, shard_positions

    world = run.world
    if not world.distributed:
        return ds, lambda rows: rows
    positions = shard_positions(len(ds), batch_size, world)
    return ds.subset(positions), lambda rows: gather_rows(rows, positions, len(ds), world)
