"""Volumetric MoCo: FIFO queue, exact momentum update, hand-computed loss values, frozen positive-key generator."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from common.losses.moco import MoCoQueue, VolumetricMoCoLoss, freeze, make_key_encoder, momentum_update, warp_to_anatomy


def _onehot(i: int, dim: int = 16) -> torch.Tensor:
    v = torch.zeros(dim)
    v[i] = 1.0
    return v


def test_queue_is_fifo():
    queue = MoCoQueue(dim=16, size=8)
    initial = torch.arange(8 * 16, dtype=torch.float32).view(8, 16)
    queue.keys.copy_(initial)
    batches = [torch.stack([_onehot(2 * b), _onehot(2 * b + 1)]) for b in range(5)]
    for b in range(4):
        queue.enqueue(batches[b])
    assert int(queue.ptr) == 0
    assert torch.equal(queue.keys, torch.cat(batches[:4]))
    queue.enqueue(batches[4])
    assert torch.equal(queue.keys[:2], batches[4])  # oldest keys overwritten first
    assert torch.equal(queue.keys[2:], torch.cat(batches[1:4]))
    assert int(queue.ptr) == 2


def test_queue_size_must_be_multiple_of_batch():
    with pytest.raises(ValueError, match="multiple"):
        MoCoQueue(dim=4, size=10).enqueue(torch.randn(4, 4))


@pytest.mark.parametrize("size,tau,expected", [(1024, 0.07, 6.397e-4), (1024, 0.7, 5.5070), (8, 0.7, 1.0706)])
def test_loss_with_orthogonal_queue(size, tau, expected):
    loss_fn = VolumetricMoCoLoss(dim=2048, queue_size=size, temperature=tau)
    loss_fn.queue.keys.copy_(torch.eye(2048)[1 : size + 1])  # all orthogonal to e_1 (= index 0)
    q = _onehot(0, 2048)[None]
    loss = loss_fn(q, q.clone())
    assert math.isclose(float(loss), math.log(1 + size * math.exp(-1 / tau)), rel_tol=1e-4)
    assert math.isclose(float(loss), expected, rel_tol=2e-4)


def test_loss_uses_queue_before_enqueue():
    loss_fn = VolumetricMoCoLoss(dim=16, queue_size=8, temperature=0.7)
    loss_fn.queue.keys.copy_(torch.eye(16)[1:9])
    q = _onehot(0)[None]
    loss = loss_fn(q, q.clone())
    assert math.isclose(float(loss), 1.0706, rel_tol=2e-4)  # log(1 + 8 e^{-1/0.7})
    assert not math.isclose(float(loss), math.log(2 + 7 * math.exp(-1 / 0.7)), rel_tol=1e-2)  # key already queued
    assert torch.equal(loss_fn.queue.keys[0], _onehot(0)) and int(loss_fn.queue.ptr) == 1


def test_loss_matches_hand_value_on_tiny_batch():
    """B = 2, K = 2 in 2D; other keys of the batch are NOT negatives (MoCo), only the queue."""
    loss_fn = VolumetricMoCoLoss(dim=2, queue_size=2, temperature=0.5)
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    loss_fn.queue.keys.copy_(queue)
    q = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # cosine similarity: scale does not matter
    k = torch.tensor([[1.0, 0.0], [0.6, 0.8]])
    # row 0: q = (0.6, 0.8): s+ = 0.6, negatives 0.8, -0.6; row 1: q = (1, 0): s+ = 0.6, negatives 0, -1
    row0 = -math.log(math.exp(0.6 / 0.5) / (math.exp(0.6 / 0.5) + math.exp(0.8 / 0.5) + math.exp(-0.6 / 0.5)))
    row1 = -math.log(math.exp(0.6 / 0.5) / (math.exp(0.6 / 0.5) + math.exp(0.0) + math.exp(-1.0 / 0.5)))
    assert math.isclose(float(loss_fn(q, k)), (row0 + row1) / 2, rel_tol=1e-5)
    assert torch.allclose(loss_fn.queue.keys, k)


def test_momentum_update_is_exact_and_gradient_free():
    torch.manual_seed(0)
    query = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    key = make_key_encoder(query)
    with torch.no_grad():
        for p in query.parameters():
            p.add_(torch.randn_like(p))
    old = [p.clone() for p in key.parameters()]
    momentum_update(key, query, 0.99)
    for pk, pk_old, pq in zip(key.parameters(), old, query.parameters(), strict=True):
        assert torch.allclose(pk, 0.99 * pk_old + 0.01 * pq, atol=1e-7, rtol=0)
        assert not pk.requires_grad
    loss_fn = VolumetricMoCoLoss(dim=3, queue_size=4, temperature=0.7)
    x = torch.randn(2, 4)
    loss_fn(query(x), key(x)).backward()
    assert all(p.grad is None for p in key.parameters())
    assert not loss_fn.queue.keys.requires_grad
    assert all(p.grad is not None for p in query.parameters())


class _ConstantFlow(nn.Module):
    """Stand-in registration network returning a fixed displacement (and one trainable parameter)."""

    def __init__(self, shift: float) -> None:
        super().__init__()
        self.shift = shift
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        ddf = torch.zeros(pair.shape[0], 3, *pair.shape[2:])
        ddf[:, 0] = self.shift * self.weight
        return ddf


def test_positive_key_warps_onto_anatomy_with_frozen_network():
    torch.manual_seed(0)
    moving = torch.rand(1, 1, 6, 5, 4) * 2 - 1
    anatomy = torch.rand(1, 1, 6, 5, 4) * 2 - 1
    zero = freeze(_ConstantFlow(0.0))
    assert (warp_to_anatomy(zero, moving, anatomy) - moving).abs().max() < 1e-4
    one = freeze(_ConstantFlow(1.0))
    warped = warp_to_anatomy(one, moving, anatomy)
    assert (warped[:, :, :-1] - moving[:, :, 1:]).abs().max() < 1e-4  # new position p + phi(p), phi = +1 along D
    assert not one.weight.requires_grad and float(one.weight) == 1.0
