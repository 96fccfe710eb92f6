"""One exception type for every mistake a user can fix.

The CLI prints these as a single line (no traceback); anything else is a bug and keeps
its traceback.
"""


class MiOptError(Exception):
    """A bad input: the message says what was wrong and what to do instead."""
