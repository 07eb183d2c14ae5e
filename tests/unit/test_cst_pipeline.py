"""Registration network f = h(g) and its pseudo-label / test pipeline (common.registration.cst_pipeline)."""

import torch

from common.networks.cst_features import CSTFeatureNet
from common.registration.cst_pipeline import CSTRegistrationNet, register_pair, standardize_channels

SHAPE = (32, 32, 32)


def network(**kwargs) -> CSTRegistrationNet:
    torch.manual_seed(0)
    return CSTRegistrationNet(CSTFeatureNet(channels=(8, 8, 8, 8, 8)), **kwargs)


def images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(1, 1, *SHAPE, generator=g), torch.rand(1, 1, *SHAPE, generator=g)


def test_learning_stream_runs_fixed_and_moving_through_separate_batchnorm_calls():
    net = network().train()
    bn = net.feature_net[1]
    moving, fixed = images()
    net.predict(moving, fixed, (16, 16, 16))
    assert int(bn.num_batches_tracked) == 2  # running statistics updated once per stream
    before = bn.running_mean.clone()
    register_pair(net, moving, fixed, use_adam=False)  # pseudo-label pass: eval mode, statistics untouched
    assert torch.equal(bn.running_mean, before) and int(bn.num_batches_tracked) == 2
    assert net.training  # mode restored


def test_learning_stream_is_differentiable_and_the_pipeline_is_not():
    net = network()
    moving, fixed = images(1)
    net.predict(moving, fixed, (16, 16, 16)).pow(2).mean().backward()
    grads = [p.grad for p in net.feature_net.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads) and sum(g.abs().sum() for g in grads) > 0
    result = register_pair(net, moving, fixed, use_adam=True, adam_iterations=2)
    assert not result.ddf.requires_grad and not result.pre_adam.requires_grad


def test_switches_select_the_test_configurations():
    net = network()
    moving, fixed = images(2)
    one = register_pair(net, moving, fixed, num_warps=1, use_ice=False, use_adam=False)
    two = register_pair(net, moving, fixed, num_warps=2, use_ice=False, use_adam=False)
    assert len(one.warp_ddfs) == 1 and len(two.warp_ddfs) == 2
    torch.testing.assert_close(two.warp_ddfs[0], one.ddf)
    adam = register_pair(net, moving, fixed, num_warps=1, use_ice=False, use_adam=True, adam_iterations=3)
    torch.testing.assert_close(adam.pre_adam, one.ddf)
    assert (adam.ddf - one.ddf).abs().max() > 0


def test_forward_is_deterministic_and_traceable_without_adam():
    net = network(num_warps=2, use_ice=True).eval()
    pair = torch.cat(images(3), dim=1)
    with torch.no_grad():
        eager = net(pair)
        traced = torch.jit.trace(net, pair, check_trace=False)
        torch.testing.assert_close(traced(pair), eager)
    adam_net = network(use_adam=True, adam_iterations=3).eval()
    torch.testing.assert_close(adam_net(pair), adam_net(pair))
    assert eager.shape == (1, 3, *SHAPE)


def test_intensity_clamp_applies_to_the_pipeline_only():
    net = network(intensity_clamp=(-0.4, 0.6))
    moving, fixed = images(4)
    clamped = register_pair(net, moving, fixed, use_adam=False).ddf
    again = register_pair(net, moving.clamp(-0.4, 0.6), fixed.clamp(-0.4, 0.6), use_adam=False).ddf
    torch.testing.assert_close(clamped, again)


def test_standardize_channels():
    x = torch.randn(2, 4, 5, 6, 7) * 3 + 2
    y = standardize_channels(x)
    torch.testing.assert_close(y.mean((2, 3, 4)), torch.zeros(2, 4), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std((2, 3, 4)), torch.ones(2, 4), atol=1e-4, rtol=0)
