"""Look before pruning: the ``report`` pipeline.

Reads a score file from ``ches-filter score`` (and, optionally, the input it
scored) and writes a report directory::

    summary.json   counts by status, quantiles of every measure, the prune
                   threshold for each ``--keep`` fraction
    histogram.png  LN-CHES and CHES histograms, thresholds marked
    length.png     LN-CHES against the chosen and rejected response lengths
    report.html    one self-contained page: the plots inline, the tables, and
                   the highest- and lowest-scoring pairs with excerpts

matplotlib draws the plots; it is an optional extra
(``pip install 'ches-filter[report]'``) imported only when plotting.
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import math
import os
import stat
from dataclasses import dataclass
from typing import Any, Sequence

from . import __version__
from .atomic import atomic_path
from .config import PruneConfig, ReportConfig, ScoreConfig
from .errors import BadDataError, ChesFilterError
from .formats import LAYOUTS, normalize_row
from .inputs import check_scores_belong, load_input
from .measures import MEASURES
from .paths import check_paths, foreign_files
from .scorefile import read_table
from .scoring import scores_identity, table_metadata
from .select import kept_count, rank_scored
from .sources import open_records
from .stats import as_float_array as _array
from .stats import QUANTILES, describe, rank_correlation
from .validate import ValidateSummary, table_rows

# pyarrow, numpy and matplotlib are imported in the functions that use them: `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

__all__ = ["build_report", "summarize", "terminal_summary", "rank_correlation", "require_matplotlib", "REPORT_FILES"]

LENGTH_COLUMNS = ("prompt_tokens", "chosen_tokens", "rejected_tokens")
REPORT_FILES = ("summary.json", "histogram.png", "length.png", "report.html")
_MATPLOTLIB_HINT = "pip install 'ches-filter[report]'"


def require_matplotlib() -> None:
    """Fail with one sentence, and the install command, when matplotlib is missing.

    Raises:
        ChesFilterError: matplotlib cannot be imported (exit code 1).
    """
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ChesFilterError(
            "`ches-filter report` draws its plots with matplotlib, which is not installed; "
            f"install it with `{_MATPLOTLIB_HINT}` (or `pip install matplotlib`)"
        ) from None


# ------------------------------------------------------------------- summary
@dataclass
class _Scores:
    """A score table as numpy columns (no Python object per row: 10M rows stay cheap).

    Attributes:
        table: the ``pyarrow.Table``.
        meta: its ``ches_filter`` metadata.
        row_index: ``(N,)`` int64.
        ok: ``(N,)`` bool, status ``ok``.
        counts: rows per status.
        columns: measure and token-count columns present, float64 with NaN for null.
    """

    table: Any
    meta: dict
    row_index: Any
    ok: Any
    counts: dict
    columns: dict

    def scored(self, name: str) -> Any:
        """``name``'s values on the ``ok`` rows (NaN where missing)."""
        return self.columns[name][self.ok]


def _load_scores(scores: Any) -> _Scores:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    if isinstance(scores, pa.Table):
        table, meta = scores, table_metadata(scores)
    else:
        table, meta = read_table(str(scores))
    missing = [c for c in ("row_index", "status") if c not in table.column_names]
    if missing or not any(m in table.column_names for m in MEASURES.names()):
        raise BadDataError(
            f"{scores if not isinstance(scores, pa.Table) else 'the score table'} is not a score file: it lacks "
            f"{', '.join(missing) or 'any measure column'} (columns: {', '.join(table.column_names)}); "
            "pass the Parquet written by `ches-filter score`"
        )
    status = table.column("status")
    counts = {str(item["values"]): int(item["counts"]) for item in pc.value_counts(status).to_pylist()}
    ok = pc.fill_null(pc.equal(status, "ok"), False).to_numpy(zero_copy_only=False).astype(bool)
    columns = {c: _array(table.column(c)) for c in MEASURES.names() + LENGTH_COLUMNS if c in table.column_names}
    row_index = np.asarray(table.column("row_index").to_numpy(zero_copy_only=False), dtype=np.int64)
    return _Scores(table, meta, row_index, ok, counts, columns)


def summarize(scores: Any, config: ReportConfig | None = None) -> dict:
    """Counts, quantiles, thresholds and the extreme pairs of a score table.

    Thresholds follow ``prune`` exactly: ``--keep F`` keeps the
    ``round_half_up(F * n_ok)`` lowest-scoring ``ok`` rows.

    Args:
        scores: a score ``pyarrow.Table`` or the path of a score Parquet.
        config: which ``--keep`` fractions to threshold and which measure ranks.

    Returns:
        The dict written to ``summary.json`` (JSON-serialisable).
    """
    config = config or ReportConfig()
    loaded = scores if isinstance(scores, _Scores) else _load_scores(scores)
    cols = loaded.columns
    if config.by not in cols:
        usable = [m for m in MEASURES.names() if m in cols]
        raise BadDataError(
            f"`--by {config.by}` names a measure the score file lacks (it has: "
            f"{', '.join(usable)}); "
            + (f"pass `--by {usable[0]}`" if usable else f"rescore with `--measures` including {config.by}")
        )
    thresholds: dict[str, dict] = {}
    for measure in (m for m in MEASURES.names() if m in cols):
        ranked, values, _ = rank_scored(loaded.table, measure)
        thresholds[measure] = {}
        for keep in config.keep:
            n_keep = kept_count(ranked, values, PruneConfig(keep=keep, by=measure))
            thresholds[measure][_keep_key(keep)] = {
                "threshold": float(values[ranked[n_keep - 1]]) if n_keep else None,
                "kept": int(n_keep),
                "dropped_high_score": int(len(ranked) - n_keep),
            }
    ranked = rank_scored(loaded.table, config.by)[0]
    top = config.top
    length_corr = {}
    for measure in (m for m in MEASURES.names() if m in cols):
        for length in ("chosen_tokens", "rejected_tokens"):
            if measure in cols and length in cols:
                length_corr[f"{measure}~{length}"] = rank_correlation(loaded.scored(measure), loaded.scored(length))
    meta = loaded.meta
    model = meta.get("model") or {}
    return {
        "ches_filter_version": __version__,
        "model": model.get("model") if isinstance(model, dict) else model,
        "input": meta.get("input"),
        "input_format": meta.get("input_format"),
        "token_layout": meta.get("token_layout"),
        "special_token_rows": int(meta.get("special_token_rows") or 0),
        "on_special_tokens": meta.get("on_special_tokens"),
        "rows": int(len(loaded.ok)),
        "scored": int(loaded.ok.sum()),
        "counts": dict(sorted(loaded.counts.items(), key=lambda kv: (kv[0] != "ok", kv[0]))),
        "by": config.by,
        "measures": {m: describe(loaded.scored(m)) for m in MEASURES.names() if m in cols},
        "lengths": {c: describe(loaded.scored(c)) for c in LENGTH_COLUMNS if c in cols},
        "thresholds": thresholds,
        "length_spearman": length_corr,
        "highest": [int(loaded.row_index[i]) for i in ranked[::-1][:top]],
        "lowest": [int(loaded.row_index[i]) for i in ranked[:top]],
    }


def _special_text(summary: dict) -> str:
    """One sentence on the rows whose text holds the tokenizer's special tokens."""
    n, mode = summary["special_token_rows"], summary.get("on_special_tokens") or "keep"
    what = {
        "drop": "left unscored (status special_tokens)",
        "flag": "scored, marked in the special_tokens column",
    }.get(mode, "scored with those strings as control tokens")
    return f"special tokens: {n} rows hold the tokenizer's special-token text (e.g. <|im_end|>); {what}"


def _keep_key(keep: float) -> str:
    return f"{keep:g}"


def terminal_summary(summary: dict) -> list[str]:
    """A few lines for the terminal: counts, the main measure's spread, thresholds."""
    counts = summary["counts"]
    others = ", ".join(f"{k} {v}" for k, v in counts.items() if k != "ok")
    if not summary["scored"]:
        # Nothing to describe or threshold: one line instead of a "keeps no scored pair" per --keep.
        return [f"rows: {summary['rows']}, no scored rows" + (f" (not scored: {others})" if others else "")]
    lines = [f"rows: {summary['rows']}, scored ok: {summary['scored']}" + (f" (not scored: {others})" if others else "")]
    if summary.get("special_token_rows"):
        lines.append(_special_text(summary))
    for measure in MEASURES.names():
        stats = summary["measures"].get(measure)
        if stats and stats.get("count"):
            lines.append(
                f"{measure}: median {stats['median']:.4g}, 5%-95% [{stats['q05']:.4g}, {stats['q95']:.4g}], "
                f"max {stats['max']:.4g}"
            )
    by = summary["by"]
    keeps_below = "<=" if MEASURES.get(by).higher_is_riskier else ">="
    for keep, info in (summary["thresholds"].get(by) or {}).items():
        thr = info["threshold"]
        lines.append(
            f"--keep {keep}: {by} {keeps_below} {thr:.6g}, keeps {info['kept']}, drops {info['dropped_high_score']} high-risk"
            if thr is not None
            else f"--keep {keep}: keeps no scored pair"
        )
    return lines


# --------------------------------------------------------------------- plots
def _wide_tailed(values: Sequence[float]) -> bool:
    """Whether a linear axis would squash the bulk of the values into a few pixels."""
    stats = describe(values)
    if stats.get("count", 0) < 4:
        return False
    iqr = stats["q75"] - stats["q25"]
    spread = stats["max"] - stats["min"]
    # A normal sample of any size spans < 10 IQRs; heavier tails get an asinh axis.
    return spread > 0 and (iqr == 0 or spread > 10 * iqr)


def _asinh_axis(ax: Any, which: str, width: float, lo: float, hi: float) -> None:
    """asinh scale (linear within +-width, logarithmic beyond) with ticks at 0 and +-10^k."""
    (ax.set_xscale if which == "x" else ax.set_yscale)("asinh", linear_width=width)
    # The default asinh locator puts ticks inside the linear zone whose labels collide with 0.
    first = math.ceil(math.log10(width))
    top = max(abs(lo), abs(hi))
    powers = [k for k in range(first, math.floor(math.log10(top)) + 1)] if top >= 10**first else []
    if len(powers) > 4:
        powers = powers[len(powers) % 2 :: 2]
    ticks, labels = [0.0], ["0"]
    for k in powers:
        if hi >= 10**k:
            ticks.append(10.0**k)
            labels.append(f"$10^{{{k}}}$")
        if lo <= -(10**k):
            ticks.append(-(10.0**k))
            labels.append(f"$-10^{{{k}}}$")
    order = sorted(range(len(ticks)), key=ticks.__getitem__)
    (ax.set_xticks if which == "x" else ax.set_yticks)([ticks[i] for i in order], [labels[i] for i in order])


def _linear_width(values: Any) -> float:
    stats = describe(values)
    iqr = stats["q75"] - stats["q25"]
    return float(iqr / 2 or max(abs(stats["median"]), 1e-12))


def _bins(lo: float, hi: float, asinh_width: float | None, n: int = 60) -> list[float]:
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    if asinh_width is None:
        return [lo + (hi - lo) * k / n for k in range(n + 1)]
    a, b = math.asinh(lo / asinh_width), math.asinh(hi / asinh_width)
    return [asinh_width * math.sinh(a + (b - a) * k / n) for k in range(n + 1)]


def _threshold_lines(ax: Any, summary: dict, measure: str, vertical: bool) -> None:
    styles = ("-", "--", ":", "-.")
    for k, (keep, info) in enumerate((summary["thresholds"].get(measure) or {}).items()):
        if info["threshold"] is None:
            continue
        draw = ax.axvline if vertical else ax.axhline
        draw(info["threshold"], color="#c0392b", linestyle=styles[k % len(styles)], linewidth=1.3,
             label=f"keep {float(keep):.0%}: {info['threshold']:.4g}")


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    return buffer.getvalue()


def plot_histogram(scores: _Scores, summary: dict) -> bytes:
    """PNG: one histogram per measure in the score file, prune thresholds marked."""
    import numpy as np
    from matplotlib.figure import Figure

    measures = [m for m in MEASURES.names() if m in scores.columns]
    fig = Figure(figsize=(6.2 * len(measures), 4.2))
    axes = fig.subplots(1, len(measures), squeeze=False)[0]
    for ax, measure in zip(axes, measures):
        values = scores.scored(measure)
        values = values[np.isfinite(values)]
        title = MEASURES.get(measure).label
        if values.size == 0:
            ax.text(0.5, 0.5, "no scored pairs", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
            continue
        lo, hi = float(values.min()), float(values.max())
        width = _linear_width(values) if _wide_tailed(values) else None
        ax.hist(values, bins=_bins(lo, hi, width), color="#4a7ab5", edgecolor="white", linewidth=0.3)
        if width is not None:
            _asinh_axis(ax, "x", width, lo, hi)
            title += " (asinh x-axis)"
        _threshold_lines(ax, summary, measure, vertical=True)
        ax.set_title(title)
        ax.set_xlabel(f"{measure} ({'higher' if MEASURES.get(measure).higher_is_riskier else 'lower'} = more displacement risk)")
        ax.set_ylabel("pairs")
        if ax.get_legend_handles_labels()[0]:  # matplotlib warns about an empty legend
            ax.legend(fontsize=8, loc="upper left", frameon=False)
    fig.suptitle(f"{summary['scored']} scored pairs", fontsize=10)
    return _png(fig)


#: Most points drawn per scatter panel; more only add ink (and minutes) to the plot.
_SCATTER_POINTS = 20000


def plot_lengths(scores: _Scores, summary: dict, measure: str = "ln_ches") -> bytes:
    """PNG: ``measure`` against chosen and rejected response length (tokens, log axis).

    Above 20,000 scored pairs a fixed random subset is drawn; the correlations
    in the titles use every pair.
    """
    import numpy as np
    from matplotlib.figure import Figure

    if measure not in scores.columns:
        measure = next(m for m in MEASURES.names() if m in scores.columns)
    fig = Figure(figsize=(12.4, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    ys = scores.scored(measure)
    finite = ys[np.isfinite(ys)]
    width = _linear_width(finite) if _wide_tailed(finite) else None
    for ax, length in zip(axes, ("chosen_tokens", "rejected_tokens")):
        side = length.split("_")[0]
        if length not in scores.columns:
            ax.text(0.5, 0.5, f"no {length} column", ha="center", va="center", transform=ax.transAxes)
            continue
        xs = scores.scored(length)
        keep = np.flatnonzero(np.isfinite(xs) & np.isfinite(ys))
        shown = ""
        if keep.size > _SCATTER_POINTS:
            keep = np.sort(np.random.default_rng(0).choice(keep, _SCATTER_POINTS, replace=False))
            shown = f", {_SCATTER_POINTS} drawn"
        if keep.size:
            ax.scatter(xs[keep], ys[keep], s=9, alpha=0.55, color="#4a7ab5", linewidths=0)
            ax.set_xscale("log")
        else:
            ax.text(0.5, 0.5, "no scored pairs", ha="center", va="center", transform=ax.transAxes)
        if width is not None:
            _asinh_axis(ax, "y", width, float(finite.min()), float(finite.max()))
        _threshold_lines(ax, summary, measure, vertical=False)
        rho = summary["length_spearman"].get(f"{measure}~{length}")
        ax.set_title(f"{side} response length" + (f" (Spearman {rho:+.2f}{shown})" if rho is not None else shown))
        ax.set_xlabel(f"|y{'+' if side == 'chosen' else '-'}| tokens (log)")
    axes[0].set_ylabel(measure + (" (asinh axis)" if width is not None else ""))
    if axes[0].get_legend_handles_labels()[0]:  # matplotlib warns about an empty legend
        axes[0].legend(fontsize=8, loc="lower right", frameon=False)
    return _png(fig)


# ------------------------------------------------------------------ excerpts
def _clip(text: str, limit: int) -> str:
    text = text.strip()
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "\u2026"


def load_excerpts(data: Any, meta: dict, row_indices: Sequence[int], config: ReportConfig) -> dict[int, dict]:
    """Prompt/chosen/rejected excerpts (plain text, not escaped) for some rows of the scored input.

    The input is opened with the layout and columns recorded in the score
    file, and must be the very input that was scored (checked by fingerprint).

    Raises:
        BadDataError: ``data`` is not the input the scores belong to.
    """
    stored = meta.get("columns") or {}
    if isinstance(data, (str, os.PathLike)):
        # Only the pair columns are parsed: the other columns may be of any shape.
        wanted = [stored.get("prompt") or "prompt", stored.get("chosen") or "chosen", stored.get("rejected") or "rejected"]
        data = open_records(str(data), split=config.split, subset=config.subset, wanted=wanted).scored
    input_format = meta.get("input_format")
    names = data.column_names if hasattr(data, "column_names") else list(data[0]) if data else []
    if input_format in LAYOUTS and not LAYOUTS.get(input_format).needs_prompt and (stored.get("prompt") or "prompt") not in names:
        # Implicit layouts need no prompt column; let detection settle them
        # (inputs.load_input insists on the prompt column when a format is forced).
        input_format = None
    score_config = ScoreConfig(
        input_format=input_format,
        prompt_column=stored.get("prompt") or "prompt",
        chosen_column=stored.get("chosen") or "chosen",
        rejected_column=stored.get("rejected") or "rejected",
    )
    ds, layout, columns = load_input(data, score_config)
    check_scores_belong(meta, int(meta.get("num_rows") or len(ds)), ds, layout, columns, flag="--data")
    out: dict[int, dict] = {}
    limit = config.excerpt_chars
    for index in row_indices:
        pair = normalize_row(ds[int(index)], layout, columns)
        if pair.status != "ok":
            continue
        messages = list(pair.prompt_messages or ())
        last = messages[-1]["content"] if messages else (pair.prompt_text or "")
        earlier = len(messages) - 1
        out[int(index)] = {
            "prompt": ("[+%d earlier message%s] " % (earlier, "s" if earlier > 1 else "") if earlier > 0 else "")
            + _clip(last, limit),
            "chosen": _clip(pair.chosen if pair.chosen is not None else pair.chosen_text or "", limit),
            "rejected": _clip(pair.rejected if pair.rejected is not None else pair.rejected_text or "", limit),
        }
    return out


# ---------------------------------------------------------------------- html
_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1280px;color:#222;padding:0 16px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} img{max-width:100%;border:1px solid #eee}
table{border-collapse:collapse;margin:8px 0;font-size:13px} th,td{border:1px solid #ddd;padding:4px 7px;vertical-align:top;text-align:left}
th{background:#f4f6f8} td.num{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
table.pairs td.text{white-space:pre-wrap;word-break:break-word;max-width:340px;font-size:12px}
.note{color:#666;font-size:12.5px}
"""


def _esc(value: Any) -> str:
    return html.escape("" if value is None else str(value), quote=True)


def _num(value: Any) -> str:
    if value is None:
        return "&ndash;"
    if isinstance(value, int):
        return str(value)
    return _esc(f"{value:.5g}")


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], cls: str = "") -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(rows_cell for rows_cell in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _pair_rows(scores: _Scores, summary: dict, which: str, excerpts: dict[int, dict] | None) -> str:
    import numpy as np

    cols = scores.columns
    rows_wanted = summary[which]
    position = {int(scores.row_index[i]): int(i) for i in np.flatnonzero(np.isin(scores.row_index, rows_wanted))}
    measures = [m for m in MEASURES.names() if m in cols]
    id_column = (scores.meta.get("columns") or {}).get("id")
    ids = None
    if id_column and id_column in scores.table.column_names and rows_wanted:
        ids = dict(zip(rows_wanted, scores.table.column(id_column).take([position[r] for r in rows_wanted]).to_pylist()))
    headers = ["#", "row"] + ([id_column] if ids is not None else []) + measures + ["|y+|", "|y-|"]
    if excerpts is not None:
        headers += ["prompt (last turn)", "chosen y+", "rejected y-"]

    def number(name: str, i: int) -> str:
        if name not in cols or not np.isfinite(cols[name][i]):
            return "&ndash;"
        value = float(cols[name][i])
        return str(int(value)) if name.endswith("_tokens") else _esc(f"{value:.5g}")

    rows = []
    for rank, row_index in enumerate(rows_wanted, 1):
        i = position[row_index]
        cells = [f'<td class="num">{rank}</td>', f'<td class="num">{row_index}</td>']
        if ids is not None:
            cells.append(f"<td>{_esc(ids[row_index])}</td>")
        cells += [f'<td class="num">{number(m, i)}</td>' for m in measures + ["chosen_tokens", "rejected_tokens"]]
        if excerpts is not None:
            ex = excerpts.get(row_index, {})
            cells += [f'<td class="text">{_esc(ex.get(k, ""))}</td>' for k in ("prompt", "chosen", "rejected")]
        rows.append(cells)
    return _table(headers, rows, "pairs")


def render_html(scores: _Scores, summary: dict, images: dict[str, bytes], excerpts: dict[int, dict] | None) -> str:
    """The self-contained report page (plots as data URIs, every text HTML-escaped)."""
    by = summary["by"]
    count_rows = [[f"<td>{_esc(k)}</td>", f'<td class="num">{v}</td>'] for k, v in summary["counts"].items()]
    q_names = ["count", "mean"] + [name for name, _ in QUANTILES]
    stat_rows = []
    for name, stats in list(summary["measures"].items()) + list(summary["lengths"].items()):
        stat_rows.append([f"<td>{_esc(name)}</td>"] + [f'<td class="num">{_num(stats.get(q))}</td>' for q in q_names])
    thr_rows = []
    for measure, per_keep in summary["thresholds"].items():
        for keep, info in per_keep.items():
            thr_rows.append([
                f"<td>{_esc(measure)}</td>", f'<td class="num">{_esc(keep)}</td>', f'<td class="num">{_num(info["threshold"])}</td>',
                f'<td class="num">{info["kept"]}</td>', f'<td class="num">{info["dropped_high_score"]}</td>',
                f"<td><code>ches-filter prune INPUT --keep {_esc(keep)} --by {_esc(measure)}</code></td>",
            ])
    corr = ", ".join(f"{_esc(k)}: {v:+.2f}" for k, v in summary["length_spearman"].items() if v is not None)
    img = {name: "data:image/png;base64," + base64.b64encode(png).decode("ascii") for name, png in images.items()}
    no_text = "" if excerpts is not None else '<p class="note">Pass <code>--data INPUT</code> to show prompt and response excerpts.</p>'
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>ches-filter report: {_esc(summary.get('input') or 'scores')}</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>ches-filter report</h1>",
        f'<p class="meta">input <b>{_esc(summary.get("input"))}</b> ({_esc(summary.get("input_format"))}), '
        f'model <b>{_esc(summary.get("model"))}</b>, token layout {_esc(summary.get("token_layout"))}; '
        f'{summary["rows"]} rows, {summary["scored"]} scored. ches-filter {_esc(__version__)}.</p>',
        '<p class="note">Higher CHES / LN-CHES = more risk that DPO on the pair lowers the likelihood of the '
        "preferred response (likelihood displacement). Pruning keeps the lowest-scoring pairs.</p>",
        "<h2>Rows by status</h2>", _table(["status", "rows"], count_rows),
        f'<p class="note">{_esc(_special_text(summary))}</p>' if summary.get("special_token_rows") else "",
        "<h2>Distribution</h2>", f'<img alt="histogram of LN-CHES and CHES" src="{img["histogram.png"]}">',
        "<h2>Score against response length</h2>",
        f'<p class="note">Spearman correlations over scored pairs: {corr or "n/a"}.</p>',
        f'<img alt="LN-CHES against response lengths" src="{img["length.png"]}">',
        "<h2>Measures (scored pairs)</h2>", _table(["measure"] + q_names, stat_rows),
        "<h2>Prune thresholds</h2>",
        _table(["measure", "--keep", "threshold (keep \u2264)", "kept", "dropped (high score)", "command"], thr_rows),
        f"<h2>{len(summary['highest'])} highest-{_esc(by)} pairs (pruned first)</h2>", no_text,
        _pair_rows(scores, summary, "highest", excerpts),
        f"<h2>{len(summary['lowest'])} lowest-{_esc(by)} pairs</h2>",
        _pair_rows(scores, summary, "lowest", excerpts),
        "</body></html>",
    ]
    return "\n".join(parts)


# ------------------------------------------------------------------- driver
def _regular_file(path: str, what: str) -> bool:
    """Whether ``path`` is a regular file; False when it is missing; BadDataError when it is something else."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise BadDataError(f"{what}: cannot read {path} ({exc.strerror or exc}); check the file, or rerun "
                           "`ches-filter validate`") from None
    if not stat.S_ISREG(mode):
        kind = "a directory" if stat.S_ISDIR(mode) else "not a regular file"
        raise BadDataError(f"{what}: {path} is {kind} where validate writes a file; pass an OUT_DIR of "
                           "`ches-filter validate`, or rerun validate into it")
    return True


def read_validate_summary(validate_dir: str) -> "ValidateSummary":
    """The checked ``summary.json`` of a ``ches-filter validate`` OUT_DIR (:meth:`ValidateSummary.from_dict`).

    Raises:
        BadDataError: the directory holds no readable ``summary.json`` of
            validate, or one whose fields have another shape than validate
            writes (the field named).
    """
    what = f"`--validate` {validate_dir}"
    path = os.path.join(os.fspath(validate_dir), "summary.json")
    if not _regular_file(path, what):
        raise BadDataError(f"{what}: {path} does not exist; pass an OUT_DIR of `ches-filter validate`")
    try:
        with open(path, encoding="utf-8") as handle:
            summary = json.load(handle)
    except (OSError, ValueError, RecursionError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise BadDataError(f"{what}: cannot read {path} ({reason}); pass an OUT_DIR of `ches-filter validate`") from None
    return ValidateSummary.from_dict(summary, f"{what}: {path}")


def validate_section(validate_dir: str, summary: "ValidateSummary") -> str:
    """HTML of a ``ches-filter validate`` directory: its verdicts, its table (:func:`~ches_filter.validate.table_rows`) and its plot.

    Raises:
        BadDataError: a ``validate.png`` that is not a readable file.
    """
    what = f"`--validate` {validate_dir}"
    heads, cells = table_rows(summary.subsets)
    rows = [[f"<td>{_esc(c)}</td>" if i < 2 else f'<td class="num">{_esc(c)}</td>' for i, c in enumerate(row)]
            for row in cells]
    parts = ["<h2>Validate: DPO on subsets of the pairs</h2>",
             f'<p class="meta">{_esc(validate_dir)}: model <b>{_esc((summary.model or {}).get("model"))}</b>, '
             f'{_esc(json.dumps(summary.config))}</p>']
    parts += [f'<p class="note">{_esc(line)}</p>' for line in summary.verdicts or []]
    parts.append(_table(heads, rows))
    png = os.path.join(os.fspath(validate_dir), "validate.png")
    if _regular_file(png, what):
        try:
            with open(png, "rb") as handle:
                data = base64.b64encode(handle.read()).decode("ascii")
        except OSError as exc:
            raise BadDataError(f"{what}: cannot read {png} ({exc.strerror or exc}); check the file, or rerun "
                               "`ches-filter validate`") from None
        parts.append(f'<img alt="change of log p(y+) per subset" src="data:image/png;base64,{data}">')
    return "\n".join(parts)


#: Every file a report directory holds (:func:`build_report`); ``--overwrite`` replaces only such a directory.
REPORT_FILES = ("summary.json", "histogram.png", "length.png", "report.html")


def _foreign_to_report(path: str) -> list[str]:
    """What the directory ``path`` holds besides a report's own files."""
    return foreign_files(path, REPORT_FILES.__contains__)


def check_validate_belongs(validate_dir: str, summary: "ValidateSummary", loaded: "_Scores") -> None:
    """Refuse a validate OUT_DIR whose verdicts were computed from other scores than ``loaded``.

    ``validate`` records the identity of the scores it ranked by
    (:func:`~ches_filter.scoring.scores_identity`); a summary written before it
    did cannot be checked and is shown with a warning.
    """
    path = os.path.join(os.fspath(validate_dir), "summary.json")
    recorded = summary.scores_identity
    if recorded is None:
        logger.warning("%s records no identity of the scores it ranked by (written by an older ches-filter), so "
                       "it cannot be checked against SCORES; make sure SCORES is %s", path, summary.scores)
        return
    current = scores_identity(loaded.meta, loaded.table.num_rows)
    differ = [f"{key} {recorded.get(key)!r} there, {current.get(key)!r} here"
              for key in current if key in recorded and recorded.get(key) != current.get(key)]
    if differ:
        raise BadDataError(
            f"`--validate` {validate_dir}: its verdicts were computed from other scores than SCORES ("
            + "; ".join(differ) + f"); pass the score file it ranked by ({summary.scores}), "
            "or a validate OUT_DIR run on SCORES"
        )


def build_report(scores: Any, output_dir: str, config: ReportConfig | None = None, *, data: Any = None,
                 overwrite: bool = False, validate: str | None = None) -> dict:
    """Write ``summary.json``, ``histogram.png``, ``length.png`` and ``report.html`` into ``output_dir``.

    Args:
        scores: path of a score Parquet (or the ``pyarrow.Table``).
        output_dir: directory to create (replaced as a whole with ``overwrite``).
        config: a :class:`~ches_filter.config.ReportConfig`.
        data: the scored input, for excerpts (path, ``datasets.Dataset`` or rows).
        overwrite: replace an existing ``output_dir``.
        validate: an OUT_DIR of ``ches-filter validate`` whose results join the page.

    Returns:
        The summary dict (also in ``summary.json``).
    """
    config = config or ReportConfig()
    require_matplotlib()
    inputs = {name: os.fspath(s) for name, s in (("SCORES", scores), ("--data", data)) if isinstance(s, (str, os.PathLike))}
    if validate is not None and os.path.lexists(validate):
        # A directory, never a pattern: only an existing one can be replaced or deleted with the report's directory.
        inputs["--validate"] = os.fspath(validate)
    check_paths({"--output": os.fspath(output_dir)}, inputs, overwrite=overwrite, foreign={"--output": _foreign_to_report})
    # Read before the scores are: a directory that is not validate's is refused before minutes of plotting.
    validated = read_validate_summary(validate) if validate is not None else None
    section = validate_section(validate, validated) if validated is not None else None
    loaded = _load_scores(scores)
    if validated is not None:
        check_validate_belongs(validate, validated, loaded)
    summary = summarize(loaded, config)
    excerpts = None
    if data is not None:
        excerpts = load_excerpts(data, loaded.meta, summary["highest"] + summary["lowest"], config)
    images = {"histogram.png": plot_histogram(loaded, summary), "length.png": plot_lengths(loaded, summary, summary["by"])}
    page = render_html(loaded, summary, images, excerpts)
    if section is not None:
        page = page.replace("</body></html>", section + "\n</body></html>")
    # Again, now that the plots are drawn: a file the user put there meanwhile is not deleted either.
    check_paths({"--output": os.fspath(output_dir)}, inputs, overwrite=overwrite, foreign={"--output": _foreign_to_report})
    with atomic_path(str(output_dir)) as tmp:
        os.makedirs(tmp)
        with open(os.path.join(tmp, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2, ensure_ascii=False)
        for name, png in images.items():
            with open(os.path.join(tmp, name), "wb") as handle:
                handle.write(png)
        with open(os.path.join(tmp, "report.html"), "w", encoding="utf-8") as handle:
            handle.write(page)
    logger.info("wrote report of %d rows to %s", summary["rows"], output_dir)
    return summary
