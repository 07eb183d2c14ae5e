"""SST stage logic: joint-step gradient routing, generation with a known field, latent-mix sampling, jitter."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from common.data.validate import load_nifti
from common.engines.sst import (
    FlowDataset,
    JointTrainer,
    RandomPairDataset,
    SSTData,
    StageWeightSaver,
    color_jitter,
    generate_pairs,
    load_stage_weights,
    sample_flow_codes,
)
from common.losses.moco import VolumetricMoCoLoss, freeze, make_key_encoder
from common.networks.appearance import AppearanceModel, LatentDiscriminator, StyleEncoder
from common.networks.flow_aae import FlowAAE
from common.networks.sst_registration import FlowNet

SIZE = (16, 16, 16)


def _joint(style_code_source: str = "key") -> JointTrainer:
    torch.manual_seed(0)
    enc = StyleEncoder(SIZE, channels=(4, 8), strides=(4, 2), style_dim=8, hidden_dim=8)
    loader = DataLoader(RandomPairDataset([torch.rand(1, *SIZE) for _ in range(3)], 2, shared_jitter=False), 1)
    app = AppearanceModel(features=2, style_dim=8, num_res_blocks=1)
    flow = FlowNet(channels=(4, 4, 4, 4), final_channels=(4,))
    disc = LatentDiscriminator(8, 8, 2)
    return JointTrainer(
        "cpu",
        1,
        loader,
        style_encoder=enc,
        key_encoder=make_key_encoder(enc),
        moco_loss=VolumetricMoCoLoss(8, 4),
        registration_net=freeze(FlowNet(channels=(4, 4, 4, 4), final_channels=(4,))),
        discriminator=disc,
        appearance=app,
        flow_net=flow,
        optimizer=torch.optim.Adam([*enc.parameters(), *app.parameters(), *flow.parameters()], 1e-3),
        d_optimizer=torch.optim.Adam(disc.parameters(), 1e-3, betas=(0.5, 0.999)),
        style_code_source=style_code_source,
    )


@pytest.mark.parametrize("source,expect_zero", [("key", True), ("query", False)])
def test_joint_gradient_routing(source, expect_zero):
    trainer = _joint(source)
    s, t = torch.rand(1, 1, *SIZE) * 2 - 1, torch.rand(1, 1, *SIZE) * 2 - 1
    weighted = trainer.losses(s, t)["weighted"]
    grads = torch.autograd.grad(weighted, list(trainer.style_encoder.parameters()), allow_unused=True)
    total = sum(float(g.abs().sum()) for g in grads if g is not None)
    assert (total == 0.0) == expect_zero


def test_joint_step_updates_models_and_ema():
    trainer = _joint("key")
    before = {
        name: [p.detach().clone() for p in m.parameters()]
        for name, m in (("A", trainer.appearance), ("F", trainer.flow_net), ("Eq", trainer.style_encoder))
    }
    key_before = [p.detach().clone() for p in trainer.key_encoder.parameters()]
    trainer.run()  # 2 iterations
    assert trainer.state.iteration == 2
    for name, module in (("A", trainer.appearance), ("F", trainer.flow_net), ("Eq", trainer.style_encoder)):
        assert any(not torch.equal(a, b) for a, b in zip(before[name], module.parameters(), strict=True)), name
    # the key encoder only follows the EMA (exactness is tested in test_moco) and never receives a gradient
    assert any(not torch.equal(a, b) for a, b in zip(key_before, trainer.key_encoder.parameters(), strict=True))
    assert all(p.grad is None for p in trainer.key_encoder.parameters())


class _FixedFlowAAE(FlowAAE):
    """AAE whose generator returns a known field: +2 voxels along axis 1 (so out[:, j] = in[:, j + 2])."""

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        ddf = torch.zeros(z.shape[0], 3, *SIZE)
        ddf[:, 1] = 2.0
        return ddf


def _atlas() -> SSTData:
    label = torch.zeros(1, *SIZE, dtype=torch.long)
    label[0, 4:12, 3:10, 5:11] = 1
    label[0, 6:9, 6:8, 6:9] = 2
    image = torch.tensor([0.2, 0.6, 0.9])[label].float()
    return SSTData(image, label, "atlas", np.eye(4), [image.clone()], ["a"], {1: "one", 2: "two"})


def test_generated_labels_follow_the_image_field(tmp_path):
    data = _atlas()
    aae = _FixedFlowAAE(encoder_channels=(4,), decoder_channels=(4, 4), latent_channels=2)
    path = generate_pairs(data, None, aae, tmp_path, num_pairs=2, style_dim=8, grid_size=2, seed=3)
    listing = json.loads(path.read_text())
    assert len(listing["training"]) == 2 and listing["labels"]["2"] == "two"
    image = load_nifti(tmp_path / listing["training"][0]["image"])[0]
    label = load_nifti(tmp_path / listing["training"][0]["label"])[0]
    # independent expectation: shift by 2 along axis 1, last 2 rows from the border (image) / zero (labels)
    base_img, base_lab = data.base_image[0].numpy(), data.base_label[0].numpy()
    assert np.allclose(image[:, :-2], base_img[:, 2:], atol=1e-5)
    assert np.array_equal(label[:, :-2], base_lab[:, 2:]) and not label[:, -2:].any()
    assert (tmp_path / "generation_grid.png").stat().st_size > 0


def test_generation_with_zero_field_and_label_mask(tmp_path):
    class _ZeroFlowAAE(_FixedFlowAAE):
        def decode(self, z):
            return torch.zeros(z.shape[0], 3, *SIZE)

    data = _atlas()
    data.base_image[0, 0, 0, 0] = -0.5  # stored as 0 in [0, 1] -> below the 0.01 mask threshold
    data.base_label[0, 0, 0, 0] = 1
    app = AppearanceModel(features=2, style_dim=8, num_res_blocks=1)
    aae = _ZeroFlowAAE(encoder_channels=(4,), decoder_channels=(4, 4), latent_channels=2)
    path = generate_pairs(data, app, aae, tmp_path, num_pairs=1, style_dim=8, grid_size=1, seed=0)
    entry = json.loads(path.read_text())["training"][0]
    image, label = load_nifti(tmp_path / entry["image"])[0], load_nifti(tmp_path / entry["label"])[0]
    generator = torch.Generator().manual_seed(0)
    torch.randn(1, *aae.latent_shape(SIZE), generator=generator)  # generate_pairs draws the flow code first
    style = torch.nn.functional.normalize(torch.randn(1, 8, generator=generator), dim=1)
    with torch.no_grad():
        expected = (app(data.base_image[None] * 2 - 1, style) * 0.5 + 0.5)[0, 0].clamp(0, 1).numpy()
    expected_label = data.base_label[0].numpy() * (expected >= 0.01)
    assert np.allclose(image, expected, atol=1e-4)
    assert np.array_equal(label, expected_label)


def test_latent_mix_without_mixing_reproduces_autoencoding():
    torch.manual_seed(0)
    aae = FlowAAE(encoder_channels=(4,), decoder_channels=(4, 4), latent_channels=2)
    flows = [torch.randn(3, *SIZE) for _ in range(3)]
    codes = sample_flow_codes(aae, 3, aae.latent_shape(SIZE), "latent-mix", flows, mix=0.0)
    with torch.no_grad():
        expected = aae.encode(torch.stack(flows))
    assert torch.allclose(codes, expected, atol=1e-6)
    with pytest.raises(ValueError, match="latent-mix"):
        sample_flow_codes(aae, 1, aae.latent_shape(SIZE), "latent-mix", None)


def test_flow_dataset_mix_is_a_weighted_mean():
    flows = [torch.full((3, 4, 4, 4), float(v)) for v in (0.0, 1.0, 2.0)]
    ds = FlowDataset(flows, length=30, mix=0.3, seed=0)
    values = [float(ds[i]["flow"].mean()) for i in range(30)]
    assert all(0.0 <= v <= 2.0 for v in values)
    assert float(FlowDataset(flows, mix=0.0)[1]["flow"].mean()) == 1.0


def test_color_jitter_and_pair_ranges():
    x = torch.linspace(0, 1, 27).view(1, 3, 3, 3)
    assert torch.allclose(color_jitter(x, 1.0, 1.0), x)
    y = color_jitter(x, 2.0, 1.0)
    assert float(y.max()) == 1.0 and torch.allclose(y[x <= 0.5], 2 * x[x <= 0.5])
    pair = RandomPairDataset([x, x * 0.5], 4, shared_jitter=True)[0]
    assert pair["source"].min() >= -1 and pair["target"].max() <= 1


def test_stage_weights_roundtrip(tmp_path):
    net = nn.Linear(3, 2)
    StageWeightSaver(tmp_path / "s.pt", {"net": net})()
    other = nn.Linear(3, 2)
    load_stage_weights(tmp_path / "s.pt", {"net": other})
    assert torch.equal(other.weight, net.weight)
    with pytest.raises(FileNotFoundError, match="run stage S9"):
        load_stage_weights(tmp_path / "missing.pt", {"net": other}, stage="stage S9")


def test_ablation_flags_route_gradients():
    """w/o joint optimisation: the flow loss does not reach A; w/o appearance model: A is not used at all."""
    s, t = torch.rand(1, 1, *SIZE) * 2 - 1, torch.rand(1, 1, *SIZE) * 2 - 1
    separate = _joint()
    separate.joint_optimisation = False
    terms = separate.losses(s, t)
    grads = torch.autograd.grad(terms["flow"], list(separate.appearance.parameters()), allow_unused=True)
    assert all(g is None or float(g.abs().sum()) == 0.0 for g in grads)
    assert float(terms["appearance"].detach()) > 0
    joint = _joint()
    grads = torch.autograd.grad(joint.losses(s, t)["flow"], list(joint.appearance.parameters()), allow_unused=True)
    assert any(g is not None and float(g.abs().sum()) > 0 for g in grads)
    no_app = _joint()
    no_app.use_appearance = False
    terms = no_app.losses(s, t)
    assert float(terms["appearance"]) == 0.0
    grads = torch.autograd.grad(terms["weighted"], list(no_app.appearance.parameters()), allow_unused=True)
    assert all(g is None for g in grads)
