"""LS-GAN losses against hand values and the style/flow priors."""

from __future__ import annotations

import math

import torch

from common.losses.adversarial import lsgan_discriminator_loss, lsgan_generator_loss, sample_normal_prior


def test_perfect_discriminator_values():
    ones, zeros = torch.ones(4, 1), torch.zeros(4, 1)
    assert float(lsgan_discriminator_loss(ones, zeros)) == 0.0
    assert float(lsgan_generator_loss(zeros)) == 1.0


def test_hand_values():
    d_real = torch.tensor([[0.5], [2.0]])
    d_fake = torch.tensor([[0.25], [-0.5]])
    # ((0.5-1)^2 + (2-1)^2)/2 + (0.25^2 + 0.5^2)/2 = 0.625 + 0.15625
    assert math.isclose(float(lsgan_discriminator_loss(d_real, d_fake)), 0.78125, rel_tol=1e-6)
    # ((0.25-1)^2 + (-0.5-1)^2)/2 = (0.5625 + 2.25)/2
    assert math.isclose(float(lsgan_generator_loss(d_fake)), 1.40625, rel_tol=1e-6)


def test_gradients_push_codes_towards_real():
    d_fake = torch.tensor([[0.2]], requires_grad=True)
    lsgan_generator_loss(d_fake).backward()
    assert float(d_fake.grad) < 0  # increasing D(code) towards 1 lowers the generator loss


def test_priors():
    g = torch.Generator().manual_seed(0)
    style = sample_normal_prior(64, 128, normalize=True, generator=g)
    assert torch.allclose(style.norm(dim=1), torch.ones(64), atol=1e-5)
    flow = sample_normal_prior(256, (4, 2, 2), generator=g)
    assert flow.shape == (256, 4, 2, 2)
    assert abs(float(flow.mean())) < 0.05 and abs(float(flow.std()) - 1) < 0.05
