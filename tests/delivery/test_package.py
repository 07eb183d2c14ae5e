"""common.package: which ``common`` modules get vendored, archive layout, reproducibility, sha256 verification."""

from __future__ import annotations

import hashlib
import json
import subprocess
import zipfile
from pathlib import Path

import pytest

from common.package import (
    ArchiveIntegrityError,
    build_archive,
    common_modules_needed,
    extract_archive,
    main,
    verify_archive,
)
from tests.delivery.bundles import PYTHON, REPO_ROOT, subprocess_env
from tests.delivery.tiny_bundle import NAME, write_tiny_bundle


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_common_modules_needed_follows_configs_scripts_and_imports(tmp_path: Path) -> None:
    """A fake ``common`` tree with every import form; the expected closure is worked out by hand below."""
    src = tmp_path / "src"
    _write(src / "common" / "__init__.py", "")
    _write(src / "common" / "a" / "__init__.py", "from .b import Net\n")
    _write(src / "common" / "a" / "b.py", "import numpy\nfrom ..c import helper\n\nclass Net: ...\n")
    _write(src / "common" / "c.py", "import scipy.ndimage\ndef helper(): ...\n")
    _write(src / "common" / "d.py", "import common.c\n")  # reachable from nothing: must stay out
    _write(src / "common" / "e.py", "from common import c\n")
    _write(src / "common" / "f.py", "import json\n")
    bundle = tmp_path / "b"
    _write(
        bundle / "configs" / "train.json",
        json.dumps({"imports": ["$import common"], "net": {"_target_": "common.a.b.Net"}}),
    )
    _write(
        bundle / "configs" / "inference.json", json.dumps({"x": "$common.f.thing(1)", "h": ["TensorBoardStatsHandler"]})
    )
    _write(bundle / "scripts" / "glue.py", "import importlib\nmod = importlib.import_module('common.e')\n")
    modules, third_party = common_modules_needed(bundle, source_root=src)
    # configs: common, common.a.b (+ its parent common.a), common.f; scripts: common.e (string); b -> ..c; e -> c
    assert modules == ["common", "common.a", "common.a.b", "common.c", "common.e", "common.f"]
    assert {"numpy", "scipy", "importlib", "json", "tensorboard"} <= third_party


@pytest.fixture()
def tiny(tmp_path: Path) -> Path:
    root = write_tiny_bundle(tmp_path / "src")
    (root / "models" / "model.pt").write_bytes(b"weights")
    (root / "models" / "checkpoint.pt").write_bytes(b"resumable state")
    _write(root / "eval" / "metrics.csv", "run output\n")
    _write(root / "scripts" / "__pycache__" / "glue.cpython-311.pyc", "cache")
    return root


def test_archive_layout_vendoring_and_reproducibility(tiny: Path, tmp_path: Path) -> None:
    result = build_archive(tiny, tmp_path / "dist")
    assert result.archive == tmp_path / "dist" / f"{NAME}_v0.1.0.zip"
    with zipfile.ZipFile(result.archive) as archive:
        names = set(archive.namelist())
        vendored = {n: archive.read(n) for n in names if n.startswith(f"{NAME}/common/")}
    assert {n.split("/")[0] for n in names} == {NAME}
    for expected in (
        "LICENSE",
        "configs/metadata.json",
        "configs/inference.json",
        "configs/multi_gpu_train.json",
        "scripts/glue.py",
        "models/model.pt",
        "models/.gitkeep",
        "docs/README.md",
    ):
        assert f"{NAME}/{expected}" in names, expected
    for excluded in ("models/checkpoint.pt", "eval/metrics.csv", "scripts/__pycache__/glue.cpython-311.pyc"):
        assert f"{NAME}/{excluded}" not in names, excluded
    # scripts/glue.py imports common.registration.fields; the configs use common.io and common.distributed.
    for module in ("__init__.py", "io.py", "distributed.py", "registration/__init__.py", "registration/fields.py"):
        assert f"{NAME}/common/{module}" in vendored, module
        assert vendored[f"{NAME}/common/{module}"] == (REPO_ROOT / "common" / module).read_bytes()
    assert f"{NAME}/common/package.py" not in vendored  # nothing the bundle does not reach
    assert result.missing_requirements == [], "the fixture lists every third-party import"
    line = result.sha256_file.read_text().split()
    assert line == [hashlib.sha256(result.archive.read_bytes()).hexdigest(), result.archive.name]
    again = build_archive(tiny, tmp_path / "dist2")
    assert again.sha256 == result.sha256, "same bundle, same bytes: archives must be reproducible"


def test_verify_and_extract_refuse_altered_archives(tiny: Path, tmp_path: Path) -> None:
    result = build_archive(tiny, tmp_path / "dist")
    assert main(["verify", str(result.archive), "--sha256", str(result.sha256_file)]) == 0
    root = extract_archive(result.archive, tmp_path / "ok", result.sha256_file)
    assert (root / "configs" / "metadata.json").read_bytes() == (tiny / "configs" / "metadata.json").read_bytes()

    altered = tmp_path / "altered.zip"
    data = bytearray(result.archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    altered.write_bytes(bytes(data))
    assert main(["verify", str(altered), "--sha256", str(result.sha256_file)]) == 1
    with pytest.raises(ArchiveIntegrityError, match="sha256"):
        extract_archive(altered, tmp_path / "bad", result.sha256_file)
    assert not (tmp_path / "bad").exists(), "nothing may be unpacked before the hash matched"

    escaping = tmp_path / "escaping.zip"
    with zipfile.ZipFile(escaping, "w") as archive:
        archive.writestr(f"{NAME}/configs/metadata.json", "{}")
        archive.writestr("../outside.txt", "x")
    digest = hashlib.sha256(escaping.read_bytes()).hexdigest()
    assert verify_archive(escaping, digest) == digest
    with pytest.raises(ArchiveIntegrityError, match="unsafe"):
        extract_archive(escaping, tmp_path / "esc", digest)
    assert not (tmp_path / "outside.txt").exists()


def test_cli_builds_and_reports_missing_requirements(tiny: Path, tmp_path: Path) -> None:
    meta_file = tiny / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    del meta["required_packages_version"]["nibabel"]  # LoadImaged of NIfTI and common.io need nibabel
    meta_file.write_text(json.dumps(meta))
    cmd = [PYTHON, "-m", "common.package", str(tiny), "--out", str(tmp_path / "dist")]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT, check=False)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "dist" / f"{NAME}_v0.1.0.zip.sha256").is_file()
    assert "nibabel" in proc.stderr and "required_packages_version" in proc.stderr
    strict = subprocess.run([*cmd, "--strict"], capture_output=True, text=True, env=subprocess_env(), cwd=REPO_ROOT)
    assert strict.returncode == 1 and "nibabel" in strict.stderr
