"""The one exception type that reaches the user as a one-line message."""


class DifflabError(Exception):
    """A problem the user can fix; the CLI prints its message on one line and exits non-zero."""
