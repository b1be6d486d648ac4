"""User-facing errors: the CLI turns each into one ``error: ...`` line and a non-zero exit."""


class UserError(Exception):
    """Bad input or an unusable environment; the message names the culprit (field, file, URI)."""

    exit_code = 2
