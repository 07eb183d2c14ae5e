"""Feature extractor g and the random Adam projection (common.networks.cst_features); spec pitfalls 12 and 15."""

import torch
from torch import nn

from common.networks.cst_features import CSTFeatureNet, load_reference_weights, random_projection
from common.registration.convex import box_filter, coupled_convex, sad_cost_volume


def test_layer_order_and_parameter_count_of_the_reference():
    net = CSTFeatureNet()
    assert len(net) == 16
    assert sum(p.numel() for p in net.parameters()) == 1_165_584
    kinds = [type(m).__name__ for m in net]
    assert kinds == ["Conv3d", "BatchNorm3d", "ReLU"] * 5 + ["Conv3d"]
    assert [net[i].stride for i in (0, 3, 6, 9, 12)] == [(2, 2, 2), (1, 1, 1), (2, 2, 2), (1, 1, 1), (2, 2, 2)]
    assert [net[i].out_channels for i in (0, 3, 6, 9, 12, 15)] == [32, 64, 128, 128, 128, 16]
    assert all(net[i].bias is not None for i in (0, 3, 6, 9, 12, 15))


def test_output_grids_and_adam_features():
    net = CSTFeatureNet().eval()
    image = torch.rand(1, 1, 32, 24, 16)
    with torch.no_grad():
        feats, early = net.features_and_adam_features(image)
        torch.testing.assert_close(feats, net(image))
        torch.testing.assert_close(early, net.adam_features(image))
    assert feats.shape == (1, 16, 4, 3, 2) and early.shape == (1, 64, 16, 12, 8)


def test_reference_checkpoint_loads_strictly(tmp_path):
    """The released weights are a pickled nn.Sequential with keys 0.*..15.*: rebuild one in that layout."""
    torch.manual_seed(0)
    layers = []
    for cin, cout, stride in ((1, 32, 2), (32, 64, 1), (64, 128, 2), (128, 128, 1), (128, 128, 2)):
        layers += [nn.Conv3d(cin, cout, 3, stride=stride, padding=1), nn.BatchNorm3d(cout), nn.ReLU()]
    reference = nn.Sequential(*layers, nn.Conv3d(128, 16, 1))
    torch.save(reference, tmp_path / "final_model.pth")
    torch.save(reference.state_dict(), tmp_path / "state.pt")
    for name in ("final_model.pth", "state.pt"):
        net = load_reference_weights(CSTFeatureNet(), tmp_path / name)
        image = torch.rand(1, 1, 16, 16, 16)
        with torch.no_grad():
            torch.testing.assert_close(net.eval()(image), reference.eval()(image))


def test_random_projection_is_seeded_and_has_the_default_init_bound():
    feats = torch.zeros(1, 64, 2, 2, 2)
    a = random_projection(feats, 32, torch.Generator().manual_seed(3))
    b = random_projection(feats, 32, torch.Generator().manual_seed(3))
    assert a.shape == (32, 64, 1, 1, 1) and torch.equal(a, b)
    assert a.abs().max() <= 1 / 8 and a.abs().max() > 0.1  # U(-1/sqrt(64), 1/sqrt(64))
    conv = nn.Conv3d(64, 32, 1, bias=False)  # PyTorch's default has the same bound
    assert conv.weight.abs().max() <= 1 / 8


def test_stage0_random_features_are_small_and_give_a_soft_argmin():
    """Characterisation (pitfall 12): default init, eval-mode BN with fresh statistics."""
    torch.manual_seed(0)
    net = CSTFeatureNet().eval()
    image = box_filter(torch.rand(1, 1, 64, 64, 64, generator=torch.Generator().manual_seed(1)), 4)
    with torch.no_grad():
        feats = net(image)
        assert 0.005 < feats.std() < 0.2
        cost = sad_cost_volume(5 * feats, 5 * torch.roll(feats, 1, dims=2))
        weights = torch.softmax(-20 * cost, dim=1)
    assert weights.max(dim=1).values.mean() < 0.99  # not one-hot
    field = coupled_convex(cost)
    assert field.abs().max() < 2.0
