"""End to end on the real embedded model (SmolLM2-135M-Instruct, float32, CPU) and real HH-RLHF data."""

import json
import math

import pytest
import torch

from ches_filter import prune_pairs, score_pairs
from ches_filter.cli import main
from ches_filter.config import PruneConfig
from ches_filter.formats import Columns, normalize_row

from conftest import read_hh

pytestmark = pytest.mark.slow

# CHES of the first three HH-RLHF harmless-base test pairs under the embedded
# model in float32, computed by the independent per-position loop below
# (AutoModelForCausalLM, output_hidden_states=True, one side at a time).
GOLDEN_CHES = [1053018.9022332027, -2246547.777351833, 947838.7315539323]


@pytest.fixture(scope="module")
def hh20():
    """The first 20 scorable HH pairs (several length-sorted batches at 8,192 tokens)."""
    rows = [r for r in read_hh(30)]
    ok = [r for r in rows if normalize_row(r, "implicit_text", Columns()).status == "ok"]
    assert len(ok) >= 20
    return ok[:20]


@pytest.fixture(scope="module")
def scores20(hh20, embedded):
    return score_pairs(hh20, model=embedded, max_batch_tokens=8192, progress=False)


def _rel(a, b):
    return abs(a - b) / max(abs(b), 1e-12)


def _vector_rel(a, b):
    """max |a - b| / max |b| over a set of scores.

    Per-element relative error is ill-conditioned for a score near zero: it is
    a difference of two terms thousands of times larger, so float32 noise in
    the hidden states (different padding, different kernel blocking) shows
    up as a large relative error on that one element. Errors are measured
    against the scale of the scores instead.
    """
    return max(abs(x - y) for x, y in zip(a, b)) / max(abs(y) for y in b)


def test_reference_loop_matches_golden_and_definition(embedded):
    """The golden values follow the token layout, via the full LM's hidden_states[-1]."""
    from transformers import AutoModelForCausalLM

    from ches_filter.batching import PairEncoder
    from ches_filter.model import cached_gguf_checkpoint, default_model_path

    full = AutoModelForCausalLM.from_pretrained(cached_gguf_checkpoint(default_model_path())[0], dtype=torch.float32)
    encoder = PairEncoder(embedded.tokenizer)
    for row, golden in zip(read_hh(3), GOLDEN_CHES):
        enc = encoder.encode(normalize_row(row, "implicit_text", Columns()))
        sums = []
        for resp in (enc.chosen, enc.rejected):
            ids = torch.tensor([list(enc.prompt) + list(resp)])
            with torch.no_grad():
                hidden = full(ids, output_hidden_states=True).hidden_states[-1][0]
            p = len(enc.prompt)
            sums.append(sum(hidden[p - 1 + k].double() for k in range(len(resp))))
        value = float(sums[0] @ sums[1] - sums[0] @ sums[0])
        assert _rel(value, golden) < 1e-4


def test_scores_match_golden_values(scores20):
    got = scores20.column("ches").to_pylist()[:3]
    for value, golden in zip(got, GOLDEN_CHES):
        assert _rel(value, golden) < 1e-4


def test_batched_equals_one_at_a_time(hh20, embedded, scores20):
    single = score_pairs(hh20, model=embedded, max_batch_size=1, progress=False)  # ~7 s
    for name in ("ches", "ln_ches"):
        assert _vector_rel(scores20.column(name).to_pylist(), single.column(name).to_pylist()) <= 1e-4
    assert scores20.column("status").to_pylist() == ["ok"] * 20


def test_plain_engine_equals_packed(hh20, embedded, scores20):
    plain = score_pairs(hh20[:12], model=embedded, engine="plain", progress=False)
    for name in ("ches", "ln_ches"):
        assert _vector_rel(plain.column(name).to_pylist(), scores20.column(name).to_pylist()[:12]) <= 1e-4


def test_hh_raw_and_explicit_conversational_score_identically(hh20, embedded, scores20):
    explicit = []
    for row in hh20[:6]:
        pair = normalize_row(row, "implicit_text", Columns())
        explicit.append(
            {
                "prompt": [dict(m) for m in pair.prompt_messages],
                "chosen": [{"role": "assistant", "content": pair.chosen}],
                "rejected": pair.rejected,
            }
        )
    table = score_pairs(explicit, model=embedded, max_batch_tokens=8192, progress=False)
    raw = score_pairs(hh20[:6], model=embedded, max_batch_tokens=8192, progress=False)
    assert json.loads(table.schema.metadata[b"ches_filter"])["input_format"] == "explicit_conversational"
    # Same token ids, same batches: bit-for-bit the same scores.
    for name in ("ches", "ln_ches", "prompt_tokens", "chosen_tokens", "rejected_tokens", "status"):
        assert table.column(name).to_pylist() == raw.column(name).to_pylist()


def test_output_metadata_and_columns(scores20):
    meta = json.loads(scores20.schema.metadata[b"ches_filter"])
    assert scores20.column_names == [
        "row_index", "ches", "ln_ches", "prompt_tokens", "chosen_tokens", "rejected_tokens", "status",
    ]
    assert meta["model"]["model"].startswith("embedded:") and len(meta["model"]["gguf_sha256"]) == 64
    assert meta["model"]["dtype"] == "float32" and meta["input_format"] == "implicit_text"
    assert meta["model"]["chat_template_sha256"] and meta["counts"] == {"ok": 20}
    assert all(math.isfinite(v) for v in scores20.column("ln_ches").to_pylist())


def test_statuses_for_unscorable_rows(embedded):
    rows = read_hh(3)
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant:", "rejected": "\n\nHuman: hi\n\nAssistant: hello"})
    rows.append({"chosen": "\n\nHuman: hi\n\nAssistant: same", "rejected": "\n\nHuman: hi\n\nAssistant: same"})
    rows.append({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"})
    rows.append({"chosen": "\n\nHuman: " + "long " * 1200 + "\n\nAssistant: x", "rejected": "\n\nHuman: " + "long " * 1200 + "\n\nAssistant: y"})
    table = score_pairs(rows, model=embedded, max_length=1000, progress=False)
    status = table.column("status").to_pylist()
    assert status == ["ok", "ok", "ok", "empty_chosen", "identical_responses", "prompt_mismatch", "too_long"]
    assert table.column("ches").to_pylist()[4] == 0.0
    assert table.column("ches").to_pylist()[3] is None
    assert table.column("row_index").to_pylist() == list(range(7))


def test_prune_cli_output_loads_in_datasets_and_keeps_lowest(tmp_path, hh20, scores20):
    import datasets

    from ches_filter.scorefile import write_table
    from click.testing import CliRunner

    data = tmp_path / "hh20.jsonl"
    data.write_text("".join(json.dumps(dict(r, extra=i)) + "\n" for i, r in enumerate(hh20)))
    scores = tmp_path / "scores.parquet"
    meta = json.loads(scores20.schema.metadata[b"ches_filter"])
    write_table(scores20, str(scores), metadata=meta)
    out = tmp_path / "pruned.parquet"
    result = CliRunner().invoke(
        main, ["prune", str(data), "--keep", "0.9", "--scores", str(scores), "-o", str(out), "--rejects", str(tmp_path / "rej.jsonl")]
    )
    assert result.exit_code == 0, result.output
    assert "kept:     18" in result.output and "threshold: ln_ches <=" in result.output
    pruned = datasets.load_dataset("parquet", data_files=str(out), split="train")
    assert pruned.column_names == ["chosen", "rejected", "extra"]
    ln = scores20.column("ln_ches").to_pylist()
    lowest = sorted(range(20), key=lambda i: (ln[i], i))[:18]
    assert pruned["extra"] == sorted(lowest)
    assert pruned["chosen"] == [hh20[i]["chosen"] for i in sorted(lowest)]
    rejects = [json.loads(line) for line in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert sorted(r["extra"] for r in rejects) == sorted(set(range(20)) - set(lowest))
    assert {r["ches_filter_reason"] for r in rejects} == {"high_score"}


def test_scores_for_another_input_are_refused(tmp_path, hh20, scores20):
    from click.testing import CliRunner

    from ches_filter.scorefile import write_table

    data = tmp_path / "other.jsonl"
    rows = [dict(r) for r in hh20]
    rows[5]["rejected"] += " (edited)"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = tmp_path / "scores.parquet"
    write_table(scores20, str(scores), metadata=json.loads(scores20.schema.metadata[b"ches_filter"]))
    result = CliRunner().invoke(main, ["prune", str(data), "--keep", "0.9", "--scores", str(scores), "-o", str(tmp_path / "o.jsonl")])
    assert result.exit_code == 1 and "does not belong" in result.output


def test_prune_api_scores_itself(hh20, embedded, caplog):
    with caplog.at_level("INFO", logger="ches_filter"):
        result = prune_pairs(hh20[:8], PruneConfig(keep=0.5, add_scores=True), model=embedded)
    # The input is read and its layout settled once, not again for scoring.
    assert sum("layout implicit_text" in r.getMessage() for r in caplog.records) == 1
    assert len(result.kept) == 4 and "ln_ches" in result.kept.column_names
    assert max(result.kept["ln_ches"]) <= min(result.rejects["ln_ches"])
