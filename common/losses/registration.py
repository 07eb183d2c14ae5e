"""Unsupervised registration losses: reconstruction, the probabilistic KL "smooth" term, contrast, BYOL.

Conventions: fields are ``[B, D, *spatial]`` in voxels; ``svf_log_var`` is log sigma^2 of q(z | x, y) per voxel and
channel. Every loss is mean-reduced so its scale does not depend on the image size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from monai.networks.layers import GaussianFilter
from torch import nn

from common.losses.contrastive import cosine_similarity_matrix, masked_info_nce
from common.registration.fields import warp

__all__ = [
    "CLMorphLoss",
    "byol_loss",
    "diffusion_loss",
    "kl_smooth_loss",
    "minmax_rescale",
    "neighbour_count",
    "pair_contrastive_loss",
    "precision_term",
    "reconstruction_loss",
]


def minmax_rescale(image: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-volume (per batch item and channel) min-max rescale to [0, 1], so sigma has a fixed meaning."""
    flat = image.flatten(2)
    lo, hi = flat.min(-1).values, flat.max(-1).values
    shape = (*image.shape[:2], *([1] * (image.ndim - 2)))
    return (image - lo.view(shape)) / (hi - lo).clamp_min(eps).view(shape)


def reconstruction_loss(fixed: torch.Tensor, warped: torch.Tensor, sigma: float = 0.02) -> torch.Tensor:
    """Gaussian negative log-likelihood up to a constant: mean((y - x o phi)^2) / (2 sigma^2)."""
    return F.mse_loss(warped, fixed) / (2.0 * sigma**2)


def neighbour_count(spatial_shape: tuple[int, ...], device=None, dtype=torch.float32) -> torch.Tensor:
    """D_vv of the 2d-neighbour grid graph: 2d inside, fewer on faces/edges/corners. Shape ``[1, 1, *spatial]``."""
    count = torch.zeros(spatial_shape, device=device, dtype=dtype)
    for axis, n in enumerate(spatial_shape):
        per_axis = torch.full((n,), 2.0, device=device, dtype=dtype)
        per_axis[0] = per_axis[-1] = 1.0 if n > 1 else 0.0
        view = [1] * len(spatial_shape)
        view[axis] = n
        count = count + per_axis.view(view)
    return count.view(1, 1, *spatial_shape)


def precision_term(mean: torch.Tensor) -> torch.Tensor:
    """P(mu) = 1/(2d) * sum over axes of mean(forward difference^2): the Laplacian quadratic form, mean-reduced."""
    dims = mean.ndim - 2
    total = mean.new_zeros(())
    for axis in range(2, 2 + dims):
        diff = torch.diff(mean, dim=axis)
        if diff.numel():
            total = total + diff.pow(2).mean()
    return total / (2 * dims)


def diffusion_loss(ddf: torch.Tensor) -> torch.Tensor:
    """VoxelMorph's diffusion regulariser: mean over axes of mean(forward difference of the field)^2."""
    dims = ddf.ndim - 2
    return sum(torch.diff(ddf, dim=axis).pow(2).mean() for axis in range(2, 2 + dims)) / dims


def kl_smooth_loss(
    mean: torch.Tensor, log_var: torch.Tensor, prior_lambda: float = 10.0, form: str = "laplacian"
) -> torch.Tensor:
    """KL[q(z | x, y) || p(z)] per voxel and channel (mean-reduced), offset so that its minimum is 0.

    * ``"laplacian"`` (default; Dalca et al. 2018): prior N(0, (lambda L)^-1) with L the grid-graph Laplacian.
      KL = d/2 [mean(lambda D sigma^2 - log sigma^2 - 1 - log(lambda D)) + lambda P(mu)]; minimal (0) at mu constant
      and sigma^2 = 1 / (lambda D), the prior's marginal precision. Spatially smooths the mean through P(mu).
    * ``"diagonal"`` (the paper's Eq. 6 read literally): prior N(0, I),
      KL = 1/2 mean(sigma^2 + mu^2 - 1 - log sigma^2); 0 at mu = 0, sigma^2 = 1; no spatial coupling.
    """
    if form == "diagonal":
        return 0.5 * (log_var.exp() + mean.pow(2) - 1.0 - log_var).mean()
    if form != "laplacian":
        raise ValueError(f"form must be 'laplacian' or 'diagonal', got {form!r}")
    dims = mean.ndim - 2
    lam_d = prior_lambda * neighbour_count(tuple(mean.shape[2:]), device=mean.device, dtype=mean.dtype)
    sigma_term = (lam_d * log_var.exp() - log_var - 1.0 - torch.log(lam_d)).mean()
    return 0.5 * dims * (sigma_term + prior_lambda * precision_term(mean))


def pair_contrastive_loss(proj_x: torch.Tensor, proj_y: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Symmetric NT-Xent over the 2B projections of B (x, y) pairs (the paper's Eq. 8, averaged over all anchors).

    For anchor x_b the positive is y_b; the denominator holds y_b and the 2B - 2 other projections (never x_b
    itself). Built on ``masked_info_nce`` so every bundle shares one InfoNCE implementation.
    """
    if proj_x.shape != proj_y.shape or proj_x.ndim != 2:
        raise ValueError(f"projections must both be [B, F]; got {tuple(proj_x.shape)}, {tuple(proj_y.shape)}")
    b = proj_x.shape[0]
    items = torch.cat([proj_x, proj_y], 0)
    sim = cosine_similarity_matrix(items, items)
    index = torch.arange(2 * b, device=items.device)
    positive = torch.zeros_like(sim, dtype=torch.bool)
    positive[index, (index + b) % (2 * b)] = True
    negative = ~positive & ~torch.eye(2 * b, dtype=torch.bool, device=items.device)
    return masked_info_nce(sim, positive, negative, temperature)


def byol_loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """BYOL regression loss 2 - 2 cos(prediction, target), mean over the batch; the target gets no gradient."""
    return (2.0 - 2.0 * F.cosine_similarity(prediction, target.detach(), dim=-1)).mean()


class CLMorphLoss(nn.Module):
    """L_total = L_recon + alpha * L_smooth + beta * L_contrast (the paper's Eq. 9).

    Args:
        alpha: weight of the smooth term (KL for probabilistic networks, diffusion of the ddf otherwise).
        beta: weight of the contrastive (or BYOL) term; 0 skips it.
        image_sigma: sigma of the Gaussian likelihood on [0, 1]-rescaled intensities.
        prior_lambda: lambda of the Laplacian precision prior.
        kl_form: "laplacian" (default) or "diagonal" (Eq. 6 literal).
        temperature: tau of the contrastive loss.
        contrastive: "infonce" (NT-Xent of the projections) or "byol".
        smooth: "kl" (needs svf mean/log-var) or "diffusion" (`diffusion_loss` of the ddf, plain VoxelMorph).
        padding_mode: how the moving image is padded when warped for the reconstruction term.
        recon_smoothing: Gaussian sigma (voxels) applied to both rescaled images before the reconstruction term;
            0 (the paper) compares raw intensities. Why: linear interpolation at a fractional offset averages
            neighbouring voxels and so lowers the noise of the warped image; on noisy images plain MSE then rewards
            sub-voxel shifts that reduce the mismatch while moving the labels (half-voxel fields that the nearest-
            neighbour label warp turns into one-voxel shifts). Smoothing both images first removes that reward.
    """

    def __init__(
        self,
        alpha: float = 1.0,
        beta: float = 0.01,
        image_sigma: float = 0.02,
        prior_lambda: float = 10.0,
        kl_form: str = "laplacian",
        temperature: float = 0.1,
        contrastive: str = "infonce",
        smooth: str = "kl",
        padding_mode: str = "zeros",
        recon_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        if contrastive not in ("infonce", "byol"):
            raise ValueError(f"contrastive must be 'infonce' or 'byol', got {contrastive!r}")
        if smooth not in ("kl", "diffusion"):
            raise ValueError(f"smooth must be 'kl' or 'diffusion', got {smooth!r}")
        self.alpha, self.beta, self.image_sigma = float(alpha), float(beta), float(image_sigma)
        self.prior_lambda, self.kl_form, self.temperature = float(prior_lambda), kl_form, float(temperature)
        self.contrastive, self.smooth, self.padding_mode = contrastive, smooth, padding_mode
        if recon_smoothing < 0:
            raise ValueError(f"recon_smoothing must be >= 0, got {recon_smoothing}")
        self.recon_smoothing = float(recon_smoothing)

    def _prepare(self, image: torch.Tensor) -> torch.Tensor:
        """[0, 1] rescale, then the optional Gaussian smoothing of the reconstruction term."""
        image = minmax_rescale(image)
        if self.recon_smoothing > 0:
            image = GaussianFilter(image.ndim - 2, self.recon_smoothing).to(image.device)(image)
        return image

    def forward(
        self, outputs: dict[str, torch.Tensor], moving: torch.Tensor, fixed: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        ddf = outputs["ddf"]
        warped = warp(self._prepare(moving), ddf, mode="bilinear", padding_mode=self.padding_mode)
        recon = reconstruction_loss(self._prepare(fixed), warped, self.image_sigma)
        zero = recon.new_zeros(())
        smooth = zero
        if self.alpha:
            if self.smooth == "diffusion":
                smooth = diffusion_loss(ddf)
            elif "svf_log_var" not in outputs:
                raise ValueError("smooth='kl' needs a probabilistic network (svf_mean/svf_log_var outputs)")
            else:
                smooth = kl_smooth_loss(outputs["svf_mean"], outputs["svf_log_var"], self.prior_lambda, self.kl_form)
        contrast = zero
        if self.beta:
            if self.contrastive == "byol":
                if "pred_moving" not in outputs:
                    raise ValueError("contrastive='byol' needs a network built with byol=True")
                contrast = 0.5 * (
                    byol_loss(outputs["pred_moving"], outputs["target_fixed"])
                    + byol_loss(outputs["pred_fixed"], outputs["target_moving"])
                )
            elif "proj_moving" not in outputs:
                raise ValueError("the contrastive term needs a network with a projection head")
            else:
                contrast = pair_contrastive_loss(outputs["proj_moving"], outputs["proj_fixed"], self.temperature)
        total = recon + self.alpha * smooth + self.beta * contrast
        return {"loss": total, "recon": recon, "smooth": smooth, "contrast": contrast, "warped": warped}
