"""Registries of named things (architectures, data sources, exit methods) in the style of timm's register_model:
each entry holds what the CLI needs without torch and where its implementation lives (``package.module:attr``),
imported only when used, so the core never imports a task package.

How: docs/development.md#adding-an-exit-method
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

CLASSIFICATION, SEGMENTATION, LANGUAGE = "classification", "segmentation", "lm"


Implementation = TypeVar("Implementation")


@dataclass(frozen=True)
class Entry(Generic[Implementation]):
    """One registered name: its task, help, where its implementation lives, and facts the CLI reads (``info``)."""

    name: str
    target: str  # package.module:attribute
    task: str = CLASSIFICATION
    help: str = ""
    info: dict[str, Any] = field(default_factory=dict)

    def load(self) -> Implementation:
        """The implementation, imported now."""
        module, _, attribute = self.target.partition(":")
        implementation: Implementation = getattr(importlib.import_module(module), attribute)
        return implementation


class Registry(Generic[Implementation]):
    """Entries by name, in the order they were registered (the order help texts and listings show)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Entry[Implementation]] = {}

    def register(self, name: str, target: str, *, task: str = CLASSIFICATION, help: str = "",
                 **info: object) -> Entry[Implementation]:
        if name in self._entries:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        if ":" not in target:
            raise ValueError(f"{self.kind} {name!r}: the target {target!r} is not package.module:attribute")
        entry: Entry[Implementation] = Entry(name, target, task, help, dict(info))
        self._entries[name] = entry
        return entry

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[Entry[Implementation]]:
        return iter(self._entries.values())

    def get(self, name: str) -> Entry[Implementation]:
        return self._entries[name]

    def names(self, task: str | None = None, **info: object) -> tuple[str, ...]:
        """The names of one task (or all), optionally only those whose ``info`` has the given values."""
        return tuple(e.name for e in self._entries.values() if (task is None or e.task == task)
                     and all(e.info.get(k) == v for k, v in info.items()))
