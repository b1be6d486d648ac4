"""User-facing errors: the CLI turns each into one ``error: ...`` line and a non-zero exit."""

import re


class UserError(Exception):
    """Bad input or an unusable environment; the message names the culprit (field, file, URI)."""

    exit_code = 2


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]


class BadValue(UserError):
    """A bad value of a named argument. The message names arguments as ``{name}`` fields: the library
    spells them as its arguments (``jobs_per_gpu``), the command line as its flags (``--jobs-per-gpu``),
    so a notebook is never told about a flag it did not pass."""

    def __init__(self, template: str):
        self.template = template
        super().__init__(self.spelled(lambda name: name))

    def spelled(self, spell) -> str:
        return re.sub(r"\{([a-z][a-z_]*)\}", lambda m: spell(m.group(1)), self.template)
