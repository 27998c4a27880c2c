"""Summed response log-likelihoods ``log π(y+|x)`` and ``log π(y-|x)`` of encoded pairs.

The one log-prob function of the package: ``displacement`` and ``validate``
both call :func:`pair_logprobs`, so the tokens trained on are the tokens
scored (the :class:`~ches_filter.batching.EncodedPair` layout of ``--layout``).

Two paths compute the same numbers:

``packed``
    one row per pair, ``[P | R+[:-1] | R-[:-1]]`` with the scoring engine's
    tree mask and restarted position ids (:func:`ches_filter.engine.packed_rows`,
    :func:`ches_filter.engine.tree_mask`): the prompt is encoded once.
    Exact only where the engine's self-check says so (:func:`packed_is_exact`).
``plain``
    ``P + R+[:-1]`` and ``P + R-[:-1]`` as two right-padded rows.

Response token ``R[k]`` is predicted at row index ``p-1+k`` of its branch (the
last prompt position starts both branches); the final token (EOS in the paper
layout) is only ever predicted. Logits are computed for the tail of each batch
from the earliest response-predicting position on (``logits_to_keep``), through
the model's own forward, so logit soft-capping or scaling applies.

Memory: where the LM head alone reproduces the model's logits (checked once,
:func:`head_is_exact`; every standard transformers causal LM), the head and
the cross-entropy run on :data:`HEAD_CHUNK_ELEMENTS` logits at a time, each
chunk recomputed in the backward pass, so they never hold more than
:func:`head_peak_bytes` (512 MiB) whatever the batch: 8,192 response positions
of a 128k vocabulary are 4.3 GB of float32 logits in one tensor, 17 GB with
cross-entropy's copies and their gradients.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass
from typing import Any, Sequence

# torch is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["PairLogProbs", "pair_logprobs", "packed_is_exact", "HEAD_CHUNK_ELEMENTS", "head_chunk_positions", "head_peak_bytes"]

#: Logits computed at once by the LM head: ``positions x vocabulary`` elements per chunk (32 Mi = 128 MiB
#: in float32). The head's transient memory is at most :func:`head_peak_bytes` of it, whatever the batch.
HEAD_CHUNK_ELEMENTS = 1 << 25


def head_chunk_positions(vocab: int, elements: int = HEAD_CHUNK_ELEMENTS) -> int:
    """Response positions whose logits are computed together: ``elements // vocab`` (at least 1)."""
    return max(1, int(elements) // max(1, int(vocab)))


def head_peak_bytes(vocab: int, elements: int = HEAD_CHUNK_ELEMENTS) -> int:
    """The stated bound on the LM head's transient memory for one chunk: 16 bytes per logit.

    A chunk's logits in the compute dtype (<= 4 bytes), their float32 copy
    under autocast (4), cross-entropy's log-softmax (4) and, in the backward
    pass (the chunk is recomputed, :func:`torch.utils.checkpoint`), the
    gradient of the logits (4): at most 16 bytes per element of one chunk,
    instead of the same per element of every response position at once.
    """
    return 16 * head_chunk_positions(vocab, elements) * int(vocab)


@dataclass
class PairLogProbs:
    """Log-likelihoods of a batch of pairs, in the order given.

    Attributes:
        chosen: ``(B,)`` ``log π(y+|x)`` summed over ``y+``'s tokens;
            attached to the graph when computed with ``grad=True``.
        rejected: ``(B,)`` the same for ``y-``.
        chosen_tokens: ``|y+|`` per pair.
        rejected_tokens: ``|y-|`` per pair.
        hidden_chosen: with ``hidden=True``, per pair the ``(|y+|, D)`` float64
            final hidden states at the positions predicting ``y+`` (detached).
        hidden_rejected: the same for ``y-``.
    """

    chosen: Any
    rejected: Any
    chosen_tokens: list[int]
    rejected_tokens: list[int]
    hidden_chosen: list[Any] | None = None
    hidden_rejected: list[Any] | None = None


def packed_is_exact(lm: Any, device: Any) -> bool:
    """Whether the packed path is exact for this model: the scoring engine's own choice and self-check."""
    from .engine import Engine  # lazy: engine.py imports torch

    return Engine(lm, device, strategy="auto", workers=1).strategy == "packed"


def _autocast(device: Any, dtype: Any) -> Any:
    import torch

    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def _full_index(flat: Sequence[int], width: int, keep: int, device: Any) -> Any:
    """Indices into the flattened ``(B, width)`` states of positions given as indices into the ``(B, keep)`` tail."""
    import torch

    first = width - keep
    return torch.tensor([(i // keep) * width + first + i % keep for i in flat], device=device)


def _head(lm: Any, states: Any) -> Any:
    """Logits of the causal LM for final hidden states: its LM head plus the output scalings transformers applies."""
    import torch

    logits = lm.get_output_embeddings()(states)
    config = lm.config
    softcap = getattr(config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    if getattr(config, "logit_scale", None):  # Cohere
        logits = logits * config.logit_scale
    if getattr(config, "logits_scaling", None):  # Granite
        logits = logits / config.logits_scaling
    return logits


def head_is_exact(lm: Any, device: Any, autocast_dtype: Any = None) -> bool:
    """Whether decoder + :func:`_head` reproduce the model's own logits (checked once per model on a short random input).

    Computing the head only at the response-predicting positions saves most
    of the LM head's cost (vocabulary x hidden per position); a model whose
    forward does more than :func:`_head` knows is caught here and gets its
    own forward (logits for the batch's tail) instead.
    """
    import torch

    cached = getattr(lm, "_ches_filter_head_exact", None)
    if cached is not None:
        return cached
    vocab = int(getattr(lm.config, "vocab_size", 1000))
    ids = torch.randint(4, max(5, vocab), (1, 12), generator=torch.Generator().manual_seed(0)).to(device)
    head = lm.get_output_embeddings()
    base_model = getattr(lm, "base_model", None)
    why = None
    if head is None or base_model is None or base_model is lm:
        why = "it has no separate base model and LM head"
    else:
        # Run as the passes run (under their autocast): an error here (out of memory, an attention kernel
        # that refuses the dtype) is the model's, and is raised, never read as "not exact".
        with torch.no_grad(), _autocast(device, autocast_dtype):
            full = lm(input_ids=ids, use_cache=False).logits[0].float()
            base = base_model(input_ids=ids, use_cache=False)
            states = base[0] if isinstance(base, tuple) else getattr(base, "last_hidden_state", None)
            in_features = getattr(head, "in_features", None)
            if not isinstance(states, torch.Tensor) or states.dim() != 3:
                why = "its base model returns no (batch, length, hidden) states"
            elif in_features is not None and states.shape[-1] != in_features:
                why = f"its LM head takes {in_features} features, not the base model's {states.shape[-1]}"
            else:
                mine = _head(lm, states[0]).float()
        if why is None:
            if mine.shape != full.shape:
                why = f"its logits have shape {tuple(full.shape)}, the head gives {tuple(mine.shape)}"
            else:
                err = float((full - mine).abs().max() / full.abs().max().clamp_min(1e-12))
                low = autocast_dtype is not None or next(lm.parameters()).dtype not in (torch.float32, torch.float64)
                if err > (2e-2 if low else 1e-4):
                    why = f"the head alone differs from its logits by {err:.1e} (relative)"
    exact = why is None
    if not exact:
        logger.info("log-probs through the model's own forward (the LM head alone is not exact: %s); "
                    "the head's memory is then not bounded by chunks", why)
    try:
        lm._ches_filter_head_exact = exact
    except AttributeError:
        pass
    return exact


def shrink_head_chunk(owner: Any) -> bool:
    """After one pair ran out of memory: halve ``owner.head_elements`` (its LM-head chunk) while the chunk
    still holds more than one position; warn the first time, log after. Shared by validate's trainer and
    displacement's probe (``owner`` has ``lm`` and ``head_elements``).

    Returns:
        False when the chunk is already one position wide (nothing left to halve).
    """
    if owner.head_elements // 2 < vocab_size(owner.lm):
        return False
    owner.head_elements //= 2
    said = getattr(owner, "_said_head", False)
    owner._said_head = True
    (logger.info if said else logger.warning)(
        "out of memory on one pair; retrying with LM-head chunks of %d logits", owner.head_elements)
    return True


def vocab_size(lm: Any) -> int:
    """Width of the model's logits (the LM head's rows; the config's ``vocab_size`` without a head weight)."""
    head = lm.get_output_embeddings()
    weight = getattr(head, "weight", None)
    return int(weight.shape[0]) if weight is not None and weight.dim() == 2 else int(lm.config.vocab_size)


def _logprobs_of(logits: Any, targets: Any) -> Any:
    """``log softmax(logits)[target]`` per row, in float32 for float16/bfloat16 logits."""
    import torch
    import torch.nn.functional as F

    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return -F.cross_entropy(logits, targets, reduction="none")


def _head_logprobs(lm: Any, states: Any, targets: Any) -> Any:
    """Log-probs of ``targets`` under the LM head at ``states`` (one chunk of positions)."""
    return _logprobs_of(_head(lm, states), targets)


def pair_logprobs(
    lm: Any,
    pairs: Sequence[Any],
    *,
    packed: bool,
    grad: bool = False,
    hidden: bool = False,
    device: Any = None,
    pad_token_id: int = 0,
    autocast_dtype: Any = None,
    head_elements: int = HEAD_CHUNK_ELEMENTS,
) -> PairLogProbs:
    """``log π(y+|x)`` and ``log π(y-|x)`` of each pair, one forward pass for the batch.

    Steps: the batch's rows (:func:`_packed_rows` or :func:`_plain_rows`), the
    positions that predict each response token (:func:`_response_positions`),
    per-token log-probs through the LM head in chunks (:func:`_logprobs_by_head`)
    or the model's own forward (:func:`_logprobs_by_forward`), summed per response.

    Args:
        lm: a transformers causal LM (with its LM head).
        pairs: :class:`~ches_filter.batching.EncodedPair` objects (each response ends
            with the token that is only predicted, EOS in the paper layout).
        packed: one tree-masked row per pair (prompt once) instead of two plain rows;
            only where :func:`packed_is_exact`.
        grad: keep the graph so the results can be differentiated.
        hidden: also return the response-position final hidden states.
        device: where inputs go (default: the device of the model's first parameter).
        pad_token_id: id used for padding (never read).
        autocast_dtype: run the forward under ``torch.autocast`` in this dtype
            (e.g. bfloat16 on CUDA with float32 master weights); None for none.
        head_elements: logits computed at once (``positions x vocabulary``); the LM
            head and the cross-entropy run chunk by chunk, each chunk recomputed in
            the backward pass, so their memory is :func:`head_peak_bytes`, not
            16 bytes per logit of every response position.

    Returns:
        A :class:`PairLogProbs`: log-probs in the logits' dtype (float32 for float16/bfloat16 logits), summed per token.
    """
    import torch

    if not pairs:
        raise ValueError("pair_logprobs needs at least one pair")
    if any(not pair.chosen or not pair.rejected for pair in pairs):
        raise ValueError("every response needs at least one token (the one that is only predicted, e.g. EOS)")
    if device is None:
        device = next(lm.parameters()).device
    device = torch.device(device)
    if packed:
        rows = _packed_rows(lm, pairs, device, pad_token_id, autocast_dtype)
    else:
        rows = _plain_rows(pairs, device, pad_token_id)
    keep, flat, segment, targets = _response_positions(rows)
    flat_t = torch.tensor(flat, device=device)
    target_t = torch.tensor(targets, device=device)
    segment_t = torch.tensor(segment, device=device)
    head_only = head_is_exact(lm, device, autocast_dtype)  # checked once per model
    chunk = head_chunk_positions(vocab_size(lm), head_elements)
    with torch.set_grad_enabled(grad), _autocast(device, autocast_dtype):
        if head_only:
            token_logp, states = _logprobs_by_head(lm, rows, flat, keep, target_t, chunk, grad, device)
        else:
            token_logp, states = _logprobs_by_forward(lm, rows, keep, flat_t, target_t, chunk, hidden, device)
    with torch.set_grad_enabled(grad):
        sums = torch.zeros(len(rows.sides), dtype=token_logp.dtype, device=device).index_add(0, segment_t, token_logp)
    out = PairLogProbs(
        chosen=sums[0::2] if grad else sums[0::2].detach(),
        rejected=sums[1::2] if grad else sums[1::2].detach(),
        chosen_tokens=[len(p.chosen) for p in pairs],
        rejected_tokens=[len(p.rejected) for p in pairs],
    )
    if hidden:
        out.hidden_chosen, out.hidden_rejected = _hidden_per_side(states, rows.sides)
    return out


@dataclass
class _Rows:
    """A batch's model input, and per response where it is predicted.

    Attributes:
        ids: ``(rows, width)`` token ids (on the CPU).
        positions: ``(rows, width)`` position ids (on the CPU).
        attention_mask: the mask the model is called with (on the device).
        sides: per response, chosen then rejected of each pair: ``(row, start,
            branch, response ids)``; ``R[0]`` is predicted at ``start`` (the last
            prompt position), ``R[k]`` (k >= 1) at ``branch + k - 1``.
    """

    ids: Any
    positions: Any
    attention_mask: Any
    sides: list[tuple[int, int, int, Sequence[int]]]


def _predicting(start: int, branch: int, resp: Sequence[int]) -> list[int]:
    """Row indices of the positions predicting ``resp``'s tokens (see :class:`_Rows`)."""
    return [start] + list(range(branch, branch + len(resp) - 1))


def _packed_rows(lm: Any, pairs: Sequence[Any], device: Any, pad_token_id: int, autocast_dtype: Any) -> _Rows:
    """One row per pair, ``[P | R+[:-1] | R-[:-1]]``, with the engine's tree mask and restarted positions."""
    from .engine import packed_rows, sliding_window, tree_mask  # lazy: engine.py imports torch

    ids, tags, positions = packed_rows(pairs, pad_token_id)
    config = lm.config
    mask_dtype = autocast_dtype or next(lm.parameters()).dtype
    attention_mask = tree_mask(
        tags, positions, tags, positions, device=device, dtype=mask_dtype,
        window=sliding_window(config), layer_types=getattr(config, "layer_types", None),
    )
    sides = []
    for b, pair in enumerate(pairs):
        p, c = len(pair.prompt), len(pair.chosen)
        sides.append((b, p - 1, p, pair.chosen))
        sides.append((b, p - 1, p + c - 1, pair.rejected))
    return _Rows(ids, positions, attention_mask, sides)


def _plain_rows(pairs: Sequence[Any], device: Any, pad_token_id: int) -> _Rows:
    """Two right-padded rows per pair, ``P + R+[:-1]`` and ``P + R-[:-1]``."""
    import torch

    rows = [(pair.prompt, resp) for pair in pairs for resp in (pair.chosen, pair.rejected)]
    length = max(len(prompt) + len(resp) - 1 for prompt, resp in rows)
    ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
    mask2d = torch.zeros((len(rows), length), dtype=torch.long)
    sides = []
    for s, (prompt, resp) in enumerate(rows):
        seq = list(prompt) + list(resp[:-1])
        ids[s, : len(seq)] = torch.tensor(seq)
        mask2d[s, : len(seq)] = 1
        sides.append((s, len(prompt) - 1, len(prompt), resp))
    positions = (mask2d.cumsum(-1) - 1).clamp(min=0)
    return _Rows(ids, positions, mask2d.to(device), sides)


def _response_positions(rows: _Rows) -> tuple[int, list[int], list[int], list[int]]:
    """Where each response token is predicted, in the ``(rows, keep)`` tail of the batch.

    Returns:
        ``keep`` (the tail's width: from the earliest predicting position on),
        ``flat`` (per response token, its index into the flattened tail),
        ``segment`` (per token, its response's index in ``rows.sides``) and
        ``targets`` (per token, its id).
    """
    width = rows.ids.shape[1]
    first = min(start for _, start, _, _ in rows.sides)
    keep = width - first  # logits for the tail that holds every response-predicting position
    flat, segment, targets = [], [], []
    for s, (row, start, branch, resp) in enumerate(rows.sides):
        flat += [row * keep + i - first for i in _predicting(start, branch, resp)]
        segment += [s] * len(resp)
        targets += list(resp)
    return keep, flat, segment, targets


def _logprobs_by_head(
    lm: Any, rows: _Rows, flat: list[int], keep: int, target_t: Any, chunk: int, grad: bool, device: Any,
) -> tuple[Any, Any]:
    """The decoder, then the LM head on the response-predicting positions only, chunk by chunk.

    Returns:
        ``(token log-probs, final hidden states (rows, width, D))``.
    """
    import torch

    base = lm.base_model(
        input_ids=rows.ids.to(device), attention_mask=rows.attention_mask, position_ids=rows.positions.to(device),
        use_cache=False,
    )
    states = base[0] if isinstance(base, tuple) else base.last_hidden_state
    picked = states.reshape(-1, states.shape[-1]).index_select(0, _full_index(flat, rows.ids.shape[1], keep, device))
    parts = []
    for start in range(0, picked.shape[0], chunk):
        args = (lm, picked[start : start + chunk], target_t[start : start + chunk])
        if grad and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            # Only the chunk's hidden states are kept for the backward pass; its logits are recomputed.
            parts.append(checkpoint(_head_logprobs, *args, use_reentrant=False))
        else:
            parts.append(_head_logprobs(*args))
    return torch.cat(parts), states


def _logprobs_by_forward(
    lm: Any, rows: _Rows, keep: int, flat_t: Any, target_t: Any, chunk: int, hidden: bool, device: Any,
) -> tuple[Any, Any]:
    """The model's own forward (logits for the batch's ``keep`` tail), for a model whose head alone is not exact.

    Returns:
        ``(token log-probs, final hidden states (rows, width, D) or None without hidden)``.
    """
    import torch

    captured: dict[str, Any] = {}

    def keep_hidden(_module, _args, output):
        captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

    hook = lm.base_model.register_forward_hook(keep_hidden) if hidden else None
    try:
        logits = lm(
            input_ids=rows.ids.to(device), attention_mask=rows.attention_mask, position_ids=rows.positions.to(device),
            use_cache=False, logits_to_keep=keep,
        ).logits
    finally:
        if hook is not None:
            hook.remove()
    flat_logits = logits.reshape(-1, logits.shape[-1])
    # The model's own logits are whole; their float32 copies and the cross-entropy go chunk by chunk.
    token_logp = torch.cat([
        _logprobs_of(flat_logits.index_select(0, flat_t[start : start + chunk]), target_t[start : start + chunk])
        for start in range(0, flat_t.shape[0], chunk)
    ])
    return token_logp, captured.get("hidden")


def _hidden_per_side(states: Any, sides: list) -> tuple[list[Any], list[Any]]:
    """Per response, the detached float64 ``(|R|, D)`` final hidden states at its predicting positions."""
    import torch

    states = states.detach()
    per_side = []
    for row, start, branch, resp in sides:
        index = torch.tensor(_predicting(start, branch, resp), device=states.device)
        per_side.append(states[row].index_select(0, index).to(torch.float64))
    return per_side[0::2], per_side[1::2]
