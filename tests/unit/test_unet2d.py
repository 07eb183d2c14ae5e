"""UNet2D and its contrastive heads: shapes from the spec, stage-2 freezing and fine-tuning initialisation."""

import pytest
import torch

from common.engines.checkpoint import CheckpointMismatchError
from common.networks.unet2d import (
    GlobalProjectionHead,
    LocalContrastiveModel,
    LocalProjectionHead,
    UNet2D,
    load_pretrained_parts,
)


def test_shapes_192():
    torch.manual_seed(0)
    net = UNet2D(1, 4).eval()
    x = torch.randn(1, 1, 192, 192)
    with torch.no_grad():
        bottleneck, skips = net.encode(x)
        assert bottleneck.shape == (1, 128, 6, 6)
        assert [tuple(s.shape[1:]) for s in skips] == [
            (16, 192, 192),
            (32, 96, 96),
            (64, 48, 48),
            (128, 24, 24),
            (128, 12, 12),
        ]
        assert bottleneck.flatten(1).shape[1] == 4608
        assert net.decode(bottleneck, skips, 3).shape == (1, 64, 48, 48)
        assert net(x).shape == (1, 4, 192, 192)
        assert GlobalProjectionHead(4608)(bottleneck).shape == (1, 128)
        assert LocalProjectionHead(64)(net.decode(bottleneck, skips, 3)).shape == (1, 64, 48, 48)
    with pytest.raises(ValueError):
        net(torch.randn(1, 1, 40, 40))


def test_torchscript_matches_eager():
    net = UNet2D(1, 3).eval()
    x = torch.randn(2, 1, 32, 64)
    assert torch.allclose(torch.jit.script(net)(x), net(x), atol=1e-5)


def test_stage2_freezing_and_region_embeddings():
    torch.manual_seed(1)
    unet = UNet2D(1, 4)
    model = LocalContrastiveModel(unet, LocalProjectionHead(unet.decoder_channels(3)), num_decoder_blocks=3)
    enc_before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    dec_before = {k: v.clone() for k, v in unet.decoder[2].state_dict().items()}
    d4_before = {k: v.clone() for k, v in unet.decoder[3].state_dict().items()}
    head_before = {k: v.clone() for k, v in model.head.state_dict().items()}
    opt = torch.optim.Adam(model.trainable_parameters(), lr=1e-2)
    model.train()
    out = model(torch.randn(4, 1, 64, 64))
    assert out.shape == (4, 13, 128)  # 16x16 map, 3x3 regions, projected to 128
    out.square().mean().backward()
    opt.step()
    # encoder weights and (eval-mode) running statistics are bit-identical; d1..d3 and g2 changed; d4 untouched
    assert all(torch.equal(v, unet.encoder.state_dict()[k]) for k, v in enc_before.items())
    assert any(not torch.equal(v, unet.decoder[2].state_dict()[k]) for k, v in dec_before.items())
    assert any(not torch.equal(v, model.head.state_dict()[k]) for k, v in head_before.items())
    assert all(torch.equal(v, unet.decoder[3].state_dict()[k]) for k, v in d4_before.items())
    assert not unet.encoder.training and unet.decoder.training


def test_finetune_initialisation_loads_only_encoder_and_first_blocks(tmp_path):
    torch.manual_seed(2)
    pre = UNet2D(1, 4)
    torch.save(pre.state_dict(), tmp_path / "model_local.pt")
    torch.manual_seed(3)
    fine = UNet2D(1, 4)
    fresh = {k: v.clone() for k, v in fine.state_dict().items()}
    loaded = load_pretrained_parts(fine, tmp_path / "model_local.pt", num_decoder_blocks=3)
    state, pre_state = fine.state_dict(), pre.state_dict()
    for k in state:
        if k.startswith(("encoder.", "decoder.0.", "decoder.1.", "decoder.2.")):
            assert torch.equal(state[k], pre_state[k]) and k in loaded
        else:
            assert torch.equal(state[k], fresh[k]) and k not in loaded
    assert any(k.startswith("head.") for k in state) and not any(k.startswith("head.") for k in loaded)
    with pytest.raises(CheckpointMismatchError, match="model_local.pt"):
        load_pretrained_parts(UNet2D(1, 4, channels=(8, 16, 32, 64, 64, 64)), tmp_path / "model_local.pt", 1)
