"""Shared fixtures: real data paths, tiny random models built in code, the embedded model."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
HH_FILE = SHARED_DATA / "hh-rlhf-harmless-base-test.dev.jsonl.gz"
EXAMPLE_HH = REPO / "examples" / "data" / "hh_rlhf_harmless_300.jsonl"


def read_hh(n: int | None = None) -> list[dict]:
    """First ``n`` HH-RLHF rows: ../shared/data when present, else the shipped example slice."""
    if HH_FILE.exists():
        with gzip.open(HH_FILE, "rt", encoding="utf-8") as handle:
            rows = [json.loads(line) for line in handle]
    else:
        rows = [json.loads(line) for line in EXAMPLE_HH.read_text(encoding="utf-8").splitlines()]
    return rows[:n] if n is not None else rows


@pytest.fixture(scope="session")
def hh_rows() -> list[dict]:
    return read_hh()


def tiny_llama(**overrides):
    """A 2-layer random Llama (float32, eval mode); deterministic weights."""
    import torch
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, attn_implementation="sdpa",
    )
    config.update(overrides)
    attn = config.pop("attn_implementation")
    model = LlamaModel(LlamaConfig(**config))
    model.config._attn_implementation = attn
    return model.eval()


def tiny_gemma3(**overrides):
    """A 4-layer random Gemma-3 text model with a short sliding window (sliding and full layers)."""
    import torch
    from transformers import Gemma3TextConfig, Gemma3TextModel

    torch.manual_seed(0)
    config = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=512, sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "sliding_attention", "full_attention"],
    )
    config.update(overrides)
    attn = config.pop("attn_implementation", "sdpa")
    model = Gemma3TextModel(Gemma3TextConfig(**config))
    model.config._attn_implementation = attn
    return model.eval()


@pytest.fixture(scope="session")
def embedded():
    """The real embedded SmolLM2-135M-Instruct in float32 on CPU (converted once, then cached)."""
    from ches_filter.model import load_model

    return load_model(None, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def embedded_tokenizer():
    """The embedded model's tokenizer alone: no weights are read or converted, so the fast tier may use it.

    From the converted checkpoint's directory when a run already cached it (~0.3 s), else straight from
    the GGUF's metadata (~10 s, still no weights).
    """
    from transformers import AutoTokenizer

    from ches_filter import model as model_mod

    gguf = model_mod.default_model_path()
    cached = model_mod.cache_root() / "models" / f"{gguf.stem}-{model_mod.file_sha256(gguf)[:16]}"
    if (cached / "tokenizer_config.json").exists():
        return AutoTokenizer.from_pretrained(cached)
    return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, embedded_tokenizer):
    """A from_pretrained directory: the embedded tokenizer + a tiny random Llama with its vocabulary."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = embedded_tokenizer
    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(autouse=True)
def _reset_cli_logging():
    """The CLI installs its own handler and stops propagation; undo it so caplog sees records."""
    import logging

    yield
    log = logging.getLogger("ches_filter")
    log.handlers[:] = []
    log.propagate = True
    log.setLevel(logging.NOTSET)


# --------------------------------------------------------------------------
# The fast tier: `pytest -m "not slow"` loads no real model and starts no subprocess.
# --------------------------------------------------------------------------

#: Fixtures that hold a real model; an unmarked test may not ask for them.
REAL_MODEL_FIXTURES = ("embedded",)
#: A model with more parameters than this is a real one (the tiny test models have about 1.6 M).
REAL_MODEL_PARAMETERS = 20_000_000


def fast_tier(config) -> bool:
    """True when the run's ``-m`` expression deselects tests marked ``slow``."""
    markexpr = config.getoption("markexpr", default="") or ""
    if not markexpr.strip():
        return False
    try:  # pytest's own evaluator (private): a test marked only `slow` would be deselected
        from _pytest.mark.expression import Expression

        return not Expression.compile(markexpr).evaluate(lambda name, **kwargs: name == "slow")
    except (ImportError, AttributeError, TypeError):
        return "not slow" in " ".join(markexpr.split())


def _is_slow(item) -> bool:
    return item.get_closest_marker("slow") is not None


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Refuse, before any fixture loads it, an unmarked test that asks for a real-model fixture."""
    if not fast_tier(item.config) or _is_slow(item):
        return
    wanted = [name for name in REAL_MODEL_FIXTURES if name in getattr(item, "fixturenames", ())]
    if wanted:
        pytest.fail(
            f"fast tier: {item.nodeid} uses the real-model fixture {', '.join(wanted)} but is not marked "
            "`@pytest.mark.slow`; mark it, or use a tiny model (tiny_llama, tiny_model_dir, embedded_tokenizer)",
            pytrace=False,
        )


def _caller_in_repo() -> str | None:
    """The first frame outside the subprocess module that started a process, if it is this repository's code."""
    import sys

    frame = sys._getframe(2)
    while frame is not None and frame.f_code.co_filename.endswith(("subprocess.py", "conftest.py")):
        frame = frame.f_back
    if frame is None:
        return None
    filename = os.path.realpath(frame.f_code.co_filename)
    return f"{filename}:{frame.f_lineno}" if filename.startswith(str(REPO) + os.sep) else None


@pytest.fixture(autouse=True)
def _fast_tier_guard(request, monkeypatch):
    """Under ``-m "not slow"``, fail an unmarked test that loads a real model or starts a subprocess.

    Loading means: a GGUF checkpoint (the embedded SmolLM2 or Gemma) reaching
    :func:`ches_filter.model.cached_gguf_checkpoint`, or any ``from_pretrained``
    that returns a model over :data:`REAL_MODEL_PARAMETERS` parameters. A
    process started by this repository's code (tests or package) through
    :class:`subprocess.Popen` counts; one a third-party library starts for
    itself (a font cache, a compiler probe) does not. The error is raised
    where it happens; a test that passes anyway (the code under test caught
    it) is turned into a failure by :func:`pytest_runtest_makereport`.
    """
    if not fast_tier(request.config) or _is_slow(request.node):
        yield
        return
    import subprocess

    from transformers import PreTrainedModel

    from ches_filter import model as model_mod

    violations: list[str] = []
    where = request.node.nodeid

    def refuse(what: str):
        message = (
            f"fast tier: {where} {what}, but is not marked `@pytest.mark.slow`; mark it slow, or use a tiny model "
            "(tiny_llama, tiny_gemma3, tiny_model_dir)"
        )
        violations.append(message)
        return pytest.fail.Exception(message, pytrace=False)

    original_gguf = model_mod.cached_gguf_checkpoint

    def no_gguf(gguf, *args, **kwargs):
        # A real model's GGUF is tens of MB; a few-KB file is a hostile test's truncated copy,
        # which the code under test must refuse without leaving anything in the cache.
        try:
            size = os.path.getsize(gguf)
        except OSError:
            size = 0
        if size > 1_000_000:
            raise refuse(f"loads the real model {gguf}")
        return original_gguf(gguf, *args, **kwargs)

    original_from_pretrained = PreTrainedModel.from_pretrained.__func__

    def small_from_pretrained(cls, *args, **kwargs):
        if kwargs.get("gguf_file"):
            raise refuse(f"loads the GGUF model {kwargs['gguf_file']}")
        model = original_from_pretrained(cls, *args, **kwargs)
        count = sum(p.numel() for p in model.parameters())
        if count > REAL_MODEL_PARAMETERS:
            raise refuse(f"loads a real model ({count / 1e6:.0f} M parameters from {args[0] if args else kwargs})")
        return model

    original_popen_init = subprocess.Popen.__init__

    def popen_init(self, args, *rest, **kwargs):
        caller = _caller_in_repo()
        if caller is not None:
            raise refuse(f"starts a subprocess ({args!r} from {caller})")
        original_popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(model_mod, "cached_gguf_checkpoint", no_gguf)
    monkeypatch.setattr(PreTrainedModel, "from_pretrained", classmethod(small_from_pretrained))
    monkeypatch.setattr(subprocess.Popen, "__init__", popen_init)
    request.node._fast_tier_violations = violations
    yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """A test that passed although the guard refused something (the code under test caught it) fails."""
    report = yield
    violations = getattr(item, "_fast_tier_violations", None)
    if call.when == "call" and violations and report.passed:
        report.outcome = "failed"
        report.longrepr = violations[0] + " (the error was caught by the code under test)"
    return report
