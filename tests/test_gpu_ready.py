"""Issue 17: what a GPU run would show first, checked on this CPU.

Dropout in every pass, the LM head's memory, the out-of-memory back-off of
validate and displacement, the fp16 and FlashAttention-2 policies, loading
straight to the device and the memory ceiling of validate.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ches_filter.config import ScoreConfig, ValidateConfig

from conftest import EXAMPLE_HH, read_hh

GOLDEN = Path(__file__).resolve().parent / "golden" / "hh300_scores.parquet"


def tiny_gpt2(vocab: int, dropout: float = 0.1, seed: int = 0):
    """A 2-layer random GPT-2 with dropout everywhere (embeddings, attention, residuals)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=4096, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    lm = GPT2LMHeadModel(config)
    lm.config._attn_implementation = "sdpa"
    return lm


def _dropout_rates(lm) -> list[float]:
    return [m.p for m in lm.modules() if isinstance(m, torch.nn.Dropout)]


# ------------------------------------------------------------------ 1. dropout
def test_a_model_object_in_training_mode_is_scored_as_in_eval_mode_and_given_back(embedded_tokenizer):
    from ches_filter.scoring import score_pairs

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
    settings = dict(by="ches", subsets="top,bottom", subset_size=3, eval_size=2, batch_size=3, lr=1e-3)
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
