"""`--measures`: last_hidden_ip and edit_distance as score columns; `--layout` through `score`."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ches_filter.config import ScoreConfig
from ches_filter.errors import BadFlagError
from ches_filter.measures import (
    MEASURES, MeasureInput, compute_measures, last_hidden_ip, levenshtein, normalized_edit_distance, risk_key,
)
from ches_filter.api import score_pairs
from ches_filter.scoring import table_metadata


def reference_levenshtein(a, b):
    """The O(n m) dynamic programme, straight from the definition."""
    row = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        diagonal, row[0] = row[0], i
        for j, y in enumerate(b, 1):
            diagonal, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, diagonal + (x != y))
    return row[-1]


@settings(max_examples=400, deadline=None)
@given(st.lists(st.integers(0, 5), max_size=80), st.lists(st.integers(0, 5), max_size=80))
def test_levenshtein_matches_the_definition(a, b):
    assert levenshtein(a, b) == reference_levenshtein(a, b)
    assert levenshtein(b, a) == levenshtein(a, b)


def test_levenshtein_known_values():
    assert levenshtein("kitten", "sitting") == 3
    assert levenshtein([], [1, 2, 3]) == 3
    assert levenshtein([7] * 70, [7] * 65 + [8]) == 5  # longer than one 64-bit word
    assert normalized_edit_distance([1, 2, 3, 4], [1, 2, 3, 4]) == 0.0
    assert normalized_edit_distance([1, 2], [3, 4, 5, 6]) == 1.0
    assert normalized_edit_distance([1, 2, 3, 2], [1, 2, 9, 2]) == 0.25
    assert normalized_edit_distance([], []) == 0.0


def test_last_hidden_ip_is_the_row_inner_product():
    a = torch.randn(3, 5, dtype=torch.float32)
    b = torch.randn(3, 5, dtype=torch.float32)
    expected = torch.tensor([float(a[i].double() @ b[i].double()) for i in range(3)], dtype=torch.float64)
    assert torch.allclose(last_hidden_ip(a, b), expected)


def test_measures_config_is_a_canonical_string():
    assert ScoreConfig().measures == "ches,ln_ches"
    assert ScoreConfig(measures="edit_distance, ches").measure_list == ("ches", "edit_distance")
    assert ScoreConfig(measures=["last_hidden_ip", "ln_ches"]).measures == "ln_ches,last_hidden_ip"
    for bad in ("", "ches,nope", ","):
        with pytest.raises(BadFlagError, match="--measures"):
            ScoreConfig(measures=bad)
    with pytest.raises(BadFlagError, match="--layout"):
        ScoreConfig(layout="openrlhf")


ROWS = [
    {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5, I believe."},
    {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Blue"},  # identical responses
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Hello, friend, how are you today?"},
    {"prompt": "Empty?", "chosen": "", "rejected": "no"},
]


def test_all_measures_in_score_output(tiny_model_dir):
    from ches_filter.batching import PairEncoder
    from ches_filter.formats import Columns, normalize_row
    from ches_filter.model import load_model

    everything = score_pairs(ROWS, ScoreConfig(model=str(tiny_model_dir), measures="ches,ln_ches,last_hidden_ip,edit_distance", quiet=True))
    default = score_pairs(ROWS, ScoreConfig(model=str(tiny_model_dir), quiet=True))
    assert everything.column_names == ["row_index", "ches", "ln_ches", "last_hidden_ip", "edit_distance",
                                       "prompt_tokens", "chosen_tokens", "rejected_tokens", "status"]
    assert default.column_names == ["row_index", "ches", "ln_ches", "prompt_tokens", "chosen_tokens", "rejected_tokens", "status"]
    assert everything.column("ches").to_pylist() == default.column("ches").to_pylist()
    assert table_metadata(everything)["measures"] == ["ches", "ln_ches", "last_hidden_ip", "edit_distance"]
    status = everything.column("status").to_pylist()
    assert status == ["ok", "identical_responses", "ok", "empty_chosen"]

    # Independent reference: a plain forward of P + R; the last counted state sits at |P| + |R| - 2.
    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    encoder = PairEncoder(model.tokenizer)
    ip = everything.column("last_hidden_ip").to_pylist()
    edit = everything.column("edit_distance").to_pylist()
    for i in (0, 1, 2):
        enc = encoder.encode(normalize_row(ROWS[i], "explicit_text", Columns()))
        last = []
        for response in (enc.chosen, enc.rejected):
            with torch.no_grad():
                hidden = model.decoder(input_ids=torch.tensor([list(enc.prompt + response)])).last_hidden_state[0]
            last.append(hidden[len(enc.prompt) + len(response) - 2].double())
        assert ip[i] == pytest.approx(float(last[0] @ last[1]), rel=1e-4)
        assert edit[i] == reference_levenshtein(enc.chosen, enc.rejected) / max(len(enc.chosen), len(enc.rejected))
    assert edit[1] == 0.0 and everything.column("ches").to_pylist()[1] == 0.0
    assert ip[3] is None and edit[3] is None


def test_edit_distance_alone_needs_no_hidden_states(tiny_model_dir):
    table = score_pairs(ROWS, ScoreConfig(model=str(tiny_model_dir), measures="edit_distance", quiet=True))
    assert table.column_names[:2] == ["row_index", "edit_distance"]
    assert "ches" not in table.column_names
    assert table.column("edit_distance").to_pylist()[1] == 0.0


def test_layout_trl_through_score(tiny_model_dir):
    paper = score_pairs(ROWS[:1], ScoreConfig(model=str(tiny_model_dir), quiet=True))
    trl = score_pairs(ROWS[:1], ScoreConfig(model=str(tiny_model_dir), layout="trl", quiet=True))
    assert table_metadata(trl)["token_layout"] == "trl" and table_metadata(paper)["token_layout"] == "paper"
    # Text input under TRL's rules is tokenized as text, not through the chat template: a shorter prompt.
    assert trl.column("prompt_tokens")[0].as_py() < paper.column("prompt_tokens")[0].as_py()
    assert trl.column("ches")[0].as_py() != paper.column("ches")[0].as_py()


def test_cli_score_with_measures_and_layout(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from ches_filter.cli import main
    from ches_filter.scorefile import read_table

    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in ROWS))
    out = tmp_path / "s.parquet"
    result = CliRunner().invoke(main, ["score", str(source), "-o", str(out), "--model", str(tiny_model_dir),
                                       "--measures", "edit_distance,ches,last_hidden_ip", "--layout", "trl", "-q"])
    assert result.exit_code == 0, result.output
    table, meta = read_table(str(out))
    assert table.column_names[1:4] == ["ches", "last_hidden_ip", "edit_distance"]
    assert meta["token_layout"] == "trl"
    bad = CliRunner().invoke(main, ["score", str(source), "-o", str(tmp_path / "b.parquet"), "--measures", "cosine"])
    assert bad.exit_code == 2 and "--measures" in bad.output


def test_risk_direction():
    assert risk_key("ches", 2.0) > risk_key("ches", 1.0)
    assert risk_key("edit_distance", 0.1) > risk_key("edit_distance", 0.9)  # more similar = riskier
    assert [m for m in MEASURES.names() if not MEASURES.get(m).higher_is_riskier] == ["edit_distance"]


def test_every_measure_computes_from_states():
    import torch

    class States:
        s_chosen = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
        s_rejected = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
        last_chosen = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        last_rejected = torch.tensor([[2.0, 0.0], [1.0, -1.0]])

    x = MeasureInput(chosen=[(1, 2), (3,)], rejected=[(1, 2), (4, 5)], states=States())
    out = compute_measures(MEASURES.names(), x)
    assert out["ches"] == [0.0, -0.25]  # <S+, S- - S+>
    assert out["ln_ches"] == pytest.approx([0.0, 0.5 * (0.0 - 0.5)])  # m+ = (.5, 0), m- = (0, .5)
    assert out["last_hidden_ip"] == [2.0, 0.0]
    assert out["edit_distance"] == [0.0, 1.0]
