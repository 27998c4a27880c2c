"""`ches-filter validate` on tiny random models: log-prob paths, DPO loss and step, subsets, outputs, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from ches_filter.cli import main
from ches_filter.config import ScoreConfig, ValidateConfig
from ches_filter.errors import BadDataError, BadFlagError
from ches_filter.logprobs import pair_logprobs, packed_is_exact
from ches_filter.validate import dpo_loss, plan_subsets

from conftest import EXAMPLE_HH, GOLDEN, REPO, random_pairs, tiny_causal_llama

_THREADS = torch.get_num_threads()


def tiny_causal_gemma3(seed=0):
    """Sliding-window (8) and full layers: a wrong packed mask of either type shows."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=256, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    model = Gemma3ForCausalLM(config).eval()
    model.config._attn_implementation = "sdpa"
    return model


@pytest.mark.parametrize("build", [tiny_causal_llama, tiny_causal_gemma3], ids=["llama", "gemma3-sliding"])
def test_packed_and_plain_logprobs_agree(build):
    lm = build()
    assert packed_is_exact(lm, "cpu")
    pairs = random_pairs(6)
    packed = pair_logprobs(lm, pairs, packed=True, hidden=True)
    plain = pair_logprobs(lm, pairs, packed=False, hidden=True)
    for a, b in ((packed.chosen, plain.chosen), (packed.rejected, plain.rejected)):
        assert torch.allclose(a, b, rtol=1e-5, atol=0)
    for a, b in zip(packed.hidden_chosen + packed.hidden_rejected, plain.hidden_chosen + plain.hidden_rejected):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-5)
    # Each against an unbatched, unpadded forward of P + R[:-1] through the model's own head.
    for i, pair in enumerate(pairs):
        for resp, got in ((pair.chosen, packed.chosen[i]), (pair.rejected, packed.rejected[i])):
            ids = torch.tensor([list(pair.prompt) + list(resp[:-1])])
            with torch.no_grad():
                logits = lm(input_ids=ids).logits[0, len(pair.prompt) - 1 :].log_softmax(-1)
            expected = float(logits.gather(-1, torch.tensor(resp)[:, None]).sum())
            assert float(got) == pytest.approx(expected, rel=1e-5)
    assert packed.chosen_tokens == [len(p.chosen) for p in pairs]


def test_packed_and_plain_gradients_agree():
    lm = tiny_causal_llama(torch.float64)
    params = [p for p in lm.parameters()]
    pairs = random_pairs(4)
    grads = []
    for packed in (True, False):
        out = pair_logprobs(lm, pairs, packed=packed, grad=True)
        g = torch.autograd.grad((out.chosen - 0.5 * out.rejected).sum(), params)
        grads.append(torch.cat([x.reshape(-1) for x in g]))
    # Llama's RMSNorm computes in float32 even in a float64 model: agreement to float32 rounding.
    assert float((grads[0] - grads[1]).norm() / grads[1].norm()) < 1e-6


def test_dpo_loss_and_gradient_match_the_closed_form():
    """TRL 1.16 computes the sigmoid DPO loss inline in DPOTrainer._compute_loss (it needs a trainer and a
    model forward), so the check is against the closed form TRL implements there:
    loss = mean(-log σ(β Δ)), Δ = (π+ - ref+) - (π- - ref-); dloss/dπ+ = -β σ(-β Δ)/B = -dloss/dπ-."""
    gen = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(5, generator=gen, dtype=torch.float64) * 10 for _ in range(4))
    pc.requires_grad_(True)
    pr.requires_grad_(True)
    beta = 0.1
    loss = dpo_loss(pc, pr, rc, rr, beta)
    delta = (pc - rc) - (pr - rr)
    expected = torch.mean(torch.log1p(torch.exp(-beta * delta.detach())))
    assert float(loss.detach()) == pytest.approx(float(expected), rel=1e-12)
    gc, gr = torch.autograd.grad(loss, (pc, pr))
    weight = beta * torch.sigmoid(-beta * delta.detach()) / 5
    assert torch.allclose(gc, -weight, rtol=1e-12) and torch.allclose(gr, weight, rtol=1e-12)
    # At the reference (Δ = 0) the loss is log 2.
    assert float(dpo_loss(rc, rr, rc, rr, beta)) == pytest.approx(math.log(2), rel=1e-12)


def test_model_gradient_is_the_weighted_difference_of_response_gradients():
    """∇θ loss = Σ_i -β σ(-βΔ_i)/B (∇ log π+_i - ∇ log π-_i), through the real log-prob function."""
    lm = tiny_causal_llama(torch.float64)
    params = list(lm.parameters())
    pairs = random_pairs(3)
    beta = 0.5
    with torch.no_grad():
        ref = pair_logprobs(lm, pairs, packed=True)
    ref_c, ref_r = ref.chosen - 1.0, ref.rejected + 0.5  # a reference away from the policy: Δ ≠ 0
    out = pair_logprobs(lm, pairs, packed=True, grad=True)
    loss = dpo_loss(out.chosen, out.rejected, ref_c, ref_r, beta)
    got = torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, params)])
    expected = torch.zeros_like(got)
    for i in range(len(pairs)):
        single = pair_logprobs(lm, [pairs[i]], packed=False, grad=True)
        delta = float((single.chosen[0] - ref_c[i]) - (single.rejected[0] - ref_r[i]))
        w = -beta * (1 / (1 + math.exp(beta * delta))) / len(pairs)
        g = torch.autograd.grad(single.chosen[0] - single.rejected[0], params)
        expected += w * torch.cat([x.reshape(-1) for x in g])
    assert float((got - expected).norm() / expected.norm()) < 1e-6


class _Tok:
    pad_token_id = 0
    eos_token_id = 2


def _trainer(lm, **overrides):
    from ches_filter.model import LoadedModel
    from ches_filter.validate import _Trainer

    config = ValidateConfig(**{"by": "ches", "subsets": "top", "subset_size": 1, "eval_size": 0, "batch_size": 1, **overrides})
    loaded = LoadedModel(decoder=lm, tokenizer=_Tok(), device=torch.device("cpu"), dtype=lm.dtype, info={})
    return _Trainer(loaded, config, ScoreConfig(dtype="float32"))


def test_one_sgd_step_moves_logp_chosen_by_lr_beta_half_d():
    """One validate SGD step on one pair changes log π(y+) by lr·β/2·D (D from displacement's first order)."""
    from ches_filter.displacement import PairProbe

    lm = tiny_causal_llama(torch.float64)
    pair = random_pairs(1)[0]
    first = PairProbe(lm, "cpu").first_order(pair.prompt, pair.chosen, pair.rejected)
    beta, lr = 0.1, 1e-3
    trainer = _trainer(lm, optimizer="sgd", lr=lr, beta=beta)
    encoded = {0: pair}
    ref = trainer.evaluate([0], encoded)
    info = trainer.train([0], 0, encoded, ref)
    after = trainer.evaluate([0], encoded)
    assert info["steps"] == 1 and info["loss_first"] == pytest.approx(math.log(2), rel=1e-12)
    for side, k in (("chosen", 0), ("rejected", 1)):
        predicted = lr * beta / 2 * first[f"first_order_dlogp_{side}"]
        assert after[0][k] - ref[0][k] == pytest.approx(predicted, rel=0.03)
    trainer.restore()
    assert trainer.evaluate([0], encoded) == ref  # the initial weights come back exactly


def test_micro_batches_give_the_batch_gradient():
    """A batch split into token-budget micro-batches takes the same step as one forward over the batch."""
    lm = tiny_causal_llama(torch.float64)
    pairs = {i: p for i, p in enumerate(random_pairs(6))}
    results = []
    for budget in (None, 40):
        trainer = _trainer(lm, optimizer="sgd", lr=1e-2, subset_size=6, batch_size=6)
        trainer.budget = budget or 10**6
        ref = trainer.evaluate(list(pairs), pairs)
        trainer.train(list(pairs), 0, pairs, ref)
        results.append(trainer.evaluate(list(pairs), pairs))
        trainer.restore()
    assert len(_trainer(lm, subset_size=6, batch_size=6)._micro_batches(list(pairs), pairs)) == 1
    for row in pairs:
        assert results[0][row] == pytest.approx(results[1][row], rel=1e-10)


def test_side_by_side_workers_give_the_serial_numbers_and_are_deterministic():
    """Log-prob passes on 2 or 3 worker threads: the numbers of one worker, and the same bits on every run."""
    lm = tiny_causal_llama(torch.float64)
    pairs = {i: p for i, p in enumerate(random_pairs(6))}
    results = {}
    for run, workers in enumerate((1, 2, 2, 3)):
        trainer = _trainer(lm, optimizer="adam", lr=1e-3, subset_size=6, batch_size=3)
        trainer.budget, trainer.workers = 40, workers
        assert len(trainer._micro_batches(list(pairs)[:3], pairs)) >= 2  # every batch really is split
        ref = trainer.evaluate(list(pairs), pairs)
        info = trainer.train(list(pairs), 0, pairs, ref)
        results[run] = (ref, info["loss_last"], trainer.evaluate(list(pairs), pairs))
        trainer.restore()
    assert torch.get_num_threads() == _THREADS  # the intra-op threads are given back
    assert results[1] == results[2]  # bit for bit, whatever finished first
    for run in (1, 3):
        ref, loss, after = results[run]
        assert loss == pytest.approx(results[0][1], rel=1e-12)  # float64: only the threads' rounding differs
        for got, want in ((ref, results[0][0]), (after, results[0][2])):
            assert got.keys() == want.keys()
            for row in want:
                assert got[row] == pytest.approx(want[row], rel=1e-12)
    assert results[0][2] != results[0][0]


def test_ordered_map_keeps_order_bounds_what_is_in_flight_and_raises():
    import threading
    import time

    from ches_filter.engine import ordered_map

    lock, live, peak = threading.Lock(), [0], [0]

    def slow(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.02 * (5 - i % 5))  # early items finish last
        with lock:
            live[0] -= 1
        if i == 7:
            raise ValueError("item 7")
        return i * i

    assert list(ordered_map(slow, range(7), 3, "cpu")) == [i * i for i in range(7)]
    assert peak[0] <= 3 and torch.get_num_threads() == _THREADS
    with pytest.raises(ValueError, match="item 7"):
        list(ordered_map(slow, range(10), 2, "cpu"))
    assert torch.get_num_threads() == _THREADS
    assert list(ordered_map(slow, range(3), 1, "cpu")) == [0, 1, 4]


def test_gradient_checkpointing_takes_the_same_steps():
    """Same numbers with `--gradient-checkpointing`, which turns transformers' checkpointing on (training mode)."""
    lm = tiny_causal_llama(torch.float64)
    pairs = {i: p for i, p in enumerate(random_pairs(4))}
    results = []
    for checkpointing in (False, True):
        trainer = _trainer(lm, optimizer="adam", lr=1e-3, subset_size=4, batch_size=2, gradient_checkpointing=checkpointing)
        assert all(layer.gradient_checkpointing == checkpointing for layer in lm.model.layers)
        assert lm.training == checkpointing
        ref = trainer.evaluate(list(pairs), pairs)
        trainer.train(list(pairs), 0, pairs, ref)
        results.append(trainer.evaluate(list(pairs), pairs))
        trainer.restore()
    for row in pairs:
        assert results[0][row] == pytest.approx(results[1][row], rel=1e-9)
    assert results[0] != ref


def test_gradient_checkpointing_keeps_fewer_activations():
    """What the backward pass holds on to: with `--gradient-checkpointing` only the layer inputs, without it every layer's intermediates.

    Counted with autograd's saved-tensor hooks (the bytes kept for the
    backward pass of one training forward), so the saving is measured, not
    assumed; the CPU/GPU peak numbers are in benchmarks/RESULTS.md.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(
        vocab_size=96, hidden_size=64, intermediate_size=256, num_hidden_layers=6, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512,
    )).eval()
    pairs = random_pairs(6)
    kept = {}
    for checkpointing in (False, True):
        trainer = _trainer(lm, subset_size=6, batch_size=6, gradient_checkpointing=checkpointing)
        seen: dict[int, int] = {}

        def pack(tensor):
            storage = tensor.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
            return tensor

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
            got = trainer.logprobs(pairs, grad=True)
        (got.chosen.sum() - got.rejected.sum()).backward()
        params = {p.untyped_storage().data_ptr() for p in lm.parameters()}
        kept[checkpointing] = sum(n for ptr, n in seen.items() if ptr not in params)
        trainer.restore()
        lm.zero_grad(set_to_none=True)
        if checkpointing:
            lm.gradient_checkpointing_disable()
            lm.eval()
    assert kept[True] < 0.2 * kept[False], kept  # measured: 0.70 MB vs 12.8 MB


def test_run_trainings_trains_each_distinct_subset_once_and_records_before_and_after(tmp_path, monkeypatch):
    """`run_trainings` on a real tiny model: one training per distinct (members, seed), shared by the subsets
    with those members; every record holds the reference log π and the log π after its own training; no file."""
    from ches_filter.errors import ChesFilterError
    from ches_filter.validate import SubsetPlan, run_trainings, summarize

    monkeypatch.chdir(tmp_path)
    lm = tiny_causal_llama(torch.float64)
    encoded = {i: p for i, p in enumerate(random_pairs(6))}
    subsets = {("ches", "top"): [0, 1], ("ches", "bottom"): [2, 3], ("ches", "random"): [1, 4],
               ("ln_ches", "top"): [2, 3], ("ln_ches", "bottom"): [0, 5], ("ln_ches", "random"): [1, 4]}
    scores = {m: {r: (r + 1) * (-1.5 if m == "ln_ches" else 0.25) for r in range(6)} for m in ("ches", "ln_ches")}
    plan = SubsetPlan(eval_rows=[5], subsets=subsets, scores=scores)
    settings = dict(by="ches,ln_ches", subsets="top,bottom,random", subset_size=2, eval_size=1, batch_size=1,
                    optimizer="adam", lr=1e-2, repeats=2, seed=2)
    trainer = _trainer(lm, **settings)
    initial = trainer.evaluate(plan.used_rows(), encoded)
    done = run_trainings(trainer, plan, encoded)
    assert done.trainings == 4 * 2  # {0,1}, {2,3}, {1,4}, {0,5} x seeds 2 and 3 (which order the pairs differently)
    assert len(done.jobs) == 6 * 2 and done.jobs[("ln_ches", "top", 3)] is done.jobs[("ches", "bottom", 3)]
    assert done.jobs[("ln_ches", "random", 2)]["key_owner"] == "ches/random" and set(done.phases) == {
        "reference", "training", "evaluation"}
    assert [(r["measure"], r["subset"], r["seed"], r["set"], r["row_index"]) for r in done.records[:6]] == [
        ("ches", "top", 2, "subset", 0), ("ches", "top", 2, "subset", 1), ("ches", "top", 2, "eval", 5),
        ("ches", "top", 3, "subset", 0), ("ches", "top", 3, "subset", 1), ("ches", "top", 3, "eval", 5)]
    assert len(done.records) == 6 * 2 * 3
    # Each training again by hand, from the initial weights: the records hold its numbers bit for bit.
    after = {}
    for (members, seed) in {(tuple(rows), s) for rows in subsets.values() for s in (2, 3)}:
        info = trainer.train(list(members), seed, encoded, initial)
        assert info["steps"] == 2 and info["loss_first"] == pytest.approx(math.log(2), rel=1e-12)
        after[members, seed] = trainer.evaluate(sorted({*members, 5}), encoded)
    for r in done.records:
        pair, got = encoded[r["row_index"]], after[tuple(subsets[r["measure"], r["subset"]]), r["seed"]][r["row_index"]]
        before = initial[r["row_index"]]
        assert (r["logp_chosen_before"], r["logp_rejected_before"]) == before
        assert (r["logp_chosen_after"], r["logp_rejected_after"]) == got
        assert r["dlogp_chosen"] == got[0] - before[0] and r["dlogp_rejected"] == got[1] - before[1]
        assert r["score"] == scores[r["measure"]][r["row_index"]]
        assert (r["prompt_tokens"], r["chosen_tokens"], r["rejected_tokens"]) == (len(pair.prompt), len(pair.chosen), len(pair.rejected))
    assert len({r["dlogp_chosen"] for r in done.records if r["set"] == "eval"}) == 8  # each training moved it its own way
    summary = summarize(done.records, done.jobs, trainer.config)
    assert [e["trained_with"] for e in summary if e["measure"] == "ln_ches"] == ["ches/bottom", "ln_ches/bottom", "ches/random"]
    trainer.close()
    assert trainer.evaluate(plan.used_rows(), encoded) == initial  # close gives the initial weights back
    assert not any(tmp_path.iterdir())  # no file written
    # A training that diverges is an error, not a record.
    diverging = _trainer(lm, **{**settings, "lr": 1e308})
    with pytest.raises(ChesFilterError, match="training diverged"):
        run_trainings(diverging, plan, encoded)
    diverging.close()


# ------------------------------------------------------------------ subsets
def _score_table(n=40, missing=()):
    import pyarrow as pa

    gen = torch.Generator().manual_seed(0)
    status = ["ok"] * n
    for i in missing:
        status[i] = "too_long"
    cols = {"row_index": list(range(n)), "status": status}
    for name in ("ches", "ln_ches", "edit_distance"):
        cols[name] = [float(v) for v in torch.randn(n, generator=gen)]
    return pa.table(cols)


def test_subsets_follow_the_risk_direction_and_avoid_the_eval_set():
    table = _score_table(60, missing=(3, 7))
    config = ValidateConfig(by="ches,edit_distance", subsets="top,bottom,median,random", quantiles="0,1",
                            subset_size=8, eval_size=10, batch_size=4)
    plan = plan_subsets(table, config)
    values = {m: table.column(m).to_pylist() for m in ("ches", "edit_distance")}
    assert len(plan.eval_rows) == 10 and not {3, 7} & set(plan.eval_rows)
    for (measure, name), rows in plan.subsets.items():
        assert len(rows) == 8 and not set(rows) & set(plan.eval_rows) and not {3, 7} & set(rows)
    pool = [i for i in range(60) if i not in (3, 7) and i not in plan.eval_rows]
    ches_sorted = sorted(pool, key=lambda i: values["ches"][i])
    assert plan.subsets[("ches", "top")] == sorted(ches_sorted[-8:])
    assert plan.subsets[("ches", "bottom")] == sorted(ches_sorted[:8])
    assert plan.subsets[("ches", "q1")] == plan.subsets[("ches", "top")]
    assert plan.subsets[("ches", "q0")] == plan.subsets[("ches", "bottom")]
    start = round((len(pool) - 1) / 2) - 4  # the official code's quantile slice
    assert plan.subsets[("ches", "median")] == sorted(ches_sorted[start : start + 8])
    # Lower edit distance = riskier: top holds the smallest values.
    ed_sorted = sorted(pool, key=lambda i: values["edit_distance"][i])
    assert plan.subsets[("edit_distance", "top")] == sorted(ed_sorted[:8])
    assert plan.subsets[("ches", "random")] == plan.subsets[("edit_distance", "random")]
    # Another seed draws another eval set and random subset.
    other = plan_subsets(table, ValidateConfig(by="ches", subsets="random", subset_size=8, eval_size=10, batch_size=4, seed=1))
    assert other.eval_rows != plan.eval_rows


def test_too_few_rows_says_how_many_there_are_and_are_needed():
    table = _score_table(30, missing=(0, 1))
    with pytest.raises(BadDataError, match=r"has 28 scored .* needs 34"):
        plan_subsets(table, ValidateConfig(by="ches", subsets="top,bottom,random", subset_size=12, eval_size=10, batch_size=4))
    with pytest.raises(BadDataError, match="no last_hidden_ip column"):
        plan_subsets(table, ValidateConfig(by="ches,last_hidden_ip", subset_size=4, eval_size=2, batch_size=4))


def test_config_refuses_bad_values():
    for kwargs, pattern in (
        (dict(subset_size=4, batch_size=8), "smaller than `--batch-size 8`"),
        (dict(subsets="top,worst"), "`--subsets` got worst"),
        (dict(lr=0.0), "`--lr` must be a positive number"),
        (dict(lr=-1e-5), "`--lr` must be a positive number"),
        (dict(lr=float("nan")), "`--lr` must be a finite number"),
        (dict(by="ches,bogus"), "`--by` got bogus"),
        (dict(quantiles="0,1.5"), "`--quantiles`"),
        (dict(optimizer="lion"), "`--optimizer`"),
        (dict(repeats=0), "`--repeats`"),
        (dict(subsets="", quantiles=None), "nothing to train on|`--subsets`"),
        (dict(repeats=10**12), "`--repeats` must be at most 1,000"),
        (dict(seed=2**63), "`--seed` must be at most"),
        (dict(seed=2**63 - 2, repeats=3), "`--seed` must be at most .* with `--repeats 3`"),
    ):
        with pytest.raises(BadFlagError, match=pattern):
            ValidateConfig(**kwargs)
    assert ValidateConfig(subsets="", quantiles="0,0.5,1").subset_names == ("q0", "q0.5", "q1")
    # -0 is 0: one slice, not `q0` and `q-0`.
    assert ValidateConfig(subsets="", quantiles="0,-0,0.0,1").subset_names == ("q0", "q1")
    assert ValidateConfig(seed=2**63 - 3, repeats=3).seed == 2**63 - 3


def test_the_plan_follows_row_index_not_the_order_of_the_score_file():
    """A score file whose rows were sorted (by CHES, say) gives the same eval set and subsets."""
    table = _score_table(60)
    config = ValidateConfig(by="ches", subsets="top,bottom,random", subset_size=8, eval_size=10, batch_size=4)
    shuffled = table.take(sorted(range(60), key=lambda i: table.column("ches")[i].as_py()))
    a, b = plan_subsets(table, config), plan_subsets(shuffled, config)
    assert (a.eval_rows, a.subsets, a.scores) == (b.eval_rows, b.subsets, b.scores)


@pytest.mark.parametrize("change, pattern", [
    (lambda cols: cols.update(row_index=[r + 1000 for r in cols["row_index"]]), r"row_index column holds 1000 \(rows are 0..39\)"),
    (lambda cols: cols.update(row_index=[0] * 40), "row_index column holds a repeated value"),
    (lambda cols: cols.update(row_index=[None] + cols["row_index"][1:]), "row_index column holds None"),
    (lambda cols: cols.update(ches=[str(v) for v in cols["ches"]]), "ches column holds string values, not numbers"),
    (lambda cols: cols["ches"].__setitem__(5, float("inf")), "ches is inf at row_index 5 .status ok."),
    (lambda cols: cols["ches"].__setitem__(6, float("-inf")), "ches is -inf at row_index 6"),
])
def test_a_hostile_score_file_is_refused(change, pattern):
    import pyarrow as pa

    cols = _score_table(40).to_pydict()
    change(cols)
    with pytest.raises(BadDataError, match=pattern):
        plan_subsets(pa.table(cols), ValidateConfig(by="ches", subsets="top,bottom", subset_size=4, eval_size=4, batch_size=4))


# ------------------------------------------------------------------ CLI
def _hh_subset(tmp_path, n=24) -> str:
    lines = EXAMPLE_HH.read_text(encoding="utf-8").splitlines()[:n]
    path = tmp_path / "hh.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


SMALL = ["--by", "ches,ln_ches", "--subsets", "top,bottom,random", "--subset-size", "4", "--eval-size", "4",
         "--batch-size", "2", "--lr", "1e-3", "-q"]
#: Two trainings instead of five, for the tests of locks, resume and writes (not of what is trained): a
#: seeded subset (random) and a ranked one (top), so a changed seed still changes the numbers.
LEAN = ["--by", "ches", "--subsets", "top,random", "--subset-size", "4", "--eval-size", "4",
        "--batch-size", "2", "--lr", "1e-3", "-q"]


@pytest.fixture(scope="module")
def lean_run(tmp_path_factory, tiny_model_dir):
    """One finished LEAN run, shared: ``(data, OUT_DIR)``. A test that changes OUT_DIR works on a copy."""
    root = tmp_path_factory.mktemp("lean")
    data, out = _hh_subset(root), root / "finished"
    result = CliRunner().invoke(main, ["validate", data, "-o", str(out), "--model", str(tiny_model_dir), *LEAN])
    assert result.exit_code == 0, result.output
    return data, out


def test_cli_scores_trains_each_distinct_subset_once_and_reports(tmp_path, tiny_model_dir):
    import pyarrow.parquet as pq

    data = _hh_subset(tmp_path)
    runner = CliRunner()
    first = runner.invoke(main, ["validate", data, "-o", str(tmp_path / "a"), "--model", str(tiny_model_dir), *SMALL])
    assert first.exit_code == 0, first.output
    out = tmp_path / "a"
    assert {"scores.parquet", "validate.parquet", "summary.json", "validate.png"} <= {p.name for p in out.iterdir()}
    assert "verdict (ches)" in first.output and "verdict (ln_ches)" in first.output
    summary = json.loads((out / "summary.json").read_text())
    assert summary["trainings"] == 5  # random trained once for both measures
    for entry in summary["subsets"]:
        for key in ("measure", "subset", "n", "mean_dlogp_chosen", "mean_dlogp_rejected", "mean_dlogp_chosen_per_token",
                    "frac_chosen_decreased", "eval_mean_dlogp_chosen", "seconds"):
            assert entry[key] is not None, key
    table = pq.read_table(out / "validate.parquet")
    assert table.num_rows == 6 * (4 + 4)
    assert set(table.column("set").to_pylist()) == {"subset", "eval"}
    assert any(v != 0 for v in table.column("dlogp_chosen").to_pylist())
    # (The same numbers from the same command, and from a run given these scores with --scores:
    # test_rerunning_the_same_command_after_a_failure_resumes_without_rescoring and
    # test_an_unfinished_run_with_other_flags_or_broken_work_is_explained_or_started_over.)
    # The report shows the validate results; a directory without them is refused before anything is written.
    rep = runner.invoke(main, ["report", str(out / "scores.parquet"), "-o", str(tmp_path / "rep"), "--validate", str(out)])
    assert rep.exit_code == 0, rep.output
    # Another input's scores beside these verdicts are refused (validate recorded which scores it ranked by).
    golden = str(Path(__file__).parent / "golden" / "hh300_scores.parquet")
    other = runner.invoke(main, ["report", golden, "-o", str(tmp_path / "rep2"), "--validate", str(out)])
    assert other.exit_code == 1 and "other scores than SCORES" in other.output, other.output
    assert not (tmp_path / "rep2").exists()
    html = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "Validate: DPO on subsets" in html and "verdict (ches)" in html and html.count("data:image/png") == 3
    (tmp_path / "not_validate").mkdir()  # (tmp_path itself holds rep2: a path clash, exit 2)
    bad = runner.invoke(main, ["report", str(out / "scores.parquet"), "-o", str(tmp_path / "rep2"), "--validate",
                               str(tmp_path / "not_validate")])
    assert bad.exit_code == 1 and "`--validate`" in _error_line(bad) and not (tmp_path / "rep2").exists()
    # (Another seed giving other numbers: test_a_stale_lock_is_taken_over_and_a_failed_write_keeps_the_earlier_outputs.)


def _error_line(result) -> str:
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    return lines[0]


@pytest.mark.parametrize("args, code, pattern", [
    (["--subset-size", "4", "--batch-size", "8"], 2, "smaller than `--batch-size 8`"),
    (["--subsets", "top,worst"], 2, "`--subsets` got worst"),
    (["--lr", "0"], 2, r"'--lr': 0.0 is not in the range x>0"),
    (["--lr", "-1e-6"], 2, r"'--lr': -1e-06 is not in the range x>0"),
    (["--subset-size", "140", "--eval-size", "20", "--subsets", "top,bottom"], 1, "has 299 scored .* needs 300"),
    (["--subset-size", "200"], 1, "has 300 rows but validate needs at least 464"),
])
def test_cli_bad_input_is_one_line(tmp_path, args, code, pattern):
    import re

    result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(tmp_path / "out"), "--scores", str(GOLDEN), *args])
    assert result.exit_code == code, result.output
    assert re.search(pattern, _error_line(result))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_by_measure_missing_from_scores(tmp_path):
    import pyarrow.parquet as pq

    table = pq.read_table(GOLDEN)
    pq.write_table(table.drop_columns(["last_hidden_ip"]), tmp_path / "scores.parquet")
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(tmp_path / "out"), "--scores",
                                       str(tmp_path / "scores.parquet"), "--by", "ches,last_hidden_ip"])
    assert result.exit_code == 1, result.output
    assert "no last_hidden_ip column" in _error_line(result)
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_cli_output_dir_checks(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(out), "--scores", str(GOLDEN)])
    assert result.exit_code == 2 and "exists; pass `--overwrite`" in _error_line(result)
    # Inside the input's directory, or a file where the directory should go.
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "hh.jsonl").write_text(EXAMPLE_HH.read_text(encoding="utf-8"), encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(data_dir), "-o", str(data_dir / "v"), "--scores", str(GOLDEN)])
    assert result.exit_code == 2 and "inside the input directory" in _error_line(result)
    (tmp_path / "file").write_text("x")
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(tmp_path / "file"), "--scores", str(GOLDEN), "--overwrite"])
    assert result.exit_code == 2 and "not a directory" in _error_line(result)
    # A score file of another input.
    other = tmp_path / "other.jsonl"
    other.write_text("\n".join(EXAMPLE_HH.read_text(encoding="utf-8").splitlines()[1:]) + "\n", encoding="utf-8")
    result = CliRunner().invoke(main, ["validate", str(other), "-o", str(tmp_path / "o2"), "--scores", str(GOLDEN)])
    assert result.exit_code == 1 and "`--scores`" in _error_line(result)


def test_plot_is_skipped_without_matplotlib(monkeypatch, caplog):
    import sys

    from ches_filter.validate import plot

    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level("WARNING", logger="ches_filter"):
        assert plot({"subsets": [], "config": {"repeats": 1}}) is None
    assert sum("matplotlib is not installed" in r.message for r in caplog.records) == 1


# ------------------------------------------------------------------ one run per OUT_DIR, all outputs or none
def _listing(root: Path, files_only: bool = False) -> dict:
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))
            if not (files_only and p.is_dir())}


def test_a_second_run_on_the_same_out_dir_is_refused_while_the_first_trains(tmp_path, tiny_model_dir, monkeypatch):
    """The lock covers the whole run (training included), whatever the spelling of OUT_DIR and with --overwrite."""
    import os
    import threading

    from ches_filter import validate as validate_module
    from ches_filter.validate import run_validate

    data = _hh_subset(tmp_path)
    out = tmp_path / "out"
    training, release = threading.Event(), threading.Event()
    original = validate_module._Trainer.train

    def slow_train(self, *args, **kwargs):
        training.set()
        assert release.wait(120)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(validate_module._Trainer, "train", slow_train)
    errors = []

    def first():
        try:
            run_validate(data, str(out), ValidateConfig(by="ches", subsets="top,bottom", subset_size=4, eval_size=4,
                                                        batch_size=2, lr=1e-3),
                         ScoreConfig(model=str(tiny_model_dir), quiet=True))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    thread = threading.Thread(target=first)
    thread.start()
    try:
        assert training.wait(120), errors
        (tmp_path / "alias").symlink_to(out)
        (tmp_path / "x").mkdir()
        before = _listing(out)
        spellings = (str(out), str(tmp_path / "alias"), f"{out}/./", str(tmp_path / "x" / ".." / "out"))
        for spelling, extra in [(s, []) for s in spellings] + [(s, ["--overwrite"]) for s in spellings]:
            result = CliRunner().invoke(main, ["validate", data, "-o", spelling, "--model", str(tiny_model_dir),
                                               *extra, *LEAN])
            assert result.exit_code == 2, result.output
            line = _error_line(result)
            assert "another ches-filter run is using" in line and f"pid {os.getpid()}" in line, line
            assert _listing(out) == before  # the refused run wrote nothing
        # `score` into the running OUT_DIR's score file must not replace it nor delete the parts a rerun needs.
        for extra in ([], ["--overwrite"]):
            result = CliRunner().invoke(main, ["score", data, "-o", str(out / "scores.parquet"), "--model",
                                               str(tiny_model_dir), "-q", *extra])
            assert result.exit_code == 2 and "another ches-filter run" in _error_line(result), result.output
            assert _listing(out) == before
    finally:
        release.set()
        thread.join(300)
    assert not errors, errors
    assert {p.name for p in out.iterdir()} == {"scores.parquet", "validate.parquet", "summary.json", "validate.png"}


def test_a_stale_lock_is_taken_over_and_a_failed_write_keeps_the_earlier_outputs(tmp_path, tiny_model_dir, monkeypatch):
    import errno
    import socket

    import pyarrow as pa
    import pyarrow.parquet as pq

    import ches_filter.atomic as io_module

    data = _hh_subset(tmp_path)
    out = tmp_path / "out"
    (out / "locks").mkdir(parents=True)
    # A run killed on this host: its pid is gone (a pid beyond pid_max is never alive).
    (out / "locks" / "validate.lock").write_text(json.dumps({"pid": 2**30, "host": socket.gethostname(), "started": "x"}))
    args = ["validate", data, "-o", str(out), "--model", str(tiny_model_dir), *LEAN]
    result = CliRunner().invoke(main, args)  # an OUT_DIR holding only a dead run's lock is resumed without --overwrite
    assert result.exit_code == 0, result.output
    names = ("validate.parquet", "summary.json", "validate.png")
    assert sorted(p.name for p in out.iterdir()) == sorted(["scores.parquet", *names])  # no lock, no parts
    earlier = {name: (out / name).read_bytes() for name in names}

    # The disk fills while one of the outputs is flushed: none of the new ones may replace an earlier one.
    real_fsync = io_module.fsync_tree
    for failing in (names[0], names[-1]):  # the first and the last to be flushed
        def full_disk(path, failing=failing):
            if f".{failing}.tmp-" in path:
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(path)

        monkeypatch.setattr(io_module, "fsync_tree", full_disk)
        result = CliRunner().invoke(main, [*args, "--overwrite", "--seed", "7"])
        assert result.exit_code == 1, result.output
        assert "no space left on" in _error_line(result) and failing in _error_line(result)
        assert {name: (out / name).read_bytes() for name in names} == earlier, failing
        # No temporaries, no lock; the new scoring's parts stay beside the earlier run for the rerun.
        assert sorted(p.name for p in out.iterdir()) == sorted([".scores.new.parquet.parts", "scores.parquet", *names])
    monkeypatch.setattr(io_module, "fsync_tree", real_fsync)
    result = CliRunner().invoke(main, [*args, "--overwrite", "--seed", "7"])
    assert result.exit_code == 0, result.output
    # Another seed: another eval set, random subset and batch order, so other numbers (not only another seed column).
    before, after = (pq.read_table(source).column("dlogp_chosen").to_pylist()
                     for source in (pa.BufferReader(earlier["validate.parquet"]), out / "validate.parquet"))
    assert before != after


def test_rerunning_the_same_command_after_a_failure_resumes_without_rescoring(tmp_path, tiny_model_dir, monkeypatch,
                                                                           lean_run):
    import pyarrow.parquet as pq

    from ches_filter import validate as validate_module

    data, reference = lean_run
    out = tmp_path / "out"
    args = ["validate", data, "-o", str(out), "--model", str(tiny_model_dir), *LEAN]
    original = validate_module._Trainer.train

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(validate_module._Trainer, "train", interrupted)
    first = CliRunner().invoke(main, args)
    assert first.exit_code != 0 and "Traceback" not in first.output
    assert {p.name for p in out.iterdir()} == {"scores.parquet", "scores.parquet.parts"}  # lock released, scores kept
    scored = (out / "scores.parquet").stat().st_mtime_ns
    monkeypatch.setattr(validate_module._Trainer, "train", original)

    calls = []
    monkeypatch.setattr(validate_module._Trainer, "train", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
    import ches_filter.run.pipeline as pipeline_module

    monkeypatch.setattr(pipeline_module, "assemble", lambda *a, **k: pytest.fail("rescored / reassembled on resume"))
    again = CliRunner().invoke(main, args)  # the same command, no --overwrite
    assert again.exit_code == 0, again.output
    assert calls and (out / "scores.parquet").stat().st_mtime_ns == scored
    assert {p.name for p in out.iterdir()} == {"scores.parquet", "validate.parquet", "summary.json", "validate.png"}
    assert pq.read_table(out / "validate.parquet").equals(pq.read_table(reference / "validate.parquet"))
    # Finished: the same command now needs --overwrite.
    third = CliRunner().invoke(main, args)
    assert third.exit_code == 2 and "exists; pass `--overwrite`" in _error_line(third)


def test_an_unfinished_run_with_other_flags_or_broken_work_is_explained_or_started_over(tmp_path, tiny_model_dir, monkeypatch):
    import os

    import pyarrow.parquet as pq

    from ches_filter import validate as validate_module

    data = _hh_subset(tmp_path)
    out = tmp_path / "out"
    args = ["validate", data, "-o", str(out), "--model", str(tiny_model_dir), *LEAN]
    original = validate_module._Trainer.train
    monkeypatch.setattr(validate_module._Trainer, "train", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert CliRunner().invoke(main, args).exit_code != 0
    monkeypatch.setattr(validate_module._Trainer, "train", original)
    before = _listing(out)
    # Other scoring flags: not resumable, and the message says what to do.
    other = CliRunner().invoke(main, [*args, "--measures", "ches,ln_ches,edit_distance"])
    assert other.exit_code == 2
    line = _error_line(other)
    assert "holds an unfinished run that this command cannot resume" in line and "`--overwrite` to start over" in line
    # (it looked under the lock of the parts: their directory's time changed, no file did)
    assert _listing(out, files_only=True) == {k: v for k, v in before.items() if not (out / k).is_dir()}
    # --overwrite starts over even when the unfinished run's work is broken: a garbled manifest, and a
    # half-deleted copy that is a link to another job's directory (left alone).
    (out / "scores.parquet.parts" / "manifest.json").write_text("garbage")
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "keep.txt").write_text("x")
    os.symlink(victim, out / ".scores.parquet.parts.deleting")
    result = CliRunner().invoke(main, [*args, "--overwrite"])
    assert result.exit_code == 0, result.output
    assert (victim / "keep.txt").read_text() == "x"
    assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "summary.json", "validate.parquet", "validate.png"]
    finished = pq.read_table(out / "validate.parquet")
    # With --scores into an unfinished OUT_DIR: the earlier run's own scores and parts go once this run finishes.
    shutil_out = tmp_path / "out2"
    monkeypatch.setattr(validate_module._Trainer, "train", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert CliRunner().invoke(main, ["validate", data, "-o", str(shutil_out), "--model", str(tiny_model_dir), *LEAN]).exit_code != 0
    monkeypatch.setattr(validate_module._Trainer, "train", original)
    result = CliRunner().invoke(main, ["validate", data, "-o", str(shutil_out), "--model", str(tiny_model_dir),
                                       "--scores", str(out / "scores.parquet"), *LEAN])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in shutil_out.iterdir()) == ["summary.json", "validate.parquet", "validate.png"]
    assert pq.read_table(shutil_out / "validate.parquet").equals(finished)


def test_a_diverging_run_is_an_error_not_a_verdict(tmp_path, tiny_model_dir):
    data = _hh_subset(tmp_path)
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["validate", data, "-o", str(out), "--model", str(tiny_model_dir),
                                       *[a if a != "1e-3" else "1e308" for a in LEAN]])
    assert result.exit_code == 1, result.output
    assert "training diverged" in _error_line(result) and "lower `--lr`" in _error_line(result)
    assert not (out / "summary.json").exists() and not (out / "validate.parquet").exists()


def test_paths_validate_refuses_or_keeps(tmp_path, monkeypatch):
    """An empty -o, a failed run in an existing (empty) OUT_DIR or `.`, clashes named by flag, an input glob."""
    import os

    base = [str(EXAMPLE_HH), "--scores", str(GOLDEN), "--subset-size", "200"]  # 300 rows < 464 needed: exit 1
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    result = CliRunner().invoke(main, ["validate", "-o", "", *base])
    assert result.exit_code == 2 and "`--output` is an empty path" in _error_line(result)
    assert work.is_dir()
    for out in (str(work), ".", "./"):
        result = CliRunner().invoke(main, ["validate", "-o", out, "--overwrite", *base])
        assert result.exit_code == 1, result.output
        assert work.is_dir() and not any(work.iterdir())  # the run's lock went, the directory it found stays
    # Clashes name the flag of the input.
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(EXAMPLE_HH), "--scores", str(GOLDEN), "--overwrite"])
    assert result.exit_code == 2 and "`INPUT`" in _error_line(result)
    (tmp_path / "sc").mkdir()
    (tmp_path / "sc" / "s.parquet").write_bytes(GOLDEN.read_bytes())
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(tmp_path / "sc"), "--scores",
                                       str(tmp_path / "sc" / "s.parquet"), "--overwrite"])
    assert result.exit_code == 2 and "`--scores`" in _error_line(result)
    # An input pattern that would match a file OUT_DIR will hold (summary.json), with --scores.
    (tmp_path / "g" / "data").mkdir(parents=True)
    (tmp_path / "g" / "data" / "hh.jsonl").write_text(EXAMPLE_HH.read_text(encoding="utf-8"), encoding="utf-8")
    pattern = str(tmp_path / "g" / "*" / "*.json*")
    result = CliRunner().invoke(main, ["validate", pattern, "-o", str(tmp_path / "g" / "out"), "--scores", str(GOLDEN)])
    assert result.exit_code == 2 and "matches the input pattern" in _error_line(result) and "summary.json" in _error_line(result)
    assert not (tmp_path / "g" / "out").exists()
    # A parent spelled through a missing directory is refused, and not created.
    result = CliRunner().invoke(main, ["validate", "-o", str(tmp_path / "stray" / ".." / "o"), *base])
    assert result.exit_code == 2 and "does not exist" in _error_line(result)
    assert not (tmp_path / "stray").exists() and not (tmp_path / "o").exists()
    assert os.getcwd() == str(work)
    # Only what validate itself leaves makes an OUT_DIR resumable without --overwrite.
    for name, inner in (("scores.parquet", "precious.txt"), ("locks", "notes.txt"), ("scores.parquet.parts", "mine.txt")):
        out = tmp_path / f"foreign-{name}"
        (out / name).mkdir(parents=True)
        (out / name / inner).write_text("keep")
        result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(out), "--scores", str(GOLDEN)])
        assert result.exit_code == 2 and "exists; pass `--overwrite`" in _error_line(result), result.output
        assert (out / name / inner).read_text() == "keep"


def test_overwrite_interrupted_after_scoring_keeps_the_old_run_and_resumes(tmp_path, tiny_model_dir, monkeypatch,
                                                                            lean_run):
    """`validate --overwrite` killed after its scoring leaves the old run whole (no new scores beside the old
    summary), and the same command resumes it, reusing the finished scoring."""
    import shutil

    import pyarrow.parquet as pq

    from ches_filter import validate as validate_module
    from ches_filter.run import pipeline as pipeline_module

    data, finished_run = lean_run
    out = tmp_path / "out"
    shutil.copytree(finished_run, out)
    args = ["validate", data, "-o", str(out), "--model", str(tiny_model_dir), *LEAN]
    finished = pq.read_table(out / "validate.parquet")
    old = {name: (out / name).read_bytes() for name in ("scores.parquet", "summary.json", "validate.parquet")}
    original = validate_module._Trainer.train
    monkeypatch.setattr(validate_module._Trainer, "train", lambda self, *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    again = [*args, "--overwrite", "--measures", "ches,ln_ches,edit_distance"]
    interrupted = CliRunner().invoke(main, again)
    assert interrupted.exit_code == 130, interrupted.output
    monkeypatch.setattr(validate_module._Trainer, "train", original)
    assert {name: (out / name).read_bytes() for name in old} == old  # the old run, whole
    assert "edit_distance" in pq.read_table(out / validate_module.NEW_SCORES).column_names  # the new scoring, beside
    # The same command reuses the finished scoring: no scorer is built again.
    monkeypatch.setattr(pipeline_module, "build_scorer", lambda *a, **k: pytest.fail("scored again"))
    resumed = CliRunner().invoke(main, again)
    assert resumed.exit_code == 0, resumed.output
    assert sorted(p.name for p in out.iterdir()) == ["scores.parquet", "summary.json", "validate.parquet", "validate.png"]
    assert "edit_distance" in pq.read_table(out / "scores.parquet").column_names  # the new scores replaced the old
    assert pq.read_table(out / "validate.parquet").equals(finished)  # same ranking measures, same seed


# ---------------------------------------------------------------- the real embedded model: the small CI run


@pytest.mark.slow
def test_embedded_model_one_step(tmp_path):
    import pyarrow.parquet as pq

    out = tmp_path / "v"
    cmd = [sys.executable, "-m", "ches_filter", "validate", str(EXAMPLE_HH), "-o", str(out), "--scores", str(GOLDEN),
           "--by", "ln_ches", "--subsets", "top", "--subset-size", "4", "--batch-size", "4", "--eval-size", "2", "-q"]
    result = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=3600)
    assert result.returncode == 0, result.stderr
    assert "verdict" in result.stdout and "top" in result.stdout
    summary = json.loads((out / "summary.json").read_text())
    (entry,) = summary["subsets"]
    assert entry["steps"] == 1 and entry["n"] == 4
    assert entry["loss_first"] == pytest.approx(math.log(2), rel=1e-6)  # policy = reference at the first step
    assert summary["logprob_path"] == "packed" and summary["autocast"] is None
    table = pq.read_table(out / "validate.parquet")
    assert table.num_rows == 4 + 2
    deltas = table.column("dlogp_chosen").to_pylist()
    assert all(math.isfinite(d) for d in deltas)
    # One Adam step of the default lr moves every trained y+ far above float32 noise (~1e-4 nats).
    trained = [d for d, s in zip(deltas, table.column("set").to_pylist()) if s == "subset"]
    assert min(abs(d) for d in trained) > 1e-2
    # The trained pairs are the 4 highest-LN-CHES usable pairs outside the eval set (LN-CHES, not CHES: CHES
    # grows with length, and its top pairs are the sample's longest, 4x the training time on this CPU).
    golden = pq.read_table(GOLDEN)
    rows = set(table.column("row_index").to_pylist()[:4])
    eval_rows = set(summary["eval_rows"])
    ches = golden.column("ln_ches").to_pylist()
    ok = [i for i, s in enumerate(golden.column("status").to_pylist()) if s == "ok" and i not in eval_rows]
    assert rows == set(sorted(ok, key=lambda i: (ches[i], i))[-4:])
