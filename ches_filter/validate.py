"""Show on the user's own model that pruning by a score protects the preferred likelihood: ``validate``.

The paper's subset experiment (Razin et al., ICLR 2025, Section 5, Fig. 2;
the official ``similarity_measures_experiment_runner.py``): rank the scored
pairs by a measure, take subsets from the risky and the safe end, train DPO
on each subset from the same initial model, and compare the mean change of
``log π(y+|x)`` over the subset. Cross-pair effects (one pair's update
lowering another pair's preferred response) appear only when many pairs are
trained together, which is why subsets, not single pairs (``displacement``).

Per subset and seed, from the same initial weights (restored from one copy
held on the CPU):

* ``epochs`` passes of DPO in batches of ``batch_size`` pairs (order drawn
  from the seed), loss ``-log σ(β[(log π+ - ref+) - (log π- - ref-)])``
  averaged over the batch, reference = the initial model, whose log-probs
  are computed once before any training (no second model in memory);
* ``log π(y±)`` of every pair of the subset and of a held-out eval set
  after training; Δ = after - before (before = the reference).

Log-probs come from :func:`ches_filter.logprobs.pair_logprobs` in the token
layout of the scores (``--layout``), packed (prompt once) where the scoring
engine's self-check says it is exact. A subset whose members and seed equal
another's (``random`` is measure-independent) is trained once and reported
for each measure.
"""

from __future__ import annotations

import dataclasses
import inspect
import io
import json
import logging
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from . import __version__
from .atomic import atomic_paths, remove, writing
from .batching import PairEncoder, token_budget_batches
from .config import JobConfig, ScoreConfig, ValidateConfig
from .errors import BadDataError, BadFlagError, ChesFilterError
from .formats import normalize_row
from .inputs import check_scores_belong, input_paths, load_input
from .logprobs import HEAD_CHUNK_ELEMENTS, head_is_exact, packed_is_exact, pair_logprobs, shrink_head_chunk
from .measures import MEASURES
from .model import (
    ModelState,
    check_model_source,
    check_training_fits,
    flash_attention_problem,
    free_memory,
    load_model,
    resolve_device,
    training_autocast,
    training_memory_problem,
)
from .paths import check_not_matched, check_paths
from .run import score_to_file
from .run.workdir import WorkDir, default_work_dir
from .scorefile import read_table, with_metadata
from .scoring import default_batch_tokens, scores_identity

# torch, pyarrow, numpy, matplotlib and tqdm are imported in the functions that use them,
# so `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["run_validate", "plan_subsets", "dpo_loss", "format_table", "table_rows", "verdicts", "ValidateSummary",
           "VALIDATE_COLUMNS"]

#: Per-pair columns of validate.parquet (after measure, subset, seed, set, row_index).
VALIDATE_COLUMNS = (
    "score", "logp_chosen_before", "logp_chosen_after", "dlogp_chosen", "logp_rejected_before",
    "logp_rejected_after", "dlogp_rejected", "prompt_tokens", "chosen_tokens", "rejected_tokens",
)


def dpo_loss(logp_chosen: Any, logp_rejected: Any, ref_chosen: Any, ref_rejected: Any, beta: float) -> Any:
    """Mean DPO loss ``-log σ(β[(log π+ - ref+) - (log π- - ref-)])`` over a batch (sigmoid loss, no smoothing)."""
    import torch.nn.functional as F

    margin = (logp_chosen - ref_chosen) - (logp_rejected - ref_rejected)
    return -F.logsigmoid(beta * margin).mean()


# ------------------------------------------------------------------ subsets
@dataclass
class SubsetPlan:
    """Which rows each subset holds.

    Attributes:
        eval_rows: the held-out eval set (row indices), disjoint from every subset.
        subsets: ``{(measure, subset): [row_index, ...]}``; ``random`` is the same for every measure.
        ranked: per measure the scored rows available to subsets, safest first.
        scores: per measure ``{row_index: value}`` of the rows used.
    """

    eval_rows: list[int]
    subsets: dict[tuple[str, str], list[int]]
    ranked: dict[str, list[int]] = field(default_factory=dict)
    scores: dict[str, dict[int, float]] = field(default_factory=dict)

    def used_rows(self) -> list[int]:
        """Every row the eval set or a subset holds, in order."""
        return sorted(set(self.eval_rows).union(*self.subsets.values()))


def _slice(ranked: Sequence[int], n: int, centre: float) -> list[int]:
    """``n`` consecutive items of ``ranked`` around quantile ``centre`` in [0, 1], clamped to the ends.

    The official code's rule (``__quantile_slice``): centre index
    ``round(q·(len-1))``, start ``n // 2`` before it.
    """
    idx = int(round(centre * (len(ranked) - 1)))
    start = max(0, idx - n // 2)
    start = max(0, min(start, len(ranked) - n))
    return list(ranked[start : start + n])


def needed_rows(config: ValidateConfig) -> int:
    """Scored rows the plan needs: the eval set plus room for the ranked subsets to be disjoint."""
    ranked = [s for s in config.subset_names if s != "random"]
    return config.eval_size + config.subset_size * max(1, len(ranked))


def plan_subsets(scores: Any, config: ValidateConfig) -> SubsetPlan:
    """Draw the eval set, then every subset from the remaining scored rows.

    A row can be used when its status is ``ok`` and every ``--by`` measure has
    a value. The eval set is drawn first (seed ``config.seed``); subsets come
    from the rest, so no subset meets the eval set. Ranking follows each
    measure's risk direction (:data:`ches_filter.measures.MEASURES`), ties by
    ``row_index``: ``top`` is the riskiest n, ``bottom`` the safest n,
    ``median`` and ``q<x>`` n consecutive ranks centred on that quantile.

    Raises:
        BadDataError: a ``--by`` column is missing, or fewer usable rows than needed.
    """
    _check_score_columns(scores, config)
    values = _in_input_order(scores, ("status", *config.by_list))
    status = values.pop("status")
    usable = _usable_rows(status, values, config)
    eval_rows, pool = _draw_eval(usable, config)
    plan = SubsetPlan(eval_rows=eval_rows, subsets={})
    random_rows = _draw_random(pool, config) if "random" in config.subset_names else None
    for measure in config.by_list:
        sign = 1.0 if MEASURES.get(measure).higher_is_riskier else -1.0
        ranked = sorted(pool, key=lambda i: (sign * values[measure][i], i))
        plan.ranked[measure] = ranked
        for name in config.subset_names:
            rows = random_rows if name == "random" else _ranked_subset(ranked, name, config.subset_size)
            plan.subsets[(measure, name)] = sorted(rows)
        plan.scores[measure] = {i: float(values[measure][i]) for i in usable}
    return plan


def _check_score_columns(scores: Any, config: ValidateConfig) -> None:
    """Refuse scores without ``row_index``/``status``, without a ``--by`` column, or with one that is not numbers."""
    import pyarrow.types as pat

    names = scores.column_names
    for name in ("row_index", "status"):
        if name not in names:
            raise BadDataError(f"the scores have no {name!r} column (columns: {', '.join(names)}); was the file written by `ches-filter score`?")
    missing = [m for m in config.by_list if m not in names]
    if missing:
        present = [m for m in MEASURES.names() if m in names]
        raise BadDataError(
            f"the scores have no {', '.join(missing)} column (measures present: {', '.join(present) or 'none'}); "
            f"drop it from `--by` or rescore with `ches-filter score --measures {','.join(dict.fromkeys(present + missing))}`"
        )
    for m in config.by_list:
        kind = scores.schema.field(m).type
        if not (pat.is_floating(kind) or pat.is_integer(kind) or pat.is_null(kind)):
            raise BadDataError(
                f"the scores' {m} column holds {kind} values, not numbers; pass a score file written by `ches-filter score`"
            )


def _in_input_order(scores: Any, names: Sequence[str]) -> dict[str, list]:
    """``{name: values}`` where item i is the value of input row i: the score row whose ``row_index`` is i.

    So the eval draw and the random subset depend on the input and the seed
    only, whatever order the file's rows are in.
    """
    row_index = scores.column("row_index").to_pylist()
    bad = [r for r in row_index if not isinstance(r, int) or not 0 <= r < len(row_index)][:1]  # None is bad too
    if bad or len(set(row_index)) != len(row_index):
        what = f"{bad[0]!r} (rows are 0..{len(row_index) - 1})" if bad else "a repeated value"
        raise BadDataError(
            f"the scores' row_index column holds {what}: it must number the input's rows 0..n-1 once each; "
            "pass a score file written by `ches-filter score` for this input"
        )
    order = sorted(range(len(row_index)), key=row_index.__getitem__)
    columns = {name: scores.column(name).to_pylist() for name in names}
    return {name: [column[i] for i in order] for name, column in columns.items()}


def _usable_rows(status: list, values: dict[str, list], config: ValidateConfig) -> list[int]:
    """The rows of status ``ok`` with a value for every ``--by`` measure; refuses an infinite one, or too few rows."""
    for m in config.by_list:
        for r, v in enumerate(values[m]):
            if status[r] == "ok" and v is not None and math.isinf(v):
                raise BadDataError(
                    f"the scores' {m} is {v} at row_index {r} (status ok); `ches-filter score` marks such rows "
                    "`non_finite`: rescore, or pass a score file written by it"
                )
    usable = [
        i for i in range(len(status))
        if status[i] == "ok" and all(values[m][i] is not None and not math.isnan(values[m][i]) for m in config.by_list)
    ]
    need = needed_rows(config)
    if len(usable) < need:
        ranked_count = max(1, len([s for s in config.subset_names if s != "random"]))
        raise BadDataError(
            f"the input has {len(usable)} scored (status ok) rows but validate needs {need}: an eval set of "
            f"{config.eval_size} plus {ranked_count} subset(s) of {config.subset_size}; lower `--subset-size` or "
            "`--eval-size`, or give more data"
        )
    return usable


def _draw_eval(usable: list[int], config: ValidateConfig) -> tuple[list[int], list[int]]:
    """The eval set (``eval_size`` usable rows drawn with seed ``config.seed``) and the rest, the subsets' pool."""
    import numpy as np

    rng = np.random.default_rng(config.seed)
    eval_pos = sorted(rng.choice(len(usable), size=config.eval_size, replace=False).tolist()) if config.eval_size else []
    eval_set = {usable[i] for i in eval_pos}
    return sorted(eval_set), [i for i in usable if i not in eval_set]


def _draw_random(pool: list[int], config: ValidateConfig) -> list[int]:
    """The ``random`` subset: ``subset_size`` rows of the pool (seed ``[config.seed, 1]``), the same for every measure."""
    import numpy as np

    picked = np.random.default_rng([config.seed, 1]).choice(len(pool), size=config.subset_size, replace=False)
    return sorted(pool[i] for i in picked.tolist())


def _ranked_subset(ranked: list[int], name: str, n: int) -> list[int]:
    """The subset ``name`` (``top``, ``bottom``, ``median``, ``q<x>``) of ``ranked`` (safest first)."""
    if name == "top":
        return ranked[-n:]
    if name == "bottom":
        return ranked[:n]
    return _slice(ranked, n, 0.5 if name == "median" else float(name[1:]))


# ------------------------------------------------------------------ training
class _Trainer:
    """One policy model, its initial weights on the CPU, and the log-prob function."""

    def __init__(self, loaded: Any, config: ValidateConfig, score_config: ScoreConfig) -> None:
        import torch

        from .engine import default_workers  # lazy: engine.py imports torch

        self.lm = loaded.decoder
        self.device = loaded.device
        self.config = config
        # Dropout off in every pass (reference, training, after training, self-checks), in training mode too
        # (gradient checkpointing); `self.state.restore()` gives the model back as it came.
        self.state = ModelState(self.lm, eval=not config.gradient_checkpointing)
        if self.state.dropout_rates:
            logger.info("dropout switched off for validate (%d rates set to 0; restored afterwards)", self.state.dropout_rates)
        # Master weights stay float32; bfloat16 is used through autocast only, float16 not at all (training_autocast).
        self.autocast, note = training_autocast(score_config.dtype, torch.device(self.device))
        if note:
            logger.warning("%s", note)
        problem = flash_attention_problem(getattr(self.lm.config, "_attn_implementation", None), self.device,
                                          next(self.lm.parameters()).dtype, self.autocast)
        if problem:
            raise BadFlagError(problem)
        self.params = [p for p in self.lm.parameters() if p.is_floating_point()]
        for p in self.params:
            p.requires_grad_(True)
        self.initial = [p.detach().to("cpu", copy=True) for p in self.params]
        if config.gradient_checkpointing:
            if hasattr(self.lm, "activation_checkpointing_enable"):  # transformers >= 5 name
                self.lm.activation_checkpointing_enable({"use_reentrant": False})
            else:
                self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            self.lm.train()  # transformers checkpoints only in training mode (dropout stays at 0)
        self.packed = score_config.engine != "plain" and packed_is_exact(self.lm, self.device)
        if score_config.engine in ("packed", "prefix") and not self.packed:
            logger.warning("the packed log-prob path is not exact for this model; using the plain one")
        tokenizer = loaded.tokenizer
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad = int(pad)
        self.budget = score_config.max_batch_tokens

        self.head_elements = HEAD_CHUNK_ELEMENTS  # logits per LM-head chunk (logprobs.head_peak_bytes)
        # On CPU, the no-gradient passes run micro-batches side by side on
        # single-threaded workers, as the scoring engine's batches do
        # (`--engine-workers`): 4-16 % faster here. Training steps stay one
        # pass over all threads: side by side (gradients added in order) they
        # were 7-9 % slower on this 2-core CPU (benchmarks/RESULTS.md).
        self.workers = score_config.engine_workers or default_workers(self.device)
        head_is_exact(self.lm, self.device)  # checked (and cached) once, before any worker thread starts

    def close(self) -> None:
        """Give the model back as it came: the initial weights, its checkpointing, dropout rates, flags, requires_grad."""
        self.restore()
        if self.config.gradient_checkpointing and not any(flag for _, flag in self.state.checkpointing):
            (getattr(self.lm, "activation_checkpointing_disable", None) or self.lm.gradient_checkpointing_disable)()
        self.state.restore()  # dropout rates, train/eval flags and requires_grad as the model came

    def restore(self) -> None:
        import torch

        with torch.no_grad():
            for p, saved in zip(self.params, self.initial):
                p.copy_(saved)

    def logprobs(self, pairs: Sequence[Any], *, grad: bool) -> Any:
        return pair_logprobs(
            self.lm, pairs, packed=self.packed, grad=grad, device=self.device, pad_token_id=self.pad,
            autocast_dtype=self.autocast, head_elements=self.head_elements,
        )

    def _cost(self, pair: Any) -> int:
        return pair.packed_length if self.packed else 2 * (pair.longest_sequence - 1)

    def _micro_batches(self, rows: Sequence[int], encoded: dict[int, Any]) -> list[list[int]]:
        """``rows`` in token-budget groups (``--max-batch-tokens``; default 512 on CPU, 65536 on CUDA)."""
        rows = list(rows)
        budget = self.budget or default_batch_tokens(self.device)
        return [[rows[i] for i in group] for group in token_budget_batches([self._cost(encoded[r]) for r in rows], budget)]

    def evaluate(self, rows: Sequence[int], encoded: dict[int, Any]) -> dict[int, tuple[float, float]]:
        """``{row: (log π(y+), log π(y-))}`` without gradients, in token-budget batches."""
        out = {}
        rows = list(rows)

        def store(batch: list[int], got: Any) -> None:
            for j, i in enumerate(batch):
                out[rows[i]] = (float(got.chosen[j]), float(got.rejected[j]))

        # The scoring engine's batches and out-of-memory back-off (halve the budget, lose nothing).
        budget = self._token_budget()
        try:
            budget.run(lambda batch: self.logprobs([encoded[rows[i]] for i in batch], grad=False),
                       [self._cost(encoded[r]) for r in rows], store, workers=self.workers, shrink=self._shrink_head)
        finally:
            self.budget = budget.tokens
        return out

    def _token_budget(self) -> Any:
        from .engine import TokenBudget  # lazy: engine.py imports torch

        return TokenBudget(self.budget or default_batch_tokens(self.device), self.device)

    def _shrink_head(self) -> bool:
        """Halve the LM-head chunk after one pair ran out of memory (:func:`~ches_filter.logprobs.shrink_head_chunk`)."""
        return shrink_head_chunk(self)

    def optimizer(self) -> Any:
        import torch

        cls = {"adam": torch.optim.Adam, "rmsprop": torch.optim.RMSprop, "sgd": torch.optim.SGD}[self.config.optimizer]
        # The fused kernel (one pass over each parameter instead of several) is
        # the same update with the same defaults; on this 2-core CPU it cut an
        # Adam step over 135 M parameters from 0.57 s to 0.18 s. Optimizers or
        # torch versions without it (RMSprop; CPU before torch 2.4) use the default.
        if "fused" in inspect.signature(cls.__init__).parameters:
            try:
                return cls(self.params, lr=self.config.lr, fused=True)
            except (RuntimeError, ValueError, TypeError):
                pass
        return cls(self.params, lr=self.config.lr)

    def _accumulate(self, batch: Sequence[int], encoded: dict[int, Any], ref: dict[int, tuple[float, float]]) -> float:
        """The batch's DPO gradient in the parameters' ``.grad``; returns its loss.

        The batch's mean loss is a weighted sum over length-grouped
        micro-batches: the same gradient, less padding and memory. A micro-batch
        that runs out of memory (forward or backward) discards the step's
        gradients so far, halves the budget (:class:`~ches_filter.engine.TokenBudget`)
        and redoes the step: nothing is lost or counted twice.
        """
        import torch

        while True:
            self._opt_zero_grad()
            total = 0.0
            micro: list[int] = []
            got = loss = None
            try:
                for micro in self._micro_batches(batch, encoded):
                    got = self.logprobs([encoded[r] for r in micro], grad=True)
                    dev = got.chosen.device
                    ref_c = torch.tensor([ref[r][0] for r in micro], dtype=got.chosen.dtype, device=dev)
                    ref_r = torch.tensor([ref[r][1] for r in micro], dtype=got.chosen.dtype, device=dev)
                    loss = dpo_loss(got.chosen, got.rejected, ref_c, ref_r, self.config.beta) * (len(micro) / len(batch))
                    loss.backward()
                    total += float(loss.detach())
                    del got, loss
                return total
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                from .engine import is_oom  # lazy: engine.py imports torch

                if not is_oom(exc):
                    raise
                got = loss = None  # the failed pass's graph goes before the retry
                exc.__traceback__ = None
                self._opt_zero_grad()
                budget = self._token_budget()
                try:
                    budget.after_oom(exc, len(micro), sum(self._cost(encoded[r]) for r in micro), self._shrink_head)
                finally:
                    self.budget = budget.tokens

    def _opt_zero_grad(self) -> None:
        for p in self.params:
            p.grad = None

    def train(self, members: Sequence[int], seed: int, encoded: dict[int, Any], ref: dict[int, tuple[float, float]],
              on_step: Any = None) -> dict:
        """DPO on ``members`` from the initial weights; returns the losses of the first and last step."""
        import numpy as np

        self.restore()
        opt = self.optimizer()
        rng = np.random.default_rng(seed)
        members = list(members)
        bs = self.config.batch_size
        losses = []
        for _ in range(self.config.epochs):
            order = [members[i] for i in rng.permutation(len(members)).tolist()]
            for start in range(0, len(order), bs):
                batch = order[start : start + bs]
                total = self._accumulate(batch, encoded, ref)
                if not math.isfinite(total):
                    raise ChesFilterError(
                        f"training diverged: the DPO loss is {total} at step {len(losses) + 1} (lr {self.config.lr:g}, "
                        f"beta {self.config.beta:g}, {self.config.optimizer}); lower `--lr`"
                    )
                opt.step()
                losses.append(total)
                if on_step is not None:
                    on_step()
        opt.zero_grad(set_to_none=True)
        del opt
        return {"loss_first": losses[0], "loss_last": losses[-1], "steps": len(losses)}


@dataclass
class Trainings:
    """What :func:`run_trainings` found.

    Attributes:
        records: one per (measure, subset, seed, set, row): the rows of validate.parquet
            (:data:`VALIDATE_COLUMNS` after measure, subset, seed, set, row_index).
        jobs: ``{(measure, subset, seed): training}``, each training's ``loss_first``, ``loss_last``,
            ``steps``, ``seconds`` and ``key_owner`` (the subset it was trained for first); subsets with
            the same members and seed share one training.
        trainings: how many distinct trainings ran.
        phases: wall seconds of the ``reference``, ``training`` and ``evaluation`` passes.
    """

    records: list[dict]
    jobs: dict[tuple[str, str, int], dict]
    trainings: int
    phases: dict[str, float]


def run_trainings(trainer: _Trainer, plan: SubsetPlan, encoded: dict[int, Any], *, progress: bool = False) -> Trainings:
    """DPO on every subset of ``plan`` from the trainer's initial weights, and log π of its pairs before and after.

    No files and no locks: ``encoded`` holds every row of the plan
    (:meth:`SubsetPlan.used_rows`). The reference is the initial model's log π,
    computed once; each distinct (members, seed) is trained once (``random`` is
    the same for every measure) and the subset's and eval set's pairs are
    measured after it. The trainer's weights are restored before each training;
    giving the model back at the end is the caller's (:meth:`_Trainer.close`).

    Raises:
        ChesFilterError: training diverged (a loss or a log π after training is not finite).
    """
    from tqdm.auto import tqdm

    config = trainer.config
    jobs, distinct = _training_jobs(plan, config)
    used = plan.used_rows()
    steps_per_job = config.epochs * math.ceil(config.subset_size / config.batch_size)
    _log_plan(trainer, plan, encoded, distinct, steps_per_job)
    t0 = time.perf_counter()
    ref = trainer.evaluate(used, encoded)
    phases = {"reference": time.perf_counter() - t0, "training": 0.0, "evaluation": 0.0}
    bar = tqdm(total=steps_per_job * len(distinct), desc="validate", unit="step", disable=not progress, dynamic_ncols=True)
    try:
        for job in distinct.values():
            _train_one(trainer, job, plan.eval_rows, encoded, ref, phases, on_step=lambda: bar.update(1))
    finally:
        bar.close()
    return Trainings(_records(plan, jobs, encoded, ref), jobs, len(distinct), phases)


def _training_jobs(plan: SubsetPlan, config: ValidateConfig) -> tuple[dict, dict]:
    """``jobs``: the training of each (measure, subset, seed); ``distinct``: one per distinct (members, seed), shared."""
    jobs: dict[tuple[str, str, int], dict] = {}
    distinct: dict[tuple[tuple[int, ...], int], dict] = {}
    for (measure, name), rows in plan.subsets.items():
        for r in range(config.repeats):
            seed = config.seed + r
            key = (tuple(rows), seed)
            if key not in distinct:
                distinct[key] = {"rows": list(rows), "seed": seed, "key_owner": f"{measure}/{name}"}
            jobs[(measure, name, seed)] = distinct[key]
    return jobs, distinct


def _log_plan(trainer: _Trainer, plan: SubsetPlan, encoded: dict[int, Any], distinct: dict, steps_per_job: int) -> None:
    """The work, in padded tokens through the model (a trained token costs about three forward ones)."""
    config = trainer.config
    cost = {row: trainer._cost(encoded[row]) for row in plan.used_rows()}
    trained = sum(cost[r] for job in distinct.values() for r in job["rows"])
    after = sum(cost[r] for job in distinct.values() for r in set(job["rows"]) | set(plan.eval_rows))
    logger.info(
        "validate plan: %d distinct training(s) of %d step(s); tokens: %s reference + %s trained x %d epoch(s) "
        "+ %s after training", len(distinct), steps_per_job, f"{sum(cost.values()):,}", f"{trained:,}",
        config.epochs, f"{after:,}",
    )
    logger.info("log-probs of the initial model for %d pairs (%s path)", len(cost), "packed" if trainer.packed else "plain")


def _train_one(trainer: _Trainer, job: dict, eval_rows: list[int], encoded: dict[int, Any],
               ref: dict[int, tuple[float, float]], phases: dict[str, float], on_step: Callable[[], Any]) -> None:
    """Train one job from the initial weights, then measure its members and the eval set (``job["after"]``)."""
    t0 = time.perf_counter()
    job.update(trainer.train(job["rows"], job["seed"], encoded, ref, on_step=on_step))
    t1 = time.perf_counter()
    job["after"] = trainer.evaluate(sorted(set(job["rows"]) | set(eval_rows)), encoded)
    broken = [row for row, got in job["after"].items() if not all(math.isfinite(v) for v in got)]
    if broken:
        raise ChesFilterError(
            f"training diverged: after training {job['key_owner']} (seed {job['seed']}) log π of "
            f"{len(broken)} pair(s) is not finite (first: row {broken[0]}); lower `--lr` (now {trainer.config.lr:g})"
        )
    job["seconds"] = time.perf_counter() - t0
    phases["training"] += t1 - t0
    phases["evaluation"] += job["seconds"] - (t1 - t0)


def _records(plan: SubsetPlan, jobs: dict, encoded: dict[int, Any], ref: dict[int, tuple[float, float]]) -> list[dict]:
    """validate.parquet's rows: per (measure, subset, seed) each subset pair, then each eval pair."""
    records = []
    for (measure, name, seed), job in jobs.items():
        for which, rows in (("subset", plan.subsets[(measure, name)]), ("eval", plan.eval_rows)):
            for row in rows:
                enc = encoded[row]
                before, after = ref[row], job["after"][row]
                records.append({
                    "measure": measure, "subset": name, "seed": seed, "set": which, "row_index": row,
                    "score": plan.scores[measure][row],
                    "logp_chosen_before": before[0], "logp_chosen_after": after[0], "dlogp_chosen": after[0] - before[0],
                    "logp_rejected_before": before[1], "logp_rejected_after": after[1], "dlogp_rejected": after[1] - before[1],
                    "prompt_tokens": len(enc.prompt), "chosen_tokens": len(enc.chosen), "rejected_tokens": len(enc.rejected),
                })
    return records


def records_table(records: Sequence[dict]) -> Any:
    """validate.parquet's table (without its metadata)."""
    import pyarrow as pa

    fields = {"measure": pa.string(), "subset": pa.string(), "seed": pa.int64(), "set": pa.string(), "row_index": pa.int64()}
    fields.update({c: (pa.int64() if c.endswith("_tokens") else pa.float64()) for c in VALIDATE_COLUMNS})
    return pa.table({name: pa.array([r[name] for r in records], typ) for name, typ in fields.items()})


# ------------------------------------------------------------------ summary
def _mean(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _sd(values: Sequence[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.stdev(values) if len(values) > 1 else None


def _set_stats(rows: Sequence[dict]) -> dict:
    dc = [r["dlogp_chosen"] for r in rows]
    dr = [r["dlogp_rejected"] for r in rows]
    return {
        "mean_dlogp_chosen": _mean(dc),
        "median_dlogp_chosen": statistics.median(dc) if dc else None,
        "mean_dlogp_rejected": _mean(dr),
        "median_dlogp_rejected": statistics.median(dr) if dr else None,
        "mean_dlogp_chosen_per_token": _mean([r["dlogp_chosen"] / r["chosen_tokens"] for r in rows]),
        "mean_dlogp_rejected_per_token": _mean([r["dlogp_rejected"] / r["rejected_tokens"] for r in rows]),
        "frac_chosen_decreased": (sum(d < 0 for d in dc) / len(dc)) if dc else None,
        "mean_chosen_tokens": _mean([r["chosen_tokens"] for r in rows]),
        "mean_rejected_tokens": _mean([r["rejected_tokens"] for r in rows]),
    }


def summarize(records: Sequence[dict], jobs: dict, config: ValidateConfig) -> list[dict]:
    """One object per (measure, subset): per-seed statistics, their mean over seeds and the seed spread."""
    out = []
    for measure in config.by_list:
        for name in config.subset_names:
            per_seed = []
            for r in range(config.repeats):
                seed = config.seed + r
                sub = [x for x in records if x["measure"] == measure and x["subset"] == name and x["seed"] == seed]
                trained = [x for x in sub if x["set"] == "subset"]
                held = [x for x in sub if x["set"] == "eval"]
                job = jobs[(measure, name, seed)]
                stats = _set_stats(trained)
                stats.update({f"eval_{k}": v for k, v in _set_stats(held).items() if not k.startswith("mean_") or "tokens" not in k})
                stats.update(seed=seed, loss_first=job["loss_first"], loss_last=job["loss_last"], steps=job["steps"],
                             seconds=job["seconds"], mean_score=_mean([x["score"] for x in trained]))
                per_seed.append(stats)
            entry = {"measure": measure, "subset": name, "n": config.subset_size, "eval_n": config.eval_size,
                     "seeds": [s["seed"] for s in per_seed]}
            for key in per_seed[0]:
                if key in ("seed",):
                    continue
                entry[key] = _mean([s[key] for s in per_seed])
            for key in ("mean_dlogp_chosen", "mean_dlogp_chosen_per_token", "eval_mean_dlogp_chosen", "frac_chosen_decreased"):
                entry[f"{key}_seed_sd"] = _sd([s[key] for s in per_seed])
            entry["trained_with"] = jobs[(measure, name, per_seed[0]["seed"])]["key_owner"]
            entry["per_seed"] = per_seed
            out.append(entry)
    return out


def _ends(config: ValidateConfig) -> tuple[str, str] | None:
    names = config.subset_names
    if "top" in names and "bottom" in names:
        return "top", "bottom"
    quantiles = sorted((float(n[1:]), n) for n in names if n.startswith("q"))
    if len(quantiles) >= 2:
        return quantiles[-1][1], quantiles[0][1]
    return None


def verdicts(subsets: Sequence[dict], config: ValidateConfig) -> list[str]:
    """One plain line per measure: does the riskiest subset lower log π(y+) more than the safest, and is length the likelier cause."""
    ends = _ends(config)
    if ends is None:
        return ["verdict: needs a riskiest and a safest subset (`--subsets top,bottom` or two `--quantiles`)"]
    risky_name, safe_name = ends
    lines = []
    for measure in config.by_list:
        risky = next(s for s in subsets if s["measure"] == measure and s["subset"] == risky_name)
        safe = next(s for s in subsets if s["measure"] == measure and s["subset"] == safe_name)
        gap = safe["mean_dlogp_chosen"] - risky["mean_dlogp_chosen"]
        more = "lowers the preferred likelihood more than" if gap > 0 else "does NOT lower the preferred likelihood more than"
        sds = [risky["mean_dlogp_chosen_seed_sd"], safe["mean_dlogp_chosen_seed_sd"]]
        if all(sd is not None for sd in sds):
            spread = math.sqrt(sds[0] ** 2 + sds[1] ** 2)
            noise = f"{abs(gap) / spread:.1f}x the seed spread ({spread:.2f} nats, {config.repeats} seeds)" if spread > 0 else "no seed spread"
        else:
            noise = "one seed, so no seed spread (`--repeats 3` measures it)"
        pt_gap = safe["mean_dlogp_chosen_per_token"] - risky["mean_dlogp_chosen_per_token"]
        scale = max(abs(risky["mean_dlogp_chosen"]), abs(safe["mean_dlogp_chosen"])) or 1.0
        pt_scale = max(abs(risky["mean_dlogp_chosen_per_token"]), abs(safe["mean_dlogp_chosen_per_token"])) or 1.0
        rel, pt_rel = gap / scale, pt_gap / pt_scale
        lc, ls = risky["mean_chosen_tokens"], safe["mean_chosen_tokens"]
        if gap > 0 and (pt_gap <= 0 or pt_rel < 0.5 * rel) and abs(lc - ls) > 0.25 * max(lc, ls):
            cause = "length is the likelier cause (the gap shrinks or flips per token)"
        elif gap > 0:
            cause = "length is not the likelier cause (the gap holds per token)"
        else:
            cause = "nothing to attribute"
        lines.append(
            f"verdict ({measure}): on this model and data the {risky_name} subset {more} the {safe_name} subset: "
            f"mean Δlog π(y+) {risky['mean_dlogp_chosen']:+.3f} vs {safe['mean_dlogp_chosen']:+.3f} nats, gap {gap:+.3f} = "
            f"{noise}; per token {risky['mean_dlogp_chosen_per_token']:+.4f} vs {safe['mean_dlogp_chosen_per_token']:+.4f} "
            f"(gap {pt_gap:+.4f}), mean |y+| {lc:.0f} vs {ls:.0f} tokens, |y-| {risky['mean_rejected_tokens']:.0f} vs "
            f"{safe['mean_rejected_tokens']:.0f}: {cause}."
        )
    return lines


@dataclass
class ValidateSummary:
    """``summary.json`` of ``ches-filter validate``: what validate writes and what ``report --validate`` reads.

    Fields are in the order they are written. :meth:`from_dict` is the one
    check of a summary read back: text fields hold text, number fields a
    number or null (NaN and infinities included; true/false are not
    numbers), ``verdicts`` a list of text, ``model`` an object; a missing
    field is None (a summary of an older ches-filter).
    """

    ches_filter_version: str | None = None
    kind: str = "validate"
    input: str | None = None
    scores: str | None = None
    scores_identity: dict | None = None
    model: dict | None = None
    token_layout: str | None = None
    logprob_path: str | None = None
    autocast: str | None = None
    config: dict | None = None
    eval_rows: list | None = None
    trainings: int | None = None
    seconds: float | None = None
    phase_seconds: dict | None = None
    subsets: list = field(default_factory=list)
    verdicts: list | None = None

    #: The per-subset fields the tables show (:func:`table_rows`), by kind.
    TEXT = ("measure", "subset")
    NUMBERS = ("n", "mean_dlogp_chosen", "median_dlogp_chosen", "mean_dlogp_rejected", "mean_dlogp_chosen_per_token",
               "frac_chosen_decreased", "eval_mean_dlogp_chosen", "loss_first", "loss_last", "mean_chosen_tokens",
               "mean_rejected_tokens", "seconds", "mean_dlogp_chosen_seed_sd")

    def to_dict(self) -> dict:
        """The JSON object written to summary.json, in field order."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, summary: Any, where: str) -> "ValidateSummary":
        """The summary a ``json.load`` of summary.json gave, checked field by field.

        Args:
            summary: the loaded JSON value.
            where: what to name in a refusal (e.g. "`--validate` DIR: DIR/summary.json").

        Raises:
            BadDataError: not a summary of validate, or a field of another shape (named, with what it holds).
        """
        fix = "rerun `ches-filter validate` into it, or pass another OUT_DIR of `ches-filter validate`"

        def refuse(name: str, value: Any, expected: str) -> None:
            raise BadDataError(f"{where} field `{name}` holds {_held(value)} where {expected} is expected; {fix}")

        if not isinstance(summary, dict) or summary.get("kind") != "validate":
            kind = _held(summary.get("kind")) if isinstance(summary, dict) else _held(summary)
            raise BadDataError(f"{where} is not a summary of `ches-filter validate` (it holds "
                               f"{'`kind` ' if isinstance(summary, dict) else ''}{kind}, not `kind` \"validate\"); "
                               "pass an OUT_DIR of `ches-filter validate`")
        if not isinstance(summary.get("subsets"), list):
            refuse("subsets", summary.get("subsets"), "a list of objects (one per measure and subset)")
        for i, entry in enumerate(summary["subsets"]):
            if not isinstance(entry, dict):
                refuse(f"subsets[{i}]", entry, "an object (one measure and subset)")
            for key in cls.TEXT:
                if entry.get(key) is not None and not isinstance(entry[key], str):
                    refuse(f"subsets[{i}].{key}", entry[key], "text")
            for key in cls.NUMBERS:
                if entry.get(key) is not None and not _is_number(entry[key]):
                    refuse(f"subsets[{i}].{key}", entry[key], "a number or null")
        verdicts = summary.get("verdicts")
        if verdicts is not None:
            if not isinstance(verdicts, list):
                refuse("verdicts", verdicts, "a list of text lines")
            for i, line in enumerate(verdicts):
                if not isinstance(line, str):
                    refuse(f"verdicts[{i}]", line, "text")
        model = summary.get("model")
        if model is not None:
            if not isinstance(model, dict):
                refuse("model", model, "an object")
            if model.get("model") is not None and not isinstance(model["model"], str):
                refuse("model.model", model["model"], "text")
        identity = summary.get("scores_identity")
        return cls(**{f.name: summary.get(f.name) for f in dataclasses.fields(cls)
                      if f.name not in ("scores_identity",)},
                   scores_identity=identity if isinstance(identity, dict) else None)


def _held(value: Any) -> str:
    """What a JSON value is, for a message: its kind and (clipped) its text."""
    if value is None:
        return "null"
    kind = ("a boolean" if isinstance(value, bool) else "a number" if isinstance(value, (int, float))
            else "text" if isinstance(value, str) else "a list" if isinstance(value, list) else "an object")
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError, RecursionError):  # pragma: no cover - json.load's values always dump
        text = repr(value)
    text = text.strip()
    return f"{kind} ({text if len(text) <= 60 else text[:59].rstrip() + chr(0x2026)})"


def _is_number(value: Any) -> bool:
    # bool is an int in Python but true/false in JSON: not a number to format.
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any, spec: str) -> str:
    """One number of the validate table: ``spec``-formatted; NaN and infinities as nan/inf; null as a dash."""
    if value is None:
        return "\u2013"
    if isinstance(value, int) or not math.isfinite(value):
        return str(value) if isinstance(value, int) else str(float(value))
    return format(value, spec)


def _mean_cell(s: dict) -> str:
    sd = s.get("mean_dlogp_chosen_seed_sd")
    return _cell(s.get("mean_dlogp_chosen"), "+.3f") + ("" if sd is None else f"\u00b1{_cell(sd, '.2f')}")


#: The validate table's columns: (heading, terminal width or 0 for left-aligned text, the cell of one subset).
TABLE_COLUMNS: tuple[tuple[str, int, Callable[[dict], str]], ...] = (
    ("measure", -15, lambda s: str(s.get("measure") or "")),
    ("subset", -8, lambda s: str(s.get("subset") or "")),
    ("n", 4, lambda s: _cell(s.get("n"), "d")),
    ("Δ+ mean", 11, _mean_cell),
    ("Δ+ med", 9, lambda s: _cell(s.get("median_dlogp_chosen"), "+.3f")),
    ("Δ- mean", 10, lambda s: _cell(s.get("mean_dlogp_rejected"), "+.3f")),
    ("Δ+/tok", 9, lambda s: _cell(s.get("mean_dlogp_chosen_per_token"), "+.4f")),
    ("y+ fell", 8, lambda s: _cell(s.get("frac_chosen_decreased"), ".0%")),
    ("eval Δ+", 9, lambda s: _cell(s.get("eval_mean_dlogp_chosen"), "+.3f")),
    ("loss 1st→last", 16, lambda s: f"{_cell(s.get('loss_first'), '.3f')}→{_cell(s.get('loss_last'), '.3f')}"),
    ("|y+|", 6, lambda s: _cell(s.get("mean_chosen_tokens"), ".0f")),
    ("|y-|", 6, lambda s: _cell(s.get("mean_rejected_tokens"), ".0f")),
    ("s", 7, lambda s: _cell(s.get("seconds"), ".0f")),
)


def table_rows(subsets: Sequence[dict]) -> tuple[list[str], list[list[str]]]:
    """The validate table as text cells: the headings and one row per (measure, subset).

    The one renderer of the table: :func:`format_table` pads it for the
    terminal, ``report --validate`` puts it in HTML.
    """
    return [head for head, _, _ in TABLE_COLUMNS], [[cell(s) for _, _, cell in TABLE_COLUMNS] for s in subsets]


def format_table(summary: dict) -> list[str]:
    """The terminal table: one line per (measure, subset)."""
    heads, rows = table_rows(summary["subsets"])
    widths = [width for _, width, _ in TABLE_COLUMNS]
    return ["".join(f"{text:<{-w}}" if w < 0 else f"{text:>{w}}" for text, w in zip(line, widths)).rstrip()
            for line in [heads, *rows]]


# ------------------------------------------------------------------ plot
def plot(summary: dict) -> bytes | None:
    """Δ log π(y+) per subset (trained subset and eval set side by side), summed and per token; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed, so validate.png is skipped (pip install 'ches-filter[report]')")
        return None
    subsets = summary["subsets"]
    labels = [f"{s['measure']}\n{s['subset']}" for s in subsets]
    fig, axes = plt.subplots(1, 2, figsize=(max(8, 1.3 * len(subsets) * 2), 4.5))
    width = 0.38
    for ax, suffix, unit in ((axes[0], "", "nats"), (axes[1], "_per_token", "nats / token")):
        xs = range(len(subsets))
        for k, (prefix, name, color) in enumerate((("", "trained subset", "tab:red"), ("eval_", "eval set (not trained on)", "tab:blue"))):
            key = f"{prefix}mean_dlogp_chosen{suffix}"
            vals = [s.get(key) if s.get(key) is not None else float("nan") for s in subsets]
            errs = []
            for s in subsets:
                per = [p.get(key) for p in s["per_seed"] if p.get(key) is not None]
                errs.append(statistics.stdev(per) if len(per) > 1 else 0.0)
            ax.bar([x + (k - 0.5) * width for x in xs], vals, width, yerr=errs, color=color, alpha=0.8, label=name, capsize=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(list(xs))
        ax.set_xticklabels(labels, fontsize=8)
        ax.set_ylabel(f"mean Δ log π(y+) ({unit})")
        ax.set_title("summed over y+" if not suffix else "per token of y+")
    axes[0].legend(fontsize=8)
    seeds = summary["config"]["repeats"]
    fig.suptitle(f"DPO on each subset from the same model ({seeds} seed{'s' if seeds > 1 else ''}; bars: seed spread)", fontsize=10)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


# ------------------------------------------------------------------ pipeline
#: The files a finished run leaves in OUT_DIR, written together (:func:`_write_outputs`).
OUTPUT_FILES = ("validate.parquet", "summary.json", "validate.png")
#: Where ``--overwrite`` scores while a finished run is kept whole (hidden, so OUT_DIR stays ours).
NEW_SCORES = ".scores.new.parquet"


def _score_beside(data: Any, path: str, scoring: ScoreConfig, progress: bool | None) -> None:
    """Score into ``path`` next to a finished run, resuming an interrupted ``--overwrite`` run's scoring there.

    Scoring left there by a run with other flags or input is discarded and redone.
    """
    try:
        score_to_file(data, path, scoring, JobConfig(keep_work_dir=True), overwrite=False, progress=progress)
        return
    except BadFlagError as exc:
        logger.info("discarding the scoring an earlier --overwrite run left in %s (%s)", path, exc)
    _discard_work(path)
    if os.path.lexists(path):
        with writing(path):
            remove(path)
    score_to_file(data, path, scoring, JobConfig(keep_work_dir=True), overwrite=True, progress=progress)


def _entry_kind(output_dir: str, name: str) -> bool | None:
    """Whether the entry ``name`` of OUT_DIR is what validate leaves there.

    True: validate's own (a file ``scores.parquet`` or output file, a work
    directory ``scores.parquet.parts`` of only a manifest, its own
    subdirectories and hidden temporaries, ``locks`` of lock files, a hidden
    temporary); False: it bears a name validate writes to but is something
    else (a user's directory named ``scores.parquet``, say), which a rerun
    would replace or delete; None: any other name, which validate never touches.
    """
    path = os.path.join(output_dir, name)
    if name.startswith("."):  # temporaries of ours (`.NAME.tmp-host-pid`, `.NAME.deleting`) or a file manager's
        return True
    if name == "scores.parquet" or name in OUTPUT_FILES:
        return os.path.isfile(path)
    if name == "locks":
        return os.path.isdir(path) and all(n.endswith(".lock") for n in os.listdir(path))
    if name == "scores.parquet.parts":
        work = WorkDir(path)
        allowed = {os.path.basename(p) for p in (work.manifest_path, work.parts_dir, work.stats_dir,
                                                  work.completions_dir, work.locks_dir)}
        return os.path.isdir(path) and all(n in allowed or n.startswith(".") for n in os.listdir(path))
    return None


def _unfinished(output_dir: str) -> bool:
    """OUT_DIR holds nothing but an unfinished run's work (or nothing): the same command resumes it.

    Each entry must be validate's own (:func:`_entry_kind`) and none of a
    finished run's outputs. Anything else (a user's directory named
    ``scores.parquet``, say) needs ``--overwrite``.
    """
    if not os.path.isdir(output_dir):
        return False
    return all(name not in OUTPUT_FILES and _entry_kind(output_dir, name) for name in os.listdir(output_dir))


def _foreign_to_validate(output_dir: str) -> list[str]:
    """Entries of OUT_DIR that bear a name validate writes to but are not validate's: ``--overwrite`` would destroy them.

    validate writes into OUT_DIR (it never replaces the directory), so other
    names are left alone and are not listed.
    """
    return sorted(name + ("/" if os.path.isdir(os.path.join(output_dir, name)) else "")
                  for name in os.listdir(output_dir) if _entry_kind(output_dir, name) is False)


def _discard_work(scores_path: str) -> None:
    """Delete the scoring work directory of ``scores_path`` and any half-deleted copy of it, whatever their state."""
    work = WorkDir(default_work_dir(scores_path))
    for path in (work.path, work.trash):
        with writing(path):
            remove(path)


def _check_output_dir(output_dir: str, inputs: list[tuple[str, str]], overwrite: bool) -> bool:
    """Refuse an OUT_DIR that clashes with an input, exists without ``overwrite`` or is not a directory.

    Returns:
        True when OUT_DIR is an unfinished run to resume (accepted without ``overwrite``).
    """
    resume = not overwrite and _unfinished(output_dir)
    check_paths({"--output": output_dir}, inputs, overwrite=overwrite, may_exist={"--output"} if resume else (),
                foreign={"--output": _foreign_to_validate})
    if os.path.lexists(output_dir) and not os.path.isdir(output_dir):
        raise BadFlagError(f"`--output` {output_dir} exists and is not a directory; validate writes a directory")
    # The files inside OUT_DIR too: an input pattern must not match what this run writes there.
    check_not_matched([("--output", os.path.join(output_dir, name)) for name in (*OUTPUT_FILES, "scores.parquet")], inputs)
    return resume


def _write_outputs(output_dir: str, table: Any, metadata: dict, summary: dict, png: bytes | None,
                   new_scores: str | None = None) -> None:
    """``validate.parquet``, ``summary.json`` and ``validate.png``: all of them or none.

    Each goes to a temporary sibling first; only when every one is on disk are
    they renamed into place, so a full disk or a refused write leaves an
    earlier run's outputs whole (never a new table beside an old summary).
    """
    import pyarrow.parquet as pq

    table = with_metadata(table, metadata)
    files: list[tuple[str, Callable[[str], None]]] = [
        ("validate.parquet", lambda tmp: pq.write_table(table, tmp)),
        ("summary.json", lambda tmp: _write_file(tmp, _json_bytes(summary))),
    ]
    if png is not None:
        files.append(("validate.png", lambda tmp: _write_file(tmp, png)))
    if new_scores is not None:  # the scores of an --overwrite run replace the old ones with the rest
        files.append(("scores.parquet", lambda tmp: os.replace(new_scores, tmp)))
    paths = [os.path.join(output_dir, name) for name, _ in files]
    with atomic_paths(paths) as tmps:
        for (_, write), tmp, path in zip(files, tmps, paths):
            with writing(path):
                write(tmp)
    stale = os.path.join(output_dir, "validate.png")
    if png is None and os.path.exists(stale):
        os.remove(stale)  # an earlier run's plot beside this run's numbers would mislead


def _json_bytes(summary: dict) -> bytes:
    """Strict JSON: a value that is not a finite number (none is expected) is written as null, not NaN."""

    def finite(value: Any) -> Any:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(summary), indent=2, ensure_ascii=False, allow_nan=False).encode()


def _write_file(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data)


#: Bytes per parameter validate holds on the device while training: float32 weights and gradients (4 + 4) and the
#: optimizer's state (Adam: two moments, 8; RMSprop: one, 4; SGD: none). docs/validate.md, "Known ceilings".
TRAIN_BYTES_PER_PARAM = {"adam": 16, "rmsprop": 12, "sgd": 8}


def _check_model_up_front(config: ValidateConfig, score_config: ScoreConfig) -> None:
    """Before scoring: refuse FlashAttention-2 that cannot run, and a model whose training state cannot fit the device.

    Counts the parameters from the model's config alone (no weights read); a
    GGUF model is checked when it is loaded (its config comes with the conversion).
    """
    import torch

    device = resolve_device(score_config.device)
    autocast, _ = training_autocast(score_config.dtype, device)
    problem = flash_attention_problem(score_config.attn_implementation, device, torch.float32, autocast)
    if problem:
        raise BadFlagError(problem)
    if score_config.model is not None and check_model_source(score_config.model) is None:
        kwargs = {"revision": score_config.revision, "trust_remote_code": score_config.trust_remote_code}
        check_training_fits(score_config.model, kwargs, device, TRAIN_BYTES_PER_PARAM[config.optimizer], True)


def run_validate(
    data: Any,
    output_dir: str,
    config: ValidateConfig | None = None,
    score_config: ScoreConfig | None = None,
    *,
    scores: str | None = None,
    overwrite: bool = False,
    model: Any = None,
    progress: bool | None = None,
) -> dict:
    """Score (or reuse scores), train DPO on each subset, write validate.parquet, summary.json, validate.png.

    Args:
        data: the input (path, ``datasets.Dataset`` or list of row dicts).
        output_dir: directory to create; ``scores.parquet`` goes there when ``scores`` is None.
        config: subsets and training (:class:`~ches_filter.config.ValidateConfig`).
        score_config: how to read, score and load the model; the policy is float32
            (``--dtype`` other than float32 runs under autocast in that dtype).
        scores: a score file of exactly this input (checked by fingerprint).
        overwrite: replace a finished run in ``output_dir`` and start over (scoring too);
            without it an unfinished run there (only its scores and lock) is resumed.
        model: a :class:`~ches_filter.model.LoadedModel` loaded ``with_lm_head`` in
            float32 (its weights are restored to the initial ones at the end).
        progress: show a progress bar per optimizer step (default: not ``score_config.quiet``).

    Returns:
        The summary (also ``summary.json``), with ``verdicts`` and ``table`` lines.
    """
    started = time.perf_counter()
    config = config or ValidateConfig()
    score_config = score_config or ScoreConfig()
    if score_config.device_map:
        raise BadFlagError("validate trains one model on one device; drop `--device-map` and pick `--device`")
    output_dir = os.fspath(output_dir)
    own_scores = os.path.join(output_dir, "scores.parquet")
    inputs = input_paths(data)
    named = [("INPUT", path) for path in inputs]
    if scores is not None and os.path.realpath(scores) != os.path.realpath(own_scores):
        named.append(("--scores", os.fspath(scores)))  # a previous run's OUT_DIR/scores.parquet may be reused in place
    resume = _check_output_dir(output_dir, named, overwrite)
    if model is None:
        _check_model_up_front(config, score_config)
    run = ValidateRun(data, output_dir, config, score_config, scores=scores, overwrite=overwrite, resume=resume,
                      progress=progress, inputs=inputs, started=started)
    return run.run(model)


class ValidateRun:
    """One validate run into an OUT_DIR whose paths are checked: its locks, resume, scoring and writes.

    The steps: lock OUT_DIR, load the input, score it (or read ``--scores``),
    plan the subsets, load the model, encode the rows, :func:`run_trainings`,
    summarize, write the outputs, clean up. Scoring keeps its work directory
    (``OUT_DIR/scores.parquet.parts``) until the outputs are written, so
    rerunning the same command after a failure (full disk, Ctrl-C, too few
    usable rows) does not score again; with ``overwrite`` an earlier run's work
    is discarded and everything is redone.
    """

    def __init__(self, data: Any, output_dir: str, config: ValidateConfig, score_config: ScoreConfig, *,
                 scores: str | None, overwrite: bool, resume: bool, progress: bool | None, inputs: list[str],
                 started: float) -> None:
        self.data, self.output_dir, self.config, self.score_config = data, output_dir, config, score_config
        self.scores, self.overwrite, self.resume, self.progress = scores, overwrite, resume, progress
        self.inputs, self.started = inputs, started
        self.own_scores = os.path.join(output_dir, "scores.parquet")
        self.scores_path = self.own_scores  # where this run's own scoring goes (NEW_SCORES beside a finished run)
        self.held: list[str] = []  # the scoring work directory's lock, once scoring is done
        self.phases: dict[str, float] = {}  # wall seconds per phase, in summary.json

    def run(self, model: Any) -> dict:
        """Every step under OUT_DIR's lock: a second run (even with ``--overwrite``) is refused, naming this one."""
        existed = os.path.isdir(self.output_dir)
        lock = WorkDir(self.output_dir).acquire(name="validate")
        try:
            return self._steps(model)
        finally:
            self._release_scoring()
            # A refused run leaves no directory it created; one that was there stays (even empty, even `.`).
            WorkDir.release(lock, remove_dir=not existed)

    def _steps(self, model: Any) -> dict:
        if self.resume and os.listdir(self.output_dir) != ["locks"]:
            logger.info("%s holds an unfinished run: resuming it (its finished scoring is reused)", self.output_dir)
        ds, layout, columns = load_input(self.data, self.score_config)
        need = needed_rows(self.config)
        if len(ds) < need:
            raise BadDataError(
                f"the input has {len(ds)} rows but validate needs at least {need} scored ones (eval set "
                f"{self.config.eval_size} + subsets of {self.config.subset_size}); lower `--subset-size` or `--eval-size`"
            )
        table, meta = self._read_given_scores(ds, layout, columns) if self.scores is not None else self._score()
        plan = plan_subsets(table, self.config)
        model = self._model(model)
        encoded = encode_rows(plan.used_rows(), ds, layout, columns, model, self.score_config)
        trainer = _Trainer(model, self.config, self.score_config)
        show = (not self.score_config.quiet) if self.progress is None else self.progress
        try:
            done = run_trainings(trainer, plan, encoded, progress=show)
        finally:
            trainer.close()
        self.phases.update(done.phases)
        summary = self._summary(plan, done, trainer, model.info, scores_identity(meta, table.num_rows))
        self._write(done.records, summary)
        self._clean_up()
        summary["table"] = format_table(summary)
        return summary

    def _read_given_scores(self, ds: Any, layout: str, columns: Any) -> tuple[Any, dict]:
        """``--scores``: read, and refuse a file of other rows or another ``--layout``."""
        table, meta = read_table(os.fspath(self.scores))
        check_scores_belong(meta, table.num_rows, ds, layout, columns, flag="--scores",
                            chunk_size=self.score_config.chunk_size)
        stored = meta.get("token_layout")
        if stored is not None and stored != self.score_config.layout:
            raise BadFlagError(
                f"`--scores` was computed with `--layout {stored}`, not `--layout {self.score_config.layout}`; pass the "
                "same layout so the tokens trained on are the tokens scored"
            )
        return table, meta

    def _score(self) -> tuple[Any, dict]:
        """Score into OUT_DIR (resuming an unfinished scoring there), then hold the scoring's lock until the end.

        With ``overwrite`` an earlier run's parts are discarded; a finished run
        stays whole until this run's outputs replace it: the scoring goes beside
        it (:data:`NEW_SCORES`), where the same command resumes it after an interruption.
        """
        wanted = ",".join(dict.fromkeys(self.score_config.measure_list + self.config.by_list))
        scoring = dataclasses.replace(self.score_config, measures=wanted)
        if self.overwrite:
            _discard_work(self.own_scores)  # an earlier run's parts: start over
        if self.overwrite and any(os.path.lexists(os.path.join(self.output_dir, name)) for name in OUTPUT_FILES):
            self.scores_path = os.path.join(self.output_dir, NEW_SCORES)
        t0 = time.perf_counter()
        try:
            if self.scores_path != self.own_scores:
                _score_beside(self.data, self.scores_path, scoring, self.progress)
            else:
                score_to_file(self.data, self.own_scores, scoring, JobConfig(keep_work_dir=True),
                              overwrite=self.overwrite, progress=self.progress)
        except BadFlagError as exc:
            if not self.resume:
                raise
            why = "; ".join(getattr(exc, "problems", None) or [str(exc).rstrip(".")])
            raise BadFlagError(
                f"`--output` {self.output_dir} holds an unfinished run that this command cannot resume ({why}); rerun "
                "with that run's scoring flags and input, or pass `--overwrite` to start over"
            ) from None
        self.phases["scoring"] = time.perf_counter() - t0
        # Until the outputs are written, a `score` into OUT_DIR/scores.parquet must not replace the scores
        # this run trains on, nor delete the parts a rerun resumes from.
        self.held.append(WorkDir(default_work_dir(self.scores_path)).acquire(0, 1))
        return read_table(self.scores_path)

    def _model(self, model: Any) -> Any:
        """The given model, or the one ``--model`` names loaded in float32 with its LM head; refused if training cannot fit."""
        if model is None:
            t0 = time.perf_counter()
            model = load_training_model(self.score_config, self.config)
            self.phases["model_load"] = time.perf_counter() - t0
        if model.decoder.get_output_embeddings() is None:
            raise BadDataError("validate needs the model's LM head; load it with `load_model(..., with_lm_head=True)`")
        params = sum(p.numel() for p in model.decoder.parameters())
        problem = training_memory_problem(params, TRAIN_BYTES_PER_PARAM[self.config.optimizer], str(model.device),
                                          *free_memory(model.device), on_device=True)
        if problem:
            raise BadFlagError(problem)
        return model

    def _summary(self, plan: SubsetPlan, done: Trainings, trainer: _Trainer, model_info: dict, identity: dict) -> dict:
        """summary.json's content (without ``seconds``); ``identity``: the scores' (report --validate checks it)."""
        subsets = summarize(done.records, done.jobs, self.config)
        return ValidateSummary(
            ches_filter_version=__version__,
            input=self.inputs[0] if self.inputs else None,
            scores=os.fspath(self.scores) if self.scores is not None else self.own_scores,
            scores_identity=identity,
            model=model_info,
            token_layout=self.score_config.layout,
            logprob_path="packed" if trainer.packed else "plain",
            autocast=None if trainer.autocast is None else str(trainer.autocast).replace("torch.", ""),
            config=dataclasses.asdict(self.config),
            eval_rows=plan.eval_rows,
            trainings=done.trainings,
            phase_seconds=self.phases,
            subsets=subsets,
            verdicts=verdicts(subsets, self.config),
        ).to_dict()

    def _write(self, records: list[dict], summary: dict) -> None:
        """validate.parquet, summary.json, validate.png (and the new scores of an ``--overwrite`` run): all or none."""
        out_table = records_table(records)
        png = plot(summary)
        summary["seconds"] = time.perf_counter() - self.started
        meta_out = {k: v for k, v in summary.items() if k not in ("subsets",)}
        _write_outputs(self.output_dir, out_table, meta_out, summary, png,
                       new_scores=self.scores_path if self.scores_path != self.own_scores else None)

    def _clean_up(self) -> None:
        """Once the outputs are in place: the scoring's parts, kept until now for a rerun after a failure; with
        ``--scores``, an earlier unfinished run's own scores, which this finished run did not use."""
        self._release_scoring()
        own = self.own_scores
        if self.scores is None:
            WorkDir(default_work_dir(self.scores_path)).remove()
        elif os.path.realpath(self.scores) != os.path.realpath(own) and (
            os.path.lexists(own) or os.path.lexists(default_work_dir(own))
        ):
            logger.info("removing %s (and its parts) of an earlier run: this run used %s", own, self.scores)
            _discard_work(own)
            if not os.path.isdir(own) or os.path.islink(own):
                remove(own)  # a file of ours (a directory by that name is no score file: left alone)

    def _release_scoring(self) -> None:
        for lock in self.held:
            WorkDir.release(lock, remove_dir=False)
        self.held.clear()


def load_training_model(score_config: ScoreConfig, config: ValidateConfig) -> Any:
    """``--model`` in float32 with its LM head (``--dtype`` other than float32 becomes autocast)."""
    autocast, _ = training_autocast(score_config.dtype, resolve_device(score_config.device))
    return load_model(
        score_config.model, revision=score_config.revision, trust_remote_code=score_config.trust_remote_code,
        dtype="float32", device=score_config.device, attn_implementation=score_config.attn_implementation,
        with_lm_head=True, autocast=str(autocast).replace("torch.", "") if autocast is not None else None,
        train_bytes_per_param=TRAIN_BYTES_PER_PARAM[config.optimizer],
    )


def encode_rows(rows: Sequence[int], ds: Any, layout: str, columns: Any, model: Any,
                score_config: ScoreConfig) -> dict[int, Any]:
    """``{row: EncodedPair}`` as the rows were scored; a row that no longer encodes ``ok`` is refused."""
    encoder = PairEncoder(
        model.tokenizer, use_chat_template=not score_config.no_chat_template, layout=score_config.layout, input_format=layout
    )
    max_length = score_config.max_length or int(model.info.get("max_position_embeddings") or 2**31 - 1)
    encoded = {}
    for row in rows:
        status, enc = encoder.encode_checked(normalize_row(ds[row], layout, columns), max_length)
        if status != "ok":
            raise BadDataError(
                f"row {row} was scored ok but now encodes as {status}; the scores were made with another model, "
                "tokenizer or `--max-length`: rescore, or pass the same options"
            )
        encoded[row] = enc
    return encoded
