"""The ``geximpute`` command line: thin argument parsing over the engine's functions."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import functools
import json
import logging
import os
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

from geximpute import __version__
from geximpute.config import load_config
from geximpute.errors import ConfigError, GeximputeError
from geximpute.runtime.console import LOG_NAME, echo, session
from geximpute.runtime.submit import STEPS as SUBMIT_STEPS
from geximpute.runtime.submit import report, submit

log = logging.getLogger("geximpute")

# Each command imports its step module inside its function: those load numpy, pyarrow, torch and Ray, which
# `geximpute --help` and argument errors do not need (0.11 s for --help; importing them all takes seconds).


def _add_config(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", required=True, metavar="FILE", help="YAML config file")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set promoter.upstream=2000 (repeatable)",
    )


def _add_force(p: argparse.ArgumentParser) -> None:
    p.add_argument("--force", action="store_true",
                   help="replace --out even when it is not an earlier output of this command (refused otherwise)")


def _load(args: argparse.Namespace):
    return load_config(args.config, args.overrides)


def cmd_inspect(args: argparse.Namespace) -> int:
    import numpy as np

    from geximpute import schema as S
    from geximpute.io.dataset import format_summary, load_dataset
    from geximpute.science.problem import check_split
    from geximpute.steps.evaluate import sequence_summary

    config = _load(args)
    dataset = load_dataset(config)
    try:  # prepare refuses it, after Ray has started: said here, where the inputs are checked
        check_split(np.asarray(dataset.genes.table[S.CHROM].to_pylist(), dtype=object), config)
    except ConfigError as exc:
        echo(f"geximpute inspect: warning: {exc}; prepare and evaluate refuse it", err=True)
    sequence = sequence_summary(dataset)
    if args.json:
        echo(json.dumps({**dataset.report, **({"sequence": sequence} if sequence else {})}, indent=2))
    else:
        echo(format_summary(dataset.report))
        if sequence:
            echo(f"  sequence    {sequence['genes_with_sequence']:,} of {sequence['genes']:,} genes have a known "
                 f"promoter window; hidden set of task {sequence['task']}: {sequence['hidden_genes_with_sequence']:,} "
                 f"of {sequence['hidden_genes']:,} hidden genes ({sequence['hidden_entries_with_sequence']:,} of "
                 f"{sequence['hidden_entries']:,} hidden entries)")
    return 0


def cmd_config_schema(args: argparse.Namespace) -> int:
    from geximpute.config_schema import config_schema

    text = json.dumps(config_schema(), indent=2) + "\n"
    if args.out:
        out = Path(args.out)
        if out.is_dir():
            raise ConfigError(f"config-schema --out {out}: a folder; give the file to write, e.g. "
                              f"{out / 'geximpute.schema.json'}")
        if not out.parent.is_dir():
            raise ConfigError(f"config-schema --out {out}: its folder {out.parent} does not exist; create it first")
        out.write_text(text)
        echo(f"JSON Schema of the config written to {args.out}; to use it, make this the first line of a config "
             "(the path relative to the config file):\n"
             f"  # yaml-language-server: $schema={args.out}")
    else:
        echo(text, end="")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from geximpute.apps.synth import SynthSpec, generate

    # ~3.3 kb of chromosome per gene keeps the default density (240 genes on 2 x 400 kb) at any size
    length = args.chrom_length or max(SynthSpec.chrom_length, args.genes * 3_400 // SynthSpec.n_chroms)
    try:
        spec = SynthSpec(seed=args.seed, n_genes=args.genes, n_donors=args.donors, n_tissues=args.tissues,
                         chrom_length=length, motif_eqtl_fraction=args.motif_eqtl_fraction)
    except ValueError as exc:  # a bad option: said plainly, as any other bad setting, in the option's own name
        text = str(exc)
        for field_name, option in (("n_genes", "--genes"), ("n_donors", "--donors"), ("n_tissues", "--tissues"),
                                   ("chrom_length", "--chrom-length"), ("motif_eqtl_fraction", "--motif-eqtl-fraction"),
                                   ("seed", "--seed")):
            text = text.replace(f"SynthSpec.{field_name}=", f"{option} ")
        raise ConfigError(text.replace(" (n_chroms)", "")) from None
    try:
        result = generate(args.out, spec, overwrite=args.overwrite)
    except FileExistsError as exc:  # the Python API's wording, in the command line's
        raise ConfigError(str(exc).replace("pass overwrite=True (`geximpute synth --overwrite`)", "pass --overwrite")
                          ) from None
    echo(f"synthetic dataset written to {result.out_dir}")
    echo(f"  next: geximpute inspect --config {result.config_path}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from geximpute.apps.demo import run_demo

    summary = run_demo(args.out, seed=args.seed)
    echo(f"summary written to {summary.parent / 'report.html'} and {summary} (plot: {summary.with_suffix('.png')})")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from geximpute.steps.ingest import ingest

    result = ingest(_load(args), args.out, force=args.force)
    echo(f"expression store of {result.n_genes:,} genes x {result.n_samples:,} samples in {result.partitions} "
         f"chromosome partitions written to {result.out_dir} in {result.seconds:.1f} s"
         + (f" ({result.unannotated:,} genes the annotation lacks in a partition of their own)"
            if result.unannotated else ""))
    echo(f"  next: set inputs.expression: {result.out_dir.absolute()} in the config (or --set "
         f"inputs.expression={result.out_dir.absolute()}); every run then reads the store")
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from geximpute.steps.prepare import prepare

    result = prepare(_load(args), args.out, targets=args.targets, training=args.training, force=args.force)
    echo(
        f"{result.n_records:,} context records and {result.n_promoters:,} unique promoters written to "
        f"{result.out_dir} in {result.seconds:.1f} s"
    )
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from geximpute.steps.pipeline import output_path, train_and_save

    config = _load(args)
    network = train_and_save(config, args.records, args.out)
    folds = config.train.folds
    where = output_path(config, args.out, "network")
    echo(f"network trained: {network.metrics}; "
         + (f"{folds} fold networks in {where}/fold0 ... fold{folds - 1}" if folds > 1 else f"weights in {where}"))
    return 0


def cmd_fit_head(args: argparse.Namespace) -> int:
    from geximpute.steps.pipeline import fit_head_and_save, output_path

    config = _load(args)
    _, version, _ = fit_head_and_save(config, args.records, args.network, args.out, force=args.force)
    echo(f"model bundle {version} written to {output_path(config, args.out, 'model')}")
    return 0


def results_table(metrics: dict) -> str:
    """The methods of an evaluation, best first, one short line each (the full report is report.html)."""
    ranked = sorted(metrics["methods"].items(), key=lambda kv: -(kv[1].get("pearson") or -1))
    width = max((len(n) for n, _ in ranked), default=6)
    lines = [f"{metrics['n_hidden']:,} hidden entries ({metrics['task']} task); Pearson and RMSE on "
             f"{metrics.get('scale', 'log1p')}:"]
    for name, m in ranked:
        pearson = "n/a" if m.get("pearson") is None else f"{m['pearson']:.4f}"
        lines.append(f"  {name:<{width}}  pearson {pearson}  rmse {m['rmse']:.4f}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from geximpute.steps.evaluate import evaluate, evaluate_seeds

    if args.seeds:
        from geximpute.science.comparisons import seeds_report

        summary = evaluate_seeds(_load(args), args.out, args.seeds, force=args.force)
        echo(seeds_report(summary))
        echo(f"one evaluation per seed in {args.out}/seed_<s>; summary.json and summary.md written to {args.out}")
        return 0
    metrics = evaluate(_load(args), args.out, force=args.force)
    echo(results_table(metrics))
    echo(f"report.html, report.md and metrics.json written to {args.out}")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    return report(submit(args.step, args.config, args.overrides, address=args.address, wait=not args.no_wait,
                         allow_insecure=args.allow_insecure))


def cmd_impute(args: argparse.Namespace) -> int:
    from geximpute.steps.impute import format_plan, impute, impute_plan

    if args.plan:
        config = _load(args)
        if args.include_observed:  # the plan counts the entries the run would write
            config = dataclasses.replace(config, impute=dataclasses.replace(config.impute, include_observed=True))
        plan = impute_plan(config, model=args.model, out_dir=args.out, workers=args.workers)
        echo(json.dumps(plan, indent=2) if args.json else format_plan(plan))
        return 0
    result = impute(_load(args), model=args.model, out_dir=args.out,
                    include_observed=True if args.include_observed else None, force=args.force)
    echo(f"{result.n_rows:,} predictions ({len(result.rows)} tissues, {result.n_missing_profiles:,} missing "
          f"donor-tissue profiles) of model {result.model_version} written to {result.out_dir} in "
          f"{result.seconds:.1f} s (run {result.run_id})")
    return 0


def cmd_nightly(args: argparse.Namespace) -> int:
    from geximpute.steps.nightly import nightly

    result = nightly(_load(args), run_date=args.run_date)
    for name, why in result.quarantined.items():
        echo(f"quarantined {name}: {why}", err=True)
    if result.reimputed:
        echo(f"re-imputed (genome delivered again with a new checksum, or a new or changed expression file): "
             f"{', '.join(result.reimputed)}")
    if result.deferred:
        echo(f"genome or expression file delivered again after being imputed on this run date or a later one, "
             f"re-imputed by a later run date: {', '.join(result.deferred)}")
    if result.waiting:
        # the prefix the README gives schedulers to alert on: "left in the inbox for the next run: "
        echo(f"left in the inbox for the next run: {', '.join(result.waiting)} (changing while read, or a passing "
             "read error; see the log)", err=True)
    if not result.done:
        echo(f"nightly {result.run_date}: nothing new to impute ({len(result.already_done)} genomes already done, "
              f"{len(result.quarantined)} quarantined)")
    else:
        echo(f"nightly {result.run_date}: {len(result.done)} donors imputed, {result.rows:,} rows in "
              f"{result.partition}; {len(result.quarantined)} quarantined; {result.seconds:.1f} s")
    return 0


def cmd_variant_effects(args: argparse.Namespace) -> int:
    from geximpute.steps.variant_effects import variant_effects

    table = variant_effects(_load(args), args.out, args.model, force=args.force)
    echo(f"{table.num_rows:,} variant effects (variant allele x gene x tissue) written to "
          f"{Path(args.out) / 'variant_effects.parquet'}")
    return 0


def cmd_benchmark(args: argparse.Namespace) -> int:
    from geximpute.apps.benchmark import BenchSpec, run_benchmark, summary

    try:
        spec = BenchSpec(genes=args.genes, donors=args.donors, tissues=args.tissues,
                         observed_fraction=args.observed_fraction, variant_density=args.variant_density,
                         scales=tuple(args.scales), gene_scales=tuple(args.gene_scales), epochs=args.epochs,
                         max_examples=args.max_examples, encoder_entries=args.encoder_entries, seed=args.seed,
                         overrides=tuple(args.overrides))
    except ValueError as exc:  # a bad option value: say which, without a traceback
        raise ConfigError(str(exc)) from exc
    bench = run_benchmark(args.out, spec, keep_work=args.keep_work)
    echo(summary(bench))
    echo(f"bench.json and bench.png written to {args.out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="geximpute",
        description="Genotype- and tissue-specific gene expression imputation at genome scale, on Ray.",
    )
    parser.add_argument("--version", action="version", version=f"geximpute {__version__}")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors on stderr")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="show Ray's and the libraries' logging live instead of only in the log file")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    # -q and -v also after the command (`geximpute inspect -q`), where they override what came before it
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="only warnings and errors on stderr")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show Ray's and the libraries' logging live instead of only in the log file")
    add_parser = functools.partial(sub.add_parser, parents=[common])

    p = add_parser("inspect", help="load and validate every input, print a summary")
    _add_config(p)
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=cmd_inspect)

    p = add_parser("config-schema", help="print or write the JSON Schema of the YAML config, for editors")
    p.add_argument("--out", metavar="FILE", help="write the schema to FILE instead of printing it")
    p.set_defaults(func=cmd_config_schema)

    p = add_parser("synth", help="write a synthetic dataset with planted effects and its truth")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (must be empty or absent)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--genes", type=int, default=240, help="number of genes (default 240)")
    p.add_argument("--donors", type=int, default=40, help="number of donors (default 40)")
    p.add_argument("--tissues", type=int, default=6, help="number of tissues (default 6)")
    p.add_argument("--chrom-length", type=int, default=None,
                   help="bases per chromosome (default: grows with --genes, at least 400,000)")
    p.add_argument("--motif-eqtl-fraction", type=float, default=0.0, metavar="F",
                   help="share of genes with a planted motif-loss eQTL: two SNVs in one planted motif copy, either "
                        "of which destroys it, a non-additive effect (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty output folder")
    p.set_defaults(func=cmd_synth)

    p = add_parser("demo", help="the main job on the real GTEx data: train, impute, Parquet, summary")
    p.add_argument("--out", default="geximpute-demo", metavar="DIR", help="output folder (default geximpute-demo)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_demo)

    p = add_parser("ingest", help="read the expression file once into Parquet by chromosome, for every later run")
    _add_config(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default <output_dir>/expression)")
    _add_force(p)
    p.set_defaults(func=cmd_ingest)

    p = add_parser("prepare", help="build promoter and context records with Ray Data (Parquet by chrom)")
    _add_config(p)
    p.add_argument("--out", metavar="DIR", help="output folder (default <output_dir>/records)")
    p.add_argument(
        "--targets",
        choices=["all", "hidden", "visible", "none"],
        default="all",
        help="entries that get a context record (default all measured entries; `none`: only the training folds, "
             "all that train and fit-head read, with --training)",
    )
    p.add_argument("--training", action="store_true",
                   help="also write the labelled training folds that `train` and `fit-head` read")
    _add_force(p)
    p.set_defaults(func=cmd_prepare)

    p = add_parser("train", help="train the CNN-transformer with Ray Train (TorchTrainer, DDP)")
    _add_config(p)
    p.add_argument("--records", metavar="DIR", help="prepare output with training folds (default <output_dir>/records)")
    p.add_argument("--out", metavar="DIR", help="where the network goes (default <output_dir>/network)")
    p.set_defaults(func=cmd_train)

    p = add_parser("fit-head", help="fit the XGBoost head with Ray Train and write the model bundle")
    _add_config(p)
    p.add_argument("--records", metavar="DIR", help="prepare output with training folds (default <output_dir>/records)")
    p.add_argument("--network", metavar="DIR", help="trained network (default <output_dir>/network)")
    p.add_argument("--out", metavar="DIR", help="bundle folder (default impute.model_dir, else <output_dir>/model)")
    _add_force(p)
    p.set_defaults(func=cmd_fit_head)

    p = add_parser("evaluate", help="hide, fit every method on visible data, score the hidden entries")
    _add_config(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically)")
    p.add_argument("--seeds", type=int, nargs="+", metavar="S",
                   help="evaluate once per replicate S (the hidden set drawn with evaluation.seed S, the model "
                        "with seed + S) into OUT/seed_S, with mean and spread in OUT/summary.json and summary.md")
    _add_force(p)
    p.set_defaults(func=cmd_evaluate)

    p = add_parser("submit", help="run a step on a Ray cluster as a Ray job, streaming its logs (token auth)")
    p.add_argument("step", choices=list(SUBMIT_STEPS), type=lambda step: step.replace("_", "-"),
                   help="the step (`fit_head` as the jobs module is named is `fit-head`; `pipeline`: prepare "
                        "--training --targets none, train, fit-head, impute)")
    p.add_argument("--address", metavar="URL",
                   help="the cluster's job server, e.g. http://127.0.0.1:8265 (default $RAY_API_SERVER_ADDRESS or "
                        "$RAY_ADDRESS); the token comes from $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH or "
                        "~/.ray/auth_token")
    _add_config(p)
    p.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    p.add_argument("--allow-insecure", action="store_true",
                   help="send the token over plain http to a host that is not this machine (refused otherwise)")
    p.set_defaults(func=cmd_submit)

    p = add_parser("impute", help="predict every missing donor-tissue-gene entry into partitioned Parquet")
    _add_config(p)
    p.add_argument("--model", metavar="DIR",
                   help="model bundle (default impute.model_dir, else <output_dir>/model, from fit-head)")
    p.add_argument("--out", metavar="DIR", help="output folder (default impute.out_dir, else <output_dir>/predictions; "
                   "replaced atomically)")
    p.add_argument("--include-observed", action="store_true",
                   help="also write the measured entries, with their measured value in `observed` (each predicted "
                        "without it)")
    p.add_argument("--plan", action="store_true",
                   help="print the shards, entries, expected peak memory per process and projected wall time; "
                        "run nothing")
    p.add_argument("--workers", type=int, metavar="N", help="with --plan: predictor actors to project for "
                                                             "(default: the pool impute starts on CPUs, one per "
                                                             "50,000 entries up to impute.predictors)")
    p.add_argument("--json", action="store_true", help="with --plan: print the plan as JSON")
    _add_force(p)
    p.set_defaults(func=cmd_impute)

    p = add_parser("nightly", help="impute the new genomes of an inbox into a partition per run date")
    _add_config(p)
    p.add_argument("--run-date", metavar="YYYY-MM-DD",
                   help="the partition to write (default: the config's nightly.run_date, else today)")
    p.set_defaults(func=cmd_nightly)

    p = add_parser("variant-effects",
                       help="score every promoter variant by its predicted expression change per tissue (Parquet)")
    _add_config(p)
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (replaced atomically)")
    p.add_argument("--model", metavar="DIR", help="model bundle (default impute.model_dir, else <output_dir>/model)")
    _add_force(p)
    p.set_defaults(func=cmd_variant_effects)

    p = add_parser("benchmark", help="measure every stage on synthetic data of a given scale (bench.json, plot)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder: bench.json, bench.png")
    p.add_argument("--genes", type=int, default=1000, help="genes at gene scale 1 (default 1000)")
    p.add_argument("--donors", type=int, default=100, help="donors at donor scale 1 (default 100)")
    p.add_argument("--tissues", type=int, default=10, help="tissues (default 10)")
    p.add_argument("--observed-fraction", type=float, default=0.6,
                   help="share of donor-tissue cells with a sample; the rest are imputed (default 0.6)")
    p.add_argument("--variant-density", type=int, default=3, help="variant sites per promoter window (default 3)")
    p.add_argument("--scales", "--donor-scales", dest="scales", type=int, nargs="+", default=[1, 2, 4],
                   help="donor multipliers of the donors series, genes fixed (default 1 2 4)")
    p.add_argument("--gene-scales", type=int, nargs="+", default=[1, 2, 4],
                   help="gene multipliers of the genes series, donors fixed (default 1 2 4)")
    p.add_argument("--epochs", type=int, default=1, help="training epochs (default 1)")
    p.add_argument("--max-examples", type=int, default=20_000, help="training examples per epoch (default 20000)")
    p.add_argument("--encoder-entries", type=int, default=8192,
                   help="entries of the shared vs per-entry promoter-encoder comparison (default 8192)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value of the runs, e.g. --set model.d_model=16 (repeatable)")
    p.add_argument("--keep-work", action="store_true", help="keep DIR/work (data, records, bundle)")
    p.set_defaults(func=cmd_benchmark)

    return parser


#: commands that start Ray: they run in a console session (engine lines and progress on the terminal, the rest in a
#: log file of their output folder)
SESSION_COMMANDS = ("prepare", "train", "fit-head", "evaluate", "impute", "nightly", "variant-effects", "demo",
                    "benchmark")

_DEFAULT_FOLDERS = {"prepare": "records", "train": "network", "fit-head": "model"}


def _output_folder(args: argparse.Namespace) -> Path | None:
    """The output folder of a session command (where its log file ends up), or None if it cannot be told."""
    if getattr(args, "out", None):
        return Path(args.out)
    try:
        config = _load(args)
    except Exception:  # noqa: BLE001 - the command itself reports a bad config
        return None
    if args.command == "impute":  # impute.out_dir or <output_dir>/predictions
        from geximpute.steps.impute import output_dir

        return output_dir(config)
    if args.command == "fit-head":  # where it writes the bundle: impute.model_dir or <output_dir>/model
        return config.model_dir
    # nightly's log stays in output_dir: its dataset (nightly.output) outlives each run
    return Path(config.output_dir) / _DEFAULT_FOLDERS.get(args.command, "")


def _log_name(command: str) -> str:
    """The name of a command's log file in its output folder: ``nightly`` writes into one folder every night, so
    each run's log has its own name (the UTC time it started), none replaced by the next."""
    if command != "nightly":
        return LOG_NAME
    stem, suffix = LOG_NAME.rsplit(".", 1)
    return f"{stem}-nightly-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.{suffix}"


def _run_in_session(args: argparse.Namespace) -> int:
    """Run a Ray command with its own output on the terminal and Ray's and third-party output in a log file.

    The log is written beside the output folder while the step runs (steps replace their folder atomically) and
    moved into it as ``_geximpute.log`` at the end.
    """

    # a plan (impute --plan) writes nothing, not even a log file beside its output folder
    folder = None if getattr(args, "plan", False) else _output_folder(args)
    if folder is None:
        log_path = final = None
    else:
        folder = folder.absolute()  # not resolved: an output is a link to its version, the new one at the end
        final = folder / _log_name(args.command)
        log_path = folder.parent / f".{folder.name}.{LOG_NAME}-{os.getpid()}"
    if log_path is not None:
        try:  # the output's folder must take files: said in one line, before anything runs
            log_path.parent.mkdir(parents=True, exist_ok=True)
            log_path.touch()
        except OSError as exc:
            print(f"geximpute {args.command}: error: cannot write in {log_path.parent}, the folder of the output "
                  f"{folder.name} ({exc.strerror or exc}); "
                  + ("choose a writable --out" if getattr(args, "config", None) is None else
                     "set output_dir (or the step's output) to a writable path (a relative one is taken from the "
                     "config file's folder)"), file=sys.stderr)
            return 2
    status = 2
    try:
        with session(log_path, verbose=args.verbose, quiet=args.quiet):
            if final is not None and not args.quiet:
                echo(f"geximpute {args.command}: log file {final}", err=True)
            ray_before = "ray" in sys.modules and sys.modules["ray"].is_initialized()
            try:
                status = args.func(args)
            except (GeximputeError, FileExistsError) as exc:
                log.debug("geximpute %s: %s", args.command, type(exc).__name__, exc_info=True)
                echo(f"geximpute {args.command}: error: {unwrapped(exc)}", err=True)
                status = 2
            except OSError as exc:  # a step's input missing (train before prepare), a full disk: one line here,
                # the traceback in the session's log (a failure inside Ray or a library is an OSError too)
                log.debug("geximpute %s: %s", args.command, type(exc).__name__, exc_info=True)
                echo(f"geximpute {args.command}: error: {_os_error(unwrapped(exc))}", err=True)
                status = 2
            finally:
                # a Ray this command started stops inside the session, so that its goodbye lines go to the log
                # too; one that was running before (a caller's, a test session's) is left alone
                if not ray_before and "ray" in sys.modules and sys.modules["ray"].is_initialized():
                    sys.modules["ray"].shutdown()
    finally:
        if log_path is not None and log_path.exists():
            if status == 0 and folder.is_dir():
                os.replace(log_path, final)
            else:
                what = "failed" if status != 0 else f"wrote no {folder}"
                print(f"geximpute {args.command}: {what}; Ray's and the libraries' output is in {log_path}",
                      file=sys.stderr)
    return status


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "impute" and not args.plan and (args.workers is not None or args.json):
        parser.error("impute: --workers and --json shape the plan: give them with --plan (an imputation without "
                     "--plan runs impute.predictors actors and prints its summary as text)")
    if args.command == "impute" and args.workers is not None and args.workers < 1:
        parser.error(f"impute: --workers {args.workers}: expected a number of predictor actors >= 1")
    from geximpute.runtime.provenance import versions

    versions()  # the code and libraries this run starts with, as its manifest records them
    if args.command in SESSION_COMMANDS:
        return _run_in_session(args)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(message)s",
        datefmt="%H:%M:%S",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except GeximputeError as exc:
        print(f"geximpute {args.command}: error: {unwrapped(exc)}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"geximpute {args.command}: error: {unwrapped(exc)}", file=sys.stderr)
        return 2
    except OSError as exc:  # a folder that cannot be written, a full disk: the path and the reason, no traceback
        print(f"geximpute {args.command}: error: {_os_error(unwrapped(exc))}", file=sys.stderr)
        return 2


def unwrapped(exc: BaseException) -> BaseException:
    """The error a Ray task or actor raised, out of Ray's wrapper: a ``RayTaskError(InputError)`` is an
    ``InputError`` too, but its text is the worker's whole traceback (coloured), and a ``RayTaskError(OSError)``
    has no errno or file name of its own."""
    exceptions = sys.modules.get("ray.exceptions")  # never imported here: a command without Ray has no wrapper
    while (exceptions is not None and isinstance(exc, exceptions.RayTaskError)
           and isinstance(getattr(exc, "cause", None), BaseException) and exc.cause is not exc):
        exc = exc.cause
    return exc


def _os_error(exc: OSError) -> str:
    """One line for an ``OSError``: its reason, the path, the kind."""
    return f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else "") + f" ({type(exc).__name__})"


def run(entry: Callable[[], int] | None = None) -> None:
    """The ``geximpute`` command: :func:`main` (or ``entry``: a job's entry point, ``geximpute.jobs``), then the
    process ends with its status once what a normal exit runs has run (the ``atexit`` handlers: logging's flush, a
    Ray session's shutdown, temporary folders), without the interpreter's teardown of the native libraries (Arrow,
    torch, htslib), where a thread pool's destructor at times aborted the process after an error had been reported
    (status 134 instead of 2, a few runs in a hundred)."""
    try:
        status = (entry or main)()
    except SystemExit as exc:  # argparse: usage errors, --help, --version
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
        if isinstance(exc.code, str):
            print(exc.code, file=sys.stderr)
    except KeyboardInterrupt:
        status = 130
    except BaseException:  # what the interpreter would print, with its status
        traceback.print_exc()
        status = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    with contextlib.suppress(Exception):  # what native code buffered in C's stdio, as exit() would
        import ctypes

        ctypes.CDLL(None).fflush(None)
    os._exit(status)


if __name__ == "__main__":
    run()
