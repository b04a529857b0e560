"""Errors that mean the user's input is wrong: reported as one line, never a traceback."""


class UserError(Exception):
    """Bad input (file, key, config value) with a message that names it and says what to do."""
