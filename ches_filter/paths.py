"""Path rules: which outputs are allowed, before anything is written.

:func:`check_paths` refuses an output that is an input, lies inside one, holds
one, matches an input glob, is named twice, exists without ``--overwrite``, or
is a directory holding files ches-filter did not write; :func:`output_kind`
says how a path is written; :func:`check_name` refuses names no tool can
reopen. Also the input suffixes and the Hub-id rule that :mod:`sources` reads with.
"""

from __future__ import annotations

import fnmatch
import glob
import os
import re
from collections.abc import Iterable, Mapping
from typing import Any, Callable

from .errors import BadFlagError, reason


JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
INPUT_SUFFIXES = JSON_SUFFIXES + (".parquet", ".csv")
INPUT_HELP = (
    "`.jsonl`, `.json`, `.jsonl.gz`, `.json.gz`, `.parquet`, `.csv`, a directory of "
    "such files (one kind), a glob such as `data/*.parquet`, a `save_to_disk` directory, "
    "or a Hub dataset id `owner/name`"
)
OUTPUT_HELP = (
    "`.parquet`, `.jsonl`, `.csv`, or a path without an extension (written as a "
    "`save_to_disk` directory)"
)
# A Hub id is `owner/name`: one slash, no leading dot or slash. Dots are
# allowed in names (`teknium/OpenHermes-2.5`), so only data-file suffixes rule
# a string out.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
_DATA_FILE_SUFFIXES = INPUT_SUFFIXES + (".gz", ".arrow", ".txt", ".tsv", ".zip")
GLOB_CHARS = frozenset("*?[")


def shown_path(path: str) -> str:
    """``path`` as text that can be printed and stored: a byte that is not UTF-8 as ``\\xff``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def check_name(path: str, what: str = "") -> None:
    """Refuses a path that is not valid UTF-8 (``bad\\xff.jsonl``, or any name in a directory whose name is such).

    Python holds such a byte as a lone surrogate: the file can be opened, but
    its name cannot be written into JSON or Parquet metadata, and pyarrow cannot
    open it. Refused up front, before anything is written. The absolute path is
    checked: work files are written under it.

    Raises:
        BadFlagError: naming the path with the byte shown as ``\\xNN``.
    """
    path = os.fsdecode(path)
    full = os.path.abspath(path)
    try:
        full.encode("utf-8")
    except UnicodeEncodeError:
        try:
            path.encode("utf-8")
            where = f"{path} lies in a directory whose name ({shown_path(os.path.dirname(full))}) is"
        except UnicodeEncodeError:
            where = f"{shown_path(path)} has a name that is"
        raise BadFlagError(
            f"{what + ' ' if what else ''}{where} not valid UTF-8; ches-filter records file names in its outputs' "
            "metadata and pyarrow opens only UTF-8 paths, so rename it (or link it under a UTF-8 name) and pass that name."
        ) from None


def looks_like_hub_id(source: str) -> bool:
    return bool(_HUB_ID.match(source)) and not source.lower().endswith(_DATA_FILE_SUFFIXES)


def output_kind(path: str, flag: str = "--output") -> str:
    """Returns how :func:`write_dataset` would write ``path``.

    Returns:
        "parquet", "jsonl" or "disk" (a ``save_to_disk`` directory).

    Raises:
        BadFlagError: The extension is not one write_dataset supports.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        return "disk"
    ext = os.path.splitext(os.path.basename(os.path.normpath(path)))[1].lower()
    if ext == ".parquet":
        return "parquet"
    if ext == ".jsonl":
        return "jsonl"
    if ext == ".csv":
        return "csv"
    if ext == "":
        return "disk"
    raise BadFlagError(
        f"`{flag}` {path} has the unsupported extension `{ext}`; use {OUTPUT_HELP}."
    )


def check_output_path(output: str, *, inputs: list[str], overwrite: bool, flag: str = "--output") -> None:
    """Refuses one output that would clobber an input or an existing file (see :func:`check_paths`).

    Args:
        output: Where results will be written.
        inputs: Input sources (files, directories, globs or Hub ids).
        overwrite: Whether an existing ``output`` may be replaced.
        flag: The option that named ``output``, for the message.
    """
    check_paths({flag: output}, [(None, source) for source in inputs], overwrite=overwrite)


def _named(paths: Any) -> list[tuple[str | None, str]]:
    items = paths.items() if hasattr(paths, "items") else paths
    return [(name, os.fspath(path)) for name, path in items if path is not None]


def _flag(name: str | None) -> str:
    return f"`{name}` " if name else ""


#: The files of one ``save_to_disk`` dataset: all that :func:`write_dataset` leaves in a directory.
_SAVED_FILE = re.compile(r"^(data-\d{5}-of-\d{5}\.arrow|dataset_info\.json|state\.json)$")


def foreign_files(path: str, ours: Callable[[str], bool], prefix: str = "") -> list[str]:
    """Entries of the directory ``path`` other than regular files whose name ``ours`` accepts (a directory with a slash)."""
    foreign = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            foreign.append(prefix + name + "/")
        elif os.path.islink(full) or not ours(name):
            foreign.append(prefix + name)
    return foreign


def foreign_to_dataset(path: str) -> list[str]:
    """What the directory ``path`` holds besides a dataset :func:`write_dataset` saved there.

    A dataset's ``data-NNNNN-of-NNNNN.arrow``, ``dataset_info.json`` and
    ``state.json``; a DatasetDict's ``dataset_dict.json`` and one such
    directory per split. Anything else (hidden files, links and the user's
    notes too) is listed, as paths relative to ``path``.
    """
    if not os.path.isfile(os.path.join(path, "dataset_dict.json")):
        return foreign_files(path, _SAVED_FILE.match)
    foreign = []
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isdir(full) and not os.path.islink(full):
            foreign += foreign_files(full, _SAVED_FILE.match, name + "/")
        elif name != "dataset_dict.json" or os.path.islink(full):
            foreign.append(name)
    return foreign


def _check_replaceable(name: str | None, path: str, foreign_of: Callable[[str], list[str]]) -> None:
    """Refuses to replace the directory ``path`` when it holds anything ches-filter did not write there."""
    try:
        foreign = foreign_of(path)
    except OSError as exc:
        raise BadFlagError(
            f"{_flag(name)}{path} is a directory that cannot be listed ({reason(exc)}); ches-filter replaces a "
            f"directory only when it holds nothing but its own output: choose another {_flag(name).strip() or 'output'}."
        ) from None
    if foreign:
        shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
        raise BadFlagError(
            f"{_flag(name)}{path} is a directory that holds files ches-filter did not write ({shown}); `--overwrite` "
            f"would delete them, so it replaces only what ches-filter wrote there: move them out or choose another "
            f"{_flag(name).strip() or 'output'}."
        )


def check_paths(
    outputs: Any,
    inputs: Any = (),
    *,
    overwrite: bool,
    may_exist: Iterable[str] = (),
    foreign: Mapping[str, Callable[[str], list[str]]] | None = None,
) -> None:
    """Refuses, before anything is written, outputs that clash with each other or with an input.

    Every output is compared with every other output and with every input by
    resolved identity: ``os.path.realpath`` (symbolic links, ``./x``,
    ``d/../x``, trailing slashes, relative against absolute) and, where both
    exist, the same device and inode (hard links). A path that lies inside
    another (a directory output holding the other output or an input, or an
    output inside an input directory) clashes too, since replacing or adding
    to the directory would change the other.

    Args:
        outputs: ``{flag: path}`` (or ``(flag, path)`` pairs) of what will be
            written, e.g. ``{"--output": ..., "--rejects": ..., "--work-dir": ...}``;
            ``None`` paths are skipped.
        inputs: ``{name: source}`` (or pairs; a name may be None) of what is
            read: files, directories, globs or Hub ids (the latter never clash),
            e.g. ``{"INPUT": ..., "--scores": ...}``.
        overwrite: Whether existing outputs may be replaced.
        may_exist: Output flags whose existing path is expected (a work
            directory to resume); they skip the "exists" check.
        foreign: ``{flag: function}`` listing what an existing directory at
            that output holds besides this command's own output (default
            :func:`foreign_to_dataset`). An output replaced with ``overwrite``
            that is such a directory (not a link to one) must hold nothing
            else: the user's files in it are never deleted.

    Raises:
        BadFlagError: naming both flags of a clash, or the flag of an output
            that exists without ``overwrite`` or whose directory is missing.
    """
    outs = _named(outputs)
    for name, path in outs:
        if not os.fspath(path):
            raise BadFlagError(f"{_flag(name) or 'the output '}is an empty path; give the path to write.")
    for name, path in outs + _named(inputs):
        check_name(path, _flag(name).strip())
    ins = [(name, local) for name, source in _named(inputs) for local in _local_paths(source)]
    may_exist = set(may_exist)
    check_not_matched(outs, inputs)
    # Inputs first: clobbering what is read is the worse outcome, so name it even when outputs clash too.
    _check_outputs_spare_inputs(outs, ins)
    _check_outputs_apart(outs)
    for name, path in outs:
        if name not in may_exist:
            _check_replaceable_output(name, path, overwrite, (foreign or {}).get(name, foreign_to_dataset))
        _check_parent(name, path)


def _check_outputs_spare_inputs(outs: list[tuple[str | None, str]], ins: list[tuple[str | None, str]]) -> None:
    """Refuses an output that is an input, lies inside an input directory, or is a directory holding an input."""
    for name, path in outs:
        for in_name, source in ins:
            clash = _clash(path, source)
            what = f"the input {_flag(in_name)}{source}"
            if clash == "same":
                raise BadFlagError(
                    f"{_flag(name)}{path} is the same path as {what}{_how(path, source)}; choose a different "
                    f"{_flag(name) or 'output '}so the input is not overwritten."
                )
            if clash == "inside":
                raise BadFlagError(
                    f"{_flag(name)}{path} lies inside the input directory {_flag(in_name)}{source}; choose "
                    f"{_flag(name) or 'an output '}outside it so the input is not modified."
                )
            if clash == "holds":
                # Replacing the output directory would delete the input with it.
                raise BadFlagError(
                    f"{_flag(name)}{path} is a directory that contains {what}; choose a different "
                    f"{_flag(name).strip() or 'output'}."
                )


def _check_outputs_apart(outs: list[tuple[str | None, str]]) -> None:
    """Refuses two outputs that are one file, or one lying inside the other."""
    for i, (name, path) in enumerate(outs):
        for other_name, other in outs[:i]:
            clash = _clash(path, other)
            if clash == "same":
                raise BadFlagError(
                    f"{_flag(other_name)}{other} and {_flag(name)}{path} are the same file{_how(path, other)}; "
                    f"give {_flag(name) or 'them '}a different path so one result does not overwrite the other."
                )
            if clash:
                inner, outer = (name, path), (other_name, other)
                if clash == "holds":
                    inner, outer = outer, inner
                raise BadFlagError(
                    f"{_flag(inner[0])}{inner[1]} lies inside {_flag(outer[0])}{outer[1]}; writing one would "
                    f"change the other, so give {_flag(name) or 'them '}a path outside it."
                )


def _check_replaceable_output(name: str | None, path: str, overwrite: bool,
                              foreign_of: Callable[[str], list[str]]) -> None:
    """Refuses an existing output without ``overwrite``, and a directory output holding what ches-filter did not write."""
    if os.path.lexists(path) and not overwrite:
        raise BadFlagError(f"{_flag(name)}{path} exists; pass `--overwrite` to replace it.")
    # What is replaced is the path as atomic_paths spells it: `dir/`, `./dir` and `d/../dir` are the directory,
    # a symbolic link is itself (what it points at stays).
    target = os.path.abspath(path)
    if os.path.isdir(target) and not os.path.islink(target):
        _check_replaceable(name, path, foreign_of)


def _check_parent(name: str | None, path: str) -> None:
    """Refuses an output whose directory does not exist, as resolved or as spelled."""
    parent = os.path.dirname(os.path.abspath(path))
    # As spelled too: `missing/../out` normalises to an existing parent, but
    # creating it (os.makedirs) would first create `missing/`.
    spelled = os.path.dirname(os.fspath(path).rstrip(os.sep)) or os.curdir
    if not os.path.isdir(spelled):
        parent = spelled
    if not os.path.isdir(parent):
        raise BadFlagError(
            f"the directory {parent} for {_flag(name)}{path} does not exist; create it "
            f"first or choose another {_flag(name).strip() or 'output'}."
        )


def check_not_matched(outputs: Any, inputs: Any) -> None:
    """Refuses an output that an input glob matches (the next run would read it as input).

    Args:
        outputs: ``{flag: path}`` or ``(flag, path)`` pairs, as for :func:`check_paths`;
            also the files a directory output will hold, which :func:`check_paths`
            cannot list.
        inputs: ``{name: source}`` or pairs; sources that exist or hold no glob
            character are skipped.
    """
    for in_name, source in _named(inputs):
        if not os.path.lexists(source) and GLOB_CHARS & set(source):
            for name, path in _named(outputs):
                # fnmatch's `*` also matches `/`: it may refuse a little more than glob would read, never less.
                if fnmatch.fnmatchcase(os.path.abspath(path), os.path.abspath(source)) or fnmatch.fnmatchcase(
                    os.path.realpath(path), os.path.realpath(os.path.dirname(source)) + os.sep + os.path.basename(source)
                ):
                    raise BadFlagError(
                        f"{_flag(name)}{path} matches the input pattern {_flag(in_name)}{source}, so the next run "
                        f"would read it as input; choose {_flag(name) or 'an output '}that the pattern does not match."
                    )


def _clash(path: str, other: str) -> str | None:
    """``"same"``, ``"inside"`` (path lies in other), ``"holds"`` (other lies in path) or None."""
    real, other_real = os.path.realpath(path), os.path.realpath(other)
    if real == other_real:
        return "same"
    try:
        if os.path.exists(path) and os.path.exists(other) and os.path.samefile(path, other):
            return "same"  # hard links, bind mounts, case-insensitive file systems
    except OSError:
        pass
    if _is_within(real, other_real):
        return "inside"
    if _is_within(other_real, real):
        return "holds"
    return None


def _how(path: str, other: str) -> str:
    if os.path.realpath(path) != os.path.realpath(other):
        return " (hard links to one file)"
    if os.path.islink(path) or os.path.islink(other) or os.path.realpath(path) != os.path.abspath(path) or (
        os.path.realpath(other) != os.path.abspath(other)
    ):
        return f" (both resolve to {os.path.realpath(path)})"
    if path != other:
        return f" (both are {os.path.abspath(path)})"
    return ""


def _local_paths(source: str) -> list[str]:
    if os.path.lexists(source):
        return [source]
    if GLOB_CHARS & set(source):
        return glob.glob(source, recursive=True)
    return []  # a Hub id cannot collide with a local output


def _is_within(path: str, directory: str) -> bool:
    try:
        return os.path.commonpath([path, directory]) == directory
    except ValueError:  # different drives on Windows
        return False
