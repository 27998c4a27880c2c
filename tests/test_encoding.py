"""Encoding a chunk as lists gives exactly the ids and statuses of encoding pair by pair."""

from __future__ import annotations

import copy

import pytest

from ches_filter.batching import PairEncoder
from ches_filter.errors import BadDataError
from ches_filter.formats import Columns, normalize_row

from conftest import read_hh


CONVERSATIONAL = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "It is green, obviously."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! <|im_end|> How can I help?"},
            {"role": "user", "content": "Tell me a joke 👍"},
        ],
        "chosen": [{"role": "assistant", "content": "Why did the chicken cross the road?"}],
        "rejected": [{"role": "assistant", "content": "Why did the chicken cross the road?"}],  # identical
    },
    {"prompt": [{"role": "user", "content": "x"}], "chosen": [{"role": "assistant", "content": ""}],
     "rejected": [{"role": "assistant", "content": "y"}]},  # empty chosen
]


def hh_pairs(n=120):
    return [normalize_row(row, "implicit_text", Columns()) for row in read_hh(n)]


def both_ways(encoder, pairs, max_length):
    return [encoder.encode_checked(p, max_length) for p in pairs], encoder.encode_checked_many(pairs, max_length)


@pytest.mark.parametrize("chat", [True, False], ids=["chat-template", "text"])
def test_hh_rows_encode_the_same_as_lists(embedded_tokenizer, chat):
    pairs = hh_pairs()
    encoder = PairEncoder(embedded_tokenizer, use_chat_template=chat)
    one = [encoder.encode_checked(p, 300) for p in pairs]
    encoder.encode_checked = None  # the list path must not fall back to pair by pair here
    many = encoder.encode_checked_many(pairs, 300)
    assert many == one
    statuses = {status for status, _ in one}
    assert "ok" in statuses and "too_long" in statuses  # max_length 300 cuts some real HH pairs
    assert len(many) == len(pairs)


def test_conversational_rows_encode_the_same_as_lists(embedded_tokenizer):
    pairs = [normalize_row(row, "explicit_conversational", Columns()) for row in CONVERSATIONAL]
    one, many = both_ways(PairEncoder(embedded_tokenizer), pairs, 4096)
    assert many == one
    assert [s for s, _ in many] == ["ok", "identical_responses", "empty_chosen"]


def test_a_failing_template_marks_only_its_rows(embedded_tokenizer):
    tokenizer = copy.deepcopy(embedded_tokenizer)
    tokenizer.chat_template = (
        "{% for m in messages %}{% if 'BOOM' in m['content'] %}{{ raise_exception('no BOOM here') }}{% endif %}"
        "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    )
    rows = [dict(r) for r in read_hh(6)]
    rows[2] = {"chosen": rows[2]["chosen"].replace("Human: ", "Human: BOOM ", 1), "rejected": rows[2]["rejected"].replace("Human: ", "Human: BOOM ", 1)}
    pairs = [normalize_row(row, "implicit_text", Columns()) for row in rows]
    one, many = both_ways(PairEncoder(tokenizer), pairs, 4096)
    assert many == one
    assert [s for s, _ in many].count("chat_template_error") == 1 and many[2][0] == "chat_template_error"


def test_conversational_input_without_a_template_is_a_data_error_both_ways(embedded_tokenizer):
    pairs = [normalize_row(row, "explicit_conversational", Columns()) for row in CONVERSATIONAL[:1]] * 2
    encoder = PairEncoder(embedded_tokenizer, use_chat_template=False)
    with pytest.raises(BadDataError, match="no chat template"):
        encoder.encode_checked(pairs[0], 4096)
    with pytest.raises(BadDataError, match="no chat template"):
        encoder.encode_checked_many(pairs, 4096)


def test_trl_layout_lists_match_too(embedded_tokenizer):
    pairs = hh_pairs(20)
    encoder = PairEncoder(embedded_tokenizer, layout="trl", input_format="implicit_text")
    one, many = both_ways(encoder, pairs, 4096)
    assert many == one
