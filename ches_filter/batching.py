"""Tokenise pairs into the exact CHES token layout and group them into batches.

Token layout (identical for both responses of a pair)::

    prompt ids P   = tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True)
                     (no chat template, or --no-chat-template: tokenizer(prompt_text),
                      with the tokenizer's default special tokens)
    response ids R = tokenizer(response_text, add_special_tokens=False) + [eos_token_id]
    sequence       = P + R

The positions whose hidden state counts are those whose *next* token is a
response token; see :mod:`ches_filter.engine` for the index diagram.

``--layout trl`` instead takes ``P`` and ``R`` exactly as TRL's ``DPOTrainer``
tokenizes the pair (:meth:`PairEncoder.encode_trl`): the tokens a user's DPO
run will actually train on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from .errors import BadDataError
from .formats import LAYOUTS, Pair
from .registry import Registry

logger = logging.getLogger(__name__)

__all__ = ["EncodedPair", "PairEncoder", "token_budget_batches", "TOKEN_LAYOUTS"]


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


def _batch_ids(encoded: Any, n: int) -> list[list[int]]:
    """Token ids of a list call (a list of lists, or a BatchEncoding holding one), checked to hold ``n`` rows."""
    if hasattr(encoded, "keys") and "input_ids" in encoded:
        encoded = encoded["input_ids"]
    if hasattr(encoded, "tolist"):
        encoded = encoded.tolist()
    rows = [[int(t) for t in row] for row in encoded]
    if len(rows) != n:
        raise ValueError(f"the tokenizer returned {len(rows)} rows for {n} inputs")
    return rows


def _classify(enc: EncodedPair, max_length: int) -> tuple[str, EncodedPair]:
    """The status of an encoded pair: ``too_long``, ``identical_responses`` or ``ok``."""
    if enc.longest_sequence > max_length:
        return "too_long", enc
    if enc.chosen == enc.rejected:
        return "identical_responses", enc
    return "ok", enc


class PairEncoder:
    """Turn normalised :class:`~ches_filter.formats.Pair` objects into token ids.

    Args:
        tokenizer: a Hugging Face tokenizer with an EOS token.
        use_chat_template: render prompts with the tokenizer's chat template;
            if False (or the tokenizer has none) use the pair's text form.
        layout: ``"paper"`` (response tokens + EOS, above) or ``"trl"``
            (the completion tokens TRL's ``DPOTrainer`` trains on; see
            :meth:`encode_trl`).
        input_format: the input's layout (:data:`~ches_filter.formats.LAYOUTS`);
            ``"trl"`` needs it to split HH-style transcripts as TRL does.
    """

    def __init__(self, tokenizer: Any, *, use_chat_template: bool = True, layout: str = "paper",
                 input_format: str | None = None) -> None:
        TOKEN_LAYOUTS.get(layout)
        self.tokenizer = tokenizer
        self.eos = tokenizer.eos_token_id
        has_template = bool(getattr(tokenizer, "chat_template", None))
        self.use_chat_template = use_chat_template and has_template
        self.layout = layout
        self.input_format = input_format

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
        return TOKEN_LAYOUTS.get(self.layout).encode(self, pair)

    def encode_paper(self, pair: Pair) -> EncodedPair:
        """The paper's layout: ``P`` from the chat template, ``R`` = response tokens + EOS."""
        if self.use_chat_template:
            chosen, rejected = pair.chosen, pair.rejected
        else:
            chosen, rejected = pair.chosen_text, pair.rejected_text
        return EncodedPair(
            tuple(self.encode_prompt(pair)), tuple(self.encode_response(chosen)), tuple(self.encode_response(rejected))
        )

    def encode_checked(self, pair: Pair, max_length: int) -> tuple[str, EncodedPair | None]:
        """Encode a pair and name what keeps it from being scored.

        Returns:
            ``(status, encoded)``: ``pair.status`` for a pair that was not
            ``ok`` already (``encoded`` None); ``chat_template_error`` when the
            template or tokenizer raised (anything but a
            :class:`~ches_filter.errors.BadDataError`, which propagates);
            ``too_long`` when a side's sequence exceeds ``max_length``;
            ``identical_responses`` when both responses encode the same;
            else ``ok``.
        """
        if pair.status != "ok":
            return pair.status, None
        try:
            enc = self.encode(pair)
        except BadDataError:
            raise
        except Exception as exc:  # noqa: BLE001 - chat templates raise anything (TemplateError, ValueError, ...)
            logger.debug("chat template/tokenizer failed: %s", exc)
            return "chat_template_error", None
        return _classify(enc, max_length)

    def encode_checked_many(self, pairs: Sequence[Pair], max_length: int) -> list[tuple[str, EncodedPair | None]]:
        """:meth:`encode_checked` for many pairs, with the same ids and statuses.

        Prompts, chosen and rejected responses each go to the tokenizer as one
        list: a fast tokenizer encodes a list in Rust on every core without the
        GIL, so a GPU is not left waiting on Python tokenisation (1.8x the
        pair-at-a-time rate with a chat template on 2 cores, 1.5x without;
        more with more cores). A list call
        returns exactly what the single calls return. If it raises (a chat
        template that fails on some row), the pairs are redone one at a time so
        that only the bad rows get ``chat_template_error``.
        """
        results: list[tuple[str, EncodedPair | None] | None] = [None] * len(pairs)
        todo: list[int] = []
        for i, pair in enumerate(pairs):
            if pair.status != "ok":
                results[i] = (pair.status, None)
            elif not self.use_chat_template and pair.prompt_text is None:
                self.encode_prompt(pair)  # raises the BadDataError that names the fix
            else:
                todo.append(i)
        if not TOKEN_LAYOUTS.get(self.layout).list_tokenized or len(todo) < 2:
            for i in todo:
                results[i] = self.encode_checked(pairs[i], max_length)
            return results  # type: ignore[return-value]
        chat = self.use_chat_template
        try:
            if chat:
                prompts = _batch_ids(
                    self.tokenizer.apply_chat_template(
                        [[dict(m) for m in pairs[i].prompt_messages] for i in todo],
                        add_generation_prompt=True, tokenize=True, return_dict=False,
                    ),
                    len(todo),
                )
            else:
                prompts = _batch_ids(self.tokenizer([pairs[i].prompt_text for i in todo]), len(todo))
            responses = [
                _batch_ids(self.tokenizer([getattr(pairs[i], side) for i in todo], add_special_tokens=False), len(todo))
                for side in (("chosen", "rejected") if chat else ("chosen_text", "rejected_text"))
            ]
        except BadDataError:
            raise
        except Exception as exc:  # noqa: BLE001 - one bad row fails the list call; find it row by row
            logger.debug("batched tokenisation failed (%s); encoding one pair at a time", exc)
            for i in todo:
                results[i] = self.encode_checked(pairs[i], max_length)
            return results  # type: ignore[return-value]
        for k, i in enumerate(todo):
            enc = EncodedPair(
                tuple(prompts[k]), tuple(responses[0][k]) + (self.eos,), tuple(responses[1][k]) + (self.eos,)
            )
            results[i] = _classify(enc, max_length)
        return results  # type: ignore[return-value]

    def encode_trl(self, pair: Pair) -> EncodedPair:
        """The prompt and completion ids of TRL's DPO preprocessing (verified against trl 1.x).

        Text inputs (prompt/chosen/rejected strings) are tokenized as TRL
        tokenizes non-conversational data, whatever the chat template::

            P  = tokenizer(prompt)                  (default special tokens)
            PC = tokenizer(prompt + chosen + EOS)   (EOS text appended unless already there)
            R+ = PC[k:], with k the common prefix of P with PC and with PR

        HH-style transcripts (``implicit_text``) are first split as TRL's
        ``extract_prompt`` splits them: at the first differing character,
        a space before it going to the completions. Conversational inputs are
        rendered with the chat template: ``P`` with the generation prompt,
        ``PC`` as the whole conversation, and the completion is what follows
        the common prefix (no EOS added: the template closes the turn).
        """
        if pair.prompt_text is None:
            if not self.use_chat_template:
                raise BadDataError(
                    "`--layout trl` renders conversational input with the chat template, but the model has none "
                    "(or `--no-chat-template` was given); use a model with a chat template"
                )
            messages = [dict(m) for m in pair.prompt_messages]

            def render(conversation, **kwargs):
                return _ids(self.tokenizer.apply_chat_template(conversation, tokenize=True, return_dict=True, **kwargs))

            prompt = render(messages, add_generation_prompt=True)
            full_chosen = render(messages + [{"role": "assistant", "content": pair.chosen}])
            full_rejected = render(messages + [{"role": "assistant", "content": pair.rejected}])
        else:
            prompt_text, chosen_text, rejected_text = pair.prompt_text, pair.chosen_text, pair.rejected_text
            layout = LAYOUTS.get(self.input_format) if self.input_format else None
            if layout is not None and not layout.needs_prompt:
                # Whole transcripts: TRL extracts the prompt as the shared prefix.
                prompt_text, chosen_text, rejected_text = _split_like_trl(
                    prompt_text + chosen_text, prompt_text + rejected_text
                )
            eos = self.tokenizer.eos_token

            def tokens(text):
                return _ids(self.tokenizer(text)["input_ids"])

            prompt = tokens(prompt_text)
            full_chosen = tokens(prompt_text + chosen_text + ("" if chosen_text.endswith(eos) else eos))
            full_rejected = tokens(prompt_text + rejected_text + ("" if rejected_text.endswith(eos) else eos))
        start = min(_common_prefix(prompt, full_chosen), _common_prefix(prompt, full_rejected))
        chosen, rejected = full_chosen[start:], full_rejected[start:]
        if not chosen or not rejected:
            raise ValueError("a completion is empty after TRL's prompt/completion split")
        return EncodedPair(tuple(prompt[:start]), tuple(chosen), tuple(rejected))


@dataclass(frozen=True)
class TokenLayout:
    """Which token ids a pair's prompt and responses become (``--layout``).

    Attributes:
        name: the ``--layout`` value.
        encode: ``(PairEncoder, Pair) -> EncodedPair`` for one ``ok`` pair.
        list_tokenized: :meth:`PairEncoder.encode_checked_many` may tokenise
            a chunk as lists with the paper layout's calls (same ids).
        description: one line for ``--help`` and the docs.
    """

    name: str
    encode: Callable[["PairEncoder", Pair], EncodedPair]
    list_tokenized: bool
    description: str


#: Every token layout, by ``--layout`` name.
TOKEN_LAYOUTS: Registry[TokenLayout] = Registry("token layout", "--layout")
TOKEN_LAYOUTS.register("paper", TokenLayout(
    "paper", PairEncoder.encode_paper, True, "response tokens + EOS after the chat-template prompt (the paper's)"))
TOKEN_LAYOUTS.register("trl", TokenLayout(
    "trl", PairEncoder.encode_trl, False, "the prompt/completion tokens TRL's DPOTrainer trains on"))


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _split_like_trl(chosen: str, rejected: str) -> tuple[str, str, str]:
    """``trl.extract_prompt`` on two strings: the prompt ends where they first differ.

    Its quirks are kept on purpose, since they decide what TRL trains on: a
    space just before the first difference moves to the completions, and when
    one side is a prefix of the other the split falls one character before
    the shorter one's end.
    """
    idx = 0
    for idx in range(min(len(chosen), len(rejected))):
        if chosen[idx] != rejected[idx]:
            if chosen[idx - 1] == " ":
                idx -= 1
            break
    return chosen[:idx], chosen[idx:], rejected[idx:]


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
