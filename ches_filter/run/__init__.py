"""Running a scoring job: the pipeline, its work directory, topology and merge.

=================  =============================================================
module             holds
=================  =============================================================
``pipeline``       :func:`run_job`, :func:`score_to_file`, :func:`score_to_table`
``workdir``        :class:`WorkDir`: parts, manifest, stats, completions, locks
``manifest``       job identity and the refusal to mix different jobs
``topology``       :class:`Topology` (rank, world size, shard), the process group
``merge``          assembling parts into a file or a table; ``ches-filter merge``
=================  =============================================================
"""

from .merge import assemble, assemble_table, merge_work_dir
from .pipeline import JobResult, run_job, score_to_file, score_to_table
from .topology import Topology, part_grid, shard_slice, torchrun_rank
from .workdir import WorkDir, default_work_dir

__all__ = [
    "JobResult", "Topology", "WorkDir", "assemble", "assemble_table", "default_work_dir", "merge_work_dir",
    "part_grid", "run_job", "score_to_file", "score_to_table", "shard_slice", "torchrun_rank",
]
