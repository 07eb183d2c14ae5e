"""CLMorphNet: shapes, siamese sharing, sampling, integration, warping conventions, BYOL target update."""

from __future__ import annotations

import pytest
import torch

from common.networks.clmorph import CLMorphNet, MonaiVoxelMorph
from common.registration.fields import warp, warp_labels

SMALL = {"encoder_channels": (4, 8, 8, 8), "decoder_channels": (8, 8, 8, 8, 8, 4, 4), "projection_dim": 16}


def _net(**kwargs) -> CLMorphNet:
    torch.manual_seed(0)
    return CLMorphNet(**{**SMALL, **kwargs})


def test_shapes_with_odd_axis():
    net = _net().eval()
    moving, fixed = torch.randn(1, 1, 16, 21, 16), torch.randn(1, 1, 16, 21, 16)
    mean, log_var, feats_m, _ = net.velocity(moving, fixed)
    assert mean.shape == log_var.shape == (1, 3, 16, 21, 16)
    assert [f.shape[2:] for f in feats_m] == [(8, 11, 8), (4, 6, 4), (2, 3, 2), (1, 2, 1)]
    assert net(torch.cat([moving, fixed], 1)).shape == (1, 3, 16, 21, 16)
    out = net.train().forward_train(moving, fixed)
    assert out["proj_moving"].shape == (1, 16) and out["ddf"].shape == (1, 3, 16, 21, 16)


def test_decoder_concatenates_both_branches():
    net = _net()
    # first decoder block sees concat(f4(x), f4(y)); the next ones add the upsampled decoder channels
    assert net.decoder[0][0].in_channels == 2 * 8
    assert net.decoder[1][0].in_channels == 8 + 2 * 8
    assert net.decoder[-1][0].in_channels == 8 + 2 * 1  # full resolution: decoder + (x, y)


def test_initialisation():
    net = _net()
    mean, log_var, _, _ = net.eval().velocity(torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16))
    assert torch.allclose(log_var, torch.full_like(log_var, -10.0), atol=1e-4)
    assert float(mean.abs().max()) < 1e-2
    bn_weights = torch.cat([m.weight for m in net.modules() if isinstance(m, torch.nn.BatchNorm3d)])
    assert 0.03 < float(bn_weights.std()) < 0.2  # N(0, 0.1) as written in the paper


def test_siamese_encoder_shared_and_symmetric():
    net = _net().eval()
    x, y = torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16)
    _, _, fx, fy = net.velocity(x, y)
    _, _, gy, gx = net.velocity(y, x)
    for a, b in zip(fx + fy, gx + gy, strict=True):
        assert torch.equal(a, b)
    # one module: a single optimiser step changes "both branches" because there is only one set of weights
    names = [n for n, _ in net.named_parameters() if n.startswith("encoder.")]
    assert names and not any("target" in n for n in names)


def test_eval_is_deterministic_and_train_samples():
    net = _net()
    pair = torch.randn(1, 2, 16, 16, 16)
    net.eval()
    assert torch.equal(net(pair), net(pair))
    torch.manual_seed(1)
    assert not torch.equal(net(pair, sample=True), net(pair))


def test_reparameterised_sample_variance():
    torch.manual_seed(0)
    mean = torch.randn(1, 3, 6, 6, 6)
    log_var = torch.full_like(mean, torch.log(torch.tensor(0.25)))
    draws = torch.stack([CLMorphNet.sample(mean, log_var) - mean for _ in range(1000)])
    assert float(draws.var()) == pytest.approx(0.25, rel=0.05)


def test_zero_velocity_gives_identity():
    net = _net()
    zero = torch.zeros(1, 3, 12, 12, 12)
    assert float(net.integrate(zero).abs().max()) < 1e-6
    image = torch.randn(1, 1, 12, 12, 12)
    assert float((warp(image, net.integrate(zero)) - image).abs().max()) < 1e-3
    labels = torch.randint(0, 5, (1, 1, 12, 12, 12))
    assert torch.equal(warp_labels(labels, net.integrate(zero)), labels)


@pytest.mark.parametrize("int_downsize", [1, 2])
def test_constant_velocity_integrates_to_constant_displacement(int_downsize):
    net = _net(int_downsize=int_downsize)
    c = torch.tensor([1.5, -2.0, 0.5]).view(1, 3, 1, 1, 1)
    ddf = net.integrate(c.expand(1, 3, 20, 20, 20).clone())
    assert float((ddf - c)[..., 5:-5, 5:-5, 5:-5].abs().max()) < 1e-3


def test_known_translation_warps_label_map():
    labels = torch.zeros(1, 1, 16, 16, 16, dtype=torch.int64)
    labels[:, :, 4:8, 5:9, 6:10] = 3
    shift = torch.zeros(1, 3, 16, 16, 16)
    shift[:, 0] = 2.0  # warped(p) = labels(p + 2 e0): the block moves 2 voxels towards lower indices on axis 0
    expected = torch.zeros_like(labels)
    expected[:, :, 2:6, 5:9, 6:10] = 3
    assert torch.equal(warp_labels(labels, shift), expected)


def test_inverse_ddf_undoes_forward():
    net = _net().eval()
    with torch.no_grad():
        net.mean_head.bias.copy_(torch.tensor([0.8, -0.5, 0.3]))
    pair = torch.randn(1, 2, 16, 16, 16)
    forward, inverse = net(pair), net.inverse_ddf(pair)
    composed = inverse + warp(forward, inverse)  # warp by inverse then forward = identity
    assert float(composed[..., 4:-4, 4:-4, 4:-4].abs().mean()) < 0.05


def test_byol_target_follows_online_by_ema():
    net = _net(byol=True)
    out = net.train().forward_train(torch.randn(2, 1, 16, 16, 16), torch.randn(2, 1, 16, 16, 16))
    assert {"pred_moving", "target_fixed"} <= set(out)
    assert not any(p.requires_grad for p in net.target_encoder.parameters())
    online = net.encoder.levels[0][0].weight
    target = net.target_encoder.levels[0][0].weight
    with torch.no_grad():
        online.add_(1.0)
    before = target.clone()
    net.update_target(0.9)
    assert torch.allclose(target, 0.9 * before + 0.1 * online)


def test_monai_voxelmorph_wrapper():
    torch.manual_seed(0)
    net = MonaiVoxelMorph().eval()
    ddf = net(torch.randn(1, 2, 16, 16, 16))
    assert ddf.shape == (1, 3, 16, 16, 16)
    assert set(net.forward_train(torch.randn(1, 1, 16, 16, 16), torch.randn(1, 1, 16, 16, 16))) == {"ddf"}
