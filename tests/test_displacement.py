"""`ches-filter displacement`: D checked numerically, real DPO steps, measures, sampling, the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
from click.testing import CliRunner

from ches_filter.batching import EncodedPair
from ches_filter.cli import main
from ches_filter.config import DisplacementConfig, ScoreConfig
from ches_filter.displacement import PairProbe, displacement_summary, format_summary, measure_displacement
from ches_filter.errors import BadFlagError

from conftest import SHARED_DATA

PERSONA = SHARED_DATA / "persona-ends-justify-means.jsonl"


def tiny_lm(dtype=torch.float64, tie=True, seed=0):
    """A 2-layer random Llama causal LM, built in code (float64 for tight numerical checks)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=tie,
    )
    return LlamaForCausalLM(config).to(dtype).eval()


PROMPT, CHOSEN, REJECTED = (5, 6, 7, 8, 9, 17), (10, 11, 12, 2), (10, 13, 2)


def flat_grad(probe, prompt, response):
    grads = torch.autograd.grad(probe.side(prompt, response, grad=True).logp, probe.params)
    return torch.cat([g.reshape(-1) for g in grads])


def shifted_logp(probe, prompt, response, direction, eps):
    """log π(response) at θ + eps·direction (θ restored afterwards)."""
    offset = 0
    with torch.no_grad():
        for p in probe.params:
            p.add_(direction[offset : offset + p.numel()].view_as(p), alpha=eps)
            offset += p.numel()
    try:
        return float(probe.side(prompt, response, grad=False).logp)
    finally:
        offset = 0
        with torch.no_grad():
            for p in probe.params:
                p.sub_(direction[offset : offset + p.numel()].view_as(p), alpha=eps)
                offset += p.numel()


@pytest.mark.parametrize("tie", [True, False])
def test_first_order_equals_directional_derivative(tie):
    """D+ and D- equal the central finite difference of log π along the DPO direction g+ - g-."""
    probe = PairProbe(tiny_lm(tie=tie), "cpu")
    out = probe.first_order(PROMPT, CHOSEN, REJECTED)
    direction = flat_grad(probe, PROMPT, CHOSEN) - flat_grad(probe, PROMPT, REJECTED)

    def central(response, eps):
        return (shifted_logp(probe, PROMPT, response, direction, eps)
                - shifted_logp(probe, PROMPT, response, direction, -eps)) / (2 * eps)

    for response, key in ((CHOSEN, "first_order_dlogp_chosen"), (REJECTED, "first_order_dlogp_rejected")):
        # eps 1e-5: truncation (~eps²) and rounding (RMSNorm computes in float32) both stay below 1e-5.
        assert central(response, 1e-5) == pytest.approx(out[key], rel=2e-5)
        # The error of a central difference around the true derivative falls as eps²: 100x per 10x eps.
        ratio = abs(central(response, 1e-3) - out[key]) / abs(central(response, 1e-4) - out[key])
        assert 50 < ratio < 200
    assert out["first_order_dlogp_chosen"] == pytest.approx(out["grad_sq_norm_chosen"] - out["grad_inner"], rel=1e-12)
    assert out["first_order_dlogp_rejected"] == pytest.approx(out["grad_inner"] - out["grad_sq_norm_rejected"], rel=1e-12)


def test_gradient_reduction_matches_flat_vectors():
    probe = PairProbe(tiny_lm(), "cpu")
    gp, gm = flat_grad(probe, PROMPT, CHOSEN), flat_grad(probe, PROMPT, REJECTED)
    out = probe.first_order(PROMPT, CHOSEN, REJECTED)
    assert out["grad_sq_norm_chosen"] == pytest.approx(float(gp @ gp), rel=1e-12)
    assert out["grad_sq_norm_rejected"] == pytest.approx(float(gm @ gm), rel=1e-12)
    assert out["grad_inner"] == pytest.approx(float(gp @ gm), rel=1e-12)


def test_logp_sums_the_response_tokens():
    """log π(R|P) = sum over k of log softmax(logits at |P|-1+k)[R[k]], from a plain full forward."""
    lm = tiny_lm()
    probe = PairProbe(lm, "cpu")
    with torch.no_grad():
        logits = lm(input_ids=torch.tensor([list(PROMPT + CHOSEN)])).logits[0].log_softmax(-1)
    expected = sum(float(logits[len(PROMPT) - 1 + k, t]) for k, t in enumerate(CHOSEN))
    assert probe.first_order(PROMPT, CHOSEN, REJECTED)["logp_chosen"] == pytest.approx(expected, rel=1e-12)


def test_one_sgd_step_matches_the_first_order_prediction():
    """One real DPO step of lr changes log π(y±) by lr·β/2·D± up to O(lr²): the error shrinks 100x per 10x lr."""
    probe = PairProbe(tiny_lm(), "cpu")
    out = probe.first_order(PROMPT, CHOSEN, REJECTED)
    beta = 0.1
    errors = []
    for lr in (1e-2, 1e-3):
        step = probe.dpo_steps(PROMPT, CHOSEN, REJECTED, steps=1, lr=lr, beta=beta)
        for side in ("chosen", "rejected"):
            predicted = lr * beta / 2 * out[f"first_order_dlogp_{side}"]
            assert step[f"dlogp_{side}"] == pytest.approx(predicted, rel=2e-2)
        errors.append(abs(step["dlogp_chosen"] - lr * beta / 2 * out["first_order_dlogp_chosen"]))
    assert 50 < errors[0] / errors[1] < 200


def test_steps_restore_the_parameters_and_watch_other_responses():
    lm = tiny_lm()
    probe = PairProbe(lm, "cpu")
    before = [p.detach().clone() for p in lm.parameters()]
    yes = (14, 2)
    out = probe.dpo_steps(PROMPT, CHOSEN, REJECTED, steps=3, lr=0.5, beta=0.1, watch={"yes": yes})
    assert all(torch.equal(a, b) for a, b in zip(before, lm.parameters()))
    assert out["dlogp_chosen"] > 0 or out["dlogp_rejected"] < 0  # the margin grew
    assert out["dlogp_chosen"] - out["dlogp_rejected"] > 0
    assert math.isfinite(out["dlogp_yes"]) and out["dlogp_yes"] != 0
    # Watching a response equal to the chosen one reports the chosen change.
    again = probe.dpo_steps(PROMPT, CHOSEN, REJECTED, steps=3, lr=0.5, beta=0.1, watch={"same": CHOSEN})
    assert again["dlogp_same"] == pytest.approx(again["dlogp_chosen"], abs=1e-12)
    assert again["dlogp_chosen"] == pytest.approx(out["dlogp_chosen"], abs=1e-12)


def test_identical_responses_have_zero_displacement():
    out = PairProbe(tiny_lm(), "cpu").first_order(PROMPT, CHOSEN, CHOSEN)
    assert out["first_order_dlogp_chosen"] == 0.0 and out["first_order_dlogp_rejected"] == 0.0
    assert out["ches"] == 0.0 and out["edit_distance"] == 0.0


def test_measures_match_the_scoring_engine():
    from ches_filter.ches import ches_from_sums, ln_ches_from_sums
    from ches_filter.engine import Engine

    lm = tiny_lm(dtype=torch.float32)
    pairs = [EncodedPair(PROMPT, CHOSEN, REJECTED), EncodedPair((3, 4), (20, 21, 22, 23, 2), (20, 2))]
    states = Engine(lm, "cpu", strategy="plain").run(pairs)
    ches = ches_from_sums(states.s_chosen, states.s_rejected)
    ln = ln_ches_from_sums(states.s_chosen, states.s_rejected, torch.tensor([4, 5]), torch.tensor([3, 2]))
    probe = PairProbe(lm, "cpu")
    # Worked by hand: (10,11,12,2)->(10,13,2) is one substitution and one deletion, 2/4;
    # (20,21,22,23,2)->(20,2) is three deletions, 3/5.
    edit_distances = [0.5, 0.6]
    for j, pair in enumerate(pairs):
        out = probe.first_order(pair.prompt, pair.chosen, pair.rejected)
        assert out["ches"] == pytest.approx(float(ches[j]), rel=1e-4)
        assert out["ln_ches"] == pytest.approx(float(ln[j]), rel=1e-4)
        expected_ip = float(states.last_chosen[j] @ states.last_rejected[j])
        assert out["last_hidden_ip"] == pytest.approx(expected_ip, rel=1e-4)
        assert out["edit_distance"] == edit_distances[j]


def test_summary_correlations_and_quartiles():
    import pyarrow as pa

    n = 8
    ches = [float(i) for i in range(n)]  # pair i has CHES i
    d = [4.0 - i for i in range(n)]  # displacement grows with CHES: D < 0 for i >= 5
    table = pa.table({
        "row_index": list(range(n)), "first_order_dlogp_chosen": d, "ches": ches,
        "ln_ches": [-c for c in ches], "last_hidden_ip": [1.0] * n, "edit_distance": [c / 10 for c in ches],
    })
    summary = displacement_summary(table)
    assert summary["spearman"]["ches"]["first_order"] == pytest.approx(1.0)
    assert summary["spearman"]["ln_ches"]["first_order"] == pytest.approx(-1.0)
    assert summary["spearman"]["-edit_distance"]["first_order"] == pytest.approx(-1.0)
    assert summary["spearman"]["last_hidden_ip"]["first_order"] is None  # constant
    frac = summary["displaced_fraction"]["ches"]
    assert frac["quartile_size"] == 2
    assert frac["first_order"] == {"top": 1.0, "bottom": 0.0, "all": 3 / 8}
    lines = format_summary(summary)
    assert any("top ches quartile 100%, bottom quartile 0%" in line for line in lines)


def test_config_checks():
    for bad in ({"sample": 0}, {"steps": -1}, {"lr": 0.0}, {"beta": -0.1}, {"lr": float("nan")}):
        with pytest.raises(BadFlagError):
            DisplacementConfig(**bad)


def rows(n=12):
    return [{"prompt": f"Question {i}: is {i} even?", "chosen": "Yes." if i % 2 == 0 else "No.",
             "rejected": f"Maybe, {i} is a number.", "uid": f"q{i}"} for i in range(n)]


def test_pipeline_on_a_tiny_model(tiny_model_dir):
    data = rows() + [{"prompt": "same", "chosen": "A.", "rejected": "A.", "uid": "dup"}]
    config = ScoreConfig(model=str(tiny_model_dir), id_column="uid", quiet=True)
    table = measure_displacement(data, DisplacementConfig(sample=5, seed=3, steps=2, lr=1e-3), config, watch={"alt": "Yes."})
    assert table.num_rows == 5
    index = table.column("row_index").to_pylist()
    assert index == sorted(set(index)) and 12 not in index  # identical responses are never drawn
    assert table.column("uid").to_pylist() == [f"q{i}" for i in index]
    for name in ("first_order_dlogp_chosen", "first_order_dlogp_rejected", "dlogp_chosen", "dlogp_rejected",
                 "ches", "ln_ches", "last_hidden_ip", "edit_distance"):
        assert all(math.isfinite(v) for v in table.column(name).to_pylist()), name
    # A watched response equal to the chosen one moves exactly as the chosen one.
    assert any(data[row]["chosen"] == "Yes." for row in index)
    for row, alt, chosen in zip(index, table.column("dlogp_alt").to_pylist(), table.column("dlogp_chosen").to_pylist()):
        assert math.isfinite(alt)
        if data[row]["chosen"] == "Yes.":
            assert alt == pytest.approx(chosen, abs=1e-6)
    meta = json.loads(table.schema.metadata[b"ches_filter"])
    assert meta["kind"] == "displacement" and meta["config"]["steps"] == 2
    assert meta["summary"]["pairs"] == 5 and "steps_2" in meta["summary"]["spearman"]["ches"]
    again = measure_displacement(data, DisplacementConfig(sample=5, seed=3), config)
    assert again.column("row_index").to_pylist() == index
    assert "dlogp_chosen" not in again.column_names
    assert again.column("first_order_dlogp_chosen").to_pylist() == pytest.approx(
        table.column("first_order_dlogp_chosen").to_pylist(), rel=1e-6)
    everything = measure_displacement(data, DisplacementConfig(sample=100), config)
    assert everything.column("row_index").to_pylist() == list(range(12))


def test_cli_displacement(tmp_path, tiny_model_dir):
    source = tmp_path / "rows.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows(8)))
    out = tmp_path / "d.parquet"
    args = ["displacement", str(source), "--model", str(tiny_model_dir), "--sample", "6", "--steps", "1", "-q"]
    result = CliRunner().invoke(main, args + ["-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "Spearman correlation with displacement over 6 pairs" in result.output
    assert "-edit_distance" in result.output and "top ches quartile" in result.output
    from ches_filter.scorefile import read_table

    table, meta = read_table(str(out))
    assert table.num_rows == 6 and meta["summary"]["steps"] == 1
    again = CliRunner().invoke(main, args + ["-o", str(out)])
    assert again.exit_code == 2 and "--overwrite" in again.output
    bad = CliRunner().invoke(main, args + ["-o", str(tmp_path / "d.csv")])
    assert bad.exit_code == 2 and ".parquet" in bad.output


@pytest.mark.slow
@pytest.mark.skipif(not PERSONA.exists(), reason="../shared/data is not beside the repository")
def test_real_model_first_order_predicts_a_small_dpo_step(embedded):
    """On the embedded model and a real persona prompt (" No" over " Never"), one small DPO step moves
    log π(y±) as D predicts."""
    from ches_filter.batching import PairEncoder
    from ches_filter.formats import Columns, normalize_row
    from ches_filter.model import load_model

    lm = load_model(None, dtype="float32", device="cpu", with_lm_head=True)
    encoder = PairEncoder(lm.tokenizer)
    question = json.loads(PERSONA.read_text().splitlines()[0])["question"]
    probe = PairProbe(lm.decoder, "cpu")
    # lr 1e-4 moves log π by ~0.1 nats: small enough for first order, large enough that
    # float32 rounding of the weights loses only a few % of the update.
    lr, beta = 1e-4, 0.1
    enc = encoder.encode(normalize_row({"prompt": question, "chosen": " No", "rejected": " Never"}, "explicit_text", Columns()))
    out = probe.first_order(enc.prompt, enc.chosen, enc.rejected)
    step = probe.dpo_steps(enc.prompt, enc.chosen, enc.rejected, steps=1, lr=lr, beta=beta,
                           ref_logps=(out["logp_chosen"], out["logp_rejected"]))
    assert step["step_rounding_error"] < 0.1
    for side in ("chosen", "rejected"):
        predicted = lr * beta / 2 * out[f"first_order_dlogp_{side}"]
        assert abs(predicted) > 0.01
        assert step[f"dlogp_{side}"] == pytest.approx(predicted, rel=0.03), side


def test_sgd_update_reports_what_rounding_swallowed():
    from ches_filter.displacement import _sgd_update

    p = torch.nn.Parameter(torch.ones(1000))
    g = torch.ones(1000)
    # 1e-9 is below half of float32's rounding step at 1.0 (6e-8): nothing lands.
    lost, wanted = _sgd_update(p, g, 1e-9)
    assert torch.equal(p.data, torch.ones(1000))
    assert math.sqrt(lost / wanted) == pytest.approx(1.0)
    # 1e-3 lands up to float32 rounding of the new weight (< 6e-8 of a 1e-3 step).
    lost, wanted = _sgd_update(p, g, 1e-3)
    assert torch.allclose(p.data, torch.full((1000,), 1 - 1e-3))
    assert math.sqrt(lost / wanted) < 1e-4
    # float64 weights keep the tiny step.
    q = torch.nn.Parameter(torch.ones(10, dtype=torch.float64))
    lost, wanted = _sgd_update(q, torch.ones(10, dtype=torch.float64), 1e-9)
    assert float(q.data[0]) == 1 - 1e-9


def test_reduction_keeps_digits_for_nearly_identical_gradients():
    """float32 gradients, g- = g+ + 1e-4 noise: D = <g+, g+ - g-> is 1e-8 of ||g+||² and still exact to 1e-4."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3000, 700), (70001,), (5, 5)]  # rows of 65,536 with a ragged end
    g_plus = [torch.randn(s, generator=generator) for s in shapes]
    g_minus = [g + 1e-4 * torch.randn(g.shape, generator=generator) for g in g_plus]
    out = PairProbe._reduce(g_plus, g_minus)
    x = torch.cat([g.reshape(-1) for g in g_plus]).double()
    y = torch.cat([g.reshape(-1) for g in g_minus]).double()
    assert out["plus_diff"] == pytest.approx(float(x @ (x - y)), rel=1e-4)
    assert out["minus_diff"] == pytest.approx(float(y @ (x - y)), rel=1e-4)
    assert out["plus_plus"] == pytest.approx(float(x @ x), rel=1e-7)
    assert abs(out["plus_diff"]) < 1e-6 * out["plus_plus"]
