"""Memory: the LM head in chunks and its stated bound, gradient checkpointing, out-of-memory back-off in every pass, the fit ceiling, weights loaded straight to the device."""

from __future__ import annotations

from ches_filter.engine import Engine
import collections
import json
from pathlib import Path

import pytest
import torch

from ches_filter.config import ScoreConfig, ValidateConfig

from conftest import EXAMPLE_HH, GOLDEN, one_error_line, pairs_of, random_pairs, read_hh, tiny_causal_llama, tiny_gpt2, tiny_llama


def _dropout_rates(lm) -> list[float]:
    return [m.p for m in lm.modules() if isinstance(m, torch.nn.Dropout)]


# ------------------------------------------------------------------ 1. dropout
def test_a_model_object_in_training_mode_is_scored_as_in_eval_mode_and_given_back(embedded_tokenizer):
    from ches_filter.api import score_pairs

    rows = read_hh(6)
    lm = tiny_gpt2(len(embedded_tokenizer))
    expected = score_pairs(rows, model=lm.eval(), tokenizer=embedded_tokenizer, quiet=True)
    lm.train()
    lm.transformer.h[1].eval()  # a mixed state comes back mixed
    for _ in range(2):  # dropout would draw new masks each time
        got = score_pairs(rows, model=lm, tokenizer=embedded_tokenizer, quiet=True)
        for measure in ("ches", "ln_ches"):
            assert got.column(measure).to_pylist() == expected.column(measure).to_pylist()
    assert lm.training and lm.transformer.h[0].training and not lm.transformer.h[1].training
    assert _dropout_rates(lm) and set(_dropout_rates(lm)) == {0.1}
    assert lm.config.attn_pdrop == 0.1 and all(p.requires_grad for p in lm.parameters())


def _validate(tmp_path, name, lm, tokenizer, **config):
    from ches_filter.model import LoadedModel
    from ches_filter.validate import run_validate

    loaded = LoadedModel(decoder=lm, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32,
                         info={"model": "tiny-gpt2", "max_position_embeddings": 4096})
    settings = dict(by="ln_ches", subsets="top,bottom", subset_size=3, eval_size=2, batch_size=3, lr=1e-3)
    settings.update(config)
    summary = run_validate(str(EXAMPLE_HH), str(tmp_path / name), ValidateConfig(**settings),
                           ScoreConfig(quiet=True, max_batch_tokens=4096), scores=str(GOLDEN), model=loaded)
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / name / "validate.parquet")
    return summary, table


def test_validate_with_gradient_checkpointing_gives_the_same_dlogp_on_a_model_with_dropout(tmp_path, embedded_tokenizer):
    lm = tiny_gpt2(len(embedded_tokenizer))
    lm.train()  # as a training script would hand it over
    wants = [p.requires_grad for p in lm.parameters()]
    _, plain = _validate(tmp_path, "plain", lm, embedded_tokenizer)
    assert lm.training and set(_dropout_rates(lm)) == {0.1} and [p.requires_grad for p in lm.parameters()] == wants
    _, checkpointed = _validate(tmp_path, "ckpt", lm, embedded_tokenizer, gradient_checkpointing=True)
    assert lm.training and set(_dropout_rates(lm)) == {0.1} and lm.config.resid_pdrop == 0.1
    assert not any(getattr(m, "gradient_checkpointing", False) for m in lm.modules())
    a, b = plain.column("dlogp_chosen").to_pylist(), checkpointed.column("dlogp_chosen").to_pylist()
    assert any(abs(x) > 1e-3 for x in a)  # training moved something
    assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
    assert plain.column("logp_chosen_before").to_pylist() == checkpointed.column("logp_chosen_before").to_pylist()


@pytest.mark.parametrize("packed", [True, False])
def test_the_head_in_chunks_gives_the_same_logprobs_and_gradients(packed):
    """Chunks of 3 positions (each recomputed in the backward pass) against one chunk for all 100 positions."""
    from ches_filter.logprobs import pair_logprobs

    lm = tiny_causal_llama(torch.float64)
    pairs = random_pairs(6)
    results = []
    for elements in (96 * 3, 1 << 40):
        lm.zero_grad(set_to_none=True)
        lm.requires_grad_(True)
        got = pair_logprobs(lm, pairs, packed=packed, grad=True, head_elements=elements)
        (got.chosen.sum() - 0.5 * got.rejected.sum()).backward()
        results.append((got.chosen.detach(), got.rejected.detach(), [p.grad.clone() for p in lm.parameters()]))
        no_grad = pair_logprobs(lm, pairs, packed=packed, grad=False, head_elements=elements)
        assert torch.equal(no_grad.chosen, got.chosen.detach()) and torch.equal(no_grad.rejected, got.rejected.detach())
    (c1, r1, g1), (c2, r2, g2) = results
    assert torch.allclose(c1, c2, rtol=1e-12) and torch.allclose(r1, r2, rtol=1e-12)
    for a, b in zip(g1, g2):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-14)


def test_head_chunk_sizes_and_the_stated_bound():
    from ches_filter.logprobs import HEAD_CHUNK_ELEMENTS, head_chunk_positions, head_peak_bytes

    assert head_chunk_positions(131072) == 256 and head_chunk_positions(49152) == 682
    assert head_chunk_positions(10**9) == 1  # a vocabulary larger than a chunk: one position at a time
    assert head_peak_bytes(131072) == 16 * 256 * 131072 == 16 * HEAD_CHUNK_ELEMENTS  # 512 MiB


BENCH_STEP = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_validate_step.py"


def _step_memory(*runs: list[str]) -> list[dict]:
    """``bench_validate_step.py --hidden 16`` with each argument list, one after another in one new process.

    Only the first run's peak is exact: a later one reuses memory the earlier ones freed, so its rise
    can read low (never high).
    """
    import subprocess
    import sys

    code = ("import runpy, sys\n"
            f"bench = runpy.run_path({str(BENCH_STEP)!r})\n"
            f"for args in {[['--hidden', '16', *run] for run in runs]!r}:\n"
            "    bench['main'](args)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    return [json.loads(line) for line in done.stdout.strip().splitlines()[-len(runs):]]


@pytest.mark.slow
def test_one_validate_step_with_a_128k_vocabulary_stays_under_the_stated_bound():
    """131,072-token vocabulary, one micro-batch of 8,032 padded tokens (7,936 response positions).

    The float32 logits of those positions alone would be 4.2 GB (17 GB with
    cross-entropy's copies and gradients); the reference pass plus one Adam
    step must stay under the bound the code states (gradients and Adam state
    12 B/param + one head chunk 512 MiB + the decoder's activations), measured
    as the rise of the process's peak resident set. Measured 16:35 UTC: 0.49 GB
    of a 0.63 GB bound. At 1,024 tokens the same check run with the head in
    one chunk (the code before chunking) breaks the chunked run's bound: the
    measurement can tell them apart.
    """
    big, chunked = _step_memory(["--max-batch-tokens", "8192"], ["--max-batch-tokens", "1024"])
    assert big["micro_batches"] == 1 and big["padded_tokens"] > 8000 and big["response_positions"] > 7900
    assert big["within_bound"], big  # measured first in its process: exact
    assert big["peak_rise_bytes"] < big["unchunked_float32_logits_bytes"] / 4
    (whole,) = _step_memory(["--max-batch-tokens", "1024", "--head-elements", str(1 << 40)])
    assert whole["peak_rise_bytes"] > chunked["bound_bytes"]["total"], (whole, chunked)
    assert whole["loss"] == pytest.approx(chunked["loss"], rel=1e-6)


# ------------------------------------------------------------------ 2b. out-of-memory back-off
class _InjectedOOM:
    """Wraps pair_logprobs: batches of more than ``most`` pairs run out of memory, and so do the passes
    (forward or backward) numbered in ``fail_calls``; counts what ran."""

    def __init__(self, real, most=None, fail_calls=(), fail_backward=()):
        self.real, self.most, self.fail_calls, self.fail_backward = real, most, set(fail_calls), set(fail_backward)
        self.calls = 0
        self.failed = 0

    def __call__(self, lm, pairs, **kwargs):
        self.calls += 1
        if (self.most is not None and len(pairs) > self.most) or self.calls in self.fail_calls:
            self.failed += 1
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 4.00 GiB (injected)")
        got = self.real(lm, pairs, **kwargs)
        if self.calls in self.fail_backward and got.chosen.requires_grad:
            def boom(grad):
                self.failed += 1
                raise RuntimeError("CUDA out of memory in the backward pass (injected)")

            got.chosen.register_hook(boom)
        return got


def test_validate_absorbs_out_of_memory_in_every_pass(tmp_path, embedded_tokenizer, monkeypatch, caplog):
    from ches_filter import logprobs, validate

    lm = tiny_gpt2(len(embedded_tokenizer), dropout=0.0).to(torch.float64)  # float64: batching's rounding is 1e-13
    settings = dict(subset_size=4, eval_size=2, batch_size=4)
    _, expected = _validate(tmp_path, "clean", lm, embedded_tokenizer, **settings)
    # Any pass over more than 2 pairs fails (reference, training and after-training passes all start at
    # 4096 tokens), call 9 fails outright on one pair (LM-head chunk halved), and the backward pass of
    # call 12 fails after the step's first micro-batch has added its gradient (the step is redone).
    flaky = _InjectedOOM(logprobs.pair_logprobs, most=2, fail_calls={9}, fail_backward={12})
    monkeypatch.setattr(validate, "pair_logprobs", flaky)
    with caplog.at_level("WARNING", logger="ches_filter"):
        _, got = _validate(tmp_path, "flaky", lm, embedded_tokenizer, **settings)
    assert flaky.failed >= 4
    assert "out of memory on 4 pairs; retrying with --max-batch-tokens" in caplog.text
    assert "out of memory on one pair; retrying with LM-head chunks" in caplog.text
    assert got.num_rows == expected.num_rows
    for column in ("logp_chosen_before", "logp_rejected_before", "logp_chosen_after", "dlogp_chosen", "dlogp_rejected"):
        assert got.column(column).to_pylist() == pytest.approx(expected.column(column).to_pylist(), rel=1e-9, abs=1e-9)


def test_validate_out_of_memory_on_one_pair_is_one_line_in_the_end(tmp_path, embedded_tokenizer, monkeypatch):
    from ches_filter import logprobs, validate
    from ches_filter.errors import OutOfMemoryError

    lm = tiny_gpt2(len(embedded_tokenizer), dropout=0.0).eval().requires_grad_(False)
    monkeypatch.setattr(validate, "pair_logprobs", _InjectedOOM(logprobs.pair_logprobs, most=0))
    with pytest.raises(OutOfMemoryError, match=r"^one pair of \d+ tokens does not fit in memory; lower `--max-length`$"):
        _validate(tmp_path, "never", lm, embedded_tokenizer, subset_size=2, eval_size=0, batch_size=2)
    assert not lm.training and not any(p.requires_grad for p in lm.parameters())  # given back as it came


def test_displacement_absorbs_out_of_memory_in_first_order_and_real_steps(embedded_tokenizer, monkeypatch, caplog):
    from ches_filter import displacement, logprobs
    from ches_filter.config import DisplacementConfig
    from ches_filter.displacement import measure_displacement
    from ches_filter.model import LoadedModel

    lm = tiny_gpt2(len(embedded_tokenizer), dropout=0.1)
    loaded = LoadedModel(decoder=lm, tokenizer=embedded_tokenizer, device=torch.device("cpu"), dtype=torch.float32,
                         info={"model": "tiny-gpt2", "max_position_embeddings": 4096})
    rows = read_hh(8)
    config = DisplacementConfig(sample=3, steps=2, lr=1e-2)
    expected = measure_displacement(rows, config, ScoreConfig(quiet=True), model=loaded)
    # Call 2: g- of the first pair; call 5: the first real step's pass; backward of call 9: a later step's.
    flaky = _InjectedOOM(logprobs.pair_logprobs, fail_calls={2, 5}, fail_backward={9})
    monkeypatch.setattr(displacement, "pair_logprobs", flaky)
    with caplog.at_level("WARNING", logger="ches_filter"):
        got = measure_displacement(rows, config, ScoreConfig(quiet=True), model=loaded)
    assert flaky.failed == 3 and caplog.text.count("out of memory on one pair") == 1  # said once
    assert got.column_names == expected.column_names
    for name in got.column_names:
        assert got.column(name).to_pylist() == pytest.approx(expected.column(name).to_pylist(), rel=1e-6, abs=1e-9), name
    assert set(_dropout_rates(lm)) == {0.1}


def test_the_head_check_raises_what_the_model_raises():
    """The head-exactness check no longer reads an error (out of memory, a kernel refusing a dtype) as "not exact"."""
    from ches_filter.logprobs import head_is_exact

    lm = tiny_causal_llama()

    def broken(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory (injected)")

    lm.model.layers[0].mlp.forward = broken
    with pytest.raises(torch.OutOfMemoryError):
        head_is_exact(lm, "cpu")
    assert getattr(lm, "_ches_filter_head_exact", None) is None  # nothing cached from a failed check
    assert head_is_exact(tiny_causal_llama(), "cpu") is True


# ------------------------------------------------------------------ 4. loading straight to the device
def test_weights_are_loaded_straight_to_the_device(monkeypatch):
    from ches_filter.model import from_pretrained_kwargs

    got = from_pretrained_kwargs(torch.bfloat16, torch.device("cuda", 1), "sdpa")
    assert got == {"dtype": torch.bfloat16, "attn_implementation": "sdpa", "device_map": {"": torch.device("cuda", 1)}}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert from_pretrained_kwargs(torch.float32, torch.device("cuda"), "sdpa")["device_map"] == {"": torch.device("cuda", 0)}
    assert from_pretrained_kwargs(torch.float32, torch.device("cpu"), "eager")["device_map"] == {"": torch.device("cpu")}
    assert from_pretrained_kwargs(torch.float32, torch.device("cpu"), "sdpa", device_map="auto")["device_map"] == "auto"


def test_load_model_passes_the_device_map_and_the_weights_arrive_there(tiny_model_dir, monkeypatch):
    """Every single-device load goes through device_map={"": device} (on this CPU too), and the result is the same model."""
    from transformers import AutoModelForCausalLM

    from ches_filter.model import load_model

    seen = []
    real = AutoModelForCausalLM.from_pretrained.__func__

    def spy(cls, *args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", classmethod(spy))
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu", with_lm_head=True)
    assert seen == [{"": torch.device("cpu")}]
    assert {p.device.type for p in loaded.decoder.parameters()} == {"cpu"}
    reference = real(AutoModelForCausalLM, str(tiny_model_dir), dtype=torch.float32)
    for (name, a), (_, b) in zip(loaded.decoder.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(a, b), name


# ------------------------------------------------------------------ 6. known ceilings
def test_the_memory_ceiling_is_computed_and_stated():
    from ches_filter.model import training_memory_problem

    gib = 2**30
    # Llama-3-8B (8.03 B) with Adam: 16 B/param = 119.7 GiB, on an 80 GB card: refused with the numbers.
    got = training_memory_problem(8_030_000_000, 16, "cuda:0", 79 * gib, 500 * gib)
    assert "119.7 GiB" in got and "79.0 GiB are free" in got and "`--optimizer sgd`" in got and "\n" not in got
    # ~7 B on a 141 GB H200 (131 GiB): 104 GiB, fits; SGD halves the need.
    assert training_memory_problem(7_000_000_000, 16, "cuda:0", 131 * gib, 500 * gib) is None
    assert training_memory_problem(8_030_000_000, 8, "cuda:0", 79 * gib, 500 * gib) is None
    # On the CPU the initial copy counts too (20 B/param); already loaded weights are not counted twice.
    assert "with the initial copy" in training_memory_problem(1_000_000_000, 16, "cpu", 18 * gib, 18 * gib)
    assert training_memory_problem(1_000_000_000, 16, "cpu", 17 * gib, 17 * gib, on_device=True) is None
    # Host RAM for the float32 copy of the initial weights on a GPU run.
    assert "host RAM" in training_memory_problem(8_030_000_000, 16, "cuda:0", 131 * gib, 20 * gib)
    assert training_memory_problem(8_030_000_000, 16, "cuda:0", None, None) is None  # unknown: not refused


def test_validate_refuses_a_model_that_cannot_fit_before_reading_anything(tmp_path, tiny_model_dir):
    """A 34 B-parameter config (weights not even read): refused at once with the computed need, exit 2."""
    import shutil

    from click.testing import CliRunner

    from ches_filter.cli import main

    big = tmp_path / "big"
    shutil.copytree(tiny_model_dir, big)
    config = json.loads((big / "config.json").read_text())
    config.update(hidden_size=16384, intermediate_size=65536, num_hidden_layers=8, num_attention_heads=128,
                  num_key_value_heads=8)
    (big / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    result = CliRunner().invoke(main, ["validate", str(EXAMPLE_HH), "-o", str(out), "--model", str(big), "--device",
                                       "cpu", "-q"])  # refused before it scores
    assert result.exit_code == 2, result.output
    line = one_error_line(result)
    assert "does not fit on cpu for validate" in line and "B parameters x 16 bytes" in line and "GiB are free" in line
    assert not out.exists()


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
