"""The paper's Section 3 toy: prefer " No" over " Never" and watch " Yes".

Razin et al. (ICLR 2025) train on persona prompts with the preferred response
" No" and the dispreferred " Never": two refusals that are close in the
model's hidden space. DPO then pushes " Never" down, and because " No" shares
most of its direction, " No" can fall too, and the probability mass goes to a
response nobody trained on, such as " Yes" (likelihood displacement).

This script, on the embedded SmolLM2-135M-Instruct (or ``--model``):

1. scores the pairs (CHES, LN-CHES, last_hidden_ip, edit_distance);
2. runs the ``displacement`` probe on each pair alone: the first-order change
   D of log p(" No"), then ``--steps`` real DPO steps, recording what happens
   to " No", " Never" and the untrained " Yes";
3. prints the summary table and the " Yes" story.

Run from the repository root (the persona file lives in ../shared/data)::

    python examples/persona_no_vs_never.py --pairs 16 --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from ches_filter.config import DisplacementConfig, ScoreConfig
from ches_filter.displacement import displacement_summary, format_summary, measure_displacement
from ches_filter.model import load_model
from ches_filter.api import score_pairs

PERSONA = Path(__file__).resolve().parents[2] / "shared" / "data" / "persona-ends-justify-means.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(PERSONA), help="persona JSONL with a `question` field")
    parser.add_argument("--pairs", type=int, default=16, help="how many prompts (the first N of the file)")
    parser.add_argument("--steps", type=int, default=5, help="real DPO steps per pair")
    parser.add_argument("--lr", type=float, default=1e-4, help="SGD learning rate of those steps")
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args()
    if not Path(args.data).exists():
        sys.exit(f"{args.data} not found; pass --data PATH to persona-ends-justify-means.jsonl")

    questions = [json.loads(line)["question"] for line in Path(args.data).read_text().splitlines()[: args.pairs]]
    rows = [{"prompt": q, "chosen": " No", "rejected": " Never"} for q in questions]
    model = load_model(args.model, dtype="float32", device="cpu", with_lm_head=True)

    scores = score_pairs(rows, ScoreConfig(measures="ches,ln_ches,last_hidden_ip,edit_distance", quiet=True), model=model)
    ches = scores.column("ches").to_pylist()
    print(f"{len(rows)} persona prompts, preferred ' No' vs dispreferred ' Never' (response tokens + EOS)")
    print(f"CHES: median {statistics.median(ches):.4g}, range [{min(ches):.4g}, {max(ches):.4g}]; "
          f"LN-CHES median {statistics.median(scores.column('ln_ches').to_pylist()):.4g}")

    table = measure_displacement(
        rows, DisplacementConfig(sample=len(rows), steps=args.steps, lr=args.lr, beta=args.beta),
        ScoreConfig(quiet=True), model=model, watch={"yes": " Yes"},
    )
    print()
    for line in format_summary(displacement_summary(table, steps=args.steps)):
        print(line)

    d_no = table.column("dlogp_chosen").to_pylist()
    d_never = table.column("dlogp_rejected").to_pylist()
    d_yes = table.column("dlogp_yes").to_pylist()
    first = table.column("first_order_dlogp_chosen").to_pylist()
    n = table.num_rows
    print()
    print(f"after {args.steps} DPO steps per pair (SGD, lr {args.lr:g}, beta {args.beta:g}), mean change of log p:")
    print(f"  ' No'    (preferred)    {statistics.mean(d_no):+.4f} nats; fell on {sum(v < 0 for v in d_no)}/{n} prompts"
          f" (first order predicted a fall on {sum(v < 0 for v in first)}/{n})")
    print(f"  ' Never' (dispreferred) {statistics.mean(d_never):+.4f} nats; fell on {sum(v < 0 for v in d_never)}/{n}")
    print(f"  ' Yes'   (never trained) {statistics.mean(d_yes):+.4f} nats; rose on {sum(v > 0 for v in d_yes)}/{n}")
    rows_ches = table.column("ches").to_pylist()
    order = sorted(range(n), key=lambda i: rows_ches[i])
    half = max(1, n // 2)
    high, low = order[-half:], order[:half]
    print(f"  higher-CHES half: ' No' {statistics.mean(d_no[i] for i in high):+.4f}, ' Yes' {statistics.mean(d_yes[i] for i in high):+.4f}; "
          f"lower-CHES half: ' No' {statistics.mean(d_no[i] for i in low):+.4f}, ' Yes' {statistics.mean(d_yes[i] for i in low):+.4f}")


if __name__ == "__main__":
    main()
