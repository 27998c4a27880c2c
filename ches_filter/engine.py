"""Run the decoder and sum the response hidden states of each pair.

Two strategies sit behind one interface (:class:`Engine`):

``packed`` (default when exact for the model): one row per pair holding the
prompt once and both responses, with a tree-shaped attention mask and
restarted position ids::

    packed row   : | P (prompt)          | R+[:-1]            | R-[:-1]            |
    row index    : 0 ........ p-1         p ....... p+c-2      p+c-1 ... p+c+r-3
    position id  : 0 ........ p-1         p ....... p+c-2      p ....... p+r-2
    attends to   : causal within P        P + causal in R+     P + causal in R-

``plain`` (reference, and fallback): each side as its own sequence ``P + R``.

In both, the state counted for response token ``k`` (``k = 0..|R|-1``) is the
final hidden state at the position whose *next* token is ``R[k]``::

    sequence     : P[0] ... P[p-1] | R[0] ... R[|R|-2] | R[|R|-1]=EOS
    next token   : P[1] ... R[0]   | R[1] ... EOS      | (not an input)
    h_k at index : p-1+k,  k = 0..|R|-1

so the EOS token itself is never fed to the model, and the last prompt position
(``p-1``) starts both responses: in a packed row it feeds both sums.
The final hidden state is the decoder's ``last_hidden_state``: the output of the
final norm, the vector the unembedding multiplies. No logits are computed.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from .batching import EncodedPair, token_budget_batches
from .ches import gather_sums

logger = logging.getLogger(__name__)

__all__ = ["Engine", "PairStates", "STRATEGIES", "packed_support"]

STRATEGIES = ("auto", "packed", "plain")
_SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}
_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3


@dataclass
class PairStates:
    """Per-pair float64 sums on the CPU, in the order the pairs were given.

    Attributes:
        s_chosen: ``(N, D)`` ``S+``.
        s_rejected: ``(N, D)`` ``S-``.
        last_chosen: ``(N, D)`` hidden state at the last response position (the one predicting EOS).
        last_rejected: ``(N, D)``.
    """

    s_chosen: torch.Tensor
    s_rejected: torch.Tensor
    last_chosen: torch.Tensor
    last_rejected: torch.Tensor


def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


def packed_support(config: Any, attn_implementation: str) -> tuple[bool, str]:
    """Whether a tree-masked packed row is exact for this architecture.

    Returns:
        ``(supported, reason)``; the reason explains a refusal for the log.
    """
    if attn_implementation not in ("sdpa", "eager"):
        return False, f"attention implementation {attn_implementation!r} takes no custom 4D mask"
    if getattr(config, "is_encoder_decoder", False):
        return False, "encoder-decoder models are not causal LMs"
    if getattr(config, "use_bidirectional_attention", False):
        return False, "the model uses bidirectional attention"
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        unknown = set(layer_types) - _SUPPORTED_LAYER_TYPES
        if unknown:
            return False, f"layer types {sorted(unknown)} need their own mask"
    return True, ""


def _sliding_window(config: Any) -> int | None:
    window = getattr(config, "sliding_window", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


class Engine:
    """Compute per-pair hidden-state sums with a decoder.

    Args:
        decoder: a transformers base model (or a causal LM, whose base model is used).
        device: where inputs go.
        strategy: ``auto`` (packed when exact for this model, else plain),
            ``packed`` or ``plain``.
        max_batch_tokens: padded tokens per forward pass.
        max_batch_size: optional cap on pairs per batch.
        pad_token_id: id used for padding (its states are never read).
        padding_side: ``right`` or ``left`` for the plain strategy.
    """

    def __init__(
        self,
        decoder: Any,
        device: Any,
        *,
        strategy: str = "auto",
        max_batch_tokens: int = 16384,
        max_batch_size: int | None = None,
        pad_token_id: int = 0,
        padding_side: str = "right",
    ) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
        if decoder.get_output_embeddings() is not None if hasattr(decoder, "get_output_embeddings") else False:
            decoder = decoder.base_model
        self.decoder = decoder
        self.device = torch.device(device)
        self.config = decoder.config
        self.max_batch_tokens = int(max_batch_tokens)
        self.max_batch_size = max_batch_size
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.dtype = next(decoder.parameters()).dtype
        self.attn_implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        self.window = _sliding_window(self.config)
        self.layer_types = getattr(self.config, "layer_types", None)
        if strategy == "plain":
            self.strategy = "plain"
        else:
            ok, why = packed_support(self.config, self.attn_implementation)
            if not ok:
                if strategy == "packed":
                    raise ValueError(f"the packed strategy is not exact for this model: {why}")
                logger.warning("scoring with the plain strategy (each side separately): %s", why)
                self.strategy = "plain"
            else:
                self.strategy = "packed"
                if strategy == "auto" and not self._self_check():
                    self.strategy = "plain"
        logger.info("engine: %s strategy, %s attention, budget %d tokens", self.strategy, self.attn_implementation, self.max_batch_tokens)

    # ------------------------------------------------------------------ public
    def run(self, pairs: Sequence[EncodedPair]) -> PairStates:
        """Score pairs in token-budget batches; results come back in input order."""
        n = len(pairs)
        dim = self.config.hidden_size
        out = PairStates(*(torch.zeros(n, dim, dtype=torch.float64) for _ in range(4)))
        if n == 0:
            return out
        costs = [self._cost(p) for p in pairs]
        queue = deque(token_budget_batches(costs, self.max_batch_tokens, max_batch_size=self.max_batch_size))
        while queue:
            batch = queue.popleft()
            if len(batch) > 1 and len(batch) * max(costs[i] for i in batch) > self.max_batch_tokens:
                # The budget shrank after an OOM: re-split batches planned before.
                parts = token_budget_batches([costs[i] for i in batch], self.max_batch_tokens)
                queue.extendleft([batch[j] for j in part] for part in reversed(parts))
                continue
            try:
                states = self._forward([pairs[i] for i in batch])
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not _is_oom(exc):
                    raise
                if self.device.type == "cuda":
                    torch.cuda.empty_cache()
                if len(batch) == 1:
                    raise RuntimeError(
                        f"one pair of {costs[batch[0]]} tokens does not fit in memory; lower `--max-length`"
                    ) from exc
                self.max_batch_tokens = max(1, self.max_batch_tokens // 2)
                logger.warning("out of memory on %d pairs; retrying with --max-batch-tokens %d", len(batch), self.max_batch_tokens)
                half = len(batch) // 2
                queue.appendleft(batch[half:])
                queue.appendleft(batch[:half])
                continue
            index = torch.tensor(batch)
            for field, value in zip(("s_chosen", "s_rejected", "last_chosen", "last_rejected"), states):
                getattr(out, field)[index] = value.cpu()
        return out

    # ----------------------------------------------------------------- helpers
    def _cost(self, pair: EncodedPair) -> int:
        if self.strategy == "packed":
            return pair.packed_length
        # Plain batches hold both sides of each pair, padded to the longest side.
        return 2 * (len(pair.prompt) + max(len(pair.chosen), len(pair.rejected)) - 1)

    def _forward(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, ...]:
        if self.strategy == "packed":
            return self._forward_packed(pairs)
        return self._forward_plain(pairs)

    def _decode(self, input_ids: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            output = self.decoder(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask,
                position_ids=position_ids.to(self.device),
                use_cache=False,
            )
        return output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _tree_mask(self, tags: torch.Tensor, positions: torch.Tensor) -> Any:
        """Boolean ``(B, 1, L, L)`` tree mask (one per layer type when windows differ)."""
        tags = tags.to(self.device)
        positions = positions.to(self.device)
        length = tags.shape[1]
        idx = torch.arange(length, device=self.device)
        causal = idx[:, None] >= idx[None, :]
        tq, tk = tags[:, :, None], tags[:, None, :]
        allowed = causal & (tq != _PAD) & ((tk == _PROMPT) | (tq == tk))
        # Padding queries attend to themselves only, so no softmax row is empty (NaN).
        allowed |= torch.eye(length, dtype=torch.bool, device=self.device)
        masks = {"full_attention": allowed}
        if self.window is not None:
            distance = positions[:, :, None] - positions[:, None, :]
            # Same rule as transformers' sliding_window_overlay (kv > q - window),
            # on logical positions, which restart for the rejected branch.
            masks["sliding_attention"] = allowed & (distance < self.window)
        masks = {k: self._format_mask(v.unsqueeze(1)) for k, v in masks.items()}
        if self.layer_types is not None:
            return {t: masks.get(t, masks["full_attention"]) for t in set(self.layer_types)}
        # No per-layer types: a configured window applies to every layer.
        return masks.get("sliding_attention", masks["full_attention"])

    def _format_mask(self, mask: torch.Tensor) -> torch.Tensor:
        if self.attn_implementation == "eager":
            floats = torch.zeros(mask.shape, dtype=self.dtype, device=mask.device)
            return floats.masked_fill_(~mask, torch.finfo(self.dtype).min)
        return mask

    def _forward_packed(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, ...]:
        length = max(p.packed_length for p in pairs)
        bsz = len(pairs)
        ids = torch.full((bsz, length), self.pad_token_id, dtype=torch.long)
        tags = torch.full((bsz, length), _PAD, dtype=torch.long)
        positions = torch.zeros((bsz, length), dtype=torch.long)
        flat: list[int] = []
        segment: list[int] = []
        last_flat: list[int] = []
        for b, pair in enumerate(pairs):
            p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
            row = list(pair.prompt) + list(pair.chosen[:-1]) + list(pair.rejected[:-1])
            ids[b, : len(row)] = torch.tensor(row)
            tags[b, :p] = _PROMPT
            tags[b, p : p + c - 1] = _CHOSEN
            tags[b, p + c - 1 : p + c + r - 2] = _REJECTED
            positions[b, :p] = torch.arange(p)
            positions[b, p : p + c - 1] = torch.arange(p, p + c - 1)
            positions[b, p + c - 1 : p + c + r - 2] = torch.arange(p, p + r - 1)
            base = b * length
            # h_k for the chosen side: index p-1 (k=0), then p .. p+c-2.
            chosen_idx = [base + p - 1] + list(range(base + p, base + p + c - 1))
            # rejected side: index p-1 (k=0), then p+c-1 .. p+c+r-3.
            rejected_idx = [base + p - 1] + list(range(base + p + c - 1, base + p + c + r - 2))
            flat += chosen_idx + rejected_idx
            segment += [2 * b] * c + [2 * b + 1] * r
            last_flat += [chosen_idx[-1], rejected_idx[-1]]
        hidden = self._decode(ids, self._tree_mask(tags, positions), positions)
        return self._reduce(hidden, flat, segment, last_flat, bsz)

    def _forward_plain(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, ...]:
        sides = [(pair.prompt, resp) for pair in pairs for resp in (pair.chosen, pair.rejected)]
        length = max(len(prompt) + len(resp) - 1 for prompt, resp in sides)
        ids = torch.full((len(sides), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sides), length), dtype=torch.long)
        flat: list[int] = []
        segment: list[int] = []
        last_flat: list[int] = []
        for s, (prompt, resp) in enumerate(sides):
            seq = list(prompt) + list(resp[:-1])
            offset = length - len(seq) if self.padding_side == "left" else 0
            ids[s, offset : offset + len(seq)] = torch.tensor(seq)
            mask[s, offset : offset + len(seq)] = 1
            p = len(prompt)
            # h_k at index offset + p - 1 + k, k = 0..|R|-1.
            idx = list(range(s * length + offset + p - 1, s * length + offset + p - 1 + len(resp)))
            flat += idx
            segment += [s] * len(resp)
            last_flat.append(idx[-1])
        # Position ids from the mask so left padding does not shift positions.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self._decode(ids, mask.to(self.device), position_ids)
        return self._reduce(hidden, flat, segment, last_flat, len(pairs))

    def _reduce(self, hidden, flat, segment, last_flat, bsz):
        dev = hidden.device
        sums = gather_sums(
            hidden, torch.tensor(flat, device=dev), torch.tensor(segment, device=dev), 2 * bsz
        )
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, torch.tensor(last_flat, device=dev)).to(torch.float64)
        return sums[0::2], sums[1::2], last[0::2], last[1::2]

    def _self_check(self) -> bool:
        """Compare packed and plain on a synthetic pair; fall back to plain on mismatch.

        A model whose attention ignores a custom 4D mask, or builds its own
        masks per layer in a way this engine does not know, would silently give
        wrong scores with the packed strategy; one small forward pass each way
        catches it. The prompt is longer than the sliding window, if any.
        """
        generator = torch.Generator().manual_seed(0)
        vocab = int(getattr(self.config, "vocab_size", 1000))
        prompt_len = (self.window + 24) if self.window else 24
        prompt_len = min(prompt_len, int(getattr(self.config, "max_position_embeddings", 4096) or 4096) - 16)

        def draw(n):
            return tuple(torch.randint(4, max(5, vocab), (n,), generator=generator).tolist())

        pair = EncodedPair(draw(prompt_len), draw(7), draw(5))
        packed = self._forward_packed([pair])
        plain = self._forward_plain([pair])
        tol = 1e-3 if self.dtype == torch.float32 else 5e-2
        worst = max(
            float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(packed[:2], plain[:2])
        )
        if worst > tol:
            logger.warning(
                "packed strategy disagrees with the plain one on this model (relative error %.2e > %.0e); "
                "scoring with the plain strategy",
                worst,
                tol,
            )
            return False
        return True
