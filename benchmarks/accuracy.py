"""Every accuracy table of ``docs/benchmarks.md``, regenerated at HEAD.

Two modes:

``--baselines-only`` (numpy, no Ray, minutes): for each real task of issue 13 and each seed, the hidden set of
``geximpute evaluate``, every classical baseline with its settings tuned on a validation split of the visible data,
scored on the hidden entries; context records (for ``distance`` and ``tissue_donor``) are built in process with
the same :func:`geximpute.science.context.build_context` that ``prepare`` runs in Ray Data.

default (full): ``geximpute evaluate --seeds ...`` of each task (the hybrid, its ablations and every baseline),
each run under the shared Ray lock ``/tmp/geximpute-ray.lock``; the tables are read from the runs'
``summary.json``.

Either way the tables (mean +/- sd over seeds, per-seed paired bootstrap intervals where the hybrid ran) are
written between the ``<!-- accuracy:begin -->`` and ``<!-- accuracy:end -->`` markers of ``docs/benchmarks.md``
(``--write-docs``) or printed, with the commit they were measured at.

    .venv/bin/python benchmarks/accuracy.py --baselines-only --seeds 0 1 2 --write-docs
    .venv/bin/python benchmarks/accuracy.py --seeds 0 1 2 --out /tmp/accuracy --write-docs

``--runs LABEL=DIR[@COMMIT][,DIR[@COMMIT]...] ...`` builds a task's table from ``geximpute evaluate`` folders that
already ran (each ``DIR`` an ``--out`` of ``evaluate --seeds`` or of one seed), naming under it the commit each ran
at (from the runs' manifests, or ``@COMMIT`` for runs made before manifests recorded it); without ``--tasks``
only the tasks given there are tabulated (none is evaluated).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]

#: (label, config, task) of the three real tasks of issue 13
TASKS = (
    ("v8-samples", "configs/gtex-v8-samples.yaml", "samples"),
    ("medians-entries", "configs/gtex-medians.yaml", "entries"),
    ("medians-genes", "configs/gtex-medians.yaml", "genes"),
)
BASELINES = ("distance", "row_tissue", "matrix_completion", "tissue_donor", "pairwise_regression",
             "cross_gene_regression", "iterative_ridge", "chained_boosting", "local_regression", "tensor_factorisation",
             "promoter_composition", "gene_family")
BEGIN, END = "<!-- accuracy:begin -->", "<!-- accuracy:end -->"


def commit() -> str:
    """The commit the tables are built at (the one every geximpute manifest records)."""
    from geximpute.runtime.provenance import source_commit

    return source_commit() or "unknown"


def baselines_only(config_path: str, task: str, seed: int) -> dict:
    """One seed of one task with the baselines only, in process: a ``metrics.json``-shaped dictionary."""
    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science.baselines import composition_of, make_methods, tune_settings
    from geximpute.science.context import ContextIndex, build_context
    from geximpute.science.metrics import METRICS_VERSION, score
    from geximpute.science.problem import make_problem
    from geximpute.steps.prepare import promoter_tables

    t0 = time.perf_counter()
    from geximpute.steps.evaluate import seeded_config

    # replicate `seed` as `evaluate --seeds` runs it: hidden entries and the model's draws
    config = seeded_config(load_config(REPO / config_path, [f"evaluation.task={task}"]), seed)
    dataset = load_dataset(config, with_variants=False)
    problem, truth = make_problem(dataset)
    promoters, gene_promoters = promoter_tables(dataset, problem.gene_ids)
    composition = composition_of(problem.gene_ids, gene_promoters, promoters, config.promoter.upstream)
    t = time.perf_counter()
    baselines, tuning = tune_settings(problem, BASELINES, config.baselines, task, seed=config.evaluation.seed,
                                      whole_donors=config.evaluation.whole_donors, composition=composition,
                                      k_neighbours=config.context.k_neighbours,
                                      min_donors=config.evaluation.min_donors)
    seconds = {"load": round(t - t0, 2), "tuning": round(time.perf_counter() - t, 2)}
    order = np.lexsort((truth.sample_index, truth.gene_index))
    gi, si, observed = truth.gene_index[order], truth.sample_index[order], truth.values[order].astype(np.float64)
    t = time.perf_counter()
    records = build_context(ContextIndex(problem, genetic=None), gi, si, np.ones(len(gi), dtype=bool),
                            config.context.k_neighbours, config.context.max_distance)
    seconds["context"] = round(time.perf_counter() - t, 2)
    # records come back in their own order: line the truth up with them by (gene, sample)
    n_s = problem.n_samples
    key = gi.astype(np.int64) * n_s + si
    want = records["gene_index"].to_numpy().astype(np.int64) * n_s + records["sample_index"].to_numpy()
    pos = np.minimum(np.searchsorted(key, want), max(len(key) - 1, 0))  # a key past the last: no match
    if len(want) != len(key) or not np.array_equal(key[pos], want):
        raise RuntimeError("the context records do not match the hidden entries one to one")
    gi, si, observed = gi[pos], si[pos], observed[pos]
    methods, skipped = make_methods(BASELINES, baselines, len(problem.donors), seed=config.seed,
                                    composition=composition, task=task, gene_names=problem.gene_names is not None)
    tissue, donor = problem.tissue_index[si], problem.donor_index[si]
    has_seq = ~np.isnan(composition).any(axis=1)
    results = {}
    for method in methods:
        t = time.perf_counter()
        method.fit(problem)
        pred = np.asarray(method.predict(records), np.float64)
        seconds[method.name] = round(time.perf_counter() - t, 2)
        results[method.name] = score(pred, observed, gene=gi, tissue=tissue, donor=donor,
                                     tissue_names=problem.tissues, min_donors=config.evaluation.min_donors)
        m = has_seq[gi]
        if m.any() and not m.all():
            from geximpute.science.metrics import _pearson

            results[method.name]["subsets"] = {
                label: {"n": int(k.sum()), "genes": int(len(np.unique(gi[k]))), "pearson": _pearson(pred[k],
                                                                                                   observed[k]),
                        "rmse": float(np.sqrt(np.mean((pred[k] - observed[k]) ** 2)))}
                for label, k in (("with_promoter", m), ("without_promoter", ~m))}
    seconds["total"] = round(time.perf_counter() - t0, 2)
    return {"metrics_version": METRICS_VERSION, "model_seed": config.seed, "commit": commit(),
            "dataset": config.name, "task": task, "seed": seed, "n_hidden": int(len(observed)), "methods": results,
            "skipped": skipped, "baselines": {"tuning": tuning},
            "sequence": {"genes": problem.n_genes, "genes_with_sequence": int(has_seq.sum()),
                         "hidden_genes": int(len(np.unique(gi))),
                         "hidden_genes_with_sequence": int(has_seq[np.unique(gi)].sum())},
            "seconds": seconds}


def full(config_path: str, task: str, seeds: list[int], out: Path) -> dict:
    """``geximpute evaluate --seeds`` of one task under the shared Ray lock; its ``summary.json``."""
    folder = out / Path(config_path).stem / task
    cmd = ["flock", "/tmp/geximpute-ray.lock", sys.executable, "-m", "geximpute.apps.cli", "evaluate", "--config",
           config_path, "--set", f"evaluation.task={task}", "--out", str(folder), "--force", "--seeds",
           *map(str, seeds)]
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0")
    subprocess.run(cmd, cwd=REPO, check=True, env=env)
    return json.loads((folder / "summary.json").read_text())


def finished(spec: str) -> tuple[str, list[dict], str, str]:
    """(label, the metrics of every seed, the commit(s), the command) of a ``--runs`` entry
    ``LABEL=DIR[@COMMIT][,DIR[@COMMIT]...]``."""
    from geximpute.config import load_config

    label, _, rest = spec.partition("=")
    configs = {name: (config_path, task) for name, config_path, task in TASKS}
    if label not in configs:
        raise SystemExit(f"--runs {spec}: {label!r} is not one of {', '.join(configs)}")
    config_path, task = configs[label]
    dataset = load_config(REPO / config_path).name
    runs, made_at, settings, raw = [], {}, {}, {}
    for part in rest.split(","):
        folder, _, given = part.partition("@")
        folder = Path(folder)
        seeds = sorted(folder.glob("seed_*/metrics.json")) or sorted(folder.glob("metrics.json"))
        if not seeds:
            raise SystemExit(f"--runs {spec}: no metrics.json in {folder} or its seed_* folders")
        for path in seeds:
            run = json.loads(path.read_text())
            manifest = json.loads((path.parent / "_manifest.json").read_text())
            if (run["task"], run["dataset"]) != (task, dataset):
                raise SystemExit(f"--runs {spec}: {path} is task {run['task']!r} of {run['dataset']!r}; {label} is "
                                 f"task {task!r} of {dataset!r} ({config_path})")
            recorded = manifest["versions"].get("geximpute_commit")
            if given and recorded and recorded != "unknown" and not recorded.startswith(given[:7]):
                raise SystemExit(f"--runs {spec}: {path.parent} was made at {recorded} by its manifest, not {given}")
            runs.append(run)
            made_at[run["seed"]] = given or recorded or "unknown"
            settings[run["seed"]] = (path.parent, _settings(manifest["config"]))
            raw.setdefault(run["seed"], manifest["config"])
    runs.sort(key=lambda r: r["seed"])
    seeds = [r["seed"] for r in runs]
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--runs {spec}: seed(s) {sorted({s for s in seeds if seeds.count(s) > 1})} in more than "
                         "one folder; give each seed once")
    first, (where, reference) = seeds[0], settings[seeds[0]]
    for seed in seeds[1:]:
        other, theirs = settings[seed]
        differ = sorted(k for k in set(reference) | set(theirs) if reference.get(k) != theirs.get(k))
        if differ:
            # a setting only one of them has: a geximpute with another config schema (a setting added since)
            absent = [k for k in differ if (k in reference) != (k in theirs)]
            raise SystemExit(f"--runs {spec}: {other} (seed {seed}) was run with other settings than {where} (seed "
                             f"{first}): {', '.join(differ[:8])}"
                             + (f" ({', '.join(absent[:4])} in one config only: runs of geximpute versions with "
                                "other settings)" if absent else "")
                             + "; a table summarises one evaluation's seeds")
    ablations = json.loads(reference["evaluation.ablations"])
    command = (f".venv/bin/geximpute evaluate --config {config_path} --set evaluation.task={task}"
               + ("" if ablations else " --set evaluation.ablations=false")
               + "".join(f" --set {key}={value}" for key, value in _set_beside(config_path, task, raw[first], where))
               + f" --seeds {' '.join(str(s) for s in seeds)}")
    commits = sorted(set(made_at.values()))
    where_made = (f"commit `{commits[0]}`" if len(commits) == 1 else
                  "; ".join(f"seed {s} at commit `{made_at[s]}`" for s in seeds))
    return label, runs, where_made, command


def _set_beside(config_path: str, task: str, run_config: dict, where: Path) -> list[tuple[str, str]]:
    """The ``--set`` pairs that give a run's config (its manifest's) from ``config_path`` at HEAD with
    ``evaluation.task`` set to ``task`` (the printed command must reproduce the run, not the file's defaults),
    settings compared as resolved (``train.fold_fraction``); a setting the file's config lacks or the run lacks
    (another config schema) is refused by name."""
    from geximpute.config import fold_fraction_of, load_config

    head = load_config(REPO / config_path).to_dict()
    head["evaluation"]["task"] = task
    here, settings = _settings(head), _settings(run_config)
    for config, flat in ((head, here), (run_config, settings)):
        flat["train.fold_fraction"] = json.dumps(fold_fraction_of(config))
    differ = sorted(k for k in set(here) | set(settings)
                    if here.get(k) != settings.get(k) and k not in ("evaluation.task", "evaluation.ablations"))
    absent = [k for k in differ if (k in here) != (k in settings)]
    if absent:
        raise SystemExit(f"{where}: run with a config of another schema than {config_path} at HEAD (settings "
                         f"{', '.join(absent[:6])} in one of them only): its command cannot be written; run it again")
    pairs = []
    for key in differ:
        value = json.loads(settings[key])
        text = ("null" if value is None else str(value).lower() if isinstance(value, bool)
                else value if isinstance(value, str) else json.dumps(value))
        pairs.append((key, text if " " not in text else f"'{text}'"))
    return pairs


#: settings that differ between the seeds of one evaluation (``evaluate --seeds s`` sets both seeds to the config's
#: + s) or that do not move a figure (where it ran, with how many CPUs)
_PER_SEED = ("seed", "evaluation.seed", "output_dir")


def _settings(config: dict, prefix: str = "") -> dict:
    """A manifest's config as {dotted key: value}, without :data:`_PER_SEED` and the ``ray`` section."""
    out = {}
    for key, value in config.items():
        name = prefix + key
        if name in _PER_SEED or name == "ray":
            continue
        if isinstance(value, dict):
            out.update(_settings(value, name + "."))
        else:
            out[name] = json.dumps(value, sort_keys=True)
    return out


def table(summary: dict, label: str, command: str) -> str:
    """Markdown of one task: mean +/- sd over seeds per method, and the paired comparisons."""
    from geximpute.science.comparisons import TASK_METRIC, seeds_report

    metric, _ = TASK_METRIC[summary["task"]]
    text = seeds_report(summary).replace("# ", f"### {label}: ", 1)
    return f"{text}\nHeadline metric of this task: `{metric}`. Command: `{command}`\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--baselines-only", action="store_true", help="numpy baselines only, no Ray")
    parser.add_argument("--tasks", nargs="+", default=None, choices=[t[0] for t in TASKS],
                        help="the tasks to tabulate (default: those given by --runs, else all three)")
    parser.add_argument("--out", default="/tmp/accuracy", help="folder of the runs and their JSON")
    parser.add_argument("--write-docs", action="store_true", help="replace the accuracy block of docs/benchmarks.md")
    parser.add_argument("--reuse", action="store_true",
                        help="with --baselines-only: read the runs saved in --out by an earlier call instead of "
                             "running them again (only the tables are rebuilt)")
    parser.add_argument("--runs", nargs="+", default=[], metavar="LABEL=DIR[@COMMIT][,...]",
                        help="build these tasks' tables from finished `geximpute evaluate` folders (see above)")
    args = parser.parse_args()
    from geximpute.science.comparisons import summarise_seeds
    from geximpute.science.metrics import METRICS_VERSION

    given = {}
    for spec in args.runs:
        label, runs, made_at, command = finished(spec)
        given[label] = (runs, made_at, command)
    if args.tasks is None:
        # --runs alone tabulates those runs; it does not start full evaluations of the other tasks
        args.tasks = list(given) if given else [t[0] for t in TASKS]

    if args.reuse and not args.baselines_only:
        parser.error("--reuse reads saved --baselines-only runs; full evaluations are tabulated with --runs")
    if args.write_docs and sorted(args.tasks) != sorted(t[0] for t in TASKS):
        parser.error("--write-docs replaces the whole accuracy block: tabulate every task "
                     f"({', '.join(t[0] for t in TASKS)}), or its other tables would be lost")
    # resolved: the full evaluations run from the repository's root and are read back from here
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    sections = []
    for label, config_path, task in TASKS:
        if label not in args.tasks:
            continue
        seeds = " ".join(map(str, args.seeds))
        if label in given:
            runs, made_at, command = given[label]
            summary = summarise_seeds(runs)
            extra = (f"- measured at {made_at}; "
                     + "; ".join(f"seed {r['seed']} {r['seconds']['total']:.0f} s" for r in runs) + "\n")
        elif args.baselines_only:
            saved = out / f"{label}-baselines.json"
            runs = (json.loads(saved.read_text()) if args.reuse else
                    [baselines_only(config_path, task, s) for s in args.seeds])
            if args.reuse and any(r.get("metrics_version") != METRICS_VERSION for r in runs):
                raise SystemExit(f"{saved}: saved by a geximpute of another metrics version than "
                                 f"{METRICS_VERSION}; run without --reuse")
            saved.write_text(json.dumps(runs, indent=1))
            summary = summarise_seeds(runs)
            # the seeds and commits of the runs tabulated (saved ones under --reuse), not of this call
            made = sorted({str(r.get("commit", "unknown")) for r in runs})
            command = (".venv/bin/python benchmarks/accuracy.py --baselines-only --tasks "
                       f"{label} --seeds {' '.join(str(r['seed']) for r in runs)}")
            seq = runs[0]["sequence"]
            extra = "\n".join(
                f"- seed {r['seed']}: tuned settings "
                + "; ".join(f"`{n}` " + ", ".join(f"{k} {v}" for k, v in row["chosen"].items())
                            + (f" (by {row['metric']})" if "metric" in row else "")
                            for n, row in r["baselines"]["tuning"].items())
                + f"; {r['seconds']['total']:.0f} s in all (tuning {r['seconds']['tuning']:.0f} s)"
                for r in runs)
            extra += f"\n- measured at commit {', '.join(f'`{c}`' for c in made)}"
            extra += (f"\n- genes with a promoter sequence: {seq['genes_with_sequence']:,} of {seq['genes']:,}; "
                      f"hidden genes with one (seed {runs[0]['seed']}): {seq['hidden_genes_with_sequence']:,} of "
                      f"{seq['hidden_genes']:,}\n")
        else:
            summary = full(config_path, task, args.seeds, out)
            command = (f".venv/bin/geximpute evaluate --config {config_path} --set evaluation.task={task} "
                       f"--out {out / Path(config_path).stem / task} --seeds {seeds}")
            extra = ""
        (out / f"{label}-summary.json").write_text(json.dumps(summary, indent=1))
        sections.append(table(summary, label, command) + ("\n" + extra if extra else ""))
        print(sections[-1], flush=True)
    load = os.getloadavg()
    when = (f"Tables rebuilt at commit `{commit()}` from the runs saved in `{out}` (`--reuse`)" if args.reuse else
            f"Measured at commit `{commit()}`")
    mode = "baselines only" if args.baselines_only else "full evaluations"
    if given:
        when = (f"Tables of {', '.join(given)} built at commit `{commit()}` from finished `geximpute evaluate` runs "
                f"(`.venv/bin/python benchmarks/accuracy.py {' '.join(sys.argv[1:])}`; each table names the commit it "
                "was measured at)"
                + ("" if len(given) == len(sections) else f"; the others measured at commit `{commit()}`"))
        mode = "full evaluations" if len(given) == len(sections) else mode
    load_text = (f"; load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1/5/15 min)"
                 if len(given) < len(sections) else "")
    block = "\n".join([BEGIN, "", f"{when} by `benchmarks/accuracy.py` ({mode}){load_text}.", "", *sections, END])
    if args.write_docs:
        path = REPO / "docs" / "benchmarks.md"
        text = path.read_text()
        if BEGIN in text and END in text:
            text = text[: text.index(BEGIN)] + block + text[text.index(END) + len(END):]
        else:
            text = text.rstrip() + "\n\n## Accuracy at HEAD (issue 13)\n\n" + block + "\n"
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
