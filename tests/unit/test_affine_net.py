"""Learned affine (MONAI GlobalNet encoder, centred head): its output field follows the voxel convention; it trains."""

from __future__ import annotations

import torch

from common.registration import fields
from common.registration.affine import affine_ddf, fit_affine
from common.registration.affine_net import AffineNet
from common.registration.similarity import lncc_loss


def _blobs(shift: float = 0.0, size: int = 32) -> torch.Tensor:
    """Two Gaussian blobs, moved by ``shift`` voxels along axis 0: ``out(p) = base(p - shift e0)``."""
    grid = fields.identity_grid((size, size))[0]
    out = torch.zeros(size, size)
    for (c0, c1), (r0, r1), v in [((12, 14), (4, 6), 1.0), ((19, 9), (3, 3), 0.6)]:
        out += v * torch.exp(-(((grid[0] - shift - c0) / r0) ** 2 + ((grid[1] - c1) / r1) ** 2))
    return out[None, None]


def test_output_is_the_affine_field_of_its_matrix():
    torch.manual_seed(0)
    net = AffineNet(image_size=(16, 16, 8), num_channel_initial=4, depth=2)
    x = torch.rand(2, 2, 16, 16, 8)
    ddf = net(x)
    torch.testing.assert_close(ddf, torch.zeros_like(ddf))  # starts at the identity
    with torch.no_grad():
        net.output_block.fc.weight.normal_(0.0, 1e-2)  # leave the identity: a generic affine per item
    ddf = net(x)
    matrix = net.last_matrix()
    assert matrix.shape == (2, 3, 4) and not torch.allclose(matrix[0], matrix[1])
    torch.testing.assert_close(ddf, affine_ddf(matrix, (16, 16, 8)), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(fit_affine(ddf), matrix, atol=1e-3, rtol=0)


def test_rigid_in_plane_variant_keeps_its_constraints():
    torch.manual_seed(1)
    net = AffineNet(image_size=(16, 16, 8), mode="rigid", frozen_axes=(2,), num_channel_initial=4, depth=2)
    with torch.no_grad():
        net.output_block.fc.weight.normal_(0.0, 1e-1)
    with torch.no_grad():
        ddf = net(torch.rand(1, 2, 16, 16, 8))
    matrix = net.last_matrix()[0].double()
    assert float(matrix[:2, 3].abs().max()) > 0.1  # it did move
    torch.testing.assert_close(matrix[:, :3].T @ matrix[:, :3], torch.eye(3, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(matrix[2], torch.tensor([0.0, 0.0, 1.0, 0.0], dtype=torch.float64))
    assert float(ddf[:, 2].abs().max()) == 0.0


def test_trains_a_few_steps_towards_the_known_shift():
    """moving(p) = fixed(p - 3 e0), so the aligning field is +3 along axis 0 (warped(p) = moving(p + u))."""
    torch.manual_seed(0)
    fixed, moving = _blobs(0.0), _blobs(3.0)
    net = AffineNet(image_size=(32, 32), num_channel_initial=4, depth=2)
    optimiser = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        optimiser.zero_grad()
        ddf = net(torch.cat([moving, fixed], dim=1))
        loss = lncc_loss(fields.warp(moving, ddf), fixed, kernel_size=9).mean()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0] - 0.15, losses
    result = net.register(moving, fixed)
    shift = result.ddf.mean(dim=(2, 3))[0]
    assert 2.0 < float(shift[0]) < 4.0 and abs(float(shift[1])) < 1.0, shift
    torch.testing.assert_close(result.warped, fields.warp(moving, result.ddf))
