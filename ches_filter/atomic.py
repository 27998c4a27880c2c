"""Atomic writes: a hidden sibling first, fsynced, then renamed into place.

An interrupted run never leaves a half-written file where the result belongs;
:func:`atomic_paths` commits several outputs all or none. Full disks and
permission errors become one line (:func:`write_error`, :func:`writing`).
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import logging
import socket
from collections.abc import Iterator, Sequence

from .errors import ChesFilterError, reason

logger = logging.getLogger(__name__)


def sibling(path: str, tag: str) -> str:
    # Host and pid: processes on several machines may share a network file system.
    parent, name = os.path.split(path)
    return os.path.join(parent, f".{name}.{tag}-{socket.gethostname()}-{os.getpid()}")


def _remove_stale_siblings(path: str, tag: str = "tmp") -> None:
    """Delete ``path``'s temporaries left by killed runs on this host (their pid is gone).

    A run killed by SIGKILL (or by SIGTERM before it could clean up) leaves
    ``.NAME.tmp-HOST-PID``; the next run writing the same path removes it.
    Temporaries of live processes, and of other hosts (which cannot be
    checked), are left alone.
    """
    parent, name = os.path.split(os.path.abspath(path))
    prefix = f".{name}.{tag}-{socket.gethostname()}-"
    try:
        entries = os.listdir(parent or ".")
    except OSError:
        return
    for entry in entries:
        pid = entry[len(prefix):] if entry.startswith(prefix) else ""
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            os.kill(int(pid), 0)
            continue  # alive (ours or not): not stale
        except PermissionError:
            continue
        except (ProcessLookupError, OverflowError):
            pass
        try:
            remove(os.path.join(parent, entry))
            logger.info("removed %s, left by an earlier run that was killed", os.path.join(parent, entry))
        except OSError as exc:
            logger.warning("could not remove the stale temporary %s: %s", os.path.join(parent, entry), exc)


def _mount_point(path: str) -> str:
    path = os.path.abspath(path)
    while not os.path.ismount(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def write_error(exc: OSError, path: str) -> ChesFilterError:
    """One-line error for an ``OSError`` raised while writing ``path``.

    A full disk names the file system (its mount point) and says that a rerun
    of the same command keeps the finished work; a refused write names the
    path and asks for a writable location.
    """
    text = f"{exc.strerror or ''} {exc}"
    if exc.errno == errno.ENOSPC or "No space left on device" in text:
        return ChesFilterError(
            f"no space left on {_mount_point(os.path.dirname(os.path.abspath(path)) or '.')} writing {path}; "
            "free some space there (or choose another location) and rerun the same command"
        )
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) or "Permission denied" in text:
        return ChesFilterError(
            f"cannot write {path}: {exc.strerror or 'permission denied'}; choose a location you can write to"
        )
    return ChesFilterError(f"could not write {path} ({reason(exc)})")


@contextlib.contextmanager
def writing(path: str) -> Iterator[None]:
    """Turn any ``OSError`` raised inside into :func:`write_error` for ``path``."""
    try:
        yield
    except OSError as exc:
        raise write_error(exc, os.fspath(path)) from None


def remove(path: str) -> None:
    if os.path.islink(path) or os.path.isfile(path):
        os.unlink(path)
    elif os.path.isdir(path):
        shutil.rmtree(path)


def fsync_tree(path: str) -> None:
    # Without fsync a power loss right after the rename can leave an empty
    # file at the target on some file systems, which is the half-written
    # result atomic writes exist to prevent.
    if os.path.isdir(path):
        for root, _dirs, files in os.walk(path):
            for name in files:
                _fsync_file(os.path.join(root, name))
            _fsync_file(root)
    else:
        _fsync_file(path)


def _fsync_file(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # some platforms cannot open directories; durability is best effort
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _commit(tmp: str, target: str) -> None:
    if os.path.isdir(tmp) or (os.path.isdir(target) and not os.path.islink(target)):
        # os.replace cannot swap a directory for a non-empty one, so the old
        # output steps aside first and is deleted only once the new one is in.
        aside = None
        if os.path.lexists(target):
            aside = sibling(target, "old")
            remove(aside)
            os.replace(target, aside)
        try:
            os.replace(tmp, target)
        except BaseException:
            if aside is not None:
                os.replace(aside, target)
            raise
        if aside is not None:
            remove(aside)
    else:
        os.replace(tmp, target)
    _fsync_file(os.path.dirname(target))


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
    """Yields a temporary sibling path that replaces ``path`` on success.

    The body writes a file or a directory at the yielded path. On normal exit
    it is renamed onto ``path`` (replacing what was there); on an exception it
    is removed and ``path`` is left untouched.

    Args:
        path: The final location of the file or directory.

    Yields:
        ``.{name}.tmp-<host>-<pid>`` in the same directory, so the rename
        stays on one file system and is atomic.

    Raises:
        ChesFilterError: the file system refused the write (full disk,
            permissions): one line naming the path; the temporary is removed.
    """
    with atomic_paths([path]) as (tmp,), writing(path):
        yield tmp


@contextlib.contextmanager
def atomic_paths(paths: Sequence[str]) -> Iterator[list[str]]:
    """Like :func:`atomic_path` for outputs that belong together: all of them replace their paths, or none.

    The body writes every temporary. Then each is flushed to disk (``fsync``,
    where a full disk or an I/O error surfaces) before the first rename, so a
    failure anywhere leaves every earlier output untouched; the renames that
    follow stay in their own directories and need no space.

    Yields:
        One temporary sibling per path, in order. An ``OSError`` of the body is
        not translated (the body knows which file it was writing: wrap it in
        :func:`writing`); one of the flush or the renames names its path.
    """
    named = [os.fspath(p) for p in paths]
    targets = [os.path.abspath(p) for p in named]
    tmps = [sibling(target, "tmp") for target in targets]
    try:
        for tmp, path in zip(tmps, named):
            with writing(path):
                remove(tmp)  # left behind by a killed run that had the same host and pid
            _remove_stale_siblings(path)  # ... or by killed runs with other pids
        yield tmps
        for tmp, path in zip(tmps, named):
            if not os.path.lexists(tmp):
                raise RuntimeError(f"atomic_paths body wrote nothing at {tmp}")
            with writing(path):
                fsync_tree(tmp)
        for tmp, target, path in zip(tmps, targets, named):
            with writing(path):
                _commit(tmp, target)
    finally:
        for tmp in tmps:
            try:
                remove(tmp)  # a no-op after a successful commit
            except OSError as exc:
                logger.warning("could not remove temporary %s: %s", tmp, exc)
