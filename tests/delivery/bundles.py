"""Which bundles the delivery tests run on, and a prepared workspace (data + weights) for each.

Real bundles are discovered from ``bundles/*/configs/metadata.json``; their data preset, shape and overrides come from
the harness ``BundleCase`` declared in ``tests/bundles/test_*.py`` (one source of truth per bundle). The tiny fixture
bundle (``tiny_bundle.py``) always runs, so the delivery tools are tested even before a real bundle exists.
"""

from __future__ import annotations

import copy
import importlib
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tests.bundles.harness import BundleCase, bundle_context, substitute
from tests.delivery import tiny_bundle

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLES_DIR = REPO_ROOT / "bundles"
TINY = tiny_bundle.NAME
TEST_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1", "NO_PROXY": "127.0.0.1"}


def discover_bundles() -> list[str]:
    return sorted(p.parents[1].name for p in BUNDLES_DIR.glob("*/configs/metadata.json"))


def all_bundle_names() -> list[str]:
    """The fixture first, then every real bundle (parametrisation ids)."""
    return [TINY, *discover_bundles()]


def subprocess_bundle_names() -> list[str]:
    """For the tests that pay subprocess start-ups (~10-20 s CPU each): the real bundles, the fixture only without."""
    return discover_bundles() or [TINY]


def harness_case(name: str) -> BundleCase | None:
    """The BundleCase a ``tests/bundles/test_*.py`` file declares for bundle ``name`` (None when there is none)."""
    for path in sorted((REPO_ROOT / "tests" / "bundles").glob("test_*.py")):
        module = importlib.import_module(f"tests.bundles.{path.stem}")
        for value in vars(module).values():
            if isinstance(value, BundleCase) and value.name == name:
                return value
    return None


def tiny_case(bundle_root: Path) -> BundleCase:
    case = BundleCase(
        name=TINY,
        preset="brain",
        shape=tiny_bundle.SHAPE,
        num_subjects=8,
        dataset_kwargs={"num_validation": 2, "num_test": 2},
        prediction_glob="*_seg.nii.gz",
    )
    case._root = bundle_root  # the fixture lives in a temporary folder, not under bundles/
    return case


@dataclass
class Workspace:
    """A bundle copy-free run setup: data in ``tmp/data``, weights in ``tmp/models``, outputs under ``tmp``."""

    case: BundleCase
    bundle_root: Path
    tmp: Path
    data_dir: Path
    datalist: Path
    ckpt_dir: Path
    extra: dict[str, Any] = field(default_factory=dict)

    def paths(self, output_dir: Path, bundle_root: Path | None = None) -> dict[str, str]:
        return {
            "bundle_root": str(bundle_root or self.bundle_root),
            "data_dir": str(self.data_dir),
            "datalist": str(self.datalist),
            "ckpt_dir": str(self.ckpt_dir),
            "output_dir": str(output_dir),
            "tmp": str(self.tmp),
        }

    def overrides(
        self, kind: str, output_dir: Path, with_ckpt_dir: bool = True, bundle_root: Path | None = None
    ) -> dict[str, Any]:
        """Harness-equivalent overrides for ``kind`` in {"train", "evaluate", "infer"} (bundle copy at ``bundle_root``).

        Without ``ckpt_dir`` the bundle uses its own ``models/`` folder (an unpacked archive's shipped weights).
        """
        paths = self.paths(output_dir, bundle_root)
        merged: dict[str, Any] = {
            "bundle_root": paths["bundle_root"],
            "dataset_dir": paths["data_dir"],
            "datalist": paths["datalist"],
            "output_dir": paths["output_dir"],
        }
        if with_ckpt_dir:
            merged["ckpt_dir"] = paths["ckpt_dir"]
        specific = {
            "train": self.case.train_overrides,
            "evaluate": self.case.evaluate_overrides,
            "infer": self.case.infer_overrides,
        }[kind]
        for more in (self.case.overrides, specific):
            merged.update(substitute(copy.deepcopy(dict(more)), paths))
        return merged


def bundle_root_of(case: BundleCase) -> Path:
    return getattr(case, "_root", None) or case.bundle_root


def make_workspace(case: BundleCase, tmp: Path) -> Workspace:
    from common.data.synthetic import generate_dataset

    data_dir = tmp / "data"
    datalist = generate_dataset(
        data_dir,
        preset=case.preset,
        num_subjects=case.num_subjects,
        shape=case.shape,
        seed=case.seed,
        num_sites=case.num_sites,
        **case.dataset_kwargs,
    )
    return Workspace(case, bundle_root_of(case), tmp, data_dir, Path(datalist), tmp / "models")


def build_inference_network(ws: Workspace, bundle_root: Path | None = None) -> torch.nn.Module:
    """``network_def`` of the inference config, as ckpt_export and MONAI Label build it."""
    from monai.bundle import ConfigParser

    root = bundle_root or ws.bundle_root
    with bundle_context(root):
        parser = ConfigParser()
        parser.read_config([str(root / f) for f in ws.case.inference_configs or ["configs/inference.json"]])
        parser.read_meta(str(root / "configs" / "metadata.json"))
        parser.update(ws.overrides("infer", ws.tmp / "unused"))
        parser["bundle_root"] = str(root)
        parser["device"] = "$torch.device('cpu')"
        return parser.get_parsed_content(ws.case.net_id, instantiate=True)


def write_fresh_weights(ws: Workspace, target: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """Save a seeded, freshly initialised ``network_def`` state_dict where inference expects ``model.pt``."""
    torch.manual_seed(seed)
    net = build_inference_network(ws)
    state = {k: v.detach().cpu() for k, v in net.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save({ws.case.key_in_ckpt: state} if ws.case.key_in_ckpt else state, target)
    return state


def subprocess_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(TEST_ENV)
    env.update(extra)
    return env


PYTHON = sys.executable
