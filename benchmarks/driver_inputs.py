"""Peak memory of an imputation driver's input stages, in process and without Ray: reading the inputs, the visible
problem, the missing profiles and the targets mask (what ``geximpute impute`` does before it starts Ray's work),
with the code checked out where this runs.

    .venv/bin/python benchmarks/driver_inputs.py make DIR [GENES SAMPLES]   # a counts GCT, GTF, samples, config
    .venv/bin/python benchmarks/driver_inputs.py run DIR/config.yaml [--memory]

``make`` writes GENES genes (default 20,000) x SAMPLES samples (default 17,382, GTEx v8's count: 948 donors x up to
30 tissues) of Poisson counts, 40% of cells empty, on the two chromosomes of a genome FASTA it also writes (N only).
``run`` prints each stage's seconds, the largest numpy allocation it traced and the process's peak resident memory
(VmHWM; Arrow's own buffers count there, not in the traced figure). Run it in a fresh process per measurement.
Where the checked-out code keeps the matrix in a file (``load_dataset``'s ``matrix``, as ``impute`` does since the
matrix moved to disk), it is written under a temporary folder beside the config; ``--memory`` keeps it in memory
as before.
"""

import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np

TAKE_OVER: dict = {}


def make(folder: Path, n_genes: int = 20_000, n_samples: int = 17_382) -> None:
    import pyarrow as pa
    import pyarrow.csv as pacsv

    folder.mkdir(parents=True, exist_ok=True)
    half, step = (n_genes + 1) // 2, 1600
    length = half * step + 10_000
    with open(folder / "genome.fa", "w") as fh:
        for chrom in ("chr1", "chr2"):
            fh.write(f">{chrom}\n")
            for lo in range(0, length, 1_000_000):
                fh.write("N" * min(1_000_000, length - lo) + "\n")
    with open(folder / "genes.gtf", "w") as fh:
        for g in range(n_genes):
            tss = 1000 + (g % half) * step
            fh.write(f'{"chr1" if g < half else "chr2"}\tbench\tgene\t{tss}\t{tss + 1000}\t.\t{"+-"[g % 2]}\t.\t'
                     f'gene_id "ENSG{g:011d}"; gene_type "protein_coding"; gene_name "GENE{g}";\n')
    rng = np.random.default_rng(0)
    cells = [(d, t) for d in range(max(1, n_samples // 18)) for t in range(30)]
    picked = sorted(rng.choice(len(cells), size=n_samples, replace=False))
    with open(folder / "samples.tsv", "w") as fh:
        fh.write("sample_id\tdonor_id\ttissue\n")
        for j, c in enumerate(picked):
            fh.write(f"S{j:05d}\tD{cells[c][0]:04d}\tT{cells[c][1]:02d}\n")
    names = ["Name", "Description"] + [f"S{j:05d}" for j in range(n_samples)]
    with open(folder / "expression.gct", "wb") as out:
        out.write(f"#1.2\n{n_genes}\t{n_samples}\n".encode())
        for lo in range(0, n_genes, 1000):
            n = min(1000, n_genes - lo)
            counts = rng.poisson(rng.gamma(0.5, 400.0, size=(n, 1)), size=(n, n_samples))
            empty = rng.random((n, n_samples)) < 0.4
            columns = [pa.array([f"ENSG{g:011d}" for g in range(lo, lo + n)]),
                       pa.array([f"GENE{g}" for g in range(lo, lo + n)])]
            columns += [pa.array(counts[:, j], mask=empty[:, j]) for j in range(n_samples)]
            pacsv.write_csv(pa.table(columns, names=names), out,
                            pacsv.WriteOptions(include_header=lo == 0, delimiter="\t", quoting_style="none"))
    (folder / "config.yaml").write_text(
        "name: driver-inputs\ninputs:\n  genome: genome.fa\n  genes: genes.gtf\n  expression: expression.gct\n"
        "  samples: samples.tsv\n  scale: counts\nexpression:\n  counts_normalisation: median_ratio\n")


def _take_over() -> dict:
    """The keywords that hand the matrix over, where the checked-out code has them (before `consume`: none)."""
    import inspect

    from geximpute.io.dataset import load_dataset
    from geximpute.science.problem import make_problem
    from geximpute.steps.impute import add_missing_profiles

    found = {}
    if "matrix" in inspect.signature(load_dataset).parameters:
        found["load_dataset"] = {}
    if "consume" in inspect.signature(make_problem).parameters:
        found["make_problem"] = {"consume": True}
    if "in_place" in inspect.signature(add_missing_profiles).parameters:
        found["add_missing_profiles"] = {"in_place": True}
    return found


def status(key: str) -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith(key)).split()[1]) // 1024


def run(config_path: str, memory: bool = False) -> None:
    import tempfile

    from geximpute.config import load_config
    from geximpute.io.dataset import load_dataset
    from geximpute.science.problem import make_problem
    from geximpute.steps.impute import add_missing_profiles, target_mask

    config = load_config(config_path)
    global TAKE_OVER
    TAKE_OVER = _take_over()
    if memory:
        TAKE_OVER.pop("load_dataset", None)
    scratch = tempfile.TemporaryDirectory(dir=Path(config_path).parent, prefix=".matrix-")
    if "load_dataset" in TAKE_OVER:
        TAKE_OVER["load_dataset"] = {"matrix": Path(scratch.name) / "expression.f32"}
    print(f"matrices handed over: {sorted(TAKE_OVER) or 'no'}")
    tracemalloc.start()

    def mark(name: str, t0: float) -> None:
        _, peak = tracemalloc.get_traced_memory()
        print(f"{name:22s} {time.perf_counter() - t0:6.1f} s   arrays at most {peak / 2**20:7.0f} MiB   "
              f"VmHWM {status('VmHWM'):6d} MiB", flush=True)
        tracemalloc.reset_peak()

    print(f"RSS at the start {status('VmRSS')} MiB")
    t0 = time.perf_counter()
    dataset = load_dataset(config, with_variants=False, **TAKE_OVER.get("load_dataset", {}))
    mark("read the inputs", t0)
    print(f"  the expression matrix: {dataset.expression.values.shape}, "
          f"{dataset.expression.values.nbytes / 2**20:.0f} MiB float32"
          f"{' in a file' if 'load_dataset' in TAKE_OVER else ''}")
    t0 = time.perf_counter()
    # as `impute` does with inputs it reads itself: the reader's matrix scaled in place, then widened in place
    problem, _ = make_problem(dataset, hidden_mask=False, genomes=False, **TAKE_OVER.get("make_problem", {}))
    del dataset
    mark("make_problem", t0)
    t0 = time.perf_counter()
    problem, _ = add_missing_profiles(problem, (), (), **TAKE_OVER.get("add_missing_profiles", {}))
    mark("add_missing_profiles", t0)
    t0 = time.perf_counter()
    target_mask(problem, (), (), False)
    mark("target_mask", t0)
    scratch.cleanup()


if __name__ == "__main__":
    if sys.argv[1] == "make":
        make(Path(sys.argv[2]), *(int(a) for a in sys.argv[3:5]))
    else:
        run(sys.argv[2], "--memory" in sys.argv[3:])
