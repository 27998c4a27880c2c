"""Command line: parses flags, builds configs, calls the library. Nothing else.

torch, transformers and datasets are imported only inside commands, so
``ches-filter --help`` answers instantly.
"""

from __future__ import annotations

import functools
import json
import logging
import sys
from typing import Any, Callable

import click

from . import __version__
from .config import ATTN_IMPLEMENTATIONS, DTYPES, ENGINES, INPUT_FORMATS, MEASURES, PruneConfig, ScoreConfig
from .errors import ChesFilterError

logger = logging.getLogger("ches_filter")


def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose else logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger("ches_filter")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    # Third-party progress bars and warnings drown ours; keep only errors.
    for name in ("transformers", "datasets", "huggingface_hub", "accelerate"):
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        import datasets

        datasets.disable_progress_bars()
        datasets.logging.set_verbosity_error()
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


def _guarded(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ChesFilterError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)

    return wrapper


def score_options(fn: Callable) -> Callable:
    """Options shared by every command that scores (names = ScoreConfig fields)."""
    options = [
        click.option("--model", default=None, help="Hub id, local directory, or .gguf file. Default: embedded SmolLM2-135M-Instruct."),
        click.option("--revision", default=None, help="Hub revision (branch, tag or commit) of --model."),
        click.option("--trust-remote-code", is_flag=True, default=False, help="Allow custom modelling code from the model repository."),
        click.option("--dtype", type=click.Choice(DTYPES), default="auto", show_default=True, help="Compute dtype; auto = float32 on CPU, bfloat16 on CUDA."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:N or mps."),
        click.option("--device-map", default=None, help="Split one model over several GPUs (e.g. auto; needs accelerate)."),
        click.option("--attn-implementation", type=click.Choice(ATTN_IMPLEMENTATIONS), default="sdpa", show_default=True),
        click.option("--engine", type=click.Choice(ENGINES), default="auto", show_default=True, help="packed: prompt encoded once per pair; plain: each side separately; auto: packed where exact."),
        click.option("--input-format", type=click.Choice(INPUT_FORMATS), default=None, help="Force the input layout instead of detecting it."),
        click.option("--prompt-column", default="prompt", show_default=True),
        click.option("--chosen-column", default="chosen", show_default=True),
        click.option("--rejected-column", default="rejected", show_default=True),
        click.option("--id-column", default=None, help="Column copied into the score file to identify rows."),
        click.option("--split", default=None, help="Split of a Hub dataset or a saved DatasetDict."),
        click.option("--subset", default=None, help="Configuration (subset) of a Hub dataset."),
        click.option("--no-chat-template", is_flag=True, default=False, help="Tokenize the prompt's text form instead of rendering the chat template."),
        click.option("--max-length", type=int, default=None, help="Pairs longer than this (prompt + longest response, tokens) get status too_long. Default: the model's context."),
        click.option("--max-batch-tokens", type=int, default=None, help="Padded tokens per forward pass. Default: 2048 on CPU, 65536 on CUDA."),
        click.option("--max-batch-size", type=int, default=None, help="Optional cap on pairs per forward pass."),
        click.option("--chunk-size", type=int, default=4096, show_default=True, help="Rows read, tokenized and length-sorted together."),
        click.option("--quiet", "-q", is_flag=True, default=False, help="No progress bar or info logs."),
        click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _split(kwargs: dict, cls: type) -> tuple[Any, dict]:
    names = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items() if k not in names}


def _build(cls: type, kwargs: dict) -> tuple[Any, dict]:
    try:
        return _split(kwargs, cls)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="ches-filter")
def main() -> None:
    """Score and prune DPO preference pairs by CHES, the likelihood-displacement risk of Razin et al. (ICLR 2025).

    \b
      ches-filter score data.jsonl -o scores.parquet
      ches-filter prune data.jsonl --keep 0.9 -o pruned.parquet
    """


@main.command()
@click.argument("input")
@click.option("--output", "-o", required=True, help="Score file to write (.parquet).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace OUTPUT if it exists.")
@score_options
@_guarded
def score(input: str, output: str, overwrite: bool, verbose: bool, **kwargs: Any) -> None:
    """Score every pair of INPUT; write one row per input row to OUTPUT.

    INPUT is a .jsonl/.json/.jsonl.gz/.parquet/.csv file, a parquet directory or glob,
    a save_to_disk directory, or a Hub dataset id.
    """
    config, _ = _build(ScoreConfig, kwargs)
    _setup_logging(config.quiet, verbose)
    from .io import check_output_path, output_kind, write_table
    from .scoring import score_pairs, table_metadata

    if not output.endswith(".parquet"):
        raise click.BadParameter(f"the score file must end in .parquet, got {output!r}", param_hint="'--output'")
    output_kind(output)
    check_output_path(output, inputs=[input], overwrite=overwrite)
    table = score_pairs(input, config)
    write_table(table, output, metadata=table_metadata(table), overwrite=overwrite)
    counts = table_metadata(table).get("counts", {})
    click.echo(f"scored {counts.get('ok', 0)} of {table.num_rows} rows -> {output}")
    others = {k: v for k, v in sorted(counts.items()) if k != "ok"}
    if others:
        click.echo("not scored as ok: " + ", ".join(f"{k} {v}" for k, v in others.items()))


@main.command()
@click.argument("input")
@click.option("--output", "-o", required=True, help="Pruned dataset: .parquet, .jsonl, or a directory (save_to_disk).")
@click.option("--keep", type=float, default=None, help="Fraction of scored (status ok) rows to keep, in (0, 1].")
@click.option("--keep-count", type=int, default=None, help="Number of scored rows to keep.")
@click.option("--max-score", type=float, default=None, help="Keep rows whose score is <= this.")
@click.option("--by", type=click.Choice(MEASURES), default="ln_ches", show_default=True, help="Measure to rank by (higher = riskier).")
@click.option("--scores", default=None, help="Reuse a score file from `ches-filter score` for this INPUT.")
@click.option("--keep-unscored", is_flag=True, default=False, help="Keep rows that could not be scored instead of dropping them.")
@click.option("--add-scores", is_flag=True, default=False, help="Append ches, ln_ches, status columns to the output.")
@click.option("--rejects", default=None, help="Also write the dropped rows with their reason here.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace existing output files.")
@score_options
@_guarded
def prune(input: str, output: str, scores: str | None, rejects: str | None, overwrite: bool, verbose: bool, **kwargs: Any) -> None:
    """Keep the lowest-risk pairs of INPUT and write them, unchanged and in order, to OUTPUT."""
    prune_config, rest = _build(PruneConfig, kwargs)
    config, _ = _build(ScoreConfig, rest)
    _setup_logging(config.quiet, verbose)
    from .io import check_output_path, output_kind, write_dataset
    from .select import prune_pairs

    inputs = [input] + ([scores] if scores else [])
    for path in [output] + ([rejects] if rejects else []):
        output_kind(path)
        check_output_path(path, inputs=inputs, overwrite=overwrite)
    if rejects is not None and rejects == output:
        raise click.BadParameter("`--rejects` must differ from `--output`", param_hint="'--rejects'")
    result = prune_pairs(input, prune_config, scores=scores, score_config=config)
    write_dataset(result.kept, output, overwrite=overwrite)
    if rejects:
        write_dataset(result.rejects, rejects, overwrite=overwrite)
    summary = result.summary()
    by = prune_config.by
    threshold = summary["threshold"]
    click.echo(f"rows in:  {summary['rows_in']}")
    click.echo(f"scored:   {summary['scored']}")
    click.echo(f"kept:     {summary['kept']} -> {output}")
    click.echo(f"dropped:  {summary['dropped']}" + ("" if not summary["dropped_by_reason"] else " (" + ", ".join(f"{k} {v}" for k, v in summary["dropped_by_reason"].items()) + ")"))
    click.echo(f"threshold: {by} <= {threshold:.6g}" if threshold is not None else "threshold: none (no scored row kept)")
    logger.debug("summary: %s", json.dumps(summary))


if __name__ == "__main__":  # pragma: no cover
    main()
