"""Donors' genomes as the model sees them: promoter haplotypes per (gene, donor) and cis-variant dosages.

:class:`DonorGenomes` joins the personal genomes of a VCF (:mod:`geximpute.science.haplotypes`) to the problem's genes
and
donors. It holds, for every problem gene and donor, the rows of the donor's two promoter haplotypes in one table of
unique sequences (the reference row for donors without a genome and for genes without variants), and the
dosage of every ALT allele of every variant site inside the gene's cis window (each ALT of a multi-allelic site a
variant of its own: :func:`allele_links`) (``genotypes.cis_window`` bases either side of the TSS, or
the promoter window when that is null; NaN where the call is missing or the donor has no genome). The CNN reads
the promoter haplotypes; the cis-genetic score and the ``elastic_net`` baseline read the cis-window dosages.

:func:`genetic_scores` turns visible expression into a per-(gene, donor) cis-genetic score: for each gene, a ridge
regression of the donors' visible expression residuals (value minus the gene's mean in that tissue, averaged over
the donor's visible tissues) on their cis-variant dosages, evaluated for every donor with a genome; then a second
ridge of what that leaves on the donor's copies (0-2) of each distinct promoter haplotype that at least
:data:`HAPLOTYPE_MIN_COPIES` fitted haplotypes carry. Dosages are additive across sites; a haplotype's own effect is
not (two variants that each break the same motif on one haplotype break it once), and each stage chooses its
penalty by leave-one-out error, "no effect" included, so where haplotypes add nothing they get zero. Both are
fitted on visible values only, so for a held-out donor the score uses nothing but the donor's genotypes.

Missing calls follow ``genotypes.missing`` (``mean``: NaN here, the donors' mean dosage when fitted and scored;
``reference``: dosage 0; ``error``: refused). Dosages do not depend on phase.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geximpute import schema as S
from geximpute.errors import InputError
from geximpute.io.chroms import chrom_key
from geximpute.science.groups import group_sums
from geximpute.science.haplotypes import build_haplotypes, is_sequence_allele
from geximpute.science.hashing import mix64

log = logging.getLogger(__name__)


@dataclass
class DonorGenomes:
    """Personal promoter haplotypes and cis-variant dosages of the problem's donors.

    Attributes:
        sequences: P unique promoter sequences (reference windows and every donor haplotype), 5'->3'; None where
            they were handed to a sink as they were built (:func:`donor_genomes`), as imputation does.
        promoter_ids: (P,) ids of ``sequences`` (sha1 prefix, as in ``promoters.parquet``); None likewise.
        reference_row: (G,) int64 row of each problem gene's reference window, -1 where it has none.
        rows: (G, D, 2) int32 rows of each donor's two haplotypes (``reference_row`` where the donor carries the
            reference or has no genome; -1 where the gene has no window).
        has_genome: (D,) bool, the donor is in the VCF.
        site_ptr: (G + 1,) int64; the cis-window sites of gene g are ``site_ptr[g]:site_ptr[g + 1]`` of
            ``site_index`` and ``dosage_row`` (a site in two genes' windows appears once per gene).
        site_index: (M,) int64 row of each site in the VCF's site table (a multi-allelic site once per counted
            ALT allele: see ``site_allele``).
        dosage: (U, D) float32 count (0, 1, 2) of one ALT allele of a site, NaN where missing or the donor has
            no genome; :meth:`gene_dosage` gives a gene's rows.
        report: haplotype construction counts (:func:`geximpute.science.haplotypes.build_haplotypes`).
        dosage_row: (M,) int64 row in ``dosage`` of each site link; None when ``dosage`` has one row per link.
        site_allele: (M,) int8 the ALT allele (1 = the first ALT) each link counts; None where every link counts
            its site's first ALT (tables built by hand of biallelic sites).
        in_promoter: (M,) bool, the link's site lies in its gene's promoter window (the sites the haplotypes are
            built from); None: every link's does (tables built by hand).
    """

    sequences: list[str] | None
    promoter_ids: list[str] | None
    reference_row: np.ndarray
    rows: np.ndarray
    has_genome: np.ndarray
    site_ptr: np.ndarray
    site_index: np.ndarray
    dosage: np.ndarray
    report: dict
    dosage_row: np.ndarray | None = None
    site_allele: np.ndarray | None = None
    in_promoter: np.ndarray | None = None

    def link_dosage(self, lo: int, hi: int) -> np.ndarray:
        """(hi - lo, D) float32 dosages of the site links ``lo:hi``."""
        if self.dosage_row is None:
            return self.dosage[lo:hi]
        return self.dosage[self.dosage_row[lo:hi]]

    def gene_dosage(self, g: int) -> np.ndarray:
        """(m, D) float32 dosages of gene ``g``'s cis-window sites."""
        return self.link_dosage(int(self.site_ptr[g]), int(self.site_ptr[g + 1]))

    def gene_range(self, lo: int, hi: int) -> DonorGenomes:
        """The genomes of genes ``lo:hi`` alone, what :func:`genetic_scores` reads of them (haplotype rows, sites,
        the dosages of those sites: copies; no sequences), e.g. for a task that fits one chromosome's scores."""
        a, b = int(self.site_ptr[lo]), int(self.site_ptr[hi])
        if self.dosage_row is None:
            dosage, dosage_row = self.dosage[a:b].copy(), None
        else:  # the rows these links read, renumbered
            used, dosage_row = np.unique(self.dosage_row[a:b], return_inverse=True)
            dosage = self.dosage[used]
        return DonorGenomes(sequences=None, promoter_ids=None, reference_row=self.reference_row[lo:hi].copy(),
                            rows=self.rows[lo:hi].copy(), has_genome=self.has_genome,
                            site_ptr=self.site_ptr[lo : hi + 1] - a, site_index=self.site_index[a:b].copy(),
                            dosage=dosage, report={},
                            dosage_row=None if dosage_row is None else dosage_row.astype(np.int64),
                            site_allele=None if self.site_allele is None else self.site_allele[a:b].copy(),
                            in_promoter=None if self.in_promoter is None else self.in_promoter[a:b].copy())

    def link_allele(self, link: int) -> int:
        """The ALT allele (1 = the first) that site link ``link`` counts."""
        return 1 if self.site_allele is None else int(self.site_allele[link])

    def personal_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(gene, donor) indices, in row-major order, of the pairs whose haplotypes differ from the reference."""
        differs = np.any(self.rows != self.reference_row[:, None, None], axis=2) & (self.rows >= 0).all(axis=2)
        return np.nonzero(differs)


def window_bounds(tss: np.ndarray, strand: np.ndarray, upstream: int, downstream: int) -> tuple[np.ndarray, ...]:
    """1-based inclusive genomic (start, end) of promoter windows, as :meth:`geximpute.io.fasta.Genome.window`."""
    plus = np.asarray(strand) > 0
    start = np.where(plus, tss - upstream, tss - downstream + 1)
    end = np.where(plus, tss + downstream - 1, tss + upstream)
    return start.astype(np.int64), end.astype(np.int64)


def promoter_sites(
    chroms: np.ndarray, start: np.ndarray, end: np.ndarray, site_chroms: np.ndarray, site_pos: np.ndarray,
    site_end: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(site_ptr (G + 1,), site_index (M,)): the sites whose position lies in each gene's window; with
    ``site_end`` (the last base of each site's REF), the sites whose REF span meets it (a deletion from just
    upstream of a promoter window is edited into the donors' haplotypes, so its dosage is linked too).

    Sites must be sorted by position within each chromosome (the VCF reader guarantees it).
    """
    parts, counts = [], np.zeros(len(chroms), dtype=np.int64)
    by_chrom: dict[str, np.ndarray] = {}
    for c in np.unique(site_chroms):
        by_chrom[c] = np.flatnonzero(site_chroms == c)
    reach = {c: int((site_end[rows] - site_pos[rows]).max(initial=0)) if site_end is not None else 0
             for c, rows in by_chrom.items()}
    for g, (c, lo, hi) in enumerate(zip(chroms, start, end, strict=True)):
        rows = by_chrom.get(c)
        if rows is None:
            parts.append(np.zeros(0, np.int64))
            continue
        pos = site_pos[rows]
        a, b = np.searchsorted(pos, lo - reach[c], "left"), np.searchsorted(pos, hi, "right")
        found = rows[a:b]
        if site_end is not None:
            found = found[site_end[found] >= lo]
        parts.append(found)
        counts[g] = len(found)
    ptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    index = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
    return ptr, index


def problem_donors_of(variants: Any, donors: Sequence[str]) -> Any:
    """``variants`` with the problem's donors alone (a cohort VCF holds people the expression does not: their
    missing calls or ambiguous phases refused the run under ``genotypes.missing``/``unphased: error``, and their
    haplotypes were built for nothing)."""
    wanted = set(donors)
    keep = [i for i, sample in enumerate(variants.samples) if sample in wanted]
    if len(keep) == len(variants.samples):
        return variants
    return dataclasses.replace(
        variants, samples=[variants.samples[i] for i in keep], genotypes=variants.genotypes[:, keep],
        phased=variants.phased[:, keep], phase_set=None if variants.phase_set is None else variants.phase_set[:, keep])


def donor_genomes(dataset, problem, sink: Callable[[list[str], int], None] | None = None,
                  part_rows: int = 8192) -> DonorGenomes | None:
    """The :class:`DonorGenomes` of ``problem``'s genes and donors, or None without ``inputs.variants``.

    Args:
        dataset: the loaded inputs (:class:`geximpute.io.dataset.Dataset`) with its genome and variants (its
            expression is not read).
        problem: the visible problem whose gene and donor order the result follows.
        sink, part_rows: hand the promoter sequences to ``sink`` in parts of consecutive rows as they are built,
            and keep none (``sequences`` and ``promoter_ids`` of the result are then None; see
            :func:`geximpute.science.haplotypes.build_haplotypes`).
    """
    variants = dataset.variants
    if variants is None or dataset.genome is None:
        return None

    p = dataset.config.promoter
    policy = dataset.config.genotypes
    variants = problem_donors_of(variants, problem.donors)
    genes = pa.table({
        S.GENE_ID: pa.array(problem.gene_ids, pa.string()),
        S.CHROM: pa.array(problem.chroms, pa.string()),
        S.TSS: pa.array(problem.tss, pa.int64()),
        S.STRAND: pa.array(np.where(problem.strand > 0, "+", "-"), pa.string()),
    })
    haps = build_haplotypes(dataset.genome, genes, variants, p,
                            missing="error" if policy.missing == "error" else "reference", unphased=policy.unphased,
                            sink=sink, part_rows=part_rows)
    vcf_donor = {d: i for i, d in enumerate(haps.donors)}
    col = np.array([vcf_donor.get(d, -1) for d in problem.donors], dtype=np.int64)
    has = col >= 0
    ref = np.asarray(haps.reference_row, dtype=np.int64)
    # every slot the reference row, then the donors with a genome their own (int32 throughout: (G, D, 2))
    rows = np.broadcast_to(ref.astype(np.int32)[:, None, None], (len(ref), len(problem.donors), 2)).copy()
    if has.any():
        rows[:, has, :] = haps.rows[:, col[has], :]

    start, end = cis_bounds(problem.tss, problem.strand, p.upstream, p.downstream, policy.cis_window)
    sites = variants.sites
    site_pos = sites["pos"].to_numpy()
    ref_len = pc.utf8_length(sites[S.REF]).to_numpy(zero_copy_only=False)
    # a site whose REF reaches into the window (a deletion from just upstream) is edited into the haplotypes: its
    # dosage is linked as well (linked by its position alone, it changed the haplotypes and had no dosage)
    ptr, index = promoter_sites(problem.chroms, start, end, np.asarray(sites[S.CHROM].to_pylist(), dtype=object),
                                site_pos, site_end=site_pos + ref_len - 1)
    ptr, index, allele = allele_links(ptr, index, sites[S.ALT])
    # which links' sites the promoter haplotypes are built from: a missing call there leaves them unknown
    window_start, window_end = window_bounds(problem.tss, problem.strand, p.upstream, p.downstream)
    link_gene = np.repeat(np.arange(len(ptr) - 1), np.diff(ptr))
    link_pos = site_pos[index] if len(index) else np.zeros(0, np.int64)
    link_end = link_pos + (ref_len[index] if len(index) else 0) - 1
    in_promoter = (link_end >= window_start[link_gene]) & (link_pos <= window_end[link_gene])
    # one dosage row per (site, ALT allele) that some gene's window links to
    used_key, dosage_row = np.unique(index * _ALLELE_SLOTS + allele, return_inverse=True)
    used, used_allele = used_key // _ALLELE_SLOTS, used_key % _ALLELE_SLOTS
    used_sites = np.unique(used)  # each VCF site once, however many of its ALTs count
    if policy.missing == "error":
        refuse_missing(variants, used_sites, ptr, index, problem.gene_ids, col[has])
    alt = allele_dosage(variants.genotypes[used], used_allele)  # (U, n_vcf)
    if policy.missing == "reference":
        alt = np.nan_to_num(alt, nan=0.0)
    dosage = np.full((len(used), len(problem.donors)), np.nan, dtype=np.float32)
    if has.any():
        dosage[:, has] = alt[:, col[has]]
    genomes = DonorGenomes(
        sequences=None if sink else list(haps.sequences), promoter_ids=None if sink else list(haps.promoter_ids),
        reference_row=ref, rows=rows,
        has_genome=has, site_ptr=ptr, site_index=index, dosage=dosage,
        report={**haps.report, "n_problem_donors_with_genome": int(has.sum()),
                "n_problem_donors": len(problem.donors), "cis_window": policy.cis_window,
                "n_cis_site_links": len(index), "n_cis_sites": len(used_sites), "n_cis_alleles": len(used),
                "n_genes_with_cis_site": int((np.diff(ptr) > 0).sum()),
                "n_multiallelic_cis_sites": int(np.count_nonzero(
                    pc.list_value_length(sites[S.ALT].take(pa.array(used_sites))).to_numpy(
                        zero_copy_only=False) > 1)) if len(used) else 0,
                "missing_policy": policy.missing, "unphased_policy": policy.unphased},
        dosage_row=dosage_row.reshape(-1).astype(np.int64),
        site_allele=allele.astype(np.int8),
        in_promoter=in_promoter,
    )
    log.info("genomes: %d of %d donors have a genome; %d unique promoter sequences; %d cis-site links (%d sites, "
             "window %s); %d (gene, donor) pairs differ from the reference", int(has.sum()), len(problem.donors),
             haps.report["n_unique_sequences"], len(index), genomes.report["n_cis_sites"],
             "the promoter" if policy.cis_window is None else f"+/-{policy.cis_window:,} bp",
             len(genomes.personal_pairs()[0]))
    return genomes


def cis_bounds(tss: np.ndarray, strand: np.ndarray, upstream: int, downstream: int,
               cis_window: int | None) -> tuple[np.ndarray, np.ndarray]:
    """1-based inclusive (start, end) of each gene's cis window: ``cis_window`` bases either side of the TSS, or
    the promoter window when ``cis_window`` is None."""
    if cis_window is None:
        return window_bounds(tss, strand, upstream, downstream)
    tss = np.asarray(tss, dtype=np.int64)
    return np.maximum(tss - cis_window, 1), tss + cis_window


def refuse_missing(variants, sites: np.ndarray, ptr: np.ndarray, index: np.ndarray, gene_ids: np.ndarray,
                   columns: np.ndarray) -> None:
    """Raise :class:`~geximpute.errors.InputError` on the first missing call of ``columns`` (VCF sample columns) at
    ``sites`` (``genotypes.missing: error``), naming the file, the site, the donor and a gene whose window holds it."""
    calls = variants.genotypes[sites][:, columns]
    hits = np.argwhere((calls < 0).any(axis=2))
    if not hits.size:
        return
    i, d = (int(x) for x in hits[0])
    site = int(sites[i])
    link = int(np.flatnonzero(index == site)[0])
    gene = gene_ids[int(np.searchsorted(ptr, link, side="right") - 1)]
    chrom, pos = variants.sites[S.CHROM][site].as_py(), variants.sites[S.POS][site].as_py()
    raise InputError(
        variants.path,
        f"{len(hits)} missing call(s) at sites in the cis windows of the problem's genes",
        record=f"site {chrom}:{pos}, donor {variants.samples[int(columns[d])]}, in the window of gene {gene}",
        expected="every call made at sites the model reads (genotypes.missing: error)",
        hint="Set genotypes.missing to mean or reference, or impute the VCF first (e.g. Beagle)",
    )


#: (site, allele) pairs are keyed ``site * _ALLELE_SLOTS + allele`` (a VCF site has fewer ALTs: the reader refuses more)
_ALLELE_SLOTS = 128


def counted_allele(allele: str) -> bool:
    """Whether an ALT allele gets a dosage of its own: a sequence or a symbolic structural allele (``<DEL>``,
    ``<CN0>``) does; the spanning deletion ``*`` (the upstream deletion's own record counts it), gVCF's
    non-reference placeholders (``<*>``, ``<NON_REF>``, ``<X>``: no allele was observed) and ``.`` do not."""
    return bool(allele) and allele not in ("*", ".", "<*>", "<NON_REF>", "<X>")


def allele_links(ptr: np.ndarray, index: np.ndarray, alts: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(site_ptr, site_index, allele) with every site link of ``ptr``/``index`` (:func:`promoter_sites`) repeated
    once per counted ALT allele of its site (:func:`counted_allele`), in allele order; a site without one drops out.

    Each ALT of a multi-allelic site is a variant of its own, as after ``bcftools norm -m -``: its dosage counts
    the copies of that allele, so ``1/2`` is one copy of each ALT and ``2/2`` two of the second, never two of "ALT".

    Args:
        ptr, index: (G + 1,) and (M,) as :func:`promoter_sites` returns them.
        alts: the ALT lists of the VCF's site table (``sites[S.ALT]``: one list of strings per site).
    """
    if not len(index):
        return ptr, index, np.zeros(0, np.int64)
    sites = np.unique(index)
    lists = alts.take(pa.array(sites)).to_pylist()
    counted = [[k for k, a in enumerate(lst or [], start=1) if counted_allele(a)] for lst in lists]
    n = np.zeros(int(sites[-1]) + 1, np.int64)
    n[sites] = [len(c) for c in counted]
    start = np.zeros_like(n)
    start[sites] = np.concatenate([[0], np.cumsum(n[sites])[:-1]])
    numbers = np.array([k for c in counted for k in c], np.int64)
    repeat = n[index]
    first = np.cumsum(repeat) - repeat  # each link's first new link
    within = np.arange(int(repeat.sum())) - np.repeat(first, repeat)
    allele = numbers[np.repeat(start[index], repeat) + within] if len(numbers) else np.zeros(0, np.int64)
    ends = np.concatenate([[0], np.cumsum(repeat)])
    return ends[ptr].astype(np.int64), np.repeat(index, repeat).astype(np.int64), allele.astype(np.int64)


def allele_dosage(calls: np.ndarray, allele: np.ndarray) -> np.ndarray:
    """(U, n, 2) allele indices and (U,) ALT numbers -> (U, n) float32 copies of row u's ALT ``allele[u]``; NaN
    where either allele of the call is missing."""
    missing = (calls < 0).any(axis=2)
    count = (calls == np.asarray(allele)[:, None, None]).sum(axis=2).astype(np.float32)
    return np.where(missing, np.nan, count).astype(np.float32)


#: genes whose residuals :func:`donor_residuals` computes at a time (its float64 temporaries are that many rows of
#: the (G, S) matrix, not the whole of it)
RESIDUAL_ROWS = 256


def donor_residuals(values: np.ndarray, tissue_index: np.ndarray, donor_index: np.ndarray, n_donors: int,
                    n_tissues: int, rows: int = RESIDUAL_ROWS) -> np.ndarray:
    """(G, D) each donor's mean visible deviation from the gene's per-tissue mean; NaN where none is visible.
    Computed at most ``rows`` genes and :data:`geximpute.science.problem.STATS_CELLS` cells at a time (a gene's
    residuals read its own row only)."""
    from geximpute.science.problem import pass_rows  # the problem module imports this one

    out = np.empty((values.shape[0], n_donors))
    rows = pass_rows(values.shape[1], rows)
    for lo in range(0, values.shape[0], rows):
        out[lo : lo + rows] = _donor_residuals(values[lo : lo + rows], tissue_index, donor_index, n_donors, n_tissues)
    return out


def _donor_residuals(values: np.ndarray, tissue_index: np.ndarray, donor_index: np.ndarray, n_donors: int,
                     n_tissues: int) -> np.ndarray:
    t_sum, t_n = group_sums(values, tissue_index, n_tissues)
    with np.errstate(invalid="ignore", divide="ignore"):
        t_mean = t_sum / np.maximum(t_n, 1)
        # NaN where not visible: the donor sums leave those out, as the tissue sums did
        d_sum, d_n = group_sums(values - t_mean[:, tissue_index], donor_index, n_donors)
        return np.where(d_n > 0, d_sum / np.maximum(d_n, 1), np.nan)


#: ridge penalties tried per gene when ``context.genetic_shrinkage`` is null (leave-one-donor-out choice); no effect at
#: all (an infinite penalty) is always a candidate too, so a gene without signal gets a score of 0
SHRINKAGE_GRID = (0.25, 1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0)


def _ridge(x: np.ndarray, y: np.ndarray, shrinkage: float | None) -> np.ndarray:
    """Ridge coefficients of centred ``y`` on centred ``x`` (n, m); with ``shrinkage`` None the penalty of
    :data:`SHRINKAGE_GRID` (or none at all: zero effects) with the smallest leave-one-out error (closed form,
    ``e_i / (1 - h_ii)``, with one more degree of freedom for the centring).

    One SVD of ``x`` serves every penalty, so a cis window of hundreds of sites costs one decomposition per gene.
    """
    n = len(y)
    u, s, vt = np.linalg.svd(x, full_matrices=False)
    uty = u.T @ y
    if shrinkage is not None:
        return vt.T @ (s / (s**2 + shrinkage) * uty)
    best = np.zeros(x.shape[1])
    best_err = float(np.mean((y / max(1 - 1.0 / n, 1e-6)) ** 2))
    for lam in SHRINKAGE_GRID:
        shrink = s**2 / (s**2 + lam)
        leverage = (u**2) @ shrink
        fitted = u @ (shrink * uty)
        err = float(np.mean(((y - fitted) / np.maximum(1 - leverage - 1.0 / n, 1e-6)) ** 2))
        if err < best_err:
            best, best_err = vt.T @ (s / (s**2 + lam) * uty), err
    return best


#: fitted haplotypes (two per donor) that must carry a distinct promoter haplotype for it to get an effect of its own
HAPLOTYPE_MIN_COPIES = 10


def haplotype_copies(rows: np.ndarray, reference: int, carriers: np.ndarray,
                     min_copies: int = HAPLOTYPE_MIN_COPIES) -> np.ndarray:
    """(D, h) copies (0, 1, 2) each donor carries of the ``h`` distinct non-reference promoter haplotypes of one
    gene that ``carriers`` (D,) bool donors carry at least ``min_copies`` times (``rows``: (D, 2) haplotype rows of
    the gene, ``reference``: its reference row)."""
    carried = rows[carriers]
    alt = carried[(carried != reference) & (carried >= 0)]
    uniq, n = np.unique(alt, return_counts=True)
    keep = uniq[n >= min_copies]
    return (rows[:, :, None] == keep[None, None, :]).sum(axis=1).astype(np.float64)


def _called_mean(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """(m,) each column's mean over the called (not NaN) values of ``rows``; NaN where there is none."""
    sub = x[rows]
    called = ~np.isnan(sub)
    n = called.sum(axis=0)
    return np.where(n > 0, np.where(called, sub, 0.0).sum(axis=0) / np.maximum(n, 1), np.nan)


def genetic_scores(genomes: DonorGenomes, values: np.ndarray, tissue_index: np.ndarray, donor_index: np.ndarray,
                   n_tissues: int, shrinkage: float | None) -> tuple[np.ndarray, list[np.ndarray]]:
    """Per-(gene, donor) cis-genetic score fitted on visible values (see the module docstring).

    Args:
        genomes: the donors' genomes.
        values: (G, S) visible values (NaN = unknown).
        tissue_index, donor_index: (S,) of the samples.
        n_tissues: tissue count.
        shrinkage: ridge penalty on centred dosages (about: donors' worth of evidence pulled towards 0); None
            chooses it per gene from :data:`SHRINKAGE_GRID` by leave-one-donor-out error.

    Returns:
        scores (G, D) float32 (NaN for genes without a cis variant or donors without a genome) and, per gene,
        the fitted effect per ALT allele of each of its cis-window sites (zeros when nothing was fitted; the
        haplotype stage's effects are in the scores, not here).
    """
    n_genes, n_donors = genomes.rows.shape[0], genomes.rows.shape[1]
    resid = donor_residuals(values, tissue_index, donor_index, n_donors, n_tissues)
    scores = np.full((n_genes, n_donors), np.nan, dtype=np.float32)
    effects: list[np.ndarray] = []
    has = genomes.has_genome
    for g in range(n_genes):
        lo, hi = genomes.site_ptr[g], genomes.site_ptr[g + 1]
        if hi == lo:
            effects.append(np.zeros(0, np.float32))
            continue
        x = genomes.link_dosage(lo, hi).T.astype(np.float64)  # (D, m)
        # a missing call (genotypes.missing: mean) in the promoter window leaves the donor's haplotypes unknown:
        # they were built with the missing allele as REF, and the haplotype stage read that REF (a missing call
        # adds nothing); one elsewhere in the cis window leaves them known
        window = slice(None) if genomes.in_promoter is None else genomes.in_promoter[lo:hi]
        unknown = np.isnan(x[:, window]).any(axis=1)
        y = resid[g]
        fit = has & ~np.isnan(y)
        # missing calls at the mean dosage of the donors the score is fitted on and centred on (else of every
        # genome): a missing call adds nothing, whatever genome-only donors there are
        mean = _called_mean(x, fit)
        mean = np.nan_to_num(np.where(np.isnan(mean), _called_mean(x, has), mean))
        x = np.where(np.isnan(x), mean, x) - mean
        beta = np.zeros(hi - lo)
        score = np.zeros(int(has.sum()))
        if fit.sum() >= 5:
            xc = x[fit] - x[fit].mean(axis=0)
            beta = _ridge(xc, y[fit] - y[fit].mean(), shrinkage)
            # centred on the donors it was fitted on, as the residuals are: centred on every donor with a genome,
            # each score moved by (their mean - the fitted donors') @ beta, and a nightly run's new genomes moved
            # every earlier donor's score
            score = (x[has] - x[fit].mean(axis=0)) @ beta
            known = fit & ~unknown
            copies = haplotype_copies(genomes.rows[g], int(genomes.reference_row[g]), known)
            if copies.shape[1] and known.sum() >= 5:
                left = (y[fit] - y[fit].mean() - xc @ beta)[~unknown[fit]]
                h = copies - copies[known].mean(axis=0)  # centred on the donors it is fitted on
                h[unknown] = 0.0  # the fitted donors' mean: an unknown haplotype moves nothing
                gamma = _ridge(h[known], left, None)
                score = score + h[has] @ gamma
        effects.append(beta.astype(np.float32))
        scores[g, has] = score.astype(np.float32)
    return scores, effects


#: mixed into :func:`own_value_fold`'s hash, so that its folds are drawn independently of the training holdout's
#: units, which hash the same (gene, sample, seed) on the ``entries`` task
OWN_VALUE_TAG = 0x6F776E


def own_value_fold(gene_index: np.ndarray, sample_index: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """(N,) the fold, 0 to ``folds`` - 1, of each entry (``gene_index[i]``, ``sample_index[i]``): a hash of the two
    indices and ``seed``, so that the fold of an entry is found wherever it is needed without keeping a grid."""
    h = mix64(gene_index, sample_index, seed, OWN_VALUE_TAG)  # tagged: not the entries holdout's draw
    return (h % np.uint64(folds)).astype(np.int64)


@dataclass
class OwnValueScores:
    """Cis-genetic scores for measured entries fitted without their own values (:func:`own_value_free_scores`):
    one (G, D) score matrix per fold, each fitted with that fold's measured entries hidden."""

    scores: list[np.ndarray]
    seed: int
    first: int = 0  # the whole problem's index of gene row 0 (folds are drawn on whole-problem indices)

    def at(self, gene_index: np.ndarray, sample_index: np.ndarray, donor_index: np.ndarray) -> np.ndarray:
        """(N,) float32 the score of each entry from the fit that hid its fold (its donor's, ``donor_index[i]``)."""
        fold = own_value_fold(gene_index + self.first, sample_index, len(self.scores), self.seed)
        out = np.empty(len(fold), np.float32)
        for k, scores in enumerate(self.scores):
            rows = fold == k
            out[rows] = scores[gene_index[rows], donor_index[rows]]
        return out


def own_value_free_scores(genomes: DonorGenomes, values: np.ndarray, tissue_index: np.ndarray,
                          donor_index: np.ndarray, n_tissues: int, shrinkage: float | None, targets: np.ndarray,
                          folds: int, seed: int = 0, first: int = 0) -> OwnValueScores:
    """The cis-genetic scores of the ``targets`` entries measured in ``values`` fitted without their own values
    (imputation with ``include_observed``): the measured targets are cut into ``folds`` folds
    (:func:`own_value_fold`), and each fold's scores come from :func:`genetic_scores` fitted with that fold's
    entries hidden. The donor's other measured tissues still shape its score, as they do a missing entry's.
    ``first``: the whole problem's index of the first row of ``values`` (a chromosome's rows), on which the folds
    are drawn.

    ``values`` is hidden and restored in place, a pass of rows at a time: besides the (G, D) scores of each fold,
    this holds a bool mask of the cells and the hidden cells' values of one fold."""
    if not values.flags.writeable:  # e.g. zero-copy from Ray's object store: hidden in a copy of its own
        values = np.array(values)
    out = []
    rows = max(1, (1 << 20) // max(1, values.shape[1]))  # the hash's uint64 temporaries: 8 MiB each
    samples = np.arange(values.shape[1])
    for k in range(folds):
        hidden: list[tuple[int, np.ndarray, np.ndarray]] = []
        for lo in range(0, len(values), rows):
            part = values[lo : lo + rows]
            genes = np.arange(first + lo, first + lo + len(part))
            mask = targets[lo : lo + rows] & ~np.isnan(part)
            mask &= own_value_fold(genes[:, None], samples[None, :], folds, seed) == k
            hidden.append((lo, mask, part[mask]))
            part[mask] = np.nan
        try:
            scores, _ = genetic_scores(genomes, values, tissue_index, donor_index, n_tissues, shrinkage)
        finally:
            for lo, mask, kept in hidden:
                values[lo : lo + rows][mask] = kept
        out.append(scores)
    return OwnValueScores(out, seed, first)


def add_donors(genomes: DonorGenomes, donors: list[str], new: dict[str, Any], reference: Any, genome: Any,
               problem: Any, config: Any) -> DonorGenomes:
    """``genomes`` of the reference donors extended to every donor of ``donors`` with the genomes in ``new``.

    New donors are those of nightly's inbox, each with a VCF of its own: their promoter haplotypes are built from
    it exactly as the reference donors' (:func:`geximpute.science.haplotypes.build_haplotypes`, with the same
    ``genotypes`` policies), and their dosages at the reference VCF's cis sites (the sites the genetic score
    was fitted on) are read from it. A site absent from a donor's VCF on a chromosome where the VCF has records
    is read as REF (a single-sample VCF lists the sites where the donor differs); on a chromosome where it has
    none the dosage is missing (policy ``genotypes.missing``), and :func:`uncovered_chromosomes` lets the caller
    say so.

    Args:
        genomes: the reference donors' genomes (the first ``genomes.rows.shape[1]`` of ``donors``).
        donors: every donor of the extended problem, the reference donors first, in their order.
        new: ``{donor id: Variants}`` of the new donors (one sample each).
        reference: the reference donors' :class:`~geximpute.io.variants.Variants`.
        genome: the FASTA.
        problem: the problem whose genes (order, TSS, strand) the genomes follow.
        config: the resolved config (``promoter``, ``genotypes``).

    Raises:
        InputError: ``genotypes.missing`` is ``error`` and a new donor's call is missing at a site the model reads.
    """
    n_donors = len(donors)
    genes = pa.table({
        S.GENE_ID: pa.array(problem.gene_ids, pa.string()),
        S.CHROM: pa.array(problem.chroms, pa.string()),
        S.TSS: pa.array(problem.tss, pa.int64()),
        S.STRAND: pa.array(np.where(problem.strand > 0, "+", "-"), pa.string()),
    })
    policy = config.genotypes
    sequences, ids = list(genomes.sequences), list(genomes.promoter_ids)
    reference_row = np.asarray(genomes.reference_row, np.int64)
    old_rows, old_has = genomes.rows, genomes.has_genome
    site_ptr, site_index = genomes.site_ptr, genomes.site_index
    old_dosage = genomes.dosage
    dosage_row = genomes.dosage_row if genomes.dosage_row is not None else np.arange(len(site_index), dtype=np.int64)
    n_old = old_rows.shape[1]
    if len(donors) < n_old:
        raise ValueError(f"add_donors: {len(donors)} donors, fewer than the {n_old} reference donors")
    rows = np.repeat(reference_row[:, None, None], n_donors, axis=1).repeat(2, axis=2).astype(np.int32)
    rows[:, :n_old] = old_rows
    has = np.zeros(n_donors, bool)
    has[:n_old] = old_has
    dosage = np.full((old_dosage.shape[0], n_donors), np.nan, np.float32)
    dosage[:, :n_old] = old_dosage
    # the reference VCF row and ALT allele of each dosage row: the (chrom, pos, REF, ALT) each row counts
    used = np.zeros(old_dosage.shape[0], np.int64)
    used[dosage_row] = site_index
    used_allele = np.ones(old_dosage.shape[0], np.int64)
    if genomes.site_allele is not None:
        used_allele[dosage_row] = genomes.site_allele
    keys: list[tuple[str, int, str, str]] = []
    if len(used):
        sites = reference.sites.take(pa.array(used))
        keys = [(c, p, r, alts[k - 1]) for c, p, r, alts, k in zip(
            sites[S.CHROM].to_pylist(), sites[S.POS].to_pylist(), sites[S.REF].to_pylist(), sites[S.ALT].to_pylist(),
            used_allele.tolist(), strict=True)]
    row_of = {seq: i for i, seq in enumerate(sequences)}
    report = dict(genomes.report)
    ambiguous = 0
    for donor, variants in new.items():
        d = donors.index(donor)
        haps = build_haplotypes(genome, genes, variants, config.promoter,
                                missing="error" if policy.missing == "error" else "reference",
                                unphased=policy.unphased)
        ambiguous += haps.report.get("n_ambiguous_phase_pairs", 0)
        remap = np.array([row_of.setdefault(s, len(row_of)) for s in haps.sequences], dtype=np.int64)
        for s, pid in zip(haps.sequences, haps.promoter_ids, strict=True):
            if row_of[s] == len(sequences):
                sequences.append(s)
                ids.append(pid)
        mine = haps.rows[:, 0, :]
        rows[:, d, :] = np.where(mine >= 0, remap[np.maximum(mine, 0)], -1)
        has[d] = True
        dosage[:, d] = _dosage_at(keys, variants, policy.missing)
    out = DonorGenomes(
        sequences=sequences, promoter_ids=ids, reference_row=reference_row, rows=rows, has_genome=has,
        site_ptr=site_ptr, site_index=site_index, dosage=dosage,
        report={**report, "n_new_donors": len(new), "n_new_ambiguous_phase_pairs": ambiguous,
                "n_problem_donors": n_donors, "n_problem_donors_with_genome": int(has.sum())},
        dosage_row=dosage_row, site_allele=genomes.site_allele, in_promoter=genomes.in_promoter,
    )
    return out


def uncovered_chromosomes(variants: Any, chroms: np.ndarray) -> list[str]:
    """The chromosomes of ``chroms`` (the problem's genes) on which ``variants`` has no site at all."""
    have = {chrom_key(c) for c in variants.sites[S.CHROM].to_pylist()}
    return sorted({str(c) for c in chroms if chrom_key(str(c)) not in have})


def variant_key(pos: int, ref: str, alt: str) -> tuple[int, str, str]:
    """``(pos, REF, ALT)`` of one ALT allele with the bases REF and ALT share cut off, the common suffix first, then
    the common prefix (``pos`` moved past it), in capitals: one key for a variant however a VCF pads it, so that
    ``CAA>CA`` of a multi-allelic record and the ``CA>C`` that ``bcftools norm -m - -f`` splits it into agree.
    Symbolic alleles are keyed as written."""
    ref_u, alt_u = ref.upper(), alt.upper()
    if not (is_sequence_allele(ref_u) and is_sequence_allele(alt_u)):
        return pos, ref_u, alt
    j = 0
    while j < min(len(ref_u), len(alt_u)) - 1 and ref_u[-1 - j] == alt_u[-1 - j]:
        j += 1
    ref_u, alt_u = ref_u[: len(ref_u) - j], alt_u[: len(alt_u) - j]
    k = 0
    while k < min(len(ref_u), len(alt_u)) and ref_u[k] == alt_u[k]:
        k += 1
    return pos + k, ref_u[k:], alt_u[k:]


def _dosage_at(keys: list[tuple[str, int, str, str]], variants: Any, missing: str) -> np.ndarray:
    """(U,) float32 dosage of the one donor of ``variants`` at the variants ``keys`` (chrom, pos, REF, ALT): the
    donor's copies of that ALT, whether its VCF writes the site as one multi-allelic record or split into one record
    per ALT (``bcftools norm -m -``, with or without ``-f``: variants are matched by :func:`variant_key`). Where no
    record carries that ALT: NaN when a record at the site's position has a missing call (a no-call written with
    ALT ``.``, or a record that failed a FILTER, read as missing), 0 when the records there are called or the VCF has
    records on that chromosome but none there; NaN where the chromosome is absent (0 with ``missing``
    reference).

    Raises:
        InputError: ``missing`` is ``error`` and the call that decides a dosage is missing.
    """
    sites = variants.sites
    calls = variants.genotypes[:, 0, :]  # (n, 2)
    mine: dict[tuple, tuple[int, int]] = {}  # (chrom key, *variant key) -> (record, allele)
    at: dict[tuple[str, int], list[int]] = {}  # (chrom key, pos) -> records
    covered = set()
    for i, (c, p, r, alts) in enumerate(zip(sites[S.CHROM].to_pylist(), sites[S.POS].to_pylist(),
                                            sites[S.REF].to_pylist(), sites[S.ALT].to_pylist(), strict=True)):
        k = chrom_key(c)
        covered.add(k)
        at.setdefault((k, p), []).append(i)
        for a, alt in enumerate(alts or [], start=1):
            mine.setdefault((k, *variant_key(p, r, alt)), (i, a))
    out = np.full(len(keys), np.nan, np.float32)
    for u, (c, p, r, alt) in enumerate(keys):
        k = chrom_key(c)
        hit = mine.get((k, *variant_key(p, r, alt)))
        records = [hit[0]] if hit is not None else at.get((k, p), [])
        if any((calls[i] < 0).any() for i in records):
            if missing == "error":
                raise InputError(variants.path, "missing call at a site the model reads",
                                 record=f"site {c}:{p}, donor {variants.samples[0]}",
                                 expected="every call made at the model's sites (genotypes.missing: error)",
                                 hint="Set genotypes.missing to mean or reference, or impute the VCF first")
            continue
        if hit is not None:
            out[u] = float(np.count_nonzero(calls[hit[0]] == hit[1]))
        elif k in covered:
            out[u] = 0.0
    if missing == "reference":
        out = np.nan_to_num(out, nan=0.0)
    return out


def gene_variant_flags(genomes: DonorGenomes, site_pos: np.ndarray, tss: np.ndarray, strand: np.ndarray,
                       upstream: int, downstream: int) -> tuple[np.ndarray, np.ndarray]:
    """((G,) number of cis-window sites, (G,) whether one of them lies in the gene's promoter window) per gene.

    Args:
        genomes: the problem's genomes.
        site_pos: (n_sites,) position of every site of the VCF's site table (``site_index`` points into it).
        tss, strand: (G,) the problem's genes.
        upstream, downstream: the promoter window.
    """
    links = np.diff(genomes.site_ptr).astype(np.int64)
    start, end = window_bounds(tss, strand, upstream, downstream)
    pos = np.asarray(site_pos, np.int64)[genomes.site_index]
    gene = np.repeat(np.arange(len(links)), links)
    # a multi-allelic site has a link per ALT, side by side: count each site of a gene once
    first = np.ones(len(gene), bool)
    first[1:] = (genomes.site_index[1:] != genomes.site_index[:-1]) | (gene[1:] != gene[:-1])
    n_cis = np.bincount(gene[first], minlength=len(links)).astype(np.int64)
    inside = (pos >= start[gene]) & (pos <= end[gene])
    if genomes.in_promoter is not None:  # a deletion from just upstream reaching into the window counts too
        inside = inside | genomes.in_promoter
    return n_cis, np.bincount(gene[inside], minlength=len(links)) > 0
