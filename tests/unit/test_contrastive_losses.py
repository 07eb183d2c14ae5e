"""Contrastive loss family: hand-computed values from the spec (section 11) and structural properties of the masks."""

import math

import pytest
import torch

from common.losses.contrastive import (
    GlobalContrastiveLoss,
    LocalContrastiveLoss,
    extract_regions,
    global_contrastive_loss,
    global_pair_masks,
    info_nce,
    local_contrastive_loss,
    local_map_pairs,
    masked_info_nce,
    nearest_region_mask,
    partition_bounds,
    region_positions,
    slice_partitions,
)


def _worked_batch():
    """2 volumes x 2 partitions x 2 views; sim 1 within a slice, 0.5 across volumes, 0 across partitions."""
    e = torch.eye(4)
    u1, u3 = e[0], e[2]
    u2 = 0.5 * e[0] + math.sqrt(3) / 2 * e[1]
    u4 = 0.5 * e[2] + math.sqrt(3) / 2 * e[3]
    # items (view-major): (vol0, A), (vol0, B), (vol1, A), (vol1, B) for view 0, then the same for view 1
    z = torch.stack([u1, u3, u2, u4] * 2)
    tags = {
        "slice_index": torch.tensor([0, 1, 2, 3] * 2),
        "view_index": torch.tensor([0] * 4 + [1] * 4),
        "partition_index": torch.tensor([0, 1, 0, 1] * 2),
        "volume_index": torch.tensor([0, 0, 1, 1] * 2),
    }
    return z, tags


@pytest.mark.parametrize(
    "strategy,expected",
    [
        # 8 unordered pairs: 4 within-slice (each ordered term log(1+4/e)) and 4 cross-volume (log(1+4e^-0.5))
        ("GD", (8 * math.log(1 + 4 / math.e) + 8 * math.log(1 + 4 * math.exp(-0.5))) / 8),
        ("GD-", 2 * math.log(1 + 4 / math.e)),
        ("GR", 2 * math.log(1 + (2 * math.exp(0.5) + 4) / math.e)),
    ],
)
def test_global_worked_values(strategy, expected):
    z, tags = _worked_batch()
    loss = global_contrastive_loss(z, strategy, temperature=1.0, **tags)
    assert loss.item() == pytest.approx(expected, abs=1e-5)
    # spec's printed numbers, as an independent cross-check of the closed forms above
    printed = {"GD": 2.136262, "GD-": 1.809665, "GR": 2.608313}[strategy]
    assert loss.item() == pytest.approx(printed, abs=2e-6)


def test_global_masks_structure():
    m, s = 3, 4
    vol = torch.arange(m).repeat_interleave(s).repeat(2)
    part = torch.arange(s).repeat(m).repeat(2)
    view = torch.arange(2).repeat_interleave(m * s)
    sl = torch.arange(m * s).repeat(2)
    n = vol.numel()
    for strategy in ("GR", "GD-", "GD"):
        pos, neg = global_pair_masks(strategy, sl, view, part, vol)
        assert not pos.diagonal().any() and not neg.diagonal().any()
        assert not (pos & neg).any()
        for i in range(n):
            for j in range(n):
                same_part, same_slice = part[i] == part[j], sl[i] == sl[j]
                if strategy in ("GD", "GD-") and same_part:
                    assert not neg[i, j], "a same-partition item must never be a negative"
                if strategy == "GD-" and same_part and vol[i] != vol[j]:
                    assert not pos[i, j]
                if strategy == "GR":
                    assert bool(neg[i, j]) == bool(not same_slice)
                if strategy == "GD" and i != j and same_part and (same_slice or view[i] == view[j]):
                    assert pos[i, j]


def test_gd_denominator_excludes_same_partition_other_volume():
    """Make the cross-volume same-partition item hugely similar to an anchor; under G^D- it must not change the loss
    (it is neither positive nor negative) while G^R (which counts it as a negative) must grow."""
    z, tags = _worked_batch()
    loss_dm = global_contrastive_loss(z, "GD-", temperature=1.0, **tags).item()
    loss_r = global_contrastive_loss(z, "GR", temperature=1.0, **tags).item()
    z2 = z.clone()
    z2[2] = z[0]  # vol1/A view0 now identical to vol0/A
    z2[6] = z[4]
    assert global_contrastive_loss(z2, "GD-", temperature=1.0, **tags).item() == pytest.approx(loss_dm, abs=1e-6)
    assert global_contrastive_loss(z2, "GR", temperature=1.0, **tags).item() > loss_r + 0.1


def test_masked_info_nce_matches_loop():
    gen = torch.Generator().manual_seed(1)
    sim = torch.randn(5, 7, generator=gen)
    pos = torch.rand(5, 7, generator=gen) > 0.7
    pos[0, 0] = True
    neg = (torch.rand(5, 7, generator=gen) > 0.4) & ~pos
    tau = 0.3
    terms = []
    for i in range(5):
        for j in range(7):
            if pos[i, j]:
                den = math.exp(sim[i, j] / tau) + sum(math.exp(sim[i, k] / tau) for k in range(7) if neg[i, k])
                terms.append(-math.log(math.exp(sim[i, j] / tau) / den))
    assert masked_info_nce(sim, pos, neg, tau).item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)
    with pytest.raises(ValueError):
        masked_info_nce(sim, pos, pos, tau)


def test_info_nce_cross_entropy_with_queue():
    gen = torch.Generator().manual_seed(2)
    q, k, queue = torch.randn(4, 6, generator=gen), torch.randn(4, 6, generator=gen), torch.randn(3, 6, generator=gen)
    qn = q / q.norm(dim=1, keepdim=True)
    cands = torch.cat([k, queue])
    cn = cands / cands.norm(dim=1, keepdim=True)
    expected = 0.0
    for i in range(4):
        logits = [float(qn[i] @ cn[j]) / 0.1 for j in range(7)]
        expected += -logits[i] + math.log(sum(math.exp(v) for v in logits))
    assert info_nce(q, k, 0.1, queue).item() == pytest.approx(expected / 4, rel=1e-5)
    # perfectly aligned, mutually orthogonal keys: log(1 + (N-1) e^{-1/tau})
    eye = torch.eye(5)
    assert info_nce(eye, eye, 0.5).item() == pytest.approx(math.log(1 + 4 * math.exp(-2.0)), rel=1e-6)


def test_cosine_scale_and_temperature():
    z, tags = _worked_batch()
    for strategy in ("GR", "GD-", "GD"):
        a = global_contrastive_loss(z, strategy, temperature=0.1, **tags)
        b = global_contrastive_loss(3.7 * z, strategy, temperature=0.1, **tags)
        assert a.item() == pytest.approx(b.item(), rel=1e-6)
    module = GlobalContrastiveLoss("GD", temperature=1.0)
    assert module(z, **tags).item() == pytest.approx(2.136262, abs=2e-6)


@pytest.mark.parametrize(
    "tau,num_neg,expected", [(0.1, None, 1.0890e-3), (1.0, None, 2.285348), (0.1, 5, 4.539e-4), (0.05, None, None)]
)
def test_local_analytic_minimum(tau, num_neg, expected):
    positions = region_positions(48, 3)
    regions = torch.eye(13)[None].repeat(4, 1, 1)  # 2 slices x 2 identical views, one-hot (orthogonal) regions
    view = torch.tensor([0, 1, 0, 1])
    sl = torch.tensor([0, 0, 1, 1])
    mask = None if num_neg is None else nearest_region_mask(positions, num_neg)
    loss = LocalContrastiveLoss("LR", tau, mask)(regions, sl, view)
    n_neg = 24 if num_neg is None else 2 * num_neg
    closed = math.log(1 + n_neg * math.exp(-1 / tau))
    assert loss.item() == pytest.approx(closed, rel=1e-5, abs=1e-9)
    if expected is not None:
        assert loss.item() == pytest.approx(expected, rel=2e-4)
    perm = regions.clone()
    perm[1] = regions[1][torch.roll(torch.arange(13), 1)]
    assert LocalContrastiveLoss("LR", tau, mask)(perm, sl, view).item() > loss.item()


def test_local_pairs_ld():
    # 2 volumes x 2 partitions x 2 views, view-major
    vol = torch.tensor([0, 0, 1, 1] * 2)
    part = torch.tensor([0, 1, 0, 1] * 2)
    view = torch.tensor([0] * 4 + [1] * 4)
    sl = torch.tensor([0, 1, 2, 3] * 2)
    lr = {tuple(p) for p in local_map_pairs("LR", view, sl).tolist()}
    assert lr == {(0, 4), (1, 5), (2, 6), (3, 7)}
    ld = {tuple(p) for p in local_map_pairs("LD", view, sl, part, vol).tolist()}
    assert ld == lr | {(0, 2), (1, 3), (4, 6), (5, 7)}
    regions = torch.randn(8, 13, 9)
    loss = local_contrastive_loss(regions, torch.tensor(sorted(ld)), 0.1)
    assert torch.isfinite(loss)


def test_region_positions_and_extraction():
    assert set(region_positions(48, 3)) == {(p, q) for p in (0, 22, 44) for q in (0, 22, 44)} | {
        (p, q) for p in (11, 33) for q in (11, 33)
    }
    assert set(region_positions(48, 1)) == {(p, q) for p in (0, 23, 47) for q in (0, 23, 47)} | {
        (p, q) for p in (11, 35) for q in (11, 35)
    }
    assert all(p + 3 <= 48 and q + 3 <= 48 for p, q in region_positions(48, 3))
    f = torch.randn(2, 5, 48, 48)
    out = extract_regions(f, region_positions(48, 3), 3)
    assert out.shape == (2, 13, 45)
    p, q = region_positions(48, 3)[4]
    expected = f[1].permute(1, 2, 0)[p : p + 3, q : q + 3, :].reshape(-1)
    assert torch.equal(out[1, 4], expected)
    mask = nearest_region_mask(region_positions(48, 3), 5)
    assert mask.sum(1).tolist() == [5] * 13 and not mask.diagonal().any()


@pytest.mark.parametrize("q,s", [(10, 4), (7, 3), (13, 4), (9, 2)])
def test_partition_assignment_non_multiple(q, s):
    lab = slice_partitions(q, s, "round")
    assert (lab >= 0).all() and lab.tolist() == sorted(lab.tolist())
    sizes = torch.bincount(lab, minlength=s)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == q
    floor = slice_partitions(q, s, "floor")
    step = q // s
    assert floor.tolist() == [i // step if i < s * step else -1 for i in range(q)]


def test_partition_bounds_examples():
    assert partition_bounds(10, 4, "floor") == [(0, 2), (2, 4), (4, 6), (6, 8)]
    assert partition_bounds(10, 4, "round") == [(0, 3), (3, 5), (5, 8), (8, 10)]
    assert partition_bounds(7, 3, "round") == [(0, 2), (2, 5), (5, 7)]
    with pytest.raises(ValueError):
        partition_bounds(3, 4)
