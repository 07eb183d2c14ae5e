"""AtlasSegmentationNet: label maps from known fields, weights that load as the registration network's, trace export."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from common.registration.atlas_segmenter import AtlasSegmentationNet

SHAPE = (12, 10, 8)
NUM_LABELS = 4


def _atlas() -> tuple[torch.Tensor, torch.Tensor]:
    """Image and label map ``[1, *SHAPE]``: three blocks (labels 1-3) on background 0."""
    label = torch.zeros(1, *SHAPE, dtype=torch.int64)
    label[:, 2:6, 1:5, 1:4] = 1
    label[:, 6:10, 3:8, 2:6] = 2
    label[:, 1:4, 6:9, 4:7] = 3
    return label.float() * 0.5, label


class ConstantFieldNet(nn.Module):
    """Registration stand-in: a 1x1x1 convolution with zero weights, so its field is the bias everywhere.

    ``shift`` voxels along axis 0; the inverse transfer (``inverse_ddf``) gets the negated field.
    """

    def __init__(self, shift: float = 0.0) -> None:
        super().__init__()
        self.head = nn.Conv3d(2, 3, 1)
        with torch.no_grad():
            self.head.weight.zero_()
            self.head.bias.copy_(torch.tensor([shift, 0.0, 0.0]))

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.head(pair)

    def inverse_ddf(self, pair: torch.Tensor) -> torch.Tensor:
        return -self.head(pair)


class Pipeline(nn.Module):
    """A registration network whose only weights are a sub-network's (like CSTRegistrationNet's ``feature_net``)."""

    def __init__(self) -> None:
        super().__init__()
        self.feature_net = ConstantFieldNet()

    def forward(self, pair: torch.Tensor) -> torch.Tensor:
        return self.feature_net(pair)


def _segmenter(network: nn.Module, **kwargs) -> AtlasSegmentationNet:
    image, label = _atlas()
    return AtlasSegmentationNet(network, {"image": image, "label": label}, NUM_LABELS, **kwargs).eval()


def _subject() -> torch.Tensor:
    return torch.rand(1, 1, *SHAPE, generator=torch.Generator().manual_seed(0))


def test_identity_field_gives_the_atlas_labels():
    out = _segmenter(ConstantFieldNet(0.0))(_subject())
    assert out.shape == (1, NUM_LABELS, *SHAPE)
    torch.testing.assert_close(out.sum(1), torch.ones(1, *SHAPE))
    assert torch.equal(out.argmax(1), _atlas()[1])


@pytest.mark.parametrize("direction, field", [("atlas_to_subject", 2), ("inverse", -2)])
def test_known_shift_moves_the_labels(direction, field):
    """Field u = (field, 0, 0): warped(p) = atlas(p + u), so the labels move by -field along axis 0 (zeros enter)."""
    label = _atlas()[1]
    expected = torch.zeros_like(label)
    if field > 0:
        expected[:, : SHAPE[0] - field] = label[:, field:]
    else:
        expected[:, -field:] = label[:, : SHAPE[0] + field]
    with torch.no_grad():
        out = _segmenter(ConstantFieldNet(2.0), direction=direction)(_subject())
    assert torch.equal(out.argmax(1), expected)
    assert not torch.equal(expected, label)


def test_other_input_grid_resamples_the_atlas():
    """An input at half the atlas grid: the atlas labels come back nearest-neighbour downsampled (every 2nd voxel)."""
    with torch.no_grad():
        out = _segmenter(ConstantFieldNet(0.0))(torch.rand(1, 1, *(n // 2 for n in SHAPE)))
    assert torch.equal(out.argmax(1), _atlas()[1][:, ::2, ::2, ::2])


def test_state_dict_is_the_registration_networks():
    network = ConstantFieldNet(1.0)
    segmenter = _segmenter(network)
    assert list(segmenter.state_dict()) == list(network.state_dict()) == ["head.weight", "head.bias"]
    other = {k: torch.full_like(v, 3.0) for k, v in network.state_dict().items()}
    segmenter.load_state_dict(other, strict=True)
    assert torch.equal(network.head.bias, torch.full((3,), 3.0))
    # nested (DataParallel / DDP style "module." prefix) the keys follow the same rule
    wrapped = nn.ModuleDict({"module": segmenter})
    assert list(wrapped.state_dict()) == ["module.head.weight", "module.head.bias"]
    wrapped.load_state_dict({f"module.{k}": v * 2 for k, v in other.items()})
    assert torch.equal(network.head.bias, torch.full((3,), 6.0))


def test_state_module_exposes_only_the_sub_networks_keys():
    pipeline = Pipeline()
    segmenter = _segmenter(pipeline, state_module="feature_net")
    assert list(segmenter.state_dict()) == list(pipeline.feature_net.state_dict())
    with pytest.raises(AttributeError):
        _segmenter(pipeline, state_module="missing")


def test_bundle_loaders_read_a_plain_registration_checkpoint(tmp_path):
    """The file training writes (a plain state_dict) loads through every loader a bundle tool uses."""
    from ignite.handlers import Checkpoint
    from monai.networks.utils import copy_model_state

    from common.engines.checkpoint import load_weights

    trained = ConstantFieldNet(2.0)
    path = tmp_path / "model.pt"
    torch.save(trained.state_dict(), path)
    for load in (
        lambda net: net.load_state_dict(torch.load(path), strict=True),  # MONAI Label
        lambda net: load_weights(net, path),
        lambda net: Checkpoint.load_objects(to_load={"": net}, checkpoint=str(path)),  # ckpt_export, CheckpointLoader
        lambda net: copy_model_state(dst=net, src=torch.load(path)),
    ):
        segmenter = _segmenter(ConstantFieldNet(0.0))
        load(segmenter)
        torch.testing.assert_close(segmenter.network.head.bias, trained.head.bias)


def test_trace_export_reproduces_eager():
    segmenter = _segmenter(ConstantFieldNet(1.0))
    subject = _subject()
    with torch.no_grad():
        eager = segmenter(subject)
        traced = torch.jit.trace(segmenter, subject)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    buffer.seek(0)
    loaded = torch.jit.load(buffer)  # the atlases travel inside the exported file
    with torch.no_grad():
        torch.testing.assert_close(loaded(subject), eager)


def test_label_outside_num_labels_is_named():
    image, label = _atlas()
    label[0, 0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\].*num_labels=4.*at least 8"):
        AtlasSegmentationNet(ConstantFieldNet(), {"image": image, "label": label}, NUM_LABELS)
