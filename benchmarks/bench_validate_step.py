"""Peak memory of one validate step with a large vocabulary: the LM head's chunking, measured.

Builds a random Llama with a 131,072-token vocabulary (default; the size of
Llama-3's) and a tiny decoder, so the LM head is what the memory is about,
and pairs that fill one micro-batch of ``--max-batch-tokens`` (default 8,192)
padded tokens, nearly all of them response positions. Then, from a baseline
taken after the model, its initial copy and the pairs are in memory, it runs
what validate runs for a subset: the reference log-probs of every pair (no
gradient) and one Adam step of DPO on all of them, through validate's own
trainer (``ches_filter.validate._Trainer``).

It prints one JSON line: the peak above the baseline (CPU: the process's peak
resident set, reset through ``/proc/self/clear_refs`` before the step; CUDA:
``torch.cuda.max_memory_allocated``), the bound the code states for it, and
what the response positions' float32 logits alone would take unchunked.

    python benchmarks/bench_validate_step.py                       # CPU, 131,072 vocab, 8,192 tokens
    python benchmarks/bench_validate_step.py --device cuda --max-batch-tokens 65536 --hidden 2048 --layers 16
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import types
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: Allowance for the decoder's activations and the step's small tensors, per padded token of the micro-batch,
#: per unit of hidden size and layer (float32, measured ~60 bytes at this shape; stated with room).
ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER = 160


def _cpu_peak_reset() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _cpu_status(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0]) * 1024
    raise KeyError(key)


def stated_bound(params: int, vocab: int, tokens: int, hidden: int, layers: int, head_elements: int) -> dict:
    """The bound on the step's rise above the baseline, by part (bytes)."""
    from ches_filter.logprobs import head_peak_bytes

    parts = {
        "gradients_and_adam_state": 12 * params,  # float32 gradient + 2 Adam moments (weights are in the baseline)
        "lm_head_chunk": head_peak_bytes(vocab, head_elements),
        "decoder_activations": ACTIVATION_BYTES_PER_TOKEN_HIDDEN_LAYER * tokens * hidden * layers,
    }
    parts["total"] = sum(parts.values())
    return parts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", help="validate's --dtype (bfloat16: autocast over float32 weights)")
    parser.add_argument("--vocab", type=int, default=131072)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--max-batch-tokens", type=int, default=8192)
    parser.add_argument("--head-elements", type=int, default=None, help="logits per LM-head chunk (default: the package's)")
    parser.add_argument("--shape", default=None, help="a named decoder shape of bench_score.py (e.g. llama-1b) instead of "
                        "--hidden/--layers; --vocab still sets the vocabulary")
    parser.add_argument("--attn-implementation", default="sdpa")
    parser.add_argument("--memory-fraction", type=float, default=None,
                        help="CUDA: cap this process at this fraction of the card (torch.cuda.set_per_process_memory_fraction), "
                             "to make the out-of-memory back-off happen for real")
    parser.add_argument("--after", action="store_true", help="also evaluate the pairs after the step (logp_after_sum)")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)

    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ches_filter import logprobs
    from ches_filter.batching import EncodedPair
    from ches_filter.config import ScoreConfig, ValidateConfig
    from ches_filter.model import LoadedModel
    from ches_filter.validate import _Trainer

    head_elements = args.head_elements or logprobs.HEAD_CHUNK_ELEMENTS
    device = torch.device(args.device)
    torch.manual_seed(0)
    if args.shape:
        sys.path.insert(0, str(REPO / "benchmarks"))
        from bench_score import NAMED_CONFIGS

        shape = {k: v for k, v in NAMED_CONFIGS[args.shape].items() if k != "model_type"}
        shape["vocab_size"] = args.vocab
        args.hidden, args.layers = shape["hidden_size"], shape["num_hidden_layers"]
    else:
        heads = max(1, args.hidden // 64)
        shape = dict(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                     num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=heads,
                     max_position_embeddings=4096)
    if args.memory_fraction and device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(args.memory_fraction, device)
    lm = LlamaForCausalLM(LlamaConfig(**shape)).to(device)
    lm.config._attn_implementation = args.attn_implementation
    params = sum(p.numel() for p in lm.parameters())
    # Pairs of 8 prompt tokens and two 248-token responses: 502 padded tokens each in a packed row.
    gen = torch.Generator().manual_seed(1)

    def draw(n):
        return tuple(torch.randint(4, args.vocab, (n,), generator=gen).tolist())

    n_pairs = max(1, args.max_batch_tokens // 502)
    pairs = {i: EncodedPair(draw(8), draw(248), draw(248)) for i in range(n_pairs)}
    config = ValidateConfig(by="ches", subsets="top", subset_size=n_pairs, eval_size=0, batch_size=n_pairs, epochs=1)
    score_config = ScoreConfig(dtype=args.dtype, device=args.device, max_batch_tokens=args.max_batch_tokens,
                               engine_workers=1, quiet=True)
    # validate reads only the pad id from the tokenizer.
    loaded = LoadedModel(decoder=lm, tokenizer=types.SimpleNamespace(pad_token_id=0, eos_token_id=1), device=device,
                         dtype=torch.float32, info={})
    trainer = _Trainer(loaded, config, score_config)
    trainer.head_elements = head_elements
    rows = list(pairs)
    micro = trainer._micro_batches(rows, pairs)
    tokens = max(sum(trainer._cost(pairs[r]) for r in m) for m in micro)
    positions = sum(len(p.chosen) + len(p.rejected) for p in pairs.values())
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        baseline = _cpu_status("VmRSS")
        if not _cpu_peak_reset():
            raise SystemExit("cannot reset the peak resident set (/proc/self/clear_refs): Linux only")
    started = time.perf_counter()
    ref = trainer.evaluate(rows, pairs)
    info = trainer.train(rows, 0, pairs, ref)
    seconds = time.perf_counter() - started
    peak = (torch.cuda.max_memory_allocated() if cuda else _cpu_status("VmHWM")) - baseline
    after = trainer.evaluate(rows, pairs) if args.after else None
    bound = stated_bound(params, args.vocab, tokens, args.hidden, args.layers, head_elements)
    trainer.restore()
    trainer.state.restore()
    result = {
        "device": str(device), "dtype": args.dtype, "vocab": args.vocab, "params": params, "pairs": n_pairs,
        "micro_batches": len(micro), "padded_tokens": tokens, "response_positions": positions,
        "head_chunk_positions": logprobs.head_chunk_positions(args.vocab, head_elements),
        "peak_rise_bytes": peak, "bound_bytes": bound, "within_bound": peak <= bound["total"],
        "unchunked_float32_logits_bytes": 4 * positions * args.vocab, "seconds": seconds,
        "loss": info["loss_first"], "final_budget": trainer.budget, "autocast": str(trainer.autocast),
        "logp_after_sum": None if after is None else sum(c + r for c, r in after.values()),
    }
    print(json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
