"""Tests for ches_filter.formats: layouts, row statuses, layout detection."""

from __future__ import annotations

from ches_filter.config import ScoreConfig
import os
import collections
import gzip
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ches_filter.errors import BadDataError, BadFlagError
from ches_filter.formats import (
    LAYOUTS,
    ROW_STATUSES,
    Columns,
    Pair,
    detect_layout,
    is_conversational,
    normalize_row,
    split_hh_transcript,
    validate_layout,
)

from conftest import EXAMPLE_HH, example_rows, invoke, one_error_line

COLS = Columns()
DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data"
HH_FILE = DATA_DIR / "hh-rlhf-harmless-base-test.dev.jsonl.gz"


def user(text):
    return {"role": "user", "content": text}


def asst(text):
    return {"role": "assistant", "content": text}


def norm(layout, **row):
    return normalize_row(row, layout, COLS)


# --- explicit_text ---------------------------------------------------------


def test_explicit_text_ok_keeps_strings_unchanged():
    pair = norm("explicit_text", prompt=" Q? ", chosen=" yes\n", rejected=" no")
    assert pair == Pair(
        "ok",
        prompt_messages=({"role": "user", "content": " Q? "},),
        chosen=" yes\n",
        rejected=" no",
        prompt_text=" Q? ",
        chosen_text=" yes\n",
        rejected_text=" no",
    )


@pytest.mark.parametrize(
    "row, status",
    [
        ({"prompt": None, "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [user("q")], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": "q", "chosen": 3, "rejected": "b"}, "invalid_chosen"),
        ({"prompt": "q", "chosen": b"a", "rejected": "b"}, "invalid_chosen"),
        ({"prompt": "q", "chosen": "a", "rejected": {"x": 1}}, "invalid_rejected"),
        ({"prompt": "q", "chosen": "a"}, "invalid_rejected"),
        ({"prompt": 1.5, "chosen": None, "rejected": None}, "invalid_prompt"),
        ({"prompt": " \n\t", "chosen": "a", "rejected": "b"}, "empty_prompt"),
        ({"prompt": "", "chosen": "", "rejected": ""}, "empty_prompt"),
        ({"prompt": "q", "chosen": "  ", "rejected": "b"}, "empty_chosen"),
        ({"prompt": "q", "chosen": "a", "rejected": ""}, "empty_rejected"),
    ],
)
def test_explicit_text_statuses(row, status):
    pair = normalize_row(row, "explicit_text", COLS)
    assert pair.status == status


# --- explicit_conversational -----------------------------------------------


def test_explicit_conversational_trl_style():
    prompt = [{"role": "system", "content": "be nice"}, user("hi"), asst("hello"), user("more")]
    pair = norm(
        "explicit_conversational",
        prompt=prompt,
        chosen=[asst("sure")],
        rejected=[asst("no")],
    )
    assert pair.status == "ok"
    assert pair.prompt_messages == tuple(prompt)
    assert (pair.chosen, pair.rejected) == ("sure", "no")
    assert pair.prompt_text is pair.chosen_text is pair.rejected_text is None


def test_explicit_conversational_string_responses_and_extra_keys_dropped():
    pair = norm(
        "explicit_conversational",
        prompt=[{"role": "user", "content": "hi", "name": "bob"}],
        chosen="a",
        rejected=[{"role": "assistant", "content": "b", "weight": 1}],
    )
    assert pair.status == "ok"
    assert pair.prompt_messages == (user("hi"),)
    assert (pair.chosen, pair.rejected) == ("a", "b")


def test_explicit_conversational_string_prompt():
    pair = norm("explicit_conversational", prompt="hi", chosen=[asst("a")], rejected=[asst("b")])
    assert pair.status == "ok"
    assert pair.prompt_messages == (user("hi"),)
    assert pair.prompt_text is None


def test_explicit_conversational_prompt_is_a_copy():
    prompt = [user("hi")]
    pair = norm("explicit_conversational", prompt=prompt, chosen="a", rejected="b")
    pair.prompt_messages[0]["content"] = "changed"
    assert prompt[0]["content"] == "hi"


@pytest.mark.parametrize(
    "row, status",
    [
        ({"prompt": [], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [{"role": "user"}], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [{"content": "x"}], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [{"role": "human", "content": "x"}], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [{"role": None, "content": "x"}], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [{"role": "user", "content": None}], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [{"role": "user", "content": 7}], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [user("x"), "junk"], "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": {"role": "user", "content": "x"}, "chosen": "a", "rejected": "b"}, "invalid_prompt"),
        ({"prompt": [user("q")], "chosen": [user("a")], "rejected": "b"}, "invalid_chosen"),
        ({"prompt": [user("q")], "chosen": [asst("a"), asst("b")], "rejected": "b"}, "invalid_chosen"),
        ({"prompt": [user("q")], "chosen": [], "rejected": "b"}, "invalid_chosen"),
        ({"prompt": [user("q")], "chosen": asst("a"), "rejected": "b"}, "invalid_chosen"),
        ({"prompt": [user("q")], "chosen": "a", "rejected": [[asst("b")]]}, "invalid_rejected"),
        ({"prompt": [user("q")], "chosen": "a", "rejected": None}, "invalid_rejected"),
        ({"prompt": [user(" "), {"role": "system", "content": ""}], "chosen": "a", "rejected": "b"}, "empty_prompt"),
        ({"prompt": [user("q")], "chosen": [asst(" \n")], "rejected": "b"}, "empty_chosen"),
        ({"prompt": [user("q")], "chosen": "a", "rejected": [asst("")]}, "empty_rejected"),
    ],
)
def test_explicit_conversational_statuses(row, status):
    assert normalize_row(row, "explicit_conversational", COLS).status == status


# --- content part lists ----------------------------------------------------


def test_part_lists_join_text_parts():
    parts = [{"type": "text", "text": "look "}, {"type": "text", "text": "here"}]
    pair = norm(
        "explicit_conversational",
        prompt=[{"role": "user", "content": parts}],
        chosen=[{"role": "assistant", "content": [{"type": "text", "text": "ok"}]}],
        rejected="no",
    )
    assert pair.status == "ok"
    assert pair.prompt_messages == (user("look here"),)
    assert pair.chosen == "ok"


IMAGE = {"type": "image", "image": "http://x/cat.png"}
# As datasets loads parts from JSON: one Arrow struct for every part, so each part carries every key.
ARROW_TEXT = {"type": "text", "text": "look", "image": None}
ARROW_IMAGE = {"type": "image", "text": None, "image": "cat.png"}


@pytest.mark.parametrize(
    "layout,row",
    [
        # An image beside a text part, in the prompt, the chosen or the rejected response.
        ("explicit_conversational", {"prompt": [{"role": "user", "content": [{"type": "text", "text": "look "}, IMAGE]}],
                                     "chosen": "a cat", "rejected": "a dog"}),
        ("explicit_conversational", {"prompt": [{"role": "user", "content": [ARROW_TEXT, ARROW_IMAGE]}],
                                     "chosen": "a cat", "rejected": "a dog"}),
        ("explicit_conversational", {"prompt": [user("q")], "chosen": "a",
                                     "rejected": [{"role": "assistant", "content": [{"type": "text", "text": "b"}, IMAGE]}]}),
        ("explicit_conversational", {"prompt": [{"role": "user", "content": [IMAGE]}], "chosen": "a", "rejected": "b"}),
        ("explicit_conversational", {"prompt": [{"role": "user", "content": [{"type": "audio"}, {"type": "text", "text": "q"}]}],
                                     "chosen": "a", "rejected": "b"}),
        # A part without a type is not known to be text either.
        ("explicit_conversational", {"prompt": [{"role": "user", "content": [{"text": "q"}]}], "chosen": "a", "rejected": "b"}),
        ("implicit_conversational", {"chosen": [{"role": "user", "content": [{"type": "text", "text": "q"}, IMAGE]}, asst("a")],
                                     "rejected": [{"role": "user", "content": [{"type": "text", "text": "q"}, IMAGE]}, asst("b")]}),
        ("implicit_conversational", {"chosen": [user("q"), {"role": "assistant", "content": [IMAGE]}],
                                     "rejected": [user("q"), asst("b")]}),
    ],
)
def test_content_that_is_not_text_has_its_own_status(layout, row):
    # Scoring the text alone would rank a pair on part of what the annotator saw.
    assert normalize_row(row, layout, COLS).status == "non_text_content"


def test_malformed_side_wins_over_non_text_content():
    # ROW_STATUSES order: a side of the wrong shape is invalid_* even when an earlier side holds an image.
    image_prompt = [{"role": "user", "content": [{"type": "text", "text": "q"}, IMAGE]}]
    assert norm("explicit_conversational", prompt=image_prompt, chosen=5, rejected="b").status == "invalid_chosen"
    assert norm("explicit_conversational", prompt=image_prompt, chosen="a",
                rejected=[{"role": "assistant", "content": [None]}]).status == "invalid_rejected"
    # An image in a response that is not one assistant message is still invalid.
    assert norm("explicit_conversational", prompt="q", chosen="a",
                rejected=[user("x"), {"role": "assistant", "content": [IMAGE]}]).status == "invalid_rejected"
    assert ROW_STATUSES.index("non_text_content") > ROW_STATUSES.index("invalid_rejected")


@pytest.mark.parametrize(
    "content",
    [
        ["just a string"],
        [{"type": "text", "text": 5}],
        [{"type": "text"}],
        [None],
        {"type": "text", "text": "x"},
    ],
)
def test_bad_part_lists_are_invalid(content):
    pair = norm(
        "explicit_conversational",
        prompt=[{"role": "user", "content": content}],
        chosen="a",
        rejected="b",
    )
    assert pair.status == "invalid_prompt"


# --- implicit_conversational -----------------------------------------------


def test_implicit_conversational_ok():
    shared = [{"role": "system", "content": "sys"}, user("hi"), asst("hey"), user("q")]
    pair = norm("implicit_conversational", chosen=shared + [asst("good")], rejected=shared + [asst("bad")])
    assert pair.status == "ok"
    assert pair.prompt_messages == tuple(shared)
    assert (pair.chosen, pair.rejected) == ("good", "bad")
    assert pair.prompt_text is None and pair.chosen_text is None


def test_implicit_conversational_ignores_prompt_column():
    pair = normalize_row(
        {"prompt": None, "chosen": [user("q"), asst("a")], "rejected": [user("q"), asst("b")]},
        "implicit_conversational",
        COLS,
    )
    assert pair.status == "ok"


@pytest.mark.parametrize(
    "chosen, rejected, status",
    [
        (None, [user("q"), asst("b")], "invalid_chosen"),
        ("text", [user("q"), asst("b")], "invalid_chosen"),
        ([user("q"), asst("a")], [user("q"), {"role": "bot", "content": "b"}], "invalid_rejected"),
        ([user("q"), asst("a")], [user("Q"), asst("b")], "prompt_mismatch"),
        ([user("q"), asst("a")], [{"role": "system", "content": "q"}, asst("b")], "prompt_mismatch"),
        ([user("q"), asst("a")], [user("q"), user("x"), asst("b")], "prompt_mismatch"),
        ([user("q"), user("a")], [user("q"), asst("b")], "missing_assistant_turn"),
        ([user("q"), asst("a")], [user("q"), user("b")], "missing_assistant_turn"),
        ([asst("a")], [asst("b")], "empty_prompt"),
        ([user(" "), asst("a")], [user(" "), asst("b")], "empty_prompt"),
        ([user("q"), asst("  ")], [user("q"), asst("b")], "empty_chosen"),
        ([user("q"), asst("a")], [user("q"), asst("")], "empty_rejected"),
    ],
)
def test_implicit_conversational_statuses(chosen, rejected, status):
    assert norm("implicit_conversational", chosen=chosen, rejected=rejected).status == status


# --- implicit_text (HH-RLHF) -----------------------------------------------


def test_split_hh_transcript_multi_turn():
    text = "\n\nHuman: hi there \n\nAssistant:  hello\n\nHuman: more\n\nAssistant: ok "
    assert split_hh_transcript(text) == [user("hi there"), asst("hello"), user("more"), asst("ok")]


def test_split_hh_transcript_without_leading_newlines():
    assert split_hh_transcript("Human: hi\n\nAssistant: yo") == [user("hi"), asst("yo")]


def test_split_hh_transcript_inline_markers_stay_in_content():
    text = "\n\nHuman: hi\n\nAssistant: Human: what? The Assistant: said\nAssistant: no"
    assert split_hh_transcript(text) == [
        user("hi"),
        asst("Human: what? The Assistant: said\nAssistant: no"),
    ]


@pytest.mark.parametrize("text", ["", "plain words", "intro\n\nHuman: hi\n\nAssistant: x", None, 3])
def test_split_hh_transcript_rejects_non_transcripts(text):
    with pytest.raises(ValueError):
        split_hh_transcript(text)


def test_implicit_text_ok_text_and_message_forms():
    prefix = "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: more\n\nAssistant:"
    pair = norm("implicit_text", chosen=prefix + " good one\n", rejected=prefix + " bad")
    assert pair.status == "ok"
    assert pair.prompt_messages == (user("hi"), asst("hello"), user("more"))
    assert (pair.chosen, pair.rejected) == ("good one", "bad")
    assert pair.prompt_text == prefix
    assert (pair.chosen_text, pair.rejected_text) == (" good one\n", " bad")


def test_implicit_text_response_with_inline_assistant_word():
    prefix = "\n\nHuman: hi\n\nAssistant:"
    chosen = prefix + " I am an Assistant: really.  Human: no"
    pair = norm("implicit_text", chosen=chosen, rejected=prefix + " x")
    assert pair.status == "ok"
    assert pair.prompt_text == prefix
    assert pair.chosen == "I am an Assistant: really.  Human: no"
    assert pair.chosen_text == " I am an Assistant: really.  Human: no"


def test_implicit_text_without_leading_newlines():
    pair = norm("implicit_text", chosen="Human: hi\n\nAssistant: a", rejected="Human: hi\n\nAssistant: b")
    assert pair.status == "ok"
    assert pair.prompt_text == "Human: hi\n\nAssistant:"


@pytest.mark.parametrize(
    "chosen, rejected, status",
    [
        (None, "\n\nHuman: q\n\nAssistant: b", "invalid_chosen"),
        ("no markers at all", "\n\nHuman: q\n\nAssistant: b", "invalid_chosen"),
        ("", "\n\nHuman: q\n\nAssistant: b", "invalid_chosen"),
        ("\n\nHuman: q\n\nAssistant: a", ["\n\nHuman: q\n\nAssistant: b"], "invalid_rejected"),
        ("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: Q\n\nAssistant: b", "prompt_mismatch"),
        # Raw prefixes are compared, so whitespace differences count.
        ("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q \n\nAssistant: b", "prompt_mismatch"),
        ("\n\nHuman: q\n\nAssistant: a", "\n\nHuman: q\n\nAssistant: b\n\nHuman: c\n\nAssistant: d", "prompt_mismatch"),
        ("\n\nHuman: q", "\n\nHuman: q", "missing_assistant_turn"),
        ("\n\nHuman: q\n\nAssistant: a\n\nHuman: z", "\n\nHuman: q\n\nAssistant: a\n\nHuman: y", "missing_assistant_turn"),
        ("\n\nAssistant: a", "\n\nAssistant: b", "empty_prompt"),
        ("\n\nHuman:  \n\nAssistant: a", "\n\nHuman:  \n\nAssistant: b", "empty_prompt"),
        ("\n\nHuman: x\n\nAssistant:", "\n\nHuman: x\n\nAssistant: b", "empty_chosen"),
        ("\n\nHuman: x\n\nAssistant: ", "\n\nHuman: x\n\nAssistant: b", "empty_chosen"),
        ("\n\nHuman: x\n\nAssistant: a", "\n\nHuman: x\n\nAssistant:\n\n", "empty_rejected"),
    ],
)
def test_implicit_text_statuses(chosen, rejected, status):
    assert norm("implicit_text", chosen=chosen, rejected=rejected).status == status


# --- misc ------------------------------------------------------------------


def test_custom_column_names():
    cols = Columns(prompt="q", chosen="good", rejected="bad")
    pair = normalize_row({"q": "x", "good": "a", "bad": "b"}, "explicit_text", cols)
    assert pair.status == "ok"


def test_non_mapping_row_is_invalid_not_an_error():
    assert normalize_row(None, "explicit_text", COLS).status == "invalid_prompt"
    assert normalize_row([1, 2], "implicit_text", COLS).status == "invalid_chosen"


def test_unknown_layout_is_a_flag_error():
    with pytest.raises(BadFlagError, match="explicit_text"):
        normalize_row({}, "hh", COLS)
    with pytest.raises(BadFlagError, match="`--input-format`"):
        validate_layout("nope")
    for layout in LAYOUTS:
        assert validate_layout(layout) == layout


def test_is_conversational():
    assert is_conversational([user("x")])
    assert is_conversational((asst("x"),))
    assert not is_conversational([])
    assert not is_conversational("text")
    assert not is_conversational([{"role": "user"}])
    assert not is_conversational([user("x"), 1])


def test_row_statuses_lists_every_status():
    assert ROW_STATUSES[0] == "ok"
    assert len(set(ROW_STATUSES)) == len(ROW_STATUSES) == 10
    assert "non_text_content" in ROW_STATUSES


# --- detect_layout ---------------------------------------------------------


def rows(**cols):
    n = len(next(iter(cols.values())))
    return [{k: v[i] for k, v in cols.items()} for i in range(n)]


HH = "\n\nHuman: q\n\nAssistant: a"


@pytest.mark.parametrize(
    "sample, layout",
    [
        (rows(prompt=["q"], chosen=["a"], rejected=["b"]), "explicit_text"),
        (rows(prompt=[[user("q")]], chosen=[[asst("a")]], rejected=[[asst("b")]]), "explicit_conversational"),
        (rows(prompt=[[user("q")]], chosen=["a"], rejected=["b"]), "explicit_conversational"),
        (rows(prompt=["q"], chosen=[[asst("a")]], rejected=[[asst("b")]]), "explicit_conversational"),
        # UltraFeedback-binarized: prompt column plus whole conversations.
        (rows(prompt=["q"], chosen=[[user("q"), asst("a")]], rejected=[[user("q"), asst("b")]]), "implicit_conversational"),
        (rows(chosen=[[user("q"), asst("a")]], rejected=[[user("q"), asst("b")]]), "implicit_conversational"),
        (rows(chosen=[HH], rejected=[HH]), "implicit_text"),
        # Leading None values are skipped.
        (rows(prompt=[None, "q"], chosen=[None, "a"], rejected=["b", None]), "explicit_text"),
        # A junk or empty first row does not decide the layout of the file:
        # it gets its own per-row status when scored.
        (rows(chosen=["", HH], rejected=[HH, HH]), "implicit_text"),
        (rows(chosen=[7, HH], rejected=[HH, HH]), "implicit_text"),
        (rows(prompt=[{"x": 1}, "q"], chosen=["a", "a"], rejected=["b", "b"]), "explicit_text"),
        (rows(chosen=[[], [user("q"), asst("a")]], rejected=[[user("q"), asst("b")]] * 2), "implicit_conversational"),
    ],
)
def test_detect_layout(sample, layout):
    assert detect_layout(list(sample[0]), sample, COLS) == layout


def test_detect_layout_missing_chosen_names_available_columns():
    with pytest.raises(BadDataError) as err:
        detect_layout(["question", "good", "rejected"], [], COLS)
    msg = str(err.value)
    assert "'chosen' not found" in msg
    assert "available columns: question, good, rejected" in msg
    assert "`--chosen-column NAME`" in msg


def test_detect_layout_missing_rejected():
    with pytest.raises(BadDataError, match="`--rejected-column NAME`"):
        detect_layout(["prompt", "chosen"], [], COLS)


def test_detect_layout_no_prompt_and_not_hh():
    sample = rows(question=["q"], chosen=["a"], rejected=["b"])
    with pytest.raises(BadDataError) as err:
        detect_layout(["question", "chosen", "rejected"], sample, COLS)
    msg = str(err.value)
    assert "'prompt' not found" in msg
    assert "available columns: question, chosen, rejected" in msg
    assert "`--prompt-column NAME`" in msg
    assert "HH" in msg


def test_detect_layout_custom_prompt_column():
    sample = rows(question=["q"], chosen=["a"], rejected=["b"])
    cols = Columns(prompt="question")
    assert detect_layout(["question", "chosen", "rejected"], sample, cols) == "explicit_text"


@pytest.mark.parametrize(
    "sample, match",
    [
        (rows(prompt=["q"], chosen=[None], rejected=["b"]), "'chosen' is None"),
        (rows(prompt=["q"], chosen=["a"], rejected=[None]), "'rejected' is None"),
        (rows(prompt=[None], chosen=["a"], rejected=["b"]), "'prompt' is None"),
        (rows(prompt=[5], chosen=["a"], rejected=["b"]), "'prompt' holds int"),
        (rows(prompt=["q"], chosen=[{"a": 1}], rejected=["b"]), "'chosen' holds dict"),
        (rows(chosen=[3.0], rejected=["b"]), "'chosen' holds float"),
    ],
)
def test_detect_layout_bad_values(sample, match):
    with pytest.raises(BadDataError, match=match):
        detect_layout(list(sample[0]), sample, COLS)


def test_detect_layout_empty_sample():
    with pytest.raises(BadDataError, match="None"):
        detect_layout(["prompt", "chosen", "rejected"], [], COLS)


# --- property test ---------------------------------------------------------

_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=True),
    st.text(max_size=30),
    st.binary(max_size=10),
    st.sampled_from(["user", "assistant", "system", "tool", "text", "\n\nHuman:", "\n\nAssistant:", "Human: x"]),
)
_junk = st.recursive(
    _leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.tuples(inner, inner),
        st.dictionaries(st.sampled_from(["role", "content", "type", "text", "x"]), inner, max_size=4),
        st.dictionaries(st.integers(), inner, max_size=2),
    ),
    max_leaves=15,
)
_hhish = st.lists(
    st.sampled_from(["\n\nHuman:", "\n\nAssistant:", "Human:", "Assistant:", " hi", "", " ", "\n"]),
    max_size=8,
).map("".join)


@settings(max_examples=300, deadline=None)
@given(
    layout=st.sampled_from(LAYOUTS.names()),
    prompt=_junk,
    chosen=st.one_of(_junk, _hhish),
    rejected=st.one_of(_junk, _hhish),
)
def test_normalize_row_never_raises(layout, prompt, chosen, rejected):
    pair = normalize_row({"prompt": prompt, "chosen": chosen, "rejected": rejected}, layout, COLS)
    assert pair.status in ROW_STATUSES
    if pair.status == "ok":
        assert isinstance(pair.chosen, str) and isinstance(pair.rejected, str)
        assert all(isinstance(m["content"], str) for m in pair.prompt_messages)


# --- real data -------------------------------------------------------------


@pytest.mark.skipif(not HH_FILE.exists(), reason=f"{HH_FILE} not present")
def test_real_hh_file():
    with gzip.open(HH_FILE, "rt", encoding="utf-8") as f:
        data = [json.loads(line) for line in f]
    assert len(data) == 1500
    assert detect_layout(list(data[0]), data[:100], COLS) == "implicit_text"
    pairs = [normalize_row(row, "implicit_text", COLS) for row in data]
    counts = collections.Counter(p.status for p in pairs)
    assert counts == {"ok": 1495, "empty_chosen": 4, "prompt_mismatch": 1}
    for row, pair in zip(data, pairs):
        if pair.status == "ok":
            # The text form reassembles the raw transcripts exactly.
            assert pair.prompt_text + pair.chosen_text == row["chosen"]
            assert pair.prompt_text + pair.rejected_text == row["rejected"]
            assert pair.prompt_text.endswith("\n\nAssistant:")


def test_own_columns_are_read_from_the_schema_and_the_registry(tiny_model_dir):
    from ches_filter.measures import MEASURES
    from ches_filter.api import score_pairs
    from ches_filter.scoring import TAIL_COLUMNS

    own = _own_columns()
    assert set(MEASURES.names()) <= set(own) and set(TAIL_COLUMNS) <= set(own)
    rows = example_rows(2)
    for i, row in enumerate(rows):
        row["pair_id"] = f"p{i}"
    config = ScoreConfig(model=os.fspath(tiny_model_dir), measures=",".join(MEASURES.names()), id_column="pair_id",
                         on_special_tokens="flag", quiet=True)
    table = score_pairs(rows, config)
    # Every column a score file can hold is reserved, and nothing else is.
    assert set(table.column_names) - {"pair_id"} == set(own)


@pytest.mark.parametrize("name", ["status", "ches", "ln_ches", "row_index", "prompt_tokens", "special_tokens",
                                  "edit_distance", "last_hidden_ip"])
def test_id_column_named_like_a_score_column_is_refused_up_front(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    assert name in _own_columns()
    with pytest.raises(BadFlagError, match="--id-column"):
        ScoreConfig(id_column=name)
    for args in (["score", EXAMPLE_HH, "-o", "out.parquet"], ["prune", EXAMPLE_HH, "--keep", "0.5", "-o", "out.jsonl"],
                 ["validate", EXAMPLE_HH, "-o", "out"], ["displacement", EXAMPLE_HH, "-o", "out.parquet"]):
        result = invoke(*args, "--id-column", name)
        assert result.exit_code == 2, result.output
        assert f"'{name}'" in one_error_line(result) and "rename" in one_error_line(result)
        assert os.listdir(".") == []


def test_id_column_named_like_a_displacement_column_is_refused(tmp_path):
    from ches_filter.config import DisplacementConfig
    from ches_filter.displacement import measure_displacement

    rows = [dict(row, grad_inner=i) for i, row in enumerate(example_rows(2))]
    with pytest.raises(BadFlagError, match="grad_inner"):
        measure_displacement(rows, DisplacementConfig(sample=2), ScoreConfig(id_column="grad_inner"))
    with pytest.raises(BadFlagError, match="dlogp_yes"):
        measure_displacement(rows, DisplacementConfig(sample=2), ScoreConfig(id_column="dlogp_yes"), watch={"yes": " Yes"})


def _own_columns() -> tuple[str, ...]:
    from ches_filter.scoring import own_columns

    return own_columns()
