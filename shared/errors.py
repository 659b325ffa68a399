"""The one exception type users see: a single line naming the problem and the fix, and the
argument parser that reports bad arguments the same way."""

import argparse
import contextlib
import signal
import threading


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


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM (``kill``, a batch scheduler, systemd) raises KeyboardInterrupt, as Ctrl-C does, so a command stops
    the same way: its finished work kept and said. Outside the main thread signals cannot be set: nothing changes."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
