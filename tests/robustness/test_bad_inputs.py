"""Table-driven: each bad input is fed to each bundle's train and inference entry points, on tiny synthetic data.

Every case must end in a specific error type (found in the exception chain: MONAI wraps config and transform errors
in ``RuntimeError``) whose message names the offending file, datalist or config id - never in an unexplained error
from deep inside torch.

``PENDING`` lists the (bundle, case, entry point) combinations a bundle does not handle yet, each with the id of the
config change that fixes it (``PROPOSED``; the lead applies them to the bundles). ``test_proposed_change`` applies the
change as CLI overrides and checks that it does handle the case, so the proposal is tested before it is pasted. Once a
change is in a bundle, delete its ``PENDING`` entries: the case then runs in ``test_bad_input``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

import common.cli_checks  # noqa: F401 - makes `common.cli_checks` reachable from the bundles' `$import common`
import common.data.transforms  # noqa: F401 - idem for proposals that add the validation transforms
from common.cli_checks import ConfigOverrideError
from common.data.synthetic import generate_dataset
from common.data.validate import DataValidationError
from common.engines.checkpoint import FORMAT, CheckpointMismatchError
from tests.robustness.support import CORRUPTIONS, ENTRIES, bundle_case, corrupted_copy, describe, find_error, run_entry

CLMORPH = "clmorph_brain_mri_registration"
GLOBAL_LOCAL = "global_local_contrastive_cardiac_mri_segmentation"
SST = "sst_brain_mri_one_shot_segmentation"
CYCLICAL = "cyclical_self_training_abdomen_ct_registration"
BUNDLES = [CLMORPH, GLOBAL_LOCAL, SST, CYCLICAL]


@dataclass(frozen=True)
class BundleIds:
    """Config ids of one bundle's first training stage and inference that the cases touch."""

    epochs: str
    batch_size: str
    resume_checkpoint: str | None  # ResumableCheckpointHandler file of the first stage, relative to the work dir
    infer_data: str  # id holding the inference datalist
    infer_datalist_expr: str  # its value with validation switched on (the PROPOSED change)


IDS = {
    CLMORPH: BundleIds(
        "epochs",
        "batch_size",
        "models/checkpoint.pt",
        "infer_datalist",
        "$common.data.datalist.load_datalist(@datalist, @infer_section, require_label=False)",
    ),
    GLOBAL_LOCAL: BundleIds(
        "pretrain_epochs",
        "volumes_per_batch",
        "models/checkpoint_pretrain_global.pt",
        "data",
        "$common.data.datalist.load_datalist(@datalist, @infer_section, require_label=False)",
    ),
    SST: BundleIds(
        "registration_epochs",
        "registration_batch_size",
        "work/checkpoints/stage0_registration.pt",
        "dataset#data",
        "$common.data.datalist.load_datalist(@datalist, @infer_section, require_label=False)",
    ),
    CYCLICAL: BundleIds(
        "num_stages",
        "batch_size",
        "models/checkpoint.pt",
        "infer_datalist",
        "$common.data.datalist.load_datalist(@datalist, @infer_section, require_label=False)",
    ),
}

# ---------------------------------------------------------------------------------------------- proposed changes
LOAD_WEIGHTS = (
    "$common.engines.checkpoint.load_weights(@network, @ckpt_dir + '/model.pt', map_location=@device) "
    "if @load_pretrain else None"
)
CHECK_OUTPUT = "$common.data.validate.check_output_dir(@output_dir, [@datalist] + [e['image'] for e in @{data}])"
CHECKS = {
    CLMORPH: {
        "epochs": ["positive_int", "@epochs"],
        "batch_size": ["positive_int", "@batch_size"],
        "pairs_per_epoch": ["optional_positive_int", "@pairs_per_epoch"],
        "val_interval": ["positive_int", "@val_interval"],
        "checkpoint_interval": ["positive_int", "@checkpoint_interval"],
        "learning_rate": ["positive_float", "@learning_rate"],
        "image_size": ["spatial_size_3d", "@image_size"],
        "crop_size": ["spatial_size_3d", "@crop_size"],
        "num_workers": ["non_negative_int", "@num_workers"],
        "seed": ["non_negative_int", "@seed"],
        "amp": ["bool", "@amp"],
    },
    GLOBAL_LOCAL: {
        "pretrain_epochs": ["positive_int", "@pretrain_epochs"],
        "pretrain_iterations_per_epoch": ["positive_int", "@pretrain_iterations_per_epoch"],
        "volumes_per_batch": ["positive_int", "@volumes_per_batch"],
        "epochs": ["positive_int", "@epochs"],
        "iterations_per_epoch": ["positive_int", "@iterations_per_epoch"],
        "finetune_batch_size": ["positive_int", "@finetune_batch_size"],
        "learning_rate": ["positive_float", "@learning_rate"],
        "image_size": ["positive_int", "@image_size"],
        "num_workers": ["non_negative_int", "@num_workers"],
        "random_seed": ["non_negative_int", "@random_seed"],
        "amp": ["bool", "@amp"],
        "load_pretrained": ["bool", "@load_pretrained"],
    },
    SST: {
        **{
            f"{stage}_{what}": ["positive_int", f"@{stage}_{what}"]
            for stage in ("registration", "style", "joint")
            for what in ("epochs", "batch_size", "pairs_per_epoch")
        },
        "flow_aae_epochs": ["positive_int", "@flow_aae_epochs"],
        "flow_aae_samples_per_epoch": ["positive_int", "@flow_aae_samples_per_epoch"],
        "unet_epochs": ["positive_int", "@unet_epochs"],
        "unet_batch_size": ["positive_int", "@unet_batch_size"],
        "learning_rate": ["positive_float", "@learning_rate"],
        "sst_learning_rate": ["positive_float", "@sst_learning_rate"],
        "spatial_size": ["spatial_size_3d", "@spatial_size"],
        "seed": ["non_negative_int", "@seed"],
        "amp": ["bool", "@amp"],
    },
    CYCLICAL: {
        "num_stages": ["positive_int", "@num_stages"],
        "iterations_per_stage": ["positive_int", "@iterations_per_stage"],
        "batch_size": ["positive_int", "@batch_size"],
        "learning_rate": ["positive_float", "@learning_rate"],
        "learning_rate_min": ["non_negative_float", "@learning_rate_min"],
        "val_interval": ["positive_int", "@val_interval"],
        "checkpoint_interval": ["positive_int", "@checkpoint_interval"],
        "image_size": ["spatial_size_3d", "@image_size"],
        "adam_iterations": ["non_negative_int", "@adam_iterations"],
        "num_warps": ["positive_int", "@num_warps"],
        "cache_rate": ["probability", "@cache_rate"],
        "num_workers": ["non_negative_int", "@num_workers"],
        "seed": ["non_negative_int", "@seed"],
        "amp": ["bool", "@amp"],
        "augment": ["bool", "@augment"],
        "use_adam": ["bool", "@use_adam"],
        "use_ice": ["bool", "@use_ice"],
        "refine_pseudo_labels": ["bool", "@refine_pseudo_labels"],
    },
}
SEED_ID = {CLMORPH: "seed", GLOBAL_LOCAL: "random_seed", SST: "seed", CYCLICAL: "seed"}
PAIR_CHECK = (
    "$common.cli_checks.check_min_items(@train_datalist, @datalist + ' section ' + @train_section, 2, "
    "'pair sampling (moving, fixed)')"
)
SST_BATCH_CHECKS = [
    f"$common.cli_checks.check_batch_fits(@{s}_batch_size, '{s}_batch_size', range(@{s}_pairs_per_epoch), "
    f"'{s}_pairs_per_epoch (drop_last would leave no iteration)')"
    for s in ("registration", "style", "joint")
]


SST_VOLUME_LOADING = [
    {"_target_": "common.data.transforms.ValidateFilesd", "keys": ["image", "label"], "allow_missing_keys": True},
    {
        "_target_": "LoadImaged",
        "keys": ["image", "label"],
        "image_only": True,
        "ensure_channel_first": True,
        "allow_missing_keys": True,
    },
    {"_target_": "common.data.transforms.ValidateImaged", "keys": "image", "ndim": 3},
    {
        "_target_": "common.data.transforms.ValidateLabeld",
        "keys": "label",
        "allowed_labels": "$common.data.datalist.read_datalist_json(@datalist)['labels']",
        "allow_missing_keys": True,
    },
    {"_target_": "common.data.transforms.ValidateGeometryd", "keys": ["image", "label"], "allow_missing_keys": True},
]


def _train_initialize(bundle: str, extra: list[str] | None = None) -> list[str]:
    return [
        "$common.cli_checks.check_config(@override_checks)",
        *(extra or []),
        f"$monai.utils.set_determinism(seed=@{SEED_ID[bundle]})",
    ]


CHECK_FREE = "$common.cli_checks.check_output_dir_free(@output_dir, @overwrite, '*.nii*')"


CLMORPH_ATLAS_CHECKS = [
    "$common.cli_checks.check_together({'atlas_image': @atlas_image, 'atlas_label': @atlas_label}, "
    "'an atlas needs its label map')",
    "$common.data.validate.validate_image_label(@atlas_image, @atlas_label, ndim=3) if @atlas_image else None",
]


def _infer_initialize(bundle: str) -> list[str]:
    return [
        CHECK_OUTPUT.replace("{data}", IDS[bundle].infer_data),
        CHECK_FREE,
        *(CLMORPH_ATLAS_CHECKS if bundle == CLMORPH else []),
        "$monai.utils.set_determinism(seed=0)",
        LOAD_WEIGHTS,
    ]


def proposed(bundle: str, change: str) -> dict[str, Any] | None:
    """The config change ``change`` for ``bundle`` as overrides (the exact ids and values the report lists)."""
    ids = IDS[bundle]
    if change == "infer-validate":
        return {ids.infer_data: ids.infer_datalist_expr}
    if change == "cli-check":
        extra = {SST: SST_BATCH_CHECKS, CLMORPH: [PAIR_CHECK], CYCLICAL: [PAIR_CHECK]}.get(bundle)
        return {"override_checks": CHECKS[bundle], "initialize": _train_initialize(bundle, extra)}
    if change in ("load-weights", "output-dir", "atlas-override"):
        return {"overwrite": False, "initialize": _infer_initialize(bundle)}
    if change == "contrastive-batch":
        return {
            "train#dataloader#batch_size": "$common.cli_checks.check_batch_fits(@volumes_per_batch, "
            "'volumes_per_batch', @pretrain_datalist, @datalist + ' section ' + @pretrain_section, minimum=2)"
        }
    if change == "volume-validate":
        return {"volume_preprocessing#transforms#0": {"_target_": "Compose", "transforms": SST_VOLUME_LOADING}}
    return None  # a structural change (see the report), not expressible as overrides


# -------------------------------------------------------------------------------------------------- the table
ERRORS: dict[str, type[BaseException]] = {
    "DataValidationError": DataValidationError,
    "ValueError": ValueError,
    "ConfigOverrideError": ConfigOverrideError,
    "CheckpointMismatchError": CheckpointMismatchError,
}


@dataclass(frozen=True)
class SettingCase:
    """A bad setting rather than bad data: ``setup(bundle, data_dir, work) -> (name in message, overrides)``."""

    name: str
    setup: Callable[[str, Path, Path], tuple[str, dict[str, Any]]]
    error: str
    entries: tuple[str, ...]


def _epochs_not_int(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    return f"'{IDS[bundle].epochs}'", {IDS[bundle].epochs: "ten"}


def _batch_zero(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    return f"'{IDS[bundle].batch_size}'", {IDS[bundle].batch_size: 0}


def _batch_exceeds(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    return f"'{IDS[bundle].batch_size}'", {IDS[bundle].batch_size: 50}


def _foreign_resume_checkpoint(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    """A checkpoint of another network left in the checkpoint folder (e.g. another bundle's run)."""
    rel = IDS[bundle].resume_checkpoint or "models/checkpoint.pt"
    path = work / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    foreign = {"format": FORMAT, "objects": {"network": torch.nn.Conv3d(1, 2, 3).state_dict()}, "engine": {}}
    torch.save(foreign, path)
    return str(path), {}


def _foreign_model(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    """models/model.pt of a different network shape."""
    path = work / "models" / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torch.nn.Conv3d(1, 2, 3).state_dict(), path)
    return str(path), {"load_pretrain": True}


def _output_is_input(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    return str(data / "imagesTr"), {"output_dir": str(data / "imagesTr")}


def _previous_results(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    """An earlier inference run left a prediction in the output folder."""
    out = work / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "sub005_seg.nii.gz").write_bytes(b"earlier result")
    return str(out), {}


def _atlas_image_only(bundle: str, data: Path, work: Path) -> tuple[str, dict]:
    """``--atlas_image`` given on the command line without ``--atlas_label``."""
    return "'atlas_label'", {"atlas_image": str(data / "imagesTr" / "sub000.nii.gz")}


SETTINGS = {
    c.name: c
    for c in [
        SettingCase("epochs_not_int", _epochs_not_int, "ConfigOverrideError", ("train",)),
        SettingCase("batch_size_zero", _batch_zero, "ConfigOverrideError", ("train",)),
        SettingCase("batch_exceeds_data", _batch_exceeds, "ConfigOverrideError", ("train",)),
        SettingCase("foreign_resume_checkpoint", _foreign_resume_checkpoint, "CheckpointMismatchError", ("train",)),
        SettingCase("foreign_model_weights", _foreign_model, "CheckpointMismatchError", ("infer",)),
        SettingCase("output_dir_is_input_dir", _output_is_input, "DataValidationError", ("infer",)),
        SettingCase("rerun_over_previous_results", _previous_results, "ConfigOverrideError", ("infer",)),
        SettingCase("atlas_image_without_label", _atlas_image_only, "ConfigOverrideError", ("infer",)),
    ]
}

# cases that do not apply: no atlas in the bundle's entry point, or a large batch is harmless there
NOT_APPLICABLE = {
    (GLOBAL_LOCAL, "atlas_without_label", "train"),
    (GLOBAL_LOCAL, "atlas_without_label", "infer"),
    (SST, "atlas_without_label", "infer"),  # inference runs the U-Net, no atlas
    (CLMORPH, "batch_exceeds_data", "train"),  # pairs_per_epoch caps the batch, drop_last is false
    (CYCLICAL, "atlas_without_label", "train"),  # no atlas: pseudo-labels come from registration of all pairs
    (CYCLICAL, "batch_exceeds_data", "train"),  # the sampler draws iterations_per_stage * batch_size pairs
    # only the atlas-segmentation inference (CLMorph, cyclical) takes an atlas from the command line
    *[(b, "atlas_image_without_label", "infer") for b in (GLOBAL_LOCAL, SST)],
}

IMAGE_CASES = [
    "missing_image",
    "not_nifti",
    "truncated_nifti",
    "image_2d_for_3d",
    "image_4d_for_3d",
    "image_all_zero",
    "image_constant",
    "image_nan",
    "image_inf",
]
# (bundle, case, entry point) combinations a bundle does not handle yet, with the id of the change that fixes them
# (every bundle has applied every change: none left)
PENDING: dict[tuple[str, str, str], str] = {}


def _combinations() -> list[tuple[str, str, str]]:
    names = list(CORRUPTIONS.items()) + list(SETTINGS.items())
    combos = [(b, name, e) for b in BUNDLES for name, case in names for e in case.entries]
    return [c for c in combos if c not in NOT_APPLICABLE]


ACTIVE = [c for c in _combinations() if c not in PENDING and c[0] in IDS]
TO_VERIFY = [c for c in _combinations() if PENDING.get(c) not in (None, "resumable")]


@pytest.fixture(scope="module")
def clean_data(tmp_path_factory) -> dict[str, Path]:
    """One clean synthetic dataset per bundle, generated once for the module."""
    made: dict[str, Path] = {}

    def get(bundle: str) -> Path:
        if bundle not in made:
            case = bundle_case(bundle)
            root = tmp_path_factory.mktemp(bundle[:12]) / "clean"
            generate_dataset(
                root,
                case.preset,
                case.num_subjects,
                case.shape,
                seed=case.seed,
                num_sites=case.num_sites,
                **case.dataset_kwargs,
            )
            made[bundle] = root
        return made[bundle]

    return get


def _run_bad(bundle: str, name: str, entry: str, clean: Path, tmp: Path, extra: dict[str, Any]) -> None:
    case = bundle_case(bundle)
    if case is None:
        pytest.skip(f"{bundle}: no harness case yet (tests/bundles), so no tiny-run overrides to drive it")
    work = tmp / "work"
    if name in CORRUPTIONS:
        bad = CORRUPTIONS[name]
        data, target = corrupted_copy(clean, tmp / "data", bad, ENTRIES[entry].section)
        overrides = {}
    else:
        bad = SETTINGS[name]
        target, overrides = bad.setup(bundle, clean, work)
        data = clean
    if bundle == SST and entry == "train":
        # the corrupted entry 0 is the atlas for label cases (only the atlas label is used) and a pool image otherwise
        overrides["atlas"] = 0 if name.startswith("label_") or name == "single_volume" else 1
    kind = ERRORS[bad.error]
    with pytest.raises(BaseException) as info:
        run_entry(case, ENTRIES[entry], data, work, {**overrides, **extra})
    found = find_error(info.value, kind)
    assert found is not None, f"expected {kind.__name__}, got: {describe(info.value)}"
    message = str(found)
    assert target in message or Path(target).name in message, f"{kind.__name__} does not name {target}: {message}"


@pytest.mark.parametrize("bundle, name, entry", ACTIVE, ids=["-".join(c) for c in ACTIVE])
def test_bad_input(bundle, name, entry, clean_data, tmp_path):
    _run_bad(bundle, name, entry, clean_data(bundle), tmp_path, {})


@pytest.mark.parametrize("bundle, name, entry", TO_VERIFY, ids=["-".join(c) for c in TO_VERIFY])
def test_proposed_change(bundle, name, entry, clean_data, tmp_path):
    """The change listed for a pending combination, applied as overrides, makes the bundle handle the case."""
    change = proposed(bundle, PENDING[(bundle, name, entry)])
    assert change is not None
    _run_bad(bundle, name, entry, clean_data(bundle), tmp_path, change)


# clmorph inference preprocessing with the file/image checks inserted (what the report proposes for every bundle)
CLMORPH_INFER_PREPROCESSING = [
    {"_target_": "common.data.transforms.ValidateFilesd", "keys": "image"},
    {"_target_": "LoadImaged", "keys": "image", "image_only": True, "ensure_channel_first": True},
    {"_target_": "common.data.transforms.ValidateImaged", "keys": "image", "ndim": 3},
    {"_target_": "Resized", "keys": "image", "spatial_size": "@image_size", "mode": "trilinear"},
    {"_target_": "NormalizeIntensityd", "keys": "image"},
]


def test_proposed_changes_keep_good_runs_working(clean_data, tmp_path):
    """The proposed train and inference changes together do not reject the clean tiny runs (one bundle, CPU)."""
    case = bundle_case(CLMORPH)
    if case is None:
        pytest.skip("clmorph bundle not present")
    data = clean_data(CLMORPH)
    run_entry(case, ENTRIES["train"], data, tmp_path, proposed(CLMORPH, "cli-check"))
    infer = {
        **proposed(CLMORPH, "infer-validate"),
        **proposed(CLMORPH, "load-weights"),
        "preprocessing#transforms": CLMORPH_INFER_PREPROCESSING,
        "load_pretrain": True,
    }
    run_entry(case, ENTRIES["infer"], data, tmp_path, infer)  # same output folder: training wrote no NIfTI there
    predictions = sorted((tmp_path / "out").glob("*_seg.nii.gz"))
    assert predictions, "inference with the proposed changes wrote no prediction"
    with pytest.raises(RuntimeError) as info:  # a re-run refuses to replace them ...
        run_entry(case, ENTRIES["infer"], data, tmp_path, infer)
    assert find_error(info.value, ConfigOverrideError) is not None, describe(info.value)
    run_entry(case, ENTRIES["infer"], data, tmp_path, {**infer, "overwrite": True})  # ... unless asked
    assert sorted((tmp_path / "out").glob("*_seg.nii.gz")) == predictions


def test_transform_checks_catch_what_the_datalist_check_skips(clean_data, tmp_path):
    """With the validation transforms in inference preprocessing, a NaN image passed through ``#data`` (no datalist
    validation) still fails naming the file."""
    case = bundle_case(CLMORPH)
    if case is None:
        pytest.skip("clmorph bundle not present")
    data, target = corrupted_copy(clean_data(CLMORPH), tmp_path / "data", CORRUPTIONS["image_nan"], "test")
    overrides = {"preprocessing#transforms": CLMORPH_INFER_PREPROCESSING}
    with pytest.raises(RuntimeError) as info:
        run_entry(case, ENTRIES["infer"], data, tmp_path / "work", overrides)
    found = find_error(info.value, DataValidationError)
    assert found is not None and target in str(found), describe(info.value)
