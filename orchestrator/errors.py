"""User-facing errors: the CLI turns each into one ``error: ...`` line and a non-zero exit."""


class UserError(Exception):
    """Bad input or an unusable environment; the message names the culprit (field, file, URI)."""

    exit_code = 2


def one_line(e: BaseException) -> str:
    """The first line of an exception's message (at most 300 characters), or its type's name."""
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__)[:300]
