"""Registration network ``f = h o g`` of cyclical self-training and its test-time pipeline (Bigalke et al. 2023).

* :class:`CSTRegistrationNet`: feature net ``g`` + convex optimiser ``h`` + the refinements of the pseudo-label /
  test pipeline. ``forward(pair)`` with ``pair = [B, 2, *S]`` = (moving, fixed) returns the voxel displacement
  ``[B, 3, *S]`` (``warped(p) = moving(p + ddf(p))``): intensity clamp, one or two warps (the second on the
  nearest-neighbour warped, re-clamped moving image), each with optional forward-backward inverse consistency, then
  optionally the Adam instance optimisation; every step is switchable (Table 1 of the paper). Without Adam the
  forward is traceable (``torch.jit.trace``).
* :meth:`CSTRegistrationNet.predict`: the differentiable learning stream (one warp, no ICE, no clamp).
* :func:`register_pair`: the same pipeline with the per-call options and the random-projection generator exposed, as
  the pseudo-label refresh needs them.
* Optional affine pre-alignment (``affine_prealign``, issue 9): ``forward`` first fits an affine transform of the moving
  image to the fixed image (:func:`common.registration.affine.prealign`, instance optimisation), runs the deformable
  pipeline on the aligned moving image and returns affine + deformable as **one** field
  (:func:`~common.registration.affine.compose_with_affine`), so labels are resampled once. Why: the convex optimiser
  searches only +-2 feature voxels, which pre-aligned data (AbdomenCTCT) fits but inter-patient MR (ACDC) does not.

State-dict keys are ``feature_net.<i>.*``; ``g`` itself (:class:`~common.networks.cst_features.CSTFeatureNet`, the
bundle's ``network_def``) keeps the reference layer order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.networks.cst_features import CSTFeatureNet, random_projection
from common.registration import fields
from common.registration.affine import affine_ddf, compose_with_affine, prealign
from common.registration.convex import compose_fields, convex_register
from common.registration.instance_opt import adam_refine

__all__ = ["CSTRegistrationNet", "RegistrationResult", "register_pair", "standardize_channels"]


def standardize_channels(features: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """Zero mean, unit standard deviation of every channel over space, per item (a deviation from the reference).

    Why: a randomly initialised ``g`` on [0, 1]-scaled MR gives nearly constant features, a flat cost volume and a
    near-zero stage-0 field; standardising makes the SAD cost independent of the input intensity range.
    """
    dims = tuple(range(2, features.ndim))
    mean = features.mean(dim=dims, keepdim=True)
    std = features.std(dim=dims, keepdim=True)
    return (features - mean) / (std + eps)


@dataclass
class RegistrationResult:
    """Pipeline output: final field ``ddf``, the field of each warp, the composite before Adam (``pre_adam``), and
    the second-level features ``g[0:6]`` of fixed and original moving image (only when requested)."""

    ddf: torch.Tensor
    warp_ddfs: list[torch.Tensor]
    pre_adam: torch.Tensor | None = None
    adam_fixed: torch.Tensor | None = None
    adam_moving: torch.Tensor | None = None


class CSTRegistrationNet(nn.Module):
    """``f = h o g``: pair ``[B, 2, *S]`` (moving, fixed; ``S`` divisible by 8) -> voxel ddf ``[B, 3, *S]``.

    Args:
        feature_net: ``g``; default a fresh :class:`CSTFeatureNet` (PyTorch default init).
        num_warps: 1 or 2 registrations in the pseudo-label / test pipeline (2 in the paper).
        use_ice: forward-backward inverse consistency in that pipeline.
        intensity_clamp: ``(low, high)`` clamp of both inputs in that pipeline (``(-0.4, 0.6)`` for CT as HU/500);
            ``None`` for images already in a bounded range (MR).
        standardize_features: per-channel standardisation of ``g``'s output before the cost volume and of the
            projected Adam features (off in the reference; needed for MR, see :func:`standardize_channels`).
        radius, beta, alphas, feature_scale, ice_iterations: optimiser settings (paper: 2, 20, (0.003, 0.03, 0.3),
            5, 15).
        legacy_norm_scale: reference scale of feature voxels (quirk Q1), see ``convex.feature_voxel_scale``.
        legacy_compose_order: reference (reversed) composition of the two warps (quirk Q2).
        second_warp_mode: interpolation of the moving image for the second warp ("nearest" as the reference).
        use_adam, reg_fac, adam_iterations, adam_channels, adam_feature_scale, adam_return_prestep: Adam refinement
            in ``forward`` (paper: reg_fac 1 for pseudo labels, the reference test script passes 10; 50 iterations,
            32 channels, scale 5).
        seed: seed of the random Adam projection in ``forward`` (deterministic inference).
        amp: autocast (fp16) on CUDA; ignored on CPU, which always runs fp32.
        affine_prealign: in ``forward``, align the moving image affinely first and return the composed field.
        affine_kwargs: keyword arguments of :func:`common.registration.affine.prealign` (``mode``, ``frozen_axes``,
            ``levels``, ``iterations``, ...); the images are clamped by ``intensity_clamp`` before.
    """

    def __init__(
        self,
        feature_net: nn.Module | None = None,
        num_warps: int = 2,
        use_ice: bool = True,
        intensity_clamp: Sequence[float] | None = (-0.4, 0.6),
        standardize_features: bool = False,
        radius: int = 2,
        beta: float = 20.0,
        alphas: Sequence[float] = (0.003, 0.03, 0.3),
        feature_scale: float = 5.0,
        ice_iterations: int = 15,
        legacy_norm_scale: bool = True,
        legacy_compose_order: bool = True,
        second_warp_mode: str = "nearest",
        use_adam: bool = False,
        reg_fac: float = 1.0,
        adam_iterations: int = 50,
        adam_channels: int = 32,
        adam_feature_scale: float = 5.0,
        adam_return_prestep: bool = True,
        seed: int = 0,
        amp: bool = True,
        affine_prealign: bool = False,
        affine_kwargs: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if num_warps not in (1, 2):
            raise ValueError(f"num_warps must be 1 or 2, got {num_warps}")
        self.feature_net = feature_net if feature_net is not None else CSTFeatureNet()
        self.num_warps = int(num_warps)
        self.use_ice = bool(use_ice)
        self.intensity_clamp = None if intensity_clamp is None else tuple(float(v) for v in intensity_clamp)
        self.standardize_features = bool(standardize_features)
        self.optimiser_kwargs = dict(
            radius=int(radius),
            beta=float(beta),
            alphas=tuple(float(a) for a in alphas),
            feature_scale=float(feature_scale),
            ice_iterations=int(ice_iterations),
            legacy_norm_scale=bool(legacy_norm_scale),
        )
        self.legacy_compose_order = bool(legacy_compose_order)
        self.second_warp_mode = second_warp_mode
        self.adam_kwargs = dict(
            use_adam=bool(use_adam),
            reg_fac=float(reg_fac),
            adam_iterations=int(adam_iterations),
            adam_channels=int(adam_channels),
            adam_feature_scale=float(adam_feature_scale),
            adam_return_prestep=bool(adam_return_prestep),
        )
        self.seed = int(seed)
        self.amp = bool(amp)
        self.affine_prealign = bool(affine_prealign)
        self.affine_kwargs = {k: (tuple(v) if isinstance(v, list) else v) for k, v in (affine_kwargs or {}).items()}

    # -- building blocks ---------------------------------------------------------------------------------------------

    def _autocast(self, device: torch.device):
        return torch.autocast(device_type=device.type, enabled=self.amp and device.type == "cuda")

    def clamp(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.intensity_clamp is None else image.clamp(*self.intensity_clamp)

    def features(self, image: torch.Tensor, with_adam: bool = False):
        """``g(image)`` (optionally standardised), and ``g[0:6](image)`` too when ``with_adam``."""
        if with_adam:
            feats, early = self.feature_net.features_and_adam_features(image)
        else:
            feats, early = self.feature_net(image), None
        if self.standardize_features:
            feats = standardize_channels(feats.float())
        return (feats, early) if with_adam else feats

    def optimise(self, feat_fixed, feat_moving, output_shape, use_ice: bool) -> torch.Tensor:
        """``h``: features -> voxel field on ``output_shape`` (fp32)."""
        return convex_register(feat_fixed, feat_moving, output_shape, use_ice=use_ice, **self.optimiser_kwargs).float()

    def prealign(self, moving: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
        """Affine matrix ``[B, 3, 4]`` (fixed voxel -> moving voxel) of the clamped images (instance optimisation).

        Runs with gradients enabled for its own parameters, also inside ``no_grad`` inference."""
        with torch.enable_grad(), torch.autocast(device_type=fixed.device.type, enabled=False):
            moving, fixed = self.clamp(moving.detach().float()), self.clamp(fixed.detach().float())
            return prealign(moving, fixed, **self.affine_kwargs).matrix.detach()

    # -- the two streams ---------------------------------------------------------------------------------------------

    def predict(self, moving: torch.Tensor, fixed: torch.Tensor, output_shape: Sequence[int]) -> torch.Tensor:
        """Learning stream: separate ``g`` calls (per-stream BatchNorm statistics), one warp, no ICE, differentiable."""
        with self._autocast(fixed.device):
            feat_fixed = self.features(fixed)
            feat_moving = self.features(moving)
            return self.optimise(feat_fixed, feat_moving, output_shape, use_ice=False)

    def register(
        self,
        moving: torch.Tensor,
        fixed: torch.Tensor,
        num_warps: int | None = None,
        use_ice: bool | None = None,
        with_adam_features: bool = False,
    ) -> RegistrationResult:
        """Pseudo-label / test stream without Adam on the clamped images (call under ``no_grad`` and ``eval()``)."""
        num_warps = self.num_warps if num_warps is None else int(num_warps)
        use_ice = self.use_ice if use_ice is None else bool(use_ice)
        shape = tuple(fixed.shape[2:])
        fixed, moving = self.clamp(fixed), self.clamp(moving)
        with self._autocast(fixed.device):
            feat_fixed, early_fixed = self.features(fixed, with_adam=True)
            feat_moving, early_moving = self.features(moving, with_adam=True)
            ddfs = [self.optimise(feat_fixed, feat_moving, shape, use_ice)]
            if num_warps == 2:
                moved = self.clamp(fields.warp(moving, ddfs[0], mode=self.second_warp_mode, padding_mode="zeros"))
                ddfs.append(self.optimise(feat_fixed, self.features(moved), shape, use_ice))
        ddf = ddfs[0] if num_warps == 1 else compose_fields(ddfs[0], ddfs[1], self.legacy_compose_order)
        if not with_adam_features:
            early_fixed = early_moving = None
        return RegistrationResult(ddf, ddfs, pre_adam=ddf, adam_fixed=early_fixed, adam_moving=early_moving)

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        if pair.shape[1] != 2:
            raise ValueError(f"expected a (moving, fixed) pair with 2 channels, got shape {tuple(pair.shape)}")
        pair = pair.as_tensor() if hasattr(pair, "as_tensor") else pair
        moving, fixed = pair[:, :1], pair[:, 1:]
        matrix = None
        if self.affine_prealign:
            matrix = self.prealign(moving, fixed)
            moving = fields.warp(moving, affine_ddf(matrix, fixed.shape[2:]).to(moving.dtype))
        if not self.adam_kwargs["use_adam"]:
            ddf = self.register(moving, fixed).ddf
        else:
            generator = torch.Generator().manual_seed(self.seed)
            ddf = register_pair(self, moving, fixed, generator=generator, **self.adam_kwargs).ddf
        return ddf if matrix is None else compose_with_affine(matrix, ddf)


def register_pair(
    network: CSTRegistrationNet,
    moving: torch.Tensor,
    fixed: torch.Tensor,
    num_warps: int | None = None,
    use_ice: bool | None = None,
    use_adam: bool = True,
    reg_fac: float = 1.0,
    adam_iterations: int = 50,
    adam_channels: int = 32,
    adam_feature_scale: float = 5.0,
    adam_return_prestep: bool = True,
    generator: torch.Generator | None = None,
) -> RegistrationResult:
    """Full pseudo-label / test pipeline (§4.7): ``g`` in eval mode, no gradients to ``g``; optional Adam refinement.

    The Adam features are ``adam_feature_scale * P(g[0:6](image))`` of the clamped fixed and the *original* moving
    image, with one random projection ``P`` (``adam_channels`` outputs) per pair drawn from ``generator``; with
    ``network.standardize_features`` the projected features are standardised per channel too (a deviation).
    Returns the final field in ``ddf`` and the field before Adam in ``pre_adam``.
    """
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            result = network.register(moving, fixed, num_warps, use_ice, with_adam_features=use_adam)
        if use_adam:
            refined = []
            for b in range(fixed.shape[0]):
                weight = random_projection(result.adam_fixed[b : b + 1], adam_channels, generator)
                proj_f = torch.nn.functional.conv3d(result.adam_fixed[b : b + 1].float(), weight)
                proj_m = torch.nn.functional.conv3d(result.adam_moving[b : b + 1].float(), weight)
                if network.standardize_features:
                    proj_f, proj_m = standardize_channels(proj_f), standardize_channels(proj_m)
                refined.append(
                    adam_refine(
                        adam_feature_scale * proj_f,
                        adam_feature_scale * proj_m,
                        result.ddf[b : b + 1],
                        reg_fac=reg_fac,
                        iterations=adam_iterations,
                        return_prestep=adam_return_prestep,
                    )
                )
            result = RegistrationResult(ddf=torch.cat(refined), warp_ddfs=result.warp_ddfs, pre_adam=result.ddf)
    finally:
        network.train(was_training)
    return result
