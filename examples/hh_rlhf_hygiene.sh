#!/usr/bin/env bash
# Data hygiene on HH-RLHF, end to end: score -> report -> prune.
#
#   bash examples/hh_rlhf_hygiene.sh [OUT_DIR]          (default OUT_DIR: hh_hygiene)
#   LIMIT=64 bash examples/hh_rlhf_hygiene.sh /tmp/hh    (only the first 64 rows: a quick look)
#
# Input: ../shared/data/hh-rlhf-harmless-base-test.dev.jsonl.gz (1,500 rows) when it
# is beside the repository, else the 300-row sample shipped in examples/data/.
# Extra settings go to every command through CHES_FLAGS, e.g. CHES_FLAGS="--model ..."
# Writes OUT_DIR/scores.parquet, OUT_DIR/report/ (open report.html),
# OUT_DIR/pruned.jsonl (the 90 % lowest-risk pairs, unchanged) and OUT_DIR/rejects.jsonl.
# The report needs matplotlib: pip install 'ches-filter[report]'.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-hh_hygiene}
keep=${KEEP:-0.9}
flags=(${CHES_FLAGS:-})
mkdir -p "$out"

input=$repo/../shared/data/hh-rlhf-harmless-base-test.dev.jsonl.gz
[ -f "$input" ] || input=$repo/examples/data/hh_rlhf_harmless_300.jsonl
if [ -n "${LIMIT:-}" ]; then
    # A slice of the first LIMIT rows, so a quick run still goes through every step.
    python - "$input" "$out/input.jsonl" "$LIMIT" <<'EOF'
import gzip, sys
src, dst, limit = sys.argv[1], sys.argv[2], int(sys.argv[3])
opener = gzip.open if src.endswith(".gz") else open
with opener(src, "rt", encoding="utf-8") as fin, open(dst, "w", encoding="utf-8") as fout:
    for i, line in enumerate(fin):
        if i == limit:
            break
        fout.write(line)
EOF
    input=$out/input.jsonl
fi
echo "input: $input"

echo "== 1/3 score (all four measures)"
ches-filter score "$input" -o "$out/scores.parquet" --overwrite \
    --measures ches,ln_ches,last_hidden_ip,edit_distance "${flags[@]}"

echo "== 2/3 report"
ches-filter report "$out/scores.parquet" --data "$input" -o "$out/report" --overwrite

echo "== 3/3 prune (keep $keep of the scored pairs, reusing the scores)"
ches-filter prune "$input" --scores "$out/scores.parquet" --keep "$keep" \
    -o "$out/pruned.jsonl" --rejects "$out/rejects.jsonl" --overwrite "${flags[@]}"

echo "done: open $out/report/report.html; train on $out/pruned.jsonl"
