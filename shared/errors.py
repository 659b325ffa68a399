"""The one exception type users see: a single line naming the problem and the fix."""


class PapmError(Exception):
    """A user-facing error. The CLI prints ``error: <message>`` and exits with code 2.

    The message says what is wrong and how to fix it, on one line.
    """

    exit_code = 2
