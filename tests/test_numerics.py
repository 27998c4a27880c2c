"""Numerics: no inf/NaN in CHES for 4096-dim states, 2,000-token responses and bf16 compute.

The paper's own code overflows to inf on Llama-3-8B: summing 2,000 final hidden
states whose entries reach the hundreds, then squaring the norm, leaves the
range of half precision. ches-filter upcasts each selected hidden state to
float64 before summing (:func:`ches_filter.ches.gather_sums`), and every
product after that is float64.
"""

import pytest
import torch

from ches_filter.batching import EncodedPair
from ches_filter.ches import ches_from_sums, gather_sums, ln_ches_from_sums
from ches_filter.engine import Engine

from conftest import read_hh, tiny_llama

FP16_MAX = torch.finfo(torch.float16).max
FP32_MAX = torch.finfo(torch.float32).max


def test_sums_are_float64_even_from_bf16_states():
    torch.manual_seed(0)
    # 2,000 positions of 4096 entries in the hundreds, as Llama-3-8B's final states.
    hidden = (torch.randn(1, 2000, 4096) * 300).to(torch.bfloat16)
    index = torch.arange(2000)
    sums = gather_sums(hidden, index, torch.zeros(2000, dtype=torch.long), 1)
    assert sums.dtype == torch.float64
    assert torch.allclose(sums[0], hidden[0].double().sum(0), rtol=1e-12, atol=1e-6)
    ches = ches_from_sums(sums, sums.flip(-1))
    assert torch.isfinite(ches).all()
    # The same numbers in half precision overflow: the hazard is real at this scale.
    s_half = hidden[0].half().sum(0)
    assert torch.isinf((s_half * s_half).sum())


def test_products_of_huge_sums_stay_finite():
    """Sums whose squared norm exceeds float32's range still give exact float64 CHES."""
    torch.manual_seed(0)
    s_c = torch.randn(3, 4096, dtype=torch.float64) * 1e19
    s_r = s_c + torch.randn(3, 4096, dtype=torch.float64) * 1e18
    assert ((s_c * s_c).sum(-1) > FP32_MAX).all()
    ches = ches_from_sums(s_c, s_r)
    ln = ln_ches_from_sums(s_c, s_r, torch.tensor([2000, 2000, 1]), torch.tensor([2000, 1, 2000]))
    assert ches.dtype == ln.dtype == torch.float64
    assert torch.isfinite(ches).all() and torch.isfinite(ln).all()
    naive = (s_c * s_r).sum(-1) - (s_c * s_c).sum(-1)
    assert torch.allclose(ches, naive, rtol=1e-6)


def test_engine_returns_float64_sums_for_a_bf16_model():
    model = tiny_llama().to(torch.bfloat16)
    engine = Engine(model, "cpu", max_batch_tokens=4096)
    pair = EncodedPair(tuple(range(5, 25)), tuple(range(30, 60)) + (2,), tuple(range(60, 75)) + (2,))
    states = engine.run([pair, pair])
    for field in ("s_chosen", "s_rejected", "last_chosen", "last_rejected"):
        assert getattr(states, field).dtype == torch.float64


# --------------------------------------------------------------------------
# The whole pipeline on a wide random model in bf16
# --------------------------------------------------------------------------

HIDDEN = 4096
RESPONSE_TOKENS = 2000
NORM_SCALE = 64.0  # final-norm gain: states with entries in the hundreds, like Llama-3-8B's


@pytest.fixture(scope="module")
def wide(embedded_tokenizer):
    """A 2-layer random Llama with 4096-dim hidden states, in bfloat16, with the embedded tokenizer (no weights read)."""
    from transformers import LlamaConfig, LlamaModel

    from ches_filter.model import LoadedModel

    torch.manual_seed(0)
    tokenizer = embedded_tokenizer
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=HIDDEN, intermediate_size=1024, num_hidden_layers=2,
        num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    model = LlamaModel(config)
    model.config._attn_implementation = "sdpa"
    with torch.no_grad():
        model.norm.weight.fill_(NORM_SCALE)
    model = model.to(torch.bfloat16).eval().requires_grad_(False)
    info = {"model": "random-wide-llama", "dtype": "bfloat16", "device": "cpu", "max_position_embeddings": 8192}
    return LoadedModel(decoder=model, tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.bfloat16, info=info)


def _long_text(tokenizer, words, n_tokens, offset):
    text, i = "", offset
    while len(tokenizer(text, add_special_tokens=False)["input_ids"]) < n_tokens:
        text += " " + " ".join(words[i : i + 200])
        i += 200
    ids = tokenizer(text, add_special_tokens=False)["input_ids"][:n_tokens]
    return tokenizer.decode(ids)


@pytest.mark.slow
def test_wide_bf16_model_with_2000_token_responses_gives_finite_scores(wide):
    from ches_filter import score_pairs

    words = " ".join(r["chosen"] + " " + r["rejected"] for r in read_hh(200)).split()
    chosen = _long_text(wide.tokenizer, words, RESPONSE_TOKENS, 0)
    rejected = _long_text(wide.tokenizer, words, RESPONSE_TOKENS, 5000)
    rows = [{"prompt": "Tell me a long story.", "chosen": chosen, "rejected": rejected}]
    table = score_pairs(rows, model=wide, progress=False, max_batch_tokens=8192)
    assert table.column("status").to_pylist() == ["ok"]
    assert min(table.column("chosen_tokens")[0].as_py(), table.column("rejected_tokens")[0].as_py()) >= RESPONSE_TOKENS - 5
    ches = table.column("ches").to_pylist()
    ln_ches = table.column("ln_ches").to_pylist()
    assert all(torch.isfinite(torch.tensor(ches + ln_ches)))

    # Reference for the first pair, side by side, from the model's own bf16 states.
    from ches_filter.batching import PairEncoder
    from ches_filter.formats import Columns, normalize_row

    encoded = PairEncoder(wide.tokenizer).encode(normalize_row(rows[0], "explicit_text", Columns()))
    sums = []
    for response in (encoded.chosen, encoded.rejected):
        ids = torch.tensor([list(encoded.prompt) + list(response[:-1])])
        with torch.inference_mode():
            hidden = wide.decoder(input_ids=ids).last_hidden_state[0, len(encoded.prompt) - 1 :]
        assert hidden.dtype == torch.bfloat16 and hidden.shape[0] == len(response)
        # What a half-precision pipeline would do with these states: overflow.
        s_half = hidden.half().sum(0)
        assert torch.isinf((s_half * s_half).sum())
        sums.append(hidden.double().sum(0))
    norm2 = float((sums[0] ** 2).sum())
    assert norm2 > FP16_MAX
    reference = float(ches_from_sums(sums[0][None], sums[1][None])[0])
    # Packed and plain bf16 forwards differ in rounding; the error is small next to ||S+||^2.
    assert abs(ches[0] - reference) <= 2e-2 * norm2
