"""The measure registry: every per-pair score the tool computes, ranks and prunes by.

Each :class:`Measure` is a function over a batch of pairs' states and tokens
(:class:`MeasureInput`) plus the facts every consumer needs: its **risk
direction** (``prune --by``, ``report --by``, ``validate --by`` and
``displacement`` all rank through :func:`risk_key`), whether it needs the
model's hidden states, and its exact value for identical responses.

``ches`` / ``ln_ches``
    The paper's CHES and length-normalised CHES (:mod:`ches_filter.ches`).
    Higher = riskier.
``last_hidden_ip``
    ``<h+_last, h-_last>``: inner product of the final hidden states at the
    last response position of each side (the position that predicts the last
    response token, EOS in the paper layout). The paper's cheap baseline.
    Higher (more similar) = riskier.
``edit_distance``
    Levenshtein distance between the two responses' token ids divided by the
    longer response's length: 0 for identical responses, 1 for responses that
    share no aligned token. *Lower* (more similar) = riskier. Needs no model.

A new measure is one ``MEASURES.register(...)`` call here (or in a module
imported here) plus its tests; the CLI's ``--measures``/``--by`` choices, the
score file's columns and every ranking read it from the registry. No torch
import at module level: the CLI reads the registry for ``--help``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Hashable, Sequence

from .registry import Registry

if TYPE_CHECKING:  # pragma: no cover
    import torch

# torch is imported in the functions that use it: `ches-filter --help` stays instant.

__all__ = [
    "Measure", "MeasureInput", "MEASURES", "DEFAULT_MEASURES", "risk_key", "compute_measures",
    "levenshtein", "normalized_edit_distance", "last_hidden_ip",
]


@dataclass(frozen=True)
class MeasureInput:
    """What a measure may read for a batch of ``N`` pairs.

    Attributes:
        chosen: ``N`` token-id sequences of ``y+`` (EOS included in the paper layout).
        rejected: ``N`` token-id sequences of ``y-``.
        states: the engine's per-pair states (``s_chosen``/``s_rejected``:
            ``(N, D)`` sums; ``last_chosen``/``last_rejected``: ``(N, D)``), or
            None when no measure asked for needs the model.
    """

    chosen: Sequence[Sequence[int]]
    rejected: Sequence[Sequence[int]]
    states: Any = None


@dataclass(frozen=True)
class Measure:
    """One per-pair measure.

    Attributes:
        name: column name and ``--by`` value.
        label: human name for tables and plots.
        higher_is_riskier: the risk direction (False: lower = riskier).
        needs_model: reads ``MeasureInput.states`` (a forward pass).
        identical_value: exact value for a pair whose responses are identical
            token for token, or None when it must be computed from states.
        compute: ``MeasureInput -> N`` floats.
        description: one line for ``--help`` and the docs.
    """

    name: str
    label: str
    higher_is_riskier: bool
    needs_model: bool
    identical_value: float | None
    compute: Callable[[MeasureInput], Sequence[float]]
    description: str


def levenshtein(a: Sequence[Hashable], b: Sequence[Hashable]) -> int:
    """Edit distance (insertions, deletions, substitutions, each cost 1).

    Bit-parallel (Myers 1999 in Hyyrö's formulation) on Python integers: one
    pass over the longer sequence with ``len(shorter)``-bit words, so two
    2,000-token responses take milliseconds, not the seconds of the
    ``O(n m)`` table.
    """
    if len(a) < len(b):
        a, b = b, a
    m = len(b)
    if m == 0:
        return len(a)
    peq: dict[Hashable, int] = {}
    for i, token in enumerate(b):
        peq[token] = peq.get(token, 0) | (1 << i)
    mask = (1 << m) - 1
    high = 1 << (m - 1)
    pv, mv, score = mask, 0, m
    for token in a:
        eq = peq.get(token, 0)
        xv = eq | mv
        xh = (((eq & pv) + pv) ^ pv) | eq
        ph = mv | ~(xh | pv)
        mh = pv & xh
        if ph & high:
            score += 1
        elif mh & high:
            score -= 1
        ph = ((ph << 1) | 1) & mask
        mh = (mh << 1) & mask
        pv = (mh | ~(xv | ph)) & mask
        mv = ph & xv
    return score


def normalized_edit_distance(a: Sequence[Hashable], b: Sequence[Hashable]) -> float:
    """``levenshtein(a, b) / max(len(a), len(b))`` in [0, 1] (0.0 when both are empty)."""
    longest = max(len(a), len(b))
    return levenshtein(a, b) / longest if longest else 0.0


def last_hidden_ip(last_chosen: "torch.Tensor", last_rejected: "torch.Tensor") -> "torch.Tensor":
    """Inner product of the last-response-position hidden states.

    Args:
        last_chosen: ``(N, D)`` state at the last position of ``y+``.
        last_rejected: ``(N, D)`` state at the last position of ``y-``.

    Returns:
        ``(N,)`` float64 ``<h+_last, h-_last>``.
    """
    from .ches import inner_product  # lazy: ches.py imports torch

    return inner_product(last_chosen, last_rejected)


def _ches(x: MeasureInput) -> list[float]:
    from .ches import ches_from_sums  # lazy: ches.py imports torch

    return ches_from_sums(x.states.s_chosen, x.states.s_rejected).tolist()


def _ln_ches(x: MeasureInput) -> list[float]:
    import torch

    from .ches import ln_ches_from_sums  # lazy: ches.py imports torch

    n_c = torch.tensor([len(c) for c in x.chosen])
    n_r = torch.tensor([len(r) for r in x.rejected])
    return ln_ches_from_sums(x.states.s_chosen, x.states.s_rejected, n_c, n_r).tolist()


def _last_hidden_ip(x: MeasureInput) -> list[float]:
    return last_hidden_ip(x.states.last_chosen, x.states.last_rejected).tolist()


def _edit_distance(x: MeasureInput) -> list[float]:
    return [normalized_edit_distance(c, r) for c, r in zip(x.chosen, x.rejected)]


#: Every measure, in score-file column order.
MEASURES: Registry[Measure] = Registry("measure", "--by")
MEASURES.register("ches", Measure(
    "ches", "CHES", True, True, 0.0, _ches, "<S+, S-> - ||S+||^2 (Razin et al.)"))
MEASURES.register("ln_ches", Measure(
    "ln_ches", "LN-CHES", True, True, 0.0, _ln_ches, "<S+, S->/(|y+||y-|) - ||S+||^2/|y+|^2"))
MEASURES.register("last_hidden_ip", Measure(
    "last_hidden_ip", "last hidden IP", True, True, None, _last_hidden_ip,
    "<h+, h-> at the last response position (baseline)"))
MEASURES.register("edit_distance", Measure(
    "edit_distance", "edit distance", False, False, 0.0, _edit_distance,
    "token edit distance / longer length (baseline; lower = riskier)"))

#: What ``score`` computes when ``--measures`` is not given.
DEFAULT_MEASURES = ("ches", "ln_ches")


def risk_key(name: str, value: float) -> float:
    """Sort key that puts the riskiest value of measure ``name`` last (ascending = safest first)."""
    return value if MEASURES.get(name).higher_is_riskier else -value


def compute_measures(names: Sequence[str], x: MeasureInput) -> dict[str, list[float]]:
    """Every measure in ``names`` over one batch: ``{name: N floats}``."""
    return {name: list(MEASURES.get(name).compute(x)) for name in names}
