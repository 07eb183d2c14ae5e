"""CLMorph losses against values computed independently (closed forms, hand-written loops)."""

from __future__ import annotations

import math

import pytest
import torch

from common.losses.registration import (
    CLMorphLoss,
    byol_loss,
    diffusion_loss,
    kl_smooth_loss,
    minmax_rescale,
    neighbour_count,
    pair_contrastive_loss,
    precision_term,
    reconstruction_loss,
)


def _nt_xent_by_hand(px: torch.Tensor, py: torch.Tensor, tau: float) -> float:
    """Eq. 8 of the paper written as loops: anchor a, positive its partner, denominator all items except a."""
    items = [v / v.norm() for v in torch.cat([px, py]).double()]
    b, terms = px.shape[0], []
    for a in range(2 * b):
        partner = (a + b) % (2 * b)
        num = math.exp(float(items[a] @ items[partner]) / tau)
        den = sum(math.exp(float(items[a] @ items[i]) / tau) for i in range(2 * b) if i != a)
        terms.append(-math.log(num / den))
    return sum(terms) / len(terms)


def test_contrastive_matches_hand_computation_on_tiny_batch():
    torch.manual_seed(0)
    px, py = torch.randn(3, 5), torch.randn(3, 5)
    for tau in (0.07, 0.1, 0.5):
        assert float(pair_contrastive_loss(px, py, tau)) == pytest.approx(_nt_xent_by_hand(px, py, tau), rel=1e-5)


@pytest.mark.parametrize("tau, expected", [(0.1, 6.354e-4), (0.5, 1.062879)])
def test_contrastive_closed_form_for_coinciding_positives_orthogonal_negatives(tau, expected):
    b = 8
    e = torch.eye(b, 16)
    loss = float(pair_contrastive_loss(e, e.clone(), tau))
    assert loss == pytest.approx(math.log(1 + (2 * b - 2) * math.exp(-1 / tau)), rel=1e-6)
    assert loss == pytest.approx(expected, rel=2e-3)


def test_contrastive_is_minimal_at_coinciding_positives_and_orthogonal_negatives():
    b, tau = 4, 0.1
    e = torch.eye(b, 8)
    best = float(pair_contrastive_loss(e, e.clone(), tau))
    torch.manual_seed(1)
    for _ in range(20):
        px = e + 0.3 * torch.randn_like(e)
        py = e + 0.3 * torch.randn_like(e)
        assert float(pair_contrastive_loss(px, py, tau)) > best


def test_contrastive_gradient_reaches_both_branches():
    px = torch.randn(4, 6, requires_grad=True)
    py = torch.randn(4, 6, requires_grad=True)
    pair_contrastive_loss(px, py, 0.1).backward()
    assert px.grad.abs().sum() > 0 and py.grad.abs().sum() > 0


def test_neighbour_count_of_grid_graph():
    d = neighbour_count((3, 4, 5))[0, 0]
    assert float(d[1, 1, 1]) == 6.0  # interior
    assert float(d[0, 1, 1]) == 5.0  # face
    assert float(d[0, 0, 1]) == 4.0  # edge
    assert float(d[0, 0, 0]) == 3.0  # corner


def test_kl_laplacian_is_zero_at_prior_and_mean_zero():
    shape = (1, 3, 6, 7, 5)
    lam = 10.0
    log_var = -torch.log(lam * neighbour_count(shape[2:])).expand(shape)
    assert float(kl_smooth_loss(torch.zeros(shape), log_var, lam)) == pytest.approx(0.0, abs=1e-6)
    # any other sigma costs more
    assert float(kl_smooth_loss(torch.zeros(shape), log_var + 0.5, lam)) > 1e-3


def test_kl_diagonal_is_zero_at_standard_normal():
    shape = (2, 3, 4, 4, 4)
    assert float(kl_smooth_loss(torch.zeros(shape), torch.zeros(shape), form="diagonal")) == pytest.approx(0.0)
    mu = torch.full(shape, 0.5)
    # 1/2 mean(sigma^2 + mu^2 - 1 - log sigma^2) = 1/2 * 0.25
    assert float(kl_smooth_loss(mu, torch.zeros(shape), form="diagonal")) == pytest.approx(0.125)


def test_precision_term_constant_and_ramp():
    assert float(precision_term(torch.full((1, 3, 5, 6, 7), 2.5))) == 0.0
    a = 0.3
    ramp = (a * torch.arange(6.0)).view(1, 1, 1, 6, 1).expand(1, 3, 5, 6, 7)
    assert float(precision_term(ramp)) == pytest.approx(a**2 / 6, rel=1e-6)


def test_kl_gradient_vanishes_at_prior_variance():
    shape = (1, 3, 4, 5, 6)
    lam = 10.0
    log_var = (-torch.log(lam * neighbour_count(shape[2:])).expand(shape)).clone().requires_grad_(True)
    kl_smooth_loss(torch.randn(shape), log_var, lam).backward()
    assert float(log_var.grad.abs().max()) < 1e-6


def test_diffusion_loss_of_linear_field():
    a = 0.2
    field = torch.zeros(1, 3, 5, 6, 7)
    field[:, 0] = a * torch.arange(5.0).view(5, 1, 1)  # d u_0 / d x_0 = a, all other differences 0
    # mean over the 3 channels (1 non-zero) and the 3 axes (1 non-zero): a^2 / 9
    assert float(diffusion_loss(field)) == pytest.approx(a**2 / 9, rel=1e-6)


def test_reconstruction_loss_scale():
    fixed, warped = torch.zeros(1, 1, 4, 4, 4), torch.full((1, 1, 4, 4, 4), 0.1)
    assert float(reconstruction_loss(fixed, warped, sigma=0.02)) == pytest.approx(0.01 / (2 * 0.02**2))


def test_minmax_rescale_per_volume():
    x = torch.stack([torch.linspace(-3, 5, 27).view(1, 3, 3, 3), torch.linspace(10, 11, 27).view(1, 3, 3, 3)])
    y = minmax_rescale(x)
    assert torch.allclose(y.flatten(1).min(1).values, torch.zeros(2))
    assert torch.allclose(y.flatten(1).max(1).values, torch.ones(2))


def test_byol_loss_values():
    v = torch.randn(4, 8)
    assert float(byol_loss(v, 3 * v)) == pytest.approx(0.0, abs=1e-6)
    assert float(byol_loss(v, -v)) == pytest.approx(4.0, abs=1e-6)


def test_total_loss_weights():
    torch.manual_seed(0)
    moving, fixed = torch.rand(2, 1, 8, 8, 8), torch.rand(2, 1, 8, 8, 8)
    outputs = {
        "ddf": 0.5 * torch.randn(2, 3, 8, 8, 8),
        "svf_mean": torch.randn(2, 3, 8, 8, 8),
        "svf_log_var": torch.randn(2, 3, 8, 8, 8) - 3,
        "proj_moving": torch.randn(2, 16),
        "proj_fixed": torch.randn(2, 16),
    }
    terms = CLMorphLoss(alpha=1.0, beta=0.01)(outputs, moving, fixed)
    expected = terms["recon"] + terms["smooth"] + 0.01 * terms["contrast"]
    assert float(terms["loss"]) == pytest.approx(float(expected), abs=1e-6)
    assert float(terms["smooth"]) == pytest.approx(
        float(kl_smooth_loss(outputs["svf_mean"], outputs["svf_log_var"])), rel=1e-6
    )
    assert float(terms["contrast"]) == pytest.approx(
        _nt_xent_by_hand(outputs["proj_moving"], outputs["proj_fixed"], 0.1)
    )
    recon_only = CLMorphLoss(alpha=0.0, beta=0.0)(outputs, moving, fixed)
    assert float(recon_only["loss"]) == pytest.approx(float(terms["recon"]))


def test_loss_rejects_missing_outputs():
    moving = torch.rand(1, 1, 8, 8, 8)
    with pytest.raises(ValueError, match="probabilistic"):
        CLMorphLoss(beta=0.0)({"ddf": torch.zeros(1, 3, 8, 8, 8)}, moving, moving)
    diffusion = CLMorphLoss(beta=0.0, smooth="diffusion")({"ddf": torch.zeros(1, 3, 8, 8, 8)}, moving, moving)
    assert float(diffusion["smooth"]) == 0.0


def test_recon_smoothing_removes_the_half_voxel_interpolation_reward():
    """Linear interpolation at a half-voxel offset averages two voxels and halves the warped noise variance, so on
    independent noise plain MSE drops to (1/2 + 1) / 2 = 0.75 of its zero-shift value: a field can lower the loss
    without aligning anything (the demo's Dice drop). Smoothing both images first removes that reward."""
    g = torch.Generator().manual_seed(0)
    moving, fixed = torch.randn(1, 1, 32, 32, 32, generator=g), torch.randn(1, 1, 32, 32, 32, generator=g)
    half = torch.zeros(1, 3, 32, 32, 32)
    half[:, 0] = 0.5

    def ratio(smoothing: float) -> float:
        loss = CLMorphLoss(alpha=0.0, beta=0.0, recon_smoothing=smoothing, padding_mode="border")
        shifted = float(loss({"ddf": half}, moving, fixed)["recon"])
        return shifted / float(loss({"ddf": torch.zeros_like(half)}, moving, fixed)["recon"])

    assert ratio(0.0) == pytest.approx(0.75, abs=0.03)
    assert ratio(1.0) > 0.98
    with pytest.raises(ValueError, match="recon_smoothing"):
        CLMorphLoss(recon_smoothing=-1.0)
