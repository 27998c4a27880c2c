"""`--layout trl` reproduces, token for token, what TRL's DPOTrainer trains on.

The comparison runs TRL itself (skipped when `trl` is not installed); the
verified versions are pinned in docs/report.md.
"""

from __future__ import annotations

import copy

import pytest

from ches_filter.batching import PairEncoder, _split_like_trl
from ches_filter.formats import Columns, detect_layout, normalize_row

from conftest import read_hh


def test_split_like_trl_quirks():
    # Split at the first differing character; a space right before it goes to the completions.
    assert _split_like_trl("Q: hi A: yes", "Q: hi A: no") == ("Q: hi A:", " yes", " no")
    assert _split_like_trl("abcX", "abcY") == ("abc", "X", "Y")
    # One side a prefix of the other: TRL's loop ends one character early.
    assert _split_like_trl("abc", "abcdef") == ("ab", "c", "cdef")


TEXT_ROWS = [
    {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    {"prompt": "Translate to French: cat ", "chosen": "chat", "rejected": "chien"},
    {"prompt": "Unicode: naïve café —", "chosen": " ça va 👍", "rejected": " non"},
    {"prompt": "Already ends in EOS?", "chosen": " yes<|im_end|>", "rejected": " no"},
]
CONVERSATIONAL_ROWS = [
    {
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What color is the sky?"}],
        "chosen": [{"role": "assistant", "content": "Blue."}],
        "rejected": [{"role": "assistant", "content": "It is green, obviously."}],
    },
    {
        "prompt": [
            {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
            {"role": "user", "content": "Tell me a joke."},
        ],
        "chosen": [{"role": "assistant", "content": "Why did the chicken cross the road?"}],
        "rejected": [{"role": "assistant", "content": "No."}],
    },
]
IMPLICIT_CONVERSATIONAL_ROWS = [
    {"chosen": r["prompt"] + r["chosen"], "rejected": r["prompt"] + r["rejected"]} for r in CONVERSATIONAL_ROWS
]


def trl_tokenized(rows, tokenizer):
    """prompt_ids/chosen_ids/rejected_ids as TRL's DPOTrainer prepares its train dataset."""
    trl = pytest.importorskip("trl")
    import tempfile

    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1,
    ))
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(output_dir=out, report_to=[], max_length=None, use_cpu=True, per_device_train_batch_size=1)
        trainer = trl.DPOTrainer(model=model, ref_model=copy.deepcopy(model), args=args,
                                 train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
        return trainer.train_dataset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"]).to_list()


def ours(rows, tokenizer):
    layout = detect_layout(list(rows[0]), rows, Columns())
    encoder = PairEncoder(tokenizer, layout="trl", input_format=layout)
    out = []
    for row in rows:
        pair = normalize_row(row, layout, Columns())
        assert pair.status == "ok"
        enc = encoder.encode(pair)
        out.append({"prompt_ids": list(enc.prompt), "chosen_ids": list(enc.chosen), "rejected_ids": list(enc.rejected)})
    return layout, out


@pytest.mark.parametrize("name", ["explicit_text", "implicit_text", "explicit_conversational", "implicit_conversational"])
def test_trl_layout_matches_trl(name, embedded_tokenizer):
    tokenizer = embedded_tokenizer
    rows = {
        "explicit_text": TEXT_ROWS,
        "implicit_text": [r for r in read_hh(40) if r["chosen"].strip() and r["rejected"].strip()],
        "explicit_conversational": CONVERSATIONAL_ROWS,
        "implicit_conversational": IMPLICIT_CONVERSATIONAL_ROWS,
    }[name]
    if name == "implicit_text":
        rows = [r for r in rows if normalize_row(r, "implicit_text", Columns()).status == "ok"]
    layout, mine = ours(rows, tokenizer)
    assert layout == name
    theirs = trl_tokenized(rows, tokenizer)
    assert len(theirs) == len(mine)
    for i, (a, b) in enumerate(zip(mine, theirs)):
        assert a == b, (i, tokenizer.decode(a["chosen_ids"]), tokenizer.decode(b["chosen_ids"]))


def test_trl_layout_conversational_has_no_extra_eos(embedded_tokenizer):
    tokenizer = embedded_tokenizer
    paper_enc = PairEncoder(tokenizer)
    layout, (enc,) = ours(CONVERSATIONAL_ROWS[:1], tokenizer)
    text = tokenizer.decode(enc["chosen_ids"])
    # The chat template closes the assistant turn itself (<|im_end|> then a newline for SmolLM2).
    assert text.startswith("Blue.") and text.count(tokenizer.eos_token) == 1
    paper = paper_enc.encode(normalize_row(CONVERSATIONAL_ROWS[0], layout, Columns()))
    assert paper.chosen[-1] == tokenizer.eos_token_id and list(paper.prompt) == enc["prompt_ids"]


def test_trl_layout_text_appends_eos_once(embedded_tokenizer):
    tokenizer = embedded_tokenizer
    _, encoded = ours(TEXT_ROWS, tokenizer)
    for enc in encoded:
        assert enc["chosen_ids"][-1] == tokenizer.eos_token_id
        assert enc["chosen_ids"].count(tokenizer.eos_token_id) == 1
    # Text input is tokenized as text (no chat template), as TRL does for non-conversational data.
    assert tokenizer.decode(encoded[0]["prompt_ids"]) == "The sky is"
