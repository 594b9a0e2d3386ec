"""One run's output files: checked at start-up, written together, never mixed with another run's.

Both take ``files``, the names of every file the folder manages: only these are ever written,
replaced or removed (the analysis script lists its own and every analysis unit's).

``check_output_dir(path, files)`` runs before any worker starts: the folder is created if needed
and a file is written to it and removed (a file in its place, a read-only file system, a missing
permission: one ``UserError``). It returns the files an earlier run left there, so the script
can say which it will replace.

``RunOutputs(path, files)`` collects a run's files in a hidden staging folder inside ``path``:
``results.json`` first (strict JSON: NaN and inf become null), then figures and tensors, each
through a function that may fail without losing the rest (a failed figure is a warning).
``commit()`` then moves every staged file into place with SIGINT/SIGTERM/SIGHUP held back, and
removes the files an earlier run left that this run did not produce, so the folder always
holds the files of exactly one run. If the run ends before ``commit()``, the staging folder is
removed and the earlier files are untouched.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import sys
import tempfile

from pyhessian_dist.results import json_safe
from support.errors import UserError
from support.files import make_writable_folder

__all__ = ["OutputError", "RunOutputs", "check_output_dir", "tagged_name"]

_STAGING_PREFIX = ".pyhessian-dist-staging-"


def tagged_name(name: str, tag: str) -> str:
    """``name`` with ``tag`` before its extension: ``per_layer.png`` -> ``per_layer.ggn.png``."""
    stem, ext = os.path.splitext(name)
    return f"{stem}.{tag}{ext}"


class OutputError(UserError):
    """--output-dir cannot hold the outputs."""


def check_output_dir(path: str, files) -> list[str]:
    """Create ``path`` if needed and prove it writable; return which of ``files`` an earlier
    run left there."""
    path = os.fspath(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise OutputError(f"--output-dir {path} is a file, not a folder; pass a folder")
    try:
        make_writable_folder(path)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise OutputError(f"--output-dir {path} is not writable ({reason}); pass a folder "
                          "you can write to") from None
    return [f for f in files if os.path.exists(os.path.join(path, f))]


class RunOutputs:
    """A run's files, staged in ``path`` and committed together (see the module docstring)."""

    def __init__(self, path: str, files):
        self.path = os.fspath(path)
        self.managed = tuple(files)
        os.makedirs(self.path, exist_ok=True)
        self.staging = tempfile.mkdtemp(dir=self.path, prefix=_STAGING_PREFIX)
        self.files: list[str] = []
        self.warnings: list[str] = []

    def _staged(self, name: str) -> str:
        if name not in self.managed:
            raise ValueError(f"{name} is not one of the output files {self.managed}; a unit "
                             "declares the files it writes in its `files`")
        return os.path.join(self.staging, name)

    def write_json(self, name: str, record: dict) -> None:
        """Write ``record`` as strict JSON (NaN/inf -> null)."""
        text = json.dumps(json_safe(record), indent=1, allow_nan=False, default=str)
        with open(self._staged(name), "w") as fh:
            fh.write(text + "\n")
        self.files.append(name)

    def write(self, names, make) -> None:
        """Call ``make(staged paths...)`` to write ``names``; a failure is a warning line."""
        names = [names] if isinstance(names, str) else list(names)
        try:
            make(*[self._staged(n) for n in names])
        except Exception as exc:  # noqa: BLE001 - a figure must never cost the results
            self.warnings.append(f"warning: could not write {', '.join(names)} "
                                 f"({type(exc).__name__}: {exc}); the other files are complete")
            for n in names:
                with contextlib.suppress(OSError):
                    os.unlink(self._staged(n))
            return
        self.files.extend(n for n in names if os.path.exists(self._staged(n)))

    def tagged(self, tag: str) -> _Tagged:
        """A view whose ``write`` writes each name tagged (``tagged_name``): one curvature's
        files in a run of several."""
        return _Tagged(self, tag)

    def commit(self) -> tuple[list[str], list[str]]:
        """Move the staged files into place, remove stale ones; return (written, removed)."""
        held = _hold_signals()
        try:
            for name in self.files:
                os.replace(os.path.join(self.staging, name), os.path.join(self.path, name))
            removed = []
            for name in self.managed:
                stale = os.path.join(self.path, name)
                if name not in self.files and os.path.exists(stale):
                    os.unlink(stale)
                    removed.append(name)
            shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            _release_signals(held)
        return [os.path.join(self.path, n) for n in self.files], removed

    def discard(self) -> None:
        """Remove the staging folder (the run ended before ``commit``)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.discard()
        return False


class _Tagged:
    """``RunOutputs.tagged``: ``write(names, make)`` with every name tagged."""

    def __init__(self, outputs: RunOutputs, tag: str):
        self.outputs, self.tag = outputs, tag

    @property
    def warnings(self) -> list[str]:
        return self.outputs.warnings

    def write(self, names, make) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.outputs.write([tagged_name(n, self.tag) for n in names], make)


def _hold_signals():
    if sys.platform == "win32" or not hasattr(signal, "pthread_sigmask"):
        return None
    return signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM,
                                                     signal.SIGHUP})


def _release_signals(previous):
    if previous is not None:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
