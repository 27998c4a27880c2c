"""Command line: parses flags, builds configs, calls the library. Nothing else.

torch, transformers and datasets are imported only inside commands, so
``ches-filter --help`` answers instantly.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import signal
import sys
import threading
from typing import Any, Callable

import click
from click.core import ParameterSource

from . import __version__
from .api import prune_pairs
from .batching import SPECIAL_TOKEN_MODES, TOKEN_LAYOUTS
from .config import (
    ATTN_IMPLEMENTATIONS,
    DEFAULT_CHECKPOINT_EVERY,
    DTYPES,
    DisplacementConfig,
    JobConfig,
    PruneConfig,
    ReportConfig,
    ScoreConfig,
    ValidateConfig,
)
from .displacement import format_summary, measure_displacement
from .errors import BadDataError, ChesFilterError
from .formats import LAYOUTS
from .measures import DEFAULT_MEASURES, MEASURES
from .model import check_cache_root, check_model_source
from .paths import check_paths, output_kind
from .report import build_report, require_matplotlib, terminal_summary
from .run import WorkDir, default_work_dir, merge_work_dir, score_to_file, torchrun_rank
from .scorefile import parse_metadata, write_table
from .scoring import table_metadata
from .select import check_score_settings
from .strategies import ENGINE_CHOICES, STRATEGIES
from .validate import run_validate

# transformers, datasets and pyarrow are imported in the functions that use them: `ches-filter --help` stays instant.

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
        # CRITICAL: a loader failure is logged by datasets *and* raised; the
        # raised error comes back as our own one-line message.
        datasets.logging.set_verbosity(logging.CRITICAL)
    except Exception:  # noqa: BLE001 - cosmetics only
        pass
    try:
        import transformers

        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


class _Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's pre-emption, torchrun stopping its ranks), unwound like Ctrl-C."""


def _terminate_like_interrupt() -> Any:
    """Make SIGTERM unwind like SIGINT, so temporaries are removed on the way out; returns the old handler.

    Only in the main thread (where Python delivers signals); None elsewhere.
    """
    if threading.current_thread() is not threading.main_thread():
        return None

    def terminated(signum: int, frame: Any) -> None:
        raise _Terminated()

    return signal.signal(signal.SIGTERM, terminated)


def _guarded(fn: Callable) -> Callable:
    """Turn library errors into one line on stderr and the documented exit code."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        previous = _terminate_like_interrupt()
        try:
            return fn(*args, **kwargs)
        except ChesFilterError as exc:
            click.echo(f"Error: {exc}", err=True)
            sys.exit(exc.exit_code)
        except _Terminated:
            click.echo("Terminated.", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("Interrupted.", err=True)
            sys.exit(130)
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper


_BY_HELP = "Measure that ranks the pairs, each in its risk direction: " + ", ".join(
    f"{m.name} ({'higher' if m.higher_is_riskier else 'lower'} = riskier)" for m in MEASURES.values()
) + "."


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
        click.option("--engine", type=click.Choice(ENGINE_CHOICES), default="auto", show_default=True, help="; ".join(f"{s.name}: {s.description}" for s in STRATEGIES.values()) + "; auto: packed where exact, else plain."),
        click.option("--input-format", type=click.Choice(LAYOUTS.names()), default=None, help="Force the input layout instead of detecting it: " + "; ".join(f"{x.name}: {x.description}" for x in LAYOUTS.values()) + "."),
        click.option("--prompt-column", default="prompt", show_default=True),
        click.option("--chosen-column", default="chosen", show_default=True),
        click.option("--rejected-column", default="rejected", show_default=True),
        click.option("--id-column", default=None, help="Column copied into the score file to identify rows."),
        click.option("--split", default=None, help="Split of a Hub dataset or a saved DatasetDict."),
        click.option("--subset", default=None, help="Configuration (subset) of a Hub dataset."),
        click.option("--no-chat-template", is_flag=True, default=False, help="Tokenize the prompt's text form instead of rendering the chat template."),
        click.option("--layout", type=click.Choice(TOKEN_LAYOUTS.names()), default="paper", show_default=True, help="Response tokens: " + "; ".join(f"{t.name} = {t.description}" for t in TOKEN_LAYOUTS.values()) + "."),
        click.option("--measures", default=",".join(DEFAULT_MEASURES), show_default=True, help="Comma-separated columns to compute: " + ", ".join(MEASURES.names()) + "."),
        click.option("--on-special-tokens", type=click.Choice(SPECIAL_TOKEN_MODES), default="keep", show_default=True, help="Rows whose text holds the tokenizer's special tokens (e.g. <|im_end|>, read as control tokens, as TRL does): keep = score, warn with the count; flag = score, add a bool column special_tokens; drop = status special_tokens, unscored."),
        click.option("--max-length", type=click.IntRange(min=1), default=None, help="Pairs longer than this (prompt + longest response, tokens) get status too_long. Default: the model's context."),
        click.option("--max-batch-tokens", type=click.IntRange(min=1), default=None, help="Padded tokens per forward pass. Default: 512 on CPU, 65536 on CUDA."),
        click.option("--engine-workers", type=click.IntRange(min=1), default=None, help="Forward passes in flight at once, each on its own thread. Default: on CPU one per core (up to 4, each single-threaded), on CUDA 1."),
        click.option("--max-batch-size", type=click.IntRange(min=1), default=None, help="Optional cap on pairs per forward pass."),
        click.option("--chunk-size", type=click.IntRange(min=1), default=4096, show_default=True, help="Rows read, tokenized and length-sorted together."),
        click.option("--quiet", "-q", is_flag=True, default=False, help="No progress bar or info logs."),
        click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logs."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def _check_model_early(config: ScoreConfig) -> None:
    """Refuse a wrong ``--model`` path or ``CHES_FILTER_CACHE`` before the input is read (milliseconds)."""
    if check_model_source(config.model) is not None:
        check_cache_root()


def _split(kwargs: dict, cls: type) -> tuple[Any, dict]:
    names = set(cls.__dataclass_fields__)
    return cls(**{k: v for k, v in kwargs.items() if k in names}), {k: v for k, v in kwargs.items() if k not in names}


def _explicit(ctx: click.Context, cls: type) -> list[str]:
    """The ``cls`` fields whose option the user gave (not left at its default)."""
    defaults = (ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP, None)
    return [name for name in cls.__dataclass_fields__ if ctx.get_parameter_source(name) not in defaults]


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


def _special_rows(output: str) -> int:
    """``special_token_rows`` recorded in a written score file's metadata (0 when absent)."""
    import pyarrow.parquet as pq

    try:
        return int(parse_metadata(pq.read_schema(output).metadata, output).get("special_token_rows") or 0)
    except (OSError, ValueError, BadDataError):
        return 0


def _echo_counts(counts: dict, rows: int, output: str) -> None:
    special = _special_rows(output)
    click.echo(f"scored {counts.get('ok', 0)} of {rows} rows -> {output}"
               + (f" ({special} rows hold special-token text)" if special else ""))
    others = {k: v for k, v in sorted(counts.items()) if k != "ok"}
    if others:
        click.echo("not scored as ok: " + ", ".join(f"{k} {v}" for k, v in others.items()))


def job_options(fn: Callable) -> Callable:
    """Options of the resumable pipeline shared by every command that scores (names = JobConfig fields)."""
    options = [
        click.option("--work-dir", default=None, help="Where parts and the manifest go while scoring. Default: OUTPUT.parts"),
        click.option("--checkpoint-every", type=click.IntRange(min=1), default=None, help=f"Rows per part written to the work dir: the most a crash can cost per process. Default: {DEFAULT_CHECKPOINT_EVERY}, or about 1/32 of the rows (at least 8) for smaller inputs, so every process gets parts."),
        click.option("--keep-work-dir", is_flag=True, default=False, help="Keep the work dir after the output is written."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


@main.command()
@click.argument("input")
@click.option("--output", "-o", required=True, help="Score file to write (.parquet).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace OUTPUT if it exists.")
@job_options
@click.option("--num-shards", type=click.IntRange(min=1), default=1, show_default=True, help="Split the rows into this many independent jobs (e.g. a Slurm array); join with `ches-filter merge`.")
@click.option("--shard-index", type=click.IntRange(min=0), default=None, help="Which shard this job scores, 0 .. num-shards-1.")
@score_options
@_guarded
def score(input: str, output: str, overwrite: bool, verbose: bool, **kwargs: Any) -> None:
    """Score every pair of INPUT; write one row per input row to OUTPUT.

    INPUT is a .jsonl/.json/.jsonl.gz/.parquet/.csv file, a directory of such files (one kind) or a glob,
    a save_to_disk directory, or a Hub dataset id.

    Resumable: parts go to OUTPUT.parts/ as they finish; rerun the same
    command after a crash to continue. Data parallel:
    `torchrun --nproc_per_node N -m ches_filter score ...`; see docs/distributed.md.
    """
    config, rest = _build(ScoreConfig, kwargs)
    job, _ = _build(JobConfig, rest)
    rank = torchrun_rank()
    # Only rank 0 talks; the others report warnings and errors.
    _setup_logging(config.quiet or (rank != 0 and not verbose), verbose)
    _check_model_early(config)

    if not output.endswith(".parquet"):
        raise click.BadParameter(f"the score file must end in .parquet, got {output!r}", param_hint="'--output'")
    output_kind(output)
    # Whether an existing OUTPUT/work dir may be reused is decided by the resume logic; clashes are refused here.
    check_paths(
        {"--output": output, "--work-dir": job.work_dir or default_work_dir(output)}, {"INPUT": input},
        overwrite=True, may_exist=("--work-dir",),
    )
    summary = score_to_file(input, output, config, job, overwrite=overwrite)
    if rank != 0:
        return
    if summary["already_complete"]:
        click.echo(f"{output} is already complete; nothing to do")
    elif summary["output"] is None:
        click.echo(
            f"shard {job.shard_index} of {job.num_shards}: {summary['parts']} parts in {summary['work_dir']} "
            f"({summary['parts_skipped']} were done before); when every shard is done run: "
            f"ches-filter merge {summary['work_dir']} -o {output}"
        )
    else:
        _echo_counts(summary["counts"], summary["rows"], output)


@main.command()
@click.argument("work_dir")
@click.option("--output", "-o", required=True, help="Score file to write (.parquet).")
@click.option("--overwrite", is_flag=True, default=False, help="Replace OUTPUT if it exists.")
@click.option("--keep-work-dir", is_flag=True, default=False, help="Keep WORK_DIR after the output is written.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No info logs.")
@click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logs.")
@_guarded
def merge(work_dir: str, output: str, overwrite: bool, keep_work_dir: bool, quiet: bool, verbose: bool) -> None:
    """Join the parts that `score --num-shards K --shard-index I` jobs wrote to WORK_DIR into OUTPUT."""
    _setup_logging(quiet, verbose)

    if not output.endswith(".parquet"):
        raise click.BadParameter(f"the score file must end in .parquet, got {output!r}", param_hint="'--output'")
    output_kind(output)
    # WORK_DIR is deleted after the merge: an output inside it would go with it. (A directory that
    # is no work dir at all is refused by merge_work_dir first, saying so.)
    if os.path.isfile(os.path.join(work_dir, "manifest.json")):
        check_paths({"--output": output}, {"WORK_DIR": work_dir}, overwrite=overwrite)
    counts = merge_work_dir(work_dir, output, overwrite=overwrite, keep_work_dir=keep_work_dir)
    _echo_counts(counts, sum(counts.values()), output)


@main.command()
@click.argument("input")
@click.option("--output", "-o", required=True, help="Pruned dataset: .jsonl, .csv, .parquet, or a directory (save_to_disk); the input's own kind keeps its records as they are.")
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), default=None, help="Fraction of scored (status ok) rows to keep, in (0, 1].")
@click.option("--keep-count", type=click.IntRange(min=0), default=None, help="Number of scored rows to keep.")
@click.option("--max-score", type=float, default=None, help="Keep rows no riskier than this: score <= T (>= T for a lower-is-riskier measure such as edit_distance).")
@click.option("--by", type=click.Choice(MEASURES.names()), default="ln_ches", show_default=True, help=_BY_HELP)
@click.option("--scores", default=None, help="Reuse a score file from `ches-filter score` for this INPUT.")
@click.option("--keep-unscored", is_flag=True, default=False, help="Keep rows that could not be scored instead of dropping them.")
@click.option("--add-scores", is_flag=True, default=False, help="Append ches, ln_ches, status columns to the output.")
@click.option("--rejects", default=None, help="Also write the dropped rows with their reason here.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace existing output files.")
@job_options
@score_options
@_guarded
def prune(input: str, output: str, scores: str | None, rejects: str | None, overwrite: bool, verbose: bool, **kwargs: Any) -> None:
    """Keep the lowest-risk pairs of INPUT and write them, unchanged and in order, to OUTPUT.

    Without --scores, INPUT is scored first through the same resumable pipeline as `score`
    (parts in OUTPUT.parts/; rerun the same command after a crash; runs under torchrun).
    """
    prune_config, rest = _build(PruneConfig, kwargs)
    config, rest = _build(ScoreConfig, rest)
    job, _ = _build(JobConfig, rest)
    rank = torchrun_rank()
    _setup_logging(config.quiet or (rank != 0 and not verbose), verbose)

    if scores is not None and job.work_dir is not None:
        raise click.BadParameter("`--work-dir` holds the parts of a scoring run; with `--scores` nothing is scored, so leave it out", param_hint="'--work-dir'")
    output_kind(output, "--output")
    if rejects is not None:
        output_kind(rejects, "--rejects")
    # Every clash is refused before anything is read or written.
    work_dir = None if scores is not None else (job.work_dir or default_work_dir(output))
    check_paths({"--output": output, "--rejects": rejects, "--work-dir": work_dir}, {"INPUT": input, "--scores": scores},
                overwrite=overwrite, may_exist=("--work-dir",))
    if scores is not None:
        ctx = click.get_current_context()
        check_score_settings(scores, config, _explicit(ctx, ScoreConfig))
    else:
        WorkDir(work_dir).check_shape()  # a foreign directory is refused before the input is read
        _check_model_early(config)
    result = prune_pairs(input, prune_config, scores=scores, score_config=config, job=job, output=output)
    if result is None:  # a torchrun rank other than 0: rank 0 writes
        return
    # Both files or neither: a refused value in the rejects leaves the kept file unwritten too.
    result.write(output, rejects, overwrite=overwrite)
    if result.work is not None and not job.keep_work_dir:
        result.work.remove()
    summary = result.summary()
    by = prune_config.by
    threshold = summary["threshold"]
    keeps = "<=" if MEASURES.get(by).higher_is_riskier else ">="
    click.echo(f"rows in:  {summary['rows_in']}")
    click.echo(f"scored:   {summary['scored']}")
    click.echo(f"kept:     {summary['kept']} -> {output}")
    click.echo(f"dropped:  {summary['dropped']}" + ("" if not summary["dropped_by_reason"] else " (" + ", ".join(f"{k} {v}" for k, v in summary["dropped_by_reason"].items()) + ")"))
    click.echo(f"threshold: {by} {keeps} {threshold:.6g}" if threshold is not None else "threshold: none (no scored row kept)")
    logger.debug("summary: %s", json.dumps(summary))


@main.command()
@click.argument("scores")
@click.option("--output", "-o", required=True, help="Report directory to create (summary.json, histogram.png, length.png, report.html).")
@click.option("--data", default=None, help="The INPUT that was scored, to show prompt/response excerpts of the extreme pairs.")
@click.option("--keep", type=click.FloatRange(0, 1, min_open=True), multiple=True, default=(0.95, 0.9, 0.8), show_default=True, help="Fractions whose prune threshold is listed and drawn (repeatable).")
@click.option("--by", type=click.Choice(MEASURES.names()), default="ln_ches", show_default=True, help=_BY_HELP)
@click.option("--top", type=click.IntRange(min=0), default=20, show_default=True, help="How many highest- and lowest-scoring pairs to list.")
@click.option("--excerpt-chars", type=click.IntRange(min=1), default=400, show_default=True, help="Characters of each prompt/response excerpt.")
@click.option("--split", default=None, help="Split of --data, as for `score`.")
@click.option("--subset", default=None, help="Configuration (subset) of a Hub --data.")
@click.option("--validate", "validate_dir", default=None, help="An OUTPUT directory of `ches-filter validate`: adds its table, verdicts and plot.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace OUTPUT if it exists.")
@click.option("--quiet", "-q", is_flag=True, default=False, help="No info logs.")
@click.option("--verbose", "-v", is_flag=True, default=False, help="Debug logs.")
@_guarded
def report(scores: str, output: str, data: str | None, validate_dir: str | None, overwrite: bool, quiet: bool, verbose: bool, **kwargs: Any) -> None:
    """Summarise a score file from `ches-filter score` as plots, tables and an HTML page in OUTPUT.

    Needs matplotlib: pip install 'ches-filter[report]'.
    """
    config, _ = _build(ReportConfig, kwargs)
    _setup_logging(quiet, verbose)

    require_matplotlib()
    summary = build_report(scores, output, config, data=data, overwrite=overwrite, validate=validate_dir)
    for line in terminal_summary(summary):
        click.echo(line)
    click.echo(f"report -> {output}/report.html")


@main.command()
@click.argument("input")
@click.option("--output", "-o", default=None, help="Per-pair results to write (.parquet). Without it only the table is printed.")
@click.option("--sample", type=click.IntRange(min=1), default=64, show_default=True, help="Pairs drawn at random from the scorable rows.")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True, help="Seed of the draw.")
@click.option("--steps", type=click.IntRange(min=0), default=0, show_default=True, help="Also take this many real DPO (SGD) steps per pair, from the same initial model.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=1e-5, show_default=True, help="SGD learning rate of the real steps.")
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True, help="DPO beta of the real steps.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace OUTPUT if it exists.")
@score_options
@_guarded
def displacement(input: str, output: str | None, overwrite: bool, verbose: bool, **kwargs: Any) -> None:
    """Measure likelihood displacement on a sample of INPUT's pairs with the model itself.

    For each pair alone: D = ||g+||^2 - <g+, g->, the first-order change of log p(y+|x) under one DPO
    step (g = gradient of log p(y|x) over all parameters; D < 0: the preferred response falls), and with
    --steps K the actual change after K DPO steps. Prints how well each measure ranks the displaced
    pairs. Loads the model with its LM head; --dtype auto means float32 here. Every measure is
    computed; `--measures` and the batching options of `score` do not apply.
    """
    probe_config, rest = _build(DisplacementConfig, kwargs)
    config, _ = _build(ScoreConfig, rest)
    _setup_logging(config.quiet, verbose)

    _check_model_early(config)
    if output is not None:
        if not output.endswith(".parquet"):
            raise click.BadParameter(f"the result file must end in .parquet, got {output!r}", param_hint="'--output'")
        check_paths({"--output": output}, {"INPUT": input}, overwrite=overwrite)
    table = measure_displacement(input, probe_config, config)
    meta = table_metadata(table)
    if output is not None:
        write_table(table, output, metadata=meta, overwrite=overwrite)
    for line in format_summary(meta["summary"]):
        click.echo(line)
    if output is not None:
        click.echo(f"{table.num_rows} pairs -> {output}")


@main.command()
@click.argument("input")
@click.option("--output", "-o", required=True, help="Directory to create: validate.parquet, summary.json, validate.png (and scores.parquet without --scores).")
@click.option("--scores", default=None, help="Reuse a score file from `ches-filter score` for this INPUT instead of scoring it.")
@click.option("--by", default="ches,ln_ches", show_default=True, help="Comma-separated measures that rank the pairs, each in its risk direction: " + ", ".join(f"{m.name} ({'higher' if m.higher_is_riskier else 'lower'} = riskier)" for m in MEASURES.values()) + ".")
@click.option("--subsets", default="top,bottom,random", show_default=True, help="Comma-separated: top (riskiest n), bottom (safest n), median (n around the median), random (seeded; trained once for every measure).")
@click.option("--quantiles", default=None, help="Also n-pair slices centred on these quantiles of the risk ranking (0 = safest, 1 = riskiest), e.g. 0,0.5,1.")
@click.option("--subset-size", type=click.IntRange(min=1), default=64, show_default=True, help="Pairs per subset (n).")
@click.option("--eval-size", type=click.IntRange(min=1), default=64, show_default=True, help="Held-out pairs (seeded, in no subset) whose change is measured too.")
@click.option("--repeats", type=click.IntRange(1, 1000), default=1, show_default=True, help="Seeds per subset, at most 1000: each draws another batch order (the subsets and the eval set stay those of --seed); >1 gives the seed spread.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True, help="Passes over each subset.")
@click.option("--beta", type=click.FloatRange(min=0, min_open=True), default=0.1, show_default=True, help="DPO beta (reference = the initial model).")
@click.option("--optimizer", type=click.Choice(("adam", "rmsprop", "sgd")), default="adam", show_default=True, help="adam and rmsprop with torch's defaults besides --lr.")
@click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=5e-6, show_default=True, help="Learning rate (the default suits adam; see docs/validate.md).")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Pairs per optimizer step (mean loss over the batch).")
@click.option("--seed", type=click.IntRange(0, 2**64 - 1), default=0, show_default=True, help="Seed of the eval draw, the random subset and the batch order.")
@click.option("--gradient-checkpointing", is_flag=True, default=False, help="Recompute activations in the backward pass: less memory, slower.")
@click.option("--overwrite", is_flag=True, default=False, help="Replace a finished run in OUTPUT and start over (scoring too); without it, the same command resumes an unfinished run there.")
@score_options
@_guarded
def validate(input: str, output: str, scores: str | None, overwrite: bool, verbose: bool, **kwargs: Any) -> None:
    """Train DPO on the riskiest, safest and random subsets of INPUT's pairs and compare what happens to log p(y+).

    The paper's subset experiment on your own model: for each --by measure, each subset is trained for
    --epochs of DPO from the same initial model; the change of log p(y+|x) over the subset and over a
    held-out eval set is reported per subset, with a verdict line. Scores INPUT first (into
    OUTPUT/scores.parquet) unless --scores is given. The policy is float32 (--dtype bfloat16 runs
    under autocast with float32 weights). See docs/validate.md.
    """
    validate_config, rest = _build(ValidateConfig, kwargs)
    config, _ = _build(ScoreConfig, rest)
    _setup_logging(config.quiet, verbose)
    if scores is not None:  # the same check as prune --scores, before anything is written

        check_score_settings(scores, config, _explicit(click.get_current_context(), ScoreConfig), command="validate")

    summary = run_validate(input, output, validate_config, config, scores=scores, overwrite=overwrite)
    for line in summary["table"]:
        click.echo(line)
    for line in summary["verdicts"]:
        click.echo(line)
    click.echo(f"validate -> {output} ({summary['seconds']:.0f} s)")


if __name__ == "__main__":  # pragma: no cover
    main()
