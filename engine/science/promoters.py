"""Promoter inputs of the network, numpy only: the one-hot encoder and the lookup of each record's promoter rows.

:func:`one_hot_promoters` is the one promoter encoder of the engine: every path that hands the network promoters
(training, the bundle, impute with personal genomes, variant effects) builds its (P, 4, L) table with it.
:class:`PromoterLookup` maps a record (gene_index, sample_index) to the rows of its two haplotypes in that table;
:func:`promoter_inputs` reads both from a prepare output, :func:`genome_promoter_inputs` builds them from the
donors' genomes (:class:`geximpute.science.genomes.DonorGenomes`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from geximpute import schema as S
from geximpute.science.genomes import DonorGenomes

# A, C, G, T (either case) -> 0..3; anything else -> 4, which matches no channel and so encodes as all zeros
_BASE_CODE = np.full(256, 4, dtype=np.uint8)
for _i, _b in enumerate(b"ACGT"):
    _BASE_CODE[_b] = _i
    _BASE_CODE[_b + 32] = _i


@dataclass(frozen=True)
class PromoterLookup:
    """The promoter rows a record reads: its gene's reference window, or its donor's two haplotypes.

    Attributes:
        gene_row: (G,) int64 reference row of each gene in the one-hot table, -1 = no promoter.
        sample_donor: (S,) int64 donor index of each sample (``sample_index`` of the records).
        personal_keys: (M,) int64 sorted keys ``gene * n_donors + donor`` of the pairs whose haplotypes differ from
            the reference.
        personal_rows: (M, 2) int64 rows of those pairs' haplotypes A and B.
        n_donors: donor count of the keys.
    """

    gene_row: np.ndarray
    sample_donor: np.ndarray
    personal_keys: np.ndarray
    personal_rows: np.ndarray
    n_donors: int

    @classmethod
    def reference(cls, gene_row: np.ndarray) -> PromoterLookup:
        """A lookup that gives every record its gene's reference window."""
        return cls(np.asarray(gene_row, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64),
                   np.zeros((0, 2), np.int64), 0)

    @property
    def personal(self) -> bool:
        """Whether any donor carries a non-reference haplotype."""
        return len(self.personal_keys) > 0

    def rows(self, gene_index: np.ndarray, sample_index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """((N,) row of haplotype A, (N,) row of haplotype B) of records (gene_index, sample_index)."""
        gene_index = np.asarray(gene_index, np.int64)
        a = self.gene_row[gene_index]
        b = a.copy()
        if self.personal:
            key = gene_index * self.n_donors + self.sample_donor[np.asarray(sample_index, np.int64)]
            pos = np.minimum(np.searchsorted(self.personal_keys, key), len(self.personal_keys) - 1)
            hit = self.personal_keys[pos] == key
            a[hit] = self.personal_rows[pos[hit], 0]
            b[hit] = self.personal_rows[pos[hit], 1]
        return a, b

    def for_records(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`rows` of a table with ``gene_index`` and ``sample_index`` columns."""
        return self.rows(records["gene_index"].to_numpy(), records["sample_index"].to_numpy())


@dataclass(frozen=True)
class RowSubset:
    """The promoter rows of ``lookup`` renumbered as positions in ``rows`` (sorted, unique): the lookup of records
    whose haplotype embeddings were gathered for them alone (:class:`geximpute.steps.impute.PartEmbeddings`).
    Every row the records read must be in ``rows``; -1 (no promoter) stays -1."""

    lookup: PromoterLookup
    rows: np.ndarray

    def for_records(self, records: pa.Table) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`PromoterLookup.for_records`, each row its position in ``rows``."""
        return tuple(np.where(r >= 0, np.searchsorted(self.rows, r), -1) for r in self.lookup.for_records(records))


def one_hot_promoters(sequences: list[str], length: int) -> np.ndarray:
    """One-hot encode promoter sequences.

    Args:
        sequences: P sequences, 5'->3' on the gene's strand (:data:`geximpute.schema.PROMOTERS` ``sequence``).
        length: L. Shorter sequences are right-padded with zeros; longer ones keep their first L bases, so
            position i is always the same offset from the window start.

    Returns:
        (P, 4, L) uint8, channels A, C, G, T; N and any other letter are all zeros.
    """
    return one_hot_codes(promoter_codes(sequences, length))


def promoter_codes(sequences: list[str], length: int) -> np.ndarray:
    """(P, L) uint8 base codes of ``sequences`` (A, C, G, T in either case -> 0..3, anything else and the padding
    -> 4), cut or padded to ``length`` as :func:`one_hot_promoters` does: a quarter of the one-hot table's bytes,
    which :func:`one_hot_codes` expands."""
    if length < 1:
        raise ValueError(f"promoter_codes: length must be >= 1, got {length}")
    # one fixed-width byte string per sequence, then a single table lookup over all of them
    raw = b"".join(s.encode("ascii", errors="replace")[:length].ljust(length, b"N") for s in sequences)
    return _BASE_CODE[np.frombuffer(raw, dtype=np.uint8)].reshape(len(sequences), length)


def no_promoters(length: int) -> np.ndarray:
    """An empty (0, 4, ``length``) one-hot table: for records whose promoters come as embeddings, or from no table."""
    return np.zeros((0, 4, length), np.uint8)


def one_hot_codes(codes: np.ndarray) -> np.ndarray:
    """(P, 4, L) uint8 one-hot table of :func:`promoter_codes`' (P, L) codes (code 4: all zeros)."""
    codes = np.asarray(codes, np.uint8)
    return (codes[:, None, :] == np.arange(4, dtype=np.uint8)[None, :, None]).astype(np.uint8)


def promoter_inputs(records_dir: Path, gene_ids: np.ndarray, length: int) -> tuple[np.ndarray, PromoterLookup]:
    """(one-hot promoter table (P, 4, L) uint8, the promoter rows of each record) of a prepare output.

    Records read their gene's reference window, or, with personal genomes (``donor_promoters.parquet``), their
    donor's two haplotypes.
    """
    promoters = pq.read_table(records_dir / "promoters.parquet")
    links = pq.read_table(records_dir / "gene_promoters.parquet")
    table = one_hot_promoters(promoters["sequence"].to_pylist(), length)
    personal = records_dir / "donor_promoters.parquet"
    samples = pq.read_table(records_dir / "samples.parquet", columns=[S.DONOR_ID])[S.DONOR_ID].to_pylist()
    lookup = make_lookup(promoters["promoter_id"].to_pylist(), links, gene_ids, samples,
                         pq.read_table(personal) if personal.is_file() else None)
    return table, lookup


def make_lookup(promoter_ids: list[str], gene_promoters: pa.Table, gene_ids: np.ndarray, sample_donors: list[str],
                donor_promoters: pa.Table | None) -> PromoterLookup:
    """The :class:`PromoterLookup` of records over ``gene_ids`` and samples whose donors are ``sample_donors``.

    Args:
        promoter_ids: ids of the rows of the one-hot table.
        gene_promoters: ``gene_id`` -> ``promoter_id`` of the reference windows (schema.GENE_PROMOTERS).
        gene_ids: (G,) the records' ``gene_index`` order.
        sample_donors: (S,) donor id of each ``sample_index``.
        donor_promoters: (gene, donor) -> haplotype ids where they differ from the reference, or None.
    """
    row_of = {pid: i for i, pid in enumerate(promoter_ids)}
    gene_row = {g: row_of[p] for g, p in zip(gene_promoters[S.GENE_ID].to_pylist(),
                                            gene_promoters["promoter_id"].to_pylist(), strict=True)}
    rows = np.array([gene_row.get(g, -1) for g in gene_ids], dtype=np.int64)
    if donor_promoters is None or donor_promoters.num_rows == 0:
        return PromoterLookup.reference(rows)
    donors, sample_donor = np.unique(np.asarray(sample_donors, dtype=object), return_inverse=True)
    donor_of = {d: i for i, d in enumerate(donors)}
    gene_of = {g: i for i, g in enumerate(gene_ids)}
    g = np.array([gene_of.get(x, -1) for x in donor_promoters[S.GENE_ID].to_pylist()], dtype=np.int64)
    d = np.array([donor_of.get(x, -1) for x in donor_promoters[S.DONOR_ID].to_pylist()], dtype=np.int64)
    a = np.array([row_of.get(x, -1) for x in donor_promoters["promoter_a"].to_pylist()], dtype=np.int64)
    b = np.array([row_of.get(x, -1) for x in donor_promoters["promoter_b"].to_pylist()], dtype=np.int64)
    keep = (g >= 0) & (d >= 0) & (a >= 0) & (b >= 0)
    keys = g[keep] * len(donors) + d[keep]
    order = np.argsort(keys, kind="stable")
    return PromoterLookup(rows, sample_donor.astype(np.int64), keys[order],
                          np.stack([a[keep], b[keep]], axis=1)[order], len(donors))


def genome_promoter_inputs(genomes: DonorGenomes, sample_donor: np.ndarray, length: int
                           ) -> tuple[np.ndarray, PromoterLookup]:
    """(one-hot table (P, 4, L) of every reference window and donor haplotype, the lookup of the samples).

    Args:
        genomes: the donors' promoter haplotypes.
        sample_donor: (S,) donor index (into ``genomes.rows``' donor axis) of each ``sample_index``.
        length: L.
    """
    return one_hot_promoters(list(genomes.sequences), length), genome_promoter_lookup(genomes, sample_donor)


def genome_promoter_lookup(genomes: DonorGenomes, sample_donor: np.ndarray) -> PromoterLookup:
    """The :class:`PromoterLookup` of the samples into ``genomes.sequences``' rows (reference windows and donor
    haplotypes), without the one-hot table.

    Args:
        genomes: the donors' promoter haplotypes.
        sample_donor: (S,) donor index (into ``genomes.rows``' donor axis) of each ``sample_index``.
    """
    reference = np.asarray(genomes.reference_row, np.int64)
    rows = np.asarray(genomes.rows, np.int64)  # (G, D, 2)
    gene, donor = genomes.personal_pairs()  # row-major: the keys come out sorted
    n_donors = rows.shape[1]
    return PromoterLookup(reference, np.asarray(sample_donor, np.int64), gene * n_donors + donor,
                          rows[gene, donor], n_donors)
