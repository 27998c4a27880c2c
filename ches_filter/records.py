"""The user's records: read only what is scored, write back selections of the records themselves.

Reading (:func:`open_records`) parses nothing into types but the columns that
are scored (the pair columns and ``--id-column``): JSON lines are decoded one
line at a time with :mod:`json` (numbers stay exactly what they were), CSV
cells are text (no NA sentinels, no number inference), Parquet and
``save_to_disk`` data stay Arrow. The scored columns go to a memory-mapped
Arrow file (:attr:`Records.scored`); every other column is opaque.

Writing (:func:`write_selections`) is a selection, not a rewrite, when the
output has the input's kind: the kept JSON lines byte for byte, the kept CSV
records verbatim under the original header, the kept rows of the original
Arrow table (schema and metadata kept), ``Dataset.select`` for a
``save_to_disk`` directory. New columns (``--add-scores``, the reject reason)
are appended at the end of each record. Across kinds a value goes through only
if it reads back identical, type-strict; otherwise one line names the column,
the first row and the same-kind output that works, and nothing is written.
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import gzip
import io as _io
import json
import logging
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

from .atomic import atomic_paths, writing
from .errors import BadDataError, ChesFilterError, reason
from .paths import check_paths, output_kind

# datasets, pyarrow and numpy are imported in the functions that use them: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

#: Rows per Arrow chunk of the scored columns.
CHUNK_ROWS = 8192
_BOM = "\ufeff"
_GZIP_MAGIC = b"\x1f\x8b"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1

#: What each input kind writes as the same kind (for the advice of a refusal).
SAME_KIND_OUTPUT = {
    "jsonl": "a `.jsonl` output",
    "json": "the `.json` array as JSON lines (one object per line) and prune that to a `.jsonl` output",
    "csv": "a `.csv` output",
    "parquet": "a `.parquet` output",
    "dataset": "a directory output (save_to_disk) or `.parquet`",
}
#: Output kinds that are a plain selection of each input kind.
_SAME_KIND = {"jsonl": {"jsonl"}, "json": set(), "csv": {"csv"}, "parquet": {"parquet"}, "dataset": {"disk", "parquet"}}


@dataclasses.dataclass
class Records:
    """An input opened for scoring and for writing selections of it.

    Attributes:
        label: the source as the user named it.
        kind: ``jsonl`` (JSON lines, also ``.json``/``.gz``), ``json`` (a
            ``.json`` array), ``csv``, ``parquet`` or ``dataset`` (a
            ``save_to_disk`` directory, a Hub dataset or in-memory rows).
        files: the local files read, in order.
        columns: every column, in order of first appearance.
        scored: the scored columns as a memory-mapped ``datasets.Dataset``
            (every column for ``dataset`` inputs).
        dataset: the whole ``datasets.Dataset`` of a ``dataset`` input.
    """

    label: str
    kind: str
    files: list[str]
    columns: list[str]
    scored: Any
    dataset: Any = None
    stats: list[tuple[int, int]] = dataclasses.field(default_factory=list)

    @property
    def num_rows(self) -> int:
        return len(self.scored)


# --------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------


def open_binary(path: str):
    return gzip.open(path, "rb") if path.lower().endswith(".gz") else open(path, "rb")


def _stat(path: str) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns


def read_files(label: str, files: list[str], kind: str, wanted: Sequence[str] | None) -> Records:
    """Opens local files of one kind (``json``, ``csv`` or ``parquet``: :mod:`ches_filter.sources`).

    Args:
        label: the source as named by the user.
        files: the files, in order.
        kind: the loader kind of every file.
        wanted: the columns to parse (the pair and id columns); None parses
            every column (a library reader of the whole dataset).
    """
    for path in files:
        if not os.access(path, os.R_OK):
            raise BadDataError(f"cannot read {path}: permission denied; check its permissions.")
    stats = [_stat(path) for path in files]
    if kind == "parquet":
        return _read_parquet(label, files, wanted, stats)
    if kind == "csv":
        return _read_csv(label, files, wanted, stats)
    modes = [_json_mode(path) for path in files]
    if "array" in modes and len(files) > 1:
        raise BadDataError(
            f"{label} holds several `.json` files, one of them a JSON array; pass one array file at a time, "
            "or convert the files to JSON lines."
        )
    if modes == ["array"]:
        return _read_json_array(label, files[0], wanted, stats)
    return _read_json_lines(label, files, wanted, stats)


def _json_mode(path: str) -> str:

    head = read_bytes(path, 4096)
    if head.startswith(_GZIP_MAGIC) and not path.lower().endswith(".gz"):
        raise BadDataError(
            f"{path} is gzip-compressed but its name does not end in `.gz`; rename it "
            "to end in `.jsonl.gz` or `.json.gz`."
        )
    if path.lower().endswith((".json", ".json.gz")) and head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        return "array"
    return "lines"


def _kind_of(value: Any) -> str:
    if isinstance(value, str):
        return "text"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a fraction"
    if isinstance(value, dict):
        return "an object"
    return "null"


class _Spool:
    """Collects the parsed columns chunk by chunk into one memory-mapped Arrow file.

    A pair column keeps text or lists only: any other value (a number, an
    object) is stored as null, so the row gets its ``invalid_*`` status
    instead of refusing the file, as is a value whose kind (text or a list)
    differs from the column's first. A pair column of lists (messages) is
    stored as each value's JSON text and decoded again on every read (a
    ``datasets`` transform), so messages keep exactly the shape they were
    written in: Arrow could not hold ``content`` that is text in one message
    and a list of parts in another, and would add the keys one message lacks
    as nulls. ``--id-column`` values keep their type and must be of one
    kind. With ``names=None`` every column is kept.
    """

    def __init__(self, label: str, names: Sequence[str] | None, strict: Sequence[str]) -> None:
        self.label = label
        self.fixed = list(names) if names is not None else None
        self.strict = set(strict)
        self.seen: dict[str, None] = {}  # every column, first appearance first
        self.values: dict[str, list] = {}
        self.first_kind: dict[str, tuple[str, str]] = {}
        self.json_columns: set[str] = set()  # pair columns of lists, stored as JSON text
        self.rows = 0
        self.chunk_rows = 0
        self.tables: list[Any] = []
        self.dir = tempfile.mkdtemp(prefix="ches-filter-records-")
        atexit.register(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "scored.arrow")
        self.writer = None
        self.schema = None
        self.unified = False  # chunks of differing schemas are kept in memory, then unified

    def add(self, record: dict, where: str) -> None:
        self.seen.update(dict.fromkeys(record))
        names = self.fixed if self.fixed is not None else list(self.seen)
        for name in names:
            column = self.values.get(name)
            if column is None:
                column = self.values[name] = [None] * self.chunk_rows
            value = record.get(name)
            if value is not None and self.fixed is not None:
                kind = _kind_of(value)
                first = self.first_kind.setdefault(name, (kind, where))
                if name in self.strict:
                    if first[0] != kind:
                        raise BadDataError(
                            f"{self.label}: the id column `{name}` holds {first[0]} on {first[1]} and {kind} on "
                            f"{where}; an id column holds one kind of value (quote the ids to make them all text)."
                        )
                elif kind not in ("text", "a list") or kind != first[0]:
                    value = None  # not a pair value: the row is scored invalid, not the file refused
                elif kind == "a list":
                    self.json_columns.add(name)
                    value = json.dumps(value, ensure_ascii=False)
            column.append(value)
        self.chunk_rows += 1
        self.rows += 1
        if self.chunk_rows >= CHUNK_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.chunk_rows and self.rows:
            return
        names = self.fixed if self.fixed is not None else list(self.seen)
        arrays = []
        for name in names:
            column = self.values.get(name) or [None] * self.chunk_rows
            column += [None] * (self.chunk_rows - len(column))
            try:
                arrays.append(pa.array(column))
            except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
                raise BadDataError(
                    f"{self.label}: column `{name}` holds values that cannot be read as one column ({reason(exc)}); "
                    "make every row hold the same kind of value there."
                ) from None
        table = pa.Table.from_arrays(arrays, names=names)
        self.values = {}
        self.chunk_rows = 0
        if self.unified:
            self.tables.append(table)
            return
        if self.schema is None:
            self.schema = table.schema
            self.writer = pa.ipc.new_stream(self.path, self.schema)
        if table.schema != self.schema:
            try:
                table = table.cast(self.schema)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError, ValueError):
                self.unified = True
                self.tables.append(table)
                return
        self.writer.write_table(table)

    def finish(self) -> Any:
        import datasets
        import pyarrow as pa

        self._flush()
        if self.writer is None:  # no row at all
            return None
        self.writer.close()
        if self.unified:
            with pa.memory_map(self.path) as source:
                written = pa.ipc.open_stream(source).read_all()
            try:
                table = pa.concat_tables([written] + self.tables, promote_options="permissive")
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError) as exc:
                raise BadDataError(
                    f"{self.label}: a column holds values of different kinds across rows ({reason(exc)}); "
                    "make every row hold the same kind of value there."
                ) from None
            del written
            os.unlink(self.path)
            self.path = os.path.join(self.dir, "scored-unified.arrow")
            with pa.ipc.new_stream(self.path, table.schema) as writer:
                writer.write_table(table)
            self.tables = []
        ds = datasets.Dataset.from_file(self.path, in_memory=False)
        absent = [name for name in ds.column_names if name not in self.seen]
        # Columns no row holds are left out (as if never asked for), unless none would remain to count the rows.
        if absent and len(absent) < len(ds.column_names):
            ds = ds.remove_columns(absent)
        if self.json_columns:
            ds.set_transform(_JsonColumns(self.json_columns))  # kept by select_columns and select
        return ds


class _JsonColumns:
    """A ``datasets`` transform: decodes the pair columns :class:`_Spool` stored as JSON text."""

    def __init__(self, names: set[str]) -> None:
        self.names = frozenset(names)

    def __call__(self, batch: dict) -> dict:
        return {
            name: [None if v is None else json.loads(v) for v in values] if name in self.names else values
            for name, values in batch.items()
        }


def _read_json_lines(label: str, files: list[str], wanted: Sequence[str] | None, stats: list) -> Records:
    spool = _Spool(label, wanted, strict=wanted[3:] if wanted is not None else ())
    for path, _line_no, raw, text in _iter_json_lines(files):
        spool.add(_parse_line(path, _line_no, text, wanted), f"line {_line_no} of {path}" if len(files) > 1 else f"line {_line_no}")
    scored = spool.finish()
    if scored is None:
        raise BadDataError(f"{label} holds no rows; it needs at least one JSON object per line.")
    return Records(label, "jsonl", files, list(spool.seen), scored, stats=stats)


def _line_text(path: str, line_no: int, raw: bytes) -> str:
    """One line of a JSON lines or CSV file as text: UTF-8, a BOM on the first line left out."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadDataError(
            f"{path} line {line_no} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at offset "
            f"{exc.start}); re-save the file as UTF-8."
        ) from None
    return text[1:] if line_no == 1 and text.startswith(_BOM) else text


def _iter_json_lines(files: list[str]) -> Iterator[tuple[str, int, bytes, str]]:
    """``(path, line number, raw line, text)`` of every non-blank line (BOM left out of the text only)."""
    for path in files:
        line_no = 0
        try:
            with open_binary(path) as fh:
                for line_no, raw in enumerate(fh, start=1):
                    if not raw.strip():
                        continue  # blank lines hold no record
                    yield path, line_no, raw, _line_text(path, line_no, raw)
        except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
            raise BadDataError(
                f"{path} is truncated or not a valid gzip file (failed after line {line_no}: {reason(exc)}); "
                "re-download or re-compress it."
            ) from None
        except OSError as exc:
            raise BadDataError(f"cannot read {path} ({reason(exc)}); check the file.") from None


class _DuplicateKey(Exception):
    pass


def _strict_object(pairs: list) -> dict:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        raise _DuplicateKey(next(k for i, k in enumerate(keys) if k in keys[:i]))
    return dict(pairs)


def _parse_line(path: str, line_no: int, text: str, watch: Sequence[str] | None = None) -> dict:
    """One JSON lines record; a repeated top-level key is refused when it is one of ``watch`` (None: any)."""
    try:
        record = json.loads(text)
    except json.JSONDecodeError as exc:
        raise BadDataError(
            f"{path} line {line_no} is not valid JSON: {exc.msg} (column {exc.colno}); fix or remove that line, "
            "since each line must hold one JSON object."
        ) from None
    except RecursionError:
        raise BadDataError(
            f"{path} line {line_no} nests JSON values deeper than Python's JSON reader goes; flatten that "
            "value (e.g. store it as a string) or remove the line."
        ) from None
    if not isinstance(record, dict):
        raise BadDataError(
            f"{path} line {line_no} holds {_kind_of(record)} where a JSON object is expected; each line must be "
            'one object such as {"chosen": ..., "rejected": ...}.'
        )
    # json keeps the last of a repeated key silently; look only where a watched name occurs twice.
    if watch is None or any(text.count(json.dumps(name, ensure_ascii=False)) > 1 for name in watch):
        top: list = []

        def hook(pairs: list) -> dict:
            top[:] = [key for key, _ in pairs]  # the top-level object is the last one closed
            return dict(pairs)

        json.loads(text, object_pairs_hook=hook)
        duplicate = next((k for i, k in enumerate(top) if k in top[:i] and (watch is None or k in watch)), None)
        if duplicate is not None:
            raise BadDataError(
                f"{path} line {line_no} has the key {duplicate!r} twice in one object; keep one of them "
                "(JSON objects need unique keys)."
            )
    return record


def _read_json_array(label: str, path: str, wanted: Sequence[str] | None, stats: list) -> Records:
    items = _load_json_array(path)
    spool = _Spool(label, wanted, strict=wanted[3:] if wanted is not None else ())
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            raise BadDataError(
                f"{path} array element {number} holds {_kind_of(item)} where a JSON object is expected; every "
                "element must be an object."
            )
        spool.add(item, f"array element {number}")
    scored = spool.finish()
    if scored is None:
        raise BadDataError(
            f"{path} holds no rows; a `.json` file must hold a non-empty JSON array of objects, or one JSON "
            "object per line."
        )
    return Records(label, "json", [path], list(spool.seen), scored, stats=stats)


def _load_json_array(path: str) -> list:

    data = read_bytes(path, -1)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line_no = data.count(b"\n", 0, exc.start) + 1
        raise BadDataError(
            f"{path} line {line_no} is not valid UTF-8 (byte 0x{data[exc.start]:02x}); re-save the file as UTF-8."
        ) from None
    if text.startswith(_BOM):
        text = text[1:]
    try:
        items = json.loads(text, object_pairs_hook=_strict_object)
    except json.JSONDecodeError as exc:
        raise BadDataError(
            f"{path} line {exc.lineno} is not valid JSON: {exc.msg} (column {exc.colno}); fix the file so it "
            "holds one JSON array of objects."
        ) from None
    except RecursionError:
        raise BadDataError(
            f"{path} nests JSON values deeper than Python's JSON reader goes; flatten the deepest value "
            "(e.g. store it as a string)."
        ) from None
    except _DuplicateKey:
        number, line_no, key = _array_duplicate(text)
        raise BadDataError(
            f"{path} array element {number} (starting on line {line_no}) has the key {key!r} twice in one object; "
            "keep one of them (JSON objects need unique keys)."
        ) from None
    if not isinstance(items, list) or not items:
        raise BadDataError(
            f"{path} holds no rows; a `.json` file must hold a non-empty JSON array of objects, or one JSON "
            "object per line."
        )
    return items


def _array_duplicate(text: str) -> tuple[int, int, str]:
    """``(element, line, key)`` of the first array element with a repeated key (the array is known to have one)."""
    decoder = json.JSONDecoder(object_pairs_hook=_strict_object)
    index = text.index("[") + 1
    number = 0
    while True:
        while text[index] in " \t\r\n,":
            index += 1
        number += 1
        try:
            _, index = decoder.raw_decode(text, index)
        except _DuplicateKey as dup:
            return number, text.count("\n", 0, index) + 1, str(dup.args[0])


def _iter_csv(files: list[str]) -> Iterator[tuple[str, int, list[str], bytes, bytes]]:
    """``(path, line, cells, raw record, raw header)`` of every record (the header row left out)."""
    for path in files:
        raw_lines: list[bytes] = []
        line_no = 0

        def lines() -> Iterator[str]:
            nonlocal line_no
            with open(path, "rb") as fh:
                for raw in fh:
                    line_no += 1
                    raw_lines.append(raw)
                    yield _line_text(path, line_no, raw)

        reader = csv.reader(lines(), strict=True)
        header_raw = None
        try:
            for cells in reader:
                raw = b"".join(raw_lines)
                raw_lines.clear()
                first = line_no - raw.count(b"\n") + (0 if raw.endswith(b"\n") else 1)
                if not cells:
                    if header_raw is None:
                        raise BadDataError(f"{path} starts with a blank line; its first line must be the header.")
                    continue  # a blank line holds no record
                if header_raw is None:
                    header_raw = raw
                    yield path, 0, cells, raw, raw
                    continue
                yield path, max(first, 1), cells, raw, header_raw
        except csv.Error as exc:
            raise BadDataError(f"{path} line {line_no} is not valid CSV ({exc}); fix that line.") from None
        except OSError as exc:
            raise BadDataError(f"cannot read {path} ({reason(exc)}); check the file.") from None


def _read_csv(label: str, files: list[str], wanted: Sequence[str] | None, stats: list) -> Records:
    header: list[str] | None = None
    spool = _Spool(label, wanted, strict=())
    current: list[str] | None = None
    for path, line, cells, _raw, _header_raw in _iter_csv(files):
        if line == 0:
            current = cells
            if header is None:
                header = cells
                dup = next((c for i, c in enumerate(cells) if c in cells[:i]), None)
                if dup is not None and (wanted is None or dup in wanted):
                    raise BadDataError(f"{path}: the header names the column `{dup}` twice; rename one of them.")
            elif cells != header:
                raise BadDataError(
                    f"{label}: {path} has the header {','.join(cells)} but {files[0]} has {','.join(header)}; "
                    "read files of one header at a time."
                )
            continue
        assert current is not None
        if len(cells) > len(current):
            raise BadDataError(
                f"{path} line {line} has {len(cells)} fields but the header has {len(current)}; quote the field "
                "that holds a comma, or fix that line."
            )
        spool.add(dict(zip(current, cells)), f"line {line}")
    scored = spool.finish()
    if scored is None:
        raise BadDataError(f"{label} holds no rows; it needs at least one example.")
    return Records(label, "csv", files, list(header or []), scored, stats=stats)


def _read_parquet(label: str, files: list[str], wanted: Sequence[str] | None, stats: list) -> Records:
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = []
    columns: list[str] = []
    for path in files:
        try:
            schema = pq.read_schema(path)
            names = [n for n in schema.names if wanted is None or n in wanted]
            table = pq.read_table(path, columns=names, memory_map=True)
        except (pa.ArrowException, OSError) as exc:
            raise BadDataError(
                f"{path} is not a readable parquet file ({reason(exc)}); re-export it as parquet."
            ) from None
        columns += [n for n in schema.names if n not in columns]
        tables.append(_plain(table))
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise BadDataError(f"{label}: its parquet files disagree on a column's type ({reason(exc)}).") from None
    if table.num_rows == 0:
        raise BadDataError(f"{label} holds no rows; it needs at least one example.")
    try:
        scored = datasets.Dataset(table.combine_chunks())
    except Exception as exc:  # noqa: BLE001 - a type datasets has no feature for
        raise BadDataError(f"{label}: the scored columns cannot be read ({reason(exc)}).") from None
    return Records(label, "parquet", files, columns, scored, stats=stats)


def _plain(table: Any) -> Any:
    """``table`` with dictionary-encoded columns decoded (for scoring only: the output keeps the original)."""
    import pyarrow as pa

    fields = []
    for field in table.schema:
        fields.append(field.with_type(field.type.value_type) if pa.types.is_dictionary(field.type) else field)
    schema = pa.schema(fields)
    return table.cast(schema) if schema != table.schema else table


def from_dataset(label: str, ds: Any) -> Records:
    """A ``datasets.Dataset`` (``save_to_disk``, the Hub, in-memory rows) as :class:`Records`."""
    return Records(label, "dataset", [], list(ds.column_names), ds, dataset=ds)


# --------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------


@dataclasses.dataclass
class Selection:
    """One output: which rows of ``records`` go to ``path`` and the columns appended to each.

    Attributes:
        flag: the option naming ``path`` (``--output``, ``--rejects``).
        path: where to write.
        rows: input row numbers (0-based), ascending.
        extra: ``(name, arrow array)`` columns appended, one value per selected row.
    """

    flag: str | None
    path: str
    rows: Any
    extra: list[tuple[str, Any]] = dataclasses.field(default_factory=list)
    records: Any = None  # the Records these rows are of, when not those passed to write_selections


def _named_flag(flag: str | None) -> str:
    return f"`{flag}` " if flag else "the output "


class _Refused(Exception):
    """A value that the output kind cannot carry exactly: ``(column, row, why)``."""


def free_name(columns: Sequence[str], name: str) -> str:
    """``name``, or ``ches_filter_<name>`` (then underscores) when the input already has such a column."""
    taken = set(columns)
    candidate = name
    while candidate in taken:
        candidate = f"ches_filter_{candidate}" if not candidate.startswith("ches_filter_") else candidate + "_"
    return candidate


def write_selections(records: Records, outputs: Sequence[Selection], *, overwrite: bool = False) -> None:
    """Writes every output, or none of them (see :func:`ches_filter.atomic.atomic_paths`).

    Raises:
        BadFlagError: a path clash or an unsupported extension.
        BadDataError: an output would hold no row, the input changed since it
            was read, or a value cannot cross to the output's kind unchanged
            (one line: column, first row, the same-kind output that works).
        ChesFilterError: the file system refused the write.
    """

    check_paths([(o.flag, o.path) for o in outputs], overwrite=overwrite)
    kinds = [output_kind(o.path, o.flag or "--output") for o in outputs]
    for out in outputs:
        if len(out.rows) == 0:
            what = "no row is kept" if out.flag != "--rejects" else "no row was dropped"
            fix = ("keep more (a larger `--keep`, `--keep-count` or `--max-score`, or `--keep-unscored`)"
                   if out.flag != "--rejects" else "leave out `--rejects`")
            raise BadDataError(
                f"{what}, so {_named_flag(out.flag)}{out.path} would hold no rows, which no reader takes as a "
                f"dataset; nothing was written: {fix}."
            )
    sources = {id(o.records or records): (o.records or records) for o in outputs}
    for path, before in ((p, b) for r in sources.values() for p, b in zip(r.files, r.stats)):
        try:
            changed = _stat(path) != before
        except OSError:
            changed = True
        if changed:
            raise BadDataError(f"{path} changed while ches-filter ran; nothing was written; rerun on the final file.")
    try:
        with atomic_paths([o.path for o in outputs]) as tmps:
            for out, kind, tmp in zip(outputs, kinds, tmps):
                with writing(out.path):
                    source = out.records or records
                    try:
                        _write_one(source, out, kind, tmp)
                    except _Refused as refused:
                        column, row, why = refused.args
                        raise BadDataError(
                            f"column `{column}`, row {row + 1} of {source.label}: {why}, so {_named_flag(out.flag)}"
                            f"{out.path} would not hold it unchanged; nothing was written; "
                            + ("convert " if source.kind == "json" else "write ")
                            + f"{SAME_KIND_OUTPUT[source.kind]} (the input's own kind) to keep the records as they are."
                        ) from None
    except OSError as exc:
        raise ChesFilterError(f"could not write {' or '.join(o.path for o in outputs)} ({reason(exc)}).") from None
    for out, kind in zip(outputs, kinds):
        logger.info("wrote %d rows to %s (%s)", len(out.rows), out.path, kind)


def _write_one(records: Records, out: Selection, kind: str, tmp: str) -> None:
    import numpy as np

    rows = np.asarray(out.rows, dtype=np.int64)
    same = kind in _SAME_KIND[records.kind]
    if records.kind == "jsonl" and kind == "jsonl":
        _select_json_lines(records, rows, out.extra, tmp)
    elif records.kind == "csv" and kind == "csv":
        _select_csv(records, rows, out.extra, tmp)
    elif records.kind == "parquet" and kind == "parquet":
        _select_parquet(records, rows, out.extra, tmp)
    elif records.kind == "dataset" and same:
        _select_dataset(records, rows, out.extra, kind, tmp)
    elif kind == "jsonl":
        _convert_jsonl(records, rows, out.extra, tmp)
    elif kind == "csv":
        _convert_csv(records, rows, out.extra, tmp)
    else:
        _convert_arrow(records, rows, out.extra, kind, tmp)


def _mask(records: Records, rows: Any) -> Any:
    import numpy as np

    mask = np.zeros(records.num_rows, dtype=bool)
    mask[rows] = True
    return mask


def _extra_lists(extra: list[tuple[str, Any]]) -> list[tuple[str, list]]:
    return [(name, values.to_pylist() if hasattr(values, "to_pylist") else list(values)) for name, values in extra]


class _Writer:
    """Writes records, adding a line break to a record that lacked one only when another follows."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.open_line = False

    def write(self, raw: bytes) -> None:
        if self.open_line:
            self.handle.write(b"\n")
        self.handle.write(raw)
        self.open_line = not raw.endswith(b"\n")


def _split_terminator(raw: bytes) -> tuple[bytes, bytes]:
    body = raw.rstrip(b"\r\n")
    return body, raw[len(body):]


def _json_value(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, allow_nan=False)
    except ValueError:
        return "null"  # a score that is not a number (NaN) has no JSON form; scores are null there


def _select_json_lines(records: Records, rows: Any, extra: list, tmp: str) -> None:
    mask = _mask(records, rows)
    extras = _extra_lists(extra)
    names = [json.dumps(name, ensure_ascii=False) for name, _ in extras]
    index = position = 0
    with open(tmp, "wb") as handle:
        writer = _Writer(handle)
        for _path, _line_no, raw, _text in _iter_json_lines(records.files):
            if mask[index]:
                if extras:
                    body, end = _split_terminator(raw)
                    stripped = body.rstrip()
                    inner = stripped[:-1].rstrip()
                    sep = b"" if inner.endswith(b"{") else b", "
                    added = ", ".join(f"{n}: {_json_value(v[position])}" for n, (_, v) in zip(names, extras))
                    raw = inner + sep + added.encode("utf-8") + b"}" + body[len(stripped):] + end
                writer.write(raw)
                position += 1
            index += 1


def _csv_cells(values: list[Any]) -> bytes:
    buffer = _io.StringIO()
    csv.writer(buffer, lineterminator="").writerow(["" if v is None else (repr(v) if isinstance(v, float) else str(v)) for v in values])
    return buffer.getvalue().encode("utf-8")


def _select_csv(records: Records, rows: Any, extra: list, tmp: str) -> None:
    mask = _mask(records, rows)
    extras = _extra_lists(extra)
    index = position = 0
    with open(tmp, "wb") as handle:
        writer = _Writer(handle)
        header_done = False
        width = 0
        for _path, line, cells, raw, _header in _iter_csv(records.files):
            if line == 0:
                width = len(cells)
                if not header_done:
                    if extras:
                        body, end = _split_terminator(raw)
                        raw = body + b"," + _csv_cells([name for name, _ in extras]) + (end or b"\n")
                    writer.write(raw)
                    header_done = True
                continue
            if mask[index]:
                if extras:
                    # A short record gets its missing (empty) cells first, so the new cells land under their names.
                    body, end = _split_terminator(raw)
                    pad = b"," * (width - len(cells))
                    raw = body + pad + b"," + _csv_cells([v[position] for _, v in extras]) + end
                writer.write(raw)
                position += 1
            index += 1


def _select_parquet(records: Records, rows: Any, extra: list, tmp: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    mask = _mask(records, rows)
    schema = pq.read_schema(records.files[0])
    out_schema = schema
    for name, values in extra:
        out_schema = out_schema.append(pa.field(name, values.type))
    start = position = 0
    with pq.ParquetWriter(tmp, out_schema) as writer:
        for path in records.files:
            file_schema = pq.read_schema(path)
            if not file_schema.remove_metadata().equals(schema.remove_metadata()):
                raise BadDataError(
                    f"{records.label}: {path} and {records.files[0]} differ in their columns or types, so their "
                    "rows do not fit one Parquet file; prune each file on its own."
                )
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=65536):
                    part = mask[start:start + batch.num_rows]
                    start += batch.num_rows
                    if not part.any():
                        continue
                    kept = batch.filter(pa.array(part))
                    arrays = list(kept.columns) + [values[position:position + kept.num_rows] for _, values in extra]
                    position += kept.num_rows
                    writer.write_batch(pa.RecordBatch.from_arrays(arrays, schema=out_schema))


def _select_dataset(records: Records, rows: Any, extra: list, kind: str, tmp: str) -> None:
    ds = records.dataset.select(rows)
    for name, values in extra:
        ds = ds.add_column(name, values.to_pylist(), feature=None)
    if kind == "disk":
        ds.save_to_disk(tmp)
    else:
        ds.to_parquet(tmp)


# ---- across kinds -----------------------------------------------------------


def _kept_records(records: Records, rows: Any) -> Iterator[tuple[int, dict]]:
    """``(row, record)`` of the selected rows as Python values, read in full (across kinds only)."""
    import pyarrow as pa

    mask = _mask(records, rows)
    index = 0
    if records.kind == "jsonl":
        for path, line_no, _raw, text in _iter_json_lines(records.files):
            if mask[index]:
                yield index, _parse_line(path, line_no, text, None)
            index += 1
    elif records.kind == "json":
        for item in _load_json_array(records.files[0]):
            if mask[index]:
                yield index, item
            index += 1
    elif records.kind == "csv":
        header: list[str] = []
        for _path, line, cells, _raw, _h in _iter_csv(records.files):
            if line == 0:
                header = cells
                dup = next((c for i, c in enumerate(cells) if c in cells[:i]), None)
                if dup is not None:
                    raise _Refused(dup, 0, "the header names it twice")
                continue
            if mask[index]:
                if len(cells) != len(header):
                    raise _Refused(header[len(cells)], index, "the record has no cell for it")
                yield index, dict(zip(header, cells))
            index += 1
    elif records.kind == "parquet":
        import pyarrow.parquet as pq

        for path in records.files:
            with pq.ParquetFile(path) as pf:
                for batch in pf.iter_batches(batch_size=8192):
                    part = mask[index:index + batch.num_rows]
                    if part.any():
                        picked = [index + i for i in part.nonzero()[0].tolist()]
                        for row, record in zip(picked, batch.filter(pa.array(part)).to_pylist()):
                            yield row, record
                    index += batch.num_rows
    else:
        ds = records.dataset.select(rows).with_format("arrow")
        for start in range(0, len(ds), 8192):
            for offset, record in enumerate(ds[start:start + 8192].to_pylist()):
                yield int(rows[start + offset]), record


def _json_refusal(value: Any) -> str | None:
    """Why a JSON text cannot carry ``value`` exactly (read back type-strict), or None."""
    if value is None or isinstance(value, (bool, str)):
        return None
    if isinstance(value, int):
        if not _INT64_MIN <= value <= _INT64_MAX:
            return f"it holds the integer {value}, beyond the 64-bit range that JSON readers keep exact"
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else f"it holds {value}, which JSON has no number for"
    if isinstance(value, list):
        for item in value:
            why = _json_refusal(item)
            if why:
                return why
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return f"it holds a map with a {type(key).__name__} key"
            why = _json_refusal(item)
            if why:
                return why
        return None
    return f"it holds a {type(value).__name__} value, which JSON has no type for"


def _convert_jsonl(records: Records, rows: Any, extra: list, tmp: str) -> None:
    extras = _extra_lists(extra)
    with open(tmp, "w", encoding="utf-8", newline="\n") as handle:
        for position, (row, record) in enumerate(_kept_records(records, rows)):
            for name, value in record.items():
                why = _json_refusal(value)
                if why:
                    raise _Refused(name, row, why)
            for name, values in extras:
                record[name] = values[position]
            try:
                text = json.dumps(record, ensure_ascii=False, allow_nan=False)
            except RecursionError:
                raise _Refused(next(iter(record)), row, "it nests deeper than the JSON writer goes") from None
            handle.write(text)
            handle.write("\n")


def _convert_csv(records: Records, rows: Any, extra: list, tmp: str) -> None:
    extras = _extra_lists(extra)
    header: list[str] | None = None
    with open(tmp, "w", encoding="utf-8", newline="") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        for position, (row, record) in enumerate(_kept_records(records, rows)):
            if header is None:
                header = list(record)
                writer.writerow(header + [name for name, _ in extras])
            if list(record) != header:
                missing = [c for c in header if c not in record] or [c for c in record if c not in header]
                raise _Refused(missing[0] if missing else header[0], row,
                               "the rows do not all have the same columns in the same order, as a CSV header needs")
            for name, value in record.items():
                if not isinstance(value, str):
                    raise _Refused(name, row, f"it holds {_kind_of(value)}, and CSV cells are text")
                if value != value.replace("\r\n", "\n") or "\r" in value:
                    raise _Refused(name, row, "it holds a carriage return, which CSV readers turn into a line break")
            writer.writerow(list(record.values()) + [values[position] for _, values in extras])


def _same(a: Any, b: Any) -> bool:
    """Type-strict equality: ``1`` is not ``1.0``, ``-0.0`` not ``0.0``, keys in order."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return (math.isnan(a) and math.isnan(b)) or (a == b and math.copysign(1, a) == math.copysign(1, b))
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def _arrow_table(records: Records, rows: Any, extra: list) -> Any:
    """The selected rows as one Arrow table, each value checked to come back identical."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if records.kind == "parquet":
        tables = [pq.read_table(path, memory_map=True) for path in records.files]
        table = pa.concat_tables(tables) if len(tables) > 1 else tables[0]
        table = table.take(pa.array(rows, pa.int64()))
        for name, values in extra:
            table = table.append_column(name, values)
        return table
    kept = list(_kept_records(records, rows))
    if records.kind == "csv":
        names = list(kept[0][1]) if kept else []
        arrays = [pa.array([r[name] for _, r in kept], pa.string()) for name in names]
    else:
        names = list(dict.fromkeys(name for _, record in kept for name in record))
        arrays = []
        for name in names:
            for row, record in kept:
                if name not in record:
                    raise _Refused(name, row, "the row has no such key, and a table would give it null")
            values = [record[name] for _, record in kept]
            try:
                array = pa.array(values)
            except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError, RecursionError):
                first = _kind_of(values[0])
                row = next((r for (r, _), v in zip(kept, values) if _kind_of(v) != first), kept[0][0])
                raise _Refused(name, row, "its values differ in kind from row to row, which a typed column cannot hold") from None
            for (row, _), value, got in zip(kept, values, array.to_pylist()):
                if not _same(value, got):
                    raise _Refused(name, row, f"it would come back as {_short(got)} instead of {_short(value)}")
            arrays.append(array)
    names = names + [name for name, _ in extra]
    arrays = arrays + [values for _, values in extra]
    return pa.Table.from_arrays(arrays, names=names)


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def to_dataset(records: Records, selection: Selection) -> Any:
    """The selected rows (and appended columns) as an Arrow table; raises BadDataError where a value would change."""
    try:
        return _arrow_table(records, selection.rows, selection.extra)
    except _Refused as refused:
        column, row, why = refused.args
        raise BadDataError(
            f"column `{column}`, row {row + 1} of {records.label}: {why}, so it cannot become a typed dataset "
            f"unchanged; write {SAME_KIND_OUTPUT[records.kind]} instead."
        ) from None


def _convert_arrow(records: Records, rows: Any, extra: list, kind: str, tmp: str) -> None:
    import pyarrow.parquet as pq

    table = _arrow_table(records, rows, extra)
    if kind == "parquet":
        pq.write_table(table, tmp)
    else:
        import datasets

        try:
            ds = datasets.Dataset(table)
        except Exception as exc:  # noqa: BLE001 - an Arrow type datasets has no feature for
            raise _Refused(table.column_names[0], 0, f"datasets cannot hold the table ({reason(exc)})") from None
        ds.save_to_disk(tmp)


def read_bytes(path: str, size: int) -> bytes:
    """Up to ``size`` bytes (-1: all) of a possibly gzip-compressed file, as a BadDataError on failure."""
    try:
        with open_binary(path) as fh:
            return fh.read(size)
    except FileNotFoundError as exc:
        raise BadDataError(f"{path}: no such file or directory.") from exc
    except (EOFError, gzip.BadGzipFile, zlib.error) as exc:
        raise BadDataError(
            f"{path} is truncated or not a valid gzip file ({reason(exc)}); "
            "re-download or re-compress it."
        ) from exc
    except OSError as exc:
        raise BadDataError(f"cannot read {path} ({reason(exc)}); check the file.") from exc


def write_dataset(ds: "datasets.Dataset", path: str, *, overwrite: bool = False) -> None:
    """Writes a dataset atomically as parquet, JSON lines, CSV or a saved directory.

    Args:
        ds: The dataset to write (at least one row).
        path: ``*.parquet``, ``*.jsonl``, ``*.csv``, or a path without
            extension (or an existing directory) for ``save_to_disk``.
        overwrite: Whether an existing ``path`` may be replaced.

    Raises:
        BadFlagError: Unknown extension, ``path`` exists without
            ``overwrite``, or its parent directory is missing.
        BadDataError: No row, or a value would not read back identical from
            JSON lines or CSV (one line: column and row; nothing written).
        ChesFilterError: The file system refused the write.
    """
    write_datasets([(None, ds, path)], overwrite=overwrite)


def write_datasets(items: Iterable[tuple[str | None, "datasets.Dataset", str]], *, overwrite: bool = False) -> None:
    """Writes several datasets so that either all of them appear or none does.

    Every dataset is written to its hidden temporary sibling first; only when
    all were written are they renamed into place. A value that JSON lines or
    CSV cannot hold exactly, a full disk or a permission error therefore leaves every
    target as it was.

    Args:
        items: ``(flag, dataset, path)`` triples; ``flag`` (e.g. ``--rejects``)
            names the path in messages and may be None.
        overwrite: Whether existing paths may be replaced.

    Raises:
        The errors of :func:`write_dataset`.
    """
    import datasets


    for _flag_name, ds, path in items:
        if not isinstance(ds, datasets.Dataset):
            raise TypeError(f"write_datasets writes a datasets.Dataset, not a {type(ds).__name__} ({path})")
    # A dataset in memory is written as itself: to parquet or a directory unchanged, to JSON lines
    # or CSV only where every value reads back identical (otherwise one line, nothing written).
    outputs = [Selection(flag, os.fspath(path), range(len(ds)), records=from_dataset(os.fspath(path), ds))
               for flag, ds, path in items]
    write_selections(outputs[0].records, outputs, overwrite=overwrite)
