"""The one exception type for a user's mistake: the CLI prints its message and exits non-zero, no traceback."""


class SoftPromptError(Exception):
    """Bad input or an impossible request, with a message that says what was wrong, where, and what to do."""
