"""Ctrl-C, SIGTERM and SIGHUP end a run the same way, and never in the middle of a rename: ``interrupts_raise``
makes them raise ``Interrupted``, ``deferred`` holds them through a critical section, and ``own_process``
ignores them once a run's outcome is settled.

Method: docs/failures.md#how-interrupts-are-handled
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import FrameType

SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Interrupted(KeyboardInterrupt):
    """A run ended by a signal; ``signal_name`` says which (SIGINT for Ctrl-C)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(signal_name)
        self.signal_name = signal_name


_own_process = False  # the CLI's main: nothing after a run needs the old handlers back
_depth = 0  # nesting of deferred() sections (the main thread's; handlers run only there)
_held: int | None = None  # a signal that arrived inside a deferred() section


def _handler(signum: int, frame: FrameType | None) -> None:
    global _held
    if _depth:
        _held = signum
        return
    raise Interrupted(signal.Signals(signum).name)


@contextmanager
def deferred() -> Iterator[None]:
    """Hold interrupts (those ``interrupts_raise`` turned on) until the block ends; then raise one that came."""
    global _depth, _held
    _depth += 1
    try:
        yield
    except BaseException as e:
        _depth -= 1
        if not _depth and _held is not None:  # the signal wins over the error it may have caused
            signum, _held = _held, None
            raise Interrupted(signal.Signals(signum).name) from e
        raise
    _depth -= 1
    if not _depth and _held is not None:
        signum, _held = _held, None
        raise Interrupted(signal.Signals(signum).name)


@contextmanager
def own_process() -> Iterator[None]:
    """Mark this block as eetool's own process (the CLI's ``main``): a run ending in it settles the process's
    outcome, so ``interrupts_raise`` ignores the signals after the run instead of handing them back."""
    global _own_process
    _own_process = True
    try:
        yield
    finally:
        _own_process = False


@contextmanager
def interrupts_raise() -> Iterator[None]:
    """Make SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in this block; after it, restore the old handlers, or
    in eetool's own process ignore the signals (docs/failures.md#how-interrupts-are-handled). Off the main thread
    nothing changes."""
    global _held
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Callable[[int, FrameType | None], object] | int | None] = {}
    try:
        for signum in SIGNALS:
            previous[signum] = signal.signal(signum, _handler)
        yield
    finally:
        if _own_process:
            with deferred():
                for signum in previous:
                    signal.signal(signum, signal.SIG_IGN)  # SIG_IGN, unlike a handler, holds through shutdown
                _held = None
        else:
            with deferred():  # a signal now is raised once every old handler is back
                for signum, old in previous.items():
                    signal.signal(signum, old if old is not None else signal.SIG_DFL)
