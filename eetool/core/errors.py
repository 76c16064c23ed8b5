"""The one exception hierarchy of eetool and the exit codes it maps to.

Every error a user can cause is an ``EetoolError`` with a problem and a hint; the CLI
prints it as one line on stderr and exits with the error's documented code.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1  # a bug in eetool: rerun with --debug and report the traceback
    USAGE = 2  # bad flags or option values
    BAD_INPUT = 3  # missing, unreadable, corrupt or empty input file or dataset
    MODEL_MISMATCH = 4  # weights that do not fit the architecture, classes or input shape
    PROVENANCE = 5  # an artifact of the wrong kind, or made from another checkpoint/exits/dataset
    OUTPUT = 6  # output exists, is an input, or cannot be written
    INPUTS_FAILED = 7  # predict --on-error skip: some inputs could not be read (each named on stderr), the rest done
    INTERRUPTED = 130  # Ctrl-C, SIGTERM or SIGHUP; nothing half-written is left behind
    BROKEN_PIPE = 141  # the reader of stdout went away (| head); 128 + SIGPIPE, as the shell reports such tools


class EetoolError(Exception):
    exit_code: ExitCode = ExitCode.INTERNAL
    # Met in this process's own share of the data: under torchrun each rank decodes only its batches, so no other
    # rank meets it and this one reports it. Any other error every rank meets alike, and rank 0 alone reports.
    own_share: bool = False

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem = problem
        self.hint = hint

    def __str__(self) -> str:
        return self.problem if not self.hint else f"{self.problem} (hint: {self.hint})"


class UsageError(EetoolError):
    exit_code = ExitCode.USAGE


class InputError(EetoolError):
    exit_code = ExitCode.BAD_INPUT


class ModelMismatchError(EetoolError):
    exit_code = ExitCode.MODEL_MISMATCH


class ProvenanceError(EetoolError):
    exit_code = ExitCode.PROVENANCE


class OutputError(EetoolError):
    exit_code = ExitCode.OUTPUT
