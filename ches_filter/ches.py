"""The CHES math: pure tensor functions, no model, no tokenizer.

Notation (Razin et al., ICLR 2025): for one preference pair, ``S+`` and ``S-``
are the sums of the final hidden states at the positions whose *next* token is
a response token (EOS included), ``n+ = |y+|`` and ``n- = |y-|`` the response
lengths in tokens.

    CHES    = <S+, S-> - ||S+||^2                       (computed as <S+, S- - S+>)
    LN-CHES = <S+, S->/(n+ n-) - ||S+||^2 / n+^2

Higher means more risk that DPO on the pair lowers the preferred response's
likelihood.
"""

from __future__ import annotations

import torch

__all__ = ["gather_sums", "ches_from_sums", "ln_ches_from_sums", "inner_product"]


def gather_sums(hidden: torch.Tensor, flat_index: torch.Tensor, segment: torch.Tensor, num_segments: int) -> torch.Tensor:
    """Sum selected hidden-state rows per segment, in float64.

    One position may feed several segments (the last prompt position starts
    both the chosen and the rejected response in a packed row).

    Args:
        hidden: ``(B, L, D)`` final hidden states (any float dtype).
        flat_index: ``(M,)`` int64 indices into the flattened ``B * L`` positions.
        segment: ``(M,)`` int64 segment of each selected position, in ``[0, N)``.
        num_segments: number of output segments ``N``.

    Returns:
        ``(N, D)`` float64 sums; a segment nothing maps to sums to zero.
    """
    if hidden.dim() != 3 or flat_index.shape != segment.shape:
        raise ValueError(
            f"shapes do not match: hidden {tuple(hidden.shape)}, flat_index {tuple(flat_index.shape)}, "
            f"segment {tuple(segment.shape)}"
        )
    # Gather the few positions that matter before upcasting: float64 over the
    # whole (B, L, D) block would cost more memory than the forward pass.
    rows = hidden.reshape(-1, hidden.shape[-1]).index_select(0, flat_index).to(torch.float64)
    out = torch.zeros(num_segments, hidden.shape[-1], dtype=torch.float64, device=hidden.device)
    out.index_add_(0, segment, rows)
    return out


def inner_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise inner product ``<a_i, b_i>`` in float64.

    Args:
        a: ``(N, D)``.
        b: ``(N, D)``.

    Returns:
        ``(N,)`` float64.
    """
    return (a.to(torch.float64) * b.to(torch.float64)).sum(-1)


def ches_from_sums(s_chosen: torch.Tensor, s_rejected: torch.Tensor) -> torch.Tensor:
    """CHES score per pair.

    Args:
        s_chosen: ``(N, D)`` sums ``S+``.
        s_rejected: ``(N, D)`` sums ``S-``.

    Returns:
        ``(N,)`` float64 ``<S+, S-> - ||S+||^2``, evaluated as ``<S+, S- - S+>``
        so identical responses score exactly 0 and large norms do not cancel
        catastrophically.
    """
    s_chosen = s_chosen.to(torch.float64)
    return inner_product(s_chosen, s_rejected.to(torch.float64) - s_chosen)


def ln_ches_from_sums(
    s_chosen: torch.Tensor, s_rejected: torch.Tensor, n_chosen: torch.Tensor, n_rejected: torch.Tensor
) -> torch.Tensor:
    """Length-normalised CHES per pair.

    Args:
        s_chosen: ``(N, D)`` sums ``S+``.
        s_rejected: ``(N, D)`` sums ``S-``.
        n_chosen: ``(N,)`` response lengths ``|y+|`` in tokens (EOS included), > 0.
        n_rejected: ``(N,)`` response lengths ``|y-|``, > 0.

    Returns:
        ``(N,)`` float64 ``<S+, S->/(n+ n-) - ||S+||^2/n+^2``, evaluated as
        ``<m+, m- - m+>`` with the mean states ``m = S/n``.
    """
    n_c = n_chosen.to(torch.float64).unsqueeze(-1)
    n_r = n_rejected.to(torch.float64).unsqueeze(-1)
    mean_c = s_chosen.to(torch.float64) / n_c
    mean_r = s_rejected.to(torch.float64) / n_r
    return inner_product(mean_c, mean_r - mean_c)
