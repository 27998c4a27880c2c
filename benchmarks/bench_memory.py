"""Peak memory of `score` at 50k and 500k rows: it must not grow with the dataset.

Builds JSONL datasets by repeating the HH-RLHF rows of ``../shared/data`` (or
the example slice shipped in ``examples/data``), then, for each size, runs the
whole score pipeline in a fresh process: read and validate the JSONL, convert
it to memory-mapped Arrow, fingerprint it, normalise, tokenise (the embedded
SmolLM2 tokenizer and chat template), run a tiny random Llama (so the model is
not what is measured), write the checkpoint parts and assemble the output.

Each child reports its peak resident set (``VmHWM``) and, sampled every 20 ms,
its peak *anonymous* resident memory (heap: what the process really needs).
The difference is file-backed pages of the memory-mapped Arrow cache and
parquet parts, which the kernel reclaims under pressure and which therefore
grow with the file without being memory the job holds.

    python benchmarks/bench_memory.py                  # 50,000 vs 500,000 rows
    python benchmarks/bench_memory.py --sizes 5000 50000
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
HH = REPO.parent / "shared" / "data" / "hh-rlhf-harmless-base-test.dev.jsonl.gz"
EXAMPLE = REPO / "examples" / "data" / "hh_rlhf_harmless_300.jsonl"


def source_lines() -> list[bytes]:
    if HH.exists():
        with gzip.open(HH, "rb") as handle:
            return [line.rstrip(b"\n") for line in handle if line.strip()]
    return [line for line in EXAMPLE.read_bytes().splitlines() if line.strip()]


def build(path: Path, rows: int, lines: list[bytes]) -> None:
    """Write ``rows`` JSONL rows by cycling through ``lines`` (streamed, never held twice)."""
    with open(path, "wb") as handle:
        for i in range(rows):
            handle.write(lines[i % len(lines)])
            handle.write(b"\n")


def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
                out[key] = int(value.split()[0]) * 1024
    return out


class _Sampler(threading.Thread):
    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak_anon = 0
        self.peak_file = 0
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            status = _status()
            self.peak_anon = max(self.peak_anon, status.get("RssAnon", 0))
            self.peak_file = max(self.peak_file, status.get("RssFile", 0))
            time.sleep(0.02)


def child(data: str, out: str, batch_tokens: int) -> None:
    """Score ``data`` into ``out`` with a tiny random Llama; print peak memory as JSON."""
    sampler = _Sampler()
    sampler.start()
    import logging

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaModel

    from ches_filter.config import ScoreConfig
    from ches_filter.config import JobConfig
    from ches_filter.run import score_to_file
    from ches_filter.model import LoadedModel, cached_gguf_checkpoint, default_model_path

    logging.basicConfig(level=logging.WARNING)
    checkpoint, _ = cached_gguf_checkpoint(default_model_path())
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=8192,
    )
    model = LlamaModel(config).eval().requires_grad_(False)
    model.config._attn_implementation = "sdpa"
    loaded = LoadedModel(model, tokenizer, torch.device("cpu"), torch.float32,
                         {"model": "tiny-random", "max_position_embeddings": 8192})
    baseline = _status()
    start = time.time()
    summary = score_to_file(data, out, ScoreConfig(max_batch_tokens=batch_tokens, quiet=True),
                            JobConfig(), model=loaded, progress=False)
    seconds = time.time() - start
    sampler.stop.set()
    sampler.join()
    final = _status()
    print(json.dumps({
        "rows": summary["rows"], "seconds": seconds, "counts": summary["counts"],
        "peak_rss": final["VmHWM"], "peak_anon": sampler.peak_anon, "peak_file": sampler.peak_file,
        "rss_before_scoring": baseline["VmRSS"],
    }))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[50_000, 500_000])
    parser.add_argument("--max-batch-tokens", type=int, default=16384)
    parser.add_argument("--workdir", default=None, help="Scratch directory (default: a temporary one, deleted after).")
    parser.add_argument("--child", nargs=2, metavar=("DATA", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.max_batch_tokens)
        return

    scratch = Path(args.workdir or tempfile.mkdtemp(prefix="ches-bench-memory-"))
    scratch.mkdir(parents=True, exist_ok=True)
    lines = source_lines()
    results = []
    try:
        for rows in args.sizes:
            data = scratch / f"hh_{rows}.jsonl"
            out = scratch / f"scores_{rows}.parquet"
            build(data, rows, lines)
            # A private datasets cache, so the Arrow conversion is redone and then removed.
            env = dict(os.environ, HF_DATASETS_CACHE=str(scratch / f"hf-cache-{rows}"), TOKENIZERS_PARALLELISM="false")
            done = subprocess.run(
                [sys.executable, __file__, "--child", str(data), str(out), "--max-batch-tokens", str(args.max_batch_tokens)],
                env=env, capture_output=True, text=True,
            )
            if done.returncode != 0:
                sys.exit(f"child for {rows} rows failed:\n{done.stderr[-3000:]}")
            result = json.loads(done.stdout.strip().splitlines()[-1])
            result["input_mb"] = data.stat().st_size / 2**20
            results.append(result)
            mb = 2**20
            print(f"{rows:>9,} rows  {result['input_mb']:8.1f} MB input  {result['seconds']:7.1f} s  "
                  f"peak RSS {result['peak_rss'] / mb:7.1f} MB  peak anon {result['peak_anon'] / mb:7.1f} MB  "
                  f"peak file-backed {result['peak_file'] / mb:7.1f} MB", flush=True)
            for path in (data, out):
                path.unlink(missing_ok=True)
            shutil.rmtree(scratch / f"hf-cache-{rows}", ignore_errors=True)
    finally:
        if args.workdir is None:
            shutil.rmtree(scratch, ignore_errors=True)
    if len(results) >= 2:
        small, large = results[0], results[-1]
        print(f"rows x{large['rows'] / small['rows']:.0f}: peak RSS x{large['peak_rss'] / small['peak_rss']:.3f}, "
              f"peak anonymous RSS x{large['peak_anon'] / small['peak_anon']:.3f} (target: within 1.2)")


if __name__ == "__main__":
    main()
