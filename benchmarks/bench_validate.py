"""Time `ches-filter validate` and its peak memory on a model given by name or a random-init shape.

    python benchmarks/bench_validate.py --random-init llama-1b --device cuda --dtype bfloat16 --n 64
    python benchmarks/bench_validate.py --device cpu --n 16 --eval 16       # the embedded model
    python benchmarks/bench_validate.py --device cpu --n 8 --eval 4 --max-batch-tokens 2048 [--gradient-checkpointing]

Runs one measure (CHES) x top/bottom subsets of the shipped HH sample against its
golden score file, one epoch of Adam, float32 master weights (``--dtype bfloat16``
= autocast). A random-init model's Δ log π say nothing about displacement; the
step measures time and memory only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))


def _peak_rss_gib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--random-init", default=None, help="a NAMED_CONFIGS shape of bench_score.py (e.g. llama-1b)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--n", type=int, default=64, help="pairs per subset")
    parser.add_argument("--eval", type=int, default=64, help="eval pairs")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute activations in the backward pass (compare the peak memory without it)")
    parser.add_argument("--max-batch-tokens", type=int, default=None,
                        help="padded tokens per micro-batch (default: 512 on CPU, 65536 on CUDA); a whole batch of 8 "
                             "pairs in one micro-batch makes the activations the largest term")
    parser.add_argument("--out", default="gpu_check_out/validate")
    parser.add_argument("--json", dest="json_out", default=None)
    args = parser.parse_args(argv)

    import torch

    from ches_filter.config import ScoreConfig, ValidateConfig
    from ches_filter.model import LoadedModel, load_model
    from ches_filter.validate import run_validate

    embedded = load_model(None, dtype="float32", device=args.device, with_lm_head=True)
    model = embedded
    if args.random_init:
        from transformers import LlamaConfig, LlamaForCausalLM

        from bench_score import NAMED_CONFIGS

        shape = {k: v for k, v in NAMED_CONFIGS[args.random_init].items() if k != "model_type"}
        shape["vocab_size"] = len(embedded.tokenizer)  # the HH sample is tokenized with the embedded tokenizer
        torch.manual_seed(0)
        lm = LlamaForCausalLM(LlamaConfig(**shape, eos_token_id=embedded.tokenizer.eos_token_id,
                                          pad_token_id=embedded.tokenizer.pad_token_id))
        lm.config._attn_implementation = "sdpa"
        lm.to(args.device)
        model = LoadedModel(decoder=lm, tokenizer=embedded.tokenizer, device=torch.device(args.device),
                            dtype=torch.float32, info={"model": f"random-init {args.random_init}"})
        del embedded
    cuda = torch.device(args.device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    started = time.perf_counter()
    summary = run_validate(
        str(REPO / "examples" / "data" / "hh_rlhf_harmless_300.jsonl"), args.out,
        ValidateConfig(by="ches", subsets="top,bottom", subset_size=args.n, eval_size=args.eval,
                       gradient_checkpointing=args.gradient_checkpointing),
        ScoreConfig(dtype=args.dtype, device=args.device, quiet=True, max_batch_tokens=args.max_batch_tokens),
        scores=str(REPO / "tests" / "golden" / "hh300_scores.parquet"), overwrite=True, model=model,
    )
    seconds = time.perf_counter() - started
    for line in summary["table"]:
        print(line)
    result = {
        "model": model.info.get("model"), "device": args.device, "dtype": args.dtype, "n": args.n, "eval": args.eval,
        "gradient_checkpointing": args.gradient_checkpointing, "max_batch_tokens": args.max_batch_tokens,
        "seconds": seconds, "phase_seconds": summary["phase_seconds"],
        # CUDA: the allocator's peak; CPU: the process's peak resident set (model load included).
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else _peak_rss_gib(),
        "logprob_path": summary["logprob_path"], "autocast": summary["autocast"], "trainings": summary["trainings"],
        "steps_per_training": summary["subsets"][0]["steps"],
    }
    print("validate:", json.dumps(result))
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
