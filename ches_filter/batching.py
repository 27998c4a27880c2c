"""Tokenise pairs into the exact CHES token layout and group them into batches.

Token layout (identical for both responses of a pair)::

    prompt ids P   = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True)
                     (no chat template, or --no-chat-template: tokenizer(prompt_text),
                      with the tokenizer's default special tokens)
    response ids R = tokenizer(response_text, add_special_tokens=False) + [eos_token_id]
    sequence       = P + R

The positions whose hidden state counts are those whose *next* token is a
response token; see :mod:`ches_filter.engine` for the index diagram.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from .errors import BadDataError
from .formats import Pair

logger = logging.getLogger(__name__)

__all__ = ["EncodedPair", "PairEncoder", "token_budget_batches"]


@dataclass(frozen=True)
class EncodedPair:
    """One pair in token ids.

    Attributes:
        prompt: ``P``.
        chosen: ``R+`` (response ids + EOS).
        rejected: ``R-`` (response ids + EOS).
    """

    prompt: tuple[int, ...]
    chosen: tuple[int, ...]
    rejected: tuple[int, ...]

    @property
    def packed_length(self) -> int:
        """Tokens of the packed ``[P | R+[:-1] | R-[:-1]]`` row (EOS is never an input)."""
        return len(self.prompt) + len(self.chosen) - 1 + len(self.rejected) - 1

    @property
    def longest_sequence(self) -> int:
        """``|P| + max(|R+|, |R-|)``: the longest position id either side needs."""
        return len(self.prompt) + max(len(self.chosen), len(self.rejected))


def _ids(encoded: Any) -> list[int]:
    # apply_chat_template returns a list in transformers 4.x and a BatchEncoding
    # in 5.x; accept both so users' installs of either work.
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    if encoded and isinstance(encoded[0], list):
        encoded = encoded[0]
    return [int(t) for t in encoded]


class PairEncoder:
    """Turn normalised :class:`~ches_filter.formats.Pair` objects into token ids.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        use_chat_template: render prompts with the tokenizer's chat template;
            if False (or the tokenizer has none) use the pair's text form.
        layout: only ``"paper"`` (response tokens + EOS) today.
    """

    def __init__(self, tokenizer: Any, *, use_chat_template: bool = True) -> None:
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = use_chat_template and has_template

    def encode_prompt(self, pair: Pair) -> list[int]:
        """Prompt ids ``P`` for a pair whose status is ``ok``."""
        if self.use_chat_template:
            return _ids(
                self.tokenizer.apply_chat_template(
                    [dict(m) for m in pair.prompt_messages],
                    add_generation_prompt=True,
                    tokenize=True,
                    return_dict=False,
                )
            )
        if pair.prompt_text is None:
            raise BadDataError(
                "the model has no chat template (or `--no-chat-template` was given) but the input is "
                "conversational, which has no plain-text form; use a model with a chat template, or give "
                "`prompt`/`chosen`/`rejected` as strings"
            )
        return _ids(self.tokenizer(pair.prompt_text)["input_ids"])

    def encode_response(self, text: str) -> list[int]:
        """Response ids ``R`` = tokens of ``text`` without special tokens, then EOS."""
        return _ids(self.tokenizer(text, add_special_tokens=False)["input_ids"]) + [self.eos]

    def encode(self, pair: Pair) -> EncodedPair:
        """Encode one ``ok`` pair."""
        if self.use_chat_template:
            chosen, rejected = pair.chosen, pair.rejected
        else:
            chosen, rejected = pair.chosen_text, pair.rejected_text
        return EncodedPair(
            tuple(self.encode_prompt(pair)), tuple(self.encode_response(chosen)), tuple(self.encode_response(rejected))
        )


def token_budget_batches(
    costs: Sequence[int], max_batch_tokens: int, *, max_batch_size: int | None = None
) -> list[list[int]]:
    """Group items into batches whose padded size fits a token budget.

    Items are sorted longest first (so an out-of-memory error shows in the
    first batch, not after an hour) and each batch takes items while
    ``len(batch) * longest_in_batch <= max_batch_tokens``. An item longer than
    the budget gets a batch of its own.

    Args:
        costs: padded length of each item (tokens per row).
        max_batch_tokens: budget per batch, padding included.
        max_batch_size: optional cap on rows per batch.

    Returns:
        Lists of item indices; every index appears exactly once.
    """
    order = sorted(range(len(costs)), key=lambda i: (-costs[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        width = max(longest, costs[i])
        full = max_batch_size is not None and len(current) >= max_batch_size
        if current and (full or (len(current) + 1) * width > max_batch_tokens):
            batches.append(current)
            current, width = [], costs[i]
        current.append(i)
        longest = width
    if current:
        batches.append(current)
    return batches
