"""Run the decoder and sum the response hidden states of each pair.

Three strategies sit behind one interface (:class:`Engine`):

``packed`` (default when exact for the model): one row per pair holding the
prompt once and both responses, with a tree-shaped attention mask and
restarted position ids::

    packed row   : | P (prompt)          | R+[:-1]            | R-[:-1]            |
    row index    : 0 ........ p-1         p ....... p+c-2      p+c-1 ... p+c+r-3
    position id  : 0 ........ p-1         p ....... p+c-2      p ....... p+r-2
    attends to   : causal within P        P + causal in R+     P + causal in R-

``prefix``: the same tree in two passes: the prompts first, keeping their
keys and values (a KV cache), then one row ``[R+[:-1] | R-[:-1]]`` per pair
that attends to the cached prompt and causally within its own branch.

``plain`` (reference, and fallback): each side as its own sequence ``P + R``,
masked by the model's own (2D padding mask) logic.

In all three, the state counted for response token ``k`` (``k = 0..|R|-1``) is
the final hidden state at the position whose *next* token is ``R[k]``::

    sequence     : P[0] ... P[p-1] | R[0] ... R[|R|-2] | R[|R|-1]=EOS
    next token   : P[1] ... R[0]   | R[1] ... EOS      | (not an input)
    h_k at index : p-1+k,  k = 0..|R|-1

so the EOS token itself is never fed to the model, and the last prompt position
(``p-1``) starts both responses: in a packed row it feeds both sums.
The final hidden state is the decoder's ``last_hidden_state``: the output of the
final norm, the vector the unembedding multiplies. No logits are computed.

Masks are built once per batch as additive float tensors in the model's dtype
(0 where attention is allowed, the dtype's minimum elsewhere), the form both
eager attention and SDPA's math paths consume (a boolean mask would be
converted per layer; on CPU the two measure the same, benchmarks/RESULTS.md).
Models whose layers differ in attention span (``config.layer_types``
with ``sliding_attention``) get one mask per layer type; the sliding-window
rule is applied to logical positions, which restart for the rejected branch.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch

from .batching import EncodedPair, token_budget_batches
from .ches import gather_sums
from .errors import BadFlagError, OutOfMemoryError
from .strategies import ENGINE_CHOICES, STRATEGIES

# transformers is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = [
    "Engine", "PairStates", "TokenBudget", "is_oom", "STRATEGIES", "packed_support", "packed_rows", "tree_mask", "default_workers", "ordered_map",
]

_SUPPORTED_LAYER_TYPES = {"full_attention", "sliding_attention"}
_PROMPT, _CHOSEN, _REJECTED, _PAD = 0, 1, 2, 3
# Python threads share the GIL for the model's per-operation bookkeeping, so
# many workers stop scaling; past this, workers split the intra-op threads.
_MAX_CPU_WORKERS = 4


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


def default_workers(device: Any) -> int:
    """Forward passes to run side by side: on CPU one per intra-op thread (at most 4), elsewhere 1 (see :class:`Engine`)."""
    return min(torch.get_num_threads(), _MAX_CPU_WORKERS) if torch.device(device).type == "cpu" else 1


@contextlib.contextmanager
def split_cpu_threads(device: Any, workers: int) -> Iterator[None]:
    """On CPU, give each of ``workers`` side-by-side passes an equal share of the intra-op threads; restored on exit.

    Intra-op threads are a process-wide setting; on a GPU the workers only
    overlap host work with device work, so nothing changes there.
    """
    threads = torch.get_num_threads()
    if torch.device(device).type == "cpu" and workers > 1:
        torch.set_num_threads(max(1, threads // workers))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def ordered_map(fn: Callable[[Any], Any], items: Iterable[Any], workers: int, device: Any) -> Iterator[Any]:
    """``fn`` over ``items``, up to ``workers`` at once on threads, results yielded in the items' order.

    At most ``workers`` results exist at a time (the next item starts when the
    oldest result is taken), so memory holds ``workers`` results, not all.
    Each call runs exactly as it would alone (with its share of the CPU
    threads), so a caller that combines the results in this order gets the
    same numbers whatever finishes first.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with split_cpu_threads(device, workers), ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ches-worker") as pool:
        pending: deque[Future] = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def is_oom(exc: BaseException) -> bool:
    """Whether an exception is a device running out of memory (CUDA's error, or a RuntimeError that says so)."""
    if isinstance(exc, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(exc, RuntimeError) and "out of memory" in str(exc).lower()


_is_oom = is_oom


class TokenBudget:
    """The out-of-memory back-off of every forward pass: the scoring engine's, validate's and displacement's.

    A budget of padded tokens per forward pass (``--max-batch-tokens``).
    When a batch runs out of memory the budget is halved, the batch is split
    in two and retried, and batches planned under the old budget are re-split
    as they come up: no pair is lost or computed twice, and each halving is
    said once (a warning naming the new budget). One pair that does not fit
    gets ``shrink`` (e.g. a smaller LM-head chunk) while it can, then a
    one-line :class:`~ches_filter.errors.OutOfMemoryError`.

    Args:
        tokens: the starting budget.
        device: where the passes run (CUDA's cached blocks are freed after a failure).
    """

    def __init__(self, tokens: int, device: Any) -> None:
        self.tokens = int(tokens)
        self.device = torch.device(device)

    def after_oom(self, exc: BaseException, pairs: int, tokens: int, shrink: Callable[[], bool] | None = None) -> None:
        """Back off after ``exc`` on a batch of ``pairs`` pairs and ``tokens`` padded tokens, or raise when nothing is left."""
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        if pairs > 1:
            self.tokens = max(1, self.tokens // 2)
            logger.warning("out of memory on %d pairs; retrying with --max-batch-tokens %d", pairs, self.tokens)
            return
        if shrink is not None and shrink():
            return

        raise OutOfMemoryError(
            f"one pair of {tokens} tokens does not fit in memory; lower `--max-length`"
        ) from exc

    def run(
        self, fn: Callable[[list[int]], Any], costs: Sequence[int], on_result: Callable[[list[int], Any], None], *,
        workers: int = 1, max_batch_size: int | None = None, shrink: Callable[[], bool] | None = None,
    ) -> None:
        """``fn`` over token-budget batches of item indices (by ``costs``), up to ``workers`` at once.

        ``on_result(batch, result)`` is called from the calling thread for every
        batch that succeeded, in completion order; an out-of-memory error backs
        off (:meth:`after_oom`) and the batch is retried, any other error is raised.
        """
        if not costs:
            return
        queue = deque(token_budget_batches(costs, self.tokens, max_batch_size=max_batch_size))

        def attempt(batch: list[int]) -> Any:
            try:
                return fn(batch)
            except Exception as exc:  # noqa: BLE001 - only OOM is handled, the rest re-raised
                if not is_oom(exc):
                    raise
                exc.__traceback__ = None  # frees the failed pass's tensors before the retry
                return exc

        def finish(batch: list[int], result: Any) -> None:
            if isinstance(result, BaseException):
                self.after_oom(result, len(batch), sum(costs[i] for i in batch), shrink)
                half = len(batch) // 2
                if half:
                    queue.appendleft(batch[half:])
                    queue.appendleft(batch[:half])
                else:
                    queue.appendleft(batch)
                return
            on_result(batch, result)

        def next_batch() -> list[int] | None:
            batch = queue.popleft()
            if len(batch) > 1 and len(batch) * max(costs[i] for i in batch) > self.tokens:
                # The budget shrank after an OOM: re-split batches planned before.
                parts = token_budget_batches([costs[i] for i in batch], self.tokens)
                queue.extendleft([batch[j] for j in part] for part in reversed(parts))
                return None
            return batch

        workers = min(workers, len(queue))
        if workers <= 1:
            while queue:
                batch = next_batch()
                if batch is not None:
                    finish(batch, attempt(batch))
            return
        with split_cpu_threads(self.device, workers):
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="ches-engine") as pool:
                pending: dict[Future, list[int]] = {}
                while queue or pending:
                    while queue and len(pending) < workers:
                        batch = next_batch()
                        if batch is not None:
                            pending[pool.submit(attempt, batch)] = batch
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        finish(pending.pop(future), future.result())


def packed_support(config: Any, attn_implementation: str) -> tuple[bool, str]:
    """Whether a tree-masked packed row (or a prefix pass) is exact for this architecture.

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


def sliding_window(config: Any) -> int | None:
    """The attention window the model's sliding layers use (None when it has none)."""
    return _sliding_window(config)


def packed_rows(pairs: Sequence[EncodedPair], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids, branch tags and position ids of packed rows ``[P | R+[:-1] | R-[:-1]]`` (right-padded).

    Returns:
        ``(ids, tags, positions)``, each ``(B, L)`` long on the CPU; the rejected
        branch's positions restart at ``|P|`` (see the module docstring).
    """
    length = max(p.packed_length for p in pairs)
    bsz = len(pairs)
    ids = torch.full((bsz, length), pad_token_id, dtype=torch.long)
    tags = torch.full((bsz, length), _PAD, dtype=torch.long)
    positions = torch.zeros((bsz, length), dtype=torch.long)
    for b, pair in enumerate(pairs):
        p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        ids[b, : pair.packed_length] = torch.tensor(list(pair.prompt) + list(pair.chosen[:-1]) + list(pair.rejected[:-1]))
        tags[b, :p] = _PROMPT
        tags[b, p : p + c - 1] = _CHOSEN
        tags[b, p + c - 1 : p + c + r - 2] = _REJECTED
        positions[b, :p] = torch.arange(p)
        positions[b, p : p + c - 1] = torch.arange(p, p + c - 1)
        positions[b, p + c - 1 : p + c + r - 2] = torch.arange(p, p + r - 1)
    return ids, tags, positions


def tree_mask(
    q_tags: torch.Tensor,
    q_pos: torch.Tensor,
    k_tags: torch.Tensor,
    k_pos: torch.Tensor,
    *,
    device: Any,
    dtype: torch.dtype,
    window: int | None,
    layer_types: Sequence[str] | None,
    offset: int = 0,
) -> Any:
    """Additive ``(B, 1, Lq, Lk)`` tree mask (a dict by layer type when windows differ).

    Query ``i`` sits at row index ``offset + i`` among the keys (``offset``
    is the number of cached keys). A query attends to an earlier-or-equal
    key that is a prompt token or in its own branch; a padding query
    attends to itself only, so no softmax row is empty (NaN).

    Args:
        q_tags: ``(B, Lq)`` branch tag of each query (prompt, chosen, rejected, pad).
        q_pos: ``(B, Lq)`` logical position of each query.
        k_tags: ``(B, Lk)``.
        k_pos: ``(B, Lk)``.
        device: where the mask is built.
        dtype: the mask's dtype (0 allowed, the dtype's minimum elsewhere).
        window: sliding window of the model's sliding layers, or None.
        layer_types: ``config.layer_types`` (None: one mask for every layer).
        offset: row index of the first query among the keys.
    """
    dev = torch.device(device)
    q_tags, q_pos, k_tags, k_pos = (t.to(dev) for t in (q_tags, q_pos, k_tags, k_pos))
    q_idx = torch.arange(q_tags.shape[1], device=dev)[:, None] + offset
    k_idx = torch.arange(k_tags.shape[1], device=dev)[None, :]
    tq, tk = q_tags[:, :, None], k_tags[:, None, :]
    allowed = (q_idx >= k_idx) & (tq != _PAD) & ((tk == _PROMPT) | (tq == tk))
    allowed |= q_idx == k_idx
    masks = {"full_attention": allowed}
    if window is not None:
        # Same rule as transformers' sliding-window masks (kv > q - window),
        # on logical positions, which restart for the rejected branch.
        masks["sliding_attention"] = allowed & ((q_pos[:, :, None] - k_pos[:, None, :]) < window)
    minimum = torch.finfo(dtype).min
    masks = {
        k: torch.zeros(v.shape, dtype=dtype, device=dev).masked_fill_(~v, minimum).unsqueeze(1)
        for k, v in masks.items()
    }
    if layer_types is not None:
        return {t: masks.get(t, masks["full_attention"]) for t in set(layer_types)}
    # No per-layer types: a configured window applies to every layer.
    return masks.get("sliding_attention", masks["full_attention"])


def _cache_argument(decoder: Any) -> str | None:
    """Name of the KV-cache argument of ``decoder.forward`` (``cache`` in transformers 5, ``past_key_values`` before)."""
    try:
        params = inspect.signature(decoder.forward).parameters
    except (TypeError, ValueError):
        return None
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    return None


@dataclass
class _Rows:
    """Index bookkeeping of one batch: which flattened positions feed which sum."""

    flat: list[int]
    segment: list[int]
    last_flat: list[int]


class Engine:
    """Compute per-pair hidden-state sums with a decoder.

    Args:
        decoder: a transformers base model (or a causal LM, whose base model is used).
        device: where inputs go.
        strategy: ``auto`` (packed when exact for this model, else plain),
            ``packed``, ``prefix`` or ``plain``.
        max_batch_tokens: padded tokens per forward pass (a pair's cost is its
            packed row length for packed/prefix, twice its longest side for plain).
        max_batch_size: optional cap on pairs per batch.
        pad_token_id: id used for padding (its states are never read).
        padding_side: ``right`` or ``left`` for the plain strategy.
        workers: batches run at once. Default: on CPU, one per intra-op
            thread (``torch.get_num_threads()``, at most 4), the threads
            shared out among them (see :attr:`workers`); elsewhere 1. CPU
            memory then holds up to ``workers`` batches at once.

    Attributes:
        workers: on CPU, several single-threaded forward passes side by side
            beat one pass split over all cores: the small matrix products of
            a one-pair batch parallelise poorly, and OpenMP threads that wait
            for each other at every operation stall whenever another process
            takes a core. Each worker runs whole batches and results go back
            in input order; they equal a serial run's to float rounding.

    Raises:
        ValueError: an unknown strategy.
        BadFlagError: ``packed``/``prefix`` asked for a model where it cannot
            be exact (a ``ValueError`` too; the CLI prints it as one line, exit 2).
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
        workers: int | None = None,
    ) -> None:
        if strategy not in ENGINE_CHOICES:
            raise ValueError(f"strategy must be one of {ENGINE_CHOICES}, got {strategy!r}")
        if padding_side not in ("left", "right"):
            raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
        if hasattr(decoder, "get_output_embeddings") and decoder.get_output_embeddings() is not None:
            decoder = decoder.base_model
        self.decoder = decoder
        self.device = torch.device(device)
        self.config = decoder.config
        self.budget = TokenBudget(max_batch_tokens, self.device)
        self.max_batch_size = max_batch_size
        self.pad_token_id = int(pad_token_id)
        self.padding_side = padding_side
        self.dtype = next(decoder.parameters()).dtype
        self.attn_implementation = getattr(self.config, "_attn_implementation", None) or "eager"
        self.window = _sliding_window(self.config)
        self.layer_types = getattr(self.config, "layer_types", None)
        self.cache_argument = _cache_argument(decoder)
        if workers is None:
            workers = default_workers(self.device)
        if int(workers) < 1:
            raise ValueError(f"workers must be at least 1, got {workers!r}")
        self.workers = int(workers)
        self.strategy = self._choose(strategy)
        logger.info(
            "engine: %s strategy, %s attention, budget %d tokens, %d worker(s)",
            self.strategy,
            self.attn_implementation,
            self.max_batch_tokens,
            self.workers,
        )

    def _choose(self, strategy: str) -> str:
        if strategy == "plain":
            return "plain"
        ok, why = packed_support(self.config, self.attn_implementation)
        if ok and strategy == "prefix" and self.cache_argument is None:
            ok, why = False, "the decoder's forward takes no KV cache argument"
        if not ok:
            if strategy != "auto":
                raise BadFlagError(
                    f"`--engine {strategy}` is not exact for this model: {why}; use `--engine auto` or `--engine plain`"
                )
            logger.warning("scoring with the plain strategy (each side separately): %s", why)
            return "plain"
        if strategy == "prefix":
            # A cache is the more fragile path (cache classes change between
            # transformers releases): refuse rather than return wrong scores.
            worst = self._self_check_error("prefix")
            if worst > self._self_check_tolerance():
                raise BadFlagError(
                    f"the prefix strategy disagrees with the plain one on this model (relative error {worst:.2e}); "
                    "use `--engine packed` or `--engine plain`"
                )
            return "prefix"
        if strategy == "auto" and not self._self_check():
            return "plain"
        return "packed"

    # ------------------------------------------------------------------ public
    def run(self, pairs: Sequence[EncodedPair], on_progress: Callable[[int], None] | None = None) -> PairStates:
        """Score pairs in token-budget batches; results come back in input order.

        On an out-of-memory error the budget is halved, the failed batch is
        split in two and retried, and batches planned under the old budget are
        re-split as they come up: no pair is lost or scored twice. With CPU
        workers, see :attr:`workers`, up to that many batches run at once.

        Args:
            pairs: the encoded pairs.
            on_progress: called with the number of pairs of each batch once its
                states are stored (from the calling thread), e.g. to move a
                progress bar.
        """
        n = len(pairs)
        dim = self.config.hidden_size
        out = PairStates(*(torch.zeros(n, dim, dtype=torch.float64) for _ in range(4)))
        if n == 0:
            return out

        def store(batch: list[int], result: Any) -> None:
            index = torch.tensor(batch)
            for field, value in zip(("s_chosen", "s_rejected", "last_chosen", "last_rejected"), result):
                getattr(out, field)[index] = value.cpu()
            if on_progress is not None:
                on_progress(len(batch))

        self.budget.run(
            lambda batch: self._forward([pairs[i] for i in batch]), [self._cost(p) for p in pairs], store,
            workers=self.workers, max_batch_size=self.max_batch_size,
        )
        return out

    @property
    def max_batch_tokens(self) -> int:
        """The token budget per forward pass (halved after an out-of-memory error, :class:`TokenBudget`)."""
        return self.budget.tokens

    @max_batch_tokens.setter
    def max_batch_tokens(self, value: int) -> None:
        self.budget.tokens = int(value)

    # ----------------------------------------------------------------- helpers
    def _cost(self, pair: EncodedPair) -> int:
        return STRATEGIES.get(self.strategy).cost(len(pair.prompt), len(pair.chosen), len(pair.rejected))

    def _forward(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, ...]:
        return getattr(self, f"_forward_{self.strategy}")(pairs)

    def _decode(self, input_ids: torch.Tensor, attention_mask: Any, position_ids: torch.Tensor, cache: Any = None) -> torch.Tensor:
        kwargs: dict[str, Any] = {"use_cache": cache is not None}
        if cache is not None:
            kwargs[self.cache_argument] = cache
        with torch.inference_mode():
            output = self.decoder(
                input_ids=input_ids.to(self.device),
                attention_mask=attention_mask,
                position_ids=position_ids.to(self.device),
                **kwargs,
            )
        return output[0] if isinstance(output, tuple) else output.last_hidden_state

    def _tree_mask(
        self,
        q_tags: torch.Tensor,
        q_pos: torch.Tensor,
        k_tags: torch.Tensor,
        k_pos: torch.Tensor,
        offset: int = 0,
    ) -> Any:
        """Additive tree mask for this model (see :func:`tree_mask`)."""
        return tree_mask(
            q_tags, q_pos, k_tags, k_pos, offset=offset, device=self.device, dtype=self.dtype,
            window=self.window, layer_types=self.layer_types,
        )

    def _forward_packed(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, ...]:
        ids, tags, positions = packed_rows(pairs, self.pad_token_id)
        length = ids.shape[1]
        rows = _Rows([], [], [])
        for b, pair in enumerate(pairs):
            p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
            # Chosen h_k: index p-1 (k=0), then p .. p+c-2; rejected: p-1, then p+c-1 .. p+c+r-3.
            self._index_pair(rows, b, b * length, p - 1, p, c, p + c - 1, r)
        mask = self._tree_mask(tags, positions, tags, positions)
        hidden = self._decode(ids, mask, positions)
        return self._reduce(hidden, rows, len(pairs))

    def _forward_prefix(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, ...]:
        """Prompts in one pass that fills a KV cache, then both branches of each pair in a second."""
        from transformers import DynamicCache

        bsz = len(pairs)
        p_max = max(len(p.prompt) for p in pairs)
        r_max = max(len(p.chosen) + len(p.rejected) - 2 for p in pairs)
        ids = torch.full((bsz, p_max), self.pad_token_id, dtype=torch.long)
        p_tags = torch.full((bsz, p_max), _PAD, dtype=torch.long)
        p_pos = torch.zeros((bsz, p_max), dtype=torch.long)
        r_ids = torch.full((bsz, r_max), self.pad_token_id, dtype=torch.long)
        r_tags = torch.full((bsz, r_max), _PAD, dtype=torch.long)
        r_pos = torch.zeros((bsz, r_max), dtype=torch.long)
        width = p_max + r_max
        rows = _Rows([], [], [])
        for b, pair in enumerate(pairs):
            p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
            ids[b, :p] = torch.tensor(list(pair.prompt))
            p_tags[b, :p] = _PROMPT
            p_pos[b, :p] = torch.arange(p)
            if c + r > 2:
                r_ids[b, : c + r - 2] = torch.tensor(list(pair.chosen[:-1]) + list(pair.rejected[:-1]))
            r_tags[b, : c - 1] = _CHOSEN
            r_tags[b, c - 1 : c + r - 2] = _REJECTED
            r_pos[b, : c - 1] = torch.arange(p, p + c - 1)
            r_pos[b, c - 1 : c + r - 2] = torch.arange(p, p + r - 1)
            # Indices into the concatenation [prompt pass | response pass] of width p_max + r_max.
            self._index_pair(rows, b, b * width, p - 1, p_max, c, p_max + c - 1, r)
        # A cache without a config keeps every key (no sliding-window truncation);
        # the masks below apply the window.
        cache = DynamicCache()
        prompt_hidden = self._decode(ids, self._tree_mask(p_tags, p_pos, p_tags, p_pos), p_pos, cache)
        if r_max == 0:
            hidden = prompt_hidden
        else:
            mask = self._tree_mask(
                r_tags, r_pos, torch.cat([p_tags, r_tags], dim=1), torch.cat([p_pos, r_pos], dim=1), offset=p_max
            )
            response_hidden = self._decode(r_ids, mask, r_pos, cache)
            hidden = torch.cat([prompt_hidden, response_hidden], dim=1)
        return self._reduce(hidden, rows, bsz)

    @staticmethod
    def _index_pair(rows: _Rows, b: int, base: int, start: int, chosen_at: int, c: int, rejected_at: int, r: int) -> None:
        """Record the flat indices of one pair's two sums (``start`` is the shared last prompt position)."""
        chosen = [base + start] + list(range(base + chosen_at, base + chosen_at + c - 1))
        rejected = [base + start] + list(range(base + rejected_at, base + rejected_at + r - 1))
        rows.flat += chosen + rejected
        rows.segment += [2 * b] * c + [2 * b + 1] * r
        rows.last_flat += [chosen[-1], rejected[-1]]

    def _forward_plain(self, pairs: Sequence[EncodedPair]) -> tuple[torch.Tensor, ...]:
        sides = [(pair.prompt, resp) for pair in pairs for resp in (pair.chosen, pair.rejected)]
        length = max(len(prompt) + len(resp) - 1 for prompt, resp in sides)
        ids = torch.full((len(sides), length), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sides), length), dtype=torch.long)
        rows = _Rows([], [], [])
        for s, (prompt, resp) in enumerate(sides):
            seq = list(prompt) + list(resp[:-1])
            offset = length - len(seq) if self.padding_side == "left" else 0
            ids[s, offset : offset + len(seq)] = torch.tensor(seq)
            mask[s, offset : offset + len(seq)] = 1
            p = len(prompt)
            # h_k at index offset + p - 1 + k, k = 0..|R|-1.
            idx = list(range(s * length + offset + p - 1, s * length + offset + p - 1 + len(resp)))
            rows.flat += idx
            rows.segment += [s] * len(resp)
            rows.last_flat.append(idx[-1])
        # Position ids from the mask so left padding does not shift positions.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self._decode(ids, mask.to(self.device), position_ids)
        return self._reduce(hidden, rows, len(pairs))

    def _reduce(self, hidden: torch.Tensor, rows: _Rows, bsz: int) -> tuple[torch.Tensor, ...]:
        dev = hidden.device
        sums = gather_sums(
            hidden, torch.tensor(rows.flat, device=dev), torch.tensor(rows.segment, device=dev), 2 * bsz
        )
        last_index = torch.tensor(rows.last_flat, device=dev)
        last = hidden.reshape(-1, hidden.shape[-1]).index_select(0, last_index).to(torch.float64)
        return sums[0::2], sums[1::2], last[0::2], last[1::2]

    def _self_check_tolerance(self) -> float:
        return 1e-3 if self.dtype == torch.float32 else 5e-2

    def _self_check_error(self, strategy: str) -> float:
        """Largest relative difference of ``strategy`` against plain on a synthetic pair.

        The prompt is longer than the sliding window, if any, and the two
        responses differ in length, so a wrong mask of either layer type shows.
        """
        generator = torch.Generator().manual_seed(0)
        vocab = int(getattr(self.config, "vocab_size", 1000))
        prompt_len = (self.window + 24) if self.window else 24
        prompt_len = min(prompt_len, int(getattr(self.config, "max_position_embeddings", 4096) or 4096) - 16)

        def draw(n):
            return tuple(torch.randint(4, max(5, vocab), (n,), generator=generator).tolist())

        pair = EncodedPair(draw(prompt_len), draw(7), draw(5))
        fast = self._forward_prefix([pair]) if strategy == "prefix" else self._forward_packed([pair])
        plain = self._forward_plain([pair])
        return max(float((a - b).norm() / b.norm().clamp_min(1e-12)) for a, b in zip(fast[:2], plain[:2]))

    def _self_check(self) -> bool:
        """Compare packed and plain on synthetic pairs; False (use plain) on mismatch.

        A model whose attention ignores a custom 4D mask, or builds its own
        masks per layer in a way this engine does not know, would silently give
        wrong scores with the packed strategy; one small forward pass each way
        catches it.
        """
        worst = self._self_check_error("packed")
        tol = self._self_check_tolerance()
        if worst > tol:
            logger.warning(
                "packed strategy disagrees with the plain one on this model (relative error %.2e > %.0e); "
                "scoring with the plain strategy",
                worst,
                tol,
            )
            return False
        return True
