"""Per-pair measures besides CHES: pure functions, no model, no tokenizer.

``last_hidden_ip``
    ``<h+_last, h-_last>``: inner product of the final hidden states at the
    last response position of each side (the position that predicts the last
    response token, EOS in the paper layout). The paper's cheap baseline.
``edit_distance``
    Levenshtein distance between the two responses' token ids divided by the
    longer response's length: 0 for identical responses, 1 for responses that
    share no aligned token. *Lower* means more similar, so ``-edit_distance``
    is the one that should track displacement risk.

CHES and LN-CHES themselves live in :mod:`ches_filter.ches`.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from .ches import inner_product

__all__ = ["levenshtein", "normalized_edit_distance", "last_hidden_ip"]


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


def last_hidden_ip(last_chosen: torch.Tensor, last_rejected: torch.Tensor) -> torch.Tensor:
    """Inner product of the last-response-position hidden states.

    Args:
        last_chosen: ``(N, D)`` state at the last position of ``y+``.
        last_rejected: ``(N, D)`` state at the last position of ``y-``.

    Returns:
        ``(N,)`` float64 ``<h+_last, h-_last>``.
    """
    return inner_product(last_chosen, last_rejected)
