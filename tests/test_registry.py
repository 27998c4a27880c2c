"""ches_filter.registry: one registry per concept; a duplicate name is a bug, an unknown one a flag error."""

from __future__ import annotations

import pytest

from ches_filter.errors import BadFlagError
from ches_filter.registry import Registry


def test_registry_refuses_duplicates_and_names_choices():
    reg: Registry[int] = Registry("thing", "--thing")
    reg.register("a", 1)
    with pytest.raises(RuntimeError):
        reg.register("a", 2)
    with pytest.raises(BadFlagError, match=r"`--thing` got 'b'; choose one of: a"):
        reg.get("b")
