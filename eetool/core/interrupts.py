"""Ctrl-C, SIGTERM and SIGHUP end a run the same way, and never in the middle of a rename.

``interrupts_raise()`` (the CLI wraps every command in it) makes the three signals raise
``Interrupted``, a ``KeyboardInterrupt``, so that one code path cleans up after all of them.
``deferred()`` marks a critical section (creating a temp file and remembering its name, the
final renames of an atomic write): a signal that arrives inside it is held and raised when the
section ends, so the cleanup always knows which temp files exist and a rename is never cut off.
In eetool's own process (``own_process()``, entered by the CLI's ``main``) a run's outcome is settled once its
block ends: success, or the error or interruption it reports. The three signals are then ignored until the
process exits, so that none can turn a finished run (or its error's exit code) into a death by signal (129,
143) with no message, as Python's default handlers would once the old handlers were back.
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
    """Make SIGINT, SIGTERM and SIGHUP raise ``Interrupted`` in this block, and restore the old handlers after;
    in eetool's own process (``own_process``) ignore them after instead, and drop one that came while that
    was being done: the run has ended, and what it reports (its exit code) is what the process ends with.

    Signal handlers belong to the main thread; elsewhere (a command run from a worker thread) nothing changes.
    """
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
