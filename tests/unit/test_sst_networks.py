"""SST flow model and flow adversarial auto-encoder: shapes, initial identity, latent sizes."""

from __future__ import annotations

import pytest
import torch

from common.networks.appearance import LatentDiscriminator
from common.networks.flow_aae import FlowAAE
from common.networks.sst_registration import FlowNet


def test_flow_net_shape_and_near_identity_init():
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = FlowNet(channels=(8, 16, 16, 16, 16, 8), final_channels=(8,))
        pair = torch.rand(2, 2, 16, 16, 8) * 2 - 1
        ddf = net(pair)
        assert ddf.shape == (2, 3, 16, 16, 8)
        assert ddf.abs().max() < 0.05
        warped, ddf2 = net.register(pair[:, :1], pair[:, 1:])
        assert torch.allclose(ddf, ddf2) and (warped - pair[:, :1]).abs().max() < 0.05


def test_flow_net_rejects_single_channel():
    with pytest.raises(ValueError, match="moving, fixed"):
        FlowNet(channels=(4, 4, 4, 4)).forward(torch.zeros(1, 1, 8, 8, 8))


def test_flow_aae_shapes():
    aae = FlowAAE(encoder_channels=(4, 8), decoder_channels=(8, 4, 4), latent_channels=6)
    assert aae.latent_shape((32, 16, 8)) == (6, 4, 2, 1)
    z = aae.encode(torch.randn(2, 3, 32, 16, 8))
    assert z.shape == (2, 6, 4, 2, 1)
    assert aae.decode(z).shape == (2, 3, 32, 16, 8)
    with pytest.raises(ValueError, match="divisible"):
        aae.latent_shape((30, 16, 8))
    d = LatentDiscriminator(6 * 4 * 2 * 1, 16, 2)
    assert d(z).shape == (2, 1)


def test_flow_aae_paper_shapes():
    aae = FlowAAE()
    assert aae.latent_shape((128, 160, 160)) == (64, 4, 5, 5)
    assert LatentDiscriminator(6400, 256, 2).net[0].in_features == 6400
