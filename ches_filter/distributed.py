"""Resumable, sharded and data-parallel scoring into one Parquet file.

:func:`score_to_file` is what ``ches-filter score`` runs. It never holds the
dataset's scores in memory and never loses finished work:

* Rows are cut into **parts** on a fixed grid of ``checkpoint_every`` rows
  (part ``j`` holds rows ``[j*C, (j+1)*C)``). Each part is scored, written to
  the work directory and renamed into place atomically, so a part on disk is
  always complete. A rerun of the same command skips the parts already there:
  SIGKILL at any moment costs at most the one part in flight per process.
* The grid does not depend on how many processes run, and a part always splits
  into the same chunks and batches, so a resumed, sharded or data-parallel run
  writes bit for bit the scores of one uninterrupted process.
* Work is split over **workers**: ``--num-shards K --shard-index i`` (independent
  jobs, e.g. a Slurm array, joined by ``ches-filter merge``) times the ranks of
  a ``torchrun`` launch. Shard ``i`` owns a fixed contiguous block of parts; the
  ranks of one launch share out the parts of their shard that are still to do,
  in contiguous runs, so a resumed launch stays balanced.
* When every part exists, rank 0 **assembles** them, in row order, into the
  output through :func:`ches_filter.io.atomic_path`: the output either does not
  exist or is complete. The work directory is then deleted unless
  ``--keep-work-dir`` is given.

Work directory layout (datatrove style; default ``OUTPUT.parts/``)::

    manifest.json                          what is computed: flags, model, input fingerprint, grid
    parts/000000000000-000000001000.rank-00000.parquet    rows [0, 1000), written by worker 0
    stats/rank-00000.json                  per worker and run: parts assigned/skipped/written, rows, seconds
    completions/shard-00000-of-00001.json  shard 0 of 1 has every one of its parts

A rerun whose model, input or score-affecting flags differ from the manifest's
is refused with the list of differences; nothing is mixed.
"""

from __future__ import annotations

import dataclasses
import datetime
import glob
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from dataclasses import dataclass
from typing import Any, Sequence

from .config import ScoreConfig
from .errors import BadDataError, BadFlagError, ChesFilterError

logger = logging.getLogger(__name__)

__all__ = [
    "JobConfig",
    "Topology",
    "WorkDir",
    "score_to_file",
    "merge_work_dir",
    "default_work_dir",
    "part_grid",
    "shard_slice",
    "torchrun_rank",
]

MANIFEST_FORMAT = 1
#: Default rows per checkpoint part: a few minutes of a 7B model on one GPU,
#: and enough parts to keep 8 GPUs busy from about 30k pairs up.
DEFAULT_CHECKPOINT_EVERY = 1000
#: ScoreConfig fields that never change a score (beyond float rounding, as a
#: different device does): they may differ on a rerun.
_FREE_FIELDS = frozenset({"quiet", "device", "trust_remote_code", "engine_workers"})
#: model.info keys that differ between the ranks of one job.
_FREE_MODEL_KEYS = frozenset({"device"})
#: Output metadata keys that a finished output shares with its work directory.
_TEMPLATE_KEYS = (
    "ches_filter_version", "model", "engine", "input_format", "token_layout", "measures", "use_chat_template",
    "columns", "input_fingerprint", "num_rows", "max_length",
)
_PART_NAME = re.compile(r"^(\d{12})-(\d{12})\.rank-(\d{5})\.parquet$")
# Parts are gathered into row groups of about this many rows in the final file:
# one row group per 1000-row part would bloat the footer of a 10M-row output.
_ROW_GROUP_ROWS = 65536
_DEFAULT_TIMEOUT_S = 7 * 24 * 3600


@dataclass
class JobConfig:
    """Where partial results go and which share of the work this process does.

    Attributes mirror the ``score`` command's options of the same names.

    Attributes:
        work_dir: directory for parts, manifest and stats (default ``OUTPUT.parts``).
        checkpoint_every: rows per part: the most work a crash can cost per process.
        num_shards: independent jobs the rows are split into (``ches-filter merge`` joins them).
        shard_index: which of them this process is, ``0 .. num_shards-1``.
        keep_work_dir: keep the work directory after the output is assembled.
    """

    work_dir: str | None = None
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    num_shards: int = 1
    shard_index: int | None = None
    keep_work_dir: bool = False

    def __post_init__(self) -> None:
        for flag in ("checkpoint_every", "num_shards"):
            value = getattr(self, flag)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise BadFlagError(f"`--{flag.replace('_', '-')}` must be a positive whole number, got {value!r}")
        if self.shard_index is None:
            if self.num_shards > 1:
                raise BadFlagError(
                    f"`--num-shards {self.num_shards}` needs `--shard-index I` with I in 0..{self.num_shards - 1}: "
                    "which share this job scores (e.g. `--shard-index $SLURM_ARRAY_TASK_ID`)"
                )
            self.shard_index = 0
        elif isinstance(self.shard_index, bool) or not isinstance(self.shard_index, int) or not 0 <= self.shard_index < self.num_shards:
            raise BadFlagError(
                f"`--shard-index` must be in 0..{self.num_shards - 1} for `--num-shards {self.num_shards}`, "
                f"got {self.shard_index!r}"
            )


@dataclass(frozen=True)
class Topology:
    """Who this process is: its ``torchrun`` rank and its ``--num-shards`` shard.

    Worker ``shard_index * world_size + rank`` of ``num_shards * world_size``
    stamps the parts it writes.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    shard_index: int = 0
    num_shards: int = 1

    @property
    def worker(self) -> int:
        return self.shard_index * self.world_size + self.rank

    @property
    def workers(self) -> int:
        return self.num_shards * self.world_size

    @classmethod
    def from_env(cls, job: JobConfig) -> "Topology":
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` as set by torchrun."""
        env = _torchrun_env()
        if env is None:
            return cls(shard_index=job.shard_index or 0, num_shards=job.num_shards)
        return cls(*env, shard_index=job.shard_index or 0, num_shards=job.num_shards)


def _torchrun_env() -> tuple[int, int, int, int] | None:
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise BadFlagError(
            "the environment variables RANK/WORLD_SIZE/LOCAL_RANK must be whole numbers; "
            "launch with `torchrun` or unset them"
        ) from None
    if world < 1 or not 0 <= rank < world:
        raise BadFlagError(f"RANK={rank} does not fit WORLD_SIZE={world}; launch with `torchrun`")
    return rank, world, local_rank, local_world


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 without it); reads the environment only."""
    env = _torchrun_env()
    return env[0] if env else 0


def default_work_dir(output: str) -> str:
    """``OUTPUT.parts`` beside the output file."""
    return os.fspath(output) + ".parts"


def part_grid(num_rows: int, every: int) -> list[tuple[int, int]]:
    """The fixed ``(start, stop)`` row ranges of every part."""
    return [(start, min(start + every, num_rows)) for start in range(0, num_rows, every)]


def shard_slice(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """The ``index``-th of ``count`` contiguous, near-equal slices of ``items``."""
    n = len(items)
    return list(items[index * n // count : (index + 1) * n // count])


def _rows(ranges: Sequence[tuple[int, int]]) -> int:
    return sum(b - a for a, b in ranges)


def _ranges_text(ranges: Sequence[tuple[int, int]], limit: int = 4) -> str:
    shown = ", ".join(f"{a}-{b - 1}" for a, b in ranges[:limit])
    return shown + (f" and {len(ranges) - limit} more" if len(ranges) > limit else "")


# --------------------------------------------------------------------------
# The work directory
# --------------------------------------------------------------------------


def _atomic_write_text(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{os.path.join(os.path.dirname(path), '.' + os.path.basename(path))}.tmp-{socket.gethostname()}-{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


class WorkDir:
    """The files of one resumable job (see the module docstring for the layout)."""

    def __init__(self, path: str) -> None:
        self.path = os.path.abspath(os.fspath(path))
        self.manifest_path = os.path.join(self.path, "manifest.json")
        self.parts_dir = os.path.join(self.path, "parts")
        self.stats_dir = os.path.join(self.path, "stats")
        self.completions_dir = os.path.join(self.path, "completions")

    @property
    def trash(self) -> str:
        """Where :meth:`remove` moves the directory before deleting it."""
        parent, name = os.path.split(self.path)
        return os.path.join(parent, f".{name}.deleting")

    def read_manifest(self) -> dict | None:
        """The manifest, or None when the directory holds none."""
        return _read_manifest(self.manifest_path)

    def create_manifest(self, manifest: dict) -> dict:
        """Write ``manifest`` unless one exists; return the one on disk.

        Concurrent shards race here: ``os.link`` creates the file only if it is
        absent, so exactly one wins and the others compare against it.
        """
        for sub in (self.parts_dir, self.stats_dir, self.completions_dir):
            os.makedirs(sub, exist_ok=True)
        tmp = f"{self.manifest_path}.tmp-{socket.gethostname()}-{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(manifest, handle, indent=2, sort_keys=True)
            handle.flush()
            os.fsync(handle.fileno())
        try:
            os.link(tmp, self.manifest_path)
        except FileExistsError:
            pass
        except OSError:
            # File systems without hard links: an exclusive create is still first-wins.
            try:
                with open(self.manifest_path, "x", encoding="utf-8") as handle:
                    json.dump(manifest, handle, indent=2, sort_keys=True)
            except FileExistsError:
                pass
        finally:
            os.unlink(tmp)
        return self.read_manifest() or manifest

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
        ours = {"parts", "stats", "completions"}
        foreign = [n for n in os.listdir(self.path) if n not in ours and not n.startswith("manifest.json.tmp-")]
        if foreign or self.scan_parts():
            what = "score parts" if not foreign else f"other files ({', '.join(sorted(foreign)[:3])})"
            raise BadFlagError(
                f"the work directory {self.path} holds {what} but no manifest.json, so it is not a ches-filter "
                "work directory this run can use; pass another `--work-dir`, or delete it if it is a leftover"
            )

    def scan_parts(self) -> dict[tuple[int, int], str]:
        """Finished parts by row range (a range written twice keeps the first name)."""
        found: dict[tuple[int, int], str] = {}
        if not os.path.isdir(self.parts_dir):
            return found
        for name in sorted(os.listdir(self.parts_dir)):
            match = _PART_NAME.match(name)
            if match is None:
                continue  # .tmp files of parts in flight, or files a user dropped here
            found.setdefault((int(match.group(1)), int(match.group(2))), os.path.join(self.parts_dir, name))
        return found

    def part_path(self, start: int, stop: int, worker: int) -> str:
        return os.path.join(self.parts_dir, f"{start:012d}-{stop:012d}.rank-{worker:05d}.parquet")

    def write_part(self, table: Any, start: int, stop: int, worker: int) -> str:
        """Write one part: to a hidden temporary name, fsync, rename into place."""
        import pyarrow.parquet as pq

        path = self.part_path(start, stop, worker)
        os.makedirs(self.parts_dir, exist_ok=True)
        tmp = os.path.join(self.parts_dir, f".{os.path.basename(path)}.tmp-{socket.gethostname()}-{os.getpid()}")
        pq.write_table(table, tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
        return path

    def stats_path(self, worker: int) -> str:
        return os.path.join(self.stats_dir, f"rank-{worker:05d}.json")

    def write_stats(self, worker: int, runs: list[dict]) -> None:
        _atomic_write_text(self.stats_path(worker), json.dumps({"worker": worker, "runs": runs}, indent=2))

    def read_stats(self, worker: int) -> list[dict]:
        try:
            with open(self.stats_path(worker), encoding="utf-8") as handle:
                return list(json.load(handle).get("runs", []))
        except (OSError, ValueError, AttributeError):
            return []

    def completion_path(self, shard: int, num_shards: int) -> str:
        return os.path.join(self.completions_dir, f"shard-{shard:05d}-of-{num_shards:05d}.json")

    def mark_complete(self, shard: int, num_shards: int, info: dict) -> None:
        _atomic_write_text(self.completion_path(shard, num_shards), json.dumps(info, indent=2))

    def completed_shards(self) -> dict[int, set[int]]:
        """Shard indices with a completion marker, by shard count."""
        done: dict[int, set[int]] = {}
        for path in glob.glob(os.path.join(self.completions_dir, "shard-*-of-*.json")):
            match = re.search(r"shard-(\d+)-of-(\d+)\.json$", path)
            if match:
                done.setdefault(int(match.group(2)), set()).add(int(match.group(1)))
        return done

    def remove(self) -> None:
        """Delete the directory: first renamed aside, so a half-deleted one is never read as a job."""
        if not os.path.exists(self.path):
            return
        if self.read_manifest() is None:
            logger.warning("not deleting %s: it holds no manifest.json", self.path)
            return
        shutil.rmtree(self.trash, ignore_errors=True)
        os.replace(self.path, self.trash)
        shutil.rmtree(self.trash, ignore_errors=True)


def _read_manifest(path: str) -> dict | None:
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


# --------------------------------------------------------------------------
# What a job computes, and refusing to mix different jobs
# --------------------------------------------------------------------------


def _identity(config: ScoreConfig, job: JobConfig, *, layout: str, fingerprint: str, num_rows: int) -> dict:
    """Everything known before the model loads that decides the scores."""
    flags = {k: v for k, v in sorted(dataclasses.asdict(config).items()) if k not in _FREE_FIELDS}
    flags["checkpoint_every"] = job.checkpoint_every
    return {"flags": flags, "layout": layout, "input_fingerprint": fingerprint, "num_rows": num_rows}


def _model_identity(scorer: Any) -> dict:
    info = {k: v for k, v in sorted(scorer.model.info.items()) if k not in _FREE_MODEL_KEYS}
    info["device_type"] = getattr(scorer.model.device, "type", str(scorer.model.device))
    # A Hub model loaded at a moving revision ("main") is pinned by the commit it resolved to.
    info["commit"] = getattr(getattr(scorer.model.decoder, "config", None), "_commit_hash", None)
    info["engine"] = scorer.engine.strategy
    return info


def _differences(stored: dict, current: dict, what: str) -> list[str]:
    out = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if what == "flags":
            out.append(f"`--{key.replace('_', '-')}` {old!r} there, {new!r} now")
        elif key == "input_fingerprint":
            out.append("the input rows differ (another file, or the file changed)")
        elif key == "num_rows":
            out.append(f"the input has {new} rows, the work directory's had {old}")
        else:
            out.append(f"{what} {key} {old!r} there, {new!r} now")
    return out


def _refuse_mix(work: WorkDir, differences: list[str]) -> None:
    if differences:
        raise BadFlagError(
            f"the work directory {work.path} holds results of a different run, so they cannot be resumed: "
            + "; ".join(differences)
            + ". Rerun with the same model, input and flags to resume, or delete that directory "
            "(or pass another `--work-dir`) to start over"
        )


def _check_identity(work: WorkDir, manifest: dict, identity: dict) -> None:
    stored = manifest.get("identity", {})
    problems = _differences(stored.get("flags", {}), identity["flags"], "flags")
    problems += _differences(
        {k: v for k, v in stored.items() if k != "flags"}, {k: v for k, v in identity.items() if k != "flags"}, "input"
    )
    _refuse_mix(work, problems)


def _check_model(work: WorkDir, manifest: dict, model_identity: dict) -> None:
    _refuse_mix(work, _differences(manifest.get("model", {}), model_identity, "model"))


def _output_matches(output: str, manifest: dict | None) -> bool:
    """Whether ``output`` is the assembled result of the job ``manifest`` describes."""
    if manifest is None or not os.path.isfile(output):
        return False
    from .io import read_table

    try:
        table, meta = read_table(output)
    except ChesFilterError:
        return False
    template = manifest.get("metadata", {})

    def comparable(meta: dict, key: str) -> Any:
        value = meta.get(key)
        if key == "model" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _FREE_MODEL_KEYS}
        return value

    return table.num_rows == template.get("num_rows") and all(
        comparable(meta, k) == comparable(template, k) for k in _TEMPLATE_KEYS
    )


# --------------------------------------------------------------------------
# torch.distributed
# --------------------------------------------------------------------------


class _Group:
    """The torchrun process group, or a stand-in that does nothing for one process.

    Only small CPU objects travel (plans, counters, barriers), so on GPUs the
    group is ``cpu:gloo,cuda:nccl``: NCCL for anything on the GPU, gloo for these.
    """

    def __init__(self, topology: Topology, *, cuda: bool) -> None:
        self.topology = topology
        self.owned = False
        self.store = None
        if topology.world_size <= 1:
            return
        import torch.distributed as dist

        if not dist.is_available():
            raise BadFlagError("this torch build has no torch.distributed; run one process per `--shard-index` instead")
        if not dist.is_initialized():
            timeout = datetime.timedelta(seconds=float(os.environ.get("CHES_FILTER_DIST_TIMEOUT_S", _DEFAULT_TIMEOUT_S)))
            backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
            dist.init_process_group(backend=backend, timeout=timeout)
            self.owned = True
            logger.info("rank %d of %d joined the %s process group", topology.rank, topology.world_size, backend)
        try:
            # The rendezvous store takes counters from every rank without lockstep.
            self.store = dist.distributed_c10d._get_default_store()
        except Exception:  # noqa: BLE001 - private API; the bar then counts rank 0's rows only
            self.store = None

    @property
    def active(self) -> bool:
        return self.topology.world_size > 1

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()
            self.owned = False


class _Progress:
    """A progress bar on rank 0 that counts the rows of every rank."""

    def __init__(self, group: _Group, *, total: int, initial: int, todo: int, show: bool, key: str) -> None:
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
        done = int(self.group.store.add(self.key, rows))
        self._show(done)

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


# --------------------------------------------------------------------------
# score_to_file
# --------------------------------------------------------------------------


def _select_device(config: ScoreConfig, topology: Topology) -> tuple[ScoreConfig, bool]:
    """One GPU per local rank under torchrun; returns the config and whether CUDA is used."""
    import torch

    cuda = torch.cuda.is_available() and (config.device in ("auto", "cuda") or config.device.startswith("cuda"))
    if config.device_map:
        if topology.local_world_size > 1 and "CUDA_VISIBLE_DEVICES" not in os.environ:
            logger.warning(
                "`--device-map %s` with %d processes on this node: each splits its model over every visible GPU. "
                "Start one process per node (`torchrun --nproc_per_node 1`) or give each its own GPUs "
                "(see docs/distributed.md)", config.device_map, topology.local_world_size,
            )
        return config, torch.cuda.is_available()
    if topology.world_size > 1 and cuda and config.device in ("auto", "cuda"):
        device = f"cuda:{topology.local_rank % torch.cuda.device_count()}"
        torch.cuda.set_device(device)
        return dataclasses.replace(config, device=device), True
    return config, cuda


def _check_work_dir(work: WorkDir, output: str, inputs: list[str]) -> None:
    real = os.path.realpath(work.path)
    if real == os.path.realpath(output):
        raise BadFlagError("`--work-dir` must differ from `--output`")
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


def _input_paths(data: Any) -> list[str]:
    return [os.fspath(data)] if isinstance(data, (str, bytes)) or hasattr(data, "__fspath__") else []


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
    is written by :func:`merge_work_dir` once every shard is done.

    Args:
        data: a path (see :func:`ches_filter.io.read_dataset`), a
            ``datasets.Dataset`` or a list of row dicts.
        output: the score file (``.parquet``) to write.
        config: how to read and score (:class:`~ches_filter.config.ScoreConfig`).
        job: work directory, checkpoint size and shard (:class:`JobConfig`).
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
            input, or the work directory holds a different run.
        BadDataError: the input cannot be read.
    """
    from .io import check_output_path

    config = config or ScoreConfig()
    job = job or JobConfig()
    output = os.fspath(output)
    work = WorkDir(job.work_dir or default_work_dir(output))
    inputs = _input_paths(data)
    # The input-clobbering checks of check_output_path; "exists" is decided below.
    check_output_path(output, inputs=inputs, overwrite=True)
    _check_work_dir(work, output, inputs)
    work.check_shape()
    if os.path.lexists(output) and not overwrite and not os.path.exists(work.manifest_path) and not os.path.isdir(work.trash):
        # Nothing could show that this output is a finished run of this command.
        raise BadFlagError(f"{output} exists; pass `--overwrite` to replace it.")
    topology = Topology.from_env(job)
    if topology.world_size > 1 and model is not None:
        raise BadFlagError("score_to_file(model=...) works in one process only; under torchrun each rank loads its own")
    config, cuda = _select_device(config, topology)
    group = _Group(topology, cuda=cuda)
    try:
        return _run(data, output, config, job, work, group, overwrite=overwrite, model=model, progress=progress)
    finally:
        group.close()


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def _finished_before(output: str, work: WorkDir, manifest: dict | None, identity: dict, overwrite: bool) -> bool:
    """Whether ``output`` is already this job's result (a rerun after the final rename)."""
    candidates = []
    if os.path.isdir(work.trash):  # killed while deleting the work directory
        try:
            candidates.append(_read_manifest(os.path.join(work.trash, "manifest.json")))
        except BadDataError:
            pass
    if not overwrite:
        candidates.append(manifest)
    return any(
        c is not None and c.get("identity") == identity and _output_matches(output, c) for c in candidates
    )


def _settle_manifest(work: WorkDir, manifest: dict | None, wanted: dict, group: _Group) -> dict:
    """The manifest on disk, written by rank 0 if there is none yet; checked against ``wanted``."""
    if manifest is None:
        if group.topology.rank == 0:
            work.create_manifest(wanted)
        group.barrier()
        manifest = work.read_manifest()
        if manifest is None:
            raise BadDataError(f"{work.manifest_path} vanished while starting; is another job deleting {work.path}?")
    # Concurrent shards may have raced to write it: compare against the winner's.
    _check_identity(work, manifest, wanted["identity"])
    _check_model(work, manifest, wanted["model"])
    return manifest


def _plan(work: WorkDir, num_rows: int, job: JobConfig, group: _Group) -> dict:
    """This shard's parts, which are done, which are left, and this rank's share of those.

    Rank 0 lists the directory and sends the plan, so every rank of a launch
    works from the same listing even on a lagging network file system.
    """
    topology = group.topology
    shard = shard_slice(part_grid(num_rows, job.checkpoint_every), topology.shard_index, topology.num_shards)
    plan = None
    if topology.rank == 0:
        present = work.scan_parts()
        plan = {
            "done": [p for p in shard if p in present],
            "todo": [p for p in shard if p not in present],
            "key": f"ches_filter/progress/{uuid.uuid4().hex}",
        }
    plan = group.broadcast(plan)
    plan["shard"] = shard
    plan["done"] = [tuple(p) for p in plan["done"]]
    plan["todo"] = [tuple(p) for p in plan["todo"]]
    plan["mine"] = shard_slice(plan["todo"], topology.rank, topology.world_size)
    return plan


def _log_plan(plan: dict, work: WorkDir, job: JobConfig, topology: Topology) -> str:
    where = f"shard {topology.shard_index} of {topology.num_shards}: " if topology.num_shards > 1 else ""
    done, shard, todo = plan["done"], plan["shard"], plan["todo"]
    if done:
        logger.info("%sresuming: %d of %d parts (%d rows) already in %s, skipping them; %d parts to score",
                    where, len(done), len(shard), _rows(done), work.path, len(todo))
    else:
        logger.info("%s%d parts of up to %d rows to score; partial results go to %s",
                    where, len(shard), job.checkpoint_every, work.path)
    if topology.world_size > 1:
        logger.info("rank %d of %d scores %d parts", topology.rank, topology.world_size, len(plan["mine"]))
    return where


def _score_parts(scorer: Any, work: WorkDir, plan: dict, group: _Group, show: bool) -> dict:
    """Score this rank's parts, writing each as it finishes; return this run's stats record."""
    from .scoring import merge_counts, status_counts

    topology = group.topology
    bar = _Progress(group, total=_rows(plan["shard"]), initial=_rows(plan["done"]), todo=_rows(plan["todo"]),
                    show=show, key=plan["key"])
    runs = work.read_stats(topology.worker)
    run = {
        "started": _now(), "host": socket.gethostname(), "pid": os.getpid(),
        "rank": topology.rank, "world_size": topology.world_size,
        "shard_index": topology.shard_index, "num_shards": topology.num_shards,
        "parts_in_shard": len(plan["shard"]), "parts_skipped": len(plan["done"]), "parts_assigned": len(plan["mine"]),
        "parts_written": 0, "rows_scored": 0, "counts": {}, "seconds": 0.0, "finished": False,
    }
    runs.append(run)
    work.write_stats(topology.worker, runs)
    t0 = time.time()
    for start, stop, table in scorer.score_ranges(plan["mine"], on_rows=bar.advance):
        work.write_part(table, start, stop, topology.worker)
        run["parts_written"] += 1
        run["rows_scored"] += stop - start
        merge_counts(run["counts"], status_counts(table.column("status")))
        run["seconds"] = round(time.time() - t0, 3)
        work.write_stats(topology.worker, runs)
    run.update(finished=True, seconds=round(time.time() - t0, 3))
    work.write_stats(topology.worker, runs)
    bar.wait_for_others()
    bar.close()
    return run


def _run(data, output, config, job, work, group, *, overwrite, model, progress) -> dict:
    from .scoring import build_scorer, input_fingerprint, load_input

    topology = group.topology
    # Rank 0 converts the input to Arrow first; the others then read its cache.
    if topology.rank != 0:
        group.barrier()
    ds, layout, columns = load_input(data, config)
    if topology.rank == 0:
        group.barrier()
    fingerprint = input_fingerprint(ds, layout, columns, config.chunk_size)
    identity = _identity(config, job, layout=layout, fingerprint=fingerprint, num_rows=len(ds))
    summary: dict[str, Any] = {
        "rows": len(ds), "parts": 0, "parts_skipped": 0, "parts_written": 0, "rows_scored": 0,
        "counts": None, "output": None, "work_dir": work.path, "already_complete": False,
    }
    manifest = work.read_manifest()
    if _finished_before(output, work, manifest, identity, overwrite):
        logger.info("%s is already complete%s", output, "" if job.keep_work_dir else "; removing the leftover work directory")
        group.barrier()
        if topology.rank == 0:
            shutil.rmtree(work.trash, ignore_errors=True)
            if not job.keep_work_dir:
                work.remove()
        return dict(summary, output=output, already_complete=True)
    if topology.rank == 0:
        shutil.rmtree(work.trash, ignore_errors=True)
    if os.path.lexists(output) and not overwrite:
        raise BadFlagError(f"{output} exists; pass `--overwrite` to replace it.")
    if manifest is not None:  # refuse before spending minutes loading a model
        _check_identity(work, manifest, identity)

    scorer = build_scorer(ds, layout, columns, config, model)
    template = scorer.metadata(data=data, fingerprint=fingerprint, counts={})
    del template["counts"]
    wanted = {
        "format": MANIFEST_FORMAT, "identity": identity, "model": _model_identity(scorer), "metadata": template,
        "grid": {"num_rows": len(ds), "checkpoint_every": job.checkpoint_every}, "created": _now(),
    }
    _settle_manifest(work, manifest, wanted, group)
    plan = _plan(work, len(ds), job, group)
    where = _log_plan(plan, work, job, topology)
    run = _score_parts(scorer, work, plan, group, show=(not config.quiet) if progress is None else progress)
    summary.update(parts=len(plan["shard"]), parts_skipped=len(plan["done"]),
                   parts_written=run["parts_written"], rows_scored=run["rows_scored"])
    group.barrier()
    if topology.rank != 0:
        return summary
    missing = [p for p in plan["shard"] if p not in work.scan_parts()]
    if missing:
        raise ChesFilterError(
            f"rows {_ranges_text(missing)} of {where or 'the input'} have no part in {work.path} although every "
            "process finished; was the directory changed meanwhile? Rerun the same command to score them"
        )
    work.mark_complete(topology.shard_index, topology.num_shards, {
        "shard_index": topology.shard_index, "num_shards": topology.num_shards, "parts": len(plan["shard"]),
        "rows": _rows(plan["shard"]), "finished": _now(),
    })
    if topology.num_shards > 1:
        logger.info("shard %d of %d is complete; when every shard is, join them with `ches-filter merge %s -o %s`",
                    topology.shard_index, topology.num_shards, work.path, output)
        return summary
    counts = assemble(work, output, overwrite=overwrite, input_name=template.get("input"))
    if not job.keep_work_dir:
        work.remove()
    return dict(summary, counts=counts, output=output)


# --------------------------------------------------------------------------
# Assembly and merge
# --------------------------------------------------------------------------


def _coverage_problem(work: WorkDir, manifest: dict, parts: dict[tuple[int, int], str]) -> str | None:
    grid = part_grid(int(manifest["grid"]["num_rows"]), int(manifest["grid"]["checkpoint_every"]))
    stray = sorted(set(parts) - set(grid))
    if stray:
        return (f"{work.parts_dir} holds parts off this job's grid ({_ranges_text(stray)}); they were not "
                "written for this manifest, so delete them")
    missing = [p for p in grid if p not in parts]
    if not missing:
        return None
    text = f"{len(missing)} of {len(grid)} parts have no results yet (rows {_ranges_text(missing)})"
    for count, shards in sorted(work.completed_shards().items()):
        owners = sorted({i for i in range(count) for p in shard_slice(grid, i, count) if p in set(missing)})
        if owners:
            text += (f"; with `--num-shards {count}` they belong to `--shard-index` {', '.join(map(str, owners))}"
                     f" ({len(shards)} of {count} shards have finished)")
    return text + "; run those shards (the same command resumes them), then merge again"


def assemble(work: WorkDir, output: str, *, overwrite: bool = False, input_name: str | None = None) -> dict[str, int]:
    """Join every part of ``work``, in row order, into ``output`` atomically.

    Args:
        work: the work directory of a finished job.
        output: the Parquet file to write.
        overwrite: replace an existing ``output``.
        input_name: the input path recorded in the metadata (default: the manifest's).

    Returns:
        Rows per status.

    Raises:
        BadDataError: a part is missing, unreadable or inconsistent.
    """
    import pyarrow as pa
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from .batching import SpecialRows
    from .io import METADATA_KEY, atomic_path, check_output_path
    from .scoring import merge_counts, status_counts

    manifest = work.read_manifest()
    if manifest is None:
        raise BadDataError(f"{work.path} has no manifest.json; it is not a ches-filter work directory")
    parts = work.scan_parts()
    problem = _coverage_problem(work, manifest, parts)
    if problem:
        raise BadDataError(f"{work.path}: {problem}")
    ordered = [parts[key] for key in sorted(parts)]
    for name in os.listdir(work.parts_dir):
        if name.startswith(".") and ".tmp-" in name:  # a part whose writer was killed; redone since
            os.unlink(os.path.join(work.parts_dir, name))
    metadata = dict(manifest["metadata"])
    if input_name is not None:
        metadata["input"] = input_name
    check_output_path(output, inputs=[metadata["input"]] if metadata.get("input") else [], overwrite=overwrite)

    def read(path: str, columns: list[str] | None = None) -> Any:
        try:
            return pq.read_table(path, columns=columns, memory_map=True)
        except (pa.ArrowException, OSError) as exc:
            raise BadDataError(f"part {path} cannot be read ({exc}); delete it and rerun the same command to redo it") from None

    counts: dict[str, int] = {}
    special = SpecialRows()
    for path in ordered:  # first pass: the counts go into the footer's metadata
        status = read(path, ["status"])
        merge_counts(counts, status_counts(status.column("status")))
        special.add(SpecialRows.from_metadata(status.schema.metadata))
    metadata["counts"] = counts
    metadata["special_token_rows"] = special.count
    special.log(metadata.get("on_special_tokens"))
    schema = read(ordered[0]).schema.remove_metadata() if ordered else None
    if schema is None:
        raise BadDataError(f"{work.path} holds no parts")
    schema = schema.with_metadata({METADATA_KEY: json.dumps(metadata, ensure_ascii=False).encode("utf-8")})
    with atomic_path(output) as tmp:
        with pq.ParquetWriter(tmp, schema) as writer:
            pending: list[Any] = []
            rows = 0
            for (start, stop), path in zip(sorted(parts), ordered):
                table = read(path)
                if table.schema.remove_metadata() != schema.remove_metadata():
                    raise BadDataError(f"part {path} has columns {table.schema.names}, not {schema.names}; delete it and rerun")
                index = table.column("row_index")
                if table.num_rows != stop - start or pc.min(index).as_py() != start or pc.max(index).as_py() != stop - 1:
                    raise BadDataError(f"part {path} does not hold rows {start}-{stop - 1}; delete it and rerun")
                pending.append(table.replace_schema_metadata(schema.metadata))
                rows += table.num_rows
                if rows >= _ROW_GROUP_ROWS:
                    writer.write_table(pa.concat_tables(pending), row_group_size=rows)
                    pending, rows = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending), row_group_size=max(rows, 1))
    logger.info("assembled %d parts (%d rows) into %s", len(ordered), metadata["num_rows"], output)
    return counts


def merge_work_dir(work_dir: str, output: str, *, overwrite: bool = False, keep_work_dir: bool = False) -> dict[str, int]:
    """Assemble the output of a sharded job (``ches-filter merge``).

    Returns:
        Rows per status.
    """
    work = WorkDir(work_dir)
    if not os.path.isdir(work.path):
        raise BadDataError(f"{work_dir}: no such directory; pass the work directory the shards wrote (`OUTPUT.parts`)")
    if os.path.realpath(work.path) == os.path.realpath(output):
        raise BadFlagError("`--output` must differ from the work directory")
    counts = assemble(work, output, overwrite=overwrite)
    if not keep_work_dir:
        work.remove()
    return counts
