"""Configuration dataclasses shared by the Python API and the CLI.

Field names equal the CLI option names (``max_batch_tokens`` is
``--max-batch-tokens``). Every check lives in ``__post_init__`` so the API and
the CLI refuse the same values with the same message. No torch import here:
``ches-filter --help`` must stay instant.
"""

from __future__ import annotations

import os

from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal

from .batching import SPECIAL_TOKEN_MODES, TOKEN_LAYOUTS
from .errors import BadFlagError
from .formats import LAYOUTS
from .measures import DEFAULT_MEASURES, MEASURES
from .scorefile import own_columns
from .strategies import ENGINE_CHOICES

# Choices that belong to torch/transformers themselves, not to a registry of ours.
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def _choice(flag: str, value, choices) -> None:
    if value not in choices:
        raise BadFlagError(f"`--{flag}` got {value!r}; choose one of: {', '.join(choices)}")


def _positive(flag: str, value) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
        raise BadFlagError(f"`--{flag}` must be a positive whole number, got {value!r}")


@dataclass
class ScoreConfig:
    """How to read the input and score it.

    Attributes mirror the ``score`` command's options; see ``docs/usage.md``.
    """

    model: str | None = None
    revision: str | None = None
    trust_remote_code: bool = False
    dtype: str = "auto"
    device: str = "auto"
    device_map: str | None = None
    attn_implementation: str = "sdpa"
    engine: str = "auto"
    input_format: str | None = None
    prompt_column: str = "prompt"
    chosen_column: str = "chosen"
    rejected_column: str = "rejected"
    id_column: str | None = None
    split: str | None = None
    subset: str | None = None
    no_chat_template: bool = False
    max_length: int | None = None
    max_batch_tokens: int | None = None
    max_batch_size: int | None = None
    engine_workers: int | None = None
    chunk_size: int = 4096
    quiet: bool = False
    layout: str = "paper"
    measures: str = ",".join(DEFAULT_MEASURES)
    on_special_tokens: str = "keep"

    def __post_init__(self) -> None:
        _choice("layout", self.layout, TOKEN_LAYOUTS.names())
        _choice("on-special-tokens", self.on_special_tokens, SPECIAL_TOKEN_MODES)
        self.measures = _measures(self.measures)
        _choice("dtype", self.dtype, DTYPES)
        _choice("engine", self.engine, ENGINE_CHOICES)
        _choice("attn-implementation", self.attn_implementation, ATTN_IMPLEMENTATIONS)
        if self.input_format is not None:
            _choice("input-format", self.input_format, LAYOUTS.names())
        for flag in ("max_length", "max_batch_tokens", "max_batch_size", "engine_workers", "chunk_size"):
            _positive(flag.replace("_", "-"), getattr(self, flag))
        for flag in ("prompt_column", "chosen_column", "rejected_column"):
            if not getattr(self, flag):
                raise BadFlagError(f"`--{flag.replace('_', '-')}` must name a column, got an empty string")
        if len({self.prompt_column, self.chosen_column, self.rejected_column}) < 3:
            raise BadFlagError(
                "`--prompt-column`, `--chosen-column` and `--rejected-column` must name three different columns"
            )
        if self.id_column is not None:
            # The names come from the score file's schema and the measure registry.
            if self.id_column in own_columns():
                raise BadFlagError(
                    f"`--id-column` {self.id_column!r} is a column the score file writes itself "
                    f"({', '.join(own_columns())}); copy or rename that input column (e.g. to `{self.id_column}_id`) "
                    "and pass the new name"
                )
        if self.revision is not None and (self.model is None or os.path.exists(os.path.expanduser(self.model))):
            where = "the embedded model" if self.model is None else f"the local path {self.model}"
            raise BadFlagError(
                f"`--revision {self.revision}` selects a Hub revision, but `--model` is {where}, which has none; "
                "leave out `--revision`, or pass a Hub id (`owner/name`) as `--model`"
            )
        if self.device_map is not None and self.device not in ("auto",):
            raise BadFlagError("`--device-map` places the model itself; leave `--device` at auto when using it")

    @property
    def measure_list(self) -> tuple[str, ...]:
        """``measures`` as a tuple, in registry (:data:`~ches_filter.measures.MEASURES`) order."""
        return tuple(self.measures.split(","))


def _measures(value) -> str:
    """Canonical comma-separated measure list (a plain string, so it compares equal after a JSON round trip)."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in MEASURES]
    if unknown or not names:
        raise BadFlagError(
            f"`--measures` got {value!r}; give a comma-separated list of: {', '.join(MEASURES.names())} "
            "(e.g. `--measures ches,ln_ches,last_hidden_ip`)"
        )
    return ",".join(m for m in MEASURES.names() if m in names)


#: Default rows per checkpoint part for large inputs: a few minutes of a 7B model on one GPU.
DEFAULT_CHECKPOINT_EVERY = 1000
#: Smaller inputs are cut into at least this many parts by default, so every process of a
#: launch gets work (parts of at least MIN_AUTO_PART_ROWS rows, to keep batches full).
AUTO_PARTS = 32
MIN_AUTO_PART_ROWS = 8


def default_part_rows(num_rows: int) -> int:
    """The default ``--checkpoint-every`` for an input of ``num_rows`` rows (depends on nothing else).

    ``min(1000, max(8, ceil(num_rows / 32)))``: 1000 from 32,000 rows up, else
    about 32 parts. Only the row count decides it, so a resume with another
    number of processes cuts the same grid.
    """
    return min(DEFAULT_CHECKPOINT_EVERY, max(MIN_AUTO_PART_ROWS, -(-int(num_rows) // AUTO_PARTS)))


@dataclass
class JobConfig:
    """Where partial results go and which share of the work this process does.

    Attributes mirror the options of the same names of ``score`` (and of ``prune``, ``validate``).

    Attributes:
        work_dir: directory for parts, manifest and stats (default ``OUTPUT.parts``).
        checkpoint_every: rows per part: the most work a crash can cost per process.
            None (the default): :func:`default_part_rows` of the input's row count.
        num_shards: independent jobs the rows are split into (``ches-filter merge`` joins them).
        shard_index: which of them this process is, ``0 .. num_shards-1``.
        keep_work_dir: keep the work directory after the output is assembled.
    """

    work_dir: str | None = None
    checkpoint_every: int | None = None
    num_shards: int = 1
    shard_index: int | None = None
    keep_work_dir: bool = False

    def part_rows(self, num_rows: int) -> int:
        """Rows per part for an input of ``num_rows`` rows: ``checkpoint_every``, or its default."""
        return self.checkpoint_every if self.checkpoint_every is not None else default_part_rows(num_rows)

    def __post_init__(self) -> None:
        for flag in ("checkpoint_every", "num_shards"):
            value = getattr(self, flag)
            if flag == "checkpoint_every" and value is None:
                continue
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


@dataclass
class PruneConfig:
    """Which scored pairs to keep.

    Exactly one of ``keep`` (fraction of ``ok`` rows), ``keep_count`` or
    ``max_score`` selects; rows are ranked by ``by`` in its risk direction
    (:data:`~ches_filter.measures.MEASURES`: higher CHES is riskier, lower
    edit distance is), ties broken by ``row_index``. ``max_score`` keeps rows
    no riskier than it (``<=``, or ``>=`` for a lower-is-riskier measure).
    """

    keep: float | None = None
    keep_count: int | None = None
    max_score: float | None = None
    by: str = "ln_ches"
    keep_unscored: bool = False
    add_scores: bool = False

    def __post_init__(self) -> None:
        given = [name for name in ("keep", "keep_count", "max_score") if getattr(self, name) is not None]
        if len(given) != 1:
            got = ", ".join(f"`--{g.replace('_', '-')}`" for g in given) or "none"
            raise BadFlagError(
                f"pass exactly one of `--keep F`, `--keep-count N` or `--max-score T` (got {got}); "
                "e.g. `--keep 0.9` keeps the 90% lowest-risk pairs"
            )
        if self.keep is not None and not (0.0 < float(self.keep) <= 1.0):
            raise BadFlagError(f"`--keep` must be a fraction in (0, 1], got {self.keep}; e.g. `--keep 0.9`")
        if self.keep_count is not None and (isinstance(self.keep_count, bool) or int(self.keep_count) < 0):
            raise BadFlagError(f"`--keep-count` must be 0 or more, got {self.keep_count}")
        if self.max_score is not None and self.max_score != self.max_score:
            raise BadFlagError("`--max-score` must be a number, got NaN")
        _choice("by", self.by, MEASURES.names())

    def keep_n(self, n_ok: int) -> int | None:
        """Rows to keep out of ``n_ok`` scored rows (None for ``max_score``).

        ``keep`` rounds half up in exact decimal arithmetic: ``--keep 0.9`` of
        25 rows keeps 23 (22.5 rounds up), with no binary floating-point surprise.
        """
        if self.keep is not None:
            exact = Decimal(str(self.keep)) * n_ok
            return int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP))
        if self.keep_count is not None:
            return min(int(self.keep_count), n_ok)
        return None


@dataclass
class ReportConfig:
    """What ``ches-filter report`` shows.

    Attributes:
        keep: ``--keep`` fractions whose prune thresholds are listed and drawn.
        by: the measure that ranks the highest/lowest pairs.
        top: how many highest- and lowest-scoring pairs to list.
        excerpt_chars: characters of prompt/response text shown per cell.
        split: split of the ``--data`` input, as for ``score``.
        subset: configuration of a Hub ``--data`` input.
    """

    keep: tuple[float, ...] = (0.95, 0.9, 0.8)
    by: str = "ln_ches"
    top: int = 20
    excerpt_chars: int = 400
    split: str | None = None
    subset: str | None = None

    def __post_init__(self) -> None:
        self.keep = tuple(sorted({float(k) for k in self.keep}, reverse=True))
        if not self.keep or any(not (0.0 < k <= 1.0) for k in self.keep):
            raise BadFlagError(f"`--keep` takes fractions in (0, 1], got {self.keep}; e.g. `--keep 0.9`")
        _choice("by", self.by, MEASURES.names())
        if isinstance(self.top, bool) or not isinstance(self.top, int) or self.top < 0:
            raise BadFlagError(f"`--top` must be 0 or more, got {self.top!r}")
        _positive("excerpt-chars", self.excerpt_chars)


@dataclass
class DisplacementConfig:
    """How ``ches-filter displacement`` samples pairs and steps the model.

    Attributes:
        sample: pairs drawn (uniformly, without replacement) from the scorable rows.
        seed: seed of that draw.
        steps: real DPO steps per pair (0: first-order prediction only).
        lr: SGD learning rate of those steps.
        beta: DPO's beta (the reference model is the initial model).
    """

    sample: int = 64
    seed: int = 0
    steps: int = 0
    lr: float = 1e-5
    beta: float = 0.1

    def __post_init__(self) -> None:
        _positive("sample", self.sample)
        _whole("seed", self.seed, 0, 2**64 - 1)  # numpy refuses a negative seed with a traceback
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise BadFlagError(f"`--steps` must be 0 or more, got {self.steps!r}")
        for flag in ("lr", "beta"):
            value = getattr(self, flag)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not (value > 0) or value == float("inf"):
                raise BadFlagError(f"`--{flag}` must be a positive number, got {value!r}")


#: Subsets ``validate --subsets`` can train on.
VALIDATE_SUBSETS = ("top", "bottom", "median", "random")
VALIDATE_OPTIMIZERS = ("adam", "rmsprop", "sgd")


def _name_list(flag: str, value, choices, *, allow_empty: bool = False) -> str:
    """Canonical comma-separated list (given order, duplicates dropped), each name one of ``choices``."""
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    unknown = [n for n in names if n not in choices]
    if unknown or (not names and not allow_empty):
        got = ", ".join(unknown) if unknown else "nothing"
        raise BadFlagError(
            f"`--{flag}` got {got}; give a comma-separated list of: {', '.join(choices)} (e.g. `--{flag} {choices[0]},{choices[1]}`)"
        )
    return ",".join(dict.fromkeys(names))


def _number(flag: str, value, *, positive: bool) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or value != value or value in (float("inf"), float("-inf")):
        raise BadFlagError(f"`--{flag}` must be a finite number, got {value!r}")
    if positive and not value > 0:
        raise BadFlagError(f"`--{flag}` must be a positive number, got {value!r}")


def _whole(flag: str, value, minimum: int, maximum: int | None = None, why: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadFlagError(f"`--{flag}` must be a whole number >= {minimum}, got {value!r}")
    if maximum is not None and value > maximum:
        raise BadFlagError(f"`--{flag}` must be at most {maximum:,}, got {value!r}{why}")


#: Upper bound of ``--repeats`` (each repeat trains every subset once more).
MAX_REPEATS = 1000


@dataclass
class ValidateConfig:
    """What ``ches-filter validate`` trains on and how (the paper's subset experiment).

    Attributes:
        by: comma-separated measures that rank the pairs, each in its risk direction.
        subsets: comma-separated subsets per measure: ``top`` (riskiest n),
            ``bottom`` (safest n), ``median`` (n centred on the median), ``random``
            (seeded, measure-independent: trained once and reported for every measure).
        quantiles: optional comma-separated quantiles in [0, 1] of the risk ranking
            (0 = safest, 1 = riskiest); each adds an n-pair slice centred there (``q0.5``).
        subset_size: n, pairs per subset.
        eval_size: held-out pairs (seeded, disjoint from every subset) whose change is measured too.
        repeats: seeds per subset (``seed``, ``seed + 1``, ...), at most :data:`MAX_REPEATS`: each
            draws another batch order; the subsets themselves (the random one included) and the
            eval set are fixed by ``seed``, so the spread is that of training alone.
        epochs: passes over each subset.
        beta: DPO's beta (reference = the initial model).
        optimizer: ``adam`` (torch defaults), ``rmsprop`` or ``sgd``.
        lr: learning rate.
        batch_size: pairs per optimizer step (mean loss over the batch).
        seed: base seed of the eval draw, the random subset and the batch order.
        gradient_checkpointing: recompute activations in the backward pass (less memory, ~30% slower).
    """

    by: str = "ches,ln_ches"
    subsets: str = "top,bottom,random"
    quantiles: str | None = None
    subset_size: int = 64
    eval_size: int = 64
    repeats: int = 1
    epochs: int = 1
    beta: float = 0.1
    optimizer: str = "adam"
    lr: float = 5e-6
    batch_size: int = 8
    seed: int = 0
    gradient_checkpointing: bool = False

    def __post_init__(self) -> None:
        self.by = _name_list("by", self.by, MEASURES.names())
        self.subsets = _name_list("subsets", self.subsets, VALIDATE_SUBSETS, allow_empty=self.quantiles is not None)
        if self.quantiles is not None:
            raw = self.quantiles.split(",") if isinstance(self.quantiles, str) else list(self.quantiles)
            try:
                values = [float(q) for q in raw if str(q).strip()]
            except ValueError:
                values = None
            if not values or any(not (0.0 <= q <= 1.0) for q in values):
                raise BadFlagError(
                    f"`--quantiles` got {self.quantiles!r}; give comma-separated numbers in [0, 1] "
                    "(0 = safest, 1 = riskiest), e.g. `--quantiles 0,0.5,1`"
                )
            self.quantiles = ",".join(dict.fromkeys(format(q + 0.0, "g") for q in values))  # + 0.0: -0 is 0
        if not self.subsets and not self.quantiles:
            raise BadFlagError("nothing to train on: give `--subsets` (top, bottom, median, random) or `--quantiles`")
        _whole("subset-size", self.subset_size, 1)
        _whole("eval-size", self.eval_size, 0)
        _whole("repeats", self.repeats, 1, MAX_REPEATS, f" (each repeat trains every subset again; {MAX_REPEATS} "
               "already measures a seed spread far below float noise)")
        _whole("epochs", self.epochs, 1)
        _whole("batch-size", self.batch_size, 1)
        # Seeds seed .. seed + repeats - 1 are stored as 64-bit integers (validate.parquet's `seed` column).
        _whole("seed", self.seed, 0, 2**63 - self.repeats, f" with `--repeats {self.repeats}` (seeds are 64-bit)")
        _number("beta", self.beta, positive=True)
        _number("lr", self.lr, positive=True)
        _choice("optimizer", self.optimizer, VALIDATE_OPTIMIZERS)
        if self.subset_size < self.batch_size:
            raise BadFlagError(
                f"`--subset-size {self.subset_size}` is smaller than `--batch-size {self.batch_size}`: a subset "
                "would not fill one optimizer step; raise `--subset-size` or lower `--batch-size`"
            )

    @property
    def by_list(self) -> tuple[str, ...]:
        return tuple(self.by.split(","))

    @property
    def subset_names(self) -> tuple[str, ...]:
        """Every subset per measure: the named ones, then ``q<quantile>`` slices."""
        named = tuple(s for s in self.subsets.split(",") if s)
        return named + tuple(f"q{q}" for q in (self.quantiles.split(",") if self.quantiles else ()))
