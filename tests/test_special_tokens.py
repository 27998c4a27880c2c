"""Special-token text in rows (`--special-tokens keep/flag/drop`): found, counted, flagged or dropped, never silently."""

from __future__ import annotations

import json
import logging

import pyarrow.parquet as pq
import pytest


from conftest import assert_refused, invoke, write_jsonl

GOOD = {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5."}
SPECIAL_ROWS = [
    {"prompt": "Hi", "chosen": "<|im_end|><|endoftext|>", "rejected": "no"},  # control strings in chosen
    {"prompt": "Hi there", "chosen": "yes sure", "rejected": "no way"},
    {"prompt": "say <repo_name> now", "chosen": "ok", "rejected": "nope"},  # an added token marked special
    {"prompt": "Hello", "chosen": "fine", "rejected": "bad <|im_end"},  # only a prefix: plain text
    {"prompt": "Hey", "chosen": "fine <|im_start|>user", "rejected": "bad"},
    {"prompt": "Yo", "chosen": "good", "rejected": "bad"},
]
SPECIAL_INDICES = [0, 2, 4]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)

# --------------------------------------------------------------------------
# Special tokens in the text
# --------------------------------------------------------------------------


def test_the_pattern_holds_every_special_token(tiny):
    from ches_filter.batching import special_token_pattern

    tok = tiny.tokenizer
    pattern = special_token_pattern(tok)
    specials = set(tok.all_special_tokens) | {t.content for t in tok.added_tokens_decoder.values() if t.special}
    assert {"<|im_end|>", "<|endoftext|>", "<repo_name>"} <= specials
    for token in specials:
        assert pattern.search(f"text {token} more").group(0) == token
        # and the tokenizer really reads it as one control token
        assert tok.convert_tokens_to_ids(token) in tok(f"a {token} b", add_special_tokens=False)["input_ids"]
    for plain in ("<|im_end", "im_end|>", "< |im_end|>", "endoftext", "<repo name>"):
        assert pattern.search(plain) is None, plain


def _score(tiny, rows, mode, **kw):
    from ches_filter.config import ScoreConfig
    from ches_filter.api import score_pairs
    from ches_filter.scoring import table_metadata

    table = score_pairs(rows, ScoreConfig(on_special_tokens=mode, quiet=True, **kw), model=tiny)
    return table, table_metadata(table)


def test_keep_scores_every_row_and_warns_once(tiny, caplog):
    with caplog.at_level(logging.INFO, logger="ches_filter"):
        table, meta = _score(tiny, SPECIAL_ROWS, "keep")
    assert table.column("status").to_pylist() == ["ok"] * len(SPECIAL_ROWS)
    assert "special_tokens" not in table.column_names
    assert meta["special_token_rows"] == len(SPECIAL_INDICES) and meta["on_special_tokens"] == "keep"
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "3 row(s) (row_index 0, 2, 4)" in warnings[0], warnings
    # the control strings were read as control tokens: "<|im_end|><|endoftext|>" + EOS = 3 tokens
    assert table.column("chosen_tokens")[0].as_py() == 3


def test_flag_adds_a_column_and_changes_no_score(tiny):
    kept, _ = _score(tiny, SPECIAL_ROWS, "keep")
    flagged, meta = _score(tiny, SPECIAL_ROWS, "flag")
    assert flagged.column("special_tokens").to_pylist() == [i in SPECIAL_INDICES for i in range(len(SPECIAL_ROWS))]
    assert meta["special_token_rows"] == 3
    for name in kept.column_names:
        assert flagged.column(name).to_pylist() == kept.column(name).to_pylist(), name


def test_drop_gives_a_named_status_and_leaves_the_rest_alone(tiny):
    kept, _ = _score(tiny, SPECIAL_ROWS, "keep")
    dropped, meta = _score(tiny, SPECIAL_ROWS, "drop")
    status = dropped.column("status").to_pylist()
    assert status == ["special_tokens" if i in SPECIAL_INDICES else "ok" for i in range(len(SPECIAL_ROWS))]
    assert meta["special_token_rows"] == 3 and meta["counts"] == {"ok": 3, "special_tokens": 3}
    for i in SPECIAL_INDICES:
        assert dropped.column("ln_ches")[i].as_py() is None and dropped.column("chosen_tokens")[i].as_py() is None
    for i in set(range(len(SPECIAL_ROWS))) - set(SPECIAL_INDICES):
        assert dropped.column("ln_ches")[i].as_py() == pytest.approx(kept.column("ln_ches")[i].as_py(), rel=1e-5)


@pytest.mark.parametrize("layout", ["paper", "trl"])
def test_special_tokens_in_conversational_prompts_and_every_layout(tiny, layout):
    rows = [
        {"prompt": [{"role": "system", "content": "be <|im_start|>nice"}, {"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]},
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}], "rejected": [{"role": "assistant", "content": "go"}]},
        {"prompt": [{"role": "user", "content": "hi"}],
         "chosen": [{"role": "assistant", "content": "hello"}],
         "rejected": [{"role": "assistant", "content": "go<|endoftext|>"}]},
    ]
    table, meta = _score(tiny, rows, "drop", layout=layout)
    assert table.column("status").to_pylist() == ["special_tokens", "ok", "special_tokens"]
    assert meta["special_token_rows"] == 2


def test_rows_that_fail_normalisation_are_not_counted(tiny):
    rows = [{"prompt": "<|im_end|>", "chosen": "", "rejected": "x"}, GOOD]
    table, meta = _score(tiny, rows, "drop")
    assert table.column("status").to_pylist() == ["empty_chosen", "ok"]
    assert meta["special_token_rows"] == 0


def test_cli_flag_summary_parts_prune_and_report(tmp_path, tiny_model_dir):
    """Counts add up over checkpoint parts; score, prune and report all show them."""
    data = write_jsonl(tmp_path / "d.jsonl", SPECIAL_ROWS)
    out = tmp_path / "s.parquet"
    base = ["--model", tiny_model_dir, "-q", "--checkpoint-every", "2", "--chunk-size", "2"]
    result = invoke("score", data, "-o", out, *base, "--on-special-tokens", "drop")
    assert result.exit_code == 0, result.output
    assert "scored 3 of 6 rows" in result.output and "(3 rows hold special-token text)" in result.output
    assert "special_tokens 3" in result.output
    meta = json.loads(pq.read_schema(out).metadata[b"ches_filter"])
    assert meta["special_token_rows"] == 3 and meta["on_special_tokens"] == "drop"

    pruned, rejects = tmp_path / "p.jsonl", tmp_path / "r.jsonl"
    result = invoke("prune", data, "--scores", out, "--keep", "1", "-o", pruned, "--rejects", rejects, "-q")
    assert result.exit_code == 0, result.output
    reasons = [json.loads(line)["ches_filter_reason"] for line in rejects.read_text().splitlines()]
    assert reasons == ["special_tokens"] * 3
    assert len(pruned.read_text().splitlines()) == 3

    result = invoke("report", out, "-o", tmp_path / "report", "-q")
    assert result.exit_code == 0, result.output
    assert "special tokens: 3 rows" in result.output
    assert "special tokens: 3 rows" in (tmp_path / "report" / "report.html").read_text()
    assert json.loads((tmp_path / "report" / "summary.json").read_text())["special_token_rows"] == 3


def test_no_special_rows_no_extra_lines(tmp_path, tiny_model_dir, data):
    out = tmp_path / "s.parquet"
    result = invoke("score", data, "-o", out, "--model", tiny_model_dir, "-q")
    assert result.exit_code == 0 and "special-token" not in result.output
    assert json.loads(pq.read_schema(out).metadata[b"ches_filter"])["special_token_rows"] == 0
    result = invoke("report", out, "-o", tmp_path / "report", "-q")
    assert result.exit_code == 0 and "special tokens:" not in result.output


def test_the_mode_is_part_of_the_resume_identity(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", SPECIAL_ROWS)
    out, work = tmp_path / "s.parquet", tmp_path / "work"
    base = ["score", data, "-o", out, "--model", tiny_model_dir, "-q", "--work-dir", work, "--keep-work-dir"]
    assert invoke(*base).exit_code == 0
    before = out.read_bytes()
    result = invoke(*base, "--overwrite", "--on-special-tokens", "drop")
    assert_refused(result, 2, "--on-special-tokens", "'keep' there, 'drop' now")
    assert out.read_bytes() == before


def test_a_bad_mode_is_a_flag_error(tmp_path, data):
    from ches_filter.config import ScoreConfig
    from ches_filter.errors import BadFlagError

    result = invoke("score", data, "-o", tmp_path / "s.parquet", "--on-special-tokens", "strip")
    assert result.exit_code == 2 and "Traceback" not in result.output
    with pytest.raises(BadFlagError, match="on-special-tokens"):
        ScoreConfig(on_special_tokens="strip")
