"""The work directory of one resumable job: parts, manifest, stats, completion markers, locks.

Layout (datatrove style; default ``OUTPUT.parts/``)::

    manifest.json                          what is computed: flags, model, input fingerprint, grid
    parts/000000000000-000000001000.rank-00000.parquet    rows [0, 1000), written by worker 0
    stats/rank-00000.json                  per worker and run: parts of its own share/skipped/written, rows, seconds
    completions/shard-00000-of-00001.json  shard 0 of 1 has every one of its parts
    locks/shard-00000-of-00001.lock        held by the running process of that shard (pid, host)
    claims/shard-00000-of-00001-LAUNCH/000000000000-000000001000
                                           under torchrun: which rank took which part (O_EXCL, first wins)

``validate`` locks its output directory the same way (``OUT_DIR/locks/validate.lock``).

Every file is written through one atomic writer (:func:`ches_filter.atomic.atomic_path`):
a temporary sibling, fsync, rename. A file on disk is therefore always
complete, and a full disk or a refused write is one line naming the path, with
the temporary removed. The manifest alone is created first-wins (``os.link``),
because concurrent shards race to create it.
"""

from __future__ import annotations

import datetime
import errno
import glob
import json
import logging
import os
import re
import shutil
import socket
import time
from typing import Any

from ..atomic import atomic_path, writing
from ..errors import BadDataError, BadFlagError
from ..procs import pid_alive

# pyarrow is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["WorkDir", "MANIFEST_FORMAT", "read_manifest", "default_work_dir", "check_work_dir"]

MANIFEST_FORMAT = 1
_PART_NAME = re.compile(r"^(\d{12})-(\d{12})\.rank-(\d{5})\.parquet$")
_OURS = frozenset({"parts", "stats", "completions", "locks", "claims"})
_UNREADABLE_LOCK_S = 60.0


def default_work_dir(output: str) -> str:
    """``OUTPUT.parts`` beside the output file."""
    return os.fspath(output) + ".parts"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


class WorkDir:
    """The files of one resumable job (see the module docstring for the layout)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.manifest_path = os.path.join(self.path, "manifest.json")
        self.parts_dir = os.path.join(self.path, "parts")
        self.stats_dir = os.path.join(self.path, "stats")
        self.completions_dir = os.path.join(self.path, "completions")
        self.locks_dir = os.path.join(self.path, "locks")

    @property
    def trash(self) -> str:
        """Where :meth:`remove` moves the directory before deleting it."""
        parent, name = os.path.split(self.path)
        return os.path.join(parent, f".{name}.deleting")

    # ------------------------------------------------------------ manifest
    def read_manifest(self) -> dict | None:
        """The manifest, or None when the directory holds none."""
        return read_manifest(self.manifest_path)

    def create_manifest(self, manifest: dict) -> dict:
        """Write ``manifest`` unless one exists; return the one on disk.

        Concurrent shards race here: ``os.link`` creates the file only if it is
        absent, so exactly one wins and the others compare against it.
        """
        with writing(self.manifest_path):
            for sub in (self.parts_dir, self.stats_dir, self.completions_dir):
                os.makedirs(sub, exist_ok=True)
            tmp = f"{self.manifest_path}.tmp-{socket.gethostname()}-{os.getpid()}"
            try:
                with open(tmp, "w", encoding="utf-8") as handle:
                    json.dump(manifest, handle, indent=2, sort_keys=True)
                    handle.flush()
                    os.fsync(handle.fileno())
                try:
                    os.link(tmp, self.manifest_path)
                except FileExistsError:
                    pass
                except OSError as exc:
                    if exc.errno == errno.ENOSPC:  # a full disk, not a file system without links
                        raise
                    # File systems without hard links: an exclusive create is still first-wins.
                    try:
                        with open(self.manifest_path, "x", encoding="utf-8") as handle:
                            json.dump(manifest, handle, indent=2, sort_keys=True)
                    except FileExistsError:
                        pass
            finally:
                if os.path.lexists(tmp):
                    os.unlink(tmp)
        return self.read_manifest() or manifest

    # --------------------------------------------------------------- shape
    def check_shape(self) -> None:
        """Refuse a path that is not, and cannot become, a work directory of ours.

        The directory is deleted as a whole after assembly, so it must not hold
        anything else: a non-empty directory without a manifest is refused.
        """
        if not os.path.lexists(self.path):
            return
        if not os.path.isdir(self.path):
            raise BadFlagError(f"the work directory {self.path} exists and is not a directory; pass another `--work-dir`")
        if self.read_manifest() is not None:
            return
        foreign = [n for n in os.listdir(self.path) if n not in _OURS and not n.startswith("manifest.json.tmp-")]
        if foreign or self.scan_parts():
            what = "score parts" if not foreign else f"other files ({', '.join(sorted(foreign)[:3])})"
            raise BadFlagError(
                f"the work directory {self.path} holds {what} but no manifest.json, so it is not a ches-filter "
                "work directory this run can use; pass another `--work-dir`, or delete it if it is a leftover"
            )

    # --------------------------------------------------------------- parts
    def scan_parts(self) -> dict[tuple[int, int], str]:
        """Finished parts by row range (a range written twice keeps the first name)."""
        found: dict[tuple[int, int], str] = {}
        if not os.path.isdir(self.parts_dir):
            return found
        for name in sorted(os.listdir(self.parts_dir)):
            match = _PART_NAME.match(name)
            if match is None:
                continue  # temporaries of parts in flight, or files a user dropped here
            found.setdefault((int(match.group(1)), int(match.group(2))), os.path.join(self.parts_dir, name))
        return found

    def part_path(self, start: int, stop: int, worker: int) -> str:
        return os.path.join(self.parts_dir, f"{start:012d}-{stop:012d}.rank-{worker:05d}.parquet")

    def write_part(self, table: Any, start: int, stop: int, worker: int) -> str:
        """Write one part atomically."""
        import pyarrow.parquet as pq

        path = self.part_path(start, stop, worker)
        with writing(path):
            os.makedirs(self.parts_dir, exist_ok=True)
        with atomic_path(path) as tmp:
            pq.write_table(table, tmp)
        return path

    def remove_temporaries(self) -> None:
        """Delete temporaries of parts whose writer was killed (redone since)."""
        if not os.path.isdir(self.parts_dir):
            return
        for name in os.listdir(self.parts_dir):
            if name.startswith(".") and ".tmp-" in name:
                os.unlink(os.path.join(self.parts_dir, name))

    # -------------------------------------------------------------- claims
    def claims_dir(self, shard: int, num_shards: int, launch: str) -> str:
        """Where the ranks of one ``torchrun`` launch claim this shard's parts."""
        return os.path.join(self.path, "claims", f"shard-{shard:05d}-of-{num_shards:05d}-{launch}")

    def claim(self, claims_dir: str, start: int, stop: int) -> bool:
        """Claim part ``[start, stop)`` for this process: True for exactly one caller (``O_CREAT | O_EXCL``)."""
        path = os.path.join(claims_dir, f"{start:012d}-{stop:012d}")
        with writing(path):
            os.makedirs(claims_dir, exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                return False
            os.close(fd)
        return True

    def remove_claims(self, shard: int, num_shards: int, *, only_empty: bool = False) -> None:
        """Delete the claims of this shard's earlier launches (the caller holds the shard's lock).

        With ``only_empty``, remove just the ``claims`` directory itself if nothing is left in it.
        """
        root = os.path.join(self.path, "claims")
        if not only_empty:
            for path in glob.glob(os.path.join(glob.escape(root), f"shard-{shard:05d}-of-{num_shards:05d}-*")):
                shutil.rmtree(path, ignore_errors=True)
        try:
            os.rmdir(root)
        except OSError:
            pass

    # --------------------------------------------------------------- stats
    def stats_path(self, worker: int) -> str:
        return os.path.join(self.stats_dir, f"rank-{worker:05d}.json")

    def write_stats(self, worker: int, runs: list[dict]) -> None:
        _write_text(self.stats_path(worker), json.dumps({"worker": worker, "runs": runs}, indent=2))

    def read_stats(self, worker: int) -> list[dict]:
        try:
            with open(self.stats_path(worker), encoding="utf-8") as handle:
                return list(json.load(handle).get("runs", []))
        except (OSError, ValueError, AttributeError):
            return []

    # --------------------------------------------------------- completions
    def completion_path(self, shard: int, num_shards: int) -> str:
        return os.path.join(self.completions_dir, f"shard-{shard:05d}-of-{num_shards:05d}.json")

    def mark_complete(self, shard: int, num_shards: int, info: dict) -> None:
        _write_text(self.completion_path(shard, num_shards), json.dumps(info, indent=2))

    def completed_shards(self) -> dict[int, set[int]]:
        """Shard indices with a completion marker, by shard count."""
        done: dict[int, set[int]] = {}
        for path in glob.glob(os.path.join(glob.escape(self.completions_dir), "shard-*-of-*.json")):  # `d[1].parts` is a name
            match = re.search(r"shard-(\d+)-of-(\d+)\.json$", path)
            if match:
                done.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
        return done

    # --------------------------------------------------------------- locks
    def lock_path(self, shard: int, num_shards: int) -> str:
        return os.path.join(self.locks_dir, f"shard-{shard:05d}-of-{num_shards:05d}.lock")

    def acquire(self, shard: int = 0, num_shards: int = 1, *, name: str | None = None) -> str:
        """Take the lock of one shard (or the lock ``locks/NAME.lock``); refuse at once if a live run holds it.

        The lock file is created with ``O_CREAT | O_EXCL`` and holds the pid,
        host and start time of its owner. A lock whose owner ran on this host
        and is gone (kill -9, power loss) is stale and taken over; a lock from
        another host cannot be checked and is refused with the way to clear it.

        Returns:
            The lock file's path (pass it to :meth:`release`).

        Raises:
            BadFlagError: another run holds the lock; nothing was written.
        """
        path = self.lock_path(shard, num_shards) if name is None else os.path.join(self.locks_dir, f"{name}.lock")
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": now()}
        existed = os.path.isdir(self.path)
        with writing(path):
            os.makedirs(self.locks_dir, exist_ok=True)
        for _attempt in range(2):
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                if os.path.isdir(path) and not os.path.islink(path):
                    raise BadFlagError(
                        f"{path} is a directory where ches-filter keeps a lock file; nothing of ours made it, so it "
                        "is not deleted: remove it and rerun"
                    ) from None
                owner = self._lock_owner(path)
                if self._stale(owner, path):
                    if owner is None:
                        logger.warning("taking over the unreadable lock %s (older than %.0f s)", path, _UNREADABLE_LOCK_S)
                    else:
                        logger.warning("taking over the stale lock of pid %s on %s (no such process)",
                                       owner.get("pid"), owner.get("host"))
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        pass
                    continue
                who = (f"pid {owner.get('pid')} on host {owner.get('host')}, started {owner.get('started')}"
                       if owner else "a process whose lock file is unreadable")
                shard_text = f" (shard {shard} of {num_shards})" if name is None and num_shards > 1 else ""
                raise BadFlagError(
                    f"another ches-filter run is using the work directory {self.path}{shard_text}: {who}. "
                    f"Wait for it to finish; if it is no longer running, delete {path} and rerun"
                ) from None
            try:
                with writing(path):
                    with os.fdopen(fd, "w", encoding="utf-8") as handle:
                        json.dump(record, handle)
            except BaseException:
                # e.g. a full disk: an empty lock file must not block the rerun
                os.unlink(path)
                self._remove_if_empty(remove_dir=not existed)  # never a directory the run found
                raise
            return path
        raise BadFlagError(f"could not take the lock {path}: it keeps changing; is another run starting there?")

    @staticmethod
    def _lock_owner(path: str) -> dict | None:
        try:
            with open(path, encoding="utf-8") as handle:
                owner = json.load(handle)
            return owner if isinstance(owner, dict) else None
        except (OSError, ValueError):
            return None

    @staticmethod
    def _stale(owner: dict | None, path: str) -> bool:
        """A lock whose owner on this host is gone, or an unreadable one older than a minute.

        A live owner writes its record right after creating the file, so an
        empty or garbled lock file that old was left by a crash in between.
        """
        if owner is None:
            try:
                return time.time() - os.path.getmtime(path) > _UNREADABLE_LOCK_S
            except OSError:
                return True
        pid = owner.get("pid")
        return (owner.get("host") == socket.gethostname() and isinstance(pid, int) and not isinstance(pid, bool)
                and pid > 0 and not pid_alive(pid))

    def _remove_if_empty(self, remove_dir: bool = True) -> None:
        for directory in (self.locks_dir, self.path) if remove_dir else (self.locks_dir,):
            try:
                os.rmdir(directory)
            except OSError:
                return

    @staticmethod
    def release(lock: str | None, *, remove_dir: bool = True) -> None:
        """Delete a lock this process holds (a no-op once the directory is gone).

        The ``locks`` directory and (unless ``remove_dir`` is False: a directory
        that existed before the run) the work directory itself go too when that
        leaves them empty: a run that only took the lock leaves nothing behind.
        """
        if lock is None:
            return
        try:
            with open(lock, encoding="utf-8") as handle:
                owner = json.load(handle)
            if owner.get("pid") == os.getpid() and owner.get("host") == socket.gethostname():
                os.unlink(lock)
        except (OSError, ValueError, AttributeError):
            return
        WorkDir(os.path.dirname(os.path.dirname(lock)))._remove_if_empty(remove_dir)

    # -------------------------------------------------------------- remove
    def remove(self) -> None:
        """Delete the directory: first renamed aside, so a half-deleted one is never read as a job."""
        if not os.path.exists(self.path):
            return
        if self.read_manifest() is None:
            if set(os.listdir(self.path)) - {"locks"}:
                logger.warning("not deleting %s: it holds no manifest.json", self.path)
            return  # (a directory holding only a lock goes when its holder releases it)
        shutil.rmtree(self.trash, ignore_errors=True)
        os.replace(self.path, self.trash)
        shutil.rmtree(self.trash, ignore_errors=True)


def read_manifest(path: str) -> dict | None:
    """The manifest at ``path``, None if absent; a corrupt one is bad data naming the fix."""
    try:
        with open(path, encoding="utf-8") as handle:
            manifest = json.load(handle)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise BadDataError(
            f"{path} cannot be read ({exc}); delete its directory to start over, or pass another `--work-dir`"
        ) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise BadDataError(
            f"{path} is not a ches-filter manifest of format {MANIFEST_FORMAT}; delete its directory "
            "to start over, or pass another `--work-dir`"
        )
    return manifest


def check_work_dir(work: WorkDir, inputs: list[str]) -> None:
    """Refuse a work directory that overlaps an input or whose parent does not exist."""
    real = os.path.realpath(work.path)
    for source in inputs:
        source_real = os.path.realpath(source)
        inside = os.path.commonpath([real, source_real]) == source_real
        holds = os.path.commonpath([real, source_real]) == real
        if os.path.exists(source) and (inside or holds):
            raise BadFlagError(
                f"`--work-dir` {work.path} overlaps the input {source}; choose a work directory outside it"
            )
    if not os.path.isdir(os.path.dirname(real)):
        raise BadFlagError(f"the parent directory of `--work-dir` {work.path} does not exist; create it first")
