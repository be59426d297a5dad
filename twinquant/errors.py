"""User-facing errors.

A `TwinquantError` is a problem with the user's input (missing file, corrupt header, unsupported architecture,
impossible option). The CLI prints its message as one line and exits with status 2; library callers catch it.
"""


class TwinquantError(Exception):
    """An error caused by input the user can fix; the message is one clear line."""
