"""Behaviour no other test reached, on tiny random models (fast tier).

* ``non_finite``: a pair whose hidden states are NaN/inf gets that status; the others are untouched.
* ``missing_score``: an ``ok`` row without a score is dropped for that reason (or kept with ``--keep-unscored``).
* Engine strategy choice: ``auto`` falls back to ``plain`` (and says so) when packed is not exact;
  ``--engine packed/prefix`` is refused, in one line, where it cannot be exact.
* Out-of-memory: batches planned before the budget shrank are re-split before they are tried.
* The page releaser unmaps the dataset's mapped pages and the data reads back the same.
* ``prune`` and ``report`` on score files without the CHES columns.
"""

from __future__ import annotations

import collections
import json
import math
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from click.testing import CliRunner

from ches_filter.batching import EncodedPair, PairEncoder
from ches_filter.cli import main
from ches_filter.config import PruneConfig, ScoreConfig
from ches_filter.engine import Engine
from ches_filter.errors import BadDataError, BadFlagError
from ches_filter.formats import Columns, normalize_row
from ches_filter.api import score_pairs
from ches_filter.scoring import table_metadata
from ches_filter.select import select_rows

from conftest import tiny_llama

ALL_MEASURES = "ches,ln_ches,last_hidden_ip,edit_distance"

ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5, I believe."},
    {"prompt": "Describe a zebra.", "chosen": "Striped, like a barcode.", "rejected": "Purple."},
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Hello, friend, how are you today?"},
    {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Blue"},  # identical responses
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "3, 2, 1."},
]


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def error_lines(result):
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    from ches_filter.model import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


# --------------------------------------------------------------------------
# non_finite
# --------------------------------------------------------------------------


def _poison_token(tokenizer, rows, index):
    """A token id in row ``index``'s prompt that no other row contains."""
    encoder = PairEncoder(tokenizer)
    encoded = [encoder.encode(normalize_row(r, "explicit_text", Columns())) for r in rows]
    others = {t for i, e in enumerate(encoded) if i != index for t in e.prompt + e.chosen + e.rejected}
    unique = [t for t in encoded[index].prompt if t not in others]
    assert unique, "the test rows need a token of their own"
    return unique[0]


@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
@pytest.mark.parametrize("engine", ["packed", "plain"])
def test_non_finite_states_mark_only_their_row(tiny, engine, value, tmp_path):
    """NaN/inf embeddings for one prompt token poison that pair's states; the others score as without it."""
    from ches_filter.run import score_to_file

    config = ScoreConfig(measures=ALL_MEASURES, engine=engine, max_batch_tokens=100_000, quiet=True)
    clean = score_pairs(ROWS, config, model=tiny)
    poison = _poison_token(tiny.tokenizer, ROWS, 1)

    def hook(module, inputs, output):
        return output.masked_fill(inputs[0].eq(poison).unsqueeze(-1), value)

    handle = tiny.decoder.get_input_embeddings().register_forward_hook(hook)
    try:
        table = score_pairs(ROWS, config, model=tiny)
        out = tmp_path / "scores.parquet"
        score_to_file(ROWS, str(out), config, model=tiny)
    finally:
        handle.remove()
    assert clean.column("status").to_pylist() == ["ok", "ok", "ok", "identical_responses", "ok"]
    assert table.column("status").to_pylist() == ["ok", "non_finite", "ok", "identical_responses", "ok"]
    for name in ALL_MEASURES.split(","):
        got, want = table.column(name).to_pylist(), clean.column(name).to_pylist()
        assert got[1] is None, name
        assert got[:1] + got[2:] == want[:1] + want[2:], name  # same batch, same bits
    for name in ("prompt_tokens", "chosen_tokens", "rejected_tokens"):
        assert table.column(name).to_pylist() == clean.column(name).to_pylist()
    assert table_metadata(table)["counts"] == {"identical_responses": 1, "non_finite": 1, "ok": 3}
    # The resumable file pipeline (what `score` runs) agrees, counts included.
    on_disk = pq.read_table(out)
    assert on_disk.select(table.column_names).equals(table.select(table.column_names))
    assert table_metadata(on_disk)["counts"] == {"identical_responses": 1, "non_finite": 1, "ok": 3}


# --------------------------------------------------------------------------
# missing_score
# --------------------------------------------------------------------------


def _scores(values, status=None):
    n = len(values)
    return pa.table({
        "row_index": pa.array(range(n), pa.int64()),
        "ln_ches": pa.array(values, pa.float64()),
        "status": pa.array(status or ["ok"] * n, pa.string()),
    })


def test_ok_row_without_a_score_is_dropped_as_missing_score():
    table = _scores([0.3, None, 0.1, 0.2], ["ok", "ok", "ok", "too_long"])
    selection = select_rows(table, PruneConfig(keep=1.0))
    assert selection.keep == [True, False, True, False]
    assert selection.reason == [None, "missing_score", None, "too_long"]
    assert selection.counts == {"missing_score": 1, "too_long": 1}
    assert selection.n_ok == 2  # an ok row without a score is not counted as scored
    assert selection.threshold == 0.3
    # --keep is a fraction of the scored rows: 0.5 of 2 keeps 1 (the lowest).
    half = select_rows(table, PruneConfig(keep=0.5))
    assert half.keep == [False, False, True, False] and half.reason[1] == "missing_score"
    kept = select_rows(table, PruneConfig(keep=0.5, keep_unscored=True))
    assert kept.keep == [False, True, True, True] and kept.reason == ["high_score", None, None, None]


def test_prune_cli_reports_missing_score(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    scores = tmp_path / "s.parquet"
    assert invoke("score", data, "-o", scores, "--model", tiny_model_dir, "-q").exit_code == 0
    table = pq.read_table(scores)
    assert table.column("status").to_pylist()[2] == "ok"
    ln = table.column("ln_ches").to_pylist()
    ln[2] = None  # an ok row whose score went missing (an edited or half-written file)
    edited = table.set_column(table.column_names.index("ln_ches"), "ln_ches", pa.array(ln, pa.float64()))
    pq.write_table(edited.replace_schema_metadata(table.schema.metadata), scores)

    kept, rejects = tmp_path / "kept.jsonl", tmp_path / "rejects.jsonl"
    result = invoke("prune", data, "--scores", scores, "--keep", 1.0, "-o", kept, "--rejects", rejects, "-q")
    assert result.exit_code == 0, result.output
    assert "scored:   3" in result.output and "missing_score 1" in result.output
    dropped = [json.loads(line) for line in rejects.read_text().splitlines()]
    assert {r["prompt"]: r["ches_filter_reason"] for r in dropped} == {
        ROWS[2]["prompt"]: "missing_score", ROWS[3]["prompt"]: "identical_responses",
    }
    assert [json.loads(line)["prompt"] for line in kept.read_text().splitlines()] == [ROWS[i]["prompt"] for i in (0, 1, 4)]
    result = invoke("prune", data, "--scores", scores, "--keep", 1.0, "--keep-unscored", "-o", kept, "--overwrite", "-q")
    assert result.exit_code == 0, result.output
    assert len(kept.read_text().splitlines()) == len(ROWS)


# --------------------------------------------------------------------------
# Strategy choice: the packed fallback and the refusals
# --------------------------------------------------------------------------


class MaskBlind(torch.nn.Module):
    """A decoder whose attention ignores the mask it is given (plain causal attention).

    Stands for the models the self-check exists for: attention code that
    drops a custom 4D mask. Right-padded plain batches stay exact (a token
    never attends to later padding); tree-masked rows do not.
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        return self.inner(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=use_cache)


class NoCacheArgument(torch.nn.Module):
    """A decoder whose forward takes no KV-cache argument."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def pairs_of(n, seed, prompt=(3, 12), response=(1, 8)):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return tuple(torch.randint(4, 256, (length,), generator=g).tolist())

    return [EncodedPair(ids(*prompt), ids(*response) + (2,), ids(*response) + (2,)) for _ in range(n)]


def test_auto_falls_back_to_plain_when_the_self_check_fails(caplog):
    model = tiny_llama()
    blind = MaskBlind(model)
    with caplog.at_level("WARNING", logger="ches_filter"):
        engine = Engine(blind, "cpu", strategy="auto")
    assert engine.strategy == "plain"
    assert "packed strategy disagrees with the plain one" in caplog.text and "scoring with the plain strategy" in caplog.text
    # Plain on the mask-blind model is still right: it equals plain on the real one.
    pairs = pairs_of(6, seed=3)
    got = engine.run(pairs)
    want = Engine(model, "cpu", strategy="plain").run(pairs)
    for name in ("s_chosen", "s_rejected", "last_chosen", "last_rejected"):
        assert torch.allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6), name
    # ... and the packed rows really would have been wrong: the self-check refused for a reason.
    assert Engine(model, "cpu", strategy="packed")._self_check_error("packed") < 1e-4
    assert engine._self_check_error("packed") > 1e-2


def test_prefix_is_refused_when_it_disagrees_with_plain():
    with pytest.raises(BadFlagError, match="prefix strategy disagrees"):
        Engine(MaskBlind(tiny_llama()), "cpu", strategy="prefix")
    assert Engine(tiny_llama(), "cpu", strategy="prefix").strategy == "prefix"


def test_prefix_is_refused_without_a_cache_argument():
    with pytest.raises(BadFlagError, match="`--engine prefix`.*no KV cache argument"):
        Engine(NoCacheArgument(tiny_llama()), "cpu", strategy="prefix")
    # packed needs no cache, so `auto` still finds it exact.
    assert Engine(NoCacheArgument(tiny_llama()), "cpu", strategy="auto").strategy == "packed"


@pytest.fixture(scope="module")
def bidirectional_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny Gemma-3 with bidirectional attention (as EmbeddingGemma): packed and prefix cannot be exact."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = embedded_tokenizer
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, sliding_window=8,
        use_bidirectional_attention=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("bidirectional")
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["score", "prune"])
@pytest.mark.parametrize("engine", ["packed", "prefix"])
def test_cli_refuses_an_engine_that_cannot_be_exact_in_one_line(tmp_path, bidirectional_model_dir, command, engine):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    out = tmp_path / ("s.parquet" if command == "score" else "kept.jsonl")
    extra = ["--keep", "0.5"] if command == "prune" else []
    result = invoke(command, data, "-o", out, "--model", bidirectional_model_dir, "--engine", engine, "-q", *extra)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    errors = error_lines(result)
    assert len(errors) == 1 and f"`--engine {engine}`" in errors[0] and "bidirectional" in errors[0], result.output
    assert "`--engine auto`" in errors[0] or "`--engine plain`" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written, no work dir left


def test_cli_auto_scores_such_a_model_with_plain_and_says_so(tmp_path, bidirectional_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    auto, plain = tmp_path / "auto.parquet", tmp_path / "plain.parquet"
    result = invoke("score", data, "-o", auto, "--model", bidirectional_model_dir, "-q")
    assert result.exit_code == 0, result.output
    assert "plain strategy" in result.output and "bidirectional" in result.output
    assert invoke("score", data, "-o", plain, "--model", bidirectional_model_dir, "--engine", "plain", "-q").exit_code == 0
    a, p = pq.read_table(auto), pq.read_table(plain)
    assert table_metadata(a)["engine"] == "plain"
    assert a.column("ches").to_pylist() == p.column("ches").to_pylist()


# --------------------------------------------------------------------------
# OOM: queued batches are re-split
# --------------------------------------------------------------------------


@pytest.mark.parametrize("workers", [1, 2])
def test_oom_resplits_the_queued_batches(caplog, workers):
    """Batches of 8 are planned; any batch over 4 pairs runs out of memory.

    After the first failure the budget halves: the failed batch is retried
    as two halves and every batch still queued is cut to the new budget
    before it is tried, so (with one worker) exactly one forward pass fails.
    """
    model = tiny_llama()
    pairs = pairs_of(24, seed=11, prompt=(10, 10), response=(4, 4))
    cost = pairs[0].packed_length
    assert all(p.packed_length == cost for p in pairs)
    expected = Engine(model, "cpu", strategy="packed", max_batch_tokens=100_000, workers=1).run(pairs)
    engine = Engine(model, "cpu", strategy="packed", max_batch_tokens=8 * cost, workers=workers)
    real_forward = engine._forward
    tried, failed, scored = [], [], collections.Counter()

    def forward(batch):
        tried.append(len(batch))
        if len(batch) > 4:
            failed.append(len(batch))
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (injected)")
        result = real_forward(batch)
        scored.update(p.prompt for p in batch)
        return result

    engine._forward = forward
    with caplog.at_level("WARNING", logger="ches_filter"):
        got = engine.run(pairs)
    assert failed and set(failed) == {8}
    if workers == 1:
        assert tried == [8] + [4] * 6  # one failure, then only re-split batches
        assert engine.max_batch_tokens == 4 * cost
    else:
        assert len(failed) <= workers  # only batches already in flight can fail
    assert max(t for t in tried if t not in failed) <= 4
    assert scored == collections.Counter(p.prompt for p in pairs)  # every pair exactly once
    assert caplog.text.count("out of memory on 8 pairs") == len(failed)
    for name in ("s_chosen", "s_rejected", "last_chosen", "last_rejected"):
        assert torch.allclose(getattr(got, name), getattr(expected, name), rtol=1e-6, atol=1e-6), name


# --------------------------------------------------------------------------
# The page releaser
# --------------------------------------------------------------------------


def _mapped(files):
    """``[(start, stop, rss_kb)]`` of this process's mappings of ``files`` (from /proc/self/smaps)."""
    out = []
    current = None
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as handle:
        for line in handle:
            fields = line.split(maxsplit=5)
            if fields and re.fullmatch(r"[0-9a-f]+-[0-9a-f]+", fields[0]):
                current = None
                if len(fields) == 6 and fields[5].strip() in files:
                    start, stop = (int(x, 16) for x in fields[0].split("-"))
                    current = [start, stop, 0]
                    out.append(current)
            elif current is not None and fields[0] == "Rss:":
                current[2] = int(fields[1])
    return [tuple(m) for m in out]


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="the page releaser acts on Linux only")
def test_page_releaser_unmaps_the_dataset_pages_and_the_data_reads_back(tmp_path):
    import datasets

    from ches_filter.inputs import PageReleaser

    rows = {"text": [f"{i:06d} " + "lorem ipsum " * 80 for i in range(6000)]}  # ~6 MB of Arrow
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ds"))
    ds = datasets.load_from_disk(str(tmp_path / "ds"))
    files = {os.path.realpath(f["filename"]) for f in ds.cache_files}
    assert files
    before = ds[:]["text"]  # touches every page of the mapping
    assert before == rows["text"]
    mapped = _mapped(files)
    assert mapped and sum(rss for *_, rss in mapped) > 1024, mapped  # over 1 MB resident

    release = PageReleaser(ds)
    assert release.files == files and release.madvise is not None
    calls = []
    real = release.madvise

    def spy(start, length, advice):
        result = real(start, length, advice)
        calls.append((start, length, advice, result))
        return result

    release.madvise = spy
    release()
    assert sorted((start, start + length) for start, length, *_ in calls) == sorted((a, b) for a, b, _ in mapped)
    assert all(advice == 4 and result == 0 for *_, advice, result in calls)  # MADV_DONTNEED, and it succeeded
    after = _mapped(files)
    assert sum(rss for *_, rss in after) < sum(rss for *_, rss in mapped) / 4, (mapped, after)
    assert ds[:]["text"] == rows["text"]  # faulted back in from the file, unchanged

    in_memory = datasets.Dataset.from_dict({"text": ["a"]})
    idle = PageReleaser(in_memory)
    assert idle.files == set() and idle.madvise is None
    idle()  # nothing to release, no error


# --------------------------------------------------------------------------
# prune and report on score files without the CHES columns
# --------------------------------------------------------------------------


def _choices(command, option):
    """The values the CLI accepts for ``command --option``."""
    for param in main.commands[command].params:
        if param.name == option:
            return list(param.type.choices)
    raise AssertionError(f"{command} has no --{option}")


@pytest.fixture(scope="module")
def scored_without_ches(tmp_path_factory, tiny_model_dir):
    """A score file made with `--measures last_hidden_ip,edit_distance`, and its input."""
    folder = tmp_path_factory.mktemp("no-ches")
    data = write_jsonl(folder / "d.jsonl", ROWS)
    scores = folder / "s.parquet"
    result = invoke("score", data, "-o", scores, "--model", tiny_model_dir, "--measures", "last_hidden_ip,edit_distance", "-q")
    assert result.exit_code == 0, result.output
    assert not {"ches", "ln_ches"} & set(pq.read_table(scores).column_names)
    return data, scores


@pytest.mark.parametrize("by", ["ln_ches", "ches"])
def test_prune_on_scores_without_the_measure_is_one_clear_error(tmp_path, scored_without_ches, by):
    data, scores = scored_without_ches
    out = tmp_path / "kept.jsonl"
    result = invoke("prune", data, "--scores", scores, "--keep", 0.5, "--by", by, "-o", out, "-q")
    assert result.exit_code == 1, result.output
    errors = error_lines(result)
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert f"--by {by}" in errors[0] and "last_hidden_ip" in errors[0] and "edit_distance" in errors[0]
    assert "--measures" in errors[0]  # how to fix: rescore with the measure
    assert not out.exists()


def test_prune_refuses_to_rank_by_a_measure_it_is_told_not_to_compute(tmp_path, tiny_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    result = invoke("prune", data, "--keep", 0.5, "--measures", "last_hidden_ip,edit_distance", "--model", tiny_model_dir,
                    "-o", tmp_path / "kept.jsonl", "-q")
    assert result.exit_code == 2, result.output
    errors = error_lines(result)
    assert len(errors) == 1 and "--by ln_ches" in errors[0] and "--measures" in errors[0], result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]


def test_select_rows_names_the_measures_a_table_has():
    table = pa.table({"row_index": [0, 1], "last_hidden_ip": [1.0, 2.0], "edit_distance": [0.5, 0.1], "status": ["ok", "ok"]})
    with pytest.raises(BadDataError, match=r"--by ln_ches.*last_hidden_ip, edit_distance"):
        select_rows(table, PruneConfig(keep=0.5))


def test_prune_by_each_measure_the_cli_offers_and_the_file_has(tmp_path, scored_without_ches):
    """Whatever `prune --by` accepts and the file holds ranks the rows (none today; all four after issue 11)."""
    data, scores = scored_without_ches
    table = pq.read_table(scores)
    for by in [m for m in _choices("prune", "by") if m in table.column_names]:
        out = tmp_path / f"kept-{by}.jsonl"
        result = invoke("prune", data, "--scores", scores, "--keep", 1.0, "--by", by, "-o", out, "-q")
        assert result.exit_code == 0, result.output
        assert len(out.read_text().splitlines()) == table.column("status").to_pylist().count("ok")


def test_report_on_scores_without_ches_says_what_is_missing_or_reports_what_is_there(tmp_path, scored_without_ches):
    pytest.importorskip("matplotlib")
    data, scores = scored_without_ches
    present = ["last_hidden_ip", "edit_distance"]
    result = invoke("report", scores, "-o", tmp_path / "r", "-q")
    if result.exit_code != 0:
        assert result.exit_code == 1, result.output
        errors = error_lines(result)
        assert len(errors) == 1 and "Traceback" not in result.output, result.output
        assert "ln_ches" in errors[0] and all(m in errors[0] for m in present)
        assert not (tmp_path / "r").exists()
        # Whatever fix the message suggests must be one the CLI accepts.
        suggested = re.findall(r"`--by (\w+)`", errors[0].split(";", 1)[-1])
        assert all(by in _choices("report", "by") for by in suggested), errors[0]
    for by in [m for m in _choices("report", "by") if m in present]:
        out = tmp_path / f"r-{by}"
        result = invoke("report", scores, "-o", out, "--by", by, "--data", data, "-q")
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "summary.json").read_text())
        assert summary["by"] == by and set(summary["measures"]) == set(present)


def test_report_on_scores_with_ches_only_reports_ches(tmp_path, tiny_model_dir):
    """A file with `ches` but not `ln_ches`: the default `--by ln_ches` points at `--by ches`, which works."""
    pytest.importorskip("matplotlib")
    data = write_jsonl(tmp_path / "d.jsonl", ROWS)
    scores = tmp_path / "s.parquet"
    assert invoke("score", data, "-o", scores, "--model", tiny_model_dir, "--measures", "ches,edit_distance", "-q").exit_code == 0
    result = invoke("report", scores, "-o", tmp_path / "r", "-q")
    assert result.exit_code == 1, result.output
    (error,) = error_lines(result)
    assert "ln_ches" in error and "`--by ches`" in error
    result = invoke("report", scores, "-o", tmp_path / "r", "--by", "ches", "--keep", 0.5, "-q")
    assert result.exit_code == 0, result.output
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    # Every measure gets prune thresholds, each in its risk direction (lower edit distance = riskier).
    assert set(summary["measures"]) == {"ches", "edit_distance"} and set(summary["thresholds"]) == {"ches", "edit_distance"}
    table = pq.read_table(scores)
    ok = [s == "ok" for s in table.column("status").to_pylist()]
    ches = [v for v, o in zip(table.column("ches").to_pylist(), ok) if o]
    n_keep = math.floor(0.5 * len(ches) + 0.5)
    assert summary["thresholds"]["ches"]["0.5"]["threshold"] == sorted(ches)[n_keep - 1]
    edit = [v for v, o in zip(table.column("edit_distance").to_pylist(), ok) if o]
    assert summary["thresholds"]["edit_distance"]["0.5"]["threshold"] == sorted(edit, reverse=True)[n_keep - 1]
