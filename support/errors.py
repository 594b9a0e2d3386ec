"""Errors a user can fix, and the helper that turns a library's exception into a short reason.

A ``UserError`` carries one sentence saying what is wrong and what to do; the scripts print
it as ``error: <message>`` and exit with status 2, never with a traceback.  The message is the
exception's only argument, so the errors pickle and cross process boundaries (DataLoader
workers, spawned ranks) unchanged.
"""

__all__ = ["CheckpointError", "DataError", "UserError", "short_reason"]


class UserError(Exception):
    """A problem the user can fix; the message is one sentence saying what is wrong and what to do.

    Scripts print it as ``error: <message>`` and exit 2.  When a DataLoader worker raised it,
    torch re-raises it in the parent as ``type("Caught ... Original Traceback ...")``; the
    original one-line message is recovered from that text, so it stays one line.
    """

    def __init__(self, message=""):
        super().__init__(_unwrap_worker_message(message))


def _unwrap_worker_message(message):
    """The original message inside torch's "Caught X in DataLoader worker" text, or ``message``."""
    wrapped = isinstance(message, str) and message.startswith("Caught ")
    if not (wrapped and "\nOriginal Traceback" in message):
        return message
    last = message.rstrip().splitlines()[-1]  # "support.errors.DataError: <original message>"
    name, sep, text = last.partition(": ")
    return text if sep and " " not in name else message


class DataError(UserError):
    """A data set cannot be found, read or used."""


class CheckpointError(UserError):
    """A checkpoint cannot be found, read, written or matched to the flags given."""


def short_reason(exc, limit=160):
    """First sentence of an exception's first line, shortened, for one-line error messages."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    text = text.split(". ")[0].rstrip(".")  # first sentence
    if isinstance(exc, OSError) and getattr(exc, "reason", None) is not None:  # URLError
        text = str(exc.reason)
    return text if len(text) <= limit else text[: limit - 3] + "..."
