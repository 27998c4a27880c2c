"""Shared fixtures: real data paths, tiny random models built in code, the embedded model."""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import traceback
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
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


GOLDEN = REPO / "tests" / "golden" / "hh300_scores.parquet"
#: Three HH-RLHF-shaped pairs, one with non-ASCII text.
THREE_HH_PAIRS = [
    {"chosen": "Human: hi\n\nAssistant: hello", "rejected": "Human: hi\n\nAssistant: go away"},
    {"chosen": "Human: café?\n\nAssistant: oui", "rejected": "Human: café?\n\nAssistant: non"},
    {"chosen": "Human: 2+2\n\nAssistant: 4", "rejected": "Human: 2+2\n\nAssistant: 5"},
]
#: One HH-RLHF transcript pair.
HH_PAIR = {"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go away"}

#: Six minimal pairs p0..p5 / c0..c5 / r0..r5.
PAIRS = [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}"} for i in range(6)]
#: Five small pairs: four ordinary, one with identical responses (status `identical_responses`).
FIVE_PAIRS = [
    {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5, I believe."},
    {"prompt": "Describe a zebra.", "chosen": "Striped, like a barcode.", "rejected": "Purple."},
    {"prompt": "Say hi.", "chosen": "Hi there!", "rejected": "Hello, friend, how are you today?"},
    {"prompt": "Name a colour.", "chosen": "Blue", "rejected": "Blue"},  # identical responses
    {"prompt": "Count to three.", "chosen": "1, 2, 3.", "rejected": "3, 2, 1."},
]


def invoke(*args, env=None):
    """Run the CLI in process; an uncaught exception propagates (a traceback is a test failure, never an exit code)."""
    from click.testing import CliRunner

    from ches_filter.cli import main

    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False, env=env)


def error_lines(result) -> list[str]:
    """The ``Error:`` lines of a CLI result."""
    return [line for line in result.output.splitlines() if line.startswith("Error:")]


def write_jsonl(path, rows):
    """Write ``rows`` as JSON lines (UTF-8, non-ASCII kept) and return ``path``."""
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


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


@pytest.fixture(scope="session")
def tiny(tiny_model_dir):
    """``tiny_model_dir`` loaded the way the CLI loads a model (float32, CPU)."""
    from ches_filter.model import load_model

    return load_model(str(tiny_model_dir), dtype="float32", device="cpu")


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
# Helpers shared by the test files
# --------------------------------------------------------------------------


def rows_of(ds) -> list[dict]:
    """A dataset's rows as plain dicts."""
    return [dict(r) for r in ds]


def listing(directory: Path) -> list[str]:
    """The sorted names in ``directory``."""
    return sorted(p.name for p in directory.iterdir())


def example_rows(n, start=0):
    """``n`` rows of the shipped example slice from row ``start``."""
    return [json.loads(x) for x in EXAMPLE_HH.read_text(encoding="utf-8").splitlines()[start:start + n]]


def write_bytes(path, payload: bytes):
    """Write raw bytes (for broken encodings and cut files) and return ``path``."""
    path.write_bytes(payload)
    return path


def write_lines(path, lines) -> None:
    """Write text lines exactly as given (line endings included)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(lines)


def snapshot(root):
    """Every file and link under ``root`` (hidden ones too): size, mtime and content hash."""
    state = {}
    for base, dirs, files in os.walk(root):
        for name in dirs + files:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, root)
            if os.path.islink(path):
                state[rel] = ("link", os.readlink(path))
            elif os.path.isfile(path):
                st = os.stat(path)
                with open(path, "rb") as handle:
                    digest = hashlib.sha256(handle.read()).hexdigest()
                state[rel] = (st.st_size, st.st_mtime_ns, digest)
            else:
                state[rel] = ("dir",)
    return state


def one_error_line(result) -> str:
    """The single error line of a CLI result (no traceback); fails the test otherwise."""
    lines = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(lines) == 1, result.output
    assert "Traceback" not in result.output, result.output
    return lines[0]


def assert_refused(result, code, *needles, out=None):
    """Exit ``code`` with one ``Error:`` line holding every needle, no traceback, no output written."""
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        pytest.fail("uncaught " + "".join(traceback.format_exception(result.exception)))
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    for needle in needles:
        assert needle in errors[0], errors[0]
    if out is not None:
        assert not os.path.lexists(out), "a refused run wrote its output"
        assert not os.path.lexists(str(out) + ".parts"), "a refused run left a work directory"
    return errors[0]


def run_score(data_path, out, model_dir, *extra):
    """`score` in process, exceptions caught (for :func:`check_outcome`), parts of 3 rows."""
    from click.testing import CliRunner

    from ches_filter.cli import main

    args = ["score", str(data_path), "-o", str(out), "--model", str(model_dir), "-q", "--checkpoint-every", "3", *extra]
    return CliRunner().invoke(main, args, catch_exceptions=True)


def check_outcome(result, data_path, out, expected_rows):
    """Exit 0 with every row accounted for, or exit 1 with one error naming the file."""
    from ches_filter.scoring import SCORE_STATUSES

    if result.exception is not None and not isinstance(result.exception, SystemExit):
        detail = "".join(traceback.format_exception(result.exception))
        pytest.fail(f"uncaught {type(result.exception).__name__}:\n{detail}")
    assert "Traceback" not in result.output
    if result.exit_code == 0:
        table = pq.read_table(out)
        assert table.num_rows == expected_rows, "a row went missing"
        assert table.column("row_index").to_pylist() == list(range(expected_rows))
        for status, ches, ln_ches in zip(*(table.column(c).to_pylist() for c in ("status", "ches", "ln_ches"))):
            assert status in SCORE_STATUSES
            if status in ("ok", "identical_responses"):  # identical responses score exactly 0
                assert math.isfinite(ches) and math.isfinite(ln_ches)
            else:
                assert ches is None and ln_ches is None
        return "scored"
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.output
    assert os.path.basename(data_path) in errors[0], errors[0]
    assert not os.path.exists(out), "a failed run left an output behind"
    return "refused"


def make_scores(data, out, **config):
    """A score file for ``data`` that prune accepts: the real input fingerprint, made-up scores (rank = row)."""
    from ches_filter import scorefile
    from ches_filter.config import ScoreConfig
    from ches_filter.inputs import input_fingerprint, load_input

    ds, layout, columns = load_input(str(data), ScoreConfig(**config))
    n = len(ds)
    table = pa.table({
        "row_index": pa.array(range(n), pa.int64()),
        "ches": [float(i) * 1.1 for i in range(n)],
        "ln_ches": [0.1 + i / 7 for i in range(n)],
        "status": ["ok"] * n,
    })
    meta = {
        "input_fingerprint": input_fingerprint(ds, layout, columns),
        "columns": {"prompt": columns.prompt, "chosen": columns.chosen, "rejected": columns.rejected, "id": columns.id},
        "input_format": layout,
        "num_rows": n,
    }
    scorefile.write_table(table, str(out), metadata=meta, overwrite=True)
    return out


def tiny_causal_llama(dtype=None, vocab=96, seed=0):
    """A 2-layer random Llama with its LM head (float32 unless ``dtype``), in eval mode."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    )).to(dtype or torch.float32).eval()


def tiny_gpt2(vocab: int, dropout: float = 0.1, seed: int = 0):
    """A 2-layer random GPT-2 with dropout everywhere (embeddings, attention, residuals)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab, n_embd=32, n_layer=2, n_head=2, n_positions=4096, resid_pdrop=dropout,
                        embd_pdrop=dropout, attn_pdrop=dropout, bos_token_id=0, eos_token_id=0)
    lm = GPT2LMHeadModel(config)
    lm.config._attn_implementation = "sdpa"
    return lm


def pairs_of(n, seed, prompt=(3, 12), response=(1, 8)):
    """``n`` random encoded pairs (ids 4..255, responses ending in EOS id 2)."""
    import torch

    from ches_filter.batching import EncodedPair

    g = torch.Generator().manual_seed(seed)

    def ids(lo, hi):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        return tuple(torch.randint(4, 256, (length,), generator=g).tolist())

    return [EncodedPair(ids(*prompt), ids(*response) + (2,), ids(*response) + (2,)) for _ in range(n)]


def cli_choices(command, option):
    """The values the CLI accepts for ``command --option``."""
    from ches_filter.cli import main

    for param in main.commands[command].params:
        if param.name == option:
            return list(param.type.choices)
    raise AssertionError(f"{command} has no --{option}")


@pytest.fixture(scope="module")
def scored_without_ches(tmp_path_factory, tiny_model_dir):
    """A score file made with `--measures last_hidden_ip,edit_distance`, and its input."""
    folder = tmp_path_factory.mktemp("no-ches")
    data = write_jsonl(folder / "d.jsonl", FIVE_PAIRS)
    scores = folder / "s.parquet"
    result = invoke("score", data, "-o", scores, "--model", tiny_model_dir, "--measures", "last_hidden_ip,edit_distance", "-q")
    assert result.exit_code == 0, result.output
    assert not {"ches", "ln_ches"} & set(pq.read_table(scores).column_names)
    return data, scores


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


def random_pairs(n, seed=1, vocab=96):
    """Up to six encoded pairs of fixed shapes with random ids below ``vocab``."""
    import torch

    from ches_filter.batching import EncodedPair

    gen = torch.Generator().manual_seed(seed)

    def draw(k):
        return tuple(torch.randint(4, vocab, (k,), generator=gen).tolist())

    # Prompts longer than the window, responses of different lengths, one response that is only its final token.
    shapes = [(20, 7, 3), (5, 12, 9), (13, 1, 4), (30, 9, 15), (9, 4, 4), (17, 2, 11)]
    return [EncodedPair(draw(p), draw(c), draw(r)) for p, c, r in shapes[:n]]
