"""The error every entry point reports in one line with exit code 2: bad user input."""


class UsageError(ValueError):
    """Bad command-line, config or protocol input: reported in one line, exit code 2."""
