"""Volumetric momentum contrast for style codes (SST, Sec. 3.1, Eq. 1; He et al. 2020).

* The key encoder is an exponential moving average of the query encoder: theta_k <- m theta_k + (1 - m) theta_q.
* The queue keeps the K most recent keys, oldest overwritten first (FIFO); K must be a multiple of the batch size.
* The positive of a query volume x is x itself warped onto another subject's anatomy by a frozen registration
  network T: same intensities (style), different geometry. The negatives are the queued keys only.
* The InfoNCE value is :func:`common.losses.contrastive.info_nce`, applied per query so that other keys of the batch
  are not negatives (MoCo's definition), against the queue as it was *before* the current keys are enqueued.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from common.losses.contrastive import info_nce
from common.registration.fields import warp

__all__ = ["MoCoQueue", "VolumetricMoCoLoss", "freeze", "make_key_encoder", "momentum_update", "warp_to_anatomy"]


def freeze(module: nn.Module) -> nn.Module:
    """Put ``module`` in eval mode and stop gradients to its parameters (frozen T, key encoder)."""
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def make_key_encoder(query_encoder: nn.Module) -> nn.Module:
    """A frozen deep copy of the query encoder to serve as the momentum (key) encoder."""
    return freeze(copy.deepcopy(query_encoder))


@torch.no_grad()
def momentum_update(key_encoder: nn.Module, query_encoder: nn.Module, momentum: float = 0.99) -> None:
    """theta_k <- momentum * theta_k + (1 - momentum) * theta_q for every parameter; buffers are copied."""
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"momentum must be in [0, 1], got {momentum}")
    for pk, pq in zip(key_encoder.parameters(), query_encoder.parameters(), strict=True):
        pk.mul_(momentum).add_(pq.detach(), alpha=1.0 - momentum)
    for bk, bq in zip(key_encoder.buffers(), query_encoder.buffers(), strict=True):
        bk.copy_(bq)


@torch.no_grad()
def warp_to_anatomy(registration_net: nn.Module, image: torch.Tensor, anatomy: torch.Tensor) -> torch.Tensor:
    """Positive key image: ``image`` warped by the frozen ``registration_net`` onto the geometry of ``anatomy``.

    ``registration_net`` maps ``[B, 2 (moving, fixed), *spatial]`` to a voxel DDF (``FlowNet``).
    """
    ddf = registration_net(torch.cat([image, anatomy], dim=1))
    return warp(image, ddf)


class MoCoQueue(nn.Module):
    """FIFO dictionary of ``size`` keys of dimension ``dim``, stored as rows of the buffer ``keys`` [size, dim].

    Starts with unit-norm Gaussian rows; :meth:`enqueue` writes a batch at ``ptr`` and advances it modulo ``size``.
    Buffers travel with ``state_dict`` so a later stage continues with the same queue.
    """

    def __init__(self, dim: int = 128, size: int = 1024, seed: int | None = None) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        self.register_buffer("keys", F.normalize(torch.randn(size, dim, generator=generator), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @property
    def size(self) -> int:
        return self.keys.shape[0]

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        batch = keys.shape[0]
        if self.size % batch:
            raise ValueError(f"queue size {self.size} must be a multiple of the key batch size {batch}.")
        start = int(self.ptr)
        self.keys[start : start + batch] = keys.detach().to(self.keys)
        self.ptr.fill_((start + batch) % self.size)


class VolumetricMoCoLoss(nn.Module):
    """L = mean_i -log( exp(q_i.k_i/tau) / (exp(q_i.k_i/tau) + sum_n exp(q_i.Q_n/tau)) ), then enqueue the keys.

    ``temperature`` defaults to the paper's 0.7 (the authors' code uses 0.07). With q = k = e_1 and every queued key
    orthogonal to e_1 the value is log(1 + K exp(-1/tau)).
    """

    def __init__(self, dim: int = 128, queue_size: int = 1024, temperature: float = 0.7, seed: int | None = None):
        super().__init__()
        self.temperature = float(temperature)
        self.queue = MoCoQueue(dim, queue_size, seed)

    def forward(self, query: torch.Tensor, key: torch.Tensor, enqueue: bool = True) -> torch.Tensor:
        key = key.detach()
        negatives = self.queue.keys.detach().clone()
        terms = [
            info_nce(query[i : i + 1], key[i : i + 1], self.temperature, extra_negatives=negatives)
            for i in range(query.shape[0])
        ]
        loss = torch.stack(terms).mean()
        if enqueue:
            self.queue.enqueue(key)
        return loss
