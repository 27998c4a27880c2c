"""The fast tier (`pytest -m "not slow"`): its guard refuses unmarked tests that load a real model or start a subprocess."""

from __future__ import annotations

from pathlib import Path

import pytest


from conftest import fast_tier

pytest_plugins = ("pytester",)

CONFTEST = Path(__file__).with_name("conftest.py")


# --------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------


class _Config:
    def __init__(self, markexpr):
        self.markexpr = markexpr

    def getoption(self, name, default=None):
        assert name == "markexpr"
        return self.markexpr


@pytest.mark.parametrize(
    "markexpr, fast",
    [("not slow", True), ("", False), (None, False), ("slow", False), ("not slow and not gpu", True),
     ("slow or not slow", False), ("gpu", True), ("not (slow or gpu)", True)],
)
def test_fast_tier_reads_the_mark_expression(markexpr, fast):
    """Fast means: a test marked only `slow` would be deselected."""
    assert fast_tier(_Config(markexpr)) is fast


INNER_TESTS = '''
import subprocess
import sys

import pytest


def test_asks_for_the_embedded_fixture(embedded):
    pass


def test_loads_the_embedded_model():
    from ches_filter.model import load_model

    load_model(None, dtype="float32", device="cpu")


def test_starts_a_subprocess():
    subprocess.run([sys.executable, "-c", "pass"], check=True)


def test_swallows_the_refusal():
    try:
        subprocess.run([sys.executable, "-c", "pass"])
    except BaseException:
        pass


def test_tiny_model_is_fine(tiny_model_dir):
    from ches_filter.model import load_model

    assert load_model(str(tiny_model_dir), dtype="float32", device="cpu").decoder.config.num_hidden_layers == 2


@pytest.mark.slow
def test_marked_slow_is_deselected():
    subprocess.run([sys.executable, "-c", "pass"], check=True)
'''


def test_guard_fails_unmarked_tests_that_load_a_real_model_or_start_a_subprocess(pytester, tiny_model_dir):
    pytester.makeconftest(CONFTEST.read_text(encoding="utf-8") + f'''

@pytest.fixture(scope="session")
def tiny_model_dir():
    return {str(tiny_model_dir)!r}
''')
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-m", "not slow", "-p", "no:cacheprovider", "-q")
    outcomes = result.parseoutcomes()
    assert outcomes.get("passed") == 1 and outcomes.get("failed") == 3, result.stdout.str()
    assert outcomes.get("errors", outcomes.get("error")) == 1 and outcomes.get("deselected") == 1, result.stdout.str()
    text = result.stdout.str()
    assert "uses the real-model fixture embedded" in text
    assert "loads the real model" in text and "SmolLM2" in text
    assert "starts a subprocess" in text
    assert "caught by the code under test" in text
    # Without `-m "not slow"` the guard stands aside (the same tests would run for real: run only the safe one).
    plain = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q", "-k", "tiny_model_is_fine")
    assert plain.parseoutcomes().get("passed") == 1
