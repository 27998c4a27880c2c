"""ches-filter: score and prune DPO preference pairs by CHES (Razin et al., ICLR 2025)."""

__version__ = "0.1.0"

__all__ = ["__version__", "score_pairs", "prune_pairs"]


def __getattr__(name):
    # Lazy so `import ches_filter` (and `ches-filter --help`) never imports the scoring stack.
    if name in ("score_pairs", "prune_pairs"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ches_filter' has no attribute {name!r}")
