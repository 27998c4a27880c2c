#!/usr/bin/env bash
# Does pruning by CHES protect the preferred likelihood on *your* model? The paper's
# subset experiment (Razin et al., Sec. 5) on HH-RLHF: DPO from the same initial model
# on the riskiest, the safest and a random subset of pairs, then the change of
# log p(y+) on each subset and on a held-out eval set.
#
#   bash examples/validate_hh.sh [OUT_DIR]                 (default OUT_DIR: hh_validate)
#   N=16 bash examples/validate_hh.sh /tmp/v               (16-pair subsets: a quick look)
#
# Input: ../shared/data/hh-rlhf-harmless-base-test.dev.jsonl.gz (1,500 rows) when it
# is beside the repository, else the 300-row sample shipped in examples/data/.
# Extra settings go to every command through CHES_FLAGS, e.g. CHES_FLAGS="--model ...".
# Writes OUT_DIR/scores.parquet, OUT_DIR/validate/ (validate.parquet, summary.json,
# validate.png) and OUT_DIR/report/ (report.html with the validate section).
# Cost and how to read the result: docs/validate.md. Plots need 'ches-filter[report]'.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-hh_validate}
n=${N:-64}
flags=(${CHES_FLAGS:-})
mkdir -p "$out"

input=$repo/../shared/data/hh-rlhf-harmless-base-test.dev.jsonl.gz
[ -f "$input" ] || input=$repo/examples/data/hh_rlhf_harmless_300.jsonl
echo "input: $input"

echo "== 1/3 score (CHES and LN-CHES; resumable, rerun after a crash)"
ches-filter score "$input" -o "$out/scores.parquet" --overwrite "${flags[@]}"

echo "== 2/3 validate (top / bottom / random subsets of $n pairs, eval set of $n)"
ches-filter validate "$input" --scores "$out/scores.parquet" -o "$out/validate" --overwrite \
    --by ches,ln_ches --subsets top,bottom,random --subset-size "$n" --eval-size "$n" "${flags[@]}"

echo "== 3/3 report with the validate section"
ches-filter report "$out/scores.parquet" --data "$input" --validate "$out/validate" -o "$out/report" --overwrite

echo "done: read the verdict lines above, then open $out/report/report.html"
