"""One small registry type for every concept whose members the CLI offers as choices.

Each concept has exactly one registry, next to its implementations:

=====================  ===============================  ==========================
concept                registry                          CLI flags reading it
=====================  ===============================  ==========================
input layouts          :data:`ches_filter.formats.LAYOUTS`        ``--input-format``
token layouts          :data:`ches_filter.batching.TOKEN_LAYOUTS` ``--layout``
measures               :data:`ches_filter.measures.MEASURES`      ``--measures``, ``--by``
engine strategies      :data:`ches_filter.strategies.STRATEGIES`  ``--engine``
output kinds           :func:`ches_filter.paths.output_kind`     ``--output`` suffixes
=====================  ===============================  ==========================

A registry maps a name to a frozen description object; registering a name
twice is a programming error. Modules holding a registry import no torch at
module level, so the CLI can read every choice and ``--help`` stays instant.
"""

from __future__ import annotations

from typing import Generic, Iterator, TypeVar

from .errors import BadFlagError

T = TypeVar("T")

__all__ = ["Registry"]


class Registry(Generic[T]):
    """Names to entries, in registration order.

    Args:
        concept: what the entries are ("measure"), for error messages.
        flag: the CLI flag that picks an entry (``--by``), for error messages.
    """

    def __init__(self, concept: str, flag: str) -> None:
        self.concept = concept
        self.flag = flag
        self._entries: dict[str, T] = {}

    def register(self, name: str, entry: T) -> T:
        """Add ``entry`` under ``name`` and return it (usable as a decorator helper)."""
        if name in self._entries:
            raise RuntimeError(f"{self.concept} {name!r} is registered twice")
        self._entries[name] = entry
        return entry

    def names(self) -> tuple[str, ...]:
        """Every registered name, in registration order."""
        return tuple(self._entries)

    def get(self, name: str) -> T:
        """The entry for ``name``; an unknown name is a bad flag naming the choices."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise BadFlagError(
                f"`{self.flag}` got {name!r}; choose one of: {', '.join(self._entries)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def items(self) -> Iterator[tuple[str, T]]:
        return iter(self._entries.items())

    def values(self) -> Iterator[T]:
        return iter(self._entries.values())
