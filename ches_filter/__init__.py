"""ches-filter: score and prune DPO preference pairs by CHES (Razin et al., ICLR 2025)."""

__version__ = "0.1.0"

__all__ = ["__version__", "score_pairs", "prune_pairs"]


def __getattr__(name):
    # Lazy so `import ches_filter` (and `ches-filter --help`) never imports torch.
    if name == "score_pairs":
        from .scoring import score_pairs

        return score_pairs
    if name == "prune_pairs":
        from .select import prune_pairs

        return prune_pairs
    raise AttributeError(f"module 'ches_filter' has no attribute {name!r}")
