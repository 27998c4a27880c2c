"""What a job computes, and refusing to mix the results of different jobs.

The manifest records the job's *identity* (every score-affecting flag, the
input layout, fingerprint and size, the checkpoint grid) and the model's
(:func:`model_identity`). A rerun whose identity differs is refused with the
list of differences; nothing is mixed.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from ..errors import BadFlagError, ChesFilterError
from ..scorefile import read_table
from .workdir import WorkDir

__all__ = ["FREE_FIELDS", "identity", "model_identity", "check_identity", "check_model", "output_matches", "differences"]

#: ScoreConfig fields that never change a score (beyond float rounding, as a
#: different device does): they may differ on a rerun.
FREE_FIELDS = frozenset({"quiet", "device", "trust_remote_code", "engine_workers"})
#: model.info keys that differ between the ranks of one job.
FREE_MODEL_KEYS = frozenset({"device"})
#: Output metadata keys that a finished output shares with its work directory.
TEMPLATE_KEYS = (
    "ches_filter_version", "model", "engine", "input_format", "token_layout", "measures", "use_chat_template",
    "columns", "input_fingerprint", "num_rows", "max_length",
)


def identity(config: Any, checkpoint_every: int, *, layout: str, fingerprint: str, num_rows: int) -> dict:
    """Everything known before the model loads that decides the scores."""
    flags = {k: v for k, v in sorted(dataclasses.asdict(config).items()) if k not in FREE_FIELDS}
    flags["checkpoint_every"] = checkpoint_every
    return {"flags": flags, "layout": layout, "input_fingerprint": fingerprint, "num_rows": num_rows}


def model_identity(scorer: Any) -> dict:
    """The loaded model's identity, engine strategy included."""
    info = {k: v for k, v in sorted(scorer.model.info.items()) if k not in FREE_MODEL_KEYS}
    info["device_type"] = getattr(scorer.model.device, "type", str(scorer.model.device))
    # A Hub model loaded at a moving revision ("main") is pinned by the commit it resolved to.
    info["commit"] = getattr(getattr(scorer.model.decoder, "config", None), "_commit_hash", None)
    info["engine"] = scorer.engine.strategy
    return info


def differences(stored: dict, current: dict, what: str) -> list[str]:
    """One phrase per key whose value differs (``flags`` keys read as CLI flags)."""
    out = []
    for key in sorted(set(stored) | set(current)):
        old, new = stored.get(key), current.get(key)
        if old == new:
            continue
        if what == "flags":
            out.append(f"`--{key.replace('_', '-')}` {old!r} there, {new!r} now")
        elif key == "input_fingerprint":
            out.append("the input rows differ (another file, or the file changed)")
        elif key == "num_rows":
            out.append(f"the input has {new} rows, the work directory's had {old}")
        else:
            out.append(f"{what} {key} {old!r} there, {new!r} now")
    return out


def _refuse_mix(work: WorkDir, problems: list[str]) -> None:
    if problems:
        error = BadFlagError(
            f"the work directory {work.path} holds results of a different run, so they cannot be resumed: "
            + "; ".join(problems)
            + ". Rerun with the same model, input and flags to resume, or delete that directory "
            "(or pass another `--work-dir`) to start over"
        )
        error.problems = problems  # for a caller that words its own advice (validate)
        raise error


def check_identity(work: WorkDir, manifest: dict, wanted: dict) -> None:
    stored = manifest.get("identity", {})
    problems = differences(stored.get("flags", {}), wanted["flags"], "flags")
    problems += differences(
        {k: v for k, v in stored.items() if k != "flags"}, {k: v for k, v in wanted.items() if k != "flags"}, "input"
    )
    _refuse_mix(work, problems)


def check_model(work: WorkDir, manifest: dict, wanted: dict) -> None:
    _refuse_mix(work, differences(manifest.get("model", {}), wanted, "model"))


def output_matches(output: str, manifest: dict | None) -> bool:
    """Whether ``output`` is the assembled result of the job ``manifest`` describes."""
    if manifest is None or not os.path.isfile(output):
        return False

    try:
        table, meta = read_table(output)
    except ChesFilterError:
        return False
    template = manifest.get("metadata", {})

    def comparable(meta: dict, key: str) -> Any:
        value = meta.get(key)
        if key == "model" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in FREE_MODEL_KEYS}
        return value

    return table.num_rows == template.get("num_rows") and all(
        comparable(meta, k) == comparable(template, k) for k in TEMPLATE_KEYS
    )
