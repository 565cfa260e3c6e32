"""User errors: what the user must fix. The CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (file, key, value, model). Its message says what to fix."""
