"""The one error type users see.

Every stage raises `OwnlmError` for bad input (a file, a line, a config field); the CLI prints its
message as one line and exits non-zero, without a traceback. Anything else is a bug and keeps its
traceback.
"""


class OwnlmError(Exception):
    """A user-facing error: the message names the file, line or field at fault."""
