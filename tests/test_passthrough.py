"""Rows pass through untouched (issue 15): a hostile corpus of JSONL, CSV and Parquet records.

For each input kind, `prune` to the same kind writes the records themselves:
kept ∪ rejects is the input, record for record (byte-identical JSON lines and
CSV records, equal Arrow types and values for Parquet). Across kinds a value
goes through only if it reads back identical, type-strict; otherwise one line
names the column and row, and nothing is written. Fast tier: the scores are
made up (rank = row order) but the input fingerprint is the real one.
"""

from __future__ import annotations

import csv
import datetime
import decimal
import io as _io
import json
import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ches_filter import records, sources
from ches_filter.config import ScoreConfig
from ches_filter.formats import normalize_row
from ches_filter.inputs import load_records


from conftest import PAIRS, invoke, make_scores, snapshot, write_jsonl

NA_LIKE = ["NA", "N/A", "#N/A", "None", "null", "NaN", "nan", "-nan", "NULL", "n/a", "TRUE", "False", "007", "3e5",
           "1.0", "-0", "0x1F", "  7  "]
FLOATS = ["1.7976931348623157e308", "5e-324", "2.225073858507201e-308", "-0.0", "0.30000000000000004", "1E5",
          "1.0", "0.1", "-1.5e-7", "100000000000000000000.0", "123456789.12345678"]
INTS = [str(2**63 - 1), str(-(2**63)), str(2**63), str(2**53 + 1), str(10**30), str(-(10**30)), "0", "-0", "007"[2:]]


def _jsonl_lines() -> list[bytes]:
    """Hostile JSON lines, written by hand so their bytes (spacing, escapes, number spelling) are the test."""
    lines = []
    text_values = [json.dumps(v) for v in NA_LIKE] + ['"caf\\u00e9"', '"café"', '"e\\u0301"', '"😀"',
                                                      '"\\ud83d\\ude00"', '"tab\\there"', '"line\\nbreak"']
    shapes = ['[1, 2.5]', '{"a": 1}', '1', '0.5', '"text"', 'null', '[]', '{}', '[{"x": [1, {"y": null}]}]', 'true']
    for i in range(40):
        response = text_values[i % len(text_values)]
        number = FLOATS[i % len(FLOATS)] if i % 2 else INTS[i % len(INTS)]
        meta = shapes[i % len(shapes)]
        fields = [f'"prompt": "question {i}?"', f'"chosen": {response}', f'"rejected": "no {i}"',
                  f'"meta": {meta}', f'"num":{number}', f'"status": "{["draft", "done"][i % 2]}"',
                  f'"ches": {i}', f'"row_index": "r{i}"']
        if i % 3 == 0:
            fields.append('"sometimes": null')
        if i % 5 == 0:
            fields = fields[3:] + fields[:3]  # key order differs from row to row
        end = b"\r\n" if i % 4 == 1 else b"\n"
        sep = ", " if i % 2 else ","
        lines.append(("{" + sep.join(fields) + "}").encode("utf-8") + end)
    lines[0] = b"\xef\xbb\xbf" + lines[0]  # a BOM
    lines[-1] = lines[-1].rstrip(b"\r\n")  # no final line break
    return lines


def _prune(path, tmp_path, out, rej, *extra):
    scores = make_scores(path, tmp_path / "s.parquet")
    return invoke("prune", path, "--keep", "0.5", "--scores", scores, "-o", out, "--rejects", rej, *extra)


def _records_appended(line: bytes, original: bytes) -> bool:
    """``line`` is ``original`` with keys appended at the end of its object, every original byte kept."""
    body = original.rstrip(b"\r\n").rstrip()
    return line.startswith(body[:-1]) and line.rstrip(b"\r\n").endswith(b"}") and json.loads(line)


def test_jsonl_same_kind_keeps_every_line_byte_for_byte(tmp_path):
    lines = _jsonl_lines()
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))
    result = _prune(path, tmp_path, tmp_path / "kept.jsonl", tmp_path / "rej.jsonl")
    assert result.exit_code == 0, result.output
    kept = (tmp_path / "kept.jsonl").read_bytes().splitlines(keepends=True)
    rejects = (tmp_path / "rej.jsonl").read_bytes().splitlines(keepends=True)
    assert len(kept) + len(rejects) == len(lines) and kept and rejects
    # made-up scores rank rows in order: the first half is kept, byte for byte
    assert kept == lines[: len(kept)]
    for got, original in zip(rejects, lines[len(kept):]):
        assert _records_appended(got, original), (got, original)
        appended = json.loads(got.decode("utf-8-sig"))
        assert list(appended)[-4:] == ["ches_filter_reason", "ches_filter_ches", "ln_ches", "ches_filter_status"]
        assert appended["ches_filter_reason"] == "high_score"
        assert got.endswith(original[len(original.rstrip(b"\r\n")):])  # the line's own line break


def test_jsonl_add_scores_appends_and_never_rounds(tmp_path):
    """A metadata column mixing kinds used to send rows through pandas and round 8.123456789012345."""
    lines = [(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r", "rating": [1, "high"][i % 2]})[:-1]
              + ', "score_chosen": 8.123456789012345}\n').encode() for i in range(6)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))
    scores = make_scores(path, tmp_path / "s.parquet")
    result = invoke("prune", path, "--keep", "1", "--scores", scores, "-o", tmp_path / "out.jsonl", "--add-scores")
    assert result.exit_code == 0, result.output
    out = (tmp_path / "out.jsonl").read_bytes().splitlines(keepends=True)
    table = pq.read_table(scores).to_pylist()
    for got, original, score in zip(out, lines, table):
        assert got.startswith(original.rstrip()[:-1]) and b"8.123456789012345" in got
        row = json.loads(got)
        assert row["ches"] == score["ches"] and row["ln_ches"] == score["ln_ches"] and row["status"] == "ok"


def test_jsonl_responses_are_scored_as_written(tmp_path):
    """NA-like, number-like and unicode responses are text: every such pair is valid (`ok`)."""
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_jsonl_lines()))
    records, layout, columns = load_records(str(path), ScoreConfig())
    rows = records.scored.to_list()
    written = [json.loads(line.decode("utf-8-sig")) for line in _jsonl_lines()]
    assert [r["chosen"] for r in rows] == [w["chosen"] for w in written]
    assert all(normalize_row(row, layout, columns).status == "ok" for row in rows)
    assert records.scored.column_names == ["prompt", "chosen", "rejected"]  # nothing else is parsed into types


def test_jsonl_messages_are_read_in_the_shape_they_were_written(tmp_path):
    """Conversational pair columns whose messages differ in shape across rows (content as text in one
    message and a list of parts in another, a key one message has and another lacks, a value nested
    under a part) are read back exactly as the JSON says, never unified into one Arrow type."""
    rows = [
        {"prompt": [{"role": "user", "content": "Name a fruit."}],
         "chosen": [{"role": "assistant", "content": "Apple."}], "rejected": [{"role": "assistant", "content": "Chair."}]},
        {"prompt": [{"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                    {"role": "user", "name": "bob", "content": [{"type": "text", "text": "A colour?", "meta": {"n": 1}}]}],
         "chosen": [{"role": "assistant", "content": "Blue."}], "rejected": [{"role": "assistant", "content": "Loud."}]},
        {"prompt": [{"role": "user", "content": "2+2?"}],
         "chosen": [{"role": "assistant", "content": [{"type": "text", "text": "4"}]}],
         "rejected": [{"role": "assistant", "content": "5", "weight": 0.5}]},
    ]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    records, layout, columns = load_records(str(path), ScoreConfig())
    ds = records.scored
    wanted = [{k: row[k] for k in ("prompt", "chosen", "rejected")} for row in rows]
    assert [ds[i] for i in range(len(ds))] == wanted  # one row at a time
    batch = ds.select_columns(["prompt"])[0:3]
    assert batch["prompt"] == [row["prompt"] for row in rows]  # a slice of a column view
    assert all(normalize_row(ds[i], layout, columns).status == "ok" for i in range(len(ds)))


def test_jsonl_across_kinds_is_refused_in_one_line_with_nothing_written(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(_jsonl_lines()))
    make_scores(path, tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    for out in ("out.parquet", "out.csv", "out_dir"):
        result = invoke("prune", path, "--keep", "0.5", "--scores", tmp_path / "s.parquet", "-o", tmp_path / out)
        assert result.exit_code == 1, (out, result.output)
        (line,) = [x for x in result.output.splitlines() if x.startswith("Error:")]
        assert "column `" in line and ", row " in line and "`.jsonl` output" in line, line
        assert "Traceback" not in result.output
        assert snapshot(tmp_path) == before


def test_jsonl_across_kinds_passes_values_that_come_back_identical(tmp_path):
    rows = [{"prompt": f"p{i}", "chosen": "NA", "rejected": "None", "f": [-0.0, 5e-324, 1.7976931348623157e308][i % 3],
             "n": [2**63 - 1, 2**53 + 1, -(2**63)][i % 3], "s": "007", "o": {"k": [1, 2]}} for i in range(6)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = make_scores(path, tmp_path / "s.parquet")
    result = invoke("prune", path, "--keep", "1", "--scores", scores, "-o", tmp_path / "out.parquet")
    assert result.exit_code == 0, result.output
    back = pq.read_table(tmp_path / "out.parquet").to_pylist()
    assert [json.dumps(r) for r in back] == [json.dumps(r) for r in rows]  # -0.0, 5e-324 and ints stay what they were
    assert math.copysign(1, back[0]["f"]) == -1


def test_jsonl_mixed_int_and_fraction_is_refused_for_parquet(tmp_path):
    """`1` and `0.5` in one column: a typed column would bring back 1.0."""
    rows = [{"prompt": "p", "chosen": "c", "rejected": "r", "x": v} for v in (1, 0.5)]
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    scores = make_scores(path, tmp_path / "s.parquet")
    result = invoke("prune", path, "--keep", "1", "--scores", scores, "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1 and "column `x`, row 1" in result.output and "1.0" in result.output, result.output
    assert not (tmp_path / "out.parquet").exists()


def test_deep_json_value_is_one_line_not_a_traceback(tmp_path):
    deep = "[" * 1000 + "]" * 1000
    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "p", "chosen": "c", "rejected": "r", "d": ' + deep + "}\n")
    result = invoke("score", path, "-o", tmp_path / "s.parquet", "--model", "unused")
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "line 1 nests JSON values deeper" in result.output, result.output


def test_json_array_floats_are_not_rounded(tmp_path):
    """A `.json` array went through the type-inferring loader: 1.79e308 became inf, 5e-324 0.0, -0.0 0.0."""
    path = tmp_path / "in.json"
    path.write_text('[{"prompt": "p0", "chosen": "c", "rejected": "r", "f": 1.7976931348623157e308},\n'
                    ' {"prompt": "p1", "chosen": "c", "rejected": "r", "f": 5e-324},\n'
                    ' {"prompt": "p2", "chosen": "c", "rejected": "r", "f": -0.0}]')
    scores = make_scores(path, tmp_path / "s.parquet")
    for out in ("out.parquet", "out.jsonl"):
        result = invoke("prune", path, "--keep", "1", "--scores", scores, "-o", tmp_path / out)
        assert result.exit_code == 0, result.output
    got = pq.read_table(tmp_path / "out.parquet").column("f").to_pylist()
    assert got[:2] == [1.7976931348623157e308, 5e-324] and math.copysign(1, got[2]) == -1
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["f"] for r in lines][:2] == [1.7976931348623157e308, 5e-324] and math.copysign(1, lines[2]["f"]) == -1


@pytest.mark.parametrize("flags", [("--keep-count", "0"), ("--max-score", "-1000")])
def test_zero_kept_rows_is_refused_and_nothing_written(tmp_path, flags):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"p{i}", "chosen": "c", "rejected": "r"}) + "\n" for i in range(10)))
    scores = make_scores(path, tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    for out in ("out.jsonl", "out.parquet"):
        result = invoke("prune", path, *flags, "--scores", scores, "-o", tmp_path / out, "--rejects", tmp_path / "rej.jsonl")
        assert result.exit_code == 1 and "no row is kept" in result.output and "nothing was written" in result.output
        assert snapshot(tmp_path) == before


# ---------------------------------------------------------------------------- CSV


def _csv_bytes() -> bytes:
    rows = [b"\xef\xbb\xbfprompt,chosen,rejected,status,ches,row_index,num,empty\r\n"]
    for i, value in enumerate(NA_LIKE + ["a, with comma", 'say "hi"', "two\nlines", "😀 e\u0301"]):
        quoted = '"' + value.replace('"', '""') + '"' if any(c in value for c in ',"\n') else value
        num = [*FLOATS, *INTS][i % (len(FLOATS) + len(INTS))]
        rows.append(f"q{i},{quoted},no,{['NA', ''][i % 2]},{num},{i:03d},{num},".encode() + (b"\r\n" if i % 3 else b"\n"))
    return b"".join(rows)


def _csv_records(data: bytes) -> list[list[str]]:
    return list(csv.reader(_io.StringIO(data.decode("utf-8-sig"), newline="")))


def test_csv_same_kind_keeps_records_verbatim_under_the_header(tmp_path):
    data = _csv_bytes()
    path = tmp_path / "in.csv"
    path.write_bytes(data)
    result = _prune(path, tmp_path, tmp_path / "kept.csv", tmp_path / "rej.csv")
    assert result.exit_code == 0, result.output
    kept, rejects = (tmp_path / "kept.csv").read_bytes(), (tmp_path / "rej.csv").read_bytes()
    header_end = data.index(b"\r\n") + 2
    assert kept.startswith(data[:header_end]) and data.startswith(kept)  # header and the first records, verbatim
    original = _csv_records(data)
    back = _csv_records(kept)[1:] + [r[: len(original[0])] for r in _csv_records(rejects)[1:]]
    assert back == original[1:]
    assert _csv_records(rejects)[0] == original[0] + ["ches_filter_reason", "ches_filter_ches", "ln_ches", "ches_filter_status"]


def test_csv_cells_are_text_exactly(tmp_path):
    """`None`, `NA`, `007`, `3e5`, an empty cell: text, as written; every pair valid."""
    path = tmp_path / "in.csv"
    path.write_bytes(_csv_bytes())
    records, layout, columns = load_records(str(path), ScoreConfig())
    rows = records.scored.to_list()
    assert [r["chosen"] for r in rows] == [r[1] for r in _csv_records(_csv_bytes())[1:]]
    assert all(normalize_row(row, layout, columns).status == "ok" for row in rows)


def test_csv_to_jsonl_and_parquet_carry_text_identically(tmp_path):
    data = _csv_bytes()
    path = tmp_path / "in.csv"
    path.write_bytes(data)
    scores = make_scores(path, tmp_path / "s.parquet")
    header, *records = _csv_records(data)
    for out in ("out.jsonl", "out.parquet"):
        result = invoke("prune", path, "--keep", "1", "--scores", scores, "-o", tmp_path / out)
        assert result.exit_code == 0, result.output
    lines = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text("utf-8").splitlines()]
    assert lines == [dict(zip(header, r)) for r in records]
    table = pq.read_table(tmp_path / "out.parquet")
    assert table.to_pylist() == lines and all(pa.types.is_string(t) for t in table.schema.types)


# ------------------------------------------------------------------------ Parquet


def _parquet_table() -> pa.Table:
    n = 12
    table = pa.table({
        "prompt": pa.array([f"q{i}" for i in range(n)], pa.large_string()),
        "chosen": pa.array([NA_LIKE[i % len(NA_LIKE)] for i in range(n)]).dictionary_encode(),
        "rejected": [f"no {i}" for i in range(n)],
        "st": pa.array([{"a": i, "b": [str(i)]} for i in range(n)]),
        "lst": pa.array([[i, None] if i % 2 else None for i in range(n)], pa.list_(pa.int64())),
        "ts": pa.array([datetime.datetime(2024, 1, 1, i, tzinfo=datetime.timezone.utc) for i in range(n)],
                       pa.timestamp("us", tz="Europe/Paris")),
        "dec": pa.array([decimal.Decimal(f"{i}.10") for i in range(n)], pa.decimal128(10, 2)),
        "u64": pa.array([2**64 - 1 - i for i in range(n)], pa.uint64()),
        "i8": pa.array([(-128 + i) for i in range(n)], pa.int8()),
        "f32": pa.array([0.1 * i if i % 3 else -0.0 for i in range(n)], pa.float32()),
        "status": ["x"] * n, "row_index": [f"r{i}" for i in range(n)],
    })
    return table.replace_schema_metadata({b"owner": b"me", b"note": "ü".encode()})


def test_parquet_same_kind_keeps_types_values_and_metadata(tmp_path):
    table = _parquet_table()
    path = tmp_path / "in.parquet"
    pq.write_table(table, path)
    result = _prune(path, tmp_path, tmp_path / "kept.parquet", tmp_path / "rej.parquet")
    assert result.exit_code == 0, result.output
    kept = pq.read_table(tmp_path / "kept.parquet")
    rejects = pq.read_table(tmp_path / "rej.parquet")
    assert kept.schema.equals(pq.read_schema(path), check_metadata=True)
    assert pa.types.is_dictionary(kept.schema.field("chosen").type)
    assert rejects.column_names[: table.num_columns] == table.column_names
    assert rejects.column_names[table.num_columns:] == ["ches_filter_reason", "ches", "ln_ches", "ches_filter_status"]
    both = pa.concat_tables([kept, rejects.select(table.column_names)])
    assert both.equals(pq.read_table(path)) and kept.num_rows and rejects.num_rows


def test_parquet_to_jsonl_refuses_what_json_cannot_carry(tmp_path):
    path = tmp_path / "in.parquet"
    pq.write_table(_parquet_table(), path)
    make_scores(path, tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    for out in ("out.jsonl", "out.csv"):
        result = invoke("prune", path, "--keep", "1", "--scores", tmp_path / "s.parquet", "-o", tmp_path / out)
        assert result.exit_code == 1 and "column `" in result.output and "`.parquet` output" in result.output
        assert snapshot(tmp_path) == before


def test_parquet_add_scores_appends_columns(tmp_path):
    path = tmp_path / "in.parquet"
    table = _parquet_table()
    pq.write_table(table, path)
    scores = make_scores(path, tmp_path / "s.parquet")
    result = invoke("prune", path, "--keep", "1", "--scores", scores, "-o", tmp_path / "out.parquet", "--add-scores")
    assert result.exit_code == 0, result.output
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.select(table.column_names).equals(pq.read_table(path))
    assert out.column_names[table.num_columns:] == ["ches", "ln_ches", "ches_filter_status"]
    assert out.column("ches").to_pylist() == pq.read_table(scores).column("ches").to_pylist()


# ---------------------------------------------------------------- scored as written


@pytest.mark.parametrize("kind", ["jsonl", "csv"])
def test_every_valid_pair_is_scored_ok_whatever_its_responses_say(tmp_path, tiny_model_dir, kind):
    """`score` reads NA-like, number-like and unicode responses as text beside metadata of any shape: all `ok`."""
    path = tmp_path / f"in.{kind}"
    path.write_bytes(b"".join(_jsonl_lines()) if kind == "jsonl" else _csv_bytes())
    result = invoke("score", path, "-o", tmp_path / "s.parquet", "--model", tiny_model_dir, "-q")
    assert result.exit_code == 0, result.output
    status = pq.read_table(tmp_path / "s.parquet").column("status").to_pylist()
    assert status and set(status) == {"ok"}, status


def test_csv_short_record_gets_appended_cells_under_their_names(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(b"prompt,chosen,rejected,note\nq0,a,b,x\nq1,a,b\n")
    scores = make_scores(path, tmp_path / "s.parquet")
    result = invoke("prune", path, "--keep", "1", "--scores", scores, "-o", tmp_path / "out.csv", "--add-scores")
    assert result.exit_code == 0, result.output
    header, *rows = _csv_records((tmp_path / "out.csv").read_bytes())
    assert header == ["prompt", "chosen", "rejected", "note", "ches", "ln_ches", "status"]
    assert [r[:4] for r in rows] == [["q0", "a", "b", "x"], ["q1", "a", "b", ""]] and [r[6] for r in rows] == ["ok", "ok"]
    assert (tmp_path / "out.csv").read_bytes().splitlines()[2].startswith(b"q1,a,b,,")


def test_input_changed_after_reading_is_refused_with_nothing_written(tmp_path):
    from ches_filter.errors import BadDataError
    from ches_filter.records import Selection, write_selections

    path = tmp_path / "in.jsonl"
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    records, _, _ = load_records(str(path), ScoreConfig())
    path.write_text('{"prompt": "p", "chosen": "a", "rejected": "b", "x": 1}\n')
    with pytest.raises(BadDataError, match="changed while ches-filter ran"):
        write_selections(records, [Selection("--output", str(tmp_path / "out.jsonl"), [0])])
    assert not (tmp_path / "out.jsonl").exists()


def test_saved_dataset_same_kind_is_a_select(tmp_path):
    import datasets

    rows = [{"prompt": f"q{i}", "chosen": NA_LIKE[i], "rejected": "no", "n": i, "f": [0.5, -0.0][i % 2]} for i in range(8)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    result = _prune(tmp_path / "saved", tmp_path, tmp_path / "kept", tmp_path / "rej")
    assert result.exit_code == 0, result.output
    kept, rejects = datasets.load_from_disk(str(tmp_path / "kept")), datasets.load_from_disk(str(tmp_path / "rej"))
    assert kept.features == datasets.load_from_disk(str(tmp_path / "saved")).features
    back = kept.to_list() + [{k: r[k] for k in rows[0]} for r in rejects.to_list()]
    assert [json.dumps(r) for r in back] == [json.dumps(r) for r in rows]


def test_gzipped_jsonl_same_kind_writes_the_decompressed_lines(tmp_path):
    import gzip

    lines = _jsonl_lines()
    path = tmp_path / "in.jsonl.gz"
    path.write_bytes(gzip.compress(b"".join(lines)))
    result = _prune(path, tmp_path, tmp_path / "kept.jsonl", tmp_path / "rej.jsonl")
    assert result.exit_code == 0, result.output
    kept = (tmp_path / "kept.jsonl").read_bytes().splitlines(keepends=True)
    assert kept == lines[: len(kept)] and kept


ODD_VALUES = [
    {"f": 0.12345678901234567, "i": 1, "n": [1, 2], "u": "é ✓ 日本 \u2028 \"q\" \\", "m": None},
    {"f": 3.141592653589793, "i": 2**63 - 1, "n": [], "u": "\U0001f600", "m": 2.5},
    {"f": 1e-320, "i": -(2**63), "n": [3], "u": "", "m": None},
    {"f": -0.0, "i": 0, "n": [-7, 2**53 + 1], "u": "tab\tnl\n", "m": 1e300},
    {"f": 5e-324, "i": 12345678901234567, "n": [0], "u": "x", "m": -1.5},
    {"f": 1.7976931348623157e308, "i": -1, "n": [9], "u": "y", "m": None},
]


def _odd_rows():
    rows = []
    for k, extra in enumerate(ODD_VALUES):
        rows.append({
            "prompt": f"p{k}", "chosen": f"c{k}", "rejected": f"r{k}", **extra,
            "nested": {"a": [extra["f"]], "k": k, "b": {"c": [[0.5 * k, 0.1], [0.2]], "d": [[k]]}, "t": "ü"},
            "flag": k % 2 == 0,
        })
    return rows


def _same(a, b):
    """Equal in value and JSON type, recursively (1 != 1.0, -0.0 != 0.0, True != 1)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return a == b and math.copysign(1.0, a) == math.copysign(1.0, b)
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line]


@pytest.mark.parametrize("add_scores", [False, True])
def test_jsonl_output_round_trips_every_value(tmp_path, monkeypatch, add_scores):
    monkeypatch.chdir(tmp_path)
    rows = _odd_rows()
    write_jsonl(tmp_path / "in.jsonl", rows)
    make_scores(tmp_path / "in.jsonl", tmp_path / "s.parquet")
    flags = ["--add-scores"] if add_scores else []
    result = invoke("prune", "in.jsonl", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl",
                    "--rejects", "rej.jsonl", *flags)
    assert result.exit_code == 0, result.output
    scores = pq.read_table(tmp_path / "s.parquet").to_pylist()
    kept, rejected = _read_jsonl(tmp_path / "out.jsonl"), _read_jsonl(tmp_path / "rej.jsonl")
    assert len(kept) == 3 and len(rejected) == 3
    for got, want, score in zip(kept + rejected, rows, scores):
        original = {k: got[k] for k in want}
        assert _same(original, want), (original, want)
        extra = {k: v for k, v in got.items() if k not in want}
        expected = {} if (got in kept and not add_scores) else {k: score[k] for k in ("ches", "ln_ches", "status")}
        if got in rejected:
            expected = {"ches_filter_reason": "high_score", **expected}
        assert _same(extra, expected), (extra, expected)


def test_parquet_input_to_jsonl_keeps_types_and_scores_exact(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    table = pa.table({
        "prompt": [f"p{i}" for i in range(4)], "chosen": [f"c{i}" for i in range(4)],
        "rejected": [f"r{i}" for i in range(4)],
        "i32": pa.array([1, None, -3, 2**31 - 1], pa.int32()),  # pandas would turn the null column into floats
        "u64": pa.array([2**63 - 1, 0, 1, None], pa.uint64()),
        "f32": pa.array([0.1, 1.5, None, -0.0], pa.float32()),
        "lst": pa.array([[1.25, None], None, [], [1e-320]], pa.list_(pa.float64())),
    })
    pq.write_table(table, tmp_path / "in.parquet")
    make_scores(tmp_path / "in.parquet", tmp_path / "s.parquet")
    result = invoke("prune", "in.parquet", "--keep", "1", "--scores", "s.parquet", "-o", "out.jsonl", "--add-scores")
    assert result.exit_code == 0, result.output
    got = _read_jsonl(tmp_path / "out.jsonl")
    want = table.to_pylist()
    scores = pq.read_table(tmp_path / "s.parquet").to_pylist()
    for g, w, s in zip(got, want, scores):
        assert _same(g, {**w, "ches": s["ches"], "ln_ches": s["ln_ches"], "status": s["status"]}), (g, w)


def test_parquet_uint64_beyond_int64_is_refused_for_jsonl_and_kept_in_parquet(tmp_path, monkeypatch):
    """JSON readers (``load_dataset("json")``, pandas) read 18446744073709551615 back as a float: refused."""
    monkeypatch.chdir(tmp_path)
    table = pa.table({"prompt": ["p0", "p1"], "chosen": ["c0", "c1"], "rejected": ["r0", "r1"],
                      "u64": pa.array([1, 2**64 - 1], pa.uint64())})
    pq.write_table(table, tmp_path / "in.parquet")
    make_scores(tmp_path / "in.parquet", tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    result = invoke("prune", "in.parquet", "--keep", "1", "--scores", "s.parquet", "-o", "out.jsonl")
    assert result.exit_code == 1 and "column `u64`, row 2" in result.output and "`.parquet`" in result.output
    assert len(result.output.strip().splitlines()[-1]) > 0 and "Traceback" not in result.output
    assert snapshot(tmp_path) == before
    assert invoke("prune", "in.parquet", "--keep", "1", "--scores", "s.parquet", "-o", "out.parquet").exit_code == 0
    assert pq.read_table(tmp_path / "out.parquet").equals(table)


@pytest.mark.parametrize("value, why", [
    (float("nan"), "value"), (float("-inf"), "value"), (b"\x00\x01", "type"),
    (datetime.datetime(2020, 1, 2), "type"),
])
def test_values_json_cannot_hold_are_refused_and_nothing_written(tmp_path, monkeypatch, value, why):
    monkeypatch.chdir(tmp_path)
    filler = datetime.datetime(2000, 1, 1) if isinstance(value, datetime.datetime) else type(value)()
    rows = [dict(p, odd=value if i == 4 else filler) for i, p in enumerate(PAIRS)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "in.parquet")
    make_scores(tmp_path / "in.parquet", tmp_path / "s.parquet")
    before = snapshot(tmp_path)
    # Row 4 is rejected (scores rank rows in order): the kept file alone would be fine, yet nothing is written.
    result = invoke("prune", "in.parquet", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.jsonl",
                    "--rejects", "rej.jsonl")
    assert result.exit_code == 1 and "column `odd`" in result.output, result.output
    # binary/timestamp are refused by column type (the kept file has it too), NaN/inf by the rejected row's value
    assert ("`--output`" if why == "type" else "`--rejects` rej.jsonl") in result.output
    assert "Traceback" not in result.output
    assert snapshot(tmp_path) == before
    # Parquet holds them: the same prune with parquet outputs succeeds.
    assert invoke("prune", "in.parquet", "--keep", "0.5", "--scores", "s.parquet", "-o", "out.parquet",
                  "--rejects", "rej.parquet").exit_code == 0


@pytest.mark.parametrize("lines, column", [
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "big": 12345678901234567890}'], "big"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "big": 1}', '{"prompt": "p", "chosen": "a", "rejected": "b", "big": -9223372036854775809}'],
     "big"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "deep": {"x": [1, 18446744073709551616]}}'], "deep"),
    (['{"prompt": "p", "chosen": "a", "rejected": "b", "mix": 12345678901234567}', '{"prompt": "p", "chosen": "a", "rejected": "b", "mix": 0.5}'],
     "mix"),
])
def test_numbers_a_typed_reader_would_change_pass_to_jsonl_and_are_refused_for_parquet(tmp_path, lines, column):
    """Other columns are opaque: JSONL to JSONL keeps the lines; a typed output refuses the value in one line."""
    path = tmp_path / "in.jsonl"
    path.write_text("\n".join(lines) + "\n")
    result = invoke("prune", path, "--keep", "1", "--keep-unscored", "--scores", make_scores(path, tmp_path / "s.parquet"),
                    "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.jsonl").read_bytes() == path.read_bytes()
    result = invoke("prune", path, "--keep", "1", "--keep-unscored", "--scores", tmp_path / "s.parquet",
                    "-o", tmp_path / "out.parquet")
    assert result.exit_code == 1 and f"column `{column}`" in result.output, result.output
    assert not (tmp_path / "out.parquet").exists()


def test_objects_whose_keys_differ_between_rows_pass_through(tmp_path):
    rows = [dict(PAIRS[0], o={"x": 1}), dict(PAIRS[1], o={"y": [2.5, {"z": None}], "w": "ü"}), dict(PAIRS[2], o=None)]
    path = write_jsonl(tmp_path / "in.jsonl", rows)
    result = invoke("prune", path, "--keep", "1", "--scores", make_scores(path, tmp_path / "s.parquet"),
                    "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out.jsonl").read_bytes() == path.read_bytes()


def test_json_array_input_refuses_big_integers_for_jsonl(tmp_path):
    path = tmp_path / "in.json"
    path.write_text('[{"prompt": "p", "chosen": "a", "rejected": "b", "n": 1},\n {"prompt": "p", "chosen": "a", "rejected": "b", "n": 99999999999999999999}]')
    result = invoke("prune", path, "--keep", "1", "--keep-unscored", "--scores", make_scores(path, tmp_path / "s.parquet"),
                    "-o", tmp_path / "out.jsonl")
    assert result.exit_code == 1 and "column `n`, row 2" in result.output, result.output
    assert not (tmp_path / "out.jsonl").exists()


def test_a_column_mixing_integers_and_fractions_comes_back_as_the_same_numbers(tmp_path):
    """Documented: Arrow stores such a column as floats, so 1 is written back as 1.0 (the same number)."""
    rows = [dict(PAIRS[0], n=1), dict(PAIRS[1], n=2.5), dict(PAIRS[2], n=2**53)]
    ds = sources.read_dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    records.write_dataset(ds, str(tmp_path / "out.jsonl"))
    got = [r["n"] for r in _read_jsonl(tmp_path / "out.jsonl")]
    assert got == [1.0, 2.5, float(2**53)] and all(isinstance(v, float) for v in got)


def test_large_integers_in_an_integer_column_stay_exact(tmp_path):
    rows = [dict(PAIRS[0], n=2**63 - 1), dict(PAIRS[1], n=2**53 + 1)]
    ds = sources.read_dataset(str(write_jsonl(tmp_path / "in.jsonl", rows)))
    records.write_dataset(ds, str(tmp_path / "out.jsonl"))
    assert all(_same(a, b) for a, b in zip(_read_jsonl(tmp_path / "out.jsonl"), rows))
