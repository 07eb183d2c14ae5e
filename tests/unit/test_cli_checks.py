"""Override checks: each wrong type or range names the id; correct values pass."""

from __future__ import annotations

import pytest

from common.cli_checks import (
    ConfigOverrideError,
    check_batch_fits,
    check_config,
    check_min_items,
    check_needs_config,
    check_output_dir_free,
    check_together,
)


@pytest.mark.parametrize(
    "rule, good, bad",
    [
        ("positive_int", [1, 200], [0, -3, 2.0, "10", True, None]),
        ("non_negative_int", [0, 4], [-1, 1.5, "0"]),
        ("optional_positive_int", [None, 3], [0, "3"]),
        ("positive_float", [1e-4, 3], [0, -1.0, float("nan"), float("inf"), "0.1", False]),
        ("non_negative_float", [0, 0.5], [-0.1, float("nan"), "0"]),
        ("probability", [0, 0.5, 1], [1.5, -0.1, "0.5"]),
        ("bool", [True, False], ["false", "True", 0, 1, None]),
        ("positive_int_list", [[1], (4, 5)], [[], [0, 2], "32", [2.0], 32]),
        ("spatial_size_3d", [[32, 32, 32]], [[32, 32], [32, 32, 0], "[32,32,32]"]),
    ],
)
def test_rules(rule, good, bad):
    for value in good:
        assert check_config({"the_id": (rule, value)})
    for value in bad:
        with pytest.raises(ConfigOverrideError) as info:
            check_config({"the_id": (rule, value)})
        message = str(info.value)
        assert "'the_id'" in message and "--the_id" in message and repr(value) in message


def test_string_boolean_explains_fire():
    with pytest.raises(ConfigOverrideError, match="truthy string"):
        check_config({"amp": ("bool", "false")})


def test_first_failing_id_is_named():
    spec = {"epochs": ("positive_int", 3), "batch_size": ("positive_int", "two"), "lr": ("positive_float", -1)}
    with pytest.raises(ConfigOverrideError, match="'batch_size'"):
        check_config(spec)


def test_unknown_rule_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown rule"):
        check_config({"x": ("integer", 1)})


def test_error_is_a_value_error():
    assert issubclass(ConfigOverrideError, ValueError)


def test_min_items():
    assert check_min_items([1, 2], "train_datalist", 2, "pair sampling") == [1, 2]
    with pytest.raises(ConfigOverrideError, match="train_datalist has 1 item.*pair sampling needs at least 2"):
        check_min_items([1], "train_datalist", 2, "pair sampling")


def test_batch_fits():
    assert check_batch_fits(3, "volumes_per_batch", range(3), "pretrain_datalist", minimum=2) == 3
    with pytest.raises(ConfigOverrideError, match="'volumes_per_batch' = 4 but pretrain_datalist has 3"):
        check_batch_fits(4, "volumes_per_batch", range(3), "pretrain_datalist")
    with pytest.raises(ConfigOverrideError, match="at least 2 are needed"):
        check_batch_fits(1, "volumes_per_batch", range(3), "pretrain_datalist", minimum=2)
    with pytest.raises(ConfigOverrideError, match="'volumes_per_batch'"):
        check_batch_fits("4", "volumes_per_batch", range(3), "pretrain_datalist")
    with pytest.raises(ConfigOverrideError, match="pretrain_datalist has 1 item.*at least 2 distinct"):
        check_batch_fits(2, "volumes_per_batch", range(1), "pretrain_datalist", minimum=2)


def test_output_dir_free(tmp_path):
    out = tmp_path / "preds"
    assert check_output_dir_free(out, overwrite=False) == out  # absent folder
    out.mkdir()
    check_output_dir_free(out, overwrite=False)  # empty folder
    (out / "sub005_seg.nii.gz").write_bytes(b"x")
    with pytest.raises(ConfigOverrideError, match=r"already holds results \(sub005_seg.nii.gz\).*--overwrite True"):
        check_output_dir_free(out, overwrite=False)
    check_output_dir_free(out, overwrite=True)
    check_output_dir_free(out, overwrite=False, pattern="*.csv")  # only matching files count
    with pytest.raises(ConfigOverrideError, match="'overwrite'"):
        check_output_dir_free(out, overwrite="false")


def test_together():
    assert check_together({"atlas_image": None, "atlas_label": None}, "an atlas needs its label map")
    assert check_together({"atlas_image": "a.nii", "atlas_label": "b.nii"}, "an atlas needs its label map")
    with pytest.raises(ConfigOverrideError, match=r"\['atlas_image'\] are set but \['atlas_label'\].*--atlas_label"):
        check_together({"atlas_image": "a.nii", "atlas_label": None}, "an atlas needs its label map")


def test_needs_config():
    layered = "configs/inference_atlas_outputs.json"
    assert check_needs_config({"save_ddf": False, "num_samples": 0}, layered)
    with pytest.raises(
        ConfigOverrideError, match=r"\['num_samples'\] are set but only configs/inference_atlas_outputs"
    ):
        check_needs_config({"save_ddf": False, "num_samples": 2}, layered)
