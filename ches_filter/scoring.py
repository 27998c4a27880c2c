"""The scorer: a chunk of rows in, one Arrow table of measures out.

:class:`PairScorer` normalises rows (:mod:`formats`), tokenises the next chunk
on a background thread while the model runs on the current one
(:mod:`batching`, :mod:`engine`), and turns the hidden-state sums into CHES and
LN-CHES (:mod:`measures`, :mod:`ches`). One output row per input row, in input
order; rows that cannot be scored keep a named ``status`` instead of
disappearing.

It scores any list of contiguous row ranges and hands each range back as one
Arrow table as soon as it is done: :func:`ches_filter.score_pairs` (:mod:`api`)
concatenates the ranges in memory, :mod:`ches_filter.run` writes each range to
disk as a checkpoint part. This module imports neither :mod:`api` nor
:mod:`run`; the input is opened by :mod:`inputs`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator

from . import __version__
from .batching import PairEncoder, SpecialRows
from .config import ScoreConfig
from .errors import BadDataError
from .formats import LAYOUTS, ROW_STATUSES, Columns, Pair, normalize_row, used_columns
from .inputs import PageReleaser, source_name
from .measures import MEASURES, MeasureInput, compute_measures
from .model import load_model
from .scorefile import FLAG_COLUMNS, HEAD_COLUMNS, TAIL_COLUMNS, own_columns, parse_metadata

# pyarrow is imported in the functions that use it: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = [
    "build_scorer", "PairScorer", "SCORE_STATUSES", "TAIL_COLUMNS", "own_columns", "table_metadata",
    "status_counts", "merge_counts", "scores_identity", "default_batch_tokens", "load_kwargs",
]

#: Statuses the scorer adds to the per-row ones of :mod:`formats`.
SCORE_STATUSES = ROW_STATUSES + ("too_long", "identical_responses", "chat_template_error", "non_finite", "special_tokens")
@dataclasses.dataclass
class _Prepared:
    start: int
    statuses: list[str]
    encoded: list[Any]  # EncodedPair or None
    special: list[bool] = dataclasses.field(default_factory=list)  # text holds special tokens


def _prepare(start: int, chunk: dict, layout: str, columns: Columns, encoder: Any, max_length: int) -> _Prepared:
    names = list(chunk)
    rows = [dict(zip(names, values)) for values in zip(*chunk.values())]
    pairs: list[Pair] = [normalize_row(row, layout, columns) for row in rows]
    checked, special = encoder.encode_chunk(pairs, max_length)
    return _Prepared(start, [status for status, _ in checked], [enc for _, enc in checked], special)


def _prefetch(items: Iterable[Any], fn) -> Iterator[Any]:
    """Map ``fn`` over ``items`` one step ahead on a worker thread.

    The chunk's pairs are tokenised as lists (Rust, all cores, GIL released:
    :meth:`~ches_filter.batching.PairEncoder.encode_checked_many`), so the
    next chunk is ready while the model runs on the current one.
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
    """Padded tokens per forward pass when ``--max-batch-tokens`` is not given.

    On CPU bigger batches are slower, not faster: activations leave the cache
    and padding grows while the matrix products gain nothing past ~128 rows;
    512 lets short pairs share a pass (measured in benchmarks/RESULTS.md).
    """
    return 65536 if getattr(device, "type", str(device)) == "cuda" else 512


def status_counts(statuses: Any) -> dict[str, int]:
    """Rows per status of a ``status`` column (Arrow array/chunked array or list), sorted by name."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if not isinstance(statuses, (pa.Array, pa.ChunkedArray)):
        statuses = pa.array(list(statuses), pa.string())
    counts = {str(item["values"]): int(item["counts"]) for item in pc.value_counts(statuses).to_pylist()}
    return dict(sorted(counts.items()))


def merge_counts(total: dict[str, int], more: dict[str, int]) -> dict[str, int]:
    """Add ``more`` into ``total`` (in place) and return it."""
    for key, value in more.items():
        total[key] = total.get(key, 0) + int(value)
    return total


class PairScorer:
    """Everything fixed for one scoring job, and the score loop itself.

    Args:
        ds: the input as a ``datasets.Dataset`` (memory-mapped Arrow).
        layout: one of :data:`~ches_filter.formats.LAYOUTS`.
        columns: which columns hold the pair (and the optional id).
        config: the :class:`~ches_filter.config.ScoreConfig`.
        model: a loaded :class:`~ches_filter.model.LoadedModel`.

    Raises:
        BadDataError: the input is conversational but no chat template can be used.
    """

    def __init__(self, ds: Any, layout: str, columns: Columns, config: ScoreConfig, model: Any) -> None:
        from .engine import Engine  # lazy: engine.py imports torch

        self.ds, self.layout, self.columns, self.config, self.model = ds, layout, columns, config, model
        self.encoder = PairEncoder(
            model.tokenizer, use_chat_template=not config.no_chat_template, layout=config.layout, input_format=layout,
            on_special_tokens=config.on_special_tokens,
        )
        if not self.encoder.use_chat_template and LAYOUTS.get(layout).conversational:
            why = "`--no-chat-template` was given" if config.no_chat_template else "the model's tokenizer has no chat template"
            raise BadDataError(
                f"the input is {layout} but {why}; conversational prompts need a chat template: use a model "
                "that has one, or give `prompt`/`chosen`/`rejected` as plain strings"
            )
        self.max_length = config.max_length or int(model.info.get("max_position_embeddings") or 2**31 - 1)
        pad_id = model.tokenizer.pad_token_id
        self.engine = Engine(
            model.decoder,
            model.device,
            strategy=config.engine,
            max_batch_tokens=config.max_batch_tokens or default_batch_tokens(model.device),
            max_batch_size=config.max_batch_size,
            pad_token_id=pad_id if pad_id is not None else model.tokenizer.eos_token_id,
            workers=config.engine_workers,
        )
        self.names = used_columns(layout, columns, ds.column_names)
        self.read_names = self.names + ([columns.id] if columns.id and columns.id not in self.names else [])
        self.schema = self._schema()

    @property
    def num_rows(self) -> int:
        return len(self.ds)

    def _schema(self) -> Any:
        import pyarrow as pa

        fields = [pa.field(name, getattr(pa, kind)()) for name, kind in HEAD_COLUMNS.items()]
        if self.columns.id:
            # The dataset's own Arrow type, so every part of a sharded run agrees
            # even when one part holds only nulls.
            fields.append(pa.field(self.columns.id, self.ds.data.schema.field(self.columns.id).type))
        # The measures asked for (``--measures``), then the token counts and status.
        fields += [pa.field(name, pa.float64()) for name in self.config.measure_list]
        fields += [pa.field(name, getattr(pa, kind)()) for name, kind in TAIL_COLUMNS.items()]
        if self.config.on_special_tokens == "flag":
            fields += [pa.field(name, getattr(pa, kind)()) for name, kind in FLAG_COLUMNS.items()]
        return pa.schema(fields)

    def metadata(self, *, data: Any, fingerprint: str, counts: dict[str, int]) -> dict:
        """The ``ches_filter`` metadata dict of a score table (see :func:`table_metadata`)."""
        return {
            "ches_filter_version": __version__,
            "model": self.model.info,
            "engine": self.engine.strategy,
            "input_format": self.layout,
            "token_layout": self.config.layout,
            "measures": list(self.config.measure_list),
            "use_chat_template": self.encoder.use_chat_template,
            "columns": dataclasses.asdict(self.columns),
            "input": source_name(data),
            "input_fingerprint": fingerprint,
            "num_rows": self.num_rows,
            "max_length": self.max_length,
            "on_special_tokens": self.config.on_special_tokens,
            "counts": dict(sorted(counts.items())),
        }

    def _chunks(self, ranges: Iterable[tuple[int, int]], view: Any) -> Iterator[tuple[int, dict]]:
        size = self.config.chunk_size
        release = PageReleaser(self.ds)
        for first, stop in ranges:
            for start in range(first, stop, size):
                chunk = view[start : min(start + size, stop)]
                release()  # the rows are Python objects now; the mapped pages can go
                yield start, chunk

    def score_ranges(
        self,
        ranges: Iterable[tuple[int, int]],
        *,
        on_chunk: Callable[[int, dict, int], None] | None = None,
        on_rows: Callable[[int], None] | None = None,
    ) -> Iterator[tuple[int, int, Any]]:
        """Score contiguous row ranges; yield ``(start, stop, table)`` for each, in order.

        A range is cut into chunks of ``config.chunk_size`` rows starting at
        its first row, so a range always splits the same way however the job
        is sharded or resumed: the pairs batched together, and so the scores
        to the last bit, depend only on the range. Tokenisation runs one chunk
        ahead across range boundaries.

        Args:
            ranges: ``(start, stop)`` row ranges, half open; empty ones are skipped.
                Read lazily, one chunk ahead of the scoring (a generator may
                claim each range as it is asked for the next).
            on_chunk: called as ``on_chunk(start, chunk, rows)`` after each chunk
                (``chunk`` maps the read column names to Python lists).
            on_rows: called with a row count as rows finish, after every
                forward batch (for a progress bar); the counts of a chunk add
                up to its rows.
        """
        import pyarrow as pa

        view = self.ds.select_columns(self.read_names)
        layout, columns, encoder, max_length = self.layout, self.columns, self.encoder, self.max_length
        pending_ranges: list[tuple[int, int]] = []

        def taken() -> Iterator[tuple[int, int]]:
            for a, b in ranges:
                if b > a:
                    pending_ranges.append((int(a), int(b)))
                    yield int(a), int(b)
        batches: list[Any] = []
        special = SpecialRows()  # rows of the current range whose text holds special tokens

        def prepare(start: int, chunk: dict) -> tuple[_Prepared, dict]:
            return _prepare(start, chunk, layout, columns, encoder, max_length), chunk

        range_index = 0
        for prepared, chunk in _prefetch(self._chunks(taken(), view), prepare):
            batches.append(self._score_chunk(prepared, chunk, on_rows))
            special.add_rows(prepared.start, prepared.special)
            rows = len(prepared.statuses)
            if on_chunk is not None:
                on_chunk(prepared.start, chunk, rows)
            first, stop = pending_ranges[range_index]
            if prepared.start + rows == stop:
                table = pa.Table.from_batches(batches, schema=self.schema).replace_schema_metadata(special.metadata())
                yield first, stop, table
                batches, special = [], SpecialRows()
                range_index += 1
        if range_index != len(pending_ranges):  # a chunk reader that returned short would land here
            raise RuntimeError(f"rows {pending_ranges[range_index]} were not scored")

    def _score_chunk(self, prepared: _Prepared, chunk: dict, on_rows: Callable[[int], None] | None = None) -> Any:
        """One chunk's rows as an Arrow record batch of :attr:`schema`."""
        import pyarrow as pa

        n = len(prepared.statuses)
        encoded = prepared.encoded
        measures = self.config.measure_list
        values: dict[str, list[float | None]] = {m: [None] * n for m in measures}
        ok = [i for i, enc in enumerate(encoded) if enc is not None and prepared.statuses[i] == "ok"]
        identical = [i for i, status in enumerate(prepared.statuses) if status == "identical_responses"]
        # Identical responses: a measure with an exact value for them (S+ == S-
        # gives CHES = LN-CHES = 0) takes it; the packed branches would only add
        # float noise. The others are computed from the states like any pair.
        exact = {m: MEASURES.get(m).identical_value for m in measures}
        for i in identical:
            for m, value in exact.items():
                if value is not None:
                    values[m][i] = value
        needs_model = any(MEASURES.get(m).needs_model for m in measures)
        run = ok + (identical if any(v is None for v in exact.values()) else [])
        if run:
            chosen = [encoded[i].chosen for i in run]
            rejected = [encoded[i].rejected for i in run]
            states = self.engine.run([encoded[i] for i in run], on_progress=on_rows) if needs_model else None
            computed = compute_measures(measures, MeasureInput(chosen, rejected, states))
            for j, i in enumerate(run):
                if prepared.statuses[i] == "identical_responses":
                    for m in measures:
                        if exact[m] is None:
                            values[m][i] = computed[m][j]
                elif all(math.isfinite(computed[m][j]) for m in computed):
                    for m in computed:
                        values[m][i] = computed[m][j]
                else:
                    prepared.statuses[i] = "non_finite"
        forwarded = len(run) if needs_model else 0
        if on_rows is not None and n > forwarded:
            on_rows(n - forwarded)  # rows that needed no forward pass
        out: dict[str, list] = {
            "row_index": list(range(prepared.start, prepared.start + n)),
            **values,
            "prompt_tokens": [len(e.prompt) if e else None for e in encoded],
            "chosen_tokens": [len(e.chosen) if e else None for e in encoded],
            "rejected_tokens": [len(e.rejected) if e else None for e in encoded],
            "status": prepared.statuses,
            "special_tokens": prepared.special,
        }
        if self.columns.id:
            out[self.columns.id] = chunk[self.columns.id]
        arrays = [pa.array(out[field.name], field.type) for field in self.schema]
        return pa.RecordBatch.from_arrays(arrays, schema=self.schema)


def load_kwargs(config: ScoreConfig) -> dict:
    return dict(
        revision=config.revision,
        trust_remote_code=config.trust_remote_code,
        dtype=config.dtype,
        device=config.device,
        attn_implementation=config.attn_implementation,
        device_map=config.device_map,
    )


def build_scorer(ds: Any, layout: str, columns: Columns, config: ScoreConfig, model: Any = None) -> PairScorer:
    """Load the model ``config`` names (unless given) and build a :class:`PairScorer`."""
    if model is None:
        model = load_model(config.model, **load_kwargs(config))
    return PairScorer(ds, layout, columns, config, model)


def scores_identity(meta: dict, num_rows: int) -> dict:
    """What identifies a score file's values: its input, row count, model and scoring settings.

    ``validate`` records it in its ``summary.json``; ``report SCORES --validate DIR``
    compares it with SCORES, so verdicts are never shown beside another file's scores.
    """
    model = meta.get("model") if isinstance(meta.get("model"), dict) else {}
    return {
        "input_fingerprint": meta.get("input_fingerprint"), "num_rows": int(num_rows),
        "model": model.get("model"), "revision": model.get("revision"), "gguf_sha256": model.get("gguf_sha256"),
        "dtype": model.get("dtype"), "token_layout": meta.get("token_layout"),
        "use_chat_template": meta.get("use_chat_template"), "max_length": meta.get("max_length"),
    }


def table_metadata(table: Any) -> dict:
    """The ``ches_filter`` metadata dict stored on a score table (``{}`` if none)."""
    return parse_metadata(table.schema.metadata, "the score table")
