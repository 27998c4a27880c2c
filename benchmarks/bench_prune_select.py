"""Wall time and peak memory of `prune --scores` on generated JSONL: does selecting grow with the file?

Generates JSON lines of about 1 KB (prompt, chosen, rejected and metadata whose
shape varies from row to row: lists, objects, numbers, text, nulls), makes a
score file for them (the real input fingerprint, made-up scores: scoring is not
what is measured), then times in a fresh process for each size

    ches-filter prune DATA --keep 0.9 --scores SCORES -o OUT.jsonl

and reports wall time, peak resident set (``ru_maxrss`` of that process) and
the growth ratios between the sizes. A plain byte copy of the file (``cp``)
is timed alongside as the I/O floor. With ``--baseline-src DIR`` (a checkout
of another commit) the same command also runs with ``PYTHONPATH=DIR`` on a
variant whose metadata keeps one kind per column (older versions refuse
varying shapes), so old and new paths are compared in one run.

    python benchmarks/bench_prune_select.py                      # 100,000 and 1,000,000 rows
    python benchmarks/bench_prune_select.py --sizes 10000 100000
    python benchmarks/bench_prune_select.py --sizes 100000 --baseline-src /tmp/old-checkout
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
WORDS = ("the quick brown fox jumps over a lazy dog while seven wizards quietly hex "
         "every jovial beekeeper near old mills").split()


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _meta(rng: random.Random, i: int, varied: bool) -> dict:
    if not varied:
        return {"source": f"s{i % 17}", "rating": rng.random() * 10, "tags": [_text(rng, 1) for _ in range(3)],
                "n": i, "note": _text(rng, 30)}
    shape = i % 5
    value = ([rng.randint(0, 9), rng.random()] if shape == 0 else {"k": _text(rng, 2), "v": [1, {"x": None}]}
             if shape == 1 else rng.random() if shape == 2 else _text(rng, 4) if shape == 3 else None)
    return {"source": f"s{i % 17}", "rating": [1, "high", 2.5][i % 3], "extra": value, "n": i, "note": _text(rng, 30)}


def generate(path: Path, rows: int, varied: bool) -> None:
    rng = random.Random(rows)
    with open(path, "w", encoding="utf-8") as handle:
        for i in range(rows):
            row = {"prompt": _text(rng, 30) + "?", "chosen": _text(rng, 45), "rejected": _text(rng, 45),
                   **_meta(rng, i, varied)}
            handle.write(json.dumps(row) + "\n")


def make_scores(data: Path, out: Path) -> None:
    import pyarrow as pa

    from ches_filter import scorefile
    from ches_filter.config import ScoreConfig
    from ches_filter.inputs import input_fingerprint, load_input

    ds, layout, columns = load_input(str(data), ScoreConfig())
    n = len(ds)
    rng = random.Random(0)
    table = pa.table({"row_index": pa.array(range(n), pa.int64()), "ches": [rng.random() for _ in range(n)],
                      "ln_ches": [rng.random() for _ in range(n)], "status": ["ok"] * n})
    meta = {"input_fingerprint": input_fingerprint(ds, layout, columns), "input_format": layout, "num_rows": n,
            "columns": {"prompt": "prompt", "chosen": "chosen", "rejected": "rejected", "id": None}}
    scorefile.write_table(table, str(out), metadata=meta, overwrite=True)


def child(argv: list[str]) -> None:
    """Runs the CLI in this process and prints wall seconds and peak RSS (MiB) as JSON."""
    from ches_filter.cli import main

    t0 = time.perf_counter()
    try:
        main(argv, standalone_mode=False)
    finally:
        wall = time.perf_counter() - t0
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps({"wall_s": round(wall, 2), "peak_rss_mib": round(peak, 1)}), flush=True)


def run_prune(data: Path, scores: Path, out: Path, src: str | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=src or str(REPO))
    argv = ["prune", str(data), "--keep", "0.9", "--scores", str(scores), "-o", str(out), "--overwrite", "-q"]
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(argv)], env=env, capture_output=True,
                          text=True, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--baseline-src", default=None, help="Another checkout to time on the uniform variant.")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--tmp", default=None, help="Directory for the generated files (default: a temporary one).")
    args = parser.parse_args()
    if args.child is not None:
        child(json.loads(args.child))
        return
    root = Path(args.tmp or tempfile.mkdtemp(prefix="ches-bench-prune-"))
    results = []
    try:
        for size in args.sizes:
            variants = [("varied", True)] + ([("uniform", False)] if args.baseline_src else [])
            for name, varied in variants:
                data = root / f"{name}-{size}.jsonl"
                generate(data, size, varied)
                scores = root / f"{name}-{size}.scores.parquet"
                make_scores(data, scores)
                mib = data.stat().st_size / 2**20
                t0 = time.perf_counter()
                shutil.copyfile(data, root / "copy.jsonl")
                copy_s = time.perf_counter() - t0
                (root / "copy.jsonl").unlink()
                row = {"rows": size, "data": name, "file_mib": round(mib, 1), "bytes_per_row": round(mib * 2**20 / size),
                       "cp_s": round(copy_s, 2), "new": run_prune(data, scores, root / "out.jsonl")}
                kept = sum(1 for _ in open(root / "out.jsonl", "rb")) if (root / "out.jsonl").exists() else None
                row["kept_rows"] = kept
                if args.baseline_src and not varied:
                    row["baseline"] = run_prune(data, scores, root / "out-old.jsonl", args.baseline_src)
                print(json.dumps(row), flush=True)
                results.append(row)
                for f in (data, scores, root / "out.jsonl", root / "out-old.jsonl"):
                    if f.exists():
                        f.unlink()
        new = [r for r in results if r["data"] == "varied" and "wall_s" in r["new"]]
        if len(new) >= 2:
            a, b = new[0], new[-1]
            print(f"rows x{b['rows'] / a['rows']:.0f}: wall x{b['new']['wall_s'] / a['new']['wall_s']:.2f}, "
                  f"peak RSS x{b['new']['peak_rss_mib'] / a['new']['peak_rss_mib']:.2f}")
        for r in results:
            if "baseline" in r and "wall_s" in r["baseline"] and "wall_s" in r["new"]:
                print(f"{r['rows']} uniform rows: new/old wall {r['new']['wall_s'] / r['baseline']['wall_s']:.2f}, "
                      f"new/old peak RSS {r['new']['peak_rss_mib'] / r['baseline']['peak_rss_mib']:.2f}")
    finally:
        if args.tmp is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
