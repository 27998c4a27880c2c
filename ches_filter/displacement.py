"""Measure likelihood displacement on the user's own model: the ``displacement`` pipeline.

For a sample of pairs, each pair on its own, from the same initial model θ:

* first order: with ``g+ = ∇θ log π(y+|x)`` and ``g- = ∇θ log π(y-|x)`` (log π
  summed over the response tokens of the token layout, the ones CHES counts),
  one DPO gradient step moves θ along ``g+ - g-``, so per unit step::

      first_order_dlogp_chosen   = <g+, g+ - g-> = ||g+||² - <g+, g->   (= D; D < 0: y+ falls)
      first_order_dlogp_rejected = <g-, g+ - g-> = <g+, g-> - ||g-||²

  A real SGD step with learning rate ``lr`` on the DPO loss (β, reference =
  initial model) moves θ by ``lr·β·σ(0)·(g+ - g-) = lr·β/2·(g+ - g-)``, so it
  changes log π(y+) by ``lr·β/2·D`` to first order.
* optionally (``steps > 0``) ``steps`` real SGD steps on that pair's DPO loss,
  recording the actual changes ``dlogp_chosen`` and ``dlogp_rejected``.

Gradients are held one at a time: parameters, ``g+`` and ``g-`` (or the
saved initial parameters during the real steps) make ~3 × the model's size.
Every measure (CHES, LN-CHES, last_hidden_ip, edit_distance) comes from the
same forward passes.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass
from typing import Any, Sequence

from . import __version__
from .batching import EncodedPair, PairEncoder
from .config import DisplacementConfig, ScoreConfig
from .errors import BadDataError, BadFlagError
from .formats import LAYOUTS, normalize_row
from .inputs import load_input, source_name
from .logprobs import HEAD_CHUNK_ELEMENTS, packed_is_exact, pair_logprobs, shrink_head_chunk
from .measures import MEASURES, last_hidden_ip, normalized_edit_distance
from .model import ModelState, flash_attention_problem, load_model
from .scorefile import with_metadata
from .stats import rank_correlation

# torch, pyarrow, numpy and tqdm are imported in the functions that use them: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["PairProbe", "measure_displacement", "displacement_summary", "format_summary", "DISPLACEMENT_COLUMNS"]

#: Measures correlated against displacement, with the sign that makes "higher = more risk".
#: Each measure with the sign that makes higher = riskier (from the measure registry).
SIGNED_MEASURES = tuple((m.name, 1 if m.higher_is_riskier else -1) for m in MEASURES.values())
DISPLACEMENT_COLUMNS = (
    "first_order_dlogp_chosen", "first_order_dlogp_rejected", "dlogp_chosen", "dlogp_rejected", "step_rounding_error",
    "logp_chosen", "logp_rejected", "grad_sq_norm_chosen", "grad_sq_norm_rejected", "grad_inner",
    "ches", "ln_ches", "last_hidden_ip", "edit_distance", "prompt_tokens", "chosen_tokens", "rejected_tokens",
)
_CHUNK = 1 << 22  # elements per slice when reducing or updating (bounds the temporaries)
_ROW = 1 << 16  # elements per float32 partial sum in _reduce


def _rows(flat: Any) -> Any:
    """A flat slice as ``(rows, _ROW)``, zero-padded at the end (float16/bfloat16 upcast to float32)."""
    import torch

    if flat.dtype in (torch.float16, torch.bfloat16):
        flat = flat.float()
    pad = (-flat.numel()) % _ROW
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, _ROW)


@dataclass
class SideOutput:
    """One forward pass over ``P + R``.

    Attributes:
        logp: scalar ``log π(R|P)`` (summed over R), attached to the graph when gradients are on.
        hidden: ``(|R|, D)`` float64 final hidden states at the positions predicting R (detached).
    """

    logp: Any
    hidden: Any


class PairProbe:
    """First-order and K-step DPO displacement of single pairs on one causal LM.

    Args:
        lm: a transformers causal LM (with its LM head); its parameters are
            switched to ``requires_grad`` and restored after every real step.
        device: where inputs go.
    """

    def __init__(self, lm: Any, device: Any) -> None:
        import torch

        self.lm = lm
        self.base = lm.base_model
        self.device = torch.device(device)

        # No dropout: the gradient must be that of the deterministic model. `self.state.restore()` gives the
        # model back as it came (train/eval flags, dropout rates, requires_grad).
        self.state = ModelState(lm, eval=True)
        self.params = [p for p in lm.parameters() if p.is_floating_point()]
        for p in self.params:
            p.requires_grad_(True)

        #: log-probs from one tree-masked row per pair where the scoring engine's self-check says it is exact.
        self.packed = packed_is_exact(lm, self.device)

        #: logits per LM-head chunk (halved by :meth:`shrink_head` after an out-of-memory error).
        self.head_elements = HEAD_CHUNK_ELEMENTS

    def shrink_head(self) -> bool:
        """Halve the LM-head chunk after one pair ran out of memory (:func:`~ches_filter.logprobs.shrink_head_chunk`)."""
        return shrink_head_chunk(self)

    def retry_on_oom(self, fn: Any, tokens: int) -> Any:
        """``fn()``, redone after an out-of-memory error with a smaller LM-head chunk (the engine's back-off).

        Each probe is one pair, so there is no batch to halve: the pair's
        passes are redone from the start (a real step restores the weights
        first), with :meth:`shrink_head`, until they fit or nothing is left to
        shrink (a one-line error naming the pair's size).
        """
        from .engine import TokenBudget, is_oom  # lazy: engine.py imports torch

        budget = TokenBudget(tokens, self.device)
        while True:
            try:
                return fn()
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(exc):
                    raise
                exc.__traceback__ = None
                budget.after_oom(exc, 1, tokens, self.shrink_head)

    # ---------------------------------------------------------------- forward
    def side(self, prompt: Sequence[int], response: Sequence[int], *, grad: bool) -> SideOutput:
        """``log π(response | prompt)`` and the response-position hidden states.

        Computed by the package's one log-prob function
        (:func:`ches_filter.logprobs.pair_logprobs`) on the pair ``(prompt,
        response, response[-1:])``: the second branch is the final token only,
        which adds no input position. The input is ``P + R[:-1]``: the last
        response token (EOS in the paper layout) is only ever predicted, as in
        the scoring engine.
        """
        out = self._logprobs([EncodedPair(tuple(prompt), tuple(response), tuple(response[-1:]))], grad=grad, hidden=True)
        return SideOutput(out.chosen[0], out.hidden_chosen[0])

    def _logprobs(self, pairs: Sequence[Any], *, grad: bool, hidden: bool = False) -> Any:
        return pair_logprobs(self.lm, pairs, packed=self.packed, grad=grad, hidden=hidden, device=self.device,
                             head_elements=self.head_elements)

    def _grad(self, scalar: Any) -> tuple:
        import torch

        return torch.autograd.grad(scalar, self.params, allow_unused=True)

    # ------------------------------------------------------------ first order
    def first_order(self, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int]) -> dict:
        """``D`` for both sides, gradient norms and every measure for one pair.

        Returns:
            dict with ``first_order_dlogp_chosen``/``_rejected``, ``logp_*``,
            ``grad_sq_norm_*``, ``grad_inner`` and the measures.
        """
        import torch

        from .ches import ches_from_sums, ln_ches_from_sums  # lazy: ches.py imports torch

        plus = self.side(prompt, chosen, grad=True)
        g_plus = self._grad(plus.logp)
        minus = self.side(prompt, rejected, grad=True)
        g_minus = self._grad(minus.logp)
        sums = self._reduce(g_plus, g_minus)
        del g_plus, g_minus
        s_c, s_r = plus.hidden.sum(0, keepdim=True), minus.hidden.sum(0, keepdim=True)
        n_c, n_r = torch.tensor([len(chosen)]), torch.tensor([len(rejected)])
        return {
            "first_order_dlogp_chosen": sums["plus_diff"],
            "first_order_dlogp_rejected": sums["minus_diff"],
            "logp_chosen": float(plus.logp.detach()),
            "logp_rejected": float(minus.logp.detach()),
            "grad_sq_norm_chosen": sums["plus_plus"],
            "grad_sq_norm_rejected": sums["minus_minus"],
            "grad_inner": sums["plus_minus"],
            "ches": float(ches_from_sums(s_c, s_r)[0]),
            "ln_ches": float(ln_ches_from_sums(s_c, s_r, n_c, n_r)[0]),
            "last_hidden_ip": float(last_hidden_ip(plus.hidden[-1:], minus.hidden[-1:])[0]),
            "edit_distance": normalized_edit_distance(chosen, rejected),
        }

    @staticmethod
    def _reduce(g_plus: Sequence[Any], g_minus: Sequence[Any]) -> dict[str, float]:
        """``||g+||²``, ``||g-||²``, ``<g+, g->`` and both D's over all parameters.

        D± are summed from the difference ``g+ - g-`` itself (``<g+, g+ - g->``),
        not as ``||g+||² - <g+, g->``, so nearly identical responses (the risky
        ones) keep their digits. Products run in the gradients' dtype over rows
        of 65,536 elements (float32 row sums are accurate to ~1e-7 there) and the
        rows are added in float64.
        """
        import torch

        acc = None
        for a, b in zip(g_plus, g_minus):
            if a is None and b is None:
                continue
            ref = a if a is not None else b
            a = a if a is not None else torch.zeros_like(ref)
            b = b if b is not None else torch.zeros_like(ref)
            fa, fb = a.reshape(-1), b.reshape(-1)
            for start in range(0, fa.numel(), _CHUNK):
                x, y = _rows(fa[start : start + _CHUNK]), _rows(fb[start : start + _CHUNK])
                d = x - y
                part = torch.stack([
                    torch.linalg.vecdot(x, x), torch.linalg.vecdot(y, y),
                    torch.linalg.vecdot(x, d), torch.linalg.vecdot(y, d),
                ]).to(torch.float64).sum(1)
                acc = part if acc is None else acc + part
        if acc is None:
            raise ValueError("the model has no parameter that the log-likelihood depends on")
        pp, mm, pd, md = acc.tolist()  # one device sync
        return {"plus_plus": pp, "minus_minus": mm, "plus_minus": pp - pd, "plus_diff": pd, "minus_diff": md}

    # ------------------------------------------------------------- real steps
    def dpo_steps(
        self, prompt: Sequence[int], chosen: Sequence[int], rejected: Sequence[int], *, steps: int, lr: float, beta: float,
        ref_logps: tuple[float, float] | None = None, watch: dict[str, Sequence[int]] | None = None,
    ) -> dict:
        """``steps`` plain-SGD steps on this pair's DPO loss; parameters are restored afterwards.

        The reference model is the initial model, so the first step's loss is
        ``log 2`` and its gradient is ``-β/2 (g+ - g-)``.

        Args:
            ref_logps: ``(log π(y+), log π(y-))`` of the initial model if
                already known (saves two forward passes).
            watch: other responses to the same prompt, by name, whose change
                to report too (the paper's " Yes" when training " No" over " Never").

        Returns:
            dict with ``dlogp_chosen`` and ``dlogp_rejected`` (and
            ``dlogp_<name>`` per watched response): log π after the steps minus
            log π before, in nats; ``step_rounding_error``: ``||applied -
            intended|| / ||intended||`` over all updates, the share of the SGD
            update lost to the weights' floating-point rounding (raise ``lr``
            when it is not small).
        """
        import torch

        saved = [p.detach().clone() for p in self.params]
        try:
            pair = [EncodedPair(tuple(prompt), tuple(chosen), tuple(rejected))]
            if ref_logps is None:
                ref = self._logprobs(pair, grad=False)
                ref_logps = (float(ref.chosen[0]), float(ref.rejected[0]))
            ref_c, ref_r = ref_logps
            watch = dict(watch or {})
            before = {name: float(self.side(prompt, ids, grad=False).logp) for name, ids in watch.items()}
            lost, wanted = self._sgd_steps(pair, ref_logps, steps=steps, lr=lr, beta=beta)
            after = self._logprobs(pair, grad=False)
            after_c, after_r = after.chosen[0], after.rejected[0]
            out = {
                "dlogp_chosen": float(after_c) - ref_c,
                "dlogp_rejected": float(after_r) - ref_r,
                "step_rounding_error": math.sqrt(lost / wanted) if wanted > 0 else 0.0,
            }
            for name, ids in watch.items():
                out[f"dlogp_{name}"] = float(self.side(prompt, ids, grad=False).logp) - before[name]
            return out
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.copy_(s)

    def _sgd_steps(self, pair: list, ref_logps: tuple[float, float], *, steps: int, lr: float, beta: float) -> tuple[float, float]:
        """``steps`` plain-SGD steps on ``pair``'s DPO loss, in place.

        Returns:
            ``(||applied - intended||², ||intended||²)`` summed over every update (:func:`_sgd_update`).
        """
        import torch
        import torch.nn.functional as F

        ref_c, ref_r = ref_logps
        lost = wanted = 0.0
        for _ in range(steps):
            both = self._logprobs(pair, grad=True)
            plus, minus = both.chosen[0], both.rejected[0]
            loss = -F.logsigmoid(beta * ((plus - ref_c) - (minus - ref_r)))
            grads = self._grad(loss)
            with torch.no_grad():
                for p, g in zip(self.params, grads):
                    if g is None:
                        continue
                    part_lost, part_wanted = _sgd_update(p, g, lr)
                    lost += part_lost
                    wanted += part_wanted
            del grads, plus, minus, loss, both
        return lost, wanted


def _sgd_update(p: Any, g: Any, lr: float) -> tuple[float, float]:
    """``p -= lr * g`` in place; returns ``(||applied - intended||², ||intended||²)``.

    An update below half the weights' rounding step vanishes in float32 or
    bfloat16, so the applied change is measured. ``new - old`` is exact
    (Sterbenz: the two are within a factor 2), so float32 arithmetic suffices;
    the sums are accumulated slice by slice in float64.
    """
    import torch

    flat_p, flat_g = p.data.view(-1), g.reshape(-1)
    lost = wanted = 0.0
    for start in range(0, flat_p.numel(), _CHUNK):
        stop = start + _CHUNK
        step = flat_g[start:stop].float()
        applied = flat_p[start:stop].to(torch.float32, copy=True)  # the old weights (.float() would alias float32)
        flat_p[start:stop].add_(flat_g[start:stop], alpha=-lr)
        applied.sub_(flat_p[start:stop].float()).neg_()  # new - old
        applied.add_(step, alpha=lr)  # applied - intended, intended = -lr * g
        lost += float(applied.square().sum(dtype=torch.float64))
        wanted += lr * lr * float(step.square().sum(dtype=torch.float64))
    return lost, wanted


# ------------------------------------------------------------------ sampling
def _sample(ds: Any, layout: str, columns: Any, encoder: Any, config: DisplacementConfig, max_length: int) -> list[tuple[int, Any, Any]]:
    """Up to ``config.sample`` scorable ``(row, Pair, EncodedPair)``, drawn uniformly with ``config.seed``; sorted by row."""
    import numpy as np

    order = np.random.default_rng(config.seed).permutation(len(ds))
    picked: list[tuple[int, Any, Any]] = []
    skipped: dict[str, int] = {}
    for index in order.tolist():
        pair = normalize_row(ds[index], layout, columns)
        status, enc = encoder.encode_checked(pair, max_length)
        if status == "ok":
            picked.append((index, pair, enc))
            if len(picked) == config.sample:
                break
        else:
            skipped[status] = skipped.get(status, 0) + 1
    if skipped:
        logger.info("skipped while sampling: %s", ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())))
    if not picked:
        raise BadDataError("no pair of the input can be probed (every row was skipped: "
                           + ", ".join(f"{k} {v}" for k, v in sorted(skipped.items())) + ")")
    if len(picked) < config.sample:
        logger.warning("only %d scorable pairs in the input; `--sample %d` asked for more", len(picked), config.sample)
    return sorted(picked, key=lambda item: item[0])


def _watched(encoder: Any, pair: Any, enc: Any, watch: dict[str, str]) -> dict[str, tuple[int, ...]]:
    """Token ids of each watched response, encoded as if it were the chosen one.

    A response whose encoding would move the prompt boundary (possible with
    ``--layout trl``) is left out: its change is then recorded as None.
    """
    out = {}
    for name, text in watch.items():
        other = encoder.encode(dataclasses.replace(pair, chosen=text, chosen_text=text))
        if other.prompt == enc.prompt:
            out[name] = other.chosen
    return out


# ------------------------------------------------------------------ pipeline
def measure_displacement(
    data: Any,
    config: DisplacementConfig | None = None,
    score_config: ScoreConfig | None = None,
    *,
    model: Any = None,
    progress: bool | None = None,
    watch: dict[str, str] | None = None,
) -> Any:
    """Probe a sample of pairs: first-order D (and real DPO steps) plus every measure.

    Steps: check the flags (:func:`_check_names`), load the input and the model
    (:func:`_probe_model`), an encoder (:func:`_encoder`), draw the sample
    (:func:`_sample`), probe each pair (:func:`_probe_all`), then the table
    with its metadata (:func:`_result_table`).

    Args:
        data: path, ``datasets.Dataset`` or list of row dicts.
        config: sample size, seed and the optional real steps.
        score_config: how to read the input and which model to load; ``dtype``
            ``auto`` means float32 here (SGD steps of 1e-5 vanish in bfloat16).
        model: a :class:`~ches_filter.model.LoadedModel` loaded ``with_lm_head``.
        progress: show a progress bar (default: not ``score_config.quiet``).
        watch: with ``steps``, other responses (name -> text) whose log-likelihood
            change to record as ``dlogp_<name>``, tokenized like the chosen
            response (e.g. ``{"yes": " Yes"}`` for the paper's persona toy).

    Returns:
        A ``pyarrow.Table``, one row per probed pair in ``row_index`` order:
        ``row_index``, the id column if configured, then
        :data:`DISPLACEMENT_COLUMNS` (``dlogp_*`` only with ``steps > 0``).
        The schema metadata (``ches_filter``) holds the settings and the
        :func:`displacement_summary`.
    """
    config = config or DisplacementConfig()
    score_config = score_config or ScoreConfig()
    watch = dict(watch or {})
    _check_names(watch, score_config)
    ds, layout, columns = load_input(data, score_config)
    model = _probe_model(model, score_config)
    encoder = _encoder(model, score_config, layout)
    max_length = score_config.max_length or int(model.info.get("max_position_embeddings") or 2**31 - 1)
    picked = _sample(ds, layout, columns, encoder, config, max_length)
    show = (not score_config.quiet) if progress is None else progress
    records = _probe_all(PairProbe(model.decoder, model.device), picked, encoder, config, watch, show)
    if config.steps:
        _warn_lost_updates(records, config, model)
    return _result_table(records, picked, data, ds, layout, columns, model, encoder, config, score_config, watch)


def _check_names(watch: dict[str, str], score_config: ScoreConfig) -> None:
    """Refuses a watch name that is no identifier or is taken, and an id column the result writes itself."""
    for name in watch:
        if not name.isidentifier() or f"dlogp_{name}" in DISPLACEMENT_COLUMNS:
            raise BadFlagError(f"watch name {name!r} must be an identifier other than chosen/rejected")
    # ScoreConfig refuses the score file's own names; the result table has more of its own.
    own = ("row_index", *DISPLACEMENT_COLUMNS, *(f"dlogp_{name}" for name in watch))
    if score_config.id_column in own:
        raise BadFlagError(
            f"`--id-column` {score_config.id_column!r} is a column displacement writes itself ({', '.join(own)}); "
            f"copy or rename that input column (e.g. to `{score_config.id_column}_id`) and pass the new name"
        )


def _probe_model(model: Any, score_config: ScoreConfig) -> Any:
    """``model``, or the one ``score_config`` names loaded with its LM head (``dtype auto`` as float32); checked usable."""
    if model is None:
        model = load_model(
            score_config.model,
            revision=score_config.revision,
            trust_remote_code=score_config.trust_remote_code,
            dtype="float32" if score_config.dtype == "auto" else score_config.dtype,
            device=score_config.device,
            attn_implementation=score_config.attn_implementation,
            device_map=score_config.device_map,
            with_lm_head=True,
        )
    if model.decoder.get_output_embeddings() is None:
        raise BadDataError("displacement needs the model's LM head; load it with `load_model(..., with_lm_head=True)`")
    problem = flash_attention_problem(getattr(model.decoder.config, "_attn_implementation", None), model.device,
                                      next(model.decoder.parameters()).dtype)
    if problem:
        raise BadFlagError(problem)
    return model


def _encoder(model: Any, score_config: ScoreConfig, layout: str) -> Any:
    """The :class:`~ches_filter.batching.PairEncoder` of the token layout; refuses conversations without a chat template."""
    encoder = PairEncoder(
        model.tokenizer, use_chat_template=not score_config.no_chat_template, layout=score_config.layout, input_format=layout,
        on_special_tokens=score_config.on_special_tokens,
    )
    if not encoder.use_chat_template and LAYOUTS.get(layout).conversational:
        raise BadDataError(
            f"the input is {layout} but no chat template can be used; conversational prompts need one: use a "
            "model that has one, or give `prompt`/`chosen`/`rejected` as plain strings"
        )
    return encoder


def _probe_all(probe: PairProbe, picked: list, encoder: Any, config: DisplacementConfig, watch: dict[str, str],
               show: bool) -> list[dict]:
    """One record per sampled pair: first order, then (with ``config.steps``) the real steps; the model given back after."""
    from tqdm.auto import tqdm

    records = []
    try:
        for index, pair, enc in tqdm(picked, desc="displacement", unit="pair", disable=not show, dynamic_ncols=True):
            record = {"row_index": index}
            tokens = len(enc.prompt) + len(enc.chosen) + len(enc.rejected)
            record.update(probe.retry_on_oom(lambda: probe.first_order(enc.prompt, enc.chosen, enc.rejected), tokens))
            if config.steps:
                watched = _watched(encoder, pair, enc, watch)
                ref_logps = (record["logp_chosen"], record["logp_rejected"])
                record.update(probe.retry_on_oom(lambda: probe.dpo_steps(
                    enc.prompt, enc.chosen, enc.rejected, steps=config.steps, lr=config.lr, beta=config.beta,
                    ref_logps=ref_logps, watch=watched,
                ), tokens))
                for name in watch:
                    record.setdefault(f"dlogp_{name}", None)
            record.update(prompt_tokens=len(enc.prompt), chosen_tokens=len(enc.chosen), rejected_tokens=len(enc.rejected))
            records.append(record)
    finally:
        probe.state.restore()
    return records


def _warn_lost_updates(records: list[dict], config: DisplacementConfig, model: Any) -> None:
    """Warns when the median SGD update lost more than 5% to the weights' rounding (``--lr`` too small)."""
    errors = sorted(r["step_rounding_error"] for r in records)
    median = errors[len(errors) // 2]
    if median > 0.05:
        dtype = str(model.dtype).replace("torch.", "")
        logger.warning(
            "%.0f%% of each SGD update (median) was lost to the weights' rounding: `--lr %g` is too small for "
            "%s weights; raise `--lr` (aim for |dlogp| of ~0.01-0.1 nats per step)%s",
            100 * median, config.lr, dtype, "" if dtype == "float32" else " or use `--dtype float32`",
        )


def _result_table(records: list[dict], picked: list, data: Any, ds: Any, layout: str, columns: Any, model: Any,
                  encoder: Any, config: DisplacementConfig, score_config: ScoreConfig, watch: dict[str, str]) -> Any:
    """The records as a ``pyarrow.Table`` (ids from the input), with the settings and summary as metadata."""
    import pyarrow as pa

    step_columns = ("dlogp_chosen", "dlogp_rejected", "step_rounding_error")
    names = ["row_index"] + [c for c in DISPLACEMENT_COLUMNS if config.steps or c not in step_columns]
    if config.steps:
        names += [f"dlogp_{name}" for name in watch]
    arrays = {name: [r[name] for r in records] for name in names}
    fields = []
    for name in names:
        typ = pa.int64() if name == "row_index" or name.endswith("_tokens") else pa.float64()
        fields.append((name, pa.array(arrays[name], typ)))
    if columns.id:
        ids = ds.select_columns([columns.id])[[item[0] for item in picked]][columns.id] if picked else []
        fields.insert(1, (columns.id, pa.array(ids)))
    table = pa.table(dict(fields))
    metadata = {
        "ches_filter_version": __version__,
        "kind": "displacement",
        "model": model.info,
        "input_format": layout,
        "token_layout": score_config.layout,
        "use_chat_template": encoder.use_chat_template,
        "columns": dataclasses.asdict(columns),
        "input": source_name(data),
        "num_rows": len(ds),
        "config": dataclasses.asdict(config),
        "summary": displacement_summary(table, steps=config.steps),
    }
    return with_metadata(table, metadata)


# ------------------------------------------------------------------- summary
def _quartiles(values: list[float], n: int) -> tuple[list[int], list[int]]:
    """Row positions of the top and bottom quarter (at least one each) ranked by ``values``."""
    order = sorted(range(n), key=lambda i: (values[i], i))
    q = max(1, n // 4)
    return order[-q:], order[:q]


def displacement_summary(table: Any, *, steps: int = 0) -> dict:
    """Spearman correlations of each measure with displacement, and displaced fractions by quartile.

    "Displacement" is ``-first_order_dlogp_chosen`` (and ``-dlogp_chosen``
    after real steps); each measure is signed so that higher means more risk
    (``-edit_distance``). A pair is displaced when its chosen log-likelihood
    falls (``D < 0``, or ``dlogp_chosen < 0``).
    """
    cols = {name: table.column(name).to_pylist() for name in table.column_names}
    n = table.num_rows
    targets = [("first_order", [-v for v in cols["first_order_dlogp_chosen"]])]
    if "dlogp_chosen" in cols:
        targets.append((f"steps_{steps}", [-v for v in cols["dlogp_chosen"]]))
    spearman = {}
    for measure, sign in SIGNED_MEASURES:
        if measure not in cols:
            continue
        key = measure if sign > 0 else f"-{measure}"
        spearman[key] = {name: rank_correlation([sign * v for v in cols[measure]], target) for name, target in targets}
    displaced = {}
    for measure in ("ches", "ln_ches"):
        if measure not in cols or n == 0:
            continue
        top, bottom = _quartiles(cols[measure], n)
        entry = {"quartile_size": len(top)}
        for name, column in (("first_order", "first_order_dlogp_chosen"), (f"steps_{steps}", "dlogp_chosen")):
            if column in cols:
                entry[name] = {
                    "top": sum(cols[column][i] < 0 for i in top) / len(top),
                    "bottom": sum(cols[column][i] < 0 for i in bottom) / len(bottom),
                    "all": sum(v < 0 for v in cols[column]) / n,
                }
        displaced[measure] = entry
    return {"pairs": n, "steps": steps, "spearman": spearman, "displaced_fraction": displaced}


def format_summary(summary: dict) -> list[str]:
    """The printed table: Spearman rho per measure, then displaced fractions by quartile."""
    targets = ["first_order"] + ([f"steps_{summary['steps']}"] if summary["steps"] else [])
    heads = {"first_order": "vs -D (first order)", f"steps_{summary['steps']}": f"vs -dlogp+ ({summary['steps']} DPO steps)"}
    lines = [f"Spearman correlation with displacement over {summary['pairs']} pairs (higher = the measure ranks displaced pairs as risky):"]
    lines.append(f"  {'measure':<16}" + "".join(f"{heads[t]:>30}" for t in targets))
    for measure, row in summary["spearman"].items():
        cells = "".join(f"{'n/a' if row.get(t) is None else format(row[t], '+.3f'):>30}" for t in targets)
        lines.append(f"  {measure:<16}{cells}")
    for measure, entry in summary["displaced_fraction"].items():
        for t in targets:
            if t not in entry:
                continue
            what = "D < 0" if t == "first_order" else "dlogp+ < 0"
            f = entry[t]
            lines.append(
                f"pairs with {what}: top {measure} quartile {f['top']:.0%}, bottom quartile {f['bottom']:.0%}, "
                f"all {f['all']:.0%} ({entry['quartile_size']} pairs per quartile)"
            )
    return lines
