"""Exception types that map onto the CLI's exit codes.

The CLI turns :class:`BadDataError` into exit code 1 and :class:`BadFlagError`
into exit code 2 (click's own usage errors are also 2), each printed as one
sentence without a traceback. Library users catch :class:`ChesFilterError`.
"""


class ChesFilterError(Exception):
    """Base class of every error ches-filter raises on purpose."""

    exit_code = 1


class BadDataError(ChesFilterError):
    """The input data (or a file the user points at) cannot be used as given.

    Messages say what arrived, what is allowed, and how to fix it.
    """

    exit_code = 1


class BadFlagError(ChesFilterError, ValueError):
    """A configuration value or a combination of flags is invalid."""

    exit_code = 2


class OutOfMemoryError(ChesFilterError, RuntimeError):
    """Even one pair does not fit in the device's memory after every back-off (exit code 1)."""

    exit_code = 1


def reason(exc: BaseException) -> str:
    """Returns the most specific one-line reason from an exception chain."""
    # DatasetGenerationError only says "An error occurred"; the useful text
    # sits in the innermost explicit cause.
    while exc.__cause__ is not None:
        exc = exc.__cause__
    if isinstance(exc, OSError) and exc.strerror:
        text = exc.strerror
    else:
        text = str(exc) or type(exc).__name__
    text = " ".join(text.split())
    return text if len(text) <= 300 else text[:297] + "..."
