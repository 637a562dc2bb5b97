"""Featurisation of context records and the hybrid network: exact arrays, invariances, DDP-safety and learnability."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest
import torch

from geximpute import schema as S
from geximpute.model import (
    BATCH_KEYS,
    FeatureSpec,
    HybridNet,
    NetworkSpec,
    PromoterCNN,
    drop_groups,
    empty_batch,
    featurize,
    to_tensors,
)
from geximpute.science.promoters import one_hot_promoters


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and a shared CI machine makes spinning OpenMP threads slow."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


VARIANTS = {
    "hybrid": (True, True),
    "transformer_only": (False, True),
    "cnn_only": (True, False),
    "gene_only": (False, False),
}


def context_table(rows: list[dict]) -> pa.Table:
    """A :data:`geximpute.schema.CONTEXT` table from short row dicts; unnamed columns get neutral values."""
    defaults = {
        S.GENE_ID: "g",
        S.SAMPLE_ID: "s",
        S.DONOR_ID: "d",
        S.TISSUE: "t",
        S.CHROM: "chr1",
        "gene_index": 0,
        "sample_index": 0,
        "tissue_index": 0,
        "split": "train",
        "hidden": False,
        "target": None,
        "nb_value": [],
        "nb_logdist": [],
        "nb_orient": [],
        "nb_overlap": [],
        "nb_gene_mean": [],
        "tis_value": [],
        "tis_index": [],
        "tis_corr": [],
        "tis_mean": [],
        "tissue_mean": None,
        "gene_mean": None,
        "tissue_offset": 0.0,
    }
    full = [{**defaults, **row} for row in rows]
    return pa.Table.from_pylist(full, schema=S.CONTEXT)


def random_records(rng: np.random.Generator, n: int, k_max: int, n_tissues: int) -> pa.Table:
    """``n`` records with random list lengths (some empty), values and null means."""
    rows = []
    for _ in range(n):
        k, t = int(rng.integers(0, k_max + 1)), int(rng.integers(0, n_tissues + 2))
        rows.append(
            {
                "tissue_index": int(rng.integers(0, n_tissues)),
                "target": float(rng.normal()),
                "nb_value": rng.normal(size=k).tolist(),
                "nb_logdist": rng.uniform(-6, 6, k).tolist(),
                "nb_orient": rng.integers(0, 3, k).tolist(),
                "nb_overlap": (rng.random(k) < 0.2).tolist(),
                "nb_gene_mean": rng.normal(size=k).tolist(),
                "tis_value": rng.normal(size=t).tolist(),
                "tis_index": rng.integers(0, n_tissues, t).tolist(),
                "tis_corr": rng.uniform(-1, 1, t).tolist(),
                "tis_mean": np.where(rng.random(t) < 0.2, np.nan, rng.normal(size=t)).tolist(),
                "tissue_mean": None if rng.random() < 0.3 else float(rng.normal()),
                "gene_mean": None if rng.random() < 0.3 else float(rng.normal()),
                "tissue_offset": float(rng.normal()),
            }
        )
    return context_table(rows)


def tiny_spec(**kw) -> NetworkSpec:
    base = dict(
        n_tissues=4,
        promoter_length=40,
        d_model=16,
        n_heads=2,
        n_layers=2,
        cnn_channels=8,
        cnn_kernel=5,
        cnn_layers=2,
        dropout=0.0,
    )
    return NetworkSpec(**{**base, **kw})


def random_promoters(rng: np.random.Generator, p: int, length: int) -> torch.Tensor:
    seqs = ["".join(rng.choice(list("ACGT"), length)) for _ in range(p)]
    return torch.from_numpy(one_hot_promoters(seqs, length))


# featurize ------------------------------------------------------------------------------------------------------


def test_one_hot_promoters_order_n_padding_and_truncation():
    onehot = one_hot_promoters(["ACGTN", "acgt", "TTTTTTTT"], 6)
    assert onehot.shape == (3, 4, 6) and onehot.dtype == np.uint8
    expected0 = np.array(
        [
            [1, 0, 0, 0, 0, 0],  # A
            [0, 1, 0, 0, 0, 0],  # C
            [0, 0, 1, 0, 0, 0],  # G
            [0, 0, 0, 1, 0, 0],  # T; N at 4 and padding at 5 are all zeros
        ]
    )
    np.testing.assert_array_equal(onehot[0], expected0)
    np.testing.assert_array_equal(onehot[1], expected0)  # soft-masked letters read as bases
    np.testing.assert_array_equal(onehot[2], np.array([[0] * 6, [0] * 6, [0] * 6, [1] * 6]))  # first L kept
    assert one_hot_promoters([], 5).shape == (0, 4, 5)


def test_featurize_gives_exact_padded_arrays():
    table = context_table(
        [
            {  # more neighbours than K (nearest kept), fewer tissues than T
                "tissue_index": 1,
                "target": 5.0,
                "nb_value": [3.0, 5.0, 7.0],
                "nb_logdist": [-3.0, 6.0, 1.2],
                "nb_orient": [S.ORIENT_DIVERGENT, S.ORIENT_SAME, S.ORIENT_CONVERGENT],
                "nb_overlap": [True, False, False],
                "nb_gene_mean": [5.0, 1.0, 3.0],
                "tis_value": [9.0],
                "tis_index": [2],
                "tis_corr": [0.5],
                "tis_mean": [float("nan")],  # no other donor has that tissue
                "tissue_mean": 3.0,
                "gene_mean": 1.0,
                "tissue_offset": -1.0,
            },
            {"tissue_index": 0},  # no neighbours, no tissues, null means, null target
            {  # a donor with two samples of one tissue: more entries than T, the first T kept
                "tissue_index": 2,
                "target": 1.0,
                "nb_value": [1.0],
                "nb_logdist": [-1.5],
                "nb_orient": [S.ORIENT_CONVERGENT],
                "nb_overlap": [False],
                "nb_gene_mean": [3.0],
                "tis_value": [1.0, 3.0, 5.0, 7.0],
                "tis_index": [0, 0, 1, 2],
                "tis_corr": [0.1, 0.1, 0.2, 0.3],
                "tis_mean": [1.0, 1.0, 9.0, 3.0],
                "gene_mean": 7.0,
                "tissue_offset": 0.5,
            },
        ]
    )
    spec = FeatureSpec(k_neighbours=2, n_tissues=3, promoter_length=10, value_center=1.0, value_scale=2.0)
    b = featurize(table, spec, promoter_index=np.array([4, -1, 0]))
    assert set(b) == {*BATCH_KEYS, "target"}

    np.testing.assert_array_equal(b["nb_mask"], [[True, True], [False, False], [True, False]])
    np.testing.assert_allclose(b["nb_value"], [[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]])  # (v - 1) / 2
    np.testing.assert_allclose(b["nb_logdist"], [[-0.5, 1.0], [0.0, 0.0], [-0.25, 0.0]])
    np.testing.assert_array_equal(b["nb_orient"], [[S.ORIENT_DIVERGENT, S.ORIENT_SAME], [0, 0], [2, 0]])
    np.testing.assert_array_equal(b["nb_overlap"], [[1.0, 0.0], [0.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(b["nb_gene_mean"], [[2.0, 0.0], [0.0, 0.0], [1.0, 0.0]])

    np.testing.assert_array_equal(b["tis_mask"], [[True, False, False], [False] * 3, [True] * 3])
    np.testing.assert_allclose(b["tis_value"], [[4.0, 0, 0], [0, 0, 0], [0.0, 1.0, 2.0]])
    np.testing.assert_array_equal(b["tis_index"], [[2, 0, 0], [0, 0, 0], [0, 0, 1]])
    np.testing.assert_allclose(b["tis_corr"], [[0.5, 0, 0], [0, 0, 0], [0.1, 0.1, 0.2]], rtol=1e-6)
    np.testing.assert_allclose(b["tis_mean"], [[0, 0, 0], [0, 0, 0], [0.0, 0.0, 4.0]])
    np.testing.assert_array_equal(b["tis_mean_ok"], [[0, 0, 0], [0, 0, 0], [1, 1, 1]])  # NaN mean: slot kept
    np.testing.assert_allclose(b["tissue_offset"], [-0.5, 0.0, 0.25])  # scaled, not centred

    np.testing.assert_array_equal(b["tissue_index"], [1, 0, 2])
    np.testing.assert_allclose(b["tissue_mean"], [1.0, 0.0, 0.0])
    np.testing.assert_array_equal(b["tissue_mean_ok"], [1.0, 0.0, 0.0])
    np.testing.assert_allclose(b["gene_mean"], [0.0, 0.0, 3.0])
    np.testing.assert_array_equal(b["gene_mean_ok"], [1.0, 0.0, 1.0])
    np.testing.assert_array_equal(b["promoter_index"], [4, -1, 0])
    np.testing.assert_allclose(b["target"], [2.0, np.nan, 0.0])

    dtypes = {k: v.dtype for k, v in b.items()}
    assert dtypes["nb_orient"] == dtypes["tis_index"] == dtypes["tissue_index"] == dtypes["promoter_index"] == np.int64
    assert dtypes["nb_mask"] == dtypes["tis_mask"] == np.bool_
    assert all(dtypes[k] == np.float32 for k in ("nb_value", "nb_logdist", "tis_value", "tis_corr", "gene_mean_ok"))

    # no promoter index: all -1; no target column: no target key
    b2 = featurize(table.drop_columns(["target"]), spec)
    np.testing.assert_array_equal(b2["promoter_index"], [-1, -1, -1])
    assert "target" not in b2


def test_featurize_reads_chunked_and_sliced_tables_like_one_block():
    rng = np.random.default_rng(0)
    table = random_records(rng, 30, k_max=6, n_tissues=4)
    spec = FeatureSpec(k_neighbours=4, n_tissues=4, promoter_length=10)
    whole = featurize(table, spec)
    pieces = pa.concat_tables([table.slice(0, 7), table.slice(7, 13), table.slice(20)])
    assert pieces.column("nb_value").num_chunks == 3
    for name, arr in featurize(pieces, spec).items():
        np.testing.assert_array_equal(arr, whole[name], err_msg=name)
    for name, arr in featurize(table.slice(9, 11), spec).items():
        np.testing.assert_array_equal(arr, whole[name][9:20], err_msg=name)


def test_featurize_rejects_inconsistent_records():
    spec = FeatureSpec(k_neighbours=2, n_tissues=3, promoter_length=10)
    good = {"tis_value": [1.0], "tis_index": [2], "tis_corr": [0.5], "tis_mean": [1.0]}
    featurize(context_table([good]), spec)  # the good row is good
    with pytest.raises(ValueError, match="column .tis_index. holds 3"):
        featurize(context_table([{**good, "tis_index": [3]}]), spec)
    with pytest.raises(ValueError, match="column .tissue_index. holds 5"):
        featurize(context_table([{"tissue_index": 5}]), spec)
    with pytest.raises(ValueError, match="parallel"):
        featurize(context_table([{**good, "tis_corr": [0.5, 0.1]}]), spec)
    with pytest.raises(ValueError, match="promoter_index"):
        featurize(context_table([good]), spec, promoter_index=np.array([0, 1]))
    with pytest.raises(ValueError, match="missing|lack"):
        featurize(context_table([good]).drop_columns(["nb_value"]), spec)
    with pytest.raises(ValueError, match="value_scale"):
        FeatureSpec(k_neighbours=2, n_tissues=3, promoter_length=10, value_scale=0.0)


def test_drop_groups_clears_whole_groups_per_row():
    rng = np.random.default_rng(1)
    spec = FeatureSpec(k_neighbours=4, n_tissues=4, promoter_length=10)
    batch = featurize(random_records(rng, 400, k_max=4, n_tissues=4), spec)
    before = {k: v.copy() for k, v in batch.items()}

    none = drop_groups(batch, rng, 0.0, 0.0, 0.0)
    for k in batch:
        np.testing.assert_array_equal(none[k], batch[k])

    all_nb = drop_groups(batch, rng, 1.0, 0.0, 0.0)
    assert not all_nb["nb_mask"].any() and not all_nb["nb_value"].any() and not all_nb["nb_orient"].any()
    assert not all_nb["nb_gene_mean"].any()
    for k in ("tis_mask", "tis_value", "tis_mean_ok", "tissue_mean_ok", "gene_mean", "tissue_offset", "target"):
        np.testing.assert_array_equal(all_nb[k], batch[k])

    half = drop_groups(batch, np.random.default_rng(2), 0.5, 0.5, 0.5)
    had_nb, had_tis, had_gene = batch["nb_mask"].any(1), batch["tis_mask"].any(1), batch["gene_mean_ok"] > 0
    lost_nb = had_nb & ~half["nb_mask"].any(1)
    lost_tis = had_tis & ~half["tis_mask"].any(1)
    lost_gene = had_gene & (half["gene_mean_ok"] == 0)
    for lost, had in ((lost_nb, had_nb), (lost_tis, had_tis), (lost_gene, had_gene)):
        assert 0.35 < lost.sum() / had.sum() < 0.65
    # a row keeps a group whole or loses it whole, and the drops are independent across groups
    kept = half["nb_mask"].any(1)
    np.testing.assert_array_equal(half["nb_mask"][kept], batch["nb_mask"][kept])
    assert not np.array_equal(lost_nb, lost_tis)
    assert (half["tissue_mean_ok"][lost_gene] == 0).all() and (half["tissue_mean"][lost_gene] == 0).all()
    assert not half["tis_value"][~half["tis_mask"]].any() and not half["tis_mean_ok"][~half["tis_mask"]].any()
    np.testing.assert_array_equal(half["tissue_offset"], batch["tissue_offset"])
    for k in batch:  # the input is left alone
        np.testing.assert_array_equal(batch[k], before[k])


def test_records_from_build_context_featurize_and_run():
    """The record builder and the featuriser agree on the schema (guards against drift between the two)."""
    from geximpute.science.context import ContextIndex, build_context
    from geximpute.science.problem import VisibleProblem

    rng = np.random.default_rng(11)
    n_genes, donors, tissues = 12, ["D0", "D1", "D2"], ["T0", "T1", "T2"]
    donor_index = np.repeat(np.arange(3), 3).astype(np.int32)
    tissue_index = np.tile(np.arange(3), 3).astype(np.int32)
    values = rng.normal(2.0, 1.0, (n_genes, 9)).astype(np.float32)
    values[rng.random(values.shape) < 0.3] = np.nan
    tss = np.sort(rng.choice(np.arange(1000, 200_000, 100), n_genes, replace=False))
    problem = VisibleProblem(
        gene_ids=np.array([f"g{i}" for i in range(n_genes)], dtype=object),
        chroms=np.array(["chr1"] * n_genes, dtype=object),
        tss=tss,
        start=tss,
        end=tss + 500,
        strand=rng.choice([-1, 1], n_genes).astype(np.int8),
        split=np.zeros(n_genes, dtype=np.int8),
        sample_ids=np.array([f"D{d}:T{t}" for d, t in zip(donor_index, tissue_index, strict=True)], dtype=object),
        donor_index=donor_index,
        tissue_index=tissue_index,
        donors=donors,
        tissues=tissues,
        values=values,
        tissue_corr=np.eye(3, dtype=np.float32),
    )
    genes, samples = np.meshgrid(np.arange(n_genes), np.arange(9), indexing="ij")
    records = build_context(
        ContextIndex(problem), genes.ravel(), samples.ravel(), np.zeros(genes.size, dtype=bool), k=4
    )
    spec = FeatureSpec(k_neighbours=3, n_tissues=3, promoter_length=40)
    batch = featurize(records, spec)
    lengths = np.diff(records["nb_value"].combine_chunks().offsets.to_numpy())
    np.testing.assert_array_equal(batch["nb_mask"].sum(1), np.minimum(lengths, 3))
    assert batch["tis_mask"].any() and batch["nb_mask"].any() and (batch["tissue_mean_ok"] > 0).any()
    pred, emb = HybridNet(tiny_spec(n_tissues=3, use_promoter=False)).eval()(to_tensors(batch), None)
    assert pred.shape == (genes.size,) and torch.isfinite(pred).all() and torch.isfinite(emb).all()


# network --------------------------------------------------------------------------------------------------------


def make_batch(seed: int, n: int = 24, with_promoters: bool = True, with_context: bool = True):
    rng = np.random.default_rng(seed)
    spec = FeatureSpec(k_neighbours=5, n_tissues=4, promoter_length=40)
    records = random_records(rng, n, k_max=7, n_tissues=4)
    pidx = rng.integers(-1, 6, n) if with_promoters else np.full(n, -1)
    batch = featurize(records, spec, promoter_index=pidx)
    if not with_context:
        batch = drop_groups(batch, rng, 1.0, 1.0, 1.0)
    promoters = random_promoters(rng, 6, 40) if with_promoters else None
    return to_tensors(batch), promoters


@pytest.mark.parametrize("variant", VARIANTS)
def test_output_shapes_and_dtypes(variant):
    use_promoter, use_context = VARIANTS[variant]
    net = HybridNet(tiny_spec(use_promoter=use_promoter, use_context=use_context)).eval()
    assert net.spec.variant == variant
    batch, promoters = make_batch(0)
    pred, emb = net(batch, promoters)
    assert pred.shape == (24,) and emb.shape == (24, net.embedding_dim) and net.embedding_dim == 16
    assert pred.dtype == emb.dtype == torch.float32
    assert torch.isfinite(pred).all() and torch.isfinite(emb).all()
    # a zero-row batch (an empty block) passes through
    empty = to_tensors(empty_batch(FeatureSpec(k_neighbours=5, n_tissues=4, promoter_length=40)))
    pred0, emb0 = net(empty, promoters)
    assert pred0.shape == (0,) and emb0.shape == (0, 16)


def test_promoter_cnn_shapes_and_short_sequences():
    net = HybridNet(tiny_spec())
    x = random_promoters(np.random.default_rng(0), 3, 40)
    assert net.promoter_cnn(x).shape == (3, 16)
    assert net.promoter_cnn(x[:, :, :3]).shape == (3, 16)  # pooling in ceil mode copes with L < pool size
    torch.testing.assert_close(net.promoter_cnn(x), net.promoter_cnn(x.float()))  # uint8 and float agree


def test_promoter_cnn_bins_tell_where_a_motif_sits():
    torch.manual_seed(0)
    motif = torch.as_tensor(one_hot_promoters(["TATAAAGG"], 8)[0])
    early, late = torch.zeros(1, 4, 400, dtype=torch.uint8), torch.zeros(1, 4, 400, dtype=torch.uint8)
    early[0, :, 100:108], late[0, :, 300:308] = motif, motif
    whole = PromoterCNN(8, channels=4, kernel=5, layers=1)
    # the global pools see the same motif in the same empty window wherever it sits
    torch.testing.assert_close(whole(early), whole(late))
    binned = PromoterCNN(8, channels=4, kernel=5, layers=1, bins=4)
    assert binned(early).shape == (1, 8)
    assert (binned(early) - binned(late)).abs().max() > 1e-3
    # short windows (fewer positions than bins) still pool
    assert binned(early[:, :, :3]).shape == (1, 8)
    with pytest.raises(ValueError, match="cnn_bins"):
        tiny_spec(cnn_bins=-1)


def test_query_only_last_layer_equals_full_encoder():
    net = HybridNet(tiny_spec(use_promoter=False)).eval()
    batch, _ = make_batch(3)
    captured = {}

    def grab(module, args, kwargs):
        captured["x"], captured["pad"] = args[0], kwargs["src_key_padding_mask"]

    layers = net.context.encoder.layers
    handle = layers[0].register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        _, emb = net(batch, None)
        handle.remove()
        full = net.context.encoder(captured["x"], src_key_padding_mask=captured["pad"])[:, 0]
    torch.testing.assert_close(emb, full, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["hybrid", "transformer_only"])
def test_padding_and_masked_values_do_not_change_predictions(variant):
    use_promoter, use_context = VARIANTS[variant]
    torch.manual_seed(0)
    net = HybridNet(tiny_spec(use_promoter=use_promoter, use_context=use_context, dropout=0.1)).eval()
    batch, promoters = make_batch(4)
    with torch.no_grad():
        ref, ref_emb = net(batch, promoters)

        # more padded slots on both groups
        padded = dict(batch)
        for group, keys in (
            ("nb", ("value", "logdist", "orient", "overlap", "gene_mean", "mask")),
            ("tis", ("value", "index", "corr", "mean", "mean_ok", "mask")),
        ):
            for key in keys:
                arr = batch[f"{group}_{key}"]
                padded[f"{group}_{key}"] = torch.cat([arr, torch.zeros_like(arr[:, :3])], dim=1)
        pred, _ = net(padded, promoters)
        torch.testing.assert_close(pred, ref, rtol=1e-5, atol=1e-5)

        # garbage under False masks (NaN values, out-of-range indices) and under ok == 0
        garbage = dict(batch)
        for key in ("nb_value", "nb_logdist", "nb_overlap", "nb_gene_mean", "tis_value", "tis_corr", "tis_mean"):
            mask = batch["nb_mask"] if key.startswith("nb") else batch["tis_mask"]
            garbage[key] = torch.where(mask, batch[key], torch.full_like(batch[key], float("nan")))
        garbage["nb_orient"] = torch.where(batch["nb_mask"], batch["nb_orient"], 99)
        garbage["tis_index"] = torch.where(batch["tis_mask"], batch["tis_index"], -7)
        garbage["tis_mean_ok"] = torch.where(batch["tis_mask"], batch["tis_mean_ok"], 1.0)
        for name in ("tissue_mean", "gene_mean"):
            garbage[name] = torch.where(batch[f"{name}_ok"] > 0, batch[name], 1e6)
        pred, emb = net(garbage, promoters)
        torch.testing.assert_close(pred, ref, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(emb, ref_emb, rtol=1e-5, atol=1e-5)

        # a row alone (its own padding only) predicts what it predicts among longer rows
        lengths = batch["nb_mask"].sum(1) + batch["tis_mask"].sum(1)
        assert len(set(lengths.tolist())) > 5
        for i in range(len(ref)):
            alone, _ = net({k: v[i : i + 1] for k, v in batch.items()}, promoters)
            torch.testing.assert_close(alone, ref[i : i + 1], rtol=1e-5, atol=1e-5)


def test_promoters_are_encoded_once_per_unique_promoter_and_minus_one_uses_the_stand_in():
    net = HybridNet(tiny_spec()).eval()
    rng = np.random.default_rng(5)
    batch, _ = make_batch(5, n=100)
    promoters = random_promoters(rng, 50, 40)
    pidx = torch.from_numpy(rng.choice([7, 19, 42, -1], 100))
    pidx[:4] = torch.tensor([7, 19, 42, -1])
    batch["promoter_index"] = pidx
    batch["promoter_index_b"] = pidx  # homozygous: both haplotypes the same row
    seen = []
    net.promoter_cnn.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        per_row = net.promoter_embedding(pidx, promoters)
        assert seen == [3]  # 100 rows, 3 distinct promoters: 3 sequences through the CNN, once
        encoded = net.promoter_cnn(promoters[[7, 19, 42]])
        for i, p in enumerate((7, 19, 42)):
            torch.testing.assert_close(per_row[pidx == p], encoded[i].expand(int((pidx == p).sum()), -1))
        torch.testing.assert_close(per_row[pidx == -1], net.no_promoter.expand(int((pidx == -1).sum()), -1))

        # rows without a promoter ignore the sequence table entirely
        pred, _ = net(batch, promoters)
        other, _ = net(batch, random_promoters(rng, 50, 40))
        none = pidx == -1
        torch.testing.assert_close(pred[none], other[none])
        assert not torch.allclose(pred[~none], other[~none])

    with pytest.raises(ValueError, match="no promoter table"):
        net(batch, None)


def test_two_haplotypes_average_their_embeddings_and_the_cnn_sees_each_once():
    """A heterozygous row reads the mean of its haplotypes' embeddings; homozygous rows read their own."""
    net = HybridNet(tiny_spec()).eval()
    rng = np.random.default_rng(6)
    batch, _ = make_batch(6, n=30)
    promoters = random_promoters(rng, 10, 40)
    a = torch.from_numpy(rng.choice([1, 2], 30))
    b = torch.from_numpy(rng.choice([2, 3], 30))
    seen = []
    net.promoter_cnn.register_forward_hook(lambda module, args, out: seen.append(args[0].shape[0]))
    with torch.no_grad():
        batch["promoter_index"], batch["promoter_index_b"] = a, b
        het, _ = net(batch, promoters)
        assert seen == [3]  # rows 1, 2, 3 once each
        encoded = net.promoter_cnn(promoters[[1, 2, 3]])
        # the same prediction when both slots hold the averaged embedding's rows swapped: order does not matter
        batch["promoter_index"], batch["promoter_index_b"] = b, a
        swapped, _ = net(batch, promoters)
        torch.testing.assert_close(het, swapped)
        batch["promoter_index"], batch["promoter_index_b"] = a, a
        hom, _ = net(batch, promoters)
        differs = a != b
        assert differs.any() and not torch.allclose(het[differs], hom[differs])
        torch.testing.assert_close(het[~differs], hom[~differs])
        mean = 0.5 * (encoded[a - 1] + encoded[b - 1])
        torch.testing.assert_close(0.5 * (net.promoter_embedding(a, promoters) + net.promoter_embedding(b, promoters)),
                                   mean)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ["promoters", "no_promoters", "no_context"])
def test_every_parameter_gets_a_gradient(variant, case):
    """DDP without find_unused_parameters needs a gradient for every parameter on every batch."""
    use_promoter, use_context = VARIANTS[variant]
    net = HybridNet(tiny_spec(use_promoter=use_promoter, use_context=use_context, dropout=0.1)).train()
    batch, promoters = make_batch(6, with_promoters=case == "promoters", with_context=case != "no_context")
    pred, emb = net(batch, promoters)
    (pred.sum() + emb.sum()).backward()
    missing = [name for name, p in net.named_parameters() if p.grad is None]
    assert not missing
    assert all(torch.isfinite(p.grad).all() for p in net.parameters())


@pytest.mark.parametrize("variant", VARIANTS)
def test_bf16_autocast_on_cpu_gives_finite_outputs_and_gradients(variant):
    use_promoter, use_context = VARIANTS[variant]
    net = HybridNet(tiny_spec(use_promoter=use_promoter, use_context=use_context))
    batch, promoters = make_batch(7)
    batch["nb_mask"][0] = False  # a row with no context at all
    batch["tis_mask"][0] = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pred, emb = net(batch, promoters)
    assert pred.dtype == emb.dtype == torch.float32
    assert torch.isfinite(pred).all() and torch.isfinite(emb).all()
    pred.square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_network_spec_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_heads"):
        NetworkSpec(n_tissues=3, promoter_length=10, d_model=30, n_heads=4)
    with pytest.raises(ValueError, match="dropout"):
        NetworkSpec(n_tissues=3, promoter_length=10, dropout=1.0)
    with pytest.raises(ValueError, match="n_tissues"):
        NetworkSpec(n_tissues=0, promoter_length=10)


# learnability ---------------------------------------------------------------------------------------------------


def _train(net: HybridNet, batches, promoters, steps: int = 200, lr: float = 3e-3) -> tuple[float, float]:
    """Mean loss of the first and last 20 steps."""
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        batch = batches[step % len(batches)]
        pred, _ = net(batch, promoters)
        loss = torch.nn.functional.mse_loss(pred, batch["target"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return float(np.mean(losses[:20])), float(np.mean(losses[-20:]))


def test_learns_a_promoter_motif():
    torch.manual_seed(0)
    rng = np.random.default_rng(8)
    length, n_prom, motif = 60, 64, "GATTACAG"
    seqs, has = [], rng.random(n_prom) < 0.5
    for h in has:
        s = list(rng.choice(list("ACGT"), length))
        if h:
            at = int(rng.integers(0, length - len(motif)))
            s[at : at + len(motif)] = motif
        seqs.append("".join(s))
    promoters = torch.from_numpy(one_hot_promoters(seqs, length))
    spec = FeatureSpec(k_neighbours=4, n_tissues=4, promoter_length=length)
    batches = []
    for _ in range(8):
        b = featurize(random_records(rng, 64, k_max=4, n_tissues=4), spec, promoter_index=rng.integers(0, n_prom, 64))
        b["target"] = np.where(has[b["promoter_index"]], 1.0, -1.0).astype(np.float32)  # context is noise
        batches.append(to_tensors(b))
    net = HybridNet(tiny_spec(promoter_length=length, n_layers=1, cnn_channels=16, cnn_kernel=9))
    first, last = _train(net, batches, promoters)
    assert last < 0.5 * first, (first, last)


def test_learns_the_mean_of_the_neighbours():
    torch.manual_seed(0)
    rng = np.random.default_rng(9)
    spec = FeatureSpec(k_neighbours=6, n_tissues=4, promoter_length=40)
    batches = []
    for _ in range(8):
        b = featurize(random_records(rng, 128, k_max=6, n_tissues=4), spec)
        n_nb = b["nb_mask"].sum(1)
        b["target"] = np.where(n_nb > 0, b["nb_value"].sum(1) / np.maximum(n_nb, 1), 0.0).astype(np.float32)
        batches.append(to_tensors(b))
    net = HybridNet(tiny_spec(use_promoter=False, n_layers=1))
    first, last = _train(net, batches, None)
    assert last < 0.5 * first, (first, last)


def test_a_frozen_cnn_reads_its_cache_gives_the_same_output_and_does_not_train():
    """After pre-training the CNN can be frozen: the table is encoded once, each batch reads its rows, the output
    equals the uncached network's, and training steps move the rest of the network but not the CNN."""
    batch, promoters = make_batch(3)
    net = HybridNet(tiny_spec()).eval()
    expected, _ = net(batch, promoters)
    net.freeze_promoter_cnn(promoters, chunk=3)  # several chunks
    assert net.promoter_cache is not None and net.promoter_cache.shape == (len(promoters), net.spec.d_model)
    cached, _ = net(batch, promoters)
    torch.testing.assert_close(cached, expected)
    cnn_before = {k: v.clone() for k, v in net.promoter_cnn.state_dict().items()}
    rest_before = net.head[0].weight.detach().clone()
    net.train()
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=1e-2)
    for _ in range(3):
        pred, _ = net(batch, promoters)
        loss = torch.mean((pred - batch["target"]) ** 2)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    for key, value in net.promoter_cnn.state_dict().items():
        torch.testing.assert_close(value, cnn_before[key])
    assert not torch.equal(net.head[0].weight, rest_before)
    # a network without the cache (as loaded for prediction) runs the frozen CNN to the same embedding
    fresh = HybridNet(tiny_spec()).eval()
    fresh.load_state_dict(net.state_dict())
    torch.testing.assert_close(fresh(batch, promoters)[0], net.eval()(batch, promoters)[0])


def test_a_network_with_family_input_reads_the_family_level_and_older_specs_do_not(tmp_path):
    """The family level (an optional record column) enters the query of a network built with ``family_input``;
    one without it (as every network saved before it existed) ignores the column, and records without the column
    are refused by a network that needs it."""
    from geximpute.fit.bundle import load_network, save_network
    from geximpute.model.inference import TrainedNetwork, run_network
    from geximpute.science.promoters import PromoterLookup

    rng = np.random.default_rng(5)
    spec = FeatureSpec(k_neighbours=5, n_tissues=4, promoter_length=40)
    records = random_records(rng, 24, k_max=7, n_tissues=4)
    family = np.where(rng.random(24) < 0.3, np.nan, rng.normal(size=24))
    with_family = records.append_column(S.FAMILY_LEVEL, pa.array(family, pa.float32(), from_pandas=True))
    batch = featurize(with_family, spec)
    assert np.array_equal(batch["family_level_ok"], np.isfinite(family).astype(np.float32))
    assert (batch["family_level"][np.isnan(family)] == 0).all()
    shifted = featurize(with_family.set_column(with_family.schema.get_field_index(S.FAMILY_LEVEL), S.FAMILY_LEVEL,
                                               pa.array(family + 3.0, pa.float32(), from_pandas=True)), spec)
    for reads, moves in ((True, True), (False, False)):
        torch.manual_seed(0)
        net = HybridNet(tiny_spec(family_input=reads, use_promoter=False)).eval()
        with torch.no_grad():
            a, _ = net(to_tensors(batch))
            b, _ = net(to_tensors(shifted))
        changed = ~torch.isclose(a, b)
        assert bool(changed[torch.from_numpy(np.isfinite(family))].all()) is moves
        assert not changed[torch.from_numpy(np.isnan(family))].any()  # an unknown level stays unknown
    # a spec saved before the field existed loads as a network that does not read it
    trained = TrainedNetwork(tiny_spec(use_promoter=False), spec, HybridNet(tiny_spec(use_promoter=False))
                             .state_dict(), {})
    save_network(trained, tmp_path)
    specs = json.loads((tmp_path / S.NETWORK_SPECS_FILE).read_text())
    del specs["network"]["family_input"]
    (tmp_path / S.NETWORK_SPECS_FILE).write_text(json.dumps(specs))
    assert load_network(tmp_path).spec.family_input is False
    reader = TrainedNetwork(tiny_spec(family_input=True, use_promoter=False), spec,
                            HybridNet(tiny_spec(family_input=True, use_promoter=False)).state_dict(), {})
    lookup = PromoterLookup.reference(np.full(records.num_rows, -1, np.int64))
    with pytest.raises(ValueError, match="family_level"):
        run_network(reader, records, np.zeros((0, 4, 40), np.uint8), lookup)
    pred, _ = run_network(reader, with_family, np.zeros((0, 4, 40), np.uint8), lookup)
    assert np.isfinite(pred).all()


def test_groups_no_training_record_had_are_hidden_at_prediction(tmp_path):
    """A network whose training records never had a group (``FeatureSpec.absent``: a ``samples`` fold's records
    have no neighbour) predicts every record as it trained, without that group: records with neighbours and the
    same records without them give the same predictions (its neighbour weights kept their random start and moved
    the predictions before); the spec round-trips through the bundle's JSON, and a spec without the field (every
    network saved before it) hides nothing."""
    from geximpute.fit.bundle import load_network, save_network
    from geximpute.fit.train import absent_groups
    from geximpute.model.inference import TrainedNetwork, run_network
    from geximpute.science.promoters import PromoterLookup

    rng = np.random.default_rng(8)
    records = random_records(rng, 40, k_max=6, n_tissues=4)
    empty = pa.array([[]] * records.num_rows, pa.list_(pa.float32()))
    bare = records
    for name in ("nb_value", "nb_logdist", "nb_gene_mean"):
        bare = bare.set_column(bare.schema.get_field_index(name), name, empty)
    bare = bare.set_column(bare.schema.get_field_index("nb_orient"), "nb_orient",
                           pa.array([[]] * records.num_rows, pa.list_(pa.int8())))
    bare = bare.set_column(bare.schema.get_field_index("nb_overlap"), "nb_overlap",
                           pa.array([[]] * records.num_rows, pa.list_(pa.bool_())))
    lookup = PromoterLookup.reference(np.full(records.num_rows, -1, np.int64))
    no_promoters = np.zeros((0, 4, 40), np.uint8)
    torch.manual_seed(0)
    state = HybridNet(tiny_spec(use_promoter=False)).state_dict()
    predictions = {}
    for absent in ((), ("neighbours",)):
        features = FeatureSpec(k_neighbours=5, n_tissues=4, promoter_length=40, absent=absent)
        network = TrainedNetwork(tiny_spec(use_promoter=False), features, state, {})
        predictions[absent] = [run_network(network, table, no_promoters, lookup)[0] for table in (records, bare)]
        save_network(network, tmp_path / str(len(absent)))
        assert load_network(tmp_path / str(len(absent))).features == features
    with_them, without = predictions[()]
    assert not np.allclose(with_them, without)  # the neighbours move an untrained network's predictions...
    hidden, bare_hidden = predictions[("neighbours",)]
    np.testing.assert_array_equal(hidden, bare_hidden)  # ... unless they are hidden as in its training
    np.testing.assert_array_equal(hidden, without)
    specs = json.loads((tmp_path / "1" / S.NETWORK_SPECS_FILE).read_text())
    del specs["features"]["absent"]
    (tmp_path / "1" / S.NETWORK_SPECS_FILE).write_text(json.dumps(specs))
    assert load_network(tmp_path / "1").features.absent == ()
    with pytest.raises(ValueError, match="unknown evidence group"):
        FeatureSpec(k_neighbours=5, n_tissues=4, promoter_length=40, absent=("cousins",))
    # the groups of records on disk: a fold without neighbours, as a samples fold's
    import pyarrow.parquet as pq

    (tmp_path / "fold").mkdir()
    pq.write_table(bare, tmp_path / "fold" / "part.parquet")
    assert absent_groups([tmp_path / "fold"]) == ("neighbours",)
    pq.write_table(records, tmp_path / "fold" / "part.parquet")
    assert absent_groups([tmp_path / "fold"]) == ()


def _saved_networks(n: int, seed: int = 0) -> list:
    from geximpute.model.inference import TrainedNetwork

    spec = FeatureSpec(k_neighbours=5, n_tissues=4, promoter_length=40)
    out = []
    for k in range(n):
        torch.manual_seed(seed * 100 + k)
        out.append(TrainedNetwork(tiny_spec(use_promoter=False), spec,
                                  HybridNet(tiny_spec(use_promoter=False)).state_dict(), {"fold": k}))
    return out


def test_a_set_of_fold_networks_is_read_whole_or_refused(tmp_path, monkeypatch):
    """`train` saved its fold networks one after another after deleting the last run's: a save cut after fold 0
    left one network that fit-head read as the plain layout, and a cut before fold 0 after a one-network run read
    that older network as this run's. The set is now marked while it is written and indexed when done."""
    from geximpute.errors import GeximputeError
    from geximpute.fit import bundle
    from geximpute.fit.bundle import NETWORKS_INDEX, SAVING_MARK, load_networks, networks_index, save_networks

    folder = tmp_path / "network"
    save_networks(_saved_networks(1), folder, records="r1")
    assert len(load_networks(folder)) == 1 and networks_index(folder)["records"] == "r1"
    saving = bundle.save_network
    calls = []

    def cut_after_first(network, where, **kw):
        if calls:
            raise OSError(28, "No space left on device")
        calls.append(where)
        return saving(network, where, **kw)

    monkeypatch.setattr(bundle, "save_network", cut_after_first)
    with pytest.raises(OSError):
        save_networks(_saved_networks(3), folder, records="r2")
    monkeypatch.setattr(bundle, "save_network", saving)
    assert (folder / SAVING_MARK).exists() and not (folder / NETWORKS_INDEX).exists()
    assert not (folder / S.NETWORK_SPECS_FILE).exists()  # the one-network run's files went with the old set
    with pytest.raises(GeximputeError, match="the networks' save was cut short"):
        load_networks(folder)
    save_networks(_saved_networks(3), folder, records="r2")
    assert [n.metrics["fold"] for n in load_networks(folder)] == [0, 1, 2] and not (folder / SAVING_MARK).exists()
    # another run's files in one fold folder: each weights file matches its specs, but not the set's index
    other = tmp_path / "other"
    save_networks(_saved_networks(3, seed=1), other)
    for name in (S.NETWORK_WEIGHTS_FILE, S.NETWORK_SPECS_FILE):
        (folder / "fold1" / name).write_bytes((other / "fold1" / name).read_bytes())
    with pytest.raises(GeximputeError, match=r"fold1: not the network .*networks\.json lists"):
        load_networks(folder)
    (folder / NETWORKS_INDEX).unlink()  # a folder written before the index: read as before
    assert len(load_networks(folder)) == 3


def test_train_writes_only_into_a_folder_of_its_own_from_records_of_its_folds(tmp_path):
    """`train` wrote into any --out in place: into a committed bundle through its link (deleting its fold
    networks) or a user's folder; and it cut its folds from its own config, not from the records'."""
    from geximpute.config import config_from_dict
    from geximpute.errors import ConfigError
    from geximpute.runtime.atomic import MARKER, OutputRefused
    from geximpute.steps.pipeline import check_network_folder, check_records_settings

    check_network_folder(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    check_network_folder(tmp_path / "empty")
    version = tmp_path / ".model.geximpute" / "v-1"
    version.mkdir(parents=True)
    (version / MARKER).write_text(json.dumps({"format": "geximpute-output", "step": "fit-head"}))
    (tmp_path / "model").symlink_to(version)
    with pytest.raises(OutputRefused, match=r"model: is a link to .*\(a committed output\)"):
        check_network_folder(tmp_path / "model")
    with pytest.raises(OutputRefused, match=r"v-1: holds the output of `fit-head`"):
        check_network_folder(version)
    user = tmp_path / "user"
    user.mkdir()
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(OutputRefused, match="a folder that is not a geximpute output"):
        check_network_folder(user)
    (tmp_path / "legacy" / "fold0").mkdir(parents=True)  # train's, written before the marker
    check_network_folder(tmp_path / "legacy")
    (user / MARKER).write_text(json.dumps({"format": "geximpute-output", "step": "train"}))
    check_network_folder(user)

    records = tmp_path / "records"
    records.mkdir()
    base = {"name": "t", "inputs": {"genes": "g.gtf", "expression": "e.gct"}}
    prepared = config_from_dict({**base, "train": {"fold_fraction": 0.2}}, tmp_path)
    (records / "_manifest.json").write_text(json.dumps({"config": prepared.to_dict()}))
    check_records_settings(config_from_dict({**base, "train": {"fold_fraction": 0.2, "epochs": 9}}, tmp_path),
                           records)
    with pytest.raises(ConfigError, match=r"records were prepared with train.fold_fraction 0.2; this config says "
                                          r"0.1"):
        check_records_settings(config_from_dict(base, tmp_path), records)  # null on entries: the fraction hidden
    # records an older default prepared (0.25 written out) fit a config whose null resolves to it (genes), not one
    # whose null resolves to another number (entries)
    genes = {**base, "evaluation": {"task": "genes"}}
    older = config_from_dict({**genes, "train": {"fold_fraction": 0.25}}, tmp_path)
    (records / "_manifest.json").write_text(json.dumps({"config": older.to_dict()}))
    check_records_settings(config_from_dict(genes, tmp_path), records)
    # the records' fingerprint: what makes them, not when or by which version they were made
    from geximpute.steps.pipeline import records_fingerprint

    manifest = {"config": prepared.to_dict(), "inputs": {"expression": {"sha256": "a"}}, "rows": {"train": 10},
                "seconds": 1.0, "versions": {"geximpute": "1"}}
    (records / "_manifest.json").write_text(json.dumps(manifest))
    first = records_fingerprint(records)
    (records / "_manifest.json").write_text(json.dumps({**manifest, "seconds": 2.0, "versions": {"geximpute": "2"}}))
    assert records_fingerprint(records) == first
    (records / "_manifest.json").write_text(json.dumps({**manifest, "inputs": {"expression": {"sha256": "b"}}}))
    assert records_fingerprint(records) != first


def test_an_unknown_value_in_a_present_slot_is_no_value():
    """A present neighbour whose gene mean is NaN: the feature is the mean (0 standardised), not an expression of 0
    standardised into a confident ``-center / scale``."""
    from types import SimpleNamespace

    from geximpute.model.features import _standard_where

    spec = SimpleNamespace(standardise=lambda v: (v - 5.0) / 2.0)
    out = _standard_where(np.array([True, True, False]), np.array([np.nan, 7.0, 9.0]), spec)
    np.testing.assert_array_equal(out, [0.0, 1.0, 0.0])


def test_fit_head_refuses_a_foreign_out_before_fitting_and_takes_force(synth_small, tmp_path, monkeypatch):
    """fit-head's --out was refused only at the commit, after the head was fitted, with a hint to pass --force
    that fit-head did not take."""
    from geximpute.apps.cli import build_parser
    from geximpute.config import load_config
    from geximpute.runtime.atomic import OutputRefused
    from geximpute.steps import pipeline

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")

    def never(*args, **kwargs):
        raise AssertionError("the networks were read before the output was checked")

    monkeypatch.setattr(pipeline, "load_networks", never)
    config = load_config(synth_small / "config.yaml", [f"output_dir={tmp_path}"])
    with pytest.raises(OutputRefused, match="pass --force"):
        pipeline.fit_head_and_save(config, tmp_path / "records", tmp_path / "network", mine)
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]
    with pytest.raises(AssertionError, match="networks were read"):  # with force: on to the fitting
        pipeline.fit_head_and_save(config, tmp_path / "records", tmp_path / "network", mine, force=True)
    assert build_parser().parse_args(["fit-head", "--config", "c.yaml", "--force"]).force is True
