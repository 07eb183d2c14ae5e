"""One family of contrastive losses (InfoNCE / NT-Xent), shared by every bundle.

Everything reduces to :func:`masked_info_nce`: given a similarity matrix and two boolean masks, each ordered positive
pair (i, j) contributes

    l(i, j) = -log( exp(s_ij / tau) / (exp(s_ij / tau) + sum_{n : neg[i, n]} exp(s_in / tau)) )

and the loss is the mean of these terms. The specialisations only build the masks:

* :func:`info_nce` - row i of ``query`` is positive with row i of ``key``; every other key (plus optional extra
  negatives such as a MoCo queue) is a negative. Used by CLMorph and by SST's momentum contrast.
* :func:`global_contrastive_loss` - the global loss L_g of Chaitanya et al. (NeurIPS 2020) with the contrasting
  strategies G^R (SimCLR), G^D- and G^D, driven by per-item tags (source slice, view, partition, volume).
* :func:`local_contrastive_loss` - the local loss L_l over K x K regions of decoder feature maps (L^R, L^D).

Similarities are cosine similarities, so scaling an embedding never changes a loss. Partition bookkeeping for the
domain strategies (slices of a volume split into S groups of consecutive slices) lives here too, so that the sampler and
the loss agree on what a partition is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "GLOBAL_STRATEGIES",
    "LOCAL_STRATEGIES",
    "GlobalContrastiveLoss",
    "LocalContrastiveLoss",
    "cosine_similarity_matrix",
    "extract_regions",
    "global_contrastive_loss",
    "global_pair_masks",
    "info_nce",
    "local_contrastive_loss",
    "local_map_pairs",
    "masked_info_nce",
    "nearest_region_mask",
    "partition_bounds",
    "region_positions",
    "slice_partitions",
]

GLOBAL_STRATEGIES = ("GR", "GD-", "GD")
LOCAL_STRATEGIES = ("LR", "LD")


def cosine_similarity_matrix(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Cosine similarity of every row of ``a`` [..., N, F] with every row of ``b`` [..., M, F] -> [..., N, M]."""
    return F.normalize(a, dim=-1, eps=eps) @ F.normalize(b, dim=-1, eps=eps).transpose(-1, -2)


def masked_info_nce(
    sim: torch.Tensor, positive_mask: torch.Tensor, negative_mask: torch.Tensor, temperature: float = 0.1
) -> torch.Tensor:
    """Mean InfoNCE term over every ordered positive pair of a (batched) similarity matrix.

    Args:
        sim: similarities [..., N, M] (cosine for every caller in this module; any real values work).
        positive_mask: bool [..., N, M]; (i, j) true when j is a positive of anchor i. Each true entry is one term.
        negative_mask: bool [..., N, M]; (i, n) true when n is in the negative set of anchor i (shared by all of i's
            positives). Items in neither mask are ignored, which is how G^D- keeps same-partition slices of other
            volumes out of the denominator.
        temperature: tau > 0.

    Returns:
        scalar mean of ``softplus(logsumexp_n(s_in / tau) - s_ij / tau)``, which equals the -log ratio above and stays
        finite for small tau. An anchor without negatives contributes log(1) = 0 per positive.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    positive_mask = positive_mask.to(torch.bool).expand_as(sim)
    negative_mask = negative_mask.to(torch.bool).expand_as(sim)
    if (positive_mask & negative_mask).any():
        raise ValueError("an item cannot be both a positive and a negative of the same anchor")
    num_terms = positive_mask.sum()
    if num_terms == 0:
        raise ValueError("positive_mask selects no pair: the contrastive loss is undefined")
    logits = sim / temperature
    neg_lse = torch.logsumexp(logits.masked_fill(~negative_mask, float("-inf")), dim=-1, keepdim=True)
    terms = F.softplus(neg_lse - logits)
    return terms.masked_fill(~positive_mask, 0.0).sum() / num_terms


def info_nce(
    query: torch.Tensor, key: torch.Tensor, temperature: float = 0.1, extra_negatives: torch.Tensor | None = None
) -> torch.Tensor:
    """InfoNCE with in-batch negatives: the positive of ``query[i]`` is ``key[i]``.

    Args:
        query: [N, F] embeddings (need not be normalised; cosine similarity is used).
        key: [N, F] embeddings of the positives, row-aligned with ``query``.
        temperature: tau.
        extra_negatives: optional [K, F] additional negatives shared by every row (e.g. a MoCo queue of past keys);
            detach them if they should not receive gradients.

    Returns:
        scalar mean over rows of -log softmax over [key_i, other keys, extra negatives].
    """
    if query.shape != key.shape or query.ndim != 2:
        raise ValueError(f"query and key must both be [N, F]; got {tuple(query.shape)} and {tuple(key.shape)}")
    candidates = key if extra_negatives is None else torch.cat([key, extra_negatives.to(key)], dim=0)
    sim = cosine_similarity_matrix(query, candidates)
    n = query.shape[0]
    positive = torch.zeros_like(sim, dtype=torch.bool)
    positive[:, :n] = torch.eye(n, dtype=torch.bool, device=sim.device)
    return masked_info_nce(sim, positive, ~positive, temperature)


# ---------------------------------------------------------------------------------------------------------------------
# Partitions of a volume (domain-specific strategies)
# ---------------------------------------------------------------------------------------------------------------------


def partition_bounds(num_slices: int, num_partitions: int, mode: str = "round") -> list[tuple[int, int]]:
    """Half-open slice ranges [start, stop) of the S partitions of a Q-slice volume.

    ``mode="round"`` uses boundaries floor(k*Q/S + 1/2), so every slice belongs to a partition and partitions differ
    in size by at most one. ``mode="floor"`` reproduces the authors' code: boundaries k*floor(Q/S), so the last
    Q mod S slices belong to no partition and are never sampled.
    """
    if num_partitions < 1 or num_slices < num_partitions:
        raise ValueError(f"need 1 <= S <= Q slices; got S={num_partitions}, Q={num_slices}")
    if mode == "round":
        edges = [math.floor(k * num_slices / num_partitions + 0.5) for k in range(num_partitions + 1)]
    elif mode == "floor":
        step = num_slices // num_partitions
        edges = [k * step for k in range(num_partitions + 1)]
    else:
        raise ValueError(f"unknown partition mode {mode!r}; use 'round' or 'floor'")
    return list(zip(edges[:-1], edges[1:], strict=True))


def slice_partitions(num_slices: int, num_partitions: int, mode: str = "round") -> torch.Tensor:
    """Partition index of every slice [Q] (long); -1 for slices outside every partition (``mode="floor"`` only)."""
    out = torch.full((num_slices,), -1, dtype=torch.long)
    for s, (start, stop) in enumerate(partition_bounds(num_slices, num_partitions, mode)):
        out[start:stop] = s
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Global loss L_g
# ---------------------------------------------------------------------------------------------------------------------


def global_pair_masks(
    strategy: str,
    slice_index: torch.Tensor,
    view_index: torch.Tensor,
    partition_index: torch.Tensor | None = None,
    volume_index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positive and negative masks [N, N] of a global-loss batch from per-item tags.

    Each batch item i is one view (``view_index[i]``) of one source slice (``slice_index[i]``, unique per slice in
    the batch); the domain strategies also need the slice's partition and volume.

    * ``"GR"`` (SimCLR): positive = other view of the same slice; negative = any item of another slice.
    * ``"GD-"``: positive = other view of the same slice; negative = any item of another partition. Same-partition
      items of other volumes are neither.
    * ``"GD"``: negatives as G^D-; positives add the same-partition slices of other volumes seen in the same view,
      i.e. pairs (x^i, x^j) and (t(x^i), t(x^j)). Cross-volume, cross-view items stay neutral. A same-partition item
      is never a negative.

    No item is ever its own positive or negative.
    """
    if strategy not in GLOBAL_STRATEGIES:
        raise ValueError(f"unknown global strategy {strategy!r}; choose one of {GLOBAL_STRATEGIES}")
    n = slice_index.shape[0]
    not_self = ~torch.eye(n, dtype=torch.bool, device=slice_index.device)
    same_slice = slice_index[:, None] == slice_index[None, :]
    if strategy == "GR":
        return same_slice & not_self, ~same_slice
    if partition_index is None:
        raise ValueError(f"strategy {strategy} needs partition_index")
    same_part = partition_index[:, None] == partition_index[None, :]
    if strategy == "GD-":
        return same_slice & not_self, ~same_part
    if volume_index is None:
        raise ValueError("strategy GD needs volume_index")
    same_view = view_index[:, None] == view_index[None, :]
    positive = same_part & not_self & (same_slice | same_view)
    return positive, ~same_part


def global_contrastive_loss(
    z: torch.Tensor,
    strategy: str,
    slice_index: torch.Tensor,
    view_index: torch.Tensor,
    partition_index: torch.Tensor | None = None,
    volume_index: torch.Tensor | None = None,
    temperature: float = 0.1,
) -> torch.Tensor:
    """L_g = (1/|Lambda+|) * sum over unordered positive pairs {a, b} of [l(a, b) + l(b, a)] (paper Eq. 2).

    ``z`` is [N, F] (output of the projection head g1); tags as :func:`global_pair_masks`. The positive relation is
    symmetric, so the sum over unordered pairs divided by their number is twice the mean ordered term.
    """
    positive, negative = global_pair_masks(strategy, slice_index, view_index, partition_index, volume_index)
    sim = cosine_similarity_matrix(z, z)
    return 2.0 * masked_info_nce(sim, positive, negative, temperature)


class GlobalContrastiveLoss(nn.Module):
    """Module form of :func:`global_contrastive_loss` with the strategy and temperature fixed at construction."""

    def __init__(self, strategy: str = "GD", temperature: float = 0.1) -> None:
        super().__init__()
        if strategy not in GLOBAL_STRATEGIES:
            raise ValueError(f"unknown global strategy {strategy!r}; choose one of {GLOBAL_STRATEGIES}")
        self.strategy = strategy
        self.temperature = temperature

    def forward(
        self,
        z: torch.Tensor,
        slice_index: torch.Tensor,
        view_index: torch.Tensor,
        partition_index: torch.Tensor | None = None,
        volume_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return global_contrastive_loss(
            z, self.strategy, slice_index, view_index, partition_index, volume_index, self.temperature
        )


# ---------------------------------------------------------------------------------------------------------------------
# Local loss L_l
# ---------------------------------------------------------------------------------------------------------------------


def region_positions(map_size: tuple[int, int] | int, region_size: int = 3) -> list[tuple[int, int]]:
    """Top-left corners of the A = 13 fixed regions of the authors' code: a 3 x 3 grid plus 4 inner points.

    Per axis with side W: M = W - 1 for K = 1, else M = W - K - 1; the grid uses {0, M//2, M} and the inner points
    {M//4, 3M//4}. For a 48 x 48 map and K = 3 this gives {0, 22, 44}^2 and {11, 33}^2.
    """
    sizes = (map_size, map_size) if isinstance(map_size, int) else tuple(map_size)
    ends = [w - 1 if region_size == 1 else w - region_size - 1 for w in sizes]
    if min(ends) < 0:
        raise ValueError(f"map {sizes} too small for {region_size}x{region_size} regions")
    outer = [(0, m // 2, m) for m in ends]
    inner = [(m // 4, (3 * m) // 4) for m in ends]
    corners = [(p, q) for p in outer[0] for q in outer[1]]
    return corners + [(p, q) for p in inner[0] for q in inner[1]]


def extract_regions(feature_map: torch.Tensor, positions: list[tuple[int, int]], region_size: int) -> torch.Tensor:
    """Flattened K x K regions [B, A, K*K*C] of ``feature_map`` [B, C, H, W], ordered (row, column, channel)."""
    k = region_size
    regions = [feature_map[:, :, p : p + k, q : q + k].permute(0, 2, 3, 1).flatten(1) for p, q in positions]
    return torch.stack(regions, dim=1)


def nearest_region_mask(positions: list[tuple[int, int]], num_neighbours: int) -> torch.Tensor:
    """Bool [A, A]: (r, r') true when r' is among the ``num_neighbours`` regions closest to r (ties by index).

    Restricting negatives to nearby regions mimics the authors' code (5 hand-listed neighbours); the paper uses all.
    """
    pos = torch.tensor(positions, dtype=torch.float64)
    dist = torch.cdist(pos, pos)
    dist.fill_diagonal_(float("inf"))
    a = len(positions)
    if not 0 < num_neighbours < a:
        raise ValueError(f"num_neighbours must be in [1, {a - 1}], got {num_neighbours}")
    order = torch.sort(dist + torch.arange(a) * 1e-9, dim=1).indices[:, :num_neighbours]
    mask = torch.zeros(a, a, dtype=torch.bool)
    mask.scatter_(1, order, True)
    return mask


def local_map_pairs(
    strategy: str,
    view_index: torch.Tensor,
    slice_index: torch.Tensor,
    partition_index: torch.Tensor | None = None,
    volume_index: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unordered pairs [P, 2] of batch items whose maps are contrasted region by region.

    * ``"LR"``: the two views of the same slice.
    * ``"LD"``: as L^R, plus same-partition slices of different volumes seen in the same view, i.e.
      (f_s^i, f_s^j) and (t(f_s^i), t(f_s^j)) for i != j.
    """
    if strategy not in LOCAL_STRATEGIES:
        raise ValueError(f"unknown local strategy {strategy!r}; choose one of {LOCAL_STRATEGIES}")
    same_slice = slice_index[:, None] == slice_index[None, :]
    pair = same_slice & (view_index[:, None] != view_index[None, :])
    if strategy == "LD":
        if partition_index is None or volume_index is None:
            raise ValueError("strategy LD needs partition_index and volume_index")
        same_part = partition_index[:, None] == partition_index[None, :]
        other_vol = volume_index[:, None] != volume_index[None, :]
        same_view = view_index[:, None] == view_index[None, :]
        pair = pair | (same_part & other_vol & same_view)
    return torch.triu(pair, diagonal=1).nonzero()


def local_contrastive_loss(
    regions: torch.Tensor,
    pairs: torch.Tensor,
    temperature: float = 0.1,
    region_negative_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """L_l over region embeddings (paper Eqs. 3-4), averaged over both directions of every pair and every region.

    Args:
        regions: [B, A, F] region embeddings of B feature maps (e.g. :func:`extract_regions` after g2).
        pairs: [P, 2] long, map pairs (a, b) (e.g. :func:`local_map_pairs`). For region r the positive of f_a(r) is
            f_b(r); its negatives are the other regions r' of both maps, f_a(r') and f_b(r'), so 2(A - 1) negatives.
        temperature: tau.
        region_negative_mask: optional bool [A, A] restricting which r' count as negatives of r (both maps).

    Returns:
        scalar mean over the 2 * P * A terms l(a, b, r) and l(b, a, r).
    """
    if pairs.numel() == 0:
        raise ValueError("no map pairs to contrast")
    a_count = regions.shape[1]
    # per pair, stack the two maps' regions as 2A items: [f_a(0..A-1), f_b(0..A-1)]
    items = torch.cat([regions[pairs[:, 0]], regions[pairs[:, 1]]], dim=1)
    sim = cosine_similarity_matrix(items, items)
    region = torch.arange(a_count, device=regions.device).repeat(2)
    view = torch.arange(2, device=regions.device).repeat_interleave(a_count)
    positive = (region[:, None] == region[None, :]) & (view[:, None] != view[None, :])
    other_region = region[:, None] != region[None, :]
    if region_negative_mask is not None:
        other_region = other_region & region_negative_mask.to(regions.device).repeat(2, 2)
    return masked_info_nce(sim, positive, other_region, temperature)


class LocalContrastiveLoss(nn.Module):
    """Module form of the local loss: builds the map pairs for the strategy from the batch tags.

    Same call signature as :class:`GlobalContrastiveLoss`, so one trainer drives both stages. ``region_negative_mask``
    (e.g. :func:`nearest_region_mask`) restricts the negatives as in the authors' code; None uses all other regions.
    """

    def __init__(
        self, strategy: str = "LR", temperature: float = 0.1, region_negative_mask: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        if strategy not in LOCAL_STRATEGIES:
            raise ValueError(f"unknown local strategy {strategy!r}; choose one of {LOCAL_STRATEGIES}")
        self.strategy = strategy
        self.temperature = temperature
        self.region_negative_mask = region_negative_mask

    def forward(
        self,
        regions: torch.Tensor,
        slice_index: torch.Tensor,
        view_index: torch.Tensor,
        partition_index: torch.Tensor | None = None,
        volume_index: torch.Tensor | None = None,
    ) -> torch.Tensor:
        pairs = local_map_pairs(self.strategy, view_index, slice_index, partition_index, volume_index)
        return local_contrastive_loss(regions, pairs, self.temperature, self.region_negative_mask)
