"""The GPU-readiness checks of issue 17, one line each: ``PASS|FAIL|SKIP <check>: <numbers>``.

    python benchmarks/gpu_check.py dropout --device cuda
    python benchmarks/gpu_check.py all --dry            # every check on this CPU, tiny shapes (a rehearsal)

Checks (``benchmarks/gpu_check.sh`` runs each under a timeout):

``dropout``      a GPT-2 with dropout 0.1: a model in training mode scores as in eval mode; validate with and
                 without ``--gradient-checkpointing`` gives the same Δlog π.
``bf16``         the engine's scores in bfloat16 vs float32 (same weights): Spearman of LN-CHES, top-10 % overlap.
``throughput``   pairs/s and MFU (useful FLOP/s over the measured matmul peak) of the engine, bfloat16.
``validate-128k``  one validate step (reference pass + one Adam step) on a Llama-1B shape with a 128,256-token
                 vocabulary at the default CUDA budget (65,536 tokens), bfloat16 autocast: peak memory, the
                 stated LM-head bound, the budget it ended at (out-of-memory back-off), seconds.
``oom``          the same step with the process capped to a fraction of the card, so the back-off happens for
                 real: the budget it ended at and the log-probs after the step vs an uncapped run at that budget.
``fa2``          FlashAttention-2: float32 weights are refused in one line; bfloat16 scores agree with sdpa's;
                 a validate step runs under autocast (needs the flash-attn package; SKIP without it).
``fp16``         validate's policy where bfloat16 is missing: float32 training, no float16 autocast.
``load``         loading a 1B checkpoint straight to the device: the host's peak anonymous memory vs the
                 size of the weights (loading on the CPU, then ``.to(device)``, needs all of them).

``--dry`` runs every check on the CPU with tiny shapes, to rehearse the script without a GPU; the numbers
then say nothing about a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "benchmarks"
sys.path.insert(0, str(REPO))

TINY_LLAMA = dict(model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=49152, max_position_embeddings=4096)


class Failed(Exception):
    """A check that ran and did not hold."""


def _run(script: str, *args: str, timeout: int = 540) -> dict:
    """Run a benchmark script in its own process; return its JSON (``--json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        done = subprocess.run([sys.executable, str(BENCH / script), *args, "--json", str(out)], capture_output=True,
                              text=True, timeout=timeout)
        if done.returncode != 0 or not out.exists():
            tail = " | ".join(done.stderr.strip().splitlines()[-3:])
            raise Failed(f"{script} exited {done.returncode}: {tail[-300:]}")
        return json.loads(out.read_text())


def _score_json(args: argparse.Namespace, name: str, *extra: str) -> dict:
    """bench_score.py once per run (bf16 and throughput read the same result)."""
    cache = Path(args.out) / f"score-{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    if args.dry:
        config = Path(args.out) / "tiny-llama.json"
        config.write_text(json.dumps(TINY_LLAMA))
        shape, n = str(config), "8"
    else:
        shape, n = "llama-1b", "256"
    paper = ["--skip-paper"] if args.dry or name != "bf16" else []  # the speed-up over the paper method, once
    result = _run("bench_score.py", "--device", args.device, "--random-init", shape, "--n", n, *paper, *extra)
    cache.write_text(json.dumps(result))
    return result


def check_bf16(args: argparse.Namespace) -> str:
    r = _score_json(args, "bf16", "--dtype", "bfloat16", "--compare-dtype", "float32")
    c = r["compare"]
    line = (f"bf16 vs fp32 engine scores ({r.get('n', '?')} pairs): Spearman LN-CHES {c['spearman_ln_ches']:.4f}, "
            f"top-10% shared {100 * c['top10_overlap_ln_ches']:.0f}%")
    if not args.dry and c["spearman_ln_ches"] < 0.99:
        raise Failed(line)
    return line


def check_throughput(args: argparse.Namespace) -> str:
    r = _score_json(args, "bf16", "--dtype", "bfloat16", "--compare-dtype", "float32")
    e = r["engine"]
    speedup = f", {r['speedup']:.1f}x the paper method" if r.get("speedup") else ""
    return (f"engine {r.get('engine_strategy', '?')} bf16: {e['pairs_per_s']:.1f} pairs/s, MFU "
            f"{100 * e['useful_fraction_of_peak']:.1f}% of the measured {r['matmul_peak_flop_per_s'] / 1e12:.3g} TFLOP/s"
            f"{speedup} (targets: 40% MFU, 20x)")


def _step_args(args: argparse.Namespace) -> list[str]:
    if args.dry:
        return ["--device", args.device, "--vocab", "131072", "--hidden", "16", "--max-batch-tokens", "2048"]
    return ["--device", args.device, "--shape", "llama-1b", "--vocab", "128256", "--max-batch-tokens", "65536",
            "--dtype", "bfloat16"]


def check_validate_128k(args: argparse.Namespace) -> str:
    r = _run("bench_validate_step.py", *_step_args(args))
    gib = 2**30
    line = (f"validate step, vocab {r['vocab']:,}, {r['padded_tokens']:,} tokens ({r['response_positions']:,} response "
            f"positions), autocast {r['autocast']}: peak +{r['peak_rise_bytes'] / gib:.2f} GiB (LM head bound "
            f"{r['bound_bytes']['lm_head_chunk'] / gib:.2f} GiB; unchunked fp32 logits alone "
            f"{r['unchunked_float32_logits_bytes'] / gib:.1f} GiB), budget {r['final_budget']:,} tokens, {r['seconds']:.1f} s")
    if not r["within_bound"]:
        raise Failed(line + f" > stated bound {r['bound_bytes']['total'] / gib:.2f} GiB")
    return line


def check_oom(args: argparse.Namespace) -> str:
    if args.dry:
        return "SKIP: capping memory needs CUDA (the injected-OOM tests in tests/test_memory.py run here)"
    import torch

    total = torch.cuda.get_device_properties(0).total_memory
    # Room for the 1B model's weights, gradients and Adam state (~24 GiB) but not for 65,536 tokens of activations.
    fraction = min(0.9, 40 * 2**30 / total)
    capped = _run("bench_validate_step.py", *_step_args(args), "--memory-fraction", f"{fraction:.3f}", "--after")
    budget = capped["final_budget"]
    if budget >= 65536:
        return f"SKIP: the step fit in {fraction:.0%} of the card ({capped['peak_rise_bytes'] / 2**30:.1f} GiB): no back-off to see"
    free = _run("bench_validate_step.py", *[a if a != "65536" else str(budget) for a in _step_args(args)], "--after")
    diff = abs(capped["logp_after_sum"] - free["logp_after_sum"]) / abs(free["logp_after_sum"])
    line = (f"capped at {fraction:.0%} of the card: back-off 65,536 -> {budget:,} tokens, log-probs after the step "
            f"{capped['logp_after_sum']:.6g} vs {free['logp_after_sum']:.6g} uncapped at that budget (rel diff {diff:.1e})")
    if diff > 1e-3:
        raise Failed(line)
    return line


def check_fa2(args: argparse.Namespace) -> str:
    import importlib.util

    import torch

    from ches_filter.model import flash_attention_problem

    refusal = flash_attention_problem("flash_attention_2", args.device, torch.float32)
    if refusal is None or "\n" in refusal:
        raise Failed(f"float32 weights with FlashAttention-2 are not refused in one line: {refusal!r}")
    if args.dry or importlib.util.find_spec("flash_attn") is None:
        return f"SKIP (refusal PASS: {refusal[:70]}...): {'--dry' if args.dry else 'flash-attn is not installed'}"
    ok = _run("bench_validate_step.py", *_step_args(args), "--attn-implementation", "flash_attention_2",
              "--max-batch-tokens", "8192")
    sdpa = _score_json(args, "bf16", "--dtype", "bfloat16", "--compare-dtype", "float32")
    fa2 = _score_json(args, "fa2", "--dtype", "bfloat16", "--attn-implementation", "flash_attention_2",
                      "--compare-dtype", "bfloat16")
    return (f"validate step under bf16 autocast with FA2: {ok['seconds']:.1f} s, peak +{ok['peak_rise_bytes'] / 2**30:.2f} GiB; "
            f"engine {fa2['engine']['pairs_per_s']:.1f} pairs/s with FA2 ({fa2.get('engine_strategy')}) vs "
            f"{sdpa['engine']['pairs_per_s']:.1f} with sdpa; float32 refused in one line")


def check_fp16(args: argparse.Namespace) -> str:
    import torch

    from ches_filter.model import training_autocast

    got, note = training_autocast("float16", torch.device(args.device))
    if got is not None or not note:
        raise Failed(f"--dtype float16 would train under {got} autocast")
    auto, _ = training_autocast("auto", torch.device(args.device))
    return f"--dtype float16 trains in float32 ({note[:60]}...); --dtype auto autocasts to {auto}"


def _anon_rss() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    return 0


def check_load(args: argparse.Namespace) -> str:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from ches_filter.model import load_model

    sys.path.insert(0, str(BENCH))
    from bench_score import NAMED_CONFIGS

    shape = dict(TINY_LLAMA if args.dry else NAMED_CONFIGS["llama-1b"])
    shape.pop("model_type")
    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(**shape)).to(torch.bfloat16).save_pretrained(tmp)
        from transformers import AutoTokenizer  # a from_pretrained directory needs a tokenizer

        from ches_filter.model import default_model_path

        gguf = default_model_path()
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
        weights = sum(f.stat().st_size for f in Path(tmp).glob("*.safetensors"))
        peak, stop = [_anon_rss()], threading.Event()
        base = peak[0]

        def sample():
            while not stop.is_set():
                peak[0] = max(peak[0], _anon_rss())
                time.sleep(0.005)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        started = time.perf_counter()
        loaded = load_model(tmp, dtype="bfloat16", device=args.device, with_lm_head=True)
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        where = {p.device.type for p in loaded.decoder.parameters()}
    rise = peak[0] - base
    line = (f"{weights / 2**30:.2f} GiB of bf16 weights loaded onto {sorted(where)} in {seconds:.1f} s; host anonymous "
            f"memory rose {rise / 2**30:.2f} GiB at most")
    if not args.dry and (rise > 0.5 * weights or where != {"cuda"}):
        raise Failed(line)
    return line


def check_dropout(args: argparse.Namespace) -> str:
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from ches_filter.config import ScoreConfig, ValidateConfig
    from ches_filter.model import LoadedModel, default_model_path
    from ches_filter.api import score_pairs
    from ches_filter.validate import run_validate

    gguf = default_model_path()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    torch.manual_seed(0)
    lm = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=64, n_layer=2, n_head=2, n_positions=4096,
                                    resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)).to(args.device)
    lm.config._attn_implementation = "sdpa"
    data = REPO / "examples" / "data" / "hh_rlhf_harmless_300.jsonl"
    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()[:16]]
    expected = score_pairs(rows, model=lm.eval(), tokenizer=tokenizer, quiet=True).column("ches").to_pylist()
    got = score_pairs(rows, model=lm.train(), tokenizer=tokenizer, quiet=True).column("ches").to_pylist()
    worst = max(abs(a - b) / abs(b) for a, b in zip(got, expected))
    if worst > 1e-6 or not lm.training:
        raise Failed(f"a model in training mode scores differently (max rel diff {worst:.1e}) or comes back in eval mode")
    loaded = LoadedModel(decoder=lm, tokenizer=tokenizer, device=torch.device(args.device), dtype=torch.float32,
                         info={"model": "gpt2-dropout", "max_position_embeddings": 4096})
    deltas = []
    with tempfile.TemporaryDirectory() as tmp:
        for ckpt in (False, True):
            summary = run_validate(
                str(data), os.path.join(tmp, str(ckpt)),
                ValidateConfig(by="ches", subsets="top,bottom", subset_size=8, eval_size=4, batch_size=4, lr=1e-3,
                               gradient_checkpointing=ckpt),
                ScoreConfig(quiet=True, device=args.device, dtype="float32"),
                scores=str(REPO / "tests" / "golden" / "hh300_scores.parquet"), model=loaded)
            deltas.append([s["mean_dlogp_chosen"] for s in summary["subsets"]])
    diff = max(abs(a - b) / max(abs(b), 1e-9) for a, b in zip(*deltas))
    line = (f"GPT-2, dropout 0.1: training-mode scores = eval-mode (max rel diff {worst:.1e}); mean Δlog π(y+) with/without "
            f"gradient checkpointing {deltas[1][0]:+.4f}/{deltas[0][0]:+.4f} (max rel diff {diff:.1e})")
    if diff > 1e-3:
        raise Failed(line)
    return line


CHECKS = {
    "dropout": check_dropout, "bf16": check_bf16, "throughput": check_throughput, "validate-128k": check_validate_128k,
    "oom": check_oom, "fa2": check_fa2, "fp16": check_fp16, "load": check_load,
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("check", choices=[*CHECKS, "all"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dry", action="store_true", help="on this CPU with tiny shapes (a rehearsal)")
    parser.add_argument("--out", default=os.environ.get("OUT", "gpu_check_out"))
    args = parser.parse_args(argv)
    if args.dry:
        args.device = "cpu"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    import logging

    logging.disable(logging.WARNING)  # one line per check
    status = 0
    for name in (CHECKS if args.check == "all" else [args.check]):
        started = time.perf_counter()
        try:
            line = CHECKS[name](args)
            verdict = "SKIP" if line.startswith("SKIP") else "PASS"
            line = line.removeprefix("SKIP").lstrip(": ")
        except Failed as exc:
            verdict, line, status = "FAIL", str(exc), 1
        except Exception as exc:  # noqa: BLE001 - one line per check, whatever broke
            verdict, line, status = "FAIL", f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}", 1
        print(f"{verdict} {name} ({time.perf_counter() - started:.0f} s): {line}", flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
