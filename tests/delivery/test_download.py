"""End to end: package -> serve over HTTP -> ``monai.bundle download`` -> verify -> infer from the unpacked archive.

The inference runs in a subprocess whose only way to ``common`` is the vendored copy inside the archive (see
``isolated_bundle_run.py``), and its predictions must equal those of the same bundle run from the repo.
"""

from __future__ import annotations

import functools
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from common.package import build_archive, verify_archive
from tests.bundles.harness import cli_value, run_workflow
from tests.delivery.bundles import (
    PYTHON,
    REPO_ROOT,
    TINY,
    bundle_root_of,
    harness_case,
    make_workspace,
    subprocess_bundle_names,
    subprocess_env,
    tiny_case,
    write_fresh_weights,
)
from tests.delivery.tiny_bundle import write_tiny_bundle

LAUNCHER = Path(__file__).with_name("isolated_bundle_run.py")


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - signature of the base class
        """No request log on stderr."""


@contextmanager
def http_server(directory: Path) -> Iterator[int]:
    """Serve ``directory`` on 127.0.0.1 at a free port from a background thread; yield the port."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=subprocess_env(), capture_output=True, text=True, timeout=timeout)
    assert (
        proc.returncode == 0
    ), f"{' '.join(cmd)}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _outputs(folder: Path) -> dict[str, np.ndarray]:
    return {str(p.relative_to(folder)): np.asarray(nib.load(p).dataobj) for p in sorted(folder.rglob("*.nii.gz"))}


def test_isolation_hides_the_repo_copy(tmp_path: Path) -> None:
    """Without a bundle folder around, the launcher cannot import `common` at all (the editable install is hidden)."""
    proc = _run([PYTHON, "-s", str(LAUNCHER), str(REPO_ROOT), "--probe"], cwd=tmp_path)
    assert "COMMON_SPEC=None" in proc.stdout, proc.stdout


@pytest.mark.parametrize("name", subprocess_bundle_names())
def test_download_unpack_and_infer_without_repo(name: str, tmp_path: Path) -> None:
    case = tiny_case(write_tiny_bundle(tmp_path / "src")) if name == TINY else harness_case(name)
    if case is None:
        pytest.skip(f"{name}: no harness BundleCase in tests/bundles yet")
    if not case.inference_configs:
        pytest.skip(f"{name}: the harness case declares no inference config")
    staged = tmp_path / "staged" / name
    shutil.copytree(bundle_root_of(case), staged, ignore=shutil.ignore_patterns("__pycache__", "eval", "*.pt", "*.ts"))
    ws = make_workspace(case, tmp_path)
    ws.bundle_root = staged
    write_fresh_weights(ws, staged / "models" / "model.pt")
    result = build_archive(staged, tmp_path / "dist")

    downloaded = tmp_path / "downloaded"
    with http_server(result.archive.parent) as port:
        url = f"http://127.0.0.1:{port}/{result.archive.name}"
        cmd = [PYTHON, "-m", "monai.bundle", "download", "--name", name, "--url", url, "--bundle_dir", str(downloaded)]
        _run(cmd, cwd=tmp_path)
    verify_archive(downloaded / f"{name}.zip", result.sha256_file)
    unpacked = downloaded / name
    assert (unpacked / "models" / "model.pt").read_bytes() == (staged / "models" / "model.pt").read_bytes()
    assert (unpacked / "common" / "__init__.py").is_file(), "the archive must vendor common/"

    configs = case.inference_configs
    overrides = ws.overrides("infer", tmp_path / "out_unpacked", with_ckpt_dir=False, bundle_root=unpacked)
    config_arg = configs[0] if len(configs) == 1 else repr(list(configs))
    cmd = [PYTHON, "-s", str(LAUNCHER), str(REPO_ROOT), "run", "--config_file", config_arg]
    cmd += ["--meta_file", "configs/metadata.json", "--logging_file", "configs/logging.conf"]
    for key, value in overrides.items():
        cmd += [f"--{key}", cli_value(value)]
    proc = _run(cmd, cwd=unpacked)
    common_file = proc.stdout.strip().splitlines()[-1].removeprefix("COMMON_FILE=")
    assert Path(common_file).resolve().is_relative_to(unpacked.resolve()), f"common came from {common_file}"

    reference = ws.overrides("infer", tmp_path / "out_repo", with_ckpt_dir=False)
    assert not run_workflow(staged, configs, "infer", reference)
    expected, got = _outputs(tmp_path / "out_repo"), _outputs(tmp_path / "out_unpacked")
    assert expected, "the repo inference wrote no NIfTI"
    assert sorted(got) == sorted(expected)
    for key, array in expected.items():
        np.testing.assert_allclose(got[key], array, rtol=0, atol=1e-5, err_msg=key)
