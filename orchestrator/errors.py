"""User-facing errors: the CLI turns each into one ``error: ...`` line and a non-zero exit."""

import re


class UserError(Exception):
    """Bad input or an unusable environment; the message names the culprit (field, file, URI)."""

    exit_code = 2


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


ARG = "\x1f"  # brackets an argument's name inside a BadValue message


def arg(name: str) -> str:
    """An argument's name inside a ``BadValue`` message: the library shows it as is, the CLI as its flag."""
    return f"{ARG}{name}{ARG}"


class BadValue(UserError):
    """A bad value of a named argument. Its message names arguments with ``arg(name)``: the library spells
    them as its arguments (``jobs_per_gpu``), the command line as its flags (``--jobs-per-gpu``), so a
    notebook is never told about a flag it did not pass."""

    def __init__(self, message: str):
        self.template = message
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell) -> str:
        return re.sub(f"{ARG}([a-z][a-z_]*){ARG}", lambda m: spell(m.group(1)), self.template)
