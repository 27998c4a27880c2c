"""Hostile ``--model`` values, cache directories and special-token text (issue 10, items 6, 9, 11, 12).

Every refusal is checked through the CLI: the exit code, exactly one ``Error:``
line, no traceback, and nothing written (no output, no work directory, no
cache entry).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import traceback

import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

from ches_filter.cli import main

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


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def invoke(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=True, env=env)


def assert_refused(result, code, *needles, out=None):
    """Exit ``code`` with one ``Error:`` line holding every needle, no traceback, no output written."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail("uncaught " + "".join(traceback.format_exception(result.exception)))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    if out is not None:
        assert not os.path.lexists(out), "a refused run wrote its output"
        assert not os.path.lexists(str(out) + ".parts"), "a refused run left a work directory"
    return errors[0]


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)


# --------------------------------------------------------------------------
# Item 12: a model path that does not exist
# --------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    "../m/does_not_exist.gguf", "./nope", "~/no-such-ches-model-dir", "a/b/c", "gone.safetensors",
    "weights.bin", "/no/such/model", "C:\\models\\x",
])
@pytest.mark.parametrize("command", ["score", "prune", "displacement"])
def test_a_missing_model_path_is_named_as_missing(tmp_path, data, model, command):
    out = tmp_path / ("s.parquet" if command != "prune" else "p.jsonl")
    extra = ["--keep", "0.5"] if command == "prune" else []
    result = invoke(command, data, "-o", out, "--model", model, "-q", *extra)
    line = assert_refused(result, 1, model, "no such file or directory", out=out)
    assert "Repo id" not in line


def test_hub_ids_are_not_taken_for_paths():
    from ches_filter.model import looks_like_path

    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/model.v2", "Qwen/Qwen2.5-0.5B"):
        assert not looks_like_path(hub_id), hub_id
    for path in ("./m", "../m/x", "~/m", "/abs", "a/b/c", "x.gguf", "x.SAFETENSORS", "w\\x"):
        assert looks_like_path(path), path


# --------------------------------------------------------------------------
# Item 11: a directory without tokenizer or weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize("files, missing, found", [
    ({}, ["config.json", "weights", "tokenizer"], "it is empty"),
    ({"config.json": "{}"}, ["weights", "tokenizer"], "it holds config.json"),
    ({"config.json": "{}", "tokenizer.json": "{}", "notes.txt": "x"}, ["weights"], "config.json, notes.txt, tokenizer.json"),
    ({"model.safetensors": "", "README.md": "x"}, ["config.json", "tokenizer"], "README.md, model.safetensors"),
])
def test_a_bare_model_directory_lists_what_it_holds(tmp_path, data, files, missing, found):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    out = tmp_path / "s.parquet"
    line = assert_refused(invoke("score", data, "-o", out, "--model", model, "-q"), 1, str(model), found, out=out)
    for what in missing:
        assert what in line
    assert "sentencepiece" not in line and "tiktoken" not in line


# --------------------------------------------------------------------------
# Item 6 (directory form): corrupt or truncated files of a from_pretrained directory
# --------------------------------------------------------------------------


def _cut(path, size):
    with open(path, "r+b") as handle:
        handle.truncate(size)


@pytest.mark.parametrize("damage, needle", [
    (lambda m: _cut(m / "model.safetensors", 5000), "model.safetensors is corrupt or truncated"),
    (lambda m: _cut(m / "model.safetensors", 3), "model.safetensors is corrupt or truncated"),
    (lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors is corrupt or truncated"),
    (lambda m: _cut(m / "config.json", 40), "config.json is corrupt or truncated"),
    (lambda m: _cut(m / "tokenizer.json", 1000), "tokenizer.json is corrupt or truncated"),
    (lambda m: (m / "tokenizer_config.json").write_text(""), "tokenizer_config.json is corrupt or truncated"),
])
def test_a_corrupt_model_directory_is_one_sentence(tmp_path, data, tiny_model_dir, damage, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    out = tmp_path / "s.parquet"
    assert_refused(invoke("score", data, "-o", out, "--model", model, "-q"), 1, str(model), needle, out=out)


def test_a_file_that_is_not_a_gguf_nor_a_directory(tmp_path, data, tiny_model_dir):
    out = tmp_path / "s.parquet"
    weights = tiny_model_dir / "model.safetensors"
    assert_refused(invoke("score", data, "-o", out, "--model", weights, "-q"), 1, "is a file but not a .gguf", out=out)


# --------------------------------------------------------------------------
# Item 6: files named .gguf that are not (whole) GGUF files
# --------------------------------------------------------------------------


def _real_gguf():
    from ches_filter.model import default_model_path

    return default_model_path()


def _cache_entries(cache):
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


@pytest.mark.parametrize("content, needle", [
    (b"hello, I am a text file\n", "is not a GGUF file (it starts with b'hell'"),
    (b"", "it is empty"),
    (b"GG", "not a GGUF file"),
])
def test_a_text_file_named_gguf(tmp_path, data, content, needle):
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    out, cache = tmp_path / "s.parquet", tmp_path / "cache"
    assert_refused(invoke("score", data, "-o", out, "--model", model, "-q", env={"CHES_FILTER_CACHE": str(cache)}),
                   1, str(model), needle, out=out)
    assert _cache_entries(cache) == []


def test_a_gguf_cut_inside_its_header(tmp_path, data):
    model = tmp_path / "cut.gguf"
    with open(_real_gguf(), "rb") as handle:
        model.write_bytes(handle.read(3000))
    out, cache = tmp_path / "s.parquet", tmp_path / "cache"
    line = assert_refused(invoke("score", data, "-o", out, "--model", model, "-q", env={"CHES_FILTER_CACHE": str(cache)}),
                          1, str(model), "cut short or corrupt", "cannot read its 3,000 bytes", out=out)
    assert "download or copy the file again" in line
    assert _cache_entries(cache) == [], "a failed conversion left something in the cache"


@pytest.mark.slow
def test_a_gguf_cut_inside_its_tensors(tmp_path, data):
    real = _real_gguf()
    model = tmp_path / "cut.gguf"
    with open(real, "rb") as handle:
        model.write_bytes(handle.read(5_000_000))
    out, cache = tmp_path / "s.parquet", tmp_path / "cache"
    assert_refused(invoke("score", data, "-o", out, "--model", model, "-q", env={"CHES_FILTER_CACHE": str(cache)}),
                   1, str(model), "cut short or corrupt", "cannot read its 5,000,000 bytes", out=out)
    assert _cache_entries(cache) == [], "a failed conversion left something in the cache"


@pytest.mark.slow
def test_the_whole_gguf_passes_the_check():
    from ches_filter.model import gguf_problem

    assert gguf_problem(_real_gguf()) is None


# --------------------------------------------------------------------------
# Item 9: CHES_FILTER_CACHE that cannot hold the cache
# --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_a_cache_that_is_a_file_is_refused_at_once(tmp_path, data, where):
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a directory")
    cache = blocker if where == "file" else blocker / "sub"
    out = tmp_path / "s.parquet"
    for model in (None, str(_real_gguf())):
        args = ["score", data, "-o", out, "-q"] + (["--model", model] if model else [])
        assert_refused(invoke(*args, env={"CHES_FILTER_CACHE": str(cache)}), 2, "CHES_FILTER_CACHE", str(cache), out=out)
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow  # reaches the embedded model's cache check (the fast-tier guard stops any real-GGUF path)
def test_a_cache_that_cannot_be_created_is_refused_before_converting(tmp_path, data):
    # /proc refuses every mkdir, even for root (a chmod'ed directory would not stop root).
    cache = "/proc/self/ches-filter-cache"
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    out = tmp_path / "s.parquet"
    assert_refused(invoke("score", data, "-o", out, "-q", env={"CHES_FILTER_CACHE": cache}), 2, "CHES_FILTER_CACHE", out=out)


def test_the_cache_is_not_needed_for_a_directory_model(tmp_path, data, tiny_model_dir):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    out = tmp_path / "s.parquet"
    result = invoke("score", data, "-o", out, "--model", tiny_model_dir, "-q", env={"CHES_FILTER_CACHE": str(blocker)})
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_a_corrupt_cache_entry_is_converted_again(tmp_path, caplog):
    """A cut-short cached conversion is detected, moved aside and redone; no temporaries survive."""
    import socket

    from ches_filter.model import cache_root, cached_gguf_checkpoint, checkpoint_problem

    gguf = _real_gguf()
    good, _ = cached_gguf_checkpoint(gguf)  # the shared cache (converted once per machine)
    cache = tmp_path / "cache"
    target = cache / "models" / good.name
    shutil.copytree(good, target)
    _cut(target / "model.safetensors", 1 << 20)
    stale = cache / "models" / f".{good.name}.tmp-{socket.gethostname()}-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    os.environ["CHES_FILTER_CACHE"] = str(cache)
    try:
        assert cache_root() == cache
        with caplog.at_level(logging.WARNING, logger="ches_filter"):
            again, _ = cached_gguf_checkpoint(gguf)
    finally:
        del os.environ["CHES_FILTER_CACHE"]
    assert again == target
    assert checkpoint_problem(target) is None
    assert any("unusable" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    assert _cache_entries(cache) == [good.name], "a temporary or corrupt copy was left in the cache"


# --------------------------------------------------------------------------
# Special tokens in the text
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from ches_filter.model import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


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
