"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class QuantkitError(Exception):
    """Bad input or an unusable model/data: the message says what was wrong and what to do."""
