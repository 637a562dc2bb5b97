"""Chromosome names: ``chr17``, ``17`` and ``CHR17`` are one chromosome; ``MT``/``chrM`` are one too."""

from __future__ import annotations

from collections.abc import Iterable


def chrom_key(name: str) -> str:
    """The naming-independent key of a chromosome: ``chr17`` -> ``17``, ``MT`` -> ``M``, ``chrX`` -> ``X``."""
    key = name.strip()
    if key[:3].lower() == "chr":
        key = key[3:]
    if key.upper() in ("M", "MT"):
        return "M"
    return key.upper() if key.upper() in ("X", "Y") else key


def harmonise_chroms(names: Iterable[str], reference: Iterable[str] | None = None) -> dict[str, str]:
    """Map chromosome names onto one naming style.

    With ``reference`` (e.g. the FASTA's record names) each name is mapped to the reference name with the same
    key; names the reference lacks map to the UCSC style. Without it, every name maps to the UCSC style
    (``chr`` + key, ``chrM``).

    Returns:
        ``{name: new_name}`` for every input name (identity for names already in the target style).
    """
    by_key: dict[str, str] = {}
    for ref in reference or ():
        by_key.setdefault(chrom_key(ref), ref)
    mapping = {}
    for name in names:
        key = chrom_key(name)
        mapping[name] = by_key.get(key, f"chr{key}")
    return mapping


def renamed(mapping: dict[str, str]) -> dict[str, str]:
    """Only the entries of a :func:`harmonise_chroms` mapping that change the name (for reports)."""
    return {old: new for old, new in mapping.items() if old != new}
