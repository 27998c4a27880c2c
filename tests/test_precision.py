"""Precision and attention policies: validate never trains under float16 autocast; flash-attention where it cannot run is one line, before anything is written."""

from __future__ import annotations


import pytest
import torch

from ches_filter.config import ScoreConfig, ValidateConfig

from conftest import EXAMPLE_HH, one_error_line, tiny_causal_llama


# ------------------------------------------------------------------ 3. fp16 policy
@pytest.mark.parametrize("dtype, device, bf16, autocast, noted", [
    ("auto", "cuda", True, torch.bfloat16, False),
    ("auto", "cuda", False, None, True),  # V100/T4: float32 training, said once
    ("float16", "cuda", True, None, True),
    ("bfloat16", "cuda", True, torch.bfloat16, False),
    ("float32", "cuda", True, None, False),
    ("auto", "cpu", False, None, False),
    ("bfloat16", "cpu", False, torch.bfloat16, False),
])
def test_validate_never_trains_under_float16_autocast(monkeypatch, dtype, device, bf16, autocast, noted):
    from ches_filter.model import training_autocast

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    got, note = training_autocast(dtype, torch.device(device))
    assert got == autocast and (note is not None) == noted
    if noted:
        assert "float32" in note and "underflow" in note


def test_the_trainer_takes_the_policy(monkeypatch, caplog):
    """On a card without bfloat16, `--dtype auto` trains with no autocast (float32), with one warning."""
    from ches_filter import model as model_mod
    from ches_filter.model import LoadedModel
    from ches_filter.validate import _Trainer

    monkeypatch.setattr(model_mod, "resolve_dtype", lambda dtype, device: torch.float16)
    lm = tiny_causal_llama()
    loaded = LoadedModel(decoder=lm, tokenizer=_Tok(), device=torch.device("cpu"), dtype=torch.float32, info={})
    config = ValidateConfig(by="ches", subsets="top", subset_size=1, eval_size=0, batch_size=1)
    with caplog.at_level("WARNING", logger="ches_filter"):
        trainer = _Trainer(loaded, config, ScoreConfig(dtype="auto"))
    assert trainer.autocast is None and "validate trains in float32 here" in caplog.text
    trainer.state.restore()


class _Tok:
    pad_token_id = 0
    eos_token_id = 2


# ------------------------------------------------------------------ 5. FlashAttention-2 policy
@pytest.mark.parametrize("device, weights, autocast, refused", [
    ("cuda", torch.bfloat16, None, None),
    ("cuda", torch.float16, None, None),
    ("cuda", torch.float32, torch.bfloat16, None),  # validate's master weights under autocast
    ("cuda", torch.float32, None, "computes in float32"),
    ("cuda:1", torch.float32, None, "computes in float32"),
    ("cpu", torch.bfloat16, None, "runs on CUDA only"),
    ("mps", torch.float16, None, "runs on CUDA only"),
])
def test_flash_attention_policy(device, weights, autocast, refused):
    from ches_filter.model import flash_attention_problem

    assert flash_attention_problem("sdpa", device, torch.float32) is None
    got = flash_attention_problem("flash_attention_2", device, weights, autocast)
    if refused is None:
        assert got is None
    else:
        assert refused in got and "\n" not in got and "`sdpa`" in got


def test_flash_attention_that_cannot_run_is_one_line_before_anything_is_written(tmp_path, tiny_model_dir):
    from click.testing import CliRunner

    from ches_filter.cli import main

    data = str(EXAMPLE_HH)
    runs = {
        "score": ["score", data, "-o", str(tmp_path / "s.parquet"), "--model", str(tiny_model_dir), "--device", "cpu",
                  "--attn-implementation", "flash_attention_2", "-q"],
        "validate": ["validate", data, "-o", str(tmp_path / "v"), "--model", str(tiny_model_dir), "--device", "cpu",
                     "--attn-implementation", "flash_attention_2", "-q"],  # refused before it scores
        "displacement": ["displacement", data, "-o", str(tmp_path / "d.parquet"), "--model", str(tiny_model_dir),
                         "--device", "cpu", "--attn-implementation", "flash_attention_2", "-q"],
    }
    for name, args in runs.items():
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (name, result.output)
        assert "flash_attention_2` runs on CUDA only" in one_error_line(result), name
    assert sorted(p.name for p in tmp_path.iterdir()) == []
