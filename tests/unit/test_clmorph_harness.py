"""Pure helpers of the bundle harness (the full harness runs in tests/bundles)."""

from __future__ import annotations

import sys

from tests.bundles.harness import BundleCase, cli_command, cli_value, input_shape_from_metadata, substitute


def test_cli_values_as_fire_reads_them():
    assert cli_value(False) == "False" and cli_value(None) == "None"
    assert cli_value([32, 32, 16]) == "[32, 32, 16]"
    assert cli_value(0.01) == "0.01" and cli_value("/data/x") == "/data/x"


def test_cli_command_single_and_stacked_configs():
    cmd = cli_command(["configs/train.json"], {"epochs": 1, "amp": False})
    assert cmd[:5] == [sys.executable, "-m", "monai.bundle", "run", "training"]
    assert cmd[cmd.index("--config_file") + 1] == "configs/train.json"
    assert cmd[-4:] == ["--epochs", "1", "--amp", "False"]
    stacked = cli_command(["configs/train.json", "configs/quick.json"], {})
    assert stacked[stacked.index("--config_file") + 1] == "['configs/train.json', 'configs/quick.json']"


def test_substitute_only_known_placeholders():
    paths = {"ckpt_dir": "/tmp/m", "data_dir": "/tmp/d"}
    value = {"a": "{ckpt_dir}/model.pt", "b": ["{data_dir}", 3], "c": "${'k': 1}"}
    assert substitute(value, paths) == {"a": "/tmp/m/model.pt", "b": ["/tmp/d", 3], "c": "${'k': 1}"}


def test_default_case_layout_and_metadata_shape(tmp_path):
    case = BundleCase(name="x", train_stages=[["configs/a.json"], ["configs/a.json", "configs/b.json"]])
    assert case.evaluate_files() == ["configs/a.json", "configs/b.json", "configs/evaluate.json"]
    meta = tmp_path / "metadata.json"
    meta.write_text(
        '{"network_data_format": {"inputs": {"image": {"num_channels": 2, "spatial_shape": ["16*n", 24, "*"]}}}}'
    )
    assert input_shape_from_metadata(meta) == [1, 2, 16, 24, 16]
