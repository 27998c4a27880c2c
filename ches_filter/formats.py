"""Normalize one row of a DPO preference dataset into a :class:`Pair`.

The on-disk layouts understood are the entries of the registry :data:`LAYOUTS`
(one pure normalise function each, TRL ``data_utils`` style). Whole-dataset
problems (a missing column, a layout that cannot be recognized) raise
:class:`~ches_filter.errors.BadDataError`; problems with a single row never
raise and instead come back as a :class:`Pair` whose ``status`` names the
reason, so callers can skip the row and record why.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

from .errors import BadDataError
from .registry import Registry

logger = logging.getLogger(__name__)

# Ordered as the checks run: the first matching status wins.
ROW_STATUSES = (
    "ok",
    "invalid_prompt",
    "invalid_chosen",
    "invalid_rejected",
    "non_text_content",
    "prompt_mismatch",
    "missing_assistant_turn",
    "empty_prompt",
    "empty_chosen",
    "empty_rejected",
)

ROLES = frozenset({"system", "user", "assistant", "tool"})

# Only a marker at the start of a paragraph counts: HH responses often contain
# "Human:" or "Assistant:" inside a turn (e.g. "\n\nAssistant: Human: ..."),
# and that text belongs to the turn.
_HH_MARKER = re.compile(r"\n\n(Human|Assistant):")
_HH_ROLES = {"Human": "user", "Assistant": "assistant"}

# How many sample rows detect_layout looks at.
_SAMPLE_LIMIT = 100


@dataclass(frozen=True)
class Columns:
    """Names of the dataset columns that hold each part of a pair."""

    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"
    id: str | None = None


@dataclass(frozen=True)
class Pair:
    """One normalized preference pair.

    ``prompt_messages``/``chosen``/``rejected`` feed the chat-template path;
    ``prompt_text``/``chosen_text``/``rejected_text`` feed models without a
    chat template and are ``None`` for conversational layouts. When
    ``status`` is not ``"ok"`` any field may be ``None``.
    """

    status: str
    prompt_messages: tuple[dict, ...] | None = None
    chosen: str | None = None
    rejected: str | None = None
    prompt_text: str | None = None
    chosen_text: str | None = None
    rejected_text: str | None = None


class _Invalid(Exception):
    """Internal signal that a value has the wrong shape."""


class _NonText(Exception):
    """Internal signal that a well-formed value holds content parts that are not text (images, audio, ...).

    Raised only once the whole value was checked, so a malformed value is
    ``invalid_*`` first (the order of :data:`ROW_STATUSES`).
    """


def is_conversational(value: Any) -> bool:
    """Return True for a non-empty list/tuple of dicts with role and content."""
    if not isinstance(value, (list, tuple)) or not value:
        return False
    return all(isinstance(m, Mapping) and "role" in m and "content" in m for m in value)


def validate_layout(layout: str) -> str:
    """Return ``layout`` unchanged if it is registered in :data:`LAYOUTS`.

    Raises:
        BadFlagError: for any other value, naming the choices.
    """
    LAYOUTS.get(layout)
    return layout


def split_hh_transcript(text: str) -> list[dict]:
    """Split an HH-RLHF transcript into ``{"role", "content"}`` messages.

    Markers are ``"\\n\\nHuman:"`` and ``"\\n\\nAssistant:"``; a transcript may
    also start with a bare ``"Human:"``/``"Assistant:"``. Contents are
    stripped of surrounding whitespace.

    Raises:
        ValueError: if ``text`` is not a string, holds no marker, or has
            non-whitespace text before its first marker.
    """
    markers = _hh_markers(text)
    messages = []
    for i, (role, _start, end) in enumerate(markers):
        stop = markers[i + 1][1] if i + 1 < len(markers) else len(text)
        messages.append({"role": _HH_ROLES[role], "content": text[end:stop].strip()})
    return messages


def _hh_markers(text: Any) -> list[tuple[str, int, int]]:
    """Return ``(role, start, end)`` of every turn marker in a transcript."""
    if not isinstance(text, str):
        raise ValueError(f"expected a str transcript, got {type(text).__name__}")
    markers = []
    # A transcript that starts without the blank lines is still a transcript.
    for name in _HH_ROLES:
        if text.startswith(name + ":"):
            markers.append((name, 0, len(name) + 1))
    markers.extend((m.group(1), m.start(), m.end()) for m in _HH_MARKER.finditer(text))
    if not markers:
        raise ValueError("no '\\n\\nHuman:' or '\\n\\nAssistant:' marker found")
    if text[: markers[0][1]].strip():
        raise ValueError("text before the first '\\n\\nHuman:' marker")
    return markers


def _content_text(content: Any) -> str:
    """Return message content as a str, joining the text parts of a part list.

    Raises:
        _Invalid: the content is neither a str nor a list of parts.
        _NonText: a part is not text (an image, audio, ...): a text model would
            score the pair on part of what the annotator saw, so it is not scored.
    """
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):
        pieces = []
        other = False
        for part in content:
            if not isinstance(part, Mapping):
                raise _Invalid
            if part.get("type") != "text":
                other = True
                continue
            text = part.get("text")
            if not isinstance(text, str):
                raise _Invalid
            pieces.append(text)
        if other:
            raise _NonText
        return "".join(pieces)
    raise _Invalid


def _messages(value: Any) -> tuple[dict, ...]:
    """Validate a message list and return it as fresh ``{role, content}`` dicts.

    Raises:
        _Invalid: the list or a message is malformed.
        _NonText: every message is well formed but one holds a part that is not text.
    """
    if not is_conversational(value):
        raise _Invalid
    out = []
    other = False
    for message in value:
        role = message["role"]
        if not isinstance(role, str) or role not in ROLES:
            raise _Invalid
        try:
            content = _content_text(message["content"])
        except _NonText:
            other, content = True, ""
        out.append({"role": role, "content": content})
    if other:
        raise _NonText
    return tuple(out)


def _blank(text: str) -> bool:
    return not text.strip()


def _finish(
    prompt_messages: tuple[dict, ...],
    chosen: str,
    rejected: str,
    text_form: tuple[str, str, str] | None = None,
) -> Pair:
    """Apply the emptiness checks shared by every layout and build the Pair."""
    if all(_blank(m["content"]) for m in prompt_messages):
        return Pair("empty_prompt")
    if _blank(chosen):
        return Pair("empty_chosen")
    if _blank(rejected):
        return Pair("empty_rejected")
    prompt_text, chosen_text, rejected_text = text_form or (None, None, None)
    return Pair(
        "ok",
        prompt_messages=prompt_messages,
        chosen=chosen,
        rejected=rejected,
        prompt_text=prompt_text,
        chosen_text=chosen_text,
        rejected_text=rejected_text,
    )


def _explicit_text(prompt: Any, chosen: Any, rejected: Any) -> Pair:
    for status, value in (
        ("invalid_prompt", prompt),
        ("invalid_chosen", chosen),
        ("invalid_rejected", rejected),
    ):
        if not isinstance(value, str):
            return Pair(status)
    return _finish(
        ({"role": "user", "content": prompt},),
        chosen,
        rejected,
        (prompt, chosen, rejected),
    )


def _explicit_response(value: Any) -> str:
    """A response given as a str or as a list holding one assistant message."""
    if isinstance(value, str):
        return value
    try:
        messages = _messages(value)
    except _NonText:
        messages = None  # the list was checked all the same: `value` is well-formed messages
    if len(value) != 1 or value[0]["role"] != "assistant":
        raise _Invalid
    if messages is None:
        raise _NonText
    return messages[0]["content"]


def _sides(checks: list[tuple[str, Callable[[Any], Any], Any]]) -> list[Any] | str:
    """Each ``parse(value)``, or the status of the first side that is invalid, else ``non_text_content``."""
    parsed: list[Any] = []
    non_text = False
    for status, parse, value in checks:
        try:
            parsed.append(parse(value))
        except _Invalid:
            return status
        except _NonText:
            non_text = True
            parsed.append(None)
    return "non_text_content" if non_text else parsed


def _prompt_messages(prompt: Any) -> tuple[dict, ...]:
    """A prompt given as a str (one user message) or as messages."""
    return ({"role": "user", "content": prompt},) if isinstance(prompt, str) else _messages(prompt)


def _explicit_conversational(prompt: Any, chosen: Any, rejected: Any) -> Pair:
    sides = _sides([
        ("invalid_prompt", _prompt_messages, prompt),
        ("invalid_chosen", _explicit_response, chosen),
        ("invalid_rejected", _explicit_response, rejected),
    ])
    if isinstance(sides, str):
        return Pair(sides)
    return _finish(*sides)


def _implicit_conversational(chosen: Any, rejected: Any) -> Pair:
    sides = _sides([("invalid_chosen", _messages, chosen), ("invalid_rejected", _messages, rejected)])
    if isinstance(sides, str):
        return Pair(sides)
    chosen_msgs, rejected_msgs = sides
    # _messages returned plain {role, content} dicts, so == compares exactly those.
    if chosen_msgs[:-1] != rejected_msgs[:-1]:
        return Pair("prompt_mismatch")
    if chosen_msgs[-1]["role"] != "assistant" or rejected_msgs[-1]["role"] != "assistant":
        return Pair("missing_assistant_turn")
    return _finish(chosen_msgs[:-1], chosen_msgs[-1]["content"], rejected_msgs[-1]["content"])


def _implicit_text(chosen: Any, rejected: Any) -> Pair:
    parsed = []
    for status, value in (("invalid_chosen", chosen), ("invalid_rejected", rejected)):
        try:
            markers = _hh_markers(value)
        except ValueError:
            return Pair(status)
        parsed.append((split_hh_transcript(value), markers[-1]))
    (chosen_msgs, chosen_last), (rejected_msgs, rejected_last) = parsed
    # The shared prompt is the raw text up to and including the last turn
    # marker; comparing raw text (not parsed turns) also catches whitespace
    # differences that would make the two sides tokenize differently.
    chosen_prefix, rejected_prefix = chosen[: chosen_last[2]], rejected[: rejected_last[2]]
    if chosen_prefix != rejected_prefix:
        return Pair("prompt_mismatch")
    if chosen_last[0] != "Assistant" or rejected_last[0] != "Assistant":
        return Pair("missing_assistant_turn")
    return _finish(
        tuple(chosen_msgs[:-1]),
        chosen_msgs[-1]["content"],
        rejected_msgs[-1]["content"],
        (chosen_prefix, chosen[chosen_last[2] :], rejected[rejected_last[2] :]),
    )


@dataclass(frozen=True)
class Layout:
    """One input layout: how a row of it becomes a :class:`Pair`.

    Attributes:
        name: the ``--input-format`` value.
        normalize: pure function ``(prompt, chosen, rejected) -> Pair``; ``prompt``
            is None for layouts without a prompt column.
        needs_prompt: the layout reads a prompt column.
        conversational: prompts are message lists (needs a chat template).
        description: one line for ``--help`` and the docs.
    """

    name: str
    normalize: Callable[[Any, Any, Any], Pair]
    needs_prompt: bool
    conversational: bool
    description: str


#: Every input layout, by ``--input-format`` name. A new layout is one pure
#: function plus one ``LAYOUTS.register`` call (and its tests).
LAYOUTS: Registry[Layout] = Registry("input layout", "--input-format")
LAYOUTS.register("explicit_text", Layout(
    "explicit_text", _explicit_text, True, False, "prompt/chosen/rejected strings"))
LAYOUTS.register("explicit_conversational", Layout(
    "explicit_conversational", _explicit_conversational, True, True,
    "TRL style: prompt messages, chosen/rejected assistant messages or strings"))
LAYOUTS.register("implicit_conversational", Layout(
    "implicit_conversational", lambda _prompt, chosen, rejected: _implicit_conversational(chosen, rejected),
    False, True, "UltraFeedback-binarized style: chosen/rejected are whole conversations"))
LAYOUTS.register("implicit_text", Layout(
    "implicit_text", lambda _prompt, chosen, rejected: _implicit_text(chosen, rejected),
    False, False, "HH-RLHF style: chosen/rejected are whole Human:/Assistant: transcripts"))


def normalize_row(row: dict, layout: str, columns: Columns) -> Pair:
    """Turn one dataset row into a :class:`Pair`.

    Never raises for a bad row: the returned ``status`` (one of
    :data:`ROW_STATUSES`) says what is wrong with it.

    Raises:
        BadFlagError: if ``layout`` is not registered in :data:`LAYOUTS`.
    """
    entry = LAYOUTS.get(layout)
    if not isinstance(row, Mapping):
        row = {}
    prompt = row.get(columns.prompt) if entry.needs_prompt else None
    return entry.normalize(prompt, row.get(columns.chosen), row.get(columns.rejected))


def used_columns(layout: str, columns: Columns, available: list[str]) -> list[str]:
    """The input columns a layout reads (and that decide the scores), in a fixed order.

    A prompt column present in an implicit layout's input is hashed too, so a
    score file stays tied to the rows it was computed for.
    """
    used = [columns.chosen, columns.rejected]
    if LAYOUTS.get(layout).needs_prompt or columns.prompt in available:
        used.insert(0, columns.prompt)
    return [c for c in used if c in available]


def required_columns(layout: str, columns: Columns) -> list[str]:
    """The columns an input of ``layout`` must have."""
    return ([columns.prompt] if LAYOUTS.get(layout).needs_prompt else []) + [columns.chosen, columns.rejected]


def _first_value(sample_rows: list[dict], column: str) -> Any:
    """Return a representative value of ``column`` in the sample, or None.

    The first non-empty string or message list wins; only when the sample has
    none is the first non-None value returned (for the error message). A junk
    or empty first row thus gets its own per-row status instead of deciding
    the layout of the whole file.
    """
    fallback = None
    for row in sample_rows[:_SAMPLE_LIMIT]:
        if not isinstance(row, Mapping) or row.get(column) is None:
            continue
        value = row[column]
        if (isinstance(value, str) and value.strip()) or is_conversational(value):
            return value
        if fallback is None:
            fallback = value
    return fallback


def _describe(value: Any) -> str:
    """Name a value's kind for an error message."""
    if is_conversational(value):
        return "message lists"
    return f"{type(value).__name__} values"


def detect_layout(column_names: list[str], sample_rows: list[dict], columns: Columns) -> str:
    """Guess the layout of a dataset from its columns and a few rows.

    Args:
        column_names: every column of the dataset.
        sample_rows: the first rows (up to 100 are looked at).
        columns: which columns hold prompt, chosen and rejected.

    Returns:
        One of :data:`LAYOUTS`.

    Raises:
        BadDataError: if a needed column is missing, holds only None, or the
            values fit no layout.
    """
    available = ", ".join(column_names) or "(none)"
    chosen = _response_sample(column_names, sample_rows, columns, available)
    if columns.prompt in column_names:
        return _layout_with_prompt(sample_rows, columns, chosen)
    if is_conversational(chosen):
        return "implicit_conversational"
    if "Assistant:" in chosen:
        return "implicit_text"
    raise BadDataError(
        f"column {columns.prompt!r} not found; available columns: {available}, and "
        f"column {columns.chosen!r} holds plain strings, not HH-style transcripts "
        "('\\n\\nHuman: ... \\n\\nAssistant: ...'). Pass `--prompt-column NAME` to "
        "name the column holding the prompt."
    )


def _response_sample(column_names: list[str], sample_rows: list[dict], columns: Columns, available: str) -> Any:
    """The chosen column's representative value, after checking both response columns exist and hold something usable."""
    for role in ("chosen", "rejected"):
        name = getattr(columns, role)
        if name not in column_names:
            raise BadDataError(
                f"column {name!r} not found; available columns: {available}. "
                f"Map it with `--{role}-column NAME`."
            )

    values = {}
    for role in ("chosen", "rejected"):
        name = getattr(columns, role)
        values[role] = _first_value(sample_rows, name)
        if values[role] is None:
            raise BadDataError(
                f"column {name!r} is None in all of the first "
                f"{min(len(sample_rows), _SAMPLE_LIMIT)} rows; it must hold "
                f"strings or message lists. Map another column with `--{role}-column NAME`."
            )
    chosen = values["chosen"]
    if not isinstance(chosen, str) and not is_conversational(chosen):
        raise BadDataError(
            f"column {columns.chosen!r} holds {_describe(chosen)}; expected strings "
            "or lists of {role, content} messages. Map another column with "
            "`--chosen-column NAME`."
        )
    return chosen


def _layout_with_prompt(sample_rows: list[dict], columns: Columns, chosen: Any) -> str:
    """The layout of an input that has the prompt column (``chosen``: the chosen column's representative value)."""
    prompt = _first_value(sample_rows, columns.prompt)
    if prompt is None:
        raise BadDataError(
            f"column {columns.prompt!r} is None in all of the first "
            f"{min(len(sample_rows), _SAMPLE_LIMIT)} rows; it must hold strings "
            "or message lists. Map another column with `--prompt-column NAME`, "
            "or pass `--input-format implicit_conversational`/`--input-format implicit_text` "
            "if the responses hold the whole conversation."
        )
    if is_conversational(chosen) and (len(chosen) > 1 or chosen[0]["role"] != "assistant"):
        # UltraFeedback-binarized keeps a prompt column *and* full
        # conversations in chosen/rejected; the conversations are the
        # authoritative prompt, so the prompt column is not used.
        logger.info(
            "column %r holds whole conversations; ignoring prompt column %r",
            columns.chosen,
            columns.prompt,
        )
        return "implicit_conversational"
    if is_conversational(prompt):
        return "explicit_conversational"
    if isinstance(prompt, str):
        return "explicit_conversational" if is_conversational(chosen) else "explicit_text"
    raise BadDataError(
        f"column {columns.prompt!r} holds {_describe(prompt)}; expected strings or "
        "lists of {role, content} messages. Map another column with "
        "`--prompt-column NAME`."
    )
