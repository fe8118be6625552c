"""The error type for bad user input: one line that names the problem and the fix."""


class UserError(ValueError):
    """Bad input from the user; the CLI prints it as one line and exits with code 2."""
