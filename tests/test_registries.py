"""The CLI's choices are the registries' names, and every registered entry is usable."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest

from ches_filter.batching import TOKEN_LAYOUTS
from ches_filter.cli import main
from ches_filter.errors import BadFlagError
from ches_filter.formats import LAYOUTS
from ches_filter.measures import MEASURES, MeasureInput, compute_measures, risk_key
from ches_filter.registry import Registry
from ches_filter.strategies import ENGINE_CHOICES, STRATEGIES


def _choices(command: str, option: str) -> tuple[str, ...]:
    for param in main.commands[command].params:
        if f"--{option}" in param.opts:
            assert isinstance(param.type, click.Choice), (command, option)
            return tuple(param.type.choices)
    raise AssertionError(f"{command} has no --{option}")


@pytest.mark.parametrize("command", ["score", "prune", "displacement"])
def test_scoring_choices_are_the_registries(command):
    assert _choices(command, "input-format") == LAYOUTS.names()
    assert _choices(command, "layout") == TOKEN_LAYOUTS.names()
    assert _choices(command, "engine") == ("auto",) + STRATEGIES.names() == ENGINE_CHOICES


@pytest.mark.parametrize("command", ["prune", "report"])
def test_by_accepts_every_measure(command):
    assert _choices(command, "by") == MEASURES.names()


def test_measures_help_lists_every_measure():
    option = next(p for p in main.commands["score"].params if "--measures" in p.opts)
    for name in MEASURES.names():
        assert name in option.help


def test_registry_refuses_duplicates_and_names_choices():
    reg: Registry[int] = Registry("thing", "--thing")
    reg.register("a", 1)
    with pytest.raises(RuntimeError):
        reg.register("a", 2)
    with pytest.raises(BadFlagError, match=r"`--thing` got 'b'; choose one of: a"):
        reg.get("b")


def test_risk_direction():
    assert risk_key("ches", 2.0) > risk_key("ches", 1.0)
    assert risk_key("edit_distance", 0.1) > risk_key("edit_distance", 0.9)  # more similar = riskier
    assert [m for m in MEASURES.names() if not MEASURES.get(m).higher_is_riskier] == ["edit_distance"]


def test_every_measure_computes_from_states():
    import torch

    class States:
        s_chosen = torch.tensor([[1.0, 2.0], [0.5, 0.0]])
        s_rejected = torch.tensor([[1.0, 2.0], [0.0, 1.0]])
        last_chosen = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
        last_rejected = torch.tensor([[2.0, 0.0], [1.0, -1.0]])

    x = MeasureInput(chosen=[(1, 2), (3,)], rejected=[(1, 2), (4, 5)], states=States())
    out = compute_measures(MEASURES.names(), x)
    assert out["ches"] == [0.0, -0.25]  # <S+, S- - S+>
    assert out["ln_ches"] == pytest.approx([0.0, 0.5 * (0.0 - 0.5)])  # m+ = (.5, 0), m- = (0, .5)
    assert out["last_hidden_ip"] == [2.0, 0.0]
    assert out["edit_distance"] == [0.0, 1.0]


@pytest.mark.slow  # a subprocess
def test_cli_and_registries_import_no_torch():
    code = (
        "import sys, ches_filter.cli, ches_filter.measures, ches_filter.formats, ches_filter.strategies, "
        "ches_filter.batching, ches_filter.config; "
        "print(sorted(m for m in ('torch', 'transformers', 'datasets') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
