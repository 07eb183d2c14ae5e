"""Self-training engine: loss, difficulty weights, sampler, pseudo-label bank, augmentation, trainer
(pitfalls 9, 10, 16) and resuming mid-stage after a kill."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Events
from torch.utils.data import DataLoader

from common.engines.checkpoint import ResumableCheckpointHandler
from common.engines.pair_augment import affine_pair_augment, random_affine_pair, transform_target, voxel_affine
from common.engines.pseudo_labels import (
    AgreementSampler,
    PrealignmentStore,
    PseudoLabelBank,
    agreement_weights,
    endpoint_error,
    l2r_pairs,
    pair_difficulty,
)
from common.engines.self_training import CyclicalSelfTrainer, ImagePairDataset, random_init_copy
from common.networks.cst_features import CSTFeatureNet
from common.registration import fields
from common.registration.affine import affine_ddf
from common.registration.convex import box_filter, rescale_field
from common.registration.cst_pipeline import CSTRegistrationNet

# -- loss, difficulty, sampling ---------------------------------------------------------------------------------------


def test_endpoint_error_value_and_finite_gradient_at_zero_error():
    target = torch.zeros(2, 3, 12, 12, 12)
    pred = target.clone()
    pred[:, 0] = 1.0  # one half-res voxel = 2 full-res voxels
    assert math.isclose(float(endpoint_error(pred, target, 2.0, crop=2, weight=1.5)), 3.0, rel_tol=1e-6)
    same = target.clone().requires_grad_(True)
    endpoint_error(same, target, crop=2).backward()
    assert torch.isfinite(same.grad).all()


def test_difficulty_is_the_loss_metric_per_pair():
    plain = torch.zeros(2, 3, 20, 20, 20)
    refined = plain.clone()
    refined[1, 2] = 0.5
    torch.testing.assert_close(pair_difficulty(plain, refined), torch.tensor([0.0, 1.5]))


def test_agreement_weights_by_rank():
    weights = agreement_weights([0.3, 0.1, 0.2, 0.1])
    sig = torch.sigmoid(torch.tensor([5.0, 5.0 - 10 / 3, 5.0 - 20 / 3, -5.0], dtype=torch.float64))
    # ranks: 0.1 (index 1) -> 0, 0.1 (index 3) -> 1 (stable), 0.2 -> 2, 0.3 -> 3
    torch.testing.assert_close(weights, sig[[3, 0, 2, 1]])
    many = agreement_weights(np.arange(190.0))
    assert math.isclose(float(many[0]), 0.9933, abs_tol=1e-4) and math.isclose(float(many[-1]), 0.0067, abs_tol=1e-4)


def test_sampler_uses_the_bank_weights_once_difficulties_exist():
    bank = PseudoLabelBank(3, storage="memory")
    sampler = AgreementSampler(bank, 3000, weighted=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sampler.weights(), torch.ones(3, dtype=torch.float64))
    for k, difficulty in enumerate([5.0, 0.0, 1.0]):
        bank.put(k, torch.zeros(3, 2, 2, 2), difficulty, stage=0)
    bank.complete(0)
    counts = np.bincount(list(sampler), minlength=3)
    assert counts[1] > counts[2] > counts[0] and len(sampler) == 3000
    uniform = AgreementSampler(bank, 3000, weighted=False, generator=torch.Generator().manual_seed(0))
    assert np.bincount(list(uniform), minlength=3).min() > 900


def test_l2r_pairs():
    assert l2r_pairs(3) == [(1, 0), (2, 0), (2, 1)]
    assert len(l2r_pairs(20)) == 190 and len(l2r_pairs(10)) == 45


# -- pseudo-label bank ------------------------------------------------------------------------------------------------


def test_disk_bank_survives_a_restart_and_resumes_a_partial_refresh(tmp_path):
    bank = PseudoLabelBank(3, tmp_path, storage="disk", dtype=torch.float16)
    fields_ = [torch.full((3, 2, 2, 2), float(k)) for k in range(3)]
    for k in range(3):
        bank.put(k, fields_[k], difficulty=k, stage=0)
    bank.complete(0)
    bank.put(0, fields_[2], difficulty=7.0, stage=1)  # a stage-1 refresh killed after one pair
    assert not [p for p in tmp_path.iterdir() if ".tmp" in p.name]  # atomic writes leave no temporaries
    reopened = PseudoLabelBank(3, tmp_path)
    assert reopened.stage == 0 and reopened.difficulty == [0.0, 1.0, 2.0]
    assert [reopened.stage_of(k) for k in range(3)] == [1, 0, 0]
    torch.testing.assert_close(reopened.load([2, 1]), torch.stack([fields_[2], fields_[1]]))
    with pytest.raises(RuntimeError, match="missing"):
        reopened.complete(1)
    with pytest.raises(ValueError, match="holds 3 pairs"):
        PseudoLabelBank(4, tmp_path)


# -- augmentation (pitfall 9) -----------------------------------------------------------------------------------------


def sinusoid_pair():
    shape = (48, 40, 64)
    h, w, d = fields.identity_grid(shape)[0]
    moving = torch.sin(2 * math.pi * h / 48) * torch.cos(2 * math.pi * w / 40) * torch.sin(2 * math.pi * d / 64)
    # spec field 0.05 * (sin h, sin w, sin d) in normalised (x, y, z) channels -> voxel channels (axis order)
    u = torch.stack(
        [
            0.05 * torch.sin(2 * math.pi * d / 64) * 48 / 2,
            0.05 * torch.sin(2 * math.pi * w / 40) * 40 / 2,
            0.05 * torch.sin(2 * math.pi * h / 48) * 64 / 2,
        ]
    )[None]
    moving = moving[None, None]
    fixed = fields.warp(moving, u, padding_mode="zeros")  # fixed(y) = moving(y + u(y))
    return shape, fixed, moving, u


A1 = np.eye(4)
A1[:3] = [[1.05, 0.03, -0.02, 0.04], [-0.02, 0.97, 0.05, -0.03], [0.01, -0.04, 1.02, 0.02]]
A2 = np.eye(4)
A2[:3] = [[0.96, -0.03, 0.02, -0.05], [0.04, 1.03, -0.02, 0.03], [-0.03, 0.02, 0.98, -0.02]]


def test_voxel_affine_reproduces_affine_grid_sampling():
    shape, fixed, _, _ = sinusoid_pair()
    grid = F.affine_grid(torch.tensor(A1[:3], dtype=torch.float32)[None], (1, 1, *shape), align_corners=False)
    expected = F.grid_sample(fixed, grid, align_corners=False)
    ddf = affine_ddf(torch.tensor(voxel_affine(A1, shape), dtype=torch.float32), shape)
    mine = fields.warp(fixed, ddf)
    # compare where the sampled point lies inside the image (the two paddings differ within a voxel of the edge)
    points = fields.identity_grid(shape) + ddf
    inside = torch.stack([(points[:, i] >= 0) & (points[:, i] <= n - 1) for i, n in enumerate(shape)]).all(0)
    assert inside.float().mean() > 0.8
    assert (mine - expected)[:, 0][inside].abs().max() < 1e-4


def test_exact_label_transform_aligns_the_augmented_pair():
    shape, fixed, moving, u = sinusoid_pair()
    half = rescale_field(u, [n // 2 for n in shape])
    fixed_aug = fields.warp(fixed, affine_ddf(torch.tensor(voxel_affine(A1, shape), dtype=torch.float32), shape))
    moving_aug = fields.warp(moving, affine_ddf(torch.tensor(voxel_affine(A2, shape), dtype=torch.float32), shape))
    inner = (..., slice(6, -6), slice(6, -6), slice(6, -6))

    def residual(target_half):
        target = rescale_field(target_half, shape)
        return float((fixed_aug - fields.warp(moving_aug, target, padding_mode="zeros"))[inner].abs().mean())

    exact = residual(transform_target(half, A1, A2, shape, "exact"))
    assert exact < 5e-3
    assert residual(torch.zeros_like(half)) > 0.13
    assert residual(transform_target(half, A1, A2, shape, "ref")) > exact  # the reference formula is approximate


def test_random_affine_pair_structure_and_seeding():
    a1, a2 = random_affine_pair(generator=torch.Generator().manual_seed(0))
    b1, b2 = random_affine_pair(generator=torch.Generator().manual_seed(0))
    assert np.array_equal(a1, b1) and np.array_equal(a2, b2)
    assert np.all(a1[3, :3] == 0) and a1[3, 3] != 1.0  # the (4, 4) entry keeps its noise
    second = a2 @ np.linalg.inv(a1)  # A2 = A2' A1 with A2' = I + 0.05 Z
    assert np.allclose(second[3, :3], 0) and np.abs(second[:3] - np.eye(4)[:3]).max() < 0.3
    fixed = torch.rand(2, 1, 16, 16, 16)
    out = affine_pair_augment(fixed, fixed, torch.zeros(2, 3, 8, 8, 8), generator=torch.Generator().manual_seed(1))
    assert [t.shape for t in out] == [fixed.shape, fixed.shape, (2, 3, 8, 8, 8)]


# -- trainer ----------------------------------------------------------------------------------------------------------

SHAPE = (16, 16, 16)


def volumes(n=3):
    g = torch.Generator().manual_seed(0)
    return [{"image": box_filter(torch.rand(1, *SHAPE, generator=g)[None], 2)[0]} for _ in range(n)]


def make_trainer(tmp_path, supervision="pseudo_label", stages=2, iterations=3, storage="disk", **kwargs):
    torch.manual_seed(0)
    network = CSTRegistrationNet(CSTFeatureNet(channels=(4, 4, 4, 4, 4)), intensity_clamp=None)
    pairs = ImagePairDataset(volumes(), l2r_pairs(3))
    bank = PseudoLabelBank(len(pairs), tmp_path / "bank", storage=storage)
    loader = DataLoader(pairs, batch_size=2, sampler=AgreementSampler(bank, iterations * 2))
    optimizer = torch.optim.Adam(network.feature_net.parameters(), lr=1e-3)
    trainer = CyclicalSelfTrainer(
        device="cpu",
        max_epochs=stages,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        bank=bank,
        supervision=supervision,
        epoch_length=iterations,
        adam_iterations=2,
        loss_crop=1,
        stage_dir=tmp_path / "stages",
        **kwargs,
    )
    return trainer, network, optimizer, loader


def test_pseudo_label_refresh_is_deterministic_and_stage0_uses_an_independent_network(tmp_path):
    trainer, network, _, _ = make_trainer(tmp_path / "a", storage="memory")
    trainer.state.device = torch.device("cpu")
    trainer.refresh_pseudo_labels(0)
    first = trainer.bank.load(range(3))
    trainer.bank._memory.clear()
    trainer.refresh_pseudo_labels(0)
    torch.testing.assert_close(trainer.bank.load(range(3)), first)
    g_a = torch.load(tmp_path / "a" / "stages" / "stage_00.pt")
    assert not torch.equal(g_a["0.weight"], network.feature_net.state_dict()["0.weight"])
    same = random_init_copy(network, 12345).feature_net.state_dict()
    assert torch.equal(same["0.weight"], g_a["0.weight"]) and not same["1.running_var"].ne(1).any()
    trainer.refresh_pseudo_labels(1)  # later stages use the learner itself
    assert not torch.equal(trainer.bank.load(range(3)), first)


def test_training_resumes_mid_stage_after_a_kill(tmp_path):
    def run(folder, kill_at=None):
        trainer, network, optimizer, loader = make_trainer(folder)
        handler = ResumableCheckpointHandler(
            folder, {"network": network, "optimizer": optimizer, "dataloader": loader}, interval_iterations=1
        )
        handler.attach(trainer)
        if kill_at is not None:

            @trainer.on(Events.ITERATION_COMPLETED(once=kill_at))
            def kill(_):
                raise KeyboardInterrupt

        trainer.run()
        return network.feature_net.state_dict()

    expected = run(tmp_path / "straight")
    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "killed", kill_at=5)  # in the second stage, after its pseudo-label refresh
    resumed = run(tmp_path / "killed")
    for key, value in expected.items():
        torch.testing.assert_close(resumed[key], value, msg=key)
    bank = PseudoLabelBank(3, tmp_path / "killed" / "bank")
    assert bank.stage == 1  # no refresh after the last stage


def test_optimizer_moments_reset_every_few_stages(tmp_path):
    trainer, _, optimizer, _ = make_trainer(tmp_path, stages=3, iterations=1, optimizer_reset_stages=2)
    sizes = []
    trainer.add_event_handler(Events.EPOCH_STARTED, lambda _: sizes.append(len(optimizer.state)))
    trainer.run()
    # the trainer's own EPOCH_STARTED handler runs first: moments cleared at the start of stage 3 only
    assert sizes[0] == 0 and sizes[1] > 0 and sizes[2] == 0


@pytest.mark.parametrize("supervision", ["ncc", "mind"])
def test_metric_supervision_baselines_train_the_same_network(tmp_path, supervision):
    trainer, network, _, _ = make_trainer(tmp_path, supervision=supervision, stages=1, iterations=2)
    before = network.feature_net[0].weight.clone()
    trainer.run()
    assert np.isfinite(float(trainer.state.output[0]["loss"]))  # decollated: one dict per pair, the loss a number
    assert not torch.equal(before, network.feature_net[0].weight)
    assert trainer.bank.stage == -1  # no pseudo labels


# -- affine pre-alignment store ---------------------------------------------------------------------------------------


def test_prealignment_is_computed_once_per_pair_stored_atomically_and_applied_to_moving_image_and_label(tmp_path):
    shape = (8, 8, 8)
    volumes = [
        {
            "image": torch.rand(1, *shape, generator=torch.Generator().manual_seed(i)),
            "label": torch.randint(0, 3, (1, *shape)),
        }
        for i in range(3)
    ]
    pairs = l2r_pairs(3)
    shift = torch.tensor([[[1.0, 0.0, 0.0, 1.0], [0.0, 1.0, 0.0, -1.0], [0.0, 0.0, 1.0, 0.0]]])  # integer shift
    calls = []

    def fit(moving, fixed):
        calls.append((moving.shape, fixed.shape))
        return shift

    store = PrealignmentStore(len(pairs), tmp_path / "prealignment")
    dataset = ImagePairDataset(volumes, pairs, prealignment=store)
    with pytest.raises(RuntimeError, match="no pre-alignment"):
        dataset[0]
    assert dataset.compute_prealignment(fit) == len(pairs) == len(calls)
    assert sorted(p.name for p in (tmp_path / "prealignment").iterdir()) == [f"affine_{k:05d}.pt" for k in range(3)]
    # a restarted run (new store object, same folder) reuses the matrices
    again = ImagePairDataset(volumes, pairs, prealignment=PrealignmentStore(len(pairs), tmp_path / "prealignment"))
    assert again.compute_prealignment(fit) == 0 and len(calls) == len(pairs)
    item = again[1]
    moving_index = pairs[1][0]
    # warped(p) = moving(p + (1, -1, 0)) on the interior, for the image (linear) and the label (nearest)
    torch.testing.assert_close(item["moving_image"][0, :-1, 1:], volumes[moving_index]["image"][0, 1:, :-1])
    assert torch.equal(item["moving_label"][0, :-1, 1:], volumes[moving_index]["label"][0, 1:, :-1])
    assert torch.equal(item["fixed_image"], volumes[pairs[1][1]]["image"])
    # a folder written for other pairs does not count
    assert PrealignmentStore(len(pairs), tmp_path / "prealignment").get(0, (0, 1)) is None
