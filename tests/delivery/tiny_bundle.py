"""A tiny but complete segmentation bundle written into a temporary folder (a test fixture, not a product).

Why: the delivery tools (packaging, multi-GPU overrides, MLflow, MONAI Label, map_location) must be testable before and
independently of the real bundles. It follows BUNDLE_CONVENTIONS.md and reaches ``common`` two ways, as real bundles do:
from a config (``$import common.io`` in ``initialize``) and from ``scripts/`` (``common.registration.fields``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
NAME = "tiny_brain_mri_segmentation"
NUM_CLASSES = 9  # background + the 8 labels of the synthetic brain preset
SHAPE = (16, 16, 16)

GLUE = '''"""Bundle glue: the network and an identity warp that goes through the shared displacement-field code."""

import torch
from monai.networks.nets import UNet

from common.registration.fields import warp


def tiny_unet(out_channels: int) -> torch.nn.Module:
    return UNet(
        spatial_dims=3, in_channels=1, out_channels=out_channels, channels=(4, 8), strides=(2,), num_res_units=0
    )


def identity_warp(probabilities: torch.Tensor) -> torch.Tensor:
    """Warp [C, *spatial] class probabilities by a zero field (exercises the vendored ``common`` at inference)."""
    batch = probabilities[None].float()
    return warp(batch, torch.zeros(1, 3, *batch.shape[2:]))[0]
'''

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json",
    "version": "0.1.0",
    "changelog": {"0.1.0": "fixture"},
    "monai_version": "1.6.1",
    "pytorch_version": "2.13.0",
    "numpy_version": "2.0.0",
    "required_packages_version": {"nibabel": "5.0.0", "pytorch-ignite": "0.5.0"},
    "name": "Tiny brain segmentation",
    "task": "segmentation",
    "description": "test fixture",
    "authors": "delivery tests",
    "copyright": "none",
    "network_data_format": {
        "inputs": {
            "image": {
                "type": "image",
                "format": "magnitude",
                "modality": "MR",
                "num_channels": 1,
                "spatial_shape": [16, 16, 16],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {"0": "image"},
            }
        },
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": NUM_CLASSES,
                "spatial_shape": [16, 16, 16],
                "dtype": "float32",
                "value_range": [0, 1],
                "is_patch_data": False,
                "channel_def": {str(i): f"class{i}" for i in range(NUM_CLASSES)},
            }
        },
    },
}

LOAD = [
    {"_target_": "LoadImaged", "keys": "@image_keys", "image_only": True},
    {"_target_": "EnsureChannelFirstd", "keys": "@image_keys"},
    {"_target_": "EnsureTyped", "keys": "@image_keys"},
]

TRAIN = {
    "imports": [
        "$import glob",
        "$import os",
        "$import common",
        "$import common.io",
        "$import scripts",
        "$import scripts.glue",
    ],
    "bundle_root": ".",
    "ckpt_dir": "$@bundle_root + '/models'",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "$@bundle_root + '/data'",
    "datalist": "$@dataset_dir + '/datalist.json'",
    "image_keys": ["image", "label"],
    "num_classes": NUM_CLASSES,
    "val_interval": 1,
    "epochs": 1,
    "learning_rate": 0.001,
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "scripts.glue.tiny_unet", "out_channels": "@num_classes"},
    "network": "$@network_def.to(@device)",
    "loss": {"_target_": "DiceCELoss", "to_onehot_y": True, "softmax": True},
    "optimizer": {"_target_": "torch.optim.Adam", "params": "$@network.parameters()", "lr": "@learning_rate"},
    "train": {
        "preprocessing": {"_target_": "Compose", "transforms": LOAD},
        "dataset": {
            "_target_": "Dataset",
            "data": "$monai.data.load_decathlon_datalist(@datalist, True, 'training')",
            "transform": "@train#preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@train#dataset",
            "batch_size": 1,
            "shuffle": True,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "AsDiscreted",
                    "keys": ["pred", "label"],
                    "argmax": [True, False],
                    "to_onehot": "$[@num_classes, @num_classes]",
                },
            ],
        },
        "handlers": [
            {
                "_target_": "ValidationHandler",
                "validator": "@validate#evaluator",
                "epoch_level": True,
                "interval": "@val_interval",
            },
            {
                "_target_": "StatsHandler",
                "tag_name": "train_loss",
                "output_transform": "$monai.handlers.from_engine(['loss'], first=True)",
            },
        ],
        "key_metric": {
            "train_mean_dice": {
                "_target_": "MeanDice",
                "include_background": False,
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
        "trainer": {
            "_target_": "SupervisedTrainer",
            "max_epochs": "@epochs",
            "device": "@device",
            "train_data_loader": "@train#dataloader",
            "network": "@network",
            "loss_function": "@loss",
            "optimizer": "@optimizer",
            "inferer": "@train#inferer",
            "postprocessing": "@train#postprocessing",
            "key_train_metric": "@train#key_metric",
            "train_handlers": "@train#handlers",
        },
    },
    "validate": {
        "preprocessing": {"_target_": "Compose", "transforms": LOAD},
        "dataset": {
            "_target_": "Dataset",
            "data": "$monai.data.load_decathlon_datalist(@datalist, True, 'validation')",
            "transform": "@validate#preprocessing",
        },
        "dataloader": {
            "_target_": "DataLoader",
            "dataset": "@validate#dataset",
            "batch_size": 1,
            "shuffle": False,
            "num_workers": 0,
        },
        "inferer": {"_target_": "SimpleInferer"},
        "postprocessing": "%train#postprocessing",
        "handlers": [
            {"_target_": "StatsHandler", "iteration_log": False},
            {
                "_target_": "CheckpointSaver",
                "save_dir": "@ckpt_dir",
                "save_dict": {"model": "@network"},
                "save_key_metric": True,
                "key_metric_filename": "model.pt",
            },
        ],
        "key_metric": {
            "val_mean_dice": {
                "_target_": "MeanDice",
                "include_background": False,
                "output_transform": "$monai.handlers.from_engine(['pred', 'label'])",
            }
        },
        "evaluator": {
            "_target_": "SupervisedEvaluator",
            "device": "@device",
            "val_data_loader": "@validate#dataloader",
            "network": "@network",
            "inferer": "@validate#inferer",
            "postprocessing": "@validate#postprocessing",
            "key_val_metric": "@validate#key_metric",
            "val_handlers": "@validate#handlers",
        },
    },
    "initialize": [
        "$monai.utils.set_determinism(seed=0)",
        "$common.io.atomic_json_dump({'bundle': 'tiny'}, @output_dir + '/run_info.json')",
    ],
    "run": ["$@train#trainer.run()"],
    "training": ["$@train#trainer.run()"],
}

EVALUATE = {
    "validate#handlers": [
        {
            "_target_": "CheckpointLoader",
            "load_path": "$@ckpt_dir + '/model.pt'",
            "load_dict": {"model": "@network"},
            "map_location": "@device",
        },
        {"_target_": "StatsHandler", "iteration_log": False},
        {
            "_target_": "MetricsSaver",
            "save_dir": "@output_dir",
            "metrics": ["val_mean_dice"],
            "metric_details": ["val_mean_dice"],
            "batch_transform": "$lambda x: [xx['image'].meta for xx in x]",
            "summary_ops": "*",
        },
    ],
    "run": ["$@validate#evaluator.run()"],
    "training": ["$@validate#evaluator.run()"],
}

INFERENCE = {
    "imports": ["$import glob", "$import os", "$import common", "$import scripts", "$import scripts.glue"],
    "bundle_root": ".",
    "ckpt_dir": "$@bundle_root + '/models'",
    "output_dir": "$@bundle_root + '/eval'",
    "dataset_dir": "$@bundle_root + '/data'",
    "datalist": "$@dataset_dir + '/datalist.json'",
    "image_keys": ["image"],
    "num_classes": NUM_CLASSES,
    "load_pretrain": True,
    "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
    "network_def": {"_target_": "scripts.glue.tiny_unet", "out_channels": "@num_classes"},
    "network": "$@network_def.to(@device)",
    "preprocessing": {"_target_": "Compose", "transforms": LOAD},
    "dataset": {
        "_target_": "Dataset",
        "data": "$monai.data.load_decathlon_datalist(@datalist, True, 'test')",
        "transform": "@preprocessing",
    },
    "dataloader": {
        "_target_": "DataLoader",
        "dataset": "@dataset",
        "batch_size": 1,
        "shuffle": False,
        "num_workers": 0,
    },
    "inferer": {"_target_": "SimpleInferer"},
    "postprocessing": {
        "_target_": "Compose",
        "transforms": [
            {"_target_": "Activationsd", "keys": "pred", "softmax": True},
            {"_target_": "Lambdad", "keys": "pred", "func": "$scripts.glue.identity_warp"},
            {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            {
                "_target_": "SaveImaged",
                "keys": "pred",
                "output_dir": "@output_dir",
                "output_postfix": "seg",
                "output_dtype": "$numpy.uint8",
                "separate_folder": False,
                "resample": False,
            },
        ],
    },
    "handlers": [{"_target_": "StatsHandler", "iteration_log": False}],
    "evaluator": {
        "_target_": "SupervisedEvaluator",
        "device": "@device",
        "val_data_loader": "@dataloader",
        "network": "@network",
        "inferer": "@inferer",
        "postprocessing": "@postprocessing",
        "val_handlers": "@handlers",
    },
    "checkpointloader": {
        "_target_": "CheckpointLoader",
        "load_path": "$@ckpt_dir + '/model.pt'",
        "load_dict": {"model": "@network"},
        "map_location": "@device",
    },
    "initialize": [
        "$monai.utils.set_determinism(seed=0)",
        "$@checkpointloader(@evaluator) if @load_pretrain else None",
    ],
    "run": ["$@evaluator.run()"],
}

IMPORTS_DISTRIBUTED = ["$import common", "$import common.distributed"]
INIT_DISTRIBUTED = "$common.distributed.init_process_group(@dist_backend, @device)"

MULTI_GPU_TRAIN = {
    "imports_distributed": IMPORTS_DISTRIBUTED,
    "dist_backend": "$common.distributed.default_backend()",
    "device": "$common.distributed.local_device()",
    "train#trainer#network": {
        "_target_": "common.distributed.DistributedNetwork",
        "module": "@network",
        "device_ids": "$common.distributed.device_ids(@device)",
    },
    "train#sampler": {
        "_target_": "DistributedSampler",
        "dataset": "@train#dataset",
        "even_divisible": True,
        "shuffle": True,
    },
    "train#dataloader#sampler": "@train#sampler",
    "train#dataloader#shuffle": False,
    "train#trainer#train_handlers": "$common.distributed.rank0_handlers(@train#handlers)",
    "validate#sampler": {
        "_target_": "DistributedSampler",
        "dataset": "@validate#dataset",
        "even_divisible": False,
        "shuffle": False,
    },
    "validate#dataloader#sampler": "@validate#sampler",
    "validate#evaluator#val_handlers": "$common.distributed.rank0_handlers(@validate#handlers)",
    "initialize": [
        INIT_DISTRIBUTED,
        "$monai.utils.set_determinism(seed=common.distributed.get_rank())",
        *TRAIN["initialize"][1:],
    ],
    "finalize": ["$common.distributed.destroy_process_group()"],
}

MULTI_GPU_EVALUATE = {
    "imports_distributed": IMPORTS_DISTRIBUTED,
    "dist_backend": "$common.distributed.default_backend()",
    "device": "$common.distributed.local_device()",
    "validate#sampler": {
        "_target_": "DistributedSampler",
        "dataset": "@validate#dataset",
        "even_divisible": False,
        "shuffle": False,
    },
    "validate#dataloader#sampler": "@validate#sampler",
    "validate#evaluator#val_handlers": "$common.distributed.rank0_handlers(@validate#handlers)",
    "initialize": [INIT_DISTRIBUTED, *TRAIN["initialize"]],
    "finalize": ["$common.distributed.destroy_process_group()"],
}

LOGGING = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _dump(path: Path, obj: object) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=4) + "\n")


def write_tiny_bundle(parent: Path) -> Path:
    """Write the fixture bundle to ``parent/<NAME>``; return its root."""
    root = Path(parent) / NAME
    _dump(root / "configs" / "metadata.json", METADATA)
    _dump(root / "configs" / "train.json", TRAIN)
    _dump(root / "configs" / "evaluate.json", EVALUATE)
    _dump(root / "configs" / "inference.json", INFERENCE)
    _dump(root / "configs" / "multi_gpu_train.json", MULTI_GPU_TRAIN)
    _dump(root / "configs" / "multi_gpu_evaluate.json", MULTI_GPU_EVALUATE)
    (root / "configs" / "logging.conf").write_text(LOGGING)
    (root / "scripts").mkdir()
    (root / "scripts" / "__init__.py").write_text("")
    (root / "scripts" / "glue.py").write_text(GLUE)
    (root / "models").mkdir()
    (root / "models" / ".gitkeep").write_text("")
    (root / "docs").mkdir()
    (root / "docs" / "README.md").write_text("# Tiny fixture bundle\n")
    shutil.copy(REPO_ROOT / "LICENSE", root / "LICENSE")
    return root
