"""U-Net inference in the atlas's space (SST with affine pre-alignment): a segmenter that only knows the atlas pose
must still label a shifted subject correctly on the subject's own grid."""

import pytest
import torch
import torch.nn.functional as F
from monai.data import MetaTensor
from monai.inferers import SimpleInferer

from common.engines.sst_inference import AtlasSpaceInferer, segmentation_inferer
from common.io import atomic_torch_save

SHAPE = (32, 32, 16)
SHIFT = (4, -3, 0)  # subject = atlas translated by these voxels


def blob(centre: tuple[float, ...]) -> torch.Tensor:
    grids = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in SHAPE], indexing="ij")
    r2 = sum(((g - c) / s) ** 2 for g, c, s in zip(grids, centre, (7.0, 5.0, 4.0)))
    return torch.exp(-r2)[None]  # [1, *S] in [0, 1]


ATLAS_CENTRE = (15.0, 16.0, 8.0)
SUBJECT_CENTRE = tuple(c + s for c, s in zip(ATLAS_CENTRE, SHIFT))


def atlas_pose_segmenter(image: torch.Tensor) -> torch.Tensor:
    """A 'U-Net' that learnt only the atlas pose: scores of the atlas's own label map, whatever the input."""
    label = (blob(ATLAS_CENTRE) > 0.5).long()
    return F.one_hot(label[0], 2).permute(3, 0, 1, 2)[None].float().expand(image.shape[0], -1, -1, -1, -1) * 10


def dice(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


@pytest.fixture
def inferer() -> AtlasSpaceInferer:
    atlas = blob(ATLAS_CENTRE)
    options = {
        "mode": "translation",
        "similarity": "mse",
        "levels": (2, 1),
        "iterations": (80, 40),
        "mask_margin": None,
    }
    return AtlasSpaceInferer(atlas, (atlas > 0.5).long(), options)


def test_scores_come_back_on_the_subject_grid(inferer: AtlasSpaceInferer) -> None:
    subject = MetaTensor(blob(SUBJECT_CENTRE)[None], meta={"filename_or_obj": "subject.nii.gz"})
    truth = blob(SUBJECT_CENTRE)[0] > 0.5
    scores = inferer(subject, atlas_pose_segmenter)
    assert isinstance(scores, MetaTensor) and scores.meta["filename_or_obj"] == "subject.nii.gz"
    assert scores.shape == (1, 2, *SHAPE)
    in_atlas_space = SimpleInferer()(subject, atlas_pose_segmenter).argmax(1)[0].bool()
    assert dice(scores.argmax(1)[0].bool(), truth) > 0.95 > 0.8 > dice(in_atlas_space, truth)


def test_grid_mismatch_is_an_error(inferer: AtlasSpaceInferer) -> None:
    with pytest.raises(ValueError, match="atlas grid"):
        inferer(torch.rand(1, 1, 16, 16, 16), atlas_pose_segmenter)


def test_segmentation_inferer_loads_the_atlas_file_or_stays_plain(tmp_path, inferer: AtlasSpaceInferer) -> None:
    with pytest.raises(ValueError, match="needs affine pre-alignment"):
        segmentation_inferer(tmp_path / "missing.pt", False, "atlas")
    assert isinstance(segmentation_inferer(tmp_path / "missing.pt", False, "native"), SimpleInferer)
    assert isinstance(segmentation_inferer(tmp_path / "missing.pt", True, "native"), SimpleInferer)
    with pytest.raises(FileNotFoundError, match="affine_prealign"):
        segmentation_inferer(tmp_path / "missing.pt", True, "atlas")
    with pytest.raises(ValueError, match="unet_space"):
        segmentation_inferer(tmp_path / "missing.pt", True, "subject")
    path = atomic_torch_save(
        {"base_image": inferer.base_image, "base_label": inferer.base_label, "options": inferer.options},
        tmp_path / "atlas_space.pt",
    )
    loaded = segmentation_inferer(path, True, "atlas")
    assert isinstance(loaded, AtlasSpaceInferer) and torch.equal(loaded.base_label, inferer.base_label)
