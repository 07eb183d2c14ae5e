"""CLMorph bundle config pieces: pair-consistent augmentation, the paper's LR schedule, ablation overrides."""

from __future__ import annotations

import pytest
import torch
from monai.bundle import ConfigParser
from monai.transforms import Compose

from tests.bundles.harness import BUNDLES_DIR

TRAIN = BUNDLES_DIR / "clmorph_brain_mri_registration" / "configs" / "train.json"


def _parser(**overrides) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(TRAIN))
    parser.update(overrides)
    return parser


def test_augmentation_is_identical_for_both_images_of_a_pair():
    parser = _parser(crop_size=[16, 18, 20])
    augment = Compose(parser.get_parsed_content("train#random_transforms"))
    torch.manual_seed(0)
    volume = torch.rand(1, 24, 26, 28)
    for seed in range(5):
        augment.set_random_state(seed=seed)
        out = augment({"moving_image": volume.clone(), "fixed_image": volume.clone()})
        assert out["moving_image"].shape == (1, 16, 18, 20)
        assert torch.equal(out["moving_image"], out["fixed_image"])


def test_paper_learning_rate_schedule():
    parser = _parser(device="$torch.device('cpu')", encoder_channels=[2, 2, 2, 2], decoder_channels=[2] * 7)
    optimizer = parser.get_parsed_content("optimizer")
    scheduler = parser.get_parsed_content("lr_scheduler")
    lrs = []
    for _ in range(parser.get_parsed_content("epochs")):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert len(lrs) == 200
    for epoch in (0, 19, 20, 45, 199):
        assert lrs[epoch] == pytest.approx(3e-3 * 0.1 ** (epoch // 20), rel=1e-9)
    assert lrs[-1] == pytest.approx(3e-12, rel=1e-9)


@pytest.mark.parametrize(
    "overrides, alpha, beta, contrastive, byol",
    [
        ({}, 1.0, 0.01, "infonce", False),
        ({"alpha": 0.0, "beta": 0.0}, 0.0, 0.0, "infonce", False),
        ({"beta": 0.0}, 1.0, 0.0, "infonce", False),
        ({"alpha": 0.0}, 0.0, 0.01, "infonce", False),
        ({"contrastive": "byol"}, 1.0, 0.01, "byol", True),
    ],
)
def test_ablation_overrides(overrides, alpha, beta, contrastive, byol):
    parser = _parser(encoder_channels=[2, 2, 2, 2], decoder_channels=[2] * 7, **overrides)
    loss = parser.get_parsed_content("loss")
    net = parser.get_parsed_content("network_def")
    assert (loss.alpha, loss.beta, loss.contrastive) == (alpha, beta, contrastive)
    assert net.byol is byol
