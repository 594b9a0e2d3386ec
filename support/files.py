"""Atomic file writes (a reader never sees a half-written file, a crash leaves the old one),
why a write failed in words, and folders a failed run must not leave behind."""
import contextlib
import errno
import io
import os
import tempfile

import torch

from support.cancel import cancels_held

__all__ = ["atomic_torch_save", "atomic_write_bytes", "atomic_write_files",
           "make_writable_folder", "removed_if_left_empty", "torch_bytes", "write_error"]


def write_error(exc: BaseException) -> str:
    """Why a file could not be written and what to do, in words: "No space left on device;
    free some space ..." (ENOSPC, EDQUOT), the file-size limit for EFBIG (``ulimit -f``; the
    OS says only "File too large"), the OS's reason otherwise; for an exception that is not an
    ``OSError`` its type and first line (a bug in the code that draws the file). An OSError
    in the exception's chain wins: matplotlib's PDF writer, cleaning up after a full disk,
    raises an AttributeError whose context is the ENOSPC."""
    exc = _os_error_in_chain(exc) or exc
    if not isinstance(exc, OSError):
        text = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return f"{type(exc).__name__}: {text}; a bug, please report it" if text else \
            f"{type(exc).__name__}; a bug, please report it"
    reason = exc.strerror or str(exc)
    if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
        return f"{reason}; free some space or choose a folder on another disk"
    if exc.errno == errno.EFBIG:
        limit = _file_size_limit()
        if limit is not None:
            return (f"{reason}: this process may not write files larger than {limit:,} bytes "
                    "(the file-size limit, `ulimit -f`); raise or remove the limit")
        return f"{reason}; the file system cannot hold a file this large"
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{reason}; choose a folder you can write to"
    return reason  # e.g. "Not a directory": the path says what to do


def _os_error_in_chain(exc: BaseException) -> OSError | None:
    """The first OSError among ``exc`` and its causes and contexts, or None."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def _file_size_limit():
    try:
        import resource
    except ImportError:  # not on POSIX
        return None
    soft = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    return None if soft == resource.RLIM_INFINITY else soft


@contextlib.contextmanager
def removed_if_left_empty(*paths):
    """Remove those of the folders ``paths`` (and their parents) that did not exist when the
    block started if the block raised (a failure, a cancel) and they are empty: a run that
    failed leaves no empty folder behind. Files are never removed."""
    created = []
    for path in paths:
        if not path:
            continue
        path = os.path.abspath(path)
        while not os.path.exists(path) and os.path.dirname(path) != path:
            created.append(path)  # deepest first
            path = os.path.dirname(path)
    try:
        yield
    except BaseException:
        for folder in created:
            with contextlib.suppress(OSError):  # not empty, or gone: leave it
                os.rmdir(folder)
        raise


def make_writable_folder(path) -> None:
    """Create the folder ``path`` if needed and prove it writable (a file made and removed);
    raise ``OSError`` if either fails."""
    os.makedirs(path, exist_ok=True)
    fd, probe = tempfile.mkstemp(dir=path, prefix=".write-test-")
    os.close(fd)
    os.unlink(probe)


def atomic_write_bytes(path, data):
    """Write ``data`` to ``path`` atomically: temp file in the same folder, fsync, os.replace.

    A reader never sees a half-written file; a crash leaves the old file (or none).
    Parent folders are created.
    """
    atomic_write_files({os.fspath(path): data})


def _fsync_folder(folder):
    """Make a rename in ``folder`` durable where the OS allows it (best effort)."""
    try:
        dir_fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def atomic_write_files(contents, on_commit=None) -> None:
    """Write several files as one: every ``{path: bytes}`` is written in full to a temporary
    file beside it first (a failure removes them all and leaves every old file); then they are
    renamed into place with cancels held back, so a file-size limit or a full disk can never
    leave one file new and another old. ``on_commit()`` runs right after the renames, before a
    held-back cancel is delivered (to report what is now written)."""
    staged = []
    try:
        for path, data in contents.items():
            folder = os.path.dirname(os.path.abspath(path))
            os.makedirs(folder, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".",
                                       suffix=".tmp")
            staged.append((tmp, path))
            _write_fd(fd, data)
        with cancels_held():
            for tmp, path in staged:
                os.replace(tmp, path)
            if on_commit is not None:
                on_commit()
    except BaseException:
        for tmp, _path in staged:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        raise
    for folder in {os.path.dirname(os.path.abspath(p)) for p in contents}:
        _fsync_folder(folder)


def _write_fd(fd, data):
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # mkstemp makes 0600; give the file normal permissions
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def torch_bytes(obj) -> bytes:
    """What ``torch.save(obj)`` writes."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def atomic_torch_save(obj, path):
    """``torch.save(obj)`` to ``path`` atomically (see ``atomic_write_bytes``)."""
    atomic_write_bytes(path, torch_bytes(obj))
