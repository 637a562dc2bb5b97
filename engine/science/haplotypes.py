"""Donor promoter haplotypes from a VCF: every donor's two promoter sequences per gene, built once per unique haplotype.

:func:`build_haplotypes` returns, for each gene and donor, the rows of the donor's two promoter haplotypes in one
table of unique sequences; :func:`edit_window` is the base-level step that writes one haplotype's alleles into the
reference and cuts the window. No Ray here: the pipeline calls these from its own tasks.

Semantics:

- **Window.** As :meth:`geximpute.io.fasta.Genome.window`: ``upstream`` bases 5' of the TSS, the TSS base and
  ``downstream - 1`` bases 3' of it, 5'->3' on the gene's strand (reverse complement on ``-``), soft-masking handled
  by ``promoter.soft_mask``, N beyond the chromosome's ends. A haplotype that carries only REF alleles gives the
  very sequence (and so the promoter id) of :func:`geximpute.steps.prepare.promoter_tables`; genes whose window lies
  wholly
  off the chromosome get no window (row -1), as there.
- **Alleles.** Allele index k of a site is its k-th ALT. Each (POS, REF, ALT) is first trimmed to the bases that
  change: the common prefix (the VCF padding base), then the common suffix, are dropped. The haplotype is the
  reference with every carried ALT written in place of its trimmed REF span, so SNVs, MNVs, insertions, deletions
  and complex replacements are one case. ALT letters take the case of the reference base at POS, so a variant
  inside a soft-masked repeat is masked with it when ``soft_mask`` is ``n``.
- **Anchoring.** The window stays ``upstream + downstream`` long and anchored on the TSS base: it is cut from the
  edited haplotype around the TSS, which is built from the reference with enough flanking margin. A deletion 5' of
  the TSS pulls real flanking bases in at the window's 5' end, an insertion there pushes the far-5' bases out;
  likewise 3' of the TSS. An insertion between two reference bases leaves both where they are relative to the TSS.
- **Deletion (or length-changing replacement) over the TSS base.** The window's 5' part is the ``upstream`` bases
  just 5' of the replaced span; its 3' part begins with the replacement's first base (5'->3' on the gene's
  strand), or, for a pure deletion, with the first reference base 3' of the deleted span. An SNV or MNV over the
  TSS just changes the bases.
- **Variants partly inside the window** (a deletion or MNV that straddles an end) are applied whole to the
  haplotype before the window is cut: the bases that fall inside the window show, the rest do not. A site outside
  the window whose bases move into it (after a deletion inside the window) shows too: sites are looked up in the
  window widened by the deletions it holds, until no new site is found.
- **Overlap.** Two edits of one haplotype whose trimmed REF spans overlap (or two insertions at one point, or an
  insertion inside a replaced span): the first by position is applied, the later one is skipped and counted.
- **Phase.** Haplotype A is the first allele of the GT, B the second. Unphased diploid calls are taken in the order
  written and counted: the model averages the two haplotype embeddings, so phase matters only for the combination
  of several sites inside one window. A donor's phase in a window is ambiguous when two or more of its calls there
  are heterozygous and one of them is unphased, or its phased ones belong to two phase sets (FORMAT ``PS``);
  ``unphased`` says what is done then (``cis`` moves the unphased calls' ALTs to B, phased calls keep their
  order). A haploid call (read into both haplotypes by ``read_variants``) gives two
  equal haplotypes.
- **Missing alleles** (index -1): ``missing="reference"`` reads them as REF and counts them; ``missing="error"``
  raises :class:`~geximpute.errors.InputError` naming the file, site, donor and gene.
- **Skipped ALTs.** Symbolic ALTs (``<DEL>``, ``<CN0>``), the spanning-deletion ``*`` and any ALT with letters other
  than ACGTN are read as REF and counted.
- **Chromosomes.** Gene and site chromosome names are mapped onto the FASTA's
  (:func:`geximpute.io.chroms.harmonise_chroms`, an identity for inputs read with the genome); genes on chromosomes
  absent from the FASTA get no window.

Cost: per gene, the sites in the window are found by binary search, the (sites, 2 x donors) allele matrix is reduced
to its distinct columns with :func:`numpy.unique`, one sequence is built per distinct column and sequences are
deduplicated across genes. Python loops run over genes and distinct haplotypes, never over donors.
"""

from __future__ import annotations

import hashlib
import string
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from geximpute import schema as S
from geximpute.config import PromoterConfig
from geximpute.errors import ConfigError, InputError
from geximpute.io.chroms import harmonise_chroms
from geximpute.io.fasta import Genome, reverse_complement
from geximpute.io.variants import Variants

MissingPolicy = Literal["reference", "error"]
MISSING_POLICIES: tuple[str, ...] = ("reference", "error")
UnphasedPolicy = Literal["as_written", "cis", "error"]
UNPHASED_POLICIES: tuple[str, ...] = ("as_written", "cis", "error")

_BASES = frozenset("ACGTNacgtn")
_SHOW_SITES = 5  # sites named in an error message
_SOFT_TO_N = str.maketrans(string.ascii_lowercase, "N" * len(string.ascii_lowercase))


def promoter_id(sequence: str) -> str:
    """The id of a promoter: the first 16 hex digits of its SHA-1, as in
    :func:`geximpute.steps.prepare.promoter_tables`.

    Args:
        sequence: the promoter, 5'->3'.

    Returns:
        16 lower-case hex digits.
    """
    return hashlib.sha1(sequence.encode()).hexdigest()[:16]


def is_sequence_allele(allele: str) -> bool:
    """True for an allele spelled in A, C, G, T, N (any case); False for symbolic, ``*``, ``.`` or empty alleles."""
    return bool(allele) and all(c in _BASES for c in allele)


# One haplotype ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EditedWindow:
    """One haplotype's promoter window.

    Attributes:
        sequence: ``upstream + downstream`` bases, 5'->3' on the gene's strand, upper case (or N where soft-masked
            and ``soft_mask`` is ``n``).
        n_applied: edits written into the haplotype (edits whose ALT equals REF are not counted).
        n_indels: of those, edits that change the length.
        n_overlap_skipped: edits skipped because they overlap an earlier one.
    """

    sequence: str
    n_applied: int
    n_indels: int
    n_overlap_skipped: int


def edit_window(
    region: str,
    region_start: int,
    tss: int,
    strand: str,
    upstream: int,
    downstream: int,
    edits: Sequence[tuple[int, str, str]],
    soft_mask: str = "upper",
) -> EditedWindow:
    """Write ``edits`` into a stretch of reference and cut the promoter window around the TSS.

    With no edits the result is exactly :meth:`Genome.window` of the same TSS. See the module docstring for how
    indels, deletions over the TSS and overlapping edits are handled.

    Args:
        region: forward-strand reference bases as stored (case kept), covering the window, every edit, and enough
            flank for the deletions: ``region[0]`` is genomic position ``region_start``.
        region_start: 1-based genomic position of ``region[0]``.
        tss: 1-based genomic position of the TSS.
        strand: ``+`` or ``-``.
        upstream: bases 5' of the TSS.
        downstream: bases 3' of the TSS, the TSS base included.
        edits: ``(pos, ref, alt)`` as in a VCF record (1-based POS, REF and one ALT spelled in ACGTN), any order.
        soft_mask: ``upper`` or ``n``, as ``promoter.soft_mask``.

    Returns:
        The window and counts of what was applied and skipped.

    Raises:
        ValueError: bad strand or soft_mask, an allele not spelled in ACGTN, the TSS or an edit outside
            ``region``, or ``region`` too short for the window after the edits.
    """
    if strand not in ("+", "-"):
        raise ValueError(f"strand must be '+' or '-', got {strand!r}")
    if soft_mask not in ("upper", "n"):
        raise ValueError(f"soft_mask must be 'upper' or 'n', got {soft_mask!r}")
    region_end = region_start + len(region)  # exclusive
    if not region_start <= tss < region_end:
        raise ValueError(f"TSS {tss} lies outside the region {region_start}..{region_end - 1}")

    trimmed = []  # (start, end exclusive, alt, input order)
    for order, (pos, ref, alt) in enumerate(edits):
        if not is_sequence_allele(ref) or not is_sequence_allele(alt):
            raise ValueError(f"edit {order} ({pos}, {ref!r}, {alt!r}): REF and ALT must be spelled in ACGTN")
        if pos < region_start or pos + len(ref) > region_end:
            raise ValueError(
                f"edit {order} ({pos}, {ref!r}, {alt!r}) reaches outside the region {region_start}..{region_end - 1}"
            )
        start, r_len, alt_bases = _trim(pos, ref, alt)
        if r_len == 0 and not alt_bases:
            continue  # ALT spells REF
        lower = region[pos - region_start].islower()
        trimmed.append((start, start + r_len, alt_bases.lower() if lower else alt_bases.upper(), order))
    # by position; at one position a pure insertion (end == start) goes before a replacement, and otherwise the
    # edits keep their order (the VCF's: the first wins an overlap, as documented)
    trimmed.sort(key=lambda t: (t[0], t[1] != t[0], t[3]))

    pieces: list[str] = []
    cursor = region_start  # first reference position not yet copied
    shift = 0  # haplotype index minus reference offset, for reference positions >= cursor
    shift_at_tss = 0
    anchor: int | None = None  # haplotype index of the TSS when an edit replaces it
    last_insertion: int | None = None
    applied = indels = skipped = 0
    for start, end, alt_bases, _ in trimmed:
        insertion = end == start
        if start < cursor or (insertion and start == last_insertion):
            skipped += 1
            continue
        pieces.append(region[cursor - region_start : start - region_start])
        hap_start = start - region_start + shift
        if anchor is None and start <= tss < end:
            if len(alt_bases) == end - start:
                anchor = hap_start + tss - start
            elif strand == "+":
                anchor = hap_start
            else:  # the replacement's 5'-most base on '-' (or, for a deletion, the base 3' of it) is leftmost
                anchor = hap_start + len(alt_bases) - 1
        pieces.append(alt_bases)
        shift += len(alt_bases) - (end - start)
        if end <= tss:
            shift_at_tss = shift
        cursor = end
        last_insertion = start if insertion else None
        applied += 1
        indels += len(alt_bases) != end - start
    pieces.append(region[cursor - region_start :])
    haplotype = "".join(pieces)
    if anchor is None:
        anchor = tss - region_start + shift_at_tss

    if strand == "+":
        lo, hi = anchor - upstream, anchor + downstream
    else:
        lo, hi = anchor - downstream + 1, anchor + upstream + 1
    if lo < 0 or hi > len(haplotype):
        raise ValueError(
            f"region {region_start}..{region_end - 1} is too short for the window around TSS {tss} after the edits: "
            f"{max(0, -lo)} base(s) short on the left, {max(0, hi - len(haplotype))} on the right"
        )
    sequence = haplotype[lo:hi]
    if soft_mask == "n":
        sequence = sequence.translate(_SOFT_TO_N)
    sequence = sequence.upper()
    if strand == "-":
        sequence = reverse_complement(sequence)
    return EditedWindow(sequence, applied, indels, skipped)


def _trim(pos: int, ref: str, alt: str) -> tuple[int, int, str]:
    """``(first changed position, REF bases replaced, ALT bases written)``: common prefix, then suffix, cut."""
    ref_u, alt_u = ref.upper(), alt.upper()
    n = min(len(ref_u), len(alt_u))
    k = 0
    while k < n and ref_u[k] == alt_u[k]:
        k += 1
    ref_u, alt_u = ref_u[k:], alt_u[k:]
    n = min(len(ref_u), len(alt_u))
    j = 0
    while j < n and ref_u[-1 - j] == alt_u[-1 - j]:
        j += 1
    return pos + k, len(ref_u) - j, alt_u[: len(alt_u) - j]


# Every gene and donor ---------------------------------------------------------------------------------------


@dataclass
class PromoterHaplotypes:
    """Each donor's two promoter haplotypes per gene, as rows of a table of unique sequences.

    Attributes:
        sequences: P unique sequences, 5'->3' on the gene's strand, each ``promoter.length`` long: every gene's
            reference window and every donor haplotype.
        promoter_ids: (P,) ``sha1(sequence)[:16]``, the ids of :func:`geximpute.steps.prepare.promoter_tables`.
        gene_ids: (G,) object, the genes asked for, in the order given.
        reference_row: (G,) int64 row of each gene's reference window, -1 where the gene has no window (its
            chromosome is not in the FASTA or its window lies wholly off it).
        donors: (D,) donor ids (``Variants.samples``).
        rows: (G, D, 2) int32 row of each donor's haplotype A (first GT allele) and B (second); equal to
            ``reference_row`` where the haplotype's sequence is the reference's, -1 where the gene has no window.
        report: ``n_genes``, ``n_genes_with_window``, ``n_donors``; ``n_sites_in_windows`` (VCF sites read for at
            least one window, each once); ``n_haplotype_slots`` (genes with a window x donors x 2);
            ``n_distinct_per_gene_sum`` (sequences built: per gene its reference plus one per distinct
            non-reference allele combination); ``n_unique_sequences`` (P); ``unique_ratio``
            (n_distinct_per_gene_sum / n_haplotype_slots); over those sites, each once: ``n_missing_alleles``,
            ``n_unphased_calls`` (called, diploid, unphased), ``n_symbolic_skipped`` (alleles carrying a
            symbolic or non-ACGTN ALT); over haplotype slots: ``n_overlap_skipped`` (edits skipped as
            overlapping an earlier one), ``n_indels_applied`` (length-changing edits written).
    """

    sequences: list[str]
    promoter_ids: list[str]
    gene_ids: np.ndarray
    reference_row: np.ndarray
    donors: list[str]
    rows: np.ndarray
    report: dict

    def __post_init__(self) -> None:
        shape = (len(self.gene_ids), len(self.donors), 2)
        if self.rows.shape != shape or self.reference_row.shape != shape[:1]:
            raise ValueError(
                f"rows {self.rows.shape} and reference_row {self.reference_row.shape} do not match {shape}"
            )
        if len(self.promoter_ids) != len(self.sequences):
            raise ValueError(f"{len(self.promoter_ids)} promoter ids for {len(self.sequences)} sequences")

    def sequence(self, gene: int, donor: int, haplotype: int) -> str | None:
        """The sequence of haplotype ``haplotype`` (0 = A, 1 = B) of donor index ``donor`` at gene index ``gene``."""
        row = int(self.rows[gene, donor, haplotype])
        return self.sequences[row] if row >= 0 else None


def build_haplotypes(
    genome: Genome,
    genes: pa.Table | Mapping[str, Sequence] | Any,
    variants: Variants,
    promoter: PromoterConfig,
    *,
    missing: MissingPolicy = "reference",
    unphased: UnphasedPolicy = "as_written",
    sink: Callable[[list[str], int], None] | None = None,
    part_rows: int = 8192,
) -> PromoterHaplotypes:
    """Every donor's two promoter haplotypes for each gene, one sequence built per distinct haplotype.

    Args:
        genome: the reference the variants were read against.
        genes: ``gene_id``, ``chrom``, ``tss`` (1-based) and ``strand`` (``+``/``-``) columns: an Arrow table, a
            :class:`~geximpute.io.genes.GeneTable`, a mapping of column name to values or a pandas DataFrame.
        variants: the donors' genotypes (:func:`geximpute.io.variants.read_variants`).
        promoter: the window (``upstream``, ``downstream``, ``soft_mask``).
        missing: ``reference`` reads a missing allele as REF; ``error`` refuses it.
        unphased: a donor whose phase is ambiguous in a window (two heterozygous calls there, one unphased or
            the two in different phase sets):
            ``as_written`` keeps the GT's order, ``cis`` puts every such ALT on haplotype B (REF on A), ``error``
            refuses it (:class:`~geximpute.config.GenotypesConfig`).
        sink: where the sequences go instead of the result, in parts of consecutive rows: a part is handed over
            (``sink(sequences, next_gene)``: its sequences and the index of the first gene after its genes) once
            its genes give ``part_rows`` rows, and at the end, then forgotten, so that the caller never holds every
            sequence (imputation writes each part to a file for its encode tasks). Sequences are then unique within
            a part, not across parts (a later part may repeat an earlier part's sequence in a row of its own);
            ``sequences`` and ``promoter_ids`` of the result are empty.
        part_rows: the rows of a part handed to ``sink`` (at least; a part ends with its last gene's rows).

    Returns:
        The unique sequences, each gene's reference row and each donor's two haplotype rows, with counts.

    Raises:
        ConfigError: ``missing`` or ``unphased`` is not a known policy.
        ValueError: ``genes`` lacks a column, has an empty value or a strand other than ``+``/``-``.
        InputError: ``missing="error"`` and a call inside a promoter window has a missing allele, or
            ``unphased="error"`` and a donor's phase inside a window is ambiguous.
    """
    if missing not in MISSING_POLICIES:
        raise ConfigError(f"missing must be one of {', '.join(repr(p) for p in MISSING_POLICIES)}, got {missing!r}")
    if unphased not in UNPHASED_POLICIES:
        raise ConfigError(f"unphased must be one of {', '.join(repr(p) for p in UNPHASED_POLICIES)}, "
                          f"got {unphased!r}")
    gene_ids, gene_chroms, tss, strands = _gene_columns(genes, genome)
    sites = _Sites(variants, genome)
    up, down, length = promoter.upstream, promoter.downstream, promoter.length
    n_genes, n_donors = len(gene_ids), len(variants.samples)
    plus = strands == "+"
    win_start = np.where(plus, tss - up, tss - down + 1)
    win_end = np.where(plus, tss + down - 1, tss + up)
    candidates = sites.candidates(gene_chroms, win_start, win_end)

    rows = np.full((n_genes, n_donors, 2), -1, dtype=np.int32)
    reference_row = np.full(n_genes, -1, dtype=np.int64)
    row_of: dict[str, int] = {}  # the rows of the part being built (every row without a sink), by sequence
    handed = 0  # rows handed to the sink so far
    used = np.zeros(sites.n, dtype=bool)
    n_with_window = built = overlap_skipped = indels_applied = ambiguous_pairs = 0
    for g in range(n_genes):
        if sink is not None and len(row_of) >= part_rows:
            sink(list(row_of), g)
            handed += len(row_of)
            row_of = {}
        chrom, strand, t = gene_chroms[g], strands[g], int(tss[g])
        if chrom not in genome:
            continue
        window = genome.window(chrom, t, strand, up, down, promoter.soft_mask)
        if window.padded >= length or not promoter.known(window.unknown):
            continue
        ref_row = handed + row_of.setdefault(window.sequence, len(row_of))
        reference_row[g] = ref_row
        rows[g] = ref_row
        n_with_window += 1
        built += 1
        if not candidates[g]:
            continue
        index, lo, hi = sites.select(chrom, int(win_start[g]), int(win_end[g]))
        if index.size == 0:
            continue
        # the checks and counts read the sites on the window's reference bases; the edits read every site select
        # gathered (its region widened by every deletion any donor might carry, which reaches past the window)
        inside = (sites.end[index] >= win_start[g]) & (sites.pos[index] <= win_end[g])
        used[index[inside]] = True
        if missing == "error":
            _refuse_missing(variants, index[inside], gene_ids[g])
        alleles = sites.alleles(index)  # (n_sites, 2 * D)
        # records of one position are one site: a multi-allelic site split by `bcftools norm -m -` (GT 1/2 written
        # as 1/0 and 0/1) is one heterozygous site whose two ALTs lie on different haplotypes
        group = np.unique(sites.pos[index], return_inverse=True)[1].reshape(-1)
        het, ambiguous = _ambiguous_phase(variants, index, inside, alleles, group)
        if ambiguous.any():
            ambiguous_pairs += int(ambiguous.sum())
            if unphased == "error":
                _refuse_ambiguous(variants, index[inside], het[inside], ambiguous, gene_ids[g])
            if unphased == "cis":
                alleles = _alts_on_b(alleles, het & ambiguous[None, :], group)
        carried = alleles.any(axis=1)
        if not carried.any():
            continue
        index, alleles = index[carried], alleles[carried]
        combos, inverse = np.unique(alleles, axis=1, return_inverse=True)
        inverse = inverse.reshape(-1)
        weight = np.bincount(inverse, minlength=combos.shape[1])
        combo_rows = np.empty(combos.shape[1], dtype=np.int32)
        region = genome.fetch(chrom, lo, hi)
        for u in range(combos.shape[1]):
            carriers = np.flatnonzero(combos[:, u])
            if carriers.size == 0:
                combo_rows[u] = ref_row
                continue
            edits = [sites.edit(int(index[i]), int(combos[i, u])) for i in carriers]
            edited = edit_window(region, lo, t, strand, up, down, edits, promoter.soft_mask)
            combo_rows[u] = handed + row_of.setdefault(edited.sequence, len(row_of))
            built += 1
            overlap_skipped += edited.n_overlap_skipped * int(weight[u])
            indels_applied += edited.n_indels * int(weight[u])
        rows[g] = combo_rows[inverse].reshape(n_donors, 2)

    sequences = list(row_of)
    n_rows = handed + len(sequences)
    if sink is not None:
        if sequences:  # the last part
            sink(sequences, n_genes)
        sequences = []
    slots = n_with_window * n_donors * 2
    report = {
        "n_genes": n_genes,
        "n_genes_with_window": n_with_window,
        "n_donors": n_donors,
        "n_sites_in_windows": int(used.sum()),
        "n_haplotype_slots": slots,
        "n_distinct_per_gene_sum": built,
        "n_unique_sequences": n_rows,
        "unique_ratio": built / slots if slots else 0.0,
        **sites.call_counts(used),
        "n_overlap_skipped": overlap_skipped,
        "n_indels_applied": indels_applied,
        "n_ambiguous_phase_pairs": ambiguous_pairs,
        "unphased_policy": unphased,
    }
    return PromoterHaplotypes(
        sequences=sequences,
        promoter_ids=[promoter_id(s) for s in sequences],
        gene_ids=gene_ids,
        reference_row=reference_row,
        donors=list(variants.samples),
        rows=rows,
        report=report,
    )


def _gene_columns(genes: Any, genome: Genome) -> tuple[np.ndarray, list[str], np.ndarray, np.ndarray]:
    """``(gene_ids object (G,), FASTA chromosome names, tss int64 (G,), strands '<U1' (G,))`` of ``genes``."""
    table = getattr(genes, "table", genes)  # a GeneTable
    if not isinstance(table, pa.Table):
        table = pa.table(table)
    absent = [c for c in (S.GENE_ID, S.CHROM, S.TSS, S.STRAND) if c not in table.column_names]
    if absent:
        raise ValueError(f"genes lack column(s) {', '.join(absent)}; columns: {', '.join(table.column_names)}")
    for name in (S.GENE_ID, S.CHROM, S.TSS, S.STRAND):
        if table[name].null_count:
            raise ValueError(f"genes: {table[name].null_count} empty value(s) in column {name}")
    gene_ids = np.asarray(table[S.GENE_ID].to_pylist(), dtype=object)
    chroms = table[S.CHROM].to_pylist()
    mapping = harmonise_chroms(dict.fromkeys(chroms), genome.chroms)
    strands = np.asarray(table[S.STRAND].to_pylist(), dtype=object)
    bad = np.flatnonzero((strands != "+") & (strands != "-"))
    if bad.size:
        raise ValueError(f"genes: gene {gene_ids[bad[0]]} has strand {strands[bad[0]]!r}; expected '+' or '-'")
    tss = np.asarray(table[S.TSS].to_numpy(zero_copy_only=False), dtype=np.int64)
    return gene_ids, [mapping[c] for c in chroms], tss, strands.astype("U1")


class _Sites:
    """The VCF's sites, sorted by position per chromosome, with what edits need."""

    def __init__(self, variants: Variants, genome: Genome) -> None:
        self.variants = variants
        sites = variants.sites
        self.n = sites.num_rows
        names = sites[S.CHROM].to_pylist()
        mapping = harmonise_chroms(dict.fromkeys(names), genome.chroms)
        chroms = np.asarray([mapping[c] for c in names], dtype=object)
        self.pos = np.asarray(sites[S.POS].to_numpy(zero_copy_only=False), dtype=np.int64)
        self.ref: list[str] = sites[S.REF].to_pylist()
        self.alt: list[list[str]] = sites[S.ALT].to_pylist()
        ref_len = np.fromiter((len(r) for r in self.ref), dtype=np.int64, count=self.n)
        self.end = self.pos + ref_len - 1
        # usable[i, k]: allele k of site i can be written (REF always; an ALT when it and REF are spelled in ACGTN)
        n_alleles = 1 + max((len(a) for a in self.alt), default=0)
        self.usable = np.zeros((self.n, n_alleles), dtype=bool)
        self.usable[:, 0] = True
        deleted = np.zeros(self.n, dtype=np.int64)  # most reference bases an ALT of the site removes
        for i, alts in enumerate(self.alt):
            if not is_sequence_allele(self.ref[i]):  # an IUPAC code (M, R...) as REF: no edit of it can be written
                continue
            for k, a in enumerate(alts, start=1):
                if is_sequence_allele(a):
                    self.usable[i, k] = True
                    deleted[i] = max(deleted[i], ref_len[i] - len(a))
        self.by_chrom: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, int]] = {}
        for chrom in dict.fromkeys(chroms.tolist()):
            index = np.flatnonzero(chroms == chrom)
            index = index[np.argsort(self.pos[index], kind="stable")]
            longest = int(ref_len[index].max())
            self.by_chrom[chrom] = (index, self.pos[index], self.end[index], deleted[index], longest)

    def candidates(self, chroms: list[str], start: np.ndarray, end: np.ndarray) -> np.ndarray:
        """Bool per gene: some site's position lies within reach of its window (one binary search per chromosome)."""
        out = np.zeros(len(chroms), dtype=bool)
        chrom_arr = np.asarray(chroms, dtype=object)
        for chrom, (_, pos, _, _, longest) in self.by_chrom.items():
            genes = np.flatnonzero(chrom_arr == chrom)
            if genes.size:
                lo = np.searchsorted(pos, start[genes] - longest + 1, side="left")
                hi = np.searchsorted(pos, end[genes], side="right")
                out[genes] = hi > lo
        return out

    def select(self, chrom: str, start: int, end: int) -> tuple[np.ndarray, int, int]:
        """``(site rows sorted by position, region start, region end)`` for the window ``start..end`` (1-based).

        The sites are those whose REF span meets the region; the region is the window widened on both sides by
        every base those sites' ALTs may delete and by their REF spans (a replacement of another length over the
        TSS anchors the window at its first base: the 5' side then reaches past the span's start), and to cover
        their REF spans, until no new site joins.
        """
        index, pos, site_end, deleted, longest = self.by_chrom[chrom]
        lo, hi = start, end
        while True:
            a = int(np.searchsorted(pos, lo - longest + 1, side="left"))
            b = int(np.searchsorted(pos, hi, side="right"))
            chosen = a + np.flatnonzero(site_end[a:b] >= lo)
            if chosen.size == 0:
                return index[chosen], start, end
            margin = int(deleted[chosen].sum() + (site_end[chosen] - pos[chosen] + 1).sum())
            new_lo = min(start - margin, int(pos[chosen].min()))
            new_hi = max(end + margin, int(site_end[chosen].max()))
            if (new_lo, new_hi) == (lo, hi):
                return index[chosen], lo, hi
            lo, hi = new_lo, new_hi

    def alleles(self, index: np.ndarray) -> np.ndarray:
        """int8 (len(index), 2 * D) allele per site and haplotype slot (donor d's A, B at 2d, 2d + 1), 0 where the
        allele is missing or cannot be written."""
        calls = self.variants.genotypes[index].reshape(len(index), -1)
        calls = np.where(calls < 0, 0, calls)
        usable = np.take_along_axis(self.usable[index], calls.astype(np.intp), axis=1)
        return np.where(usable, calls, 0).astype(np.int8)

    def edit(self, site: int, allele: int) -> tuple[int, str, str]:
        return int(self.pos[site]), self.ref[site], self.alt[site][allele - 1]

    def call_counts(self, used: np.ndarray) -> dict[str, int]:
        """Missing alleles, unphased calls and unwritable ALT alleles at the ``used`` sites."""
        index = np.flatnonzero(used)
        calls = self.variants.genotypes[index]  # (n, D, 2)
        missing = calls < 0
        called = np.where(missing, 0, calls).astype(np.intp)
        unusable = ~self.usable[index[:, None, None], called]
        return {
            "n_missing_alleles": int(missing.sum()),
            "n_unphased_calls": int((~self.variants.phased[index] & ~missing.any(axis=2)).sum()),
            "n_symbolic_skipped": int(unusable.sum()),
        }


def _ambiguous_phase(variants: Variants, index: np.ndarray, inside: np.ndarray | None = None,
                     alleles: np.ndarray | None = None, group: np.ndarray | None = None
                     ) -> tuple[np.ndarray, np.ndarray]:
    """((n_sites, D) unphased heterozygous calls at ``index``, (D,) donors whose phase across these sites is not
    known: heterozygous calls at two or more sites of which one is unphased, or phased calls of two phase sets
    (FORMAT ``PS``: calls of different sets are phased within their set only).

    ``inside`` (n_sites,): only these sites' calls count towards the donors' ambiguity (the window's own; the
    others are still returned). ``alleles`` (:meth:`_Sites.alleles`): a call is heterozygous in the alleles that
    can be written (a ``*`` or symbolic ALT beside REF is not: it writes nothing). ``group`` (n_sites,): records
    of one group are one site (the records of one position: a split multi-allelic site)."""
    calls = variants.genotypes[index]
    called = (calls >= 0).all(axis=2)
    pairs = alleles.reshape(len(index), -1, 2) if alleles is not None else calls
    het_any = (pairs[..., 0] != pairs[..., 1]) & called
    unphased_all = het_any & ~variants.phased[index]
    if inside is not None:
        het_any = het_any & inside[:, None]
    unphased = het_any & ~variants.phased[index]
    if group is not None and len(index):
        # a split multi-allelic site puts its ALTs on different slots (1/2 as 1/0 and 0/1): one site; records of
        # one position with ALTs on the same slot (0/1 and 0/1: an SNV and a deletion sharing its base) are as
        # many sites, whose phase an unphased call leaves unknown
        shape = (int(group.max()) + 1, het_any.shape[1])
        on_a, on_b = np.zeros(shape, np.int64), np.zeros(shape, np.int64)
        np.add.at(on_a, group, het_any & (pairs[..., 0] > 0))
        np.add.at(on_b, group, het_any & (pairs[..., 1] > 0))
        n_het = np.maximum(on_a, on_b).sum(axis=0)
    else:
        n_het = het_any.sum(axis=0)
    ambiguous = (n_het >= 2) & unphased.any(axis=0)
    if variants.phase_set is not None:  # phased hets of more than one set
        phased = het_any & ~unphased
        sets = variants.phase_set[index].astype(np.int64)
        top = np.where(phased, sets, np.iinfo(np.int64).min).max(axis=0)
        low = np.where(phased, sets, np.iinfo(np.int64).max).min(axis=0)
        ambiguous |= phased.any(axis=0) & (top != low)
    return unphased_all, ambiguous


def _alts_on_b(alleles: np.ndarray, move: np.ndarray, group: np.ndarray | None = None) -> np.ndarray:
    """``alleles`` (n_sites, 2 * D) with the calls of ``move`` (n_sites, D) that pair REF with one ALT rewritten
    as REF on haplotype A and the ALT on B (policy ``cis``); calls with two different ALTs keep their order, and so
    do the records of a ``group`` (one position) where the donor carries ALTs of two of them: a split
    multi-allelic call (1/0 and 0/1 for 1/2) keeps its ALTs on different haplotypes."""
    pairs = alleles.reshape(alleles.shape[0], -1, 2).copy()
    if group is not None and len(group):
        carrying = (pairs != 0).any(axis=2).astype(np.int64)  # (n_sites, D)
        per_group = np.zeros((int(group.max()) + 1, carrying.shape[1]), dtype=np.int64)
        np.add.at(per_group, group, carrying)
        move = move & (per_group[group] < 2)
    one_ref = move & ((pairs[..., 0] == 0) | (pairs[..., 1] == 0))
    alt = pairs[..., 0] + pairs[..., 1]
    pairs[..., 0] = np.where(one_ref, 0, pairs[..., 0])
    pairs[..., 1] = np.where(one_ref, alt, pairs[..., 1])
    return pairs.reshape(alleles.shape)


def _refuse_ambiguous(variants: Variants, index: np.ndarray, het: np.ndarray, ambiguous: np.ndarray,
                      gene_id: str) -> None:
    """Raise on the first donor whose phase in the window of ``gene_id`` is ambiguous (``unphased="error"``)."""
    d = int(np.flatnonzero(ambiguous)[0])
    calls = variants.genotypes[index, d]
    rows = index[np.flatnonzero((calls[:, 0] != calls[:, 1]) & (calls >= 0).all(axis=1))[:_SHOW_SITES]]

    def site(r: int) -> str:
        where = f"{variants.sites[S.CHROM][r].as_py()}:{variants.sites[S.POS][r].as_py()}"
        if not variants.phased[r, d]:
            return where + " (unphased)"
        return where + ("" if variants.phase_set is None else f" (PS {int(variants.phase_set[r, d])})")

    raise InputError(
        variants.path,
        f"{int(ambiguous.sum())} donor(s) have heterozygous calls at two or more sites of the promoter window of "
        f"gene {gene_id} whose phase relative to each other is unknown (unphased heterozygous calls, or phase sets "
        "that differ): their two promoter haplotypes are ambiguous",
        record=f"donor {variants.samples[d]}, sites {', '.join(site(int(r)) for r in rows)}",
        expected="calls phased in one phase set (0|1, one PS) wherever a window holds two heterozygous sites "
        "(genotypes.unphased: error)",
        hint="Phase the VCF (e.g. with SHAPEIT or Beagle), or set genotypes.unphased to as_written or cis",
    )


def _refuse_missing(variants: Variants, index: np.ndarray, gene_id: str) -> None:
    """Raise on the first missing allele among the sites ``index`` (``missing="error"``)."""
    calls = variants.genotypes[index]
    hits = np.argwhere(calls < 0)
    if not hits.size:
        return
    i, d, h = (int(x) for x in hits[0])
    site = int(index[i])
    chrom = variants.sites[S.CHROM][site].as_py()
    pos = variants.sites[S.POS][site].as_py()
    vid = variants.sites[S.VARIANT_ID][site].as_py() or "no ID"
    raise InputError(
        variants.path,
        f"{len(hits)} missing allele(s) in the promoter window of gene {gene_id}",
        record=f"site {chrom}:{pos} ({vid}), donor {variants.samples[d]}, haplotype {'AB'[h]} "
        f"({'first' if h == 0 else 'second'} GT allele)",
        expected="every allele called at sites inside promoter windows (missing='error')",
        hint="Use missing='reference' to read missing alleles as REF, or impute the VCF first (e.g. Beagle)",
    )
