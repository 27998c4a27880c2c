"""Score every row of a preference dataset: the ``score`` pipeline.

Reads rows in chunks, normalises them (:mod:`formats`), tokenises the next
chunk on a background thread while the model runs on the current one
(:mod:`batching`, :mod:`engine`), and turns the hidden-state sums into CHES and
LN-CHES (:mod:`ches`). One output row per input row, in input order; rows that
cannot be scored keep a named ``status`` instead of disappearing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterable, Iterator

from . import __version__
from .config import ScoreConfig
from .errors import BadDataError
from .formats import ROW_STATUSES, Columns, Pair, detect_layout, normalize_row

logger = logging.getLogger(__name__)

__all__ = ["score_pairs", "SCORE_STATUSES", "input_fingerprint", "SCORE_COLUMNS"]

#: Statuses the scorer adds to the per-row ones of :mod:`formats`.
SCORE_STATUSES = ROW_STATUSES + ("too_long", "identical_responses", "chat_template_error", "non_finite")
SCORE_COLUMNS = ("ches", "ln_ches", "prompt_tokens", "chosen_tokens", "rejected_tokens", "status")
_SAMPLE_ROWS = 100


def _columns(config: ScoreConfig) -> Columns:
    return Columns(config.prompt_column, config.chosen_column, config.rejected_column, config.id_column)


def _used_columns(layout: str, columns: Columns, available: list[str]) -> list[str]:
    used = [columns.chosen, columns.rejected]
    if layout.startswith("explicit") or columns.prompt in available:
        used.insert(0, columns.prompt)
    return [c for c in used if c in available]


def _hash_rows(digest: "hashlib._Hash", chunk: dict, names: list[str]) -> None:
    for values in zip(*(chunk[n] for n in names)):
        digest.update(json.dumps(values, sort_keys=True, ensure_ascii=False, default=repr).encode("utf-8", "replace"))
        digest.update(b"\n")


def _iter_chunks(ds: Any, names: list[str], chunk_size: int) -> Iterator[tuple[int, dict]]:
    view = ds.select_columns(names)
    for start in range(0, len(view), chunk_size):
        yield start, view[start : start + chunk_size]


def input_fingerprint(ds: Any, layout: str, columns: Columns, chunk_size: int = 4096) -> str:
    """SHA-256 over the used columns of every row: ties a score file to its input."""
    names = _used_columns(layout, columns, ds.column_names)
    digest = hashlib.sha256()
    for _, chunk in _iter_chunks(ds, names, chunk_size):
        _hash_rows(digest, chunk, names)
    return digest.hexdigest()


def load_input(data: Any, config: ScoreConfig) -> tuple[Any, str, Columns]:
    """Open ``data`` (path, ``datasets.Dataset`` or list of dicts) and settle its layout."""
    import datasets

    from .io import read_dataset

    if isinstance(data, datasets.Dataset):
        ds = data
    elif isinstance(data, (list, tuple)):
        if not data:
            raise BadDataError("the input holds no rows")
        ds = datasets.Dataset.from_list(list(data))
    else:
        ds = read_dataset(str(data), split=config.split, subset=config.subset)
    columns = _columns(config)
    if columns.id is not None and columns.id not in ds.column_names:
        raise BadDataError(
            f"`--id-column` {columns.id!r} is not in the input; available columns: {', '.join(ds.column_names)}"
        )
    if config.input_format is not None:
        layout = config.input_format
        missing = [c for c in _used_columns(layout, columns, ds.column_names + [columns.prompt]) if c not in ds.column_names]
        if missing:
            raise BadDataError(
                f"`--input-format {layout}` needs column(s) {', '.join(missing)}, which the input lacks; "
                f"available columns: {', '.join(ds.column_names)}; map them with `--prompt-column`, "
                "`--chosen-column`, `--rejected-column`"
            )
    else:
        sample = ds.select(range(min(_SAMPLE_ROWS, len(ds)))).to_list()
        layout = detect_layout(list(ds.column_names), sample, columns)
    logger.info("input: %d rows, layout %s", len(ds), layout)
    return ds, layout, columns


@dataclasses.dataclass
class _Prepared:
    start: int
    statuses: list[str]
    encoded: list[Any]  # EncodedPair or None
    ids: list[Any] | None


def _prepare(start: int, chunk: dict, layout: str, columns: Columns, encoder: Any, max_length: int) -> _Prepared:
    names = list(chunk)
    rows = [dict(zip(names, values)) for values in zip(*chunk.values())]
    statuses: list[str] = []
    encoded: list[Any] = []
    for row in rows:
        pair: Pair = normalize_row(row, layout, columns)
        status, enc = pair.status, None
        if status == "ok":
            try:
                enc = encoder.encode(pair)
            except BadDataError:
                raise
            except Exception as exc:  # noqa: BLE001 - chat templates raise anything (TemplateError, ValueError, ...)
                logger.debug("row %d: chat template/tokenizer failed: %s", start + len(statuses), exc)
                status = "chat_template_error"
            else:
                if enc.longest_sequence > max_length:
                    status = "too_long"
                elif enc.chosen == enc.rejected:
                    status = "identical_responses"
        statuses.append(status)
        encoded.append(enc)
    ids = chunk.get(columns.id) if columns.id else None
    return _Prepared(start, statuses, encoded, ids)


def _prefetch(items: Iterable[Any], fn) -> Iterator[Any]:
    """Map ``fn`` over ``items`` one step ahead on a worker thread.

    Tokenizers release the GIL, so the next chunk is tokenised while the
    model runs on the current one.
    """
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="ches-tokenize") as pool:
        pending = None
        for item in items:
            future = pool.submit(fn, *item)
            if pending is not None:
                yield pending.result()
            pending = future
        if pending is not None:
            yield pending.result()


def default_batch_tokens(device: Any) -> int:
    """Padded tokens per forward pass when ``--max-batch-tokens`` is not given."""
    return 65536 if getattr(device, "type", str(device)) == "cuda" else 2048


def score_pairs(data: Any, config: ScoreConfig | None = None, *, model: Any = None, progress: bool | None = None, **overrides: Any):
    """Score every pair of a preference dataset.

    Args:
        data: a path (see :func:`ches_filter.io.read_dataset`), a
            ``datasets.Dataset`` or a list of row dicts.
        config: a :class:`~ches_filter.config.ScoreConfig`; keyword
            ``overrides`` replace its fields (or build one).
        model: an already loaded :class:`~ches_filter.model.LoadedModel`
            (skips loading; its own settings win over ``config``'s model fields).
        progress: show a progress bar (default: not ``config.quiet``).

    Returns:
        A ``pyarrow.Table`` with one row per input row, in input order:
        ``row_index``, the id column if configured, ``ches``, ``ln_ches``,
        ``prompt_tokens``, ``chosen_tokens``, ``rejected_tokens``, ``status``.
        Its schema metadata (key ``ches_filter``) records model, layout and counts.
    """
    import pyarrow as pa
    import torch
    from tqdm.auto import tqdm

    from .batching import PairEncoder
    from .ches import ches_from_sums, ln_ches_from_sums
    from .engine import Engine
    from .model import load_model

    config = dataclasses.replace(config, **overrides) if config is not None else ScoreConfig(**overrides)
    ds, layout, columns = load_input(data, config)
    if model is None:
        model = load_model(
            config.model,
            revision=config.revision,
            trust_remote_code=config.trust_remote_code,
            dtype=config.dtype,
            device=config.device,
            attn_implementation=config.attn_implementation,
            device_map=config.device_map,
        )
    encoder = PairEncoder(model.tokenizer, use_chat_template=not config.no_chat_template)
    if not encoder.use_chat_template and layout.endswith("conversational"):
        why = "`--no-chat-template` was given" if config.no_chat_template else "the model's tokenizer has no chat template"
        raise BadDataError(
            f"the input is {layout} but {why}; conversational prompts need a chat template: use a model "
            "that has one, or give `prompt`/`chosen`/`rejected` as plain strings"
        )
    max_length = config.max_length or int(model.info.get("max_position_embeddings") or 2**31 - 1)
    pad_id = model.tokenizer.pad_token_id
    engine = Engine(
        model.decoder,
        model.device,
        strategy=config.engine,
        max_batch_tokens=config.max_batch_tokens or default_batch_tokens(model.device),
        max_batch_size=config.max_batch_size,
        pad_token_id=pad_id if pad_id is not None else model.tokenizer.eos_token_id,
    )
    names = _used_columns(layout, columns, ds.column_names)
    read_names = names + ([columns.id] if columns.id and columns.id not in names else [])
    digest = hashlib.sha256()
    out: dict[str, list] = {name: [] for name in ("row_index", "id") + SCORE_COLUMNS}
    show = (not config.quiet) if progress is None else progress
    bar = tqdm(total=len(ds), unit="pair", disable=not show, desc="scoring", dynamic_ncols=True)

    def prepare(start: int, chunk: dict) -> tuple[_Prepared, dict]:
        return _prepare(start, chunk, layout, columns, encoder, max_length), chunk

    for prepared, chunk in _prefetch(_iter_chunks(ds, read_names, config.chunk_size), prepare):
        _hash_rows(digest, chunk, names)
        ok = [i for i, enc in enumerate(prepared.encoded) if enc is not None and prepared.statuses[i] in ("ok", "identical_responses")]
        ches = [None] * len(prepared.statuses)
        ln_ches = [None] * len(prepared.statuses)
        if ok:
            states = engine.run([prepared.encoded[i] for i in ok])
            n_c = torch.tensor([len(prepared.encoded[i].chosen) for i in ok])
            n_r = torch.tensor([len(prepared.encoded[i].rejected) for i in ok])
            c_values = ches_from_sums(states.s_chosen, states.s_rejected).tolist()
            l_values = ln_ches_from_sums(states.s_chosen, states.s_rejected, n_c, n_r).tolist()
            for j, i in enumerate(ok):
                if math.isfinite(c_values[j]) and math.isfinite(l_values[j]):
                    ches[i], ln_ches[i] = c_values[j], l_values[j]
                else:
                    prepared.statuses[i] = "non_finite"
        for i, status in enumerate(prepared.statuses):
            enc = prepared.encoded[i]
            out["row_index"].append(prepared.start + i)
            out["ches"].append(ches[i])
            out["ln_ches"].append(ln_ches[i])
            out["prompt_tokens"].append(len(enc.prompt) if enc else None)
            out["chosen_tokens"].append(len(enc.chosen) if enc else None)
            out["rejected_tokens"].append(len(enc.rejected) if enc else None)
            out["status"].append(status)
        if prepared.ids is not None:
            out["id"].extend(prepared.ids)
        bar.update(len(prepared.statuses))
    bar.close()

    counts: dict[str, int] = {}
    for status in out["status"]:
        counts[status] = counts.get(status, 0) + 1
    fields = [pa.field("row_index", pa.int64())]
    arrays = [pa.array(out["row_index"], pa.int64())]
    if columns.id:
        id_array = pa.array(out["id"]) if out["id"] else pa.array([], pa.string())
        fields.append(pa.field(columns.id, id_array.type))
        arrays.append(id_array)
    for name, typ in (("ches", pa.float64()), ("ln_ches", pa.float64()), ("prompt_tokens", pa.int64()),
                      ("chosen_tokens", pa.int64()), ("rejected_tokens", pa.int64()), ("status", pa.string())):
        fields.append(pa.field(name, typ))
        arrays.append(pa.array(out[name], typ))
    metadata = {
        "ches_filter_version": __version__,
        "model": model.info,
        "engine": engine.strategy,
        "input_format": layout,
        "token_layout": "paper",
        "use_chat_template": encoder.use_chat_template,
        "columns": dataclasses.asdict(columns),
        "input": None if not isinstance(data, (str, bytes)) and not hasattr(data, "__fspath__") else str(data),
        "input_fingerprint": digest.hexdigest(),
        "num_rows": len(ds),
        "max_length": max_length,
        "counts": counts,
    }
    table = pa.Table.from_arrays(arrays, schema=pa.schema(fields))
    table = table.replace_schema_metadata({b"ches_filter": json.dumps(metadata).encode()})
    logger.info("scored %d of %d rows (%s)", counts.get("ok", 0), len(ds), ", ".join(f"{k}: {v}" for k, v in sorted(counts.items())))
    return table


def table_metadata(table: Any) -> dict:
    """The ``ches_filter`` metadata dict stored on a score table (``{}`` if none)."""
    raw = (table.schema.metadata or {}).get(b"ches_filter")
    return json.loads(raw) if raw else {}
