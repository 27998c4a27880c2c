"""Small statistics shared by report, displacement and validate (numpy only, no torch, no scipy)."""

from __future__ import annotations

from typing import Any

# pyarrow and numpy are imported in the functions that use them: `ches-filter --help` stays instant.

__all__ = ["as_float_array", "average_ranks", "rank_correlation", "describe", "QUANTILES"]

#: The quantiles every summary reports, by name.
QUANTILES = (("min", 0.0), ("q01", 0.01), ("q05", 0.05), ("q25", 0.25), ("median", 0.5),
             ("q75", 0.75), ("q95", 0.95), ("q99", 0.99), ("max", 1.0))


def as_float_array(values: Any) -> "Any":
    """float64 numpy array, None -> NaN (accepts lists, numpy and Arrow arrays)."""
    import numpy as np

    if hasattr(values, "to_numpy") and not isinstance(values, np.ndarray):
        import pyarrow as pa

        values = values.cast(pa.float64()).fill_null(float("nan")).to_numpy()
    elif not isinstance(values, np.ndarray):
        values = [float("nan") if v is None else v for v in values]
    return np.asarray(values, dtype=np.float64)


def average_ranks(values: Any) -> "Any":
    """1-based ranks of a 1-D array, ties given the mean of the ranks they span (scipy's ``rankdata``)."""
    import numpy as np

    values = np.asarray(values)
    order = np.argsort(values, kind="mergesort")
    ordered = values[order]
    first = np.flatnonzero(np.r_[True, ordered[1:] != ordered[:-1]])  # where each run of equal values starts
    stop = np.r_[first[1:], values.size]
    run = np.cumsum(np.r_[True, ordered[1:] != ordered[:-1]]) - 1
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = ((first + stop + 1) / 2.0)[run]  # mean of the 1-based ranks first+1 .. stop
    return ranks


def rank_correlation(x: Any, y: Any) -> float | None:
    """Spearman's rho: Pearson correlation of tie-averaged ranks (numpy only).

    Pairs where either value is None or NaN are left out.

    Returns:
        rho in [-1, 1], or None with fewer than 3 usable pairs or a constant side.
    """
    import numpy as np

    x, y = as_float_array(x), as_float_array(y)
    keep = np.isfinite(x) & np.isfinite(y)
    if keep.sum() < 3 or np.ptp(x[keep]) == 0 or np.ptp(y[keep]) == 0:
        return None
    rx, ry = average_ranks(x[keep]), average_ranks(y[keep])
    rx, ry = rx - rx.mean(), ry - ry.mean()
    rho = float((rx * ry).sum() / np.sqrt((rx * rx).sum() * (ry * ry).sum()))
    return None if rho != rho else max(-1.0, min(1.0, rho))


def describe(values: Any) -> dict:
    """Count, mean and quantiles (numpy's linear interpolation) of the finite values ({"count": 0} if none)."""
    import numpy as np

    finite = as_float_array(values)
    finite = finite[np.isfinite(finite)]
    if finite.size == 0:
        return {"count": 0}
    quantiles = np.quantile(finite, [q for _, q in QUANTILES])
    out: dict[str, Any] = {"count": int(finite.size), "mean": float(finite.mean())}
    out.update({name: float(v) for (name, _), v in zip(QUANTILES, quantiles)})
    return out
