"""Least-squares GAN losses (Mao et al. 2017) for latent-code discriminators (adversarial auto-encoders).

Label convention of the SST code and of standard AAEs: samples of the prior are "real" (target 1), encoder codes are
"fake" (target 0) for the discriminator, and the encoder is pushed towards 1. The paper's Eq. 10 writes the labels
the other way round; the two are equivalent up to relabelling.
"""

from __future__ import annotations

import torch

__all__ = ["lsgan_discriminator_loss", "lsgan_generator_loss", "sample_normal_prior"]


def lsgan_discriminator_loss(
    d_real: torch.Tensor, d_fake: torch.Tensor, real_target: float = 1.0, fake_target: float = 0.0
) -> torch.Tensor:
    """mean((D(real) - 1)^2) + mean((D(fake) - 0)^2); unweighted (callers apply the paper's 0.5 / lambda_3 factors)."""
    return ((d_real - real_target) ** 2).mean() + ((d_fake - fake_target) ** 2).mean()


def lsgan_generator_loss(d_fake: torch.Tensor, real_target: float = 1.0) -> torch.Tensor:
    """mean((D(fake) - 1)^2): the encoder/generator wants its codes judged as prior samples."""
    return ((d_fake - real_target) ** 2).mean()


def sample_normal_prior(
    num: int,
    shape: int | tuple[int, ...],
    normalize: bool = False,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Draw ``num`` samples of N(0, I) with per-sample ``shape``; ``normalize`` puts each on the unit sphere.

    Style codes are L2-normalised, so their prior is the normalised Gaussian (uniform on the sphere); flow codes use
    the plain Gaussian.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    sample_device = generator.device if generator is not None else device
    z = torch.randn((num, *shape), device=sample_device, generator=generator).to(device)
    if normalize:
        z = z / z.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *([1] * len(shape)))
    return z
