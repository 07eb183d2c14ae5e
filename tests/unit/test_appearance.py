"""AdaIN closed-form statistics, appearance-model geometry preservation, style encoder and latent critic."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from common.losses.image_similarity import SSIML1Loss
from common.networks.appearance import AdaIN, AppearanceModel, LatentDiscriminator, StyleEncoder


def _randomised_adain(seed: int = 0) -> tuple[AdaIN, torch.Tensor]:
    torch.manual_seed(seed)
    block = AdaIN(4, style_dim=128)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0.0, 0.1)
    return block, torch.randn(1, 128)


def test_adain_output_has_style_statistics():
    block, m = _randomised_adain()
    h = 3.0 + 2.0 * torch.randn(1, 4, 16, 16, 16)
    out = block(h, m)
    # independent closed form: gamma, beta are the affine maps of m; unbiased spatial variance v_c of h
    gamma = m @ block.gamma.weight.T + block.gamma.bias
    beta = m @ block.beta.weight.T + block.beta.bias
    v = h.flatten(2).var(dim=2, unbiased=True)
    expected_std = (1 + gamma).abs() * torch.sqrt(v / (v + 1e-5))
    assert torch.allclose(out.flatten(2).mean(dim=2), beta, atol=1e-4)
    assert torch.allclose(out.flatten(2).std(dim=2, unbiased=True), expected_std, rtol=1e-4, atol=0)
    assert (gamma.abs() > 0.05).all() and (beta.abs() > 0.05).all()  # the check is not trivially instance norm


def test_adain_removes_content_statistics():
    block, m = _randomised_adain(1)
    h = 3.0 + 2.0 * torch.randn(1, 4, 16, 16, 16)
    a = torch.empty(1, 4, 1, 1, 1).uniform_(0.5, 2.0)
    b = torch.empty(1, 4, 1, 1, 1).uniform_(-5.0, 5.0)
    assert (block(h, m) - block(a * h + b, m)).abs().max() < 1e-3


def test_adain_initialisation_is_instance_norm():
    torch.manual_seed(0)
    block = AdaIN(8, style_dim=128)
    m = F.normalize(torch.randn(3, 128), dim=1) * 10.0
    scale, shift = block.scale_shift(m)
    assert (scale - 1).abs().max() < 1e-2 and shift.abs().max() < 1e-2


def _phantom(intensities: tuple[float, float, float]) -> tuple[torch.Tensor, torch.Tensor]:
    label = torch.zeros(1, 1, 16, 16, 16, dtype=torch.long)
    label[..., 3:13, 3:13, 3:13] = 1
    label[..., 6:10, 5:11, 7:12] = 2
    table = torch.tensor(intensities)
    return table[label], label


def test_appearance_model_with_own_style_keeps_geometry():
    """After a short fit (identity with its own code, restyling with another), A(x, c_x) and A(x, c_y) both keep
    x's label regions: the nearest-intensity segmentation of the output matches x's labels."""
    torch.manual_seed(0)
    table_x, table_y = (-1.0, 0.8, 0.0), (-1.0, 0.0, 0.8)  # same anatomy, contrast of labels 1 and 2 swapped
    x, label = _phantom(table_x)
    y, _ = _phantom(table_y)
    codes = F.normalize(torch.randn(2, 8), dim=1)
    model = AppearanceModel(features=4, style_dim=8, num_res_blocks=1)
    loss_fn = SSIML1Loss(win_size=5)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    inputs, targets = torch.cat([x, x]), torch.cat([x, y])
    for _ in range(200):
        loss = loss_fn(model(inputs, codes), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        own, other = model(x, codes[:1]), model(x, codes[1:])
    for out, table in ((own, table_x), (other, table_y)):
        nearest = (out[..., None] - torch.tensor(table)).abs().argmin(dim=-1)
        for k in (1, 2):
            p, g = nearest == k, label == k
            dice = 2 * (p & g).sum() / (p.sum() + g.sum())
            assert dice > 0.9, (k, float(dice))


def test_style_encoder_codes_are_unit_norm_and_shapes():
    torch.manual_seed(0)
    enc = StyleEncoder(spatial_size=(32, 32, 16), channels=(8, 16, 16), strides=(4, 2, (2, 2, 1)), style_dim=12)
    assert enc.latent_shape == (64, 2, 2, 2)
    codes = enc(torch.rand(2, 1, 32, 32, 16) * 2 - 1)
    assert codes.shape == (2, 12)
    assert torch.allclose(codes.norm(dim=1), torch.ones(2), atol=1e-5)


def test_style_encoder_paper_shapes():
    enc = StyleEncoder(spatial_size=(128, 160, 160))
    assert enc.latent_shape == (64, 4, 5, 5)
    assert enc.head[0].in_features == 6400


def test_latent_discriminator_parameter_count():
    d = LatentDiscriminator(128, 128, 5)
    assert sum(p.numel() for p in d.parameters()) == 5 * (128 * 128 + 128) + 129
    assert d(torch.randn(3, 128)).shape == (3, 1)


def test_appearance_model_anisotropic_strides_keep_shape():
    model = AppearanceModel(features=2, style_dim=4, num_res_blocks=1, strides=((2, 2, 1), (2, 2, 1)))
    x = torch.rand(1, 1, 16, 12, 3) * 2 - 1
    assert model(x, F.normalize(torch.randn(1, 4), dim=1)).shape == x.shape
    assert model.down[0][1].stride == (2, 2, 1)
