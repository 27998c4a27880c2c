"""Who this process is in a job, passed around explicitly (datatrove's ``rank, world_size``).

Two kinds of parallelism multiply: ``--num-shards K --shard-index i``
(independent jobs, e.g. a Slurm array, joined by ``ches-filter merge``) and the
ranks of one ``torchrun`` launch. Worker ``shard_index * world_size + rank`` of
``num_shards * world_size`` stamps the parts it writes. The only place that
reads the environment is :meth:`Topology.from_env`.

Rows are cut on a fixed grid that no topology changes::

    rows      : 0 ............................................. N
    parts     : [0,C) [C,2C) [2C,3C) ...                 [kC,N)      C = --checkpoint-every
    shards    : |<--- shard 0 --->|<--- shard 1 --->| ...            contiguous blocks of parts
    ranks     : a launch shares out the parts of its shard still to do, in contiguous runs
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import BadFlagError

# torch is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["Topology", "Group", "torchrun_rank", "part_grid", "shard_slice", "select_device"]

_DEFAULT_TIMEOUT_S = 7 * 24 * 3600
#: What torchrun sets for every process it starts; without the rendezvous
#: address a process group cannot form.
_TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class Topology:
    """This process's ``torchrun`` rank and its ``--num-shards`` shard."""

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
    def from_env(cls, shard_index: int = 0, num_shards: int = 1) -> "Topology":
        """Read ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``LOCAL_WORLD_SIZE`` as set by torchrun."""
        env = _torchrun_env()
        if env is None:
            return cls(shard_index=shard_index, num_shards=num_shards)
        return cls(*env, shard_index=shard_index, num_shards=num_shards)


def _torchrun_env() -> tuple[int, int, int, int] | None:
    if "WORLD_SIZE" not in os.environ or "RANK" not in os.environ:
        return None
    hint = (
        "torchrun sets " + ", ".join(_TORCHRUN_VARIABLES) + " for every process it starts; start the command with "
        "`torchrun --nproc_per_node N -m ches_filter ...`, or unset RANK and WORLD_SIZE to run one process"
    )
    try:
        world = int(os.environ["WORLD_SIZE"])
        rank = int(os.environ["RANK"])
        local_rank = int(os.environ.get("LOCAL_RANK", rank))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    except ValueError:
        raise BadFlagError(f"the environment variables RANK/WORLD_SIZE/LOCAL_RANK must be whole numbers; {hint}") from None
    if world < 1 or not 0 <= rank < world:
        raise BadFlagError(f"RANK={rank} does not fit WORLD_SIZE={world}; {hint}")
    if world > 1:
        missing = [v for v in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
        if missing:
            raise BadFlagError(
                f"WORLD_SIZE={world} and RANK={rank} are set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} "
                f"not, so the processes cannot find each other; {hint}"
            )
    return rank, world, local_rank, local_world


def torchrun_rank() -> int:
    """This process's rank under torchrun (0 without it); reads the environment only."""
    env = _torchrun_env()
    return env[0] if env else 0


def part_grid(num_rows: int, every: int) -> list[tuple[int, int]]:
    """The fixed ``(start, stop)`` row ranges of every part."""
    return [(start, min(start + every, num_rows)) for start in range(0, num_rows, every)]


def shard_slice(items: Sequence[Any], index: int, count: int) -> list[Any]:
    """The ``index``-th of ``count`` contiguous, near-equal slices of ``items``."""
    n = len(items)
    return list(items[index * n // count : (index + 1) * n // count])


class Group:
    """The torchrun process group, or a stand-in that does nothing for one process.

    Only small CPU objects travel (plans, counters, barriers), so on GPUs the
    group is ``cpu:gloo,cuda:nccl``: NCCL for anything on the GPU, gloo for these.
    The progress counters go through the rendezvous store, reached with
    torch's private ``_get_default_store`` (no public API gives it); without
    it the bar counts rank 0's rows only.
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


def select_device(config: Any, topology: Topology) -> tuple[Any, bool]:
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
