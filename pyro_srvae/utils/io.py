"""Checkpoints written atomically and read back with clear errors.

A checkpoint is a ``torch.save`` dict that ``torch.load(weights_only=True)`` can read:
tensors, numbers, strings, lists and dicts only, so loading a file never runs code
from it. It is written to a temporary file in the same directory, flushed, fsynced
and renamed over the final name: a crash at any moment leaves either the previous
checkpoint or the new one under that name, never a partial file. A process killed
mid-write leaves its temporary file behind (``.checkpoint.pt.<random>.tmp``, never the
final name); :func:`remove_stale_temporaries` clears those when a run starts again.

The same writer serves every file the package writes (:func:`atomic_write_bytes`,
:func:`atomic_write_text`; :func:`atomic_path` for writers that take a path, such as the
folder patch cache's memory map; :class:`StagedFiles` for a group renamed together): the
temporary file is created with mode 0o666 less the umask, as a normal file.
"""

import os
import secrets
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path):
    """The package's one atomic writer, in the form for writers that take a path.

    Yields a fresh temporary path beside ``path`` (an empty file, created with the mode
    a normal file gets: 0o666 less the umask) for the caller to fill, e.g. a memory-mapped
    array; on a clean exit the file is fsynced and renamed to ``path`` (and the rename
    made durable), on any exception (KeyboardInterrupt too) removed, so ``path`` holds
    either its old content or the complete new one, never a partial file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = _create_temporary(path)
    os.close(fd)
    try:
        yield tmp_name
        _fsync_file(tmp_name)
        os.replace(tmp_name, path)
    except BaseException:
        _remove(tmp_name)
        raise
    fsync_directory(path.parent)


def atomic_write_bytes(path, write):
    """Call ``write(file)`` on a temporary file, then fsync and rename it to ``path``
    (:func:`atomic_path`)."""
    with atomic_path(path) as tmp_name:
        with open(tmp_name, "wb") as handle:
            write(handle)
    return Path(path)


def atomic_write_text(path, text):
    return atomic_write_bytes(path, lambda handle: handle.write(text.encode("utf-8")))


class StagedFiles:
    """Several files of one folder written as one: each under a temporary name (as
    :func:`atomic_path` makes them), then all renamed on :meth:`commit`, or all removed
    on :meth:`abort`. Use as a context manager: commit on a clean exit, abort otherwise."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.pending = []

    def write(self, final, write):
        """``write(handle)`` into a fresh temporary file that becomes ``final`` on commit."""
        with open(self.path(final), "wb") as handle:
            write(handle)

    def write_via_path(self, final, write):
        """``write(tmp_path)`` for writers that take a path (tifffile, the figures)."""
        write(self.path(final))

    def path(self, final):
        """A fresh temporary path to fill (e.g. by a writer that takes a path), ``final`` on commit."""
        fd, tmp_name = _create_temporary(self.directory / Path(final).name)
        os.close(fd)
        self.pending.append((tmp_name, self.directory / Path(final).name))
        return tmp_name

    def commit(self):
        for tmp_name, _ in self.pending:
            _fsync_file(tmp_name)
        for tmp_name, final in self.pending:
            os.replace(tmp_name, final)
        self.pending = []
        fsync_directory(self.directory)

    def abort(self):
        for tmp_name, _ in self.pending:
            _remove(tmp_name)
        self.pending = []

    def __enter__(self):
        return self

    def __exit__(self, kind, error, traceback):
        if kind is None:
            self.commit()
        else:
            self.abort()
        return False


def _create_temporary(path):
    """A new ``.NAME.<pid>.<random>.tmp`` beside ``path``, opened for writing.

    Created with O_EXCL and mode 0o666, so the user's umask decides the final file's
    permissions (``mkstemp`` would make every checkpoint, metrics file, figure, patch cache
    and classifier 0600, unreadable by a colleague).
    """
    while True:
        tmp_name = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp_name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp_name
        except FileExistsError:  # pragma: no cover - a 32-bit random collision
            continue


def _fsync_file(name):
    fd = os.open(name, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _remove(name):
    try:
        os.unlink(name)
    except FileNotFoundError:
        pass


def remove_stale_temporaries(directory, names):
    """Delete the temporary files that killed writers of ``names`` left in ``directory``.

    Only call this when no other process is writing there (the run that owns the
    directory, at start-up): a live writer's temporary file would vanish under it.
    Returns the paths removed.
    """
    removed = []
    for name in names:
        for stale in Path(directory).glob(f".{name}.*.tmp"):
            try:
                stale.unlink()
                removed.append(stale)
            except FileNotFoundError:  # pragma: no cover - raced with another cleaner
                pass
    return removed


def fsync_directory(directory):
    # The rename itself must reach the disk, or a power cut can undo it.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
