"""`prune`/`validate --scores`: every scoring flag is either compared with the score file's settings or free; a difference is one line naming each flag.

Fast tier: the score files here are the shipped golden score file of
examples/data/hh_rlhf_harmless_300.jsonl, or built from the real input fingerprint (no model).
"""

from __future__ import annotations

import shutil

import pytest


from conftest import EXAMPLE_HH, GOLDEN, example_rows, invoke, snapshot, write_jsonl


# --------------------------------------------------------------------------
# 4: scoring flags given with --scores must match the score file
# --------------------------------------------------------------------------


@pytest.fixture
def golden(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    shutil.copy(EXAMPLE_HH, tmp_path / "base.jsonl")
    shutil.copy(GOLDEN, tmp_path / "s.parquet")
    (tmp_path / "other-model").mkdir()
    return tmp_path


PRUNE = ("prune", "base.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl")
VALIDATE = ("validate", "base.jsonl", "-o", "vout", "--scores", "s.parquet")


@pytest.mark.parametrize("flags, named", [
    (["--layout", "trl"], "--layout"),
    (["--max-length", "2"], "--max-length"),
    (["--model", "other/model"], "--model"),
    (["--model", "other-model"], "--model"),  # an existing local directory
    (["--model", "./other-model/"], "--model"),
    (["--measures", "ches,ln_ches"], "--measures"),
    (["--no-chat-template"], "--no-chat-template"),
    (["--input-format", "explicit_text"], "--input-format"),
    (["--chosen-column", "good"], "--chosen-column"),
    (["--id-column", "row"], "--id-column"),
    (["--dtype", "bfloat16"], "--dtype"),
    (["--engine", "plain"], "--engine"),
    (["--attn-implementation", "eager"], "--attn-implementation"),
    (["--model", "other/model", "--revision", "v2"], "--revision"),
    # a flag set to its default value is still given, and it differs from the file here
    (["--max-length", "512"], "--max-length"),
])
@pytest.mark.parametrize("command", [PRUNE, VALIDATE], ids=["prune", "validate"])
def test_scoring_flag_differing_from_the_score_file_is_refused(golden, flags, named, command):
    before = snapshot(golden)
    result = invoke(*command, *flags)
    assert result.exit_code == 2, result.output
    assert f"`{named}`" in result.output and "score file" in result.output and "Traceback" not in result.output
    assert snapshot(golden) == before


@pytest.mark.parametrize("command", [PRUNE, VALIDATE], ids=["prune", "validate"])
def test_every_differing_flag_is_named_at_once(golden, command):
    result = invoke(*command, "--layout", "trl", "--max-length", "2", "--model", "other/model", "--device", "cpu")
    assert result.exit_code == 2
    for flag in ("--layout", "--max-length", "--model"):
        assert f"`{flag}`" in result.output
    assert "--device" not in result.output


@pytest.mark.parametrize("flags", [
    [],
    ["--layout", "paper", "--max-length", "8192", "--measures", "edit_distance,ches,last_hidden_ip,ln_ches"],
    ["--dtype", "float32", "--engine", "packed", "--attn-implementation", "sdpa", "--input-format", "implicit_text"],
    ["--dtype", "auto", "--engine", "auto", "--prompt-column", "prompt", "--chosen-column", "chosen"],
    ["--device", "cpu", "--engine-workers", "3", "--max-batch-tokens", "64", "--max-batch-size", "2",
     "--chunk-size", "7", "--quiet", "--trust-remote-code"],
])
def test_matching_or_free_flags_are_accepted(golden, flags):
    result = invoke(*PRUNE, *flags)
    assert result.exit_code == 0, result.output
    assert "kept:     150" in result.output


def test_validate_scores_of_another_model_are_refused_even_with_the_default_model(golden):
    """validate trains its --model on the file's ranking: a file scored by another model is refused
    although --model was left at its default (prune, which trains nothing, accepts it)."""
    import json

    import pyarrow.parquet as pq

    table = pq.read_table(golden / "s.parquet")
    meta = json.loads(table.schema.metadata[b"ches_filter"])
    meta["model"]["model"] = "google/gemma-3-270m"
    meta["use_chat_template"] = False
    pq.write_table(table.replace_schema_metadata({b"ches_filter": json.dumps(meta)}), golden / "g.parquet")
    before = snapshot(golden)
    result = invoke("validate", "base.jsonl", "-o", "vout", "--scores", "g.parquet")
    assert result.exit_code == 2, result.output
    assert "`--model`" in result.output and "google/gemma-3-270m" in result.output and "validate trains" in result.output
    assert "Traceback" not in result.output and snapshot(golden) == before
    assert invoke("prune", "base.jsonl", "--keep", "0.5", "--scores", "g.parquet", "-o", "out.jsonl").exit_code == 0


def test_every_score_setting_is_either_free_or_compared():
    """A new ScoreConfig field must be classified, or --scores would ignore it silently."""
    import dataclasses

    from ches_filter.config import ScoreConfig
    from ches_filter.select import FREE_SCORE_SETTINGS, _score_settings

    fields = {f.name for f in dataclasses.fields(ScoreConfig)}
    compared = set(_score_settings(ScoreConfig(), {}))
    assert fields == FREE_SCORE_SETTINGS | compared, fields ^ (FREE_SCORE_SETTINGS | compared)
    assert not FREE_SCORE_SETTINGS & compared


@pytest.mark.slow
def test_tiny_model_scores_refuse_another_model_and_accept_their_own(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "in.jsonl", example_rows(4))
    result = invoke("score", "in.jsonl", "-o", "s.parquet", "--model", tiny_model_dir, "--max-length", "300", "-q")
    assert result.exit_code == 0, result.output
    base = ("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl", "--overwrite")
    for ok in ([], ["--model", tiny_model_dir], ["--model", f"{tiny_model_dir}/"], ["--max-length", "300"]):
        result = invoke(*base, *ok)
        assert result.exit_code == 0, (ok, result.output)
    for bad, flag in ((["--model", "other/model"], "--model"), (["--max-length", "299"], "--max-length")):
        result = invoke(*base, *bad)
        assert result.exit_code == 2 and f"`{flag}`" in result.output, (bad, result.output)
