"""Engine exactness on tiny random models: every strategy against a direct per-position loop."""

from ches_filter.errors import BadFlagError
import pyarrow.parquet as pq
from ches_filter.scoring import table_metadata
import pytest
import torch

from ches_filter.batching import EncodedPair, token_budget_batches
from ches_filter.ches import ches_from_sums
from ches_filter.engine import Engine, packed_support

from conftest import FIVE_PAIRS, error_lines, invoke, pairs_of, tiny_gemma3, tiny_llama, write_jsonl


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


class MaskBlind(torch.nn.Module):
    """A decoder whose attention ignores the mask it is given (plain causal attention).

    Stands for the models the self-check exists for: attention code that
    drops a custom 4D mask. Right-padded plain batches stay exact (a token
    never attends to later padding); tree-masked rows do not.
    """

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, cache=None, use_cache=False):
        return self.inner(input_ids=input_ids, position_ids=position_ids, cache=cache, use_cache=use_cache)


class NoCacheArgument(torch.nn.Module):
    """A decoder whose forward takes no KV-cache argument."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, use_cache=False):
        return self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False)


def test_auto_falls_back_to_plain_when_the_self_check_fails(caplog):
    model = tiny_llama()
    blind = MaskBlind(model)
    with caplog.at_level("WARNING", logger="ches_filter"):
        engine = Engine(blind, "cpu", strategy="auto")
    assert engine.strategy == "plain"
    assert "packed strategy disagrees with the plain one" in caplog.text and "scoring with the plain strategy" in caplog.text
    # Plain on the mask-blind model is still right: it equals plain on the real one.
    pairs = pairs_of(6, seed=3)
    got = engine.run(pairs)
    want = Engine(model, "cpu", strategy="plain").run(pairs)
    for name in ("s_chosen", "s_rejected", "last_chosen", "last_rejected"):
        assert torch.allclose(getattr(got, name), getattr(want, name), rtol=1e-5, atol=1e-6), name
    # ... and the packed rows really would have been wrong: the self-check refused for a reason.
    assert Engine(model, "cpu", strategy="packed")._self_check_error("packed") < 1e-4
    assert engine._self_check_error("packed") > 1e-2


def test_prefix_is_refused_when_it_disagrees_with_plain():
    with pytest.raises(BadFlagError, match="prefix strategy disagrees"):
        Engine(MaskBlind(tiny_llama()), "cpu", strategy="prefix")
    assert Engine(tiny_llama(), "cpu", strategy="prefix").strategy == "prefix"


def test_prefix_is_refused_without_a_cache_argument():
    with pytest.raises(BadFlagError, match="`--engine prefix`.*no KV cache argument"):
        Engine(NoCacheArgument(tiny_llama()), "cpu", strategy="prefix")
    # packed needs no cache, so `auto` still finds it exact.
    assert Engine(NoCacheArgument(tiny_llama()), "cpu", strategy="auto").strategy == "packed"


@pytest.fixture(scope="module")
def bidirectional_model_dir(tmp_path_factory, embedded_tokenizer):
    """A tiny Gemma-3 with bidirectional attention (as EmbeddingGemma): packed and prefix cannot be exact."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tokenizer = embedded_tokenizer
    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=8, max_position_embeddings=512, sliding_window=8,
        use_bidirectional_attention=True, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    path = tmp_path_factory.mktemp("bidirectional")
    Gemma3ForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["score", "prune"])
@pytest.mark.parametrize("engine", ["packed", "prefix"])
def test_cli_refuses_an_engine_that_cannot_be_exact_in_one_line(tmp_path, bidirectional_model_dir, command, engine):
    data = write_jsonl(tmp_path / "d.jsonl", FIVE_PAIRS)
    out = tmp_path / ("s.parquet" if command == "score" else "kept.jsonl")
    extra = ["--keep", "0.5"] if command == "prune" else []
    result = invoke(command, data, "-o", out, "--model", bidirectional_model_dir, "--engine", engine, "-q", *extra)
    assert result.exit_code == 2, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)  # not a traceback
    errors = error_lines(result)
    assert len(errors) == 1 and f"`--engine {engine}`" in errors[0] and "bidirectional" in errors[0], result.output
    assert "`--engine auto`" in errors[0] or "`--engine plain`" in errors[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]  # nothing written, no work dir left


def test_cli_auto_scores_such_a_model_with_plain_and_says_so(tmp_path, bidirectional_model_dir):
    data = write_jsonl(tmp_path / "d.jsonl", FIVE_PAIRS)
    auto, plain = tmp_path / "auto.parquet", tmp_path / "plain.parquet"
    result = invoke("score", data, "-o", auto, "--model", bidirectional_model_dir, "-q")
    assert result.exit_code == 0, result.output
    assert "plain strategy" in result.output and "bidirectional" in result.output
    assert invoke("score", data, "-o", plain, "--model", bidirectional_model_dir, "--engine", "plain", "-q").exit_code == 0
    a, p = pq.read_table(auto), pq.read_table(plain)
    assert table_metadata(a)["engine"] == "plain"
    assert a.column("ches").to_pylist() == p.column("ches").to_pylist()
