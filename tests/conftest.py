"""Shared fixtures: real data paths, tiny random models built in code, the embedded model."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.dev.jsonl.gz"
EXAMPLE_HH = REPO / "examples" / "data" / "hh_rlhf_harmless_300.jsonl"


def read_hh(n: int | None = None) -> list[dict]:
    """First ``n`` HH-RLHF rows: ../shared/data when present, else the shipped example slice."""
    if HH_FILE.exists():
        with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
    else:
        rows = [json.loads(line) for line in EXAMPLE_HH.read_text(encoding="utf-8").splitlines()]
    return rows[:n] if n is not None else rows


@pytest.fixture(scope="session")
def hh_rows() -> list[dict]:
    return read_hh()


def tiny_llama(**overrides):
    """A 2-layer random Llama (float32, eval mode); deterministic weights."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )
    config.update(overrides)
    attn = config.pop("attn_implementation")
    model = LlamaModel(LlamaConfig(**config))
    model.config._attn_implementation = attn
    return model.eval()


def tiny_gemma3(**overrides):
    """A 4-layer random Gemma-3 text model with a short sliding window (sliding and full layers)."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(0)
    config = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    config.update(overrides)
    attn = config.pop("attn_implementation", "sdpa")
    model = Gemma3TextModel(Gemma3TextConfig(**config))
    model.config._attn_implementation = attn
    return model.eval()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct in float32 on CPU (converted once, then cached)."""
    from ches_filter.model import load_model

    return load_model(None, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded):
    """A from_pretrained directory: the embedded tokenizer + a tiny random Llama with its vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(embedded.tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=embedded.tokenizer.bos_token_id, eos_token_id=embedded.tokenizer.eos_token_id,
        pad_token_id=embedded.tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    embedded.tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """The CLI installs its own handler and stops propagation; undo it so caplog sees records."""
    import logging

    yield
    log = logging.getLogger("ches_filter")
    log.handlers[:] = []
    log.propagate = True
    log.setLevel(logging.NOTSET)
