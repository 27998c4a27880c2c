"""The engine-strategy registry: how pairs become forward passes (``--engine``).

Each strategy is described here, without torch, so the CLI can offer the
choices instantly; :class:`ches_filter.engine.Engine` runs the one chosen
(``auto`` picks ``packed`` where its start-up self-check proves it exact for
the model, else ``plain``). The index diagrams of each strategy are in
:mod:`ches_filter.engine`.

A new strategy is one entry here plus its ``_forward_<name>`` in the engine
(a function returning per-pair sums and last states), and its exactness test
against ``plain`` in ``tests/test_engine.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

from .registry import Registry

__all__ = ["Strategy", "STRATEGIES", "ENGINE_CHOICES"]


@dataclass(frozen=True)
class Strategy:
    """One way to lay pairs out in forward passes.

    Attributes:
        name: the ``--engine`` value.
        shares_prompt: the prompt is encoded once per pair (needs a tree mask
            the model honours; refused where the engine cannot prove it exact).
        needs_cache: runs the prompt first and the responses from its KV cache.
        self_checked: compared against ``plain`` on a synthetic pair at start-up.
        description: one line for ``--help`` and the docs.
    """

    name: str
    shares_prompt: bool
    needs_cache: bool
    self_checked: bool
    description: str

    def cost(self, prompt: int, chosen: int, rejected: int) -> int:
        """Padded tokens a pair of these lengths puts in a forward pass.

        A shared-prompt row is ``P + R+[:-1] + R-[:-1]``; plain rows hold both
        sides, padded to the longer one.
        """
        if self.shares_prompt:
            return prompt + chosen + rejected - 2
        return 2 * (prompt + max(chosen, rejected) - 1)


STRATEGIES: Registry[Strategy] = Registry("engine strategy", "--engine")
STRATEGIES.register("packed", Strategy(
    "packed", True, False, True, "prompt once per pair, one tree-masked row"))
STRATEGIES.register("prefix", Strategy(
    "prefix", True, True, True, "prompt once, then both responses from its KV cache"))
STRATEGIES.register("plain", Strategy(
    "plain", False, False, False, "each side as its own sequence (reference)"))

#: ``--engine`` values: ``auto`` then every strategy.
ENGINE_CHOICES = ("auto",) + STRATEGIES.names()
