"""Sample table: sample_id -> donor_id, tissue (geximpute.schema.SAMPLES).

Accepts the engine's own layout (``sample_id``, ``donor_id``, ``tissue``) and GTEx's sample attribute table
(``SAMPID`` and ``SMTSD``; the donor is the first two dash-separated fields of a GTEx sample id, e.g.
``GTEX-1117F`` from ``GTEX-1117F-0226-SM-5GZZ7``, when the table has no donor column).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from geximpute import schema as S
from geximpute.errors import InputError
from geximpute.io.tables import read_table, require_columns

SAMPLE_ALIASES = ["SAMPID", "sample", "sample_name"]
DONOR_ALIASES = ["SUBJID", "donor", "subject_id", "individual", "participant_id"]
TISSUE_ALIASES = ["SMTSD", "SMTS", "tissue_name", "tissue_detail", "body_site"]


def gtex_donor(sample_id: str) -> str | None:
    """``GTEX-1117F-0226-SM-5GZZ7`` -> ``GTEX-1117F``; ``None`` for ids not in GTEx's form."""
    parts = sample_id.split("-")
    return "-".join(parts[:2]) if len(parts) >= 2 and parts[0].upper() in ("GTEX", "K") else None


def read_samples(path: str | Path) -> pa.Table:
    """Read and validate a sample table.

    Returns:
        :data:`geximpute.schema.SAMPLES`, one row per sample.

    Raises:
        InputError: missing/empty file, missing columns, empty values, duplicate sample ids, a donor that cannot
            be derived.
    """
    path = Path(path)
    table = read_table(path, "sample table", column_types={}, null_values=[""],
                       text_columns={S.SAMPLE_ID: SAMPLE_ALIASES, S.TISSUE: TISSUE_ALIASES,
                                     S.DONOR_ID: DONOR_ALIASES})
    lower = {c.lower() for c in table.column_names}
    has_donor = any(a.lower() in lower for a in (S.DONOR_ID, *DONOR_ALIASES))
    required = {S.SAMPLE_ID: SAMPLE_ALIASES, S.TISSUE: TISSUE_ALIASES}
    if has_donor:
        required[S.DONOR_ID] = DONOR_ALIASES
    table = require_columns(table, path, "sample table", required)
    for name in required:
        table = table.set_column(table.schema.get_field_index(name), name, table[name].cast(pa.string()))
    if not has_donor:
        donors = [gtex_donor(s) if s is not None else None for s in table[S.SAMPLE_ID].to_pylist()]
        if any(d is None for d in donors):
            i = donors.index(None)
            raise InputError(
                path,
                "sample table has no donor column and the donor cannot be derived from the sample id",
                record=f"line {i + 2} (sample {table[S.SAMPLE_ID][i].as_py()!r})",
                expected=f"a donor_id column (or one of {', '.join(DONOR_ALIASES)}), or GTEx sample ids",
            )
        table = table.append_column(S.DONOR_ID, pa.array(donors, pa.string()))
    for name in (S.SAMPLE_ID, S.DONOR_ID, S.TISSUE):
        empty = pc.or_(pc.is_null(table[name]), pc.equal(pc.utf8_trim_whitespace(table[name]), ""))
        if pc.any(empty).as_py():
            i = pc.index(empty, True).as_py()
            raise InputError(path, f"empty {name}", record=f"line {i + 2}", expected=f"a {name} on every row")
    for name in (S.SAMPLE_ID, S.DONOR_ID, S.TISSUE):
        _check_distinct_names(path, name, table[name].to_pylist())
    ids = np.asarray(table[S.SAMPLE_ID].to_pylist(), dtype=object)
    uniq, counts = np.unique(ids, return_counts=True)
    if (counts > 1).any():
        dup = uniq[counts > 1][0]
        lines = [str(i + 2) for i in np.flatnonzero(ids == dup)[:3]]
        raise InputError(
            path,
            f"{int((counts > 1).sum())} duplicate sample id(s), e.g. {dup!r}",
            record=f"lines {', '.join(lines)}",
            expected="one row per sample id",
        )
    return S.check_table(table, S.SAMPLES, str(path))


def _check_distinct_names(path: Path, name: str, values: list[str], where: str = "line", first_at: int = 2) -> None:
    """Refuse names with blanks at either end, and two names that differ only by case or blanks (``D1``, ``d1``,
    ``D1 ``): each would silently become a donor (or tissue) of its own. ``where``/``first_at``: how the records
    are named (the sample table's lines from 2; an expression header's columns)."""
    for i, value in enumerate(values):
        if value != value.strip():
            raise InputError(path, f"{name} {value!r} has blanks at its start or end",
                             record=f"{where} {i + first_at}",
                             expected=f"a {name} without leading or trailing spaces or tabs")
    first: dict[str, tuple[str, int]] = {}
    for i, value in enumerate(values):
        key = " ".join(value.split()).casefold()
        seen = first.setdefault(key, (value, i))
        if seen[0] != value:
            raise InputError(path, f"{name}s {seen[0]!r} and {value!r} differ only by case or spacing",
                             record=f"{where}s {seen[1] + first_at} and {i + first_at}",
                             expected=f"one spelling per {name} (they would count as two)")


def check_column_names(path: Path, name: str, values: list[str]) -> None:
    """:func:`_check_distinct_names` of an expression file's sample columns where they are the tissues or donors
    themselves (no sample table)."""
    _check_distinct_names(path, name, values, where="value column", first_at=1)


def reference_samples(tissues: list[str]) -> pa.Table:
    """The sample table implied by a table without one: each column is one tissue of one reference genotype."""
    return pa.table(
        {S.SAMPLE_ID: tissues, S.DONOR_ID: [S.REFERENCE_DONOR] * len(tissues), S.TISSUE: tissues},
        schema=S.SAMPLES,
    )


def person_samples(donors: list[str], tissue: str) -> pa.Table:
    """The sample table of a one-tissue file with one column per person: each column is a donor's one sample."""
    return pa.table({S.SAMPLE_ID: donors, S.DONOR_ID: donors, S.TISSUE: [tissue] * len(donors)}, schema=S.SAMPLES)
