"""Train a few DPO steps with TRL on the output of `ches-filter prune`.

The pruned file holds the original rows, unchanged, so it drops straight into
``trl.DPOTrainer``: no column mapping, no conversion. This script uses the
embedded SmolLM2-135M-Instruct (through ``ches_filter.model.load_model``) on
the CPU, a handful of steps, to show the hand-over; for real training use your
own model, a GPU and TRL's usual settings.

    pip install 'ches-filter[trl]'
    bash examples/hh_rlhf_hygiene.sh hh_hygiene          # writes hh_hygiene/pruned.jsonl
    python examples/train_dpo_with_trl.py hh_hygiene/pruned.jsonl --steps 4

Score with ``--layout trl`` (``ches-filter score ... --layout trl``) to compute
CHES on exactly the tokens this trainer trains on.
"""

from __future__ import annotations

import argparse
import sys
import tempfile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pruned", help="output of `ches-filter prune` (.jsonl, .parquet or a save_to_disk directory)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-6)
    parser.add_argument("--beta", type=float, default=0.1)
    parser.add_argument("--max-length", type=int, default=512, help="TRL truncates longer pairs")
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    args = parser.parse_args()
    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        sys.exit("this example needs TRL: pip install 'ches-filter[trl]'")

    from ches_filter.sources import read_dataset
    from ches_filter.model import load_model

    dataset = read_dataset(args.pruned)
    print(f"{len(dataset)} pruned pairs from {args.pruned}, columns {dataset.column_names}")
    policy = load_model(args.model, dtype="float32", device="cpu", with_lm_head=True)
    reference = load_model(args.model, dtype="float32", device="cpu", with_lm_head=True)
    model = policy.decoder
    # load_model hands out a frozen model for scoring; DPO trains it.
    model.requires_grad_(True)
    model.train()
    with tempfile.TemporaryDirectory() as out:
        config = DPOConfig(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=args.lr,
            beta=args.beta, max_length=args.max_length, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
        )
        trainer = DPOTrainer(model=model, ref_model=reference.decoder, args=config, train_dataset=dataset,
                             processing_class=policy.tokenizer)
        trainer.train()
    print("step  loss     reward margin  reward accuracy")
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(f"{entry['step']:>4}  {entry['loss']:.4f}   {entry.get('rewards/margins', float('nan')):+.4f}        "
                  f"{entry.get('rewards/accuracies', float('nan')):.2f}")


if __name__ == "__main__":
    main()
