"""The one scoring pipeline: read → normalise → encode → engine → measures → rank-stamped parts → assemble.

Every command that scores goes through :func:`run_job`: ``score`` (then
:func:`~ches_filter.run.merge.assemble` into a file, :func:`score_to_file`),
``prune`` and ``validate`` (then :func:`~ches_filter.run.merge.assemble_table`
into memory, :func:`score_to_table`; so does :func:`ches_filter.score_pairs`
under torchrun, which otherwise scores in memory with the same scorer and
grid). So resume, shards, torchrun, progress, locking and metadata exist once:

* Rows are cut into **parts** on a fixed grid of ``checkpoint_every`` rows
  (:func:`~ches_filter.run.topology.part_grid`). Each part is scored, then
  written atomically to the work directory, so a part on disk is always
  complete. A rerun of the same command skips the parts already there:
  SIGKILL at any moment costs at most the one part in flight per process.
* The grid depends on the input's row count and ``--checkpoint-every`` only,
  never on how many processes run, and a part always splits into the same
  chunks and batches. So a resumed or rerun job, or one split over processes
  with the same threads per process on the same hardware, writes bit for bit
  the scores of one uninterrupted process; other thread counts or hardware
  agree to float32 rounding of the terms (docs/distributed.md).
* Under ``torchrun`` each rank first claims the parts of its own contiguous
  share, then takes over parts of the others' shares that nobody has claimed
  yet, first come first served, through claim files created with ``O_EXCL``
  in ``WORK/claims/`` (:meth:`WorkDir.claim`): a slow rank does not hold the
  others back, and no part is scored twice.
* Rank 0 of each shard holds the shard's lock for the whole run; a second run
  on the same work directory is refused at once and writes nothing.
* A rerun whose model, input or score-affecting flags differ from the
  manifest's is refused with the list of differences; nothing is mixed.

The work directory's files are described in :mod:`ches_filter.run.workdir`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator

from ..config import JobConfig, ScoreConfig
from ..errors import BadDataError, BadFlagError, ChesFilterError
from ..inputs import input_fingerprint, input_paths, load_input
from ..paths import check_output_path
from ..scoring import build_scorer, merge_counts, status_counts
from . import manifest as ids
from .merge import assemble, assemble_table, ranges_text
from .topology import Group, Topology, part_grid, select_device, shard_slice
from .workdir import MANIFEST_FORMAT, WorkDir, check_work_dir, default_work_dir, now, read_manifest

# tqdm is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["score_to_file", "score_to_table", "run_job", "JobResult"]


def _rows(ranges: list[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


@dataclass
class JobResult:
    """What :func:`run_job` did in this process.

    Attributes:
        rows: input rows.
        parts: parts of this shard; ``parts_skipped`` were done before,
            ``parts_written``/``rows_scored`` by this process now.
        shard_complete: this rank is rank 0 and every part of its shard exists
            (False on other ranks).
        metadata: the score metadata (model, layout, fingerprint, ...).
        already_complete: ``output`` already held this job's result.
    """

    rows: int = 0
    parts: int = 0
    parts_skipped: int = 0
    parts_written: int = 0
    rows_scored: int = 0
    shard_complete: bool = False
    already_complete: bool = False
    metadata: dict = field(default_factory=dict)
    topology: Topology = field(default_factory=Topology)
    work: WorkDir | None = None


class _Progress:
    """A progress bar on rank 0 that counts the rows of every rank."""

    def __init__(self, group: Group, *, total: int, initial: int, todo: int, show: bool, key: str) -> None:
        from tqdm.auto import tqdm

        self.group, self.initial, self.todo, self.key = group, initial, todo, key
        self.shared = group.active and group.store is not None
        self.done = 0
        self.bar = tqdm(
            total=total, initial=initial, unit="pair", desc="scoring", dynamic_ncols=True,
            disable=not show or group.topology.rank != 0,
        )

    def advance(self, rows: int) -> None:
        if not self.shared:
            self.bar.update(rows)
            return
        self._show(int(self.group.store.add(self.key, rows)))

    def _show(self, done: int) -> None:
        if self.group.topology.rank == 0 and done != self.done:
            self.done = done
            self.bar.n = self.initial + done
            self.bar.refresh()

    def wait_for_others(self) -> None:
        """Rank 0 keeps the bar moving until every rank has scored its rows."""
        if not self.shared or self.group.topology.rank != 0:
            return
        while True:
            done = int(self.group.store.add(self.key, 0))
            self._show(done)
            if done >= self.todo:
                return
            time.sleep(0.5)

    def close(self) -> None:
        self.bar.close()


def _finished_before(output: str | None, work: WorkDir, manifest: dict | None, identity: dict, overwrite: bool) -> bool:
    """Whether ``output`` is already this job's result (a rerun after the final rename)."""
    if output is None:
        return False
    candidates = []
    if os.path.isdir(work.trash):  # killed while deleting the work directory
        try:
            candidates.append(read_manifest(os.path.join(work.trash, "manifest.json")))
        except BadDataError:
            pass
    if not overwrite:
        candidates.append(manifest)
    return any(c is not None and c.get("identity") == identity and ids.output_matches(output, c) for c in candidates)


def _settle_manifest(work: WorkDir, manifest: dict | None, wanted: dict, group: Group) -> dict:
    """The manifest on disk, written by rank 0 if there is none yet; checked against ``wanted``."""
    if manifest is None:
        if group.topology.rank == 0:
            work.create_manifest(wanted)
        group.barrier()
        manifest = work.read_manifest()
        if manifest is None:
            raise BadDataError(f"{work.manifest_path} vanished while starting; is another job deleting {work.path}?")
    # Concurrent shards may have raced to write it: compare against the winner's.
    ids.check_identity(work, manifest, wanted["identity"])
    ids.check_model(work, manifest, wanted["model"])
    return manifest


def _plan(work: WorkDir, num_rows: int, every: int, group: Group) -> dict:
    """This shard's parts, which are done, which are left, and this rank's share of those.

    Rank 0 lists the directory and sends the plan, so every rank of a launch
    works from the same listing even on a lagging network file system.
    """
    topology = group.topology
    shard = shard_slice(part_grid(num_rows, every), topology.shard_index, topology.num_shards)
    plan = None
    if topology.rank == 0:
        present = work.scan_parts()
        launch = uuid.uuid4().hex
        plan = {
            "done": [p for p in shard if p in present],
            "todo": [p for p in shard if p not in present],
            "key": f"ches_filter/progress/{launch}",
            "claims": None,
        }
        if topology.world_size > 1:
            # This shard's lock is held, so claims of its earlier launches are stale.
            work.remove_claims(topology.shard_index, topology.num_shards)
            plan["claims"] = work.claims_dir(topology.shard_index, topology.num_shards, launch)
    plan = group.broadcast(plan)
    plan["shard"] = shard
    plan["done"] = [tuple(p) for p in plan["done"]]
    plan["todo"] = [tuple(p) for p in plan["todo"]]
    plan["mine"] = shard_slice(plan["todo"], topology.rank, topology.world_size)
    return plan


def _log_plan(plan: dict, work: WorkDir, every: int, topology: Topology) -> str:
    where = f"shard {topology.shard_index} of {topology.num_shards}: " if topology.num_shards > 1 else ""
    done, shard, todo = plan["done"], plan["shard"], plan["todo"]
    if done:
        logger.info("%sresuming: %d of %d parts (%d rows) already in %s, skipping them; %d parts to score",
                    where, len(done), len(shard), _rows(done), work.path, len(todo))
    else:
        logger.info("%s%d parts of up to %d rows to score; partial results go to %s",
                    where, len(shard), every, work.path)
    if topology.world_size > 1:
        logger.info("rank %d of %d starts on its %d parts, then takes over parts the other ranks have not started",
                    topology.rank, topology.world_size, len(plan["mine"]))
    return where


def _claimed(work: WorkDir, plan: dict, topology: Topology) -> Iterator[tuple[int, int]]:
    """The parts this rank scores, claimed one at a time as the scorer asks for the next.

    Its own share first, in order; then, from the last part backwards, the
    parts of the other ranks' shares that nobody has claimed (their owners
    work forwards, so they meet in the middle). One process: no claims.
    """
    if plan.get("claims") is None:
        yield from plan["mine"]
        return
    mine = set(plan["mine"])
    for part in plan["mine"] + [p for p in reversed(plan["todo"]) if p not in mine]:
        if work.claim(plan["claims"], *part):
            yield part


def _score_parts(scorer: Any, work: WorkDir, plan: dict, group: Group, show: bool) -> dict:
    """Score this rank's parts, writing each as it finishes; return this run's stats record."""
    topology = group.topology
    bar = _Progress(group, total=_rows(plan["shard"]), initial=_rows(plan["done"]), todo=_rows(plan["todo"]),
                    show=show, key=plan["key"])
    runs = work.read_stats(topology.worker)
    run = {
        "started": now(), "host": socket.gethostname(), "pid": os.getpid(),
        "rank": topology.rank, "world_size": topology.world_size,
        "shard_index": topology.shard_index, "num_shards": topology.num_shards,
        "parts_in_shard": len(plan["shard"]), "parts_skipped": len(plan["done"]), "parts_own_share": len(plan["mine"]),
        "parts_written": 0, "rows_scored": 0, "counts": {}, "seconds": 0.0, "finished": False,
    }
    runs.append(run)
    work.write_stats(topology.worker, runs)
    t0 = time.time()
    try:
        for start, stop, table in scorer.score_ranges(_claimed(work, plan, topology), on_rows=bar.advance):
            work.write_part(table, start, stop, topology.worker)
            run["parts_written"] += 1
            run["rows_scored"] += stop - start
            merge_counts(run["counts"], status_counts(table.column("status")))
            run["seconds"] = round(time.time() - t0, 3)
            work.write_stats(topology.worker, runs)
        run.update(finished=True, seconds=round(time.time() - t0, 3))
        work.write_stats(topology.worker, runs)
        bar.wait_for_others()
    finally:
        bar.close()
    return run


def run_job(
    data: Any,
    config: ScoreConfig,
    job: JobConfig,
    work: WorkDir,
    *,
    output: str | None = None,
    overwrite: bool = False,
    model: Any = None,
    progress: bool | None = None,
    prepared: tuple[Any, str, Any] | None = None,
) -> JobResult:
    """Score this process's share of ``data`` into ``work``'s parts.

    Under ``torchrun`` every rank calls this. It takes the shard's lock (rank
    0), opens the input (rank 0 first, the others then read its Arrow cache),
    fingerprints it, settles the manifest, scores this rank's parts and, on
    rank 0, marks the shard complete once every part exists.

    Args:
        data: a path, a ``datasets.Dataset`` or a list of row dicts.
        config: how to read and score.
        job: work directory, checkpoint size and shard.
        work: the work directory (already checked by the caller).
        output: the file the job's result will be assembled into, if any:
            a rerun finds it complete there.
        overwrite: ``output`` may be replaced.
        model: an already loaded model (single process only).
        progress: show a progress bar on rank 0 (default: not ``config.quiet``).
        prepared: ``(dataset, layout, columns)`` already opened by
            :func:`ches_filter.inputs.load_input` (skips a second read).

    Returns:
        A :class:`JobResult`.
    """
    with _locked(work, job) as topology:
        if topology.world_size > 1 and model is not None:
            raise BadFlagError("model=... works in one process only; under torchrun each rank loads its own")
        config, cuda = select_device(config, topology)
        group = Group(topology, cuda=cuda)
        try:
            return _run(data, config, job, work, group, output=output, overwrite=overwrite, model=model,
                        progress=progress, prepared=prepared)
        finally:
            group.close()


@contextlib.contextmanager
def _locked(work: WorkDir, job: JobConfig) -> Iterator[Topology]:
    """This process's topology, with its shard's lock held (rank 0) until the block ends.

    Re-entrant within one process: the caller that assembles after the job
    (``score_to_file``) holds the lock across both.
    """
    topology = Topology.from_env(job.shard_index or 0, job.num_shards)
    key = (work.path, topology.shard_index, topology.num_shards)
    if topology.rank != 0 or key in _HELD:
        yield topology
        return
    lock = work.acquire(topology.shard_index, topology.num_shards)
    _HELD.add(key)
    try:
        yield topology
    finally:
        _HELD.discard(key)
        if os.path.isdir(work.path):
            WorkDir.release(lock)


#: Locks this process holds, by (work dir, shard, shards).
_HELD: set[tuple[str, int, int]] = set()


def _run(data, config, job, work, group, *, output, overwrite, model, progress, prepared) -> JobResult:
    topology = group.topology
    # Rank 0 converts the input to Arrow first; the others then read its cache.
    if topology.rank != 0:
        group.barrier()
    ds, layout, columns = prepared if prepared is not None else load_input(data, config)
    if topology.rank == 0:
        group.barrier()
    fingerprint = input_fingerprint(ds, layout, columns, config.chunk_size)
    every = job.part_rows(len(ds))
    identity = ids.identity(config, every, layout=layout, fingerprint=fingerprint, num_rows=len(ds))
    result = JobResult(rows=len(ds), topology=topology, work=work)
    manifest = work.read_manifest()
    if _finished_before(output, work, manifest, identity, overwrite):
        logger.info("%s is already complete%s", output, "" if job.keep_work_dir else "; removing the leftover work directory")
        group.barrier()
        if topology.rank == 0:
            shutil.rmtree(work.trash, ignore_errors=True)
        result.already_complete = True
        return result
    if topology.rank == 0:
        shutil.rmtree(work.trash, ignore_errors=True)
    if manifest is not None:  # refuse before spending minutes loading a model, naming what differs
        ids.check_identity(work, manifest, identity)
    if output is not None and os.path.lexists(output) and not overwrite:
        raise BadFlagError(f"{output} exists; pass `--overwrite` to replace it.")

    scorer = build_scorer(ds, layout, columns, config, model)
    template = scorer.metadata(data=data, fingerprint=fingerprint, counts={})
    del template["counts"]
    wanted = {
        "format": MANIFEST_FORMAT, "identity": identity, "model": ids.model_identity(scorer), "metadata": template,
        "grid": {"num_rows": len(ds), "checkpoint_every": every}, "created": now(),
    }
    _settle_manifest(work, manifest, wanted, group)
    plan = _plan(work, len(ds), every, group)
    where = _log_plan(plan, work, every, topology)
    run = _score_parts(scorer, work, plan, group, show=(not config.quiet) if progress is None else progress)
    result.parts, result.parts_skipped = len(plan["shard"]), len(plan["done"])
    result.parts_written, result.rows_scored, result.metadata = run["parts_written"], run["rows_scored"], template
    group.barrier()
    if topology.rank != 0:
        return result
    if plan.get("claims") is not None:
        shutil.rmtree(plan["claims"], ignore_errors=True)
        work.remove_claims(topology.shard_index, topology.num_shards, only_empty=True)
    missing = [p for p in plan["shard"] if p not in work.scan_parts()]
    if missing:
        raise ChesFilterError(
            f"rows {ranges_text(missing)} of {where or 'the input'} have no part in {work.path} although every "
            "process finished; was the directory changed meanwhile? Rerun the same command to score them"
        )
    work.mark_complete(topology.shard_index, topology.num_shards, {
        "shard_index": topology.shard_index, "num_shards": topology.num_shards, "parts": len(plan["shard"]),
        "rows": _rows(plan["shard"]), "finished": now(),
    })
    result.shard_complete = True
    if topology.num_shards > 1:
        logger.info("shard %d of %d is complete; when every shard is, join them with `ches-filter merge %s -o %s`",
                    topology.shard_index, topology.num_shards, work.path, output)
    return result


def _open_work_dir(data: Any, work_dir: str, output: str | None) -> WorkDir:
    work = WorkDir(work_dir)
    if output is not None and os.path.realpath(work.path) == os.path.realpath(output):
        raise BadFlagError("`--work-dir` must differ from `--output`")
    check_work_dir(work, input_paths(data))
    work.check_shape()
    return work


def score_to_file(
    data: Any,
    output: str,
    config: ScoreConfig | None = None,
    job: JobConfig | None = None,
    *,
    overwrite: bool = False,
    model: Any = None,
    progress: bool | None = None,
) -> dict:
    """Score ``data`` into the Parquet file ``output``: resumable, sharded, data parallel.

    Under ``torchrun`` every rank calls this; rank 0 assembles. With
    ``job.num_shards > 1`` this process scores its shard only and the output
    is written by :func:`~ches_filter.run.merge.merge_work_dir` once every
    shard is done.

    Args:
        data: a path (see :func:`ches_filter.sources.read_dataset`), a
            ``datasets.Dataset`` or a list of row dicts.
        output: the score file (``.parquet``) to write.
        config: how to read and score (:class:`~ches_filter.config.ScoreConfig`).
        job: work directory, checkpoint size and shard (:class:`~ches_filter.config.JobConfig`).
        overwrite: replace an existing ``output``.
        model: an already loaded model (single process only).
        progress: show a progress bar on rank 0 (default: not ``config.quiet``).

    Returns:
        A summary: ``rows``, ``parts`` (of this shard), ``parts_skipped``,
        ``parts_written`` and ``rows_scored`` (by this process), ``counts``
        (of the whole output, or None when nothing was assembled), ``output``
        (or None), ``work_dir``, ``already_complete``.

    Raises:
        BadFlagError: the output exists without ``overwrite``, would clobber the
            input, the work directory holds a different run, or another run holds it.
        BadDataError: the input cannot be read.
    """
    config = config or ScoreConfig()
    job = job or JobConfig()
    output = os.fspath(output)
    # The input-clobbering checks of check_output_path; "exists" is decided below.
    check_output_path(output, inputs=input_paths(data), overwrite=True)
    work = _open_work_dir(data, job.work_dir or default_work_dir(output), output)
    if os.path.lexists(output) and not overwrite and not os.path.exists(work.manifest_path) and not os.path.isdir(work.trash):
        # Nothing could show that this output is a finished run of this command.
        raise BadFlagError(f"{output} exists; pass `--overwrite` to replace it.")
    with _locked(work, job):
        return _score_to_file(data, output, config, job, work, overwrite=overwrite, model=model, progress=progress)


def _score_to_file(data, output, config, job, work, *, overwrite, model, progress) -> dict:
    result = run_job(data, config, job, work, output=output, overwrite=overwrite, model=model, progress=progress)
    summary: dict[str, Any] = {
        "rows": result.rows, "parts": result.parts, "parts_skipped": result.parts_skipped,
        "parts_written": result.parts_written, "rows_scored": result.rows_scored,
        "counts": None, "output": None, "work_dir": work.path, "already_complete": result.already_complete,
    }
    if result.already_complete:
        if result.topology.rank == 0 and not job.keep_work_dir:
            work.remove()  # its lock was released: a directory that only held it is gone already
        return dict(summary, output=output)
    if not result.shard_complete or result.topology.num_shards > 1:
        return summary
    counts = assemble(work, output, overwrite=overwrite, input_name=result.metadata.get("input"))
    if not job.keep_work_dir:
        work.remove()
    return dict(summary, counts=counts, output=output)


def score_to_table(
    data: Any,
    config: ScoreConfig | None = None,
    job: JobConfig | None = None,
    *,
    output: str | None = None,
    model: Any = None,
    progress: bool | None = None,
    prepared: tuple[Any, str, Any] | None = None,
) -> tuple[Any, WorkDir | None]:
    """Score ``data`` through the pipeline and return the score table in memory (rank 0).

    The parts go to ``job.work_dir``, else ``OUTPUT.parts`` when the caller
    will write ``output`` (``prune``), else a temporary directory that is
    removed before returning. A crash leaves the named work directory for the
    same command to resume; the caller removes it (:meth:`WorkDir.remove`)
    once its own outputs are written, unless ``job.keep_work_dir``.

    Returns:
        ``(table, work)``: the ``pyarrow.Table`` with one row per input row
        and its ``ches_filter`` metadata, and the work directory still to
        remove (None when already removed). On ranks other than 0, ``(None, None)``.
    """
    config = config or ScoreConfig()
    job = job or JobConfig()
    if job.num_shards > 1:
        raise BadFlagError("scoring into memory needs every row in one job; `--num-shards` works with `score` only")
    temporary = job.work_dir is None and output is None
    path = job.work_dir or (default_work_dir(output) if output is not None else tempfile.mkdtemp(prefix="ches-filter-"))
    try:
        work = _open_work_dir(data, path, output)
        result = run_job(data, config, job, work, model=model, progress=progress, prepared=prepared)
        if result.topology.rank != 0:
            return None, None
        table = assemble_table(work, input_name=result.metadata.get("input"))
    except BaseException:
        if temporary:
            shutil.rmtree(path, ignore_errors=True)
        raise
    if temporary:
        shutil.rmtree(path, ignore_errors=True)
        return table, None
    return table, work
