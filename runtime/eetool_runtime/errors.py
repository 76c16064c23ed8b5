"""Errors and exit codes: the numbers and meanings of eetool's (eetool.errors.ExitCode), for the same scripts."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    INTERNAL = 1
    USAGE = 2
    BAD_INPUT = 3
    PROVENANCE = 5  # a bundle that changed since export (sha256), or is not an eetool bundle
    OUTPUT = 6
    INPUTS_FAILED = 7  # --on-error skip: some inputs could not be read, each named on stderr
    INTERRUPTED = 130
    BROKEN_PIPE = 141


class RuntimeToolError(Exception):
    exit_code = ExitCode.INTERNAL

    def __init__(self, problem: str, hint: str | None = None) -> None:
        super().__init__(problem)
        self.problem, self.hint = problem, hint

    def __str__(self) -> str:
        return self.problem if not self.hint else f"{self.problem} (hint: {self.hint})"


class UsageError(RuntimeToolError):
    exit_code = ExitCode.USAGE


class InputError(RuntimeToolError):
    exit_code = ExitCode.BAD_INPUT


class BundleError(RuntimeToolError):
    exit_code = ExitCode.PROVENANCE


class OutputError(RuntimeToolError):
    exit_code = ExitCode.OUTPUT


class InputsFailedError(RuntimeToolError):
    exit_code = ExitCode.INPUTS_FAILED
