"""Contrastive pre-training engine: slice sampling by partition, views, trainer step and BatchNorm recalibration."""

import torch
from torch.utils.data import DataLoader

from common.engines.contrastive_pretrain import (
    ContrastivePretrainTrainer,
    ContrastiveViews,
    PartitionSliceCollate,
    recalibrate_batchnorm,
)
from common.losses.contrastive import GlobalContrastiveLoss, LocalContrastiveLoss
from common.networks.unet2d import (
    GlobalContrastiveModel,
    GlobalProjectionHead,
    LocalContrastiveModel,
    LocalProjectionHead,
    UNet2D,
)


def _volume(q: int, value: float = 0.0, size: int = 4) -> dict:
    """Volume whose slice k holds the constant k (+ value), so sampled slices reveal their index."""
    ramp = torch.arange(q, dtype=torch.float32).view(1, 1, 1, q).expand(1, size, size, q)
    return {"image": ramp + value}


def test_partition_sampler_floor_ranges_and_frequencies():
    collate = PartitionSliceCollate(
        "partition", num_partitions=4, partition_mode="floor", generator=torch.Generator().manual_seed(0)
    )
    counts = torch.zeros(10)
    draws = 10000
    for _ in range(draws):
        batch = collate([_volume(10)])
        src = batch["source_slice"]
        assert batch["partition_index"].tolist() == [0, 1, 2, 3]
        for s in range(4):
            assert 2 * s <= int(src[s]) < 2 * s + 2
        assert torch.equal(batch["image"][:, 0, 0, 0], src.float())
        counts[src] += 1
    freq = counts / draws
    assert torch.all((freq[:8] - 0.5).abs() < 0.02) and freq[8:].sum() == 0


def test_partition_sampler_round_covers_all_slices_and_distinct_volumes():
    vols = [_volume(7, value=100.0 * v) for v in range(5)]
    loader = DataLoader(
        vols,
        batch_size=3,
        shuffle=True,
        drop_last=True,
        collate_fn=PartitionSliceCollate("partition", num_partitions=3, partition_mode="round"),
    )
    seen = set()
    for _ in range(200):
        for batch in loader:
            volume_of_item = (batch["image"][:, 0, 0, 0] // 100).long()
            per_batch = volume_of_item.view(3, 3)
            assert all(len(set(row.tolist())) == 1 for row in per_batch)  # S slices of one volume together
            assert len(set(per_batch[:, 0].tolist())) == 3  # never the same volume twice in a batch
            assert batch["volume_index"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
            seen.update(batch["source_slice"].tolist())
    assert seen == set(range(7))  # Q=7, S=3 -> [0,2), [2,5), [5,7): no slice left out


def test_random_sampling_tags():
    batch = PartitionSliceCollate("random", slices_per_volume=5)([_volume(6), _volume(6)])
    assert batch["image"].shape == (10, 1, 4, 4)
    assert batch["partition_index"].tolist() == [-1] * 10
    assert batch["slice_index"].tolist() == list(range(10))


def test_views_intensity_closed_form_and_identity_crop():
    x = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    views = ContrastiveViews(crop=False, brightness=0.0, contrast_range=(1.25, 1.25), clip_range=(0.0, 1.0))
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    assert torch.allclose(views(x), ((x - mean) * 1.25 + mean).clamp(0, 1), atol=1e-6)
    whole = ContrastiveViews(
        crop=True,
        crop_fraction=1.0,
        crop_offset_range=(0.0, 0.0),
        brightness=0.0,
        contrast_range=(1.0, 1.0),
        clip_range=None,
    )
    assert torch.allclose(whole(x), x, atol=1e-6)
    shifted = ContrastiveViews(crop=False, brightness=0.3, contrast_range=(1.0, 1.0), clip_range=None)(x)
    delta = (shifted - x).flatten(1)
    assert torch.allclose(delta, delta[:, :1].expand_as(delta), atol=1e-6) and delta.abs().max() <= 0.3


def _loader(num_volumes=3, q=6, size=32, sampling="partition"):
    gen = torch.Generator().manual_seed(0)
    vols = [{"image": torch.rand(1, size, size, q, generator=gen)} for _ in range(num_volumes)]
    return DataLoader(
        vols,
        batch_size=num_volumes,
        shuffle=True,
        collate_fn=PartitionSliceCollate(sampling, num_partitions=2, slices_per_volume=2),
    )


def test_global_stage_trains_encoder_only():
    torch.manual_seed(0)
    unet = UNet2D(1, 4, channels=(4, 4, 8, 8, 8, 8))
    model = GlobalContrastiveModel(unet, GlobalProjectionHead(8, hidden_features=16, out_features=8))
    dec_before = {k: v.clone() for k, v in unet.decoder.state_dict().items()}
    enc_before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    trainer = ContrastivePretrainTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=_loader(),
        network=model,
        optimizer=torch.optim.Adam(model.parameters(), 1e-3),
        loss_function=GlobalContrastiveLoss("GD"),
        view_transform=ContrastiveViews(),
    )
    trainer.run()
    output = trainer.state.output  # decollated, one item per view of a slice (as MONAI handlers expect)
    assert len(output) == 12 and torch.isfinite(torch.as_tensor(output[0]["loss"]))  # 2 views x 3 volumes x 2 parts
    assert output[0]["pred"].shape == (8,)
    assert all(torch.equal(v, unet.decoder.state_dict()[k]) for k, v in dec_before.items())
    assert any(not torch.equal(v, unet.encoder.state_dict()[k]) for k, v in enc_before.items())


def test_local_stage_keeps_encoder_frozen():
    torch.manual_seed(0)
    unet = UNet2D(1, 4, channels=(4, 4, 8, 8, 8, 8))
    model = LocalContrastiveModel(unet, LocalProjectionHead(8, region_features=16), num_decoder_blocks=3)
    enc_before = {k: v.clone() for k, v in unet.encoder.state_dict().items()}
    trainer = ContrastivePretrainTrainer(
        device="cpu",
        max_epochs=1,
        epoch_length=2,
        train_data_loader=_loader(sampling="random"),
        network=model,
        optimizer=torch.optim.Adam(model.trainable_parameters(), 1e-3),
        loss_function=LocalContrastiveLoss("LR"),
        view_transform=ContrastiveViews(crop=False),
    )
    trainer.run()
    assert len(trainer.state.output) == 12 and trainer.state.output[0]["pred"].shape == (13, 16)
    assert all(torch.equal(v, unet.encoder.state_dict()[k]) for k, v in enc_before.items())


def test_recalibrate_batchnorm_exact_statistics():
    torch.manual_seed(0)
    net = UNet2D(1, 2, channels=(4, 4, 8, 8, 8, 8)).eval()
    bn = net.encoder[0][0][2]
    bn.running_mean.fill_(5.0)
    x = torch.rand(2, 1, 32, 32, 3)  # two volumes of 3 slices -> one chunk of 6 slices
    n = recalibrate_batchnorm(net, [{"image": x}], "cpu", slice_batch_size=64)
    assert n == 6 and not net.training and bn.momentum == 0.01
    slices = torch.movedim(x, -1, 1).flatten(0, 1)
    with torch.no_grad():
        conv_out = net.encoder[0][0][1](net.encoder[0][0][0](slices))
    assert torch.allclose(bn.running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5)
    assert torch.allclose(bn.running_var, conv_out.var(dim=(0, 2, 3), unbiased=True), atol=1e-5)
