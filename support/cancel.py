"""Cancels: SIGTERM, SIGINT (Ctrl-C) and SIGHUP, from the first import to the last write.

A cancel must stop the run, whatever the run is doing, and never be mistaken for a failure:

* ``Interrupted`` is a ``BaseException`` (like ``KeyboardInterrupt``), so no ``except
  Exception`` -- around a figure, a user's code, a download -- can catch it; ``run_main``
  (support.launch) turns it into one line and the exit status 128 + the signal number;
* ``cancels_raise()`` turns the three signals into ``Interrupted`` while a block runs (the
  scripts' whole run, and every worker of a spawned run);
* ``cancels_held()`` holds them back while a block runs (files moved into place as one set): a
  signal that arrives meanwhile is delivered when the block ends;
* ``cancels_ignored()`` ignores them while a block runs (stopping the workers after a first
  cancel);
* ``exit_on_cancel_while_starting()``: a script calls it before its heavy imports (torch), so a
  cancel while it starts ends it with that one line instead of a traceback from an import;
  ``ignore_cancels_from_now()`` once its run is over, so that one while Python shuts down
  cannot turn a finished run into a killed one;
* ``outputs_written(note)``: the run's outputs are in place; the line a later cancel prints
  says so (``note``) instead of "no output was written".

This module imports nothing heavy, so that a script can use it before torch.
"""
from __future__ import annotations

import contextlib
import os
import signal

__all__ = ["CANCEL_SIGNALS", "Interrupted", "cancel_line", "cancels_held", "cancels_ignored",
           "cancels_raise", "exit_on_cancel_while_starting", "ignore_cancels_from_now",
           "outputs_written", "run_started"]

CANCEL_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
NOTHING_WRITTEN = "no output was written and earlier files are untouched"


class Interrupted(BaseException):
    """The run was stopped by a signal; ``workers`` is the number of spawned workers that were
    stopped."""

    def __init__(self, signum, workers=0):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.workers = signum, workers


# What this run has written so far (``outputs_written``), for the line a cancel prints; the
# scripts' ``run_main`` starts each run with it empty (``run_started``).
_WRITTEN: list = []


def run_started() -> None:
    """A run begins: nothing of it is written yet."""
    _WRITTEN.clear()


def outputs_written(note: str) -> None:
    """Record that the run's outputs are in place; ``note`` says what (e.g. "checkpoints/net.pkl
    holds epoch 3"): a cancel from now on says so instead of "no output was written"."""
    _WRITTEN.append(note)


def cancel_line(signum, workers=0) -> str:
    """The one line a cancel prints: what was stopped, and what had been written."""
    stopped = f"stopped {workers} workers; " if workers else ""
    kept = _WRITTEN[-1] if _WRITTEN else NOTHING_WRITTEN
    return f"interrupted by {signal.Signals(signum).name}: {stopped}{kept}"


@contextlib.contextmanager
def _handled_by(handler):
    """``handler`` for the cancel signals while the block runs (those ignored at start stay
    ignored), the previous handlers afterwards; nothing changes outside the main thread."""
    try:
        previous = {s: signal.signal(s, handler) for s in CANCEL_SIGNALS
                    if signal.getsignal(s) is not signal.SIG_IGN}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def cancels_raise():
    """Turn SIGTERM/SIGINT/SIGHUP into ``Interrupted`` while the block runs (main thread only;
    elsewhere the signals are left alone). A signal the process was started with ignored
    stays ignored (``nohup``'s SIGHUP, SIGINT of a background job)."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    return _handled_by(handler)


@contextlib.contextmanager
def cancels_held():
    """Hold SIGTERM/SIGINT/SIGHUP back while the block runs; one that arrived meanwhile is
    delivered (and raises, under ``cancels_raise``) when the block ends.

    Held at Python's level (the handlers note the signal): a signal mask would hold a signal
    back from this thread only, and the kernel would hand a process-directed signal to one of
    torch's threads, whose C handler makes the main thread run the Python handler at once."""
    pending = []
    try:
        with _handled_by(lambda signum, _frame: pending.append(signum)):
            yield
    finally:
        if pending:
            signal.raise_signal(pending[0])


def cancels_ignored():
    """Ignore further cancels while the block runs (stopping the workers after a first one:
    a second Ctrl-C must not cut that short); the handlers are restored afterwards."""
    return _handled_by(signal.SIG_IGN)


def _exit_now(signum, _frame):
    with contextlib.suppress(OSError):
        os.write(2, (cancel_line(signum) + "\n").encode())
    os._exit(128 + signum)


def ignore_cancels_from_now() -> None:
    """The run is over (its status is known): a cancel while Python shuts down (seconds, with
    torch loaded) must not turn a finished run into a killed one. Python resets its own
    handlers to the default while it finalises, but leaves ignored signals ignored."""
    for s in CANCEL_SIGNALS:
        signal.signal(s, signal.SIG_IGN)


def exit_on_cancel_while_starting() -> None:
    """Until ``run_main`` takes over: a cancel ends the process at once with one line and
    128 + the signal number (it is still importing: nothing to clean up, no traceback)."""
    for s in CANCEL_SIGNALS:
        if signal.getsignal(s) is not signal.SIG_IGN:  # nohup, a background job: keep that
            signal.signal(s, _exit_now)
