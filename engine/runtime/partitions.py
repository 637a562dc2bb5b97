"""The committed run-date partitions of a nightly output root, read: which donors each holds, and each donor's
latest run date. Shared by ``nightly`` (which writes them) and :func:`geximpute.api.predictions` (which reads a
donor's latest rows), without importing the model or Ray."""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow as pa
import pyarrow.dataset as pads

from geximpute import schema as S
from geximpute.errors import GeximputeError
from geximpute.runtime.atomic import read_json

log = logging.getLogger(__name__)


def donors_from_rows(partition: Path) -> dict[str, dict]:
    """The donors of a partition read from its rows (donor, run id where the rows carry one, rows), for a partition
    whose manifest is torn."""
    try:
        dataset = pads.dataset(partition, format="parquet", partitioning="hive")
        table = dataset.to_table(columns=[S.DONOR_ID] + (["run_id"] if "run_id" in dataset.schema.names else []))
    except (pa.ArrowException, ValueError, OSError) as exc:
        raise GeximputeError(f"{partition}: its manifest is unreadable and its rows do not read either ({exc}): the "
                             "partition is damaged; restore it from a backup, or move it out of the output and run "
                             "again") from exc
    found: dict[str, dict] = {}
    run_ids = table["run_id"].to_pylist() if "run_id" in table.column_names else [None] * table.num_rows
    for donor, run_id in zip(table[S.DONOR_ID].to_pylist(), run_ids, strict=True):
        entry = found.setdefault(donor, {"run_id": run_id, "rows": 0, "vcf_sha256": None})
        entry["rows"] += 1
    return found


def partition_donors(partition: Path) -> dict[str, dict]:
    """The donors of one committed partition, from its manifest's ``donors`` (or from its rows, with a warning,
    where the manifest is missing, torn or lists none)."""
    try:
        donors = read_json(partition / "_manifest.json", "partition manifest")
        if not isinstance(donors, dict) or not isinstance(donors.get("donors"), dict):
            raise GeximputeError(f"{partition / '_manifest.json'}: the partition manifest lists no donors")
        return dict(donors["donors"])
    except (GeximputeError, FileNotFoundError) as exc:
        log.warning("%s; reading the partition's donors from its rows", exc)
        return donors_from_rows(partition)


def committed_donors(root: Path) -> dict[str, dict]:
    """Donors recorded in the committed partitions of ``root``, each with its latest ``run_date``.

    A partition's manifest is written last and fsynced before the commit; one found empty or torn anyway (a volume
    that lost it) is not fatal: the partition's donors are read from its rows instead, with a warning.
    """
    found: dict[str, dict] = {}
    for partition in sorted(root.glob(f"{S.RUN_DATE}=*")):  # ISO dates: the last one read is the latest
        day = partition.name.split("=", 1)[1]
        for donor, info in partition_donors(partition).items():
            found[donor] = {**info, S.RUN_DATE: day}
    return found
