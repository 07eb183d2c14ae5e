"""Adam instance optimisation (common.registration.instance_opt)."""

import torch
import torch.nn.functional as F

from common.registration import fields
from common.registration.convex import box_filter
from common.registration.instance_opt import adam_refine, diffusion_regulariser


def features(shape=(12, 10, 14), channels=8, seed=0) -> torch.Tensor:
    x = box_filter(torch.randn(1, channels, *shape, generator=torch.Generator().manual_seed(seed)), 2)
    return x / x.std()


def straightforward_refine(feat_fixed, feat_moving, ddf, reg_fac, iterations, prestep=True):
    """The same optimisation written plainly (avg_pool3d smoothing, slices, autograd everywhere)."""
    grid = feat_fixed.shape[2:]
    theta = (F.interpolate(ddf, size=grid, mode="trilinear", align_corners=False) / 2).requires_grad_(True)
    optimiser = torch.optim.Adam([theta], lr=1.0)

    def smooth(x):
        for _ in range(3):
            x = F.avg_pool3d(x, 3, stride=1, padding=1)
        return x

    for _ in range(iterations):
        optimiser.zero_grad()
        phi = smooth(theta)
        reg = sum(((phi.narrow(d, 1, n - 1) - phi.narrow(d, 0, n - 1)) ** 2).mean() for d, n in zip((2, 3, 4), grid))
        sampled = F.grid_sample(feat_moving, fields.to_sampling_grid(phi), align_corners=True, padding_mode="zeros")
        loss = 12 * ((sampled - feat_fixed) ** 2).mean() + reg_fac * 0.65 * reg
        loss.backward()
        optimiser.step()
    if not prestep:
        phi = smooth(theta)
    up = F.interpolate(phi.detach() * 2, size=ddf.shape[2:], mode="trilinear", align_corners=False)
    return smooth(up)


def test_matches_a_straightforward_implementation():
    fixed, moving = features(seed=1), features(seed=2)
    ddf = box_filter(torch.randn(1, 3, 24, 20, 28, generator=torch.Generator().manual_seed(3)), 3)
    for prestep in (True, False):
        mine = adam_refine(fixed, moving, ddf, reg_fac=1.0, iterations=10, return_prestep=prestep)
        plain = straightforward_refine(fixed, moving, ddf, 1.0, 10, prestep)
        torch.testing.assert_close(mine, plain, atol=1e-4, rtol=1e-4)


def test_prestep_returns_the_field_before_the_last_update():
    fixed, moving = features(seed=4), features(seed=5)
    ddf = torch.zeros(1, 3, 24, 20, 28)
    pre = adam_refine(fixed, moving, ddf, iterations=5, return_prestep=True)
    post4 = adam_refine(fixed, moving, ddf, iterations=4, return_prestep=False)
    torch.testing.assert_close(pre, post4)  # 5 iterations, last update not returned == 4 updates
    assert (adam_refine(fixed, moving, ddf, iterations=5, return_prestep=False) - pre).abs().max() > 1e-4


def test_moves_towards_a_known_shift():
    fixed = features((16, 16, 16), 8, 6)
    moving = torch.roll(fixed, 1, dims=3)  # moving(p) = fixed(p - e_1): the field is +1 feature voxel = +2 voxels
    refined = adam_refine(fixed, moving, torch.zeros(1, 3, 32, 32, 32), reg_fac=0.1, iterations=30)
    inner = refined[(..., *[slice(10, -10)] * 3)]
    assert 1.0 < inner[:, 1].mean() < 2.5
    assert inner[:, [0, 2]].abs().mean() < 0.2


def test_batch_pairs_are_optimised_independently():
    f1, m1, f2, m2 = (features(seed=s) for s in (7, 8, 9, 10))
    ddf = torch.zeros(2, 3, 24, 20, 28)
    batch = adam_refine(torch.cat([f1, f2]), torch.cat([m1, m2]), ddf, iterations=5)
    single = adam_refine(f1, m1, ddf[:1], iterations=5)
    torch.testing.assert_close(batch[:1], single, atol=1e-5, rtol=1e-5)


def test_diffusion_regulariser_of_a_linear_ramp():
    field = torch.zeros(1, 3, 4, 5, 6)
    field[:, 0] = 0.5 * torch.arange(5.0).view(1, 5, 1)  # slope 0.5 along axis 1 in channel 0
    # one of the three channels has squared differences 0.25 along axis 1: mean over all channels = 0.25 / 3
    torch.testing.assert_close(diffusion_regulariser(field), torch.tensor([0.25 / 3]))
