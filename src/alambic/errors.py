"""The one exception type for mistakes a user can fix.

The CLI prints an :class:`AlambicError` as a single ``error: ...`` line and exits non-zero, without a traceback.
Anything else escaping is a bug in alambic and keeps its traceback.
"""


class AlambicError(Exception):
    """A user-fixable problem. The message names the problem and the fix, in one line."""


def did_you_mean(name: str, choices) -> str:
    """A ' (did you mean X?)' hint for a misspelt name, or '' when nothing is close."""
    import difflib

    close = difflib.get_close_matches(name, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
