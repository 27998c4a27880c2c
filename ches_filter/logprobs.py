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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Sequence

__all__ = ["PairLogProbs", "pair_logprobs", "packed_is_exact"]


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
    from .engine import Engine

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


def _head_is_exact(lm: Any, device: Any) -> bool:
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
    try:
        with torch.no_grad():
            full = lm(input_ids=ids, use_cache=False).logits[0].float()
            base = lm.base_model(input_ids=ids, use_cache=False)
            states = base[0] if isinstance(base, tuple) else base.last_hidden_state
            mine = _head(lm, states[0]).float()
        err = float((full - mine).abs().max() / full.abs().max().clamp_min(1e-12))
        dtype = next(lm.parameters()).dtype
        exact = err <= (1e-4 if dtype in (torch.float32, torch.float64) else 2e-2)
    except Exception:  # noqa: BLE001 - any mismatch of structure means: use the model's own forward
        exact = False
    try:
        lm._ches_filter_head_exact = exact
    except AttributeError:
        pass
    return exact


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
) -> PairLogProbs:
    """``log π(y+|x)`` and ``log π(y-|x)`` of each pair, one forward pass for the batch.

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

    Returns:
        A :class:`PairLogProbs`: log-probs in the logits' dtype (float32 for float16/bfloat16 logits), summed per token.
    """
    import torch
    import torch.nn.functional as F

    if not pairs:
        raise ValueError("pair_logprobs needs at least one pair")
    if any(not pair.chosen or not pair.rejected for pair in pairs):
        raise ValueError("every response needs at least one token (the one that is only predicted, e.g. EOS)")
    if device is None:
        device = next(lm.parameters()).device
    device = torch.device(device)
    sides = []  # (row, start index of the predicting positions, response ids), one per response
    if packed:
        from .engine import packed_rows, sliding_window, tree_mask

        ids, tags, positions = packed_rows(pairs, pad_token_id)
        config = lm.config
        mask_dtype = autocast_dtype or next(lm.parameters()).dtype
        attention_mask = tree_mask(
            tags, positions, tags, positions, device=device, dtype=mask_dtype,
            window=sliding_window(config), layer_types=getattr(config, "layer_types", None),
        )
        for b, pair in enumerate(pairs):
            p, c = len(pair.prompt), len(pair.chosen)
            sides.append((b, p - 1, p, pair.chosen))
            sides.append((b, p - 1, p + c - 1, pair.rejected))
    else:
        rows = [(pair.prompt, resp) for pair in pairs for resp in (pair.chosen, pair.rejected)]
        length = max(len(prompt) + len(resp) - 1 for prompt, resp in rows)
        ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        mask2d = torch.zeros((len(rows), length), dtype=torch.long)
        for s, (prompt, resp) in enumerate(rows):
            seq = list(prompt) + list(resp[:-1])
            ids[s, : len(seq)] = torch.tensor(seq)
            mask2d[s, : len(seq)] = 1
            sides.append((s, len(prompt) - 1, len(prompt), resp))
        positions = (mask2d.cumsum(-1) - 1).clamp(min=0)
        attention_mask = mask2d.to(device)
    width = ids.shape[1]
    first = min(start for _, start, _, _ in sides)
    keep = width - first  # logits for the tail that holds every response-predicting position
    flat, segment, targets = [], [], []
    for s, (row, start, branch, resp) in enumerate(sides):
        # R[0] is predicted at `start` (the last prompt position), R[k] (k >= 1) at branch + k - 1.
        index = [start] + list(range(branch, branch + len(resp) - 1))
        flat += [row * keep + i - first for i in index]
        segment += [s] * len(resp)
        targets += list(resp)

    flat_t = torch.tensor(flat, device=device)
    target_t = torch.tensor(targets, device=device)
    segment_t = torch.tensor(segment, device=device)
    states = None
    head_only = _head_is_exact(lm, device)  # checked once per model, outside autocast
    with torch.set_grad_enabled(grad), _autocast(device, autocast_dtype):
        if head_only:
            # The decoder, then the LM head on the response-predicting positions only.
            base = lm.base_model(
                input_ids=ids.to(device), attention_mask=attention_mask, position_ids=positions.to(device), use_cache=False,
            )
            states = base[0] if isinstance(base, tuple) else base.last_hidden_state
            picked = _head(lm, states.reshape(-1, states.shape[-1]).index_select(0, _full_index(flat, width, keep, device)))
        else:
            captured: dict[str, Any] = {}

            def keep_hidden(_module, _args, output):
                captured["hidden"] = output[0] if isinstance(output, tuple) else output.last_hidden_state

            hook = lm.base_model.register_forward_hook(keep_hidden) if hidden else None
            try:
                logits = lm(
                    input_ids=ids.to(device), attention_mask=attention_mask, position_ids=positions.to(device),
                    use_cache=False, logits_to_keep=keep,
                ).logits
            finally:
                if hook is not None:
                    hook.remove()
            states = captured.get("hidden")
            picked = logits.reshape(-1, logits.shape[-1]).index_select(0, flat_t)
    with torch.set_grad_enabled(grad):
        if picked.dtype in (torch.float16, torch.bfloat16):
            picked = picked.float()
        token_logp = -F.cross_entropy(picked, target_t, reduction="none")
        sums = torch.zeros(len(sides), dtype=picked.dtype, device=device).index_add(0, segment_t, token_logp)
    out = PairLogProbs(
        chosen=sums[0::2] if grad else sums[0::2].detach(),
        rejected=sums[1::2] if grad else sums[1::2].detach(),
        chosen_tokens=[len(p.chosen) for p in pairs],
        rejected_tokens=[len(p.rejected) for p in pairs],
    )
    if hidden:
        states = states.detach()
        per_side = []
        for row, start, branch, resp in sides:
            index = torch.tensor([start] + list(range(branch, branch + len(resp) - 1)), device=states.device)
            per_side.append(states[row].index_select(0, index).to(torch.float64))
        out.hidden_chosen, out.hidden_rejected = per_side[0::2], per_side[1::2]
    return out
