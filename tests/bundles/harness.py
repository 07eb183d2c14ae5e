"""Bundle test harness: every bundle plugs in with one short test file.

A bundle test file declares a :class:`BundleCase` and turns it into a pytest test class::

    from tests.bundles.harness import BundleCase, make_bundle_tests

    CASE = BundleCase(
        name="clmorph_brain_mri_registration",          # folder under bundles/
        preset="brain", shape=(32, 32, 32), num_subjects=6,
        overrides={"image_size": [32, 32, 32]},          # every workflow
        train_overrides={"epochs": 1},                   # training stages and the CLI
        prediction_glob="**/*_seg.nii.gz",
        use_trace=True,                                  # ckpt_export through torch.jit.trace
    )
    TestClmorphBundle = make_bundle_tests(CASE)

The class then runs, against a tiny synthetic dataset written to a temporary folder (``common.data.synthetic``):

* ``test_train`` - every training stage through ``monai.bundle.ConfigWorkflow`` (``initialize``,
  ``check_properties`` with no failing property, ``run``, ``finalize``); each checkpoint in ``checkpoint_files`` must
  load and hold only finite tensors, and each glob of ``train_outputs`` (default: a validation PNG preview and a
  TensorBoard event file) must match a non-empty file under the ``output_dir`` of some training stage;
* ``test_train_evaluate`` - ``[train.json, evaluate.json]`` as the ``train`` workflow; the metric files must exist;
* ``test_infer`` - ``inference.json`` as the ``infer`` workflow with the trained weights; one prediction NIfTI per input
  with the input's affine and spatial shape (and only known label values for label maps);
* ``test_cli_train`` - ``python -m monai.bundle run training --config_file ...`` as a subprocess from the bundle root;
* ``test_verify_metadata`` - against the local schema copy (skipped with a reason when it is absent; never downloads);
* ``test_verify_net_in_out`` and ``test_ckpt_export`` (inference configs + ``overrides`` + ``infer_overrides``) - the
  exported TorchScript model must reproduce the eager ``network_def`` (trained weights) on a random input.

Every workflow receives these overrides, so nothing is written inside the bundle (the harness checks that):
``bundle_root`` (absolute bundle path), ``dataset_dir`` (the synthetic data folder), ``datalist`` (its JSON),
``ckpt_dir`` (shared by train, evaluate, infer and export) and ``output_dir`` (one folder per workflow). Inference
configs must therefore locate their weights through ``@ckpt_dir``. String values of the case's overrides may use the
placeholders ``{bundle_root}``, ``{data_dir}``, ``{datalist}``, ``{ckpt_dir}``, ``{output_dir}`` and ``{tmp}``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
import pytest
import torch

__all__ = ["BundleCase", "BundleTestSuite", "make_bundle_tests", "run_workflow", "cli_command", "REPO_ROOT"]

REPO_ROOT = Path(__file__).resolve().parents[2]
BUNDLES_DIR = REPO_ROOT / "bundles"
SCHEMA_DIR = REPO_ROOT.parent / "shared" / "conventions" / "schema"


@dataclass
class BundleCase:
    """What the harness needs to know about one bundle; defaults follow BUNDLE_CONVENTIONS.md."""

    name: str
    preset: str = "brain"
    shape: Sequence[int] | None = (32, 32, 32)
    num_subjects: int = 6
    seed: int = 0
    num_sites: int = 1
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)
    train_stages: list[list[str]] = field(default_factory=lambda: [["configs/train.json"]])
    evaluate_configs: list[str] | None = None  # default: last training stage + configs/evaluate.json
    inference_configs: list[str] | None = field(default_factory=lambda: ["configs/inference.json"])
    overrides: dict[str, Any] = field(default_factory=dict)
    train_overrides: dict[str, Any] = field(default_factory=dict)
    evaluate_overrides: dict[str, Any] = field(default_factory=dict)
    infer_overrides: dict[str, Any] = field(default_factory=dict)
    cli_overrides: dict[str, Any] | None = None  # default: overrides + train_overrides
    cli_stage: int = 0
    checkpoint_files: list[str] = field(default_factory=lambda: ["model.pt"])
    train_outputs: list[str] = field(default_factory=lambda: ["validation/*.png", "events.out.tfevents.*"])
    evaluate_outputs: list[str] = field(default_factory=lambda: ["*.csv"])
    infer_section: str = "test"
    prediction_glob: str = "**/*.nii.gz"
    prediction_is_label: bool = True
    require_foreground: bool = False
    net_id: str = "network_def"
    key_in_ckpt: str = ""
    use_trace: bool = False
    export_input_shape: Sequence[int] | None = None
    export_atol: float = 1e-4
    net_io_kwargs: dict[str, Any] = field(default_factory=dict)
    cli_timeout: float = 600.0
    skip: dict[str, str] = field(default_factory=dict)  # test name -> reason

    @property
    def bundle_root(self) -> Path:
        return BUNDLES_DIR / self.name

    def evaluate_files(self) -> list[str]:
        if self.evaluate_configs is not None:
            return list(self.evaluate_configs)
        return [*self.train_stages[-1], "configs/evaluate.json"]


# ---------------------------------------------------------------------------------------------------------------------
# helpers usable on their own
# ---------------------------------------------------------------------------------------------------------------------


def _purge_scripts_modules() -> None:
    """Every bundle has its own ``scripts`` package: drop the cached one so the next bundle imports its own."""
    for module in [m for m in sys.modules if m == "scripts" or m.startswith("scripts.")]:
        del sys.modules[module]


@contextlib.contextmanager
def bundle_context(bundle_root: Path) -> Iterator[None]:
    """Run as a user does: cwd = bundle root, bundle root first on ``sys.path``, a fresh ``scripts`` package."""
    old_cwd, root = Path.cwd(), str(bundle_root)
    _purge_scripts_modules()
    sys.path.insert(0, root)
    os.chdir(root)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        if root in sys.path:
            sys.path.remove(root)
        _purge_scripts_modules()


def _bundle_files(bundle_root: Path) -> set[str]:
    return {
        str(p.relative_to(bundle_root))
        for p in bundle_root.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and ".pytest_cache" not in p.parts
    }


def substitute(value: Any, paths: dict[str, str]) -> Any:
    """Replace ``{placeholder}`` tokens (only the known ones, so ``$`` expressions with braces survive)."""
    if isinstance(value, str):
        for key, path in paths.items():
            value = value.replace("{" + key + "}", path)
        return value
    if isinstance(value, list | tuple):
        return type(value)(substitute(v, paths) for v in value)
    if isinstance(value, dict):
        return {k: substitute(v, paths) for k, v in value.items()}
    return value


@contextlib.contextmanager
def initialized_workflow(
    bundle_root: Path,
    config_files: Sequence[str],
    workflow_type: str,
    overrides: dict[str, Any],
    **workflow_kwargs: Any,
) -> Iterator[Any]:
    """A ConfigWorkflow of the bundle built as ``python -m monai.bundle run`` builds it, initialised, inside
    `bundle_context` (``workflow_kwargs``: e.g. ``tracking``)."""
    from monai.bundle import ConfigWorkflow

    with bundle_context(bundle_root):
        workflow = ConfigWorkflow(
            config_file=[str(bundle_root / f) for f in config_files],
            meta_file=str(bundle_root / "configs" / "metadata.json"),
            logging_file=False,
            workflow_type=workflow_type,
            **workflow_kwargs,
            **overrides,
        )
        workflow.initialize()
        yield workflow


def run_workflow(
    bundle_root: Path, config_files: Sequence[str], workflow_type: str, overrides: dict[str, Any]
) -> list[str]:
    """initialize / check_properties / run / finalize one ConfigWorkflow; return the failing properties (none = ok)."""
    with initialized_workflow(bundle_root, config_files, workflow_type, overrides) as workflow:
        failing = workflow.check_properties() or []
        if failing:
            return list(failing)
        workflow.run()
        workflow.finalize()
    return []


def cli_value(value: Any) -> str:
    """Format an override as fire parses it (``True``/``False``, Python literals for containers)."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, list | tuple | dict):
        return repr(value)
    return str(value)


def cli_command(config_files: Sequence[str], overrides: dict[str, Any], run_id: str = "training") -> list[str]:
    """The training command exactly as a user types it from the bundle root (as an argv list)."""
    config = config_files[0] if len(config_files) == 1 else repr(list(config_files))
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", config]
    cmd += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    for key, value in overrides.items():
        cmd += [f"--{key}", cli_value(value)]
    return cmd


def _fake_shape_value(value: Any) -> int:
    """Smallest valid size of a metadata ``spatial_shape`` entry (int, "16*n", "2**p" or "*")."""
    if isinstance(value, int):
        return value
    text = str(value).strip()
    if text == "*":
        return 16
    return int(eval(text, {"__builtins__": {}}, {"n": 1, "p": 1}))  # noqa: S307 - metadata expressions only


def input_shape_from_metadata(meta_file: Path) -> list[int]:
    image = json.loads(meta_file.read_text())["network_data_format"]["inputs"]["image"]
    return [1, int(image["num_channels"]), *[_fake_shape_value(v) for v in image["spatial_shape"]]]


def _load_state(net: torch.nn.Module, ckpt_file: Path, key_in_ckpt: str) -> None:
    from ignite.handlers import Checkpoint

    Checkpoint.load_objects(to_load={key_in_ckpt: net}, checkpoint=torch.load(ckpt_file, map_location="cpu"))


def _matches_stem(relative: str, stem: str) -> bool:
    return re.search(rf"(^|[^0-9A-Za-z]){re.escape(stem)}([^0-9A-Za-z]|$)", relative) is not None


def _stem(path: str | Path) -> str:
    name = Path(path).name
    for ext in (".nii.gz", ".nii", ".npz", ".npy"):
        if name.endswith(ext):
            return name[: -len(ext)]
    return Path(name).stem


# ---------------------------------------------------------------------------------------------------------------------
# the generated test class
# ---------------------------------------------------------------------------------------------------------------------


class BundleTestSuite:
    """Base of the generated test classes (not collected itself: its name does not start with ``Test``)."""

    case: BundleCase

    def _skip_if_requested(self, test_name: str) -> None:
        if test_name in self.case.skip:
            pytest.skip(self.case.skip[test_name])

    @pytest.fixture(scope="class")
    @classmethod
    def workspace(cls, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
        from common.data.synthetic import generate_dataset

        case = cls.case
        if not (case.bundle_root / "configs" / "metadata.json").is_file():
            pytest.fail(f"bundle {case.name} not found (expected {case.bundle_root}/configs/metadata.json)")
        tmp = tmp_path_factory.mktemp(case.name)
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
        return {"tmp": tmp, "data_dir": data_dir, "datalist": Path(datalist), "ckpt_dir": tmp / "models"}

    @classmethod
    def _overrides(cls, ws: dict[str, Path], output_name: str, *extra: dict[str, Any]) -> dict[str, Any]:
        output_dir = ws["tmp"] / output_name
        paths = {
            "bundle_root": str(cls.case.bundle_root),
            "data_dir": str(ws["data_dir"]),
            "datalist": str(ws["datalist"]),
            "ckpt_dir": str(ws["ckpt_dir"]),
            "output_dir": str(output_dir),
            "tmp": str(ws["tmp"]),
        }
        merged: dict[str, Any] = {
            "bundle_root": paths["bundle_root"],
            "dataset_dir": paths["data_dir"],
            "datalist": paths["datalist"],
            "ckpt_dir": paths["ckpt_dir"],
            "output_dir": paths["output_dir"],
        }
        for more in (cls.case.overrides, *extra):
            merged.update(substitute(dict(more), paths))
        return merged

    @classmethod
    def _run_checked(cls, files: Sequence[str], workflow_type: str, overrides: dict[str, Any]) -> None:
        root = cls.case.bundle_root
        before = _bundle_files(root)
        failing = run_workflow(root, files, workflow_type, overrides)
        assert not failing, f"{cls.case.name} {list(files)}: failing/missing bundle properties {failing}"
        written = sorted(_bundle_files(root) - before)
        assert not written, f"{cls.case.name} wrote into the bundle folder (use the overridable dirs): {written}"

    @pytest.fixture(scope="class")
    @classmethod
    def trained(cls, workspace: dict[str, Path]) -> dict[str, Path]:
        for i, stage in enumerate(cls.case.train_stages):
            overrides = cls._overrides(workspace, f"train_stage{i}", cls.case.train_overrides)
            cls._run_checked(stage, "train", overrides)
        return workspace

    # -- tests -----------------------------------------------------------------------------------------------------

    def test_train(self, trained: dict[str, Path]) -> None:
        self._skip_if_requested("test_train")
        for name in self.case.checkpoint_files:
            path = trained["ckpt_dir"] / name
            assert path.is_file(), f"training did not write {path}"
            state = torch.load(path, map_location="cpu")
            tensors = [t for t in _iter_tensors(state) if t.is_floating_point()]
            assert tensors, f"{path} holds no floating-point tensor"
            bad = [i for i, t in enumerate(tensors) if not torch.isfinite(t).all()]
            assert not bad, f"{path}: {len(bad)} tensors contain NaN/Inf"
        stage_dirs = [trained["tmp"] / f"train_stage{i}" for i in range(len(self.case.train_stages))]
        for pattern in self.case.train_outputs:
            found = [p for d in stage_dirs for p in d.glob(pattern) if p.is_file() and p.stat().st_size > 0]
            assert found, f"training wrote no non-empty file matching {pattern!r} under {[str(d) for d in stage_dirs]}"

    def test_train_evaluate(self, trained: dict[str, Path]) -> None:
        self._skip_if_requested("test_train_evaluate")
        overrides = self._overrides(trained, "evaluate", self.case.evaluate_overrides)
        self._run_checked(self.case.evaluate_files(), "train", overrides)
        out = Path(overrides["output_dir"])
        for pattern in self.case.evaluate_outputs:
            found = [p for p in out.glob(pattern) if p.is_file()]
            assert found, f"evaluation wrote no file matching {pattern!r} under {out}"
            assert all(p.stat().st_size > 0 for p in found), f"empty evaluation output among {found}"

    def test_infer(self, trained: dict[str, Path]) -> None:
        self._skip_if_requested("test_infer")
        if not self.case.inference_configs:
            pytest.skip("the case declares no inference config")
        from common.data.datalist import load_datalist, read_datalist_json

        overrides = self._overrides(trained, "infer", self.case.infer_overrides)
        self._run_checked(self.case.inference_configs, "infer", overrides)
        out = Path(overrides["output_dir"])
        predictions = sorted(p for p in out.glob(self.case.prediction_glob) if p.is_file())
        assert predictions, f"inference wrote nothing matching {self.case.prediction_glob!r} under {out}"
        entries = load_datalist(trained["datalist"], self.case.infer_section, require_label=False, validate=False)
        labels = {int(k) for k in read_datalist_json(trained["datalist"]).get("labels", {"0": ""})}
        for entry in entries:
            stem = _stem(entry["image"])
            mine = [p for p in predictions if _matches_stem(str(p.relative_to(out)), stem)]
            assert mine, f"no prediction for input {stem} among {[p.name for p in predictions]}"
            reference = nib.load(entry["image"])
            for path in mine:
                pred = nib.load(str(path))
                assert pred.shape[:3] == reference.shape[:3], f"{path.name}: shape {pred.shape} != {reference.shape}"
                np.testing.assert_allclose(pred.affine, reference.affine, atol=1e-4, err_msg=f"{path.name}: affine")
                if self.case.prediction_is_label:
                    values = np.unique(np.asarray(pred.dataobj))
                    assert np.all(values == np.round(values)), f"{path.name}: non-integer label values"
                    unknown = set(values.astype(int).tolist()) - labels
                    assert not unknown, f"{path.name}: label values {sorted(unknown)} not in the datalist labels"
                    if self.case.require_foreground:
                        assert values.max() > 0, f"{path.name}: prediction is all background"

    def test_cli_train(self, workspace: dict[str, Path]) -> None:
        self._skip_if_requested("test_cli_train")
        case = self.case
        extra = case.cli_overrides if case.cli_overrides is not None else case.train_overrides
        overrides = self._overrides(workspace, "cli_train", extra)
        overrides["ckpt_dir"] = str(workspace["tmp"] / "cli_models")
        cmd = cli_command(case.train_stages[case.cli_stage], overrides)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONDONTWRITEBYTECODE": "1"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
        before = _bundle_files(case.bundle_root)
        proc = subprocess.run(
            cmd, cwd=case.bundle_root, env=env, capture_output=True, text=True, timeout=case.cli_timeout, check=False
        )
        assert (
            proc.returncode == 0
        ), f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        if case.cli_stage == 0:
            for name in case.checkpoint_files[:1]:
                assert (Path(overrides["ckpt_dir"]) / name).is_file(), f"CLI training wrote no {name}"
        written = sorted(_bundle_files(case.bundle_root) - before)
        assert not written, f"CLI training wrote into the bundle folder: {written}"

    def test_verify_metadata(self) -> None:
        self._skip_if_requested("test_verify_metadata")
        from monai.bundle import verify_metadata

        meta_file = self.case.bundle_root / "configs" / "metadata.json"
        url = json.loads(meta_file.read_text()).get("schema")
        assert url, f"{meta_file} has no 'schema' URL"
        schema = SCHEMA_DIR / Path(url).name
        if not schema.is_file():
            pytest.skip(f"local schema copy {schema} is absent; verify_metadata would download it (no network)")
        verify_metadata(meta_file=str(meta_file), filepath=str(schema))

    def test_verify_net_in_out(self, workspace: dict[str, Path]) -> None:
        self._skip_if_requested("test_verify_net_in_out")
        if not self.case.inference_configs:
            pytest.skip("the case declares no inference config")
        from monai.bundle import verify_net_in_out

        root = self.case.bundle_root
        overrides = self._overrides(workspace, "verify", self.case.infer_overrides)
        with bundle_context(root):
            verify_net_in_out(
                net_id=self.case.net_id,
                meta_file=str(root / "configs" / "metadata.json"),
                config_file=[str(root / f) for f in self.case.inference_configs],
                device="cpu",
                **self.case.net_io_kwargs,
                **overrides,
            )

    def test_ckpt_export(self, trained: dict[str, Path]) -> None:
        self._skip_if_requested("test_ckpt_export")
        if not self.case.inference_configs:
            pytest.skip("the case declares no inference config")
        from monai.bundle import ConfigParser, ckpt_export

        case, root = self.case, self.case.bundle_root
        meta_file = root / "configs" / "metadata.json"
        configs = [str(root / f) for f in case.inference_configs]
        ckpt_file = trained["ckpt_dir"] / case.checkpoint_files[0]
        ts_file = trained["tmp"] / "export" / "model.ts"
        ts_file.parent.mkdir(parents=True, exist_ok=True)
        shape = list(case.export_input_shape or input_shape_from_metadata(meta_file))
        overrides = self._overrides(trained, "export", case.infer_overrides)
        with bundle_context(root):
            ckpt_export(
                net_id=case.net_id,
                filepath=str(ts_file),
                ckpt_file=str(ckpt_file),
                meta_file=str(meta_file),
                config_file=configs,
                key_in_ckpt=case.key_in_ckpt,
                use_trace=case.use_trace,
                input_shape=shape if case.use_trace else None,
                **overrides,
            )
            parser = ConfigParser()
            parser.read_config(configs)
            parser.read_meta(str(meta_file))
            parser.update(overrides)
            eager = parser.get_parsed_content(case.net_id, instantiate=True)
            _load_state(eager, ckpt_file, case.key_in_ckpt)
        assert ts_file.is_file(), f"ckpt_export wrote no {ts_file}"
        exported = torch.jit.load(str(ts_file), map_location="cpu")
        eager = eager.to("cpu").eval()
        exported.eval()
        generator = torch.Generator().manual_seed(0)
        sample = torch.rand(*shape, generator=generator)
        with torch.no_grad():
            expected, got = eager(sample), exported(sample)
        assert isinstance(got, torch.Tensor) and got.shape == expected.shape, "exported output differs in shape"
        torch.testing.assert_close(got, expected, atol=case.export_atol, rtol=1e-4)


def _iter_tensors(obj: Any) -> Iterator[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for value in obj.values():
            yield from _iter_tensors(value)
    elif isinstance(obj, list | tuple):
        for value in obj:
            yield from _iter_tensors(value)


def make_bundle_tests(case: BundleCase) -> type:
    """A pytest test class for ``case``; assign it to a module-level name starting with ``Test``."""
    class_name = "Test_" + re.sub(r"\W", "_", case.name)
    return type(class_name, (BundleTestSuite,), {"case": case, "__module__": sys._getframe(1).f_globals["__name__"]})
