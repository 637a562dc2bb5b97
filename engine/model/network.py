"""The hybrid imputation network: a promoter CNN and a transformer over context tokens. Plain torch, no Ray.

For a target entry (gene g, donor d, tissue t) the network reads the batch arrays of
:func:`geximpute.model.features.featurize` and the one-hot promoter table, and returns a prediction in standardised
units and the embedding the prediction is made from (what the XGBoost head consumes).

Ablations (``NetworkSpec.use_promoter`` / ``use_context``)::

    hybrid            True / True    CNN embedding enters the query token of the transformer
    transformer_only  False / True   no CNN; query token = target tissue + gene-level scalars
    cnn_only          True / False   no transformer; MLP over [promoter, target tissue, gene-level scalars]
    (both False)                     MLP over [target tissue, gene-level scalars]: a gene-mean model

Every parameter of a given spec takes part in every forward, so the network can be wrapped in
``DistributedDataParallel`` without ``find_unused_parameters``.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from geximpute.config import ModelConfig

#: the gene-level scalars ((value, ok) pairs) and the target tissue's offset, in the order the query reads them
GENE_SCALARS = ("tissue_mean", "tissue_mean_ok", "gene_mean", "gene_mean_ok", "tissue_offset", "genetic_score",
                "genetic_score_ok")
#: read after them by a network with ``family_input``
FAMILY_SCALARS = ("family_level", "family_level_ok")
#: per-slot inputs of a neighbour token and of a tissue token (besides the embedded indices)
NEIGHBOUR_INPUTS = ("nb_value", "nb_logdist", "nb_overlap", "nb_gene_mean")
TISSUE_INPUTS = ("tis_value", "tis_corr", "tis_mean", "tis_mean_ok")

_N_ORIENT = 3  # geximpute.schema.ORIENT_SAME, ORIENT_DIVERGENT, ORIENT_CONVERGENT
_QUERY, _NEIGHBOUR, _TISSUE = 0, 1, 2  # token types


@dataclass(frozen=True, kw_only=True)
class NetworkSpec(ModelConfig):
    """Shape of the network: the size fields and checks of :class:`geximpute.config.ModelConfig`, plus its inputs.

    Attributes:
        n_tissues: tissue vocabulary size (``FeatureSpec.n_tissues``).
        promoter_length: L of the one-hot promoters.
        use_promoter: build the promoter CNN.
        use_context: build the transformer over neighbour and tissue tokens.
        family_input: the query also reads the gene's family level (:data:`FAMILY_SCALARS`; records with the column
            :data:`geximpute.schema.FAMILY_LEVEL`). False for networks saved before it existed.
    """

    n_tissues: int
    promoter_length: int
    use_promoter: bool = True
    use_context: bool = True
    family_input: bool = False

    @property
    def scalars(self) -> tuple[str, ...]:
        """The gene-level inputs of the query, in order."""
        return GENE_SCALARS + (FAMILY_SCALARS if self.family_input else ())

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_tissues", "promoter_length"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1:
                raise ValueError(f"NetworkSpec.{name}: expected an integer >= 1, got {value!r}")

    @classmethod
    def of(cls, size: ModelConfig, **inputs: Any) -> NetworkSpec:
        """The spec of a network of ``size`` (a ``ModelConfig``) with ``inputs`` (n_tissues, promoter_length, ...)."""
        return cls(**{f.name: getattr(size, f.name) for f in dataclasses.fields(ModelConfig)}, **inputs)

    @property
    def variant(self) -> str:
        """Name of the ablation: ``hybrid``, ``transformer_only``, ``cnn_only`` or ``gene_only``."""
        return {
            (True, True): "hybrid",
            (False, True): "transformer_only",
            (True, False): "cnn_only",
            (False, False): "gene_only",
        }[(self.use_promoter, self.use_context)]


def _touch(params: list[nn.Parameter], like: torch.Tensor) -> torch.Tensor:
    """A zero that depends on ``params``, so they get (zero) gradients when the batch did not need them.

    DDP without ``find_unused_parameters`` waits for a gradient of every parameter; a batch without promoters
    would otherwise leave the CNN out of the graph and hang or fail the reduction.
    """
    total = sum(p.sum() for p in params)
    return (total * 0).to(like.dtype)


class PromoterCNN(nn.Module):
    """Promoter sequence to a vector: conv blocks (GELU, 4x max-pool), then global max and mean pool, and with
    ``bins`` the same two pools over each of ``bins`` equal stretches of the window as well.

    Args:
        d_out: output width D.
        channels: channels of every conv block.
        kernel: conv kernel width.
        layers: conv blocks; all but the last are followed by a 4x max-pool (ceil mode, so short inputs work).
        bins: stretches of the (strand-oriented) window pooled on their own besides the whole: where along the
            promoter a motif sits, which the global pools lose (0: the whole window only).
    """

    POOL = 4

    def __init__(self, d_out: int, channels: int = 32, kernel: int = 15, layers: int = 3, bins: int = 0) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        c_in = 4
        for i in range(layers):
            blocks += [nn.Conv1d(c_in, channels, kernel, padding="same"), nn.GELU()]
            if i < layers - 1:
                blocks.append(nn.MaxPool1d(self.POOL, ceil_mode=True))
            c_in = channels
        self.blocks = nn.Sequential(*blocks)
        self.bins = bins
        self.proj = nn.Linear(2 * channels * (1 + bins), d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(P, 4, L) one-hot (float or uint8) -> (P, D)."""
        h = self.blocks(x.float())  # (P, C, L')
        # max pool finds a motif anywhere; mean pool counts how much of it there is
        pooled = [h.amax(dim=-1), h.mean(dim=-1)]  # (P, C) each
        if self.bins:
            pooled += [nn.functional.adaptive_max_pool1d(h, self.bins).flatten(1),
                       nn.functional.adaptive_avg_pool1d(h, self.bins).flatten(1)]  # (P, C * bins) each
        return self.proj(torch.cat(pooled, dim=-1))


class ContextEncoder(nn.Module):
    """Transformer over one query token, K neighbour tokens and T tissue tokens; returns the query's final state.

    Neighbour token = Linear([value, logdist, overlap, gene_mean]) + orientation embedding + type embedding
    (value - gene_mean is the region's signal in this sample).
    Tissue token = Linear([value, corr, tis_mean, tis_mean_ok]) + tissue embedding(tis_index) + type embedding
    (value - tis_mean is the donor's deviation in that tissue).
    Padded slots are excluded from attention through ``src_key_padding_mask``; the query token is never padded,
    so a row with no neighbours and no tissues attends to itself only and stays finite.

    Args:
        d_model: token width D.
        n_heads: attention heads.
        n_layers: pre-norm encoder layers.
        n_tissues: tissue vocabulary size.
        dropout: dropout on the residual branches of the layers.
    """

    def __init__(self, d_model: int, n_heads: int, n_layers: int, n_tissues: int, dropout: float) -> None:
        super().__init__()
        self.neighbour_proj = nn.Linear(len(NEIGHBOUR_INPUTS), d_model)
        self.orient_embedding = nn.Embedding(_N_ORIENT, d_model)
        self.tissue_proj = nn.Linear(len(TISSUE_INPUTS), d_model)
        self.tissue_embedding = nn.Embedding(n_tissues, d_model)
        self.type_embedding = nn.Embedding(3, d_model)
        for emb in (self.orient_embedding, self.tissue_embedding, self.type_embedding):
            nn.init.normal_(emb.weight, std=0.1)
        layer = nn.TransformerEncoderLayer(
            d_model,
            n_heads,
            dim_feedforward=2 * d_model,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        # no dropout on the (N, H, S, S) attention weights: on CPU drawing that mask costs more than the rest of
        # the layer, and dropout on the residual branches (kept) regularises the same tokens
        layer.self_attn.dropout = 0.0
        # nested tensors do not apply to pre-norm layers; saying so avoids a warning per construction
        self.encoder = nn.TransformerEncoder(layer, n_layers, norm=nn.LayerNorm(d_model), enable_nested_tensor=False)

    def forward(self, query: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Query (N, D) and the batch's nb_* (N, K) and tis_* (N, T) arrays -> (N, D)."""
        nb_mask, tis_mask = batch["nb_mask"].bool(), batch["tis_mask"].bool()
        # slots padded in every row change nothing (padding invariance) but cost quadratic attention time
        k, t = _used_width(nb_mask), _used_width(tis_mask)
        nb_mask, tis_mask = nb_mask[:, :k], tis_mask[:, :t]

        # torch.where, not a product: a NaN or garbage value under a False mask must not reach the attention
        nb_x = torch.stack([batch[name][:, :k].float() for name in NEIGHBOUR_INPUTS], dim=-1)
        nb_x = torch.where(nb_mask[..., None], nb_x, torch.zeros_like(nb_x))  # (N, K, 4)
        orient = torch.where(nb_mask, batch["nb_orient"][:, :k].long(), 0)
        nb_tok = self.neighbour_proj(nb_x) + self.orient_embedding(orient) + self.type_embedding.weight[_NEIGHBOUR]

        tis_x = torch.stack([batch[name][:, :t].float() for name in TISSUE_INPUTS], dim=-1)
        tis_x = torch.where(tis_mask[..., None], tis_x, torch.zeros_like(tis_x))  # (N, T, 4)
        tis_index = torch.where(tis_mask, batch["tis_index"][:, :t].long(), 0)
        tis_tok = self.tissue_proj(tis_x) + self.tissue_embedding(tis_index) + self.type_embedding.weight[_TISSUE]

        q_tok = query + self.type_embedding.weight[_QUERY]
        dtype = torch.promote_types(torch.promote_types(q_tok.dtype, nb_tok.dtype), tis_tok.dtype)
        x = torch.cat([q_tok[:, None, :].to(dtype), nb_tok.to(dtype), tis_tok.to(dtype)], dim=1)  # (N, S=1+K+T, D)
        pad = torch.cat([torch.zeros_like(nb_mask[:, :1]), ~nb_mask, ~tis_mask], dim=1)  # (N, S), True = pad
        if x.shape[0] == 0:  # attention cannot reshape an empty batch; nothing to attend over anyway
            return x[:, 0]
        layers = self.encoder.layers
        for layer in layers[:-1]:
            x = layer(x, src_key_padding_mask=pad)  # (N, S, D)
        x = _query_only(layers[-1], x, pad)  # (N, 1, D)
        return self.encoder.norm(x)[:, 0]


def _used_width(mask: torch.Tensor) -> int:
    """1 + the last column of an (N, W) mask that is True in some row; at least 1 so every token layer stays in
    the autograd graph (DDP) even when the whole batch lacks a group."""
    if mask.shape[1] == 0:
        return 0
    cols = torch.arange(1, mask.shape[1] + 1, device=mask.device) * mask.any(dim=0)
    return max(int(cols.max()), 1)


def _query_only(layer: nn.TransformerEncoderLayer, x: torch.Tensor, pad: torch.Tensor) -> torch.Tensor:
    """The last pre-norm encoder layer, computed for the query token (position 0) only.

    Only the query's final state is read, and in the last layer no other position feeds it except through keys
    and values, so this equals ``layer(x, src_key_padding_mask=pad)[:, :1]`` at a fraction of the cost: one
    query row of attention instead of S, and the feed-forward block on one token.

    Args:
        layer: a ``norm_first=True`` layer of the encoder.
        x: (N, S, D) tokens.
        pad: (N, S) True = padding.

    Returns:
        (N, 1, D).
    """
    h = layer.norm1(x)
    attended, _ = layer.self_attn(h[:, :1], h, h, key_padding_mask=pad, need_weights=False)  # (N, 1, D)
    q = x[:, :1] + layer.dropout1(attended)
    ff = layer.linear2(layer.dropout(layer.activation(layer.linear1(layer.norm2(q)))))
    return q + layer.dropout2(ff)


class HybridNet(nn.Module):
    """Promoter CNN + context transformer (or their ablations) with a small MLP head.

    Args:
        spec: network shape and ablation switches.
    """

    def __init__(self, spec: NetworkSpec) -> None:
        super().__init__()
        self.spec = spec
        d = spec.d_model
        self.target_tissue_embedding = nn.Embedding(spec.n_tissues, d)
        nn.init.normal_(self.target_tissue_embedding.weight, std=0.1)
        if spec.use_promoter:
            self.promoter_cnn = PromoterCNN(d, spec.cnn_channels, spec.cnn_kernel, spec.cnn_layers, spec.cnn_bins)
            # stands in for the promoter embedding of rows whose gene has no promoter sequence
            self.no_promoter = nn.Parameter(torch.randn(d) * 0.1)
        if spec.use_context:
            self.gene_proj = nn.Linear(len(spec.scalars), d)
            self.context = ContextEncoder(d, spec.n_heads, spec.n_layers, spec.n_tissues, spec.dropout)
        else:
            n_in = d + len(spec.scalars) + (d if spec.use_promoter else 0)
            self.mlp = nn.Sequential(
                nn.Linear(n_in, 2 * d),
                nn.GELU(),
                nn.Dropout(spec.dropout),
                nn.Linear(2 * d, d),
                nn.LayerNorm(d),
            )
        self.head = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Dropout(spec.dropout), nn.Linear(d, 1))
        #: (P, D) the frozen CNN's output for every row of the promoter table (:meth:`freeze_promoter_cnn`); a plain
        #: attribute, not a buffer: it is not saved, and DDP does not broadcast it every step
        self.promoter_cache: torch.Tensor | None = None

    def freeze_promoter_cnn(self, promoters: torch.Tensor | None, chunk: int = 256) -> None:
        """Stop training the promoter CNN and encode the whole table once: each batch then reads its rows.

        The CNN's weights do not change, so the network's output is the same with or without the cache (a loaded
        network without it runs the CNN). Call on every DDP rank at the same point, with the weights the ranks share.
        """
        if not self.spec.use_promoter:
            return
        for param in self.promoter_cnn.parameters():
            param.requires_grad_(False)
        if promoters is None or len(promoters) == 0:
            return
        device = self.no_promoter.device
        was_training = self.promoter_cnn.training
        self.promoter_cnn.eval()
        with torch.no_grad():
            self.promoter_cache = torch.cat([self.promoter_cnn(promoters[lo : lo + chunk].to(device))
                                             for lo in range(0, len(promoters), chunk)])
        self.promoter_cnn.train(was_training)

    @property
    def embedding_dim(self) -> int:
        """Width of the returned embedding."""
        return self.spec.d_model

    def promoter_embedding(self, promoter_index: torch.Tensor, promoters: torch.Tensor | None) -> torch.Tensor:
        """Per-row promoter embedding, the CNN run once per unique promoter in the batch.

        Args:
            promoter_index: (N,) int, row into ``promoters``; -1 = no promoter (uses the learned stand-in).
            promoters: (P, 4, L) one-hot table (uint8 or float), or None when no row has a promoter.

        Returns:
            (N, D).
        """
        valid = promoter_index >= 0
        if promoters is None:
            if bool(valid.any()):
                raise ValueError("HybridNet: the batch has promoter_index >= 0 but no promoter table was given")
        elif bool(valid.any()):
            unique, inverse = torch.unique(promoter_index[valid], return_inverse=True)  # (U,), (N_valid,)
            if self.promoter_cache is not None:
                encoded = self.promoter_cache[unique.to(self.promoter_cache.device)]  # (U, D)
            else:
                # the table may stay on the CPU (it can be large); only the U rows this batch needs are moved
                seqs = promoters[unique.to(promoters.device)].to(self.no_promoter.device)
                encoded = self.promoter_cnn(seqs)  # (U, D)
            # row 0 of the lookup is the stand-in, so it stays in the graph even when every row has a promoter
            lookup = torch.cat([self.no_promoter[None].to(encoded.dtype), encoded], dim=0)  # (1 + U, D)
            row = torch.zeros_like(promoter_index, dtype=torch.long)
            row[valid] = inverse + 1
            return lookup[row]
        out = self.no_promoter[None].expand(len(promoter_index), -1)
        return out + _touch(list(self.promoter_cnn.parameters()), out)

    def forward(
        self, batch: dict[str, torch.Tensor], promoters: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Predict the standardised value of each row.

        Args:
            batch: tensors of :func:`geximpute.model.features.featurize` (via ``to_tensors``): nb_* (N, K),
                tis_* (N, T), tissue_index, the gene-level scalars, promoter_index (N,) and optionally
                promoter_index_b (N,) (the second haplotype; the first is used twice without it).
            promoters: (P, 4, L) one-hot promoter table; may be None when ``use_promoter`` is False or no row has
                a promoter.

        Returns:
            pred (N,) float32 and embedding (N, D) float32, D = :attr:`embedding_dim` (the head's input).
        """
        ok = {name: batch[f"{name}_ok"].float() for name in ("tissue_mean", "gene_mean")}
        parts = [
            torch.where(ok["tissue_mean"] > 0, batch["tissue_mean"].float(), 0.0),
            ok["tissue_mean"],
            torch.where(ok["gene_mean"] > 0, batch["gene_mean"].float(), 0.0),
            ok["gene_mean"],
            batch["tissue_offset"].float(),
            batch["genetic_score"].float(),
            batch["genetic_score_ok"].float(),
        ]
        if self.spec.family_input:
            parts += [batch["family_level"].float(), batch["family_level_ok"].float()]
        scalars = torch.stack(parts, dim=-1)  # (N, len(spec.scalars))
        tissue = self.target_tissue_embedding(batch["tissue_index"].long())  # (N, D)
        promoter = None
        if self.spec.use_promoter:
            # a donor's two haplotypes, each encoded once per unique sequence in the batch, averaged (additive)
            a = batch["promoter_index"].long()
            b = batch["promoter_index_b"].long() if "promoter_index_b" in batch else a
            both = self.promoter_embedding(torch.cat([a, b]), promoters)  # (2N, D)
            promoter = 0.5 * (both[: len(a)] + both[len(a) :])  # (N, D)

        if self.spec.use_context:
            query = tissue + self.gene_proj(scalars)
            if promoter is not None:
                query = query + promoter
            embedding = self.context(query, batch)  # (N, D)
        else:
            parts = [tissue, scalars]
            if promoter is not None:
                parts.append(promoter)
            dtype = parts[0].dtype
            for p in parts[1:]:
                dtype = torch.promote_types(dtype, p.dtype)
            embedding = self.mlp(torch.cat([p.to(dtype) for p in parts], dim=-1))  # (N, D)
        pred = self.head(embedding).squeeze(-1)  # (N,)
        return pred.float(), embedding.float()
