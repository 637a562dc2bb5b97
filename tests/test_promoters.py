"""geximpute.science.promoters: the promoter inputs of the network (one-hot table + lookup), read from a prepare output
on disk and built from donors' genomes; and the one size spec shared by the config and the network."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from geximpute import schema as S
from geximpute.config import ModelConfig, load_config
from geximpute.errors import ConfigError
from geximpute.model.network import NetworkSpec
from geximpute.science.genomes import DonorGenomes
from geximpute.science.promoters import genome_promoter_inputs, make_lookup, one_hot_promoters, promoter_inputs

SEQS = {"pA": "ACGTAC", "pB": "CCCCCC", "pC": "GGGTTT", "pD": "TTTTAA"}


def _prepare_output(folder, personal: bool):
    """The four files of a prepare output that :func:`promoter_inputs` reads, in the engine's schemas."""
    ids = list(SEQS)
    pq.write_table(pa.table({"promoter_id": ids, "sequence": [SEQS[i] for i in ids], "padded": [0] * len(ids)},
                            schema=S.PROMOTERS), folder / "promoters.parquet")
    pq.write_table(pa.table({S.GENE_ID: ["g1", "g2"], S.CHROM: ["chr1", "chr2"], "promoter_id": ["pA", "pB"],
                             "soft_masked": [0, 0]}, schema=S.GENE_PROMOTERS), folder / "gene_promoters.parquet")
    pq.write_table(pa.table({S.DONOR_ID: ["d1", "d2", "d2", "d3"]}), folder / "samples.parquet")
    if personal:
        # d2 carries pC/pD at g1; a row for an unknown gene is ignored
        pq.write_table(pa.table({S.GENE_ID: ["g1", "gX"], S.DONOR_ID: ["d2", "d2"], "promoter_a": ["pC", "pA"],
                                 "promoter_b": ["pD", "pA"]}, schema=S.DONOR_PROMOTERS),
                       folder / "donor_promoters.parquet")


def test_promoter_inputs_read_reference_windows_from_a_prepare_output(tmp_path):
    _prepare_output(tmp_path, personal=False)
    table, lookup = promoter_inputs(tmp_path, np.array(["g2", "g1", "g3"]), 8)
    assert table.shape == (4, 4, 8) and table.dtype == np.uint8
    np.testing.assert_array_equal(table, one_hot_promoters(list(SEQS.values()), 8))
    assert not lookup.personal
    a, b = lookup.rows(np.array([0, 1, 2]), np.array([0, 1, 3]))
    assert a.tolist() == b.tolist() == [1, 0, -1]  # g2 -> pB (row 1), g1 -> pA (row 0), g3 has no promoter


def test_promoter_inputs_give_a_donor_its_own_haplotypes(tmp_path):
    _prepare_output(tmp_path, personal=True)
    _, lookup = promoter_inputs(tmp_path, np.array(["g1", "g2"]), 6)
    assert lookup.personal
    # samples 1 and 2 are d2's: at g1 they read pC and pD (rows 2, 3); every other record its gene's reference
    a, b = lookup.rows(np.array([0, 0, 0, 0, 1, 1]), np.array([0, 1, 2, 3, 1, 2]))
    assert a.tolist() == [0, 2, 2, 0, 1, 1]
    assert b.tolist() == [0, 3, 3, 0, 1, 1]


def test_make_lookup_skips_personal_rows_it_cannot_place():
    links = pa.table({S.GENE_ID: ["g1"], "promoter_id": ["p0"]})
    personal = pa.table({S.GENE_ID: ["g1", "g1"], S.DONOR_ID: ["nobody", "d1"], "promoter_a": ["p1", "missing"],
                         "promoter_b": ["p1", "p1"]})
    lookup = make_lookup(["p0", "p1"], links, np.array(["g1"]), ["d1"], personal)
    assert len(lookup.personal_keys) == 0  # an unknown donor and an unknown promoter id: both dropped
    assert lookup.rows(np.array([0]), np.array([0]))[0].tolist() == [0]


def test_genome_promoter_inputs_match_the_donors_rows():
    sequences = ["AAAA", "CCCC", "GGGG"]
    reference = np.array([0, 1])
    rows = np.repeat(reference, 3 * 2).reshape(2, 3, 2).astype(np.int32)  # (G, D, 2): everyone the reference
    rows[0, 2] = [0, 2]  # donor 2 is heterozygous at gene 0
    genomes = DonorGenomes(sequences=sequences, promoter_ids=["a", "c", "g"], reference_row=reference, rows=rows,
                           has_genome=np.ones(3, bool), site_ptr=np.zeros(3, np.int64),
                           site_index=np.zeros(0, np.int64), dosage=np.zeros((0, 3), np.float32), report={})
    table, lookup = genome_promoter_inputs(genomes, np.array([0, 2, 2, 1]), 4)
    np.testing.assert_array_equal(table, one_hot_promoters(sequences, 4))
    a, b = lookup.rows(np.array([0, 0, 1, 0]), np.array([0, 1, 2, 3]))
    assert a.tolist() == [0, 0, 1, 0] and b.tolist() == [0, 2, 1, 0]


def test_one_hot_of_no_sequence_is_an_empty_table():
    assert one_hot_promoters([], 7).shape == (0, 4, 7)


# the one size spec ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [{"cnn_kernel": 4}, {"d_model": 30, "n_heads": 4}, {"dropout": 1.0},
                                 {"n_layers": 0}, {"d_model": 8.0}, {"cnn_channels": True}])
def test_config_and_network_reject_the_same_sizes_with_the_same_message(bad):
    with pytest.raises(ConfigError) as from_config:
        ModelConfig(**bad)
    with pytest.raises(ConfigError) as from_network:
        NetworkSpec(n_tissues=3, promoter_length=10, **bad)
    assert str(from_config.value) == str(from_network.value)


def test_network_spec_of_a_config_carries_every_size_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("inputs: {genes: g.gtf, expression: e.gct}\n")
    config = load_config(path, ["model.d_model=8", "model.n_heads=4", "model.cnn_kernel=9", "model.dropout=0.2"])
    spec = NetworkSpec.of(config.model, n_tissues=5, promoter_length=40, use_context=False)
    assert {f.name: getattr(spec, f.name) for f in dataclasses.fields(ModelConfig)} == dataclasses.asdict(
        config.model)
    assert (spec.n_tissues, spec.promoter_length, spec.use_promoter, spec.use_context) == (5, 40, True, False)
    assert NetworkSpec(**dataclasses.asdict(spec)) == spec  # what a bundle's network.json holds reads back
    with pytest.raises(ValueError, match="n_tissues"):
        NetworkSpec.of(config.model, n_tissues=0, promoter_length=40)
