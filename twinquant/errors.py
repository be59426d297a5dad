"""User-facing errors.

A `TwinquantError` is a problem with the user's input (missing file, corrupt header, unsupported architecture,
impossible option). The CLI prints its message as one line and exits with status 2; library callers catch it.
"""


class TwinquantError(Exception):
    """An error caused by input the user can fix; the message is one clear line."""


def show(name: str) -> str:
    """A name read from a file, fit for a one-line message (quoted and escaped unless plainly printable)."""
    return name if name.isprintable() and len(name) <= 200 else repr(name[:200])


def one_line(e: Exception) -> str:
    """An exception from a library (gguf-py, safetensors, json) as one short line."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
