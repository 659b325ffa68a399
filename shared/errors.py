"""The one exception type users see: a single line naming the problem and the fix, and the
argument parser that reports bad arguments the same way."""

import argparse


class PapmError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with code 2.

    The message says what is wrong and how to fix it, on one line.
    """

    exit_code = 2


def problem_and_fix(message: str) -> tuple[str, str]:
    """(problem, fix) of a one-line message ``problem; fix``, to join several problems or give one another fix."""
    problem, _, fix = message.rpartition("; ")
    return (problem, fix) if problem else (message, "")


class OneLineParser(argparse.ArgumentParser):
    """Bad arguments are one line, like every other error: ``error: <problem>; <fix>``, exit 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"error: {self.prog}: {message}; see `{self.prog} --help`\n")
