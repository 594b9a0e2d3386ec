"""One run's output files: checked at start-up, written together, never mixed with another run's.

Both take ``files``, the names of every file the folder manages: only these are ever written,
replaced or removed (the analysis script lists its own and every analysis unit's).

``check_output_dir(path, files)`` runs before any worker starts: the folder is created if needed
and a file is written to it and removed (a file in its place, a read-only file system, a missing
permission: one ``UserError``). It returns the files an earlier run left there, so the script
can say which it will replace.

``RunOutputs(path, files)`` collects a run's files in a hidden staging folder inside ``path``
(``.pyhessian-dist-staging-<pid>-<host>-*``): ``results.json`` first (strict JSON: NaN and inf
become null), then figures and tensors, each through a function that may fail. A file that
cannot be written (a full disk, a file-size limit, a figure that fails) ends the run with one
``OutputError`` and nothing replaced: the folder keeps the earlier run's files as they were,
byte for byte. With ``keep_partial`` (``--keep-partial-outputs``) such a file is a warning
instead and the files that could be written replace the earlier set; results.json is never
optional. ``commit()`` moves every staged file into place with cancels held back, and removes
the files an earlier run left that this run did not produce, so the folder always holds the
files of exactly one run. If the run ends before ``commit()`` (a failure, a cancel), the
staging folder is removed and the earlier files are untouched.

``remove_stale_staging(path)`` removes the staging folders that runs which ended without
cleaning up left behind (a worker killed with SIGKILL, a power cut): see its docstring for
which it removes.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import tempfile
import time

from pyhessian_dist.results import json_safe
from support.cancel import cancels_held
from support.errors import UserError
from support.files import make_writable_folder, write_error

__all__ = ["OutputError", "RunOutputs", "check_output_dir", "remove_stale_staging", "tagged_name"]

_STAGING_PREFIX = ".pyhessian-dist-staging-"
STALE_AFTER_S = 24 * 3600   # another host's (or an older version's) staging folder



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


def remove_stale_staging(path: str, own: bool = False) -> list[str]:
    """Remove from ``path`` the staging folders of runs that have ended; return their names.

    Only folders named ``.pyhessian-dist-staging-*`` are touched: one made on this host by a
    process that no longer runs (``<pid>-<host>`` in its name), one made by this process when
    ``own`` is true (its run is over), and one of another host or of an older version (no
    pid in its name) that nothing has touched for a day. A live run's folder is never
    removed."""
    path = os.fspath(path)
    try:
        names = [n for n in os.listdir(path) if n.startswith(_STAGING_PREFIX)]
    except OSError:
        return []
    removed = []
    for name in sorted(names):
        folder = os.path.join(path, name)
        if os.path.isdir(folder) and _stale(name, folder, own):
            shutil.rmtree(folder, ignore_errors=True)
            if not os.path.exists(folder):
                removed.append(name)
    return removed


def _stale(name: str, folder: str, own: bool) -> bool:
    pid, _, rest = name[len(_STAGING_PREFIX):].partition("-")
    host = rest.rpartition("-")[0]
    if pid.isdigit() and host == socket.gethostname():
        return (own and int(pid) == os.getpid()) or not _running(int(pid))
    try:
        return time.time() - os.path.getmtime(folder) > STALE_AFTER_S
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


class RunOutputs:
    """A run's files, staged in ``path`` and committed together (see the module docstring).
    ``on_commit()`` is called once the files are in place, before a held-back cancel is
    delivered."""

    def __init__(self, path: str, files, keep_partial: bool = False, on_commit=None):
        self.path = os.fspath(path)
        self.managed = tuple(files)
        self.keep_partial, self.on_commit = bool(keep_partial), on_commit
        self.files: list[str] = []
        self.warnings: list[str] = []
        self.staging = None
        try:
            os.makedirs(self.path, exist_ok=True)
            self.staging = tempfile.mkdtemp(
                dir=self.path, prefix=f"{_STAGING_PREFIX}{os.getpid()}-{socket.gethostname()}-")
        except OSError as exc:
            raise OutputError(self._message(self.managed[0], exc)) from None

    def _staged(self, name: str) -> str:
        if name not in self.managed:
            raise ValueError(f"{name} is not one of the output files {self.managed}; a unit "
                             "declares the files it writes in its `files`")
        return os.path.join(self.staging, name)

    def write_json(self, name: str, record: dict) -> None:
        """Write ``record`` as strict JSON (NaN/inf -> null); OutputError if it cannot be
        written (whatever ``keep_partial``: the results are what a run is for). Writing a name
        again replaces its staged copy."""
        text = json.dumps(json_safe(record), indent=1, allow_nan=False, default=str)
        try:
            with open(self._staged(name), "w") as fh:
                fh.write(text + "\n")
        except OSError as exc:
            raise OutputError(self._message(name, exc)) from None
        if name not in self.files:
            self.files.append(name)

    def write(self, names, make) -> None:
        """Call ``make(staged paths...)`` to write ``names``; a failure ends the run (or is a
        warning line with ``keep_partial``)."""
        names = [names] if isinstance(names, str) else list(names)
        try:
            make(*[self._staged(n) for n in names])
        except Exception as exc:  # noqa: BLE001 - a figure's code may raise anything
            for n in names:
                with contextlib.suppress(OSError):
                    os.unlink(self._staged(n))
            self.failed(", ".join(names), exc)
            return
        self.files.extend(n for n in names if os.path.exists(self._staged(n)))

    def tagged(self, tag: str) -> _Tagged:
        """A view whose ``write`` writes each name tagged (``tagged_name``): one curvature's
        files in a run of several."""
        return _Tagged(self, tag)

    def failed(self, what: str, exc: Exception) -> None:
        """``what`` could not be written because of ``exc``: OutputError (the run ends, nothing
        is replaced), or with ``keep_partial`` a warning line and the run goes on."""
        if not self.keep_partial:
            raise OutputError(self._message(what, exc)) from None
        self.warnings.append(f"warning: could not write {what} ({write_error(exc)}); "
                             "--keep-partial-outputs: the other files are written")

    def _message(self, what: str, exc: BaseException) -> str:
        earlier = [f for f in self.managed if os.path.exists(os.path.join(self.path, f))]
        kept = (f"nothing was replaced: {self.path} still holds the earlier run's "
                f"{', '.join(earlier)}" if earlier else f"nothing was written to {self.path}")
        return (f"could not write {what} ({write_error(exc)}); {kept}. Pass "
                "--keep-partial-outputs to write the files that can be written instead")

    def commit(self) -> tuple[list[str], list[str]]:
        """Move the staged files into place, remove stale ones; return (written, removed)."""
        with cancels_held():
            try:
                for name in self.files:
                    os.replace(os.path.join(self.staging, name), os.path.join(self.path, name))
                removed = []
                for name in self.managed:
                    stale = os.path.join(self.path, name)
                    if name not in self.files and os.path.exists(stale):
                        os.unlink(stale)
                        removed.append(name)
            except OSError as exc:
                raise OutputError(f"could not move this run's files into {self.path} "
                                  f"({write_error(exc)}); the folder may now hold files of "
                                  "two runs") from None
            shutil.rmtree(self.staging, ignore_errors=True)
            if self.on_commit is not None:
                self.on_commit()
        return [os.path.join(self.path, n) for n in self.files], removed

    def discard(self) -> None:
        """Remove the staging folder (the run ended before ``commit``)."""
        if self.staging is not None:
            with cancels_held():
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

    def failed(self, what: str, exc: Exception) -> None:
        self.outputs.failed(what, exc)

    def write(self, names, make) -> None:
        names = [names] if isinstance(names, str) else list(names)
        self.outputs.write([tagged_name(n, self.tag) for n in names], make)
