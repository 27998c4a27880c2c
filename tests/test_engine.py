"""Engine exactness on tiny random models: every strategy against a direct per-position loop."""

import pytest
import torch

from ches_filter.batching import EncodedPair, token_budget_batches
from ches_filter.ches import ches_from_sums
from ches_filter.engine import Engine, packed_support

from conftest import tiny_gemma3, tiny_llama


def random_pairs(n, vocab=256, seed=0, prompt=(3, 20), response=(1, 15)):
    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return tuple(torch.randint(4, vocab, (length,), generator=g).tolist())

    pairs = []
    for _ in range(n):
        pairs.append(EncodedPair(ids(*prompt), ids(*response) + (2,), ids(*response) + (2,)))
    return pairs


def reference(model, pairs):
    """S+ and S- by the definition: run P + R, sum the state at index |P|-1+k for k = 0..|R|-1."""
    out = []
    for pair in pairs:
        sums = []
        for resp in (pair.chosen, pair.rejected):
            ids = torch.tensor([list(pair.prompt) + list(resp)])
            with torch.no_grad():
                hidden = model(input_ids=ids).last_hidden_state[0]
            p = len(pair.prompt)
            total = torch.zeros(hidden.shape[-1], dtype=torch.float64)
            for k in range(len(resp)):
                total += hidden[p - 1 + k].double()
            sums.append(total)
        out.append(sums)
    return torch.stack([s[0] for s in out]), torch.stack([s[1] for s in out])


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("builder", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3-sliding"])
@pytest.mark.parametrize("strategy", ["packed", "plain"])
@pytest.mark.parametrize("budget", [1, 64, 100_000])
def test_strategies_match_definition(builder, strategy, budget):
    model = builder()
    # Prompts longer than the window of 8 (gemma) and responses longer than prompts both occur.
    pairs = random_pairs(9, prompt=(2, 30), response=(1, 25))
    ref_c, ref_r = reference(model, pairs)
    states = Engine(model, "cpu", strategy=strategy, max_batch_tokens=budget).run(pairs)
    assert rel(states.s_chosen, ref_c) < 1e-5
    assert rel(states.s_rejected, ref_r) < 1e-5
    ches = ches_from_sums(states.s_chosen, states.s_rejected)
    ches_ref = ches_from_sums(ref_c, ref_r)
    assert torch.allclose(ches, ches_ref, rtol=1e-4, atol=1e-6 * ches_ref.abs().max().item())


def test_last_position_states():
    model = tiny_llama()
    pair = random_pairs(1)[0]
    states = Engine(model, "cpu", strategy="packed").run([pair])
    ids = torch.tensor([list(pair.prompt) + list(pair.chosen)])
    with torch.no_grad():
        hidden = model(input_ids=ids).last_hidden_state[0]
    # The last counted position predicts EOS: index |P| + |R| - 2.
    expected = hidden[len(pair.prompt) + len(pair.chosen) - 2].double()
    assert torch.allclose(states.last_chosen[0], expected, atol=1e-5)


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_plain_padding_side_does_not_matter(padding_side):
    model = tiny_llama()
    pairs = random_pairs(6, seed=3)
    ref_c, ref_r = reference(model, pairs)
    states = Engine(model, "cpu", strategy="plain", max_batch_tokens=10_000, padding_side=padding_side).run(pairs)
    assert rel(states.s_chosen, ref_c) < 1e-5 and rel(states.s_rejected, ref_r) < 1e-5


def test_eager_attention_packed():
    model = tiny_gemma3(attn_implementation="eager")
    pairs = random_pairs(5, seed=4, prompt=(10, 20))
    ref_c, ref_r = reference(model, pairs)
    states = Engine(model, "cpu", strategy="packed", max_batch_tokens=10_000).run(pairs)
    assert rel(states.s_chosen, ref_c) < 1e-5 and rel(states.s_rejected, ref_r) < 1e-5


def test_results_come_back_in_input_order():
    model = tiny_llama()
    pairs = random_pairs(12, seed=5, prompt=(2, 40))
    batched = Engine(model, "cpu", strategy="packed", max_batch_tokens=150).run(pairs)
    for i, pair in enumerate(pairs):
        single = Engine(model, "cpu", strategy="packed").run([pair])
        assert torch.allclose(batched.s_chosen[i], single.s_chosen[0], rtol=1e-5, atol=1e-5)
        assert torch.allclose(batched.s_rejected[i], single.s_rejected[0], rtol=1e-5, atol=1e-5)


def test_oom_backoff_halves_budget_and_loses_nothing(caplog):
    model = tiny_llama()
    pairs = random_pairs(10, seed=6)
    expected = Engine(model, "cpu", strategy="packed", max_batch_tokens=100_000).run(pairs)
    engine = Engine(model, "cpu", strategy="packed", max_batch_tokens=100_000)
    real_forward = engine._forward
    seen = []

    def flaky(batch):
        seen.append(len(batch))
        if len(batch) > 3:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected)")
        return real_forward(batch)

    engine._forward = flaky
    progress = []
    with caplog.at_level("WARNING"):
        got = engine.run(pairs, on_progress=progress.append)
    assert sum(progress) == 10 and max(progress) <= 3  # failed tries are not counted as progress
    assert seen[0] == 10  # the first try fails, then halves until batches fit
    assert sum(s for s in seen if s <= 3) == 10  # every pair scored exactly once
    assert engine.max_batch_tokens < 100_000
    assert "out of memory" in caplog.text
    assert torch.equal(got.s_chosen, expected.s_chosen) or rel(got.s_chosen, expected.s_chosen) < 1e-6


def test_oom_on_single_pair_is_a_clear_error():
    model = tiny_llama()
    engine = Engine(model, "cpu", strategy="packed")

    def always(batch):
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")

    engine._forward = always
    with pytest.raises(RuntimeError, match="does not fit"):
        engine.run(random_pairs(1))


def test_non_oom_errors_propagate():
    engine = Engine(tiny_llama(), "cpu", strategy="packed")

    def broken(batch):
        raise ValueError("boom")

    engine._forward = broken
    with pytest.raises(ValueError, match="boom"):
        engine.run(random_pairs(2))


def test_packed_support_refuses_unknown_layer_types():
    model = tiny_llama()
    model.config.layer_types = ["full_attention", "chunked_attention"]
    ok, why = packed_support(model.config, "sdpa")
    assert not ok and "chunked_attention" in why
    assert not packed_support(tiny_llama().config, "flash_attention_2")[0]


def test_auto_falls_back_to_plain_when_packed_unsupported(caplog):
    model = tiny_llama()
    model.config.layer_types = ["full_attention", "chunked_attention"]
    with caplog.at_level("WARNING"):
        engine = Engine(model, "cpu", strategy="auto")
    assert engine.strategy == "plain"
    assert "plain strategy" in caplog.text


def test_auto_self_check_picks_packed_when_exact():
    assert Engine(tiny_gemma3(), "cpu", strategy="auto").strategy == "packed"


def test_token_budget_batches_cover_everything_once():
    costs = [5, 50, 7, 30, 30, 1, 99]
    batches = token_budget_batches(costs, 60)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(costs)))
    assert batches[0] == [6]  # longest first, alone (over budget)
    for b in batches:
        assert len(b) == 1 or len(b) * max(costs[i] for i in b) <= 60
    assert token_budget_batches(costs, 10**6, max_batch_size=2)[0] == [6, 1]


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_is_reported_per_batch(workers):
    pairs = random_pairs(12, seed=8)
    engine = Engine(tiny_llama(), "cpu", strategy="packed", max_batch_tokens=1, workers=workers)
    progress = []
    engine.run(pairs, on_progress=progress.append)
    assert progress == [1] * 12  # budget 1: one pair per batch, one report each


# Tiny random models of the decoder architectures users bring most often. Each
# has its own attention/mask code in transformers (biases, q/k norms, parallel
# blocks, learned absolute positions, MoE, soft-capping, NoPE layers, sliding
# windows on all or some layers): the tree mask and restarted positions must be
# exact for all of them, and `auto` must pick the packed path.
_ARCHS = {
    "qwen2": ("Qwen2Config", {}),
    "qwen2-sliding": ("Qwen2Config", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0)),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=8)),
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "phi3": ("Phi3Config", dict(pad_token_id=0)),
    "olmo2": ("Olmo2Config", {}),
    "gpt_neox": ("GPTNeoXConfig", {}),
    "gpt2": ("GPT2Config", dict(n_embd=64, n_layer=4, n_head=4, n_positions=512)),
    "falcon": ("FalconConfig", dict(new_decoder_architecture=False)),
    "stablelm": ("StableLmConfig", {}),
    "cohere": ("CohereConfig", {}),
    "granite": ("GraniteConfig", {}),
    "smollm3-nope-sliding": ("SmolLM3Config", dict(pad_token_id=0, bos_token_id=1, eos_token_id=2,
                                                  use_sliding_window=True, sliding_window=8)),
    "gemma2-softcap-eager": ("Gemma2Config", dict(head_dim=16, sliding_window=8, attn_implementation="eager")),
}


# The fast tier keeps the architectures with a distinct mask feature (a window on some
# layers, NoPE layers, soft-capping with eager attention); the rest run in the slow tier.
_FAST_ARCHS = {"qwen2-sliding", "smollm3-nope-sliding", "gemma2-softcap-eager"}


@pytest.mark.parametrize(
    "arch", [a if a in _FAST_ARCHS else pytest.param(a, marks=pytest.mark.slow) for a in sorted(_ARCHS)]
)
def test_packed_and_prefix_are_exact_across_architectures(arch):
    import transformers

    class_name, extra = _ARCHS[arch]
    config_class = getattr(transformers, class_name, None)
    if config_class is None:
        pytest.skip(f"transformers {transformers.__version__} has no {class_name}")
    extra = dict(extra)
    attn = extra.pop("attn_implementation", "sdpa")
    config = config_class(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **extra)
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config, attn_implementation=attn).eval()
    # Prompts and responses both longer than the window of 8 where there is one.
    pairs = random_pairs(6, seed=11, prompt=(2, 30), response=(1, 25))
    ref_c, ref_r = reference(model, pairs)
    for strategy in ("auto", "packed", "prefix"):
        engine = Engine(model, "cpu", strategy=strategy, max_batch_tokens=100_000)
        states = engine.run(pairs)
        assert engine.strategy == ("packed" if strategy == "auto" else strategy)
        assert rel(states.s_chosen, ref_c) < 1e-5, strategy
        assert rel(states.s_rejected, ref_r) < 1e-5, strategy
