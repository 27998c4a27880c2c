"""benchmarks/bench_score.py: its FLOP accounting, and one tiny end-to-end run (no timing asserted)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from ches_filter.batching import EncodedPair

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_score.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_score", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tiny_lm(**overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128)
    config.update(overrides)
    return LlamaForCausalLM(LlamaConfig(**config))


def test_flop_model_counts_weights_and_attended_keys(bench):
    lm = _tiny_lm()
    flops = bench.FlopModel(lm)
    # Per layer: q, o 32x32; k, v 32x16; gate, up 32x48, down 48x32. LM head 32x100.
    per_layer = 2 * 32 * 32 + 2 * 32 * 16 + 3 * 32 * 48
    assert flops.decoder_linear == 3 * per_layer
    assert flops.head_linear == 32 * 100
    assert flops.attn_per_key == 4 * 4 * 8
    pair = EncodedPair(prompt=(5,) * 4, chosen=(6, 7, 2), rejected=(8, 2))
    # Packed row: P (4 tokens: 1+2+3+4 keys), R+[:-1] at positions 4, 5 (5+6 keys), R-[:-1] at 4 (5 keys).
    keys = 3 * ((1 + 2 + 3 + 4) + (5 + 6) + 5)
    assert flops.packed(pair) == 2 * 3 * per_layer * 7 + 128 * keys
    # Paper: P + R+ (7 tokens) and P + R- (6 tokens), LM head included, causal keys 1..T.
    paper = sum(2 * (3 * per_layer + 3200) * t + 128 * 3 * t * (t + 1) // 2 for t in (7, 6))
    assert flops.paper(pair) == paper


def test_flop_model_caps_keys_at_the_sliding_window(bench):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    config = Gemma3TextConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=2, num_key_value_heads=1, head_dim=16, sliding_window=3,
                              layer_types=["sliding_attention", "full_attention"], max_position_embeddings=128)
    flops = bench.FlopModel(Gemma3ForCausalLM(config))
    assert flops.windows == [3, None]
    # Queries at positions 0..5: full layer 1+2+...+6 = 21 keys, sliding layer 1+2+3+3+3+3 = 15.
    assert flops._keys(0, 6) == 21 + 15
    assert flops._keys(2, 4) == (3 + 4 + 5 + 6) + (3 + 3 + 3 + 3)


@pytest.mark.slow
def test_bench_score_end_to_end_on_a_tiny_random_model(bench, tmp_path):
    """Real HH pairs and the embedded tokenizer through both methods; the scores must agree."""
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps(dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=49152,
                                      max_position_embeddings=2048)))
    out = tmp_path / "result.json"
    result = bench.main(["--random-init", str(config), "--n", "5", "--device", "cpu", "--compare-dtype", "bfloat16",
                         "--json", str(out)])
    assert json.loads(out.read_text())["n"] == result["n"] == 5
    assert result["max_rel_diff_sums"] < 1e-5
    assert result["max_rel_diff_ches"] < 1e-4
    # The paper method re-encodes each prompt and runs a 49k-word LM head on a 32-wide model.
    assert result["flop_ratio"] > 10
    assert result["engine"]["flops"] < result["paper"]["flops"]
    assert result["compare"]["spearman_ln_ches"] > 0.9


# ------------------------------------------------------------------ 7. the GPU check script
@pytest.mark.slow
def test_gpu_check_script_parses_and_its_checks_run_dry():
    """benchmarks/gpu_check.sh is valid bash; its python runs on this CPU in --dry mode (one line per check)."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    assert subprocess.run(["bash", "-n", str(root / "benchmarks" / "gpu_check.sh")]).returncode == 0
    done = subprocess.run([sys.executable, str(root / "benchmarks" / "gpu_check.py"), "fp16", "--dry"], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("PASS fp16"), done.stdout
