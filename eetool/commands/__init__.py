"""Subcommands, one thin module each: options in, a library call, data out.

The registry maps a command name to its module; ``load_command`` imports the module, which
must not import torch at import time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

# name -> module under eetool.commands; the module defines a function called ``command``.
COMMANDS: dict[str, str] = {
    "inspect": "inspect",
    "import": "import_weights",
    "evaluate": "evaluate",
    "predict": "predict",
    "export": "export",
    "calibrate-means": "calibrate_means",
    "fit-thresholds": "fit_thresholds",
    "train": "train",
    "train-exits": "train_exits",
    "prune-dataset": "prune_dataset",
    "prune-weights": "prune_weights",
    "init-exit-head": "init_exit_head",
    "evaluate-lm": "evaluate_lm",
    "train-exit-head": "train_exit_head",
    "archs": "archs",
    "env": "env",
}


def load_command(name: str) -> Callable[..., Any]:
    module = importlib.import_module(f"eetool.commands.{COMMANDS[name]}")
    func: Callable[..., Any] = module.command
    return func
