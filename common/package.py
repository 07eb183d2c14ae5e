"""Self-contained bundle archives in the Model Zoo layout, with the ``common`` code they import vendored inside.

Why: bundle configs say ``$import common.x``; in the repo that resolves through ``pip install -e .``, but a user
who only downloads ``<name>_v<version>.zip`` has MONAI and nothing else. The archive therefore carries a copy of
exactly the ``common`` modules the bundle reaches (configs, ``scripts/`` and their transitive ``common`` imports) at
``<name>/common/``. MONAI's CLI run from the bundle root has the bundle root first on ``sys.path`` (``python -m``
adds the working directory), so ``$import common...`` finds the vendored copy before any installed one.

Commands::

    python -m common.package bundles/<name> [bundles/<other> ...] --out dist/   # writes dist/<name>_v<ver>.zip(.sha256)
    python -m common.package verify dist/<name>_v<ver>.zip --sha256 dist/<name>_v<ver>.zip.sha256
    python -m common.package extract dist/<name>_v<ver>.zip --sha256 <file> --out <dir>  # verify, then unpack

The ``.sha256`` file has the ``sha256sum`` format, so ``sha256sum -c <file>`` checks it without this repo. Archives are
byte-reproducible (sorted entries, fixed timestamps and permissions): the same bundle gives the same hash.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import re
import sys
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from common.io import atomic_path, atomic_write_text

__all__ = [
    "ArchiveIntegrityError",
    "PackageResult",
    "build_archive",
    "common_modules_needed",
    "extract_archive",
    "main",
    "sha256_of",
    "verify_archive",
]

PACKAGE = "common"
COMMON_ROOT = Path(__file__).resolve().parent
# Folders a run writes into the bundle (outputs, data, caches): never part of a release archive.
EXCLUDED_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", ".git", "eval", "data", "runs", "mlruns"}
# Resumable training state (optimizer, RNG, engine) is not a release artefact; a shipped one would make the user's
# first training run resume instead of start.
EXCLUDED_MODEL_PATTERN = re.compile(r"^checkpoint.*\.pt$")
ZIP_DATE = (1980, 1, 1, 0, 0, 0)
# import name -> pip name, for the requirement check of vendored code.
PIP_NAMES = {
    "PIL": "pillow",
    "cv2": "opencv-python",
    "ignite": "pytorch-ignite",
    "skimage": "scikit-image",
    "sklearn": "scikit-learn",
    "yaml": "pyyaml",
}
# MONAI components named in configs whose optional dependency MONAI imports lazily (missing -> error at run time).
CONFIG_COMPONENT_PACKAGES = {
    "TensorBoardStatsHandler": "tensorboard",
    "TensorBoardImageHandler": "tensorboard",
    "MLFlowHandler": "mlflow",
}
ALWAYS_AVAILABLE = {"monai", "torch", "numpy"}  # MONAI itself and the versions metadata.json pins explicitly
_DOTTED = re.compile(rf"(?<![\w.]){PACKAGE}(?:\.[A-Za-z_]\w*)*")


class ArchiveIntegrityError(ValueError):
    """The archive does not match its sha256, or its member paths would escape the target folder."""


@dataclass
class PackageResult:
    """What ``build_archive`` wrote and what the vendored code needs."""

    archive: Path
    sha256_file: Path
    sha256: str
    vendored_modules: list[str]
    members: list[str]
    missing_requirements: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------------------------------
# which common modules a bundle needs
# ---------------------------------------------------------------------------------------------------------------------


def _module_file(module: str, root: Path) -> Path | None:
    """File of ``common.a.b`` under ``root`` (the folder holding the ``common`` package), or None."""
    parts = module.split(".")
    base = root.joinpath(*parts)
    if (base / "__init__.py").is_file():
        return base / "__init__.py"
    if base.with_suffix(".py").is_file():
        return base.with_suffix(".py")
    return None


def _resolve_longest(dotted: str, root: Path) -> str | None:
    """Longest prefix of ``dotted`` that is a module (``common.a.b.fn`` -> ``common.a.b``)."""
    parts = dotted.split(".")
    for end in range(len(parts), 0, -1):
        candidate = ".".join(parts[:end])
        if _module_file(candidate, root) is not None:
            return candidate
    return None


def _with_parents(module: str) -> list[str]:
    parts = module.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def _is_package(module: str, root: Path) -> bool:
    file = _module_file(module, root)
    return file is not None and file.name == "__init__.py"


def _python_imports(source: str, module: str | None, is_package: bool) -> tuple[set[str], set[str]]:
    """(dotted names that may be ``common`` modules, top-level third-party names) imported by ``source``.

    Relative imports are resolved against ``module``; string constants that look like ``common.x.y`` (e.g. for
    ``importlib.import_module``) count as imports too.
    """
    tree = ast.parse(source)
    candidates: set[str] = set()
    top_level: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                candidates.add(alias.name)
                top_level.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                if module is None:
                    continue
                package_parts = module.split(".") if is_package else module.split(".")[:-1]
                keep = len(package_parts) - (node.level - 1)
                base = ".".join(package_parts[:keep] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
                top_level.add(base.split(".")[0])
            candidates.add(base)
            candidates.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            candidates.update(_DOTTED.findall(node.value))
    return {c for c in candidates if c == PACKAGE or c.startswith(PACKAGE + ".")}, top_level


def _config_strings(value: object) -> Iterable[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield str(key)
            yield from _config_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _config_strings(item)


def _load_config(path: Path) -> object:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    import yaml  # YAML configs are optional; MONAI needs PyYAML for them anyway

    return yaml.safe_load(path.read_text())


def _skipped(relative: Path) -> bool:
    """Run outputs and caches, and a ``common`` copy vendored earlier (re-vendored from the source tree)."""
    return bool(set(relative.parts[:-1]) & EXCLUDED_DIRS) or relative.parts[0] == PACKAGE


def _bundle_python_files(bundle_dir: Path) -> list[Path]:
    return sorted(p for p in bundle_dir.rglob("*.py") if not _skipped(p.relative_to(bundle_dir)))


def common_modules_needed(bundle_dir: str | Path, source_root: str | Path | None = None) -> tuple[list[str], set[str]]:
    """Sorted ``common`` modules the bundle reaches, and the third-party packages its code and configs need.

    Seeds: every dotted ``common...`` name in the configs (``$import common.x``, ``_target_: common.x.Cls``,
    ``$common.x.fn(...)``) and every ``common`` import in the bundle's own Python files; then the closure over the
    imports of each vendored module. Parent packages come along (``common.a.b`` needs ``common/a/__init__.py``).
    """
    bundle_dir = Path(bundle_dir)
    root = Path(source_root) if source_root is not None else COMMON_ROOT.parent
    seeds: set[str] = set()
    third_party: set[str] = set()
    for config in sorted((bundle_dir / "configs").glob("*")):
        if config.suffix in (".json", ".yaml", ".yml"):
            for text in _config_strings(_load_config(config)):
                seeds.update(_DOTTED.findall(text))
                third_party.update(pkg for name, pkg in CONFIG_COMPONENT_PACKAGES.items() if name in text)
    for py in _bundle_python_files(bundle_dir):
        found, top = _python_imports(py.read_text(), None, False)
        seeds |= found
        third_party |= top
    needed: set[str] = set()
    queue = [m for m in (_resolve_longest(s, root) for s in seeds) if m is not None]
    while queue:
        module = queue.pop()
        for name in _with_parents(module):
            if name in needed:
                continue
            needed.add(name)
            file = _module_file(name, root)
            if file is None:
                continue
            found, top = _python_imports(file.read_text(), name, _is_package(name, root))
            third_party |= top
            queue.extend(m for m in (_resolve_longest(f, root) for f in found) if m is not None and m not in needed)
    return sorted(needed), third_party


def _missing_requirements(third_party: set[str], metadata: dict) -> list[str]:
    """Top-level imports of the packaged Python code that metadata.json does not list (stdlib excluded)."""
    listed = {
        k.lower() for key in ("required_packages_version", "optional_packages_version") for k in metadata.get(key, {})
    }
    missing = []
    for name in sorted(third_party):
        if name in sys.stdlib_module_names or name in ALWAYS_AVAILABLE or name in (PACKAGE, "scripts", "__future__"):
            continue
        pip_name = PIP_NAMES.get(name, name).lower()
        if pip_name not in listed and pip_name.replace("_", "-") not in listed:
            missing.append(pip_name)
    return missing


# ---------------------------------------------------------------------------------------------------------------------
# archive writing, hashing, verification
# ---------------------------------------------------------------------------------------------------------------------


def _bundle_members(bundle_dir: Path) -> list[tuple[Path, str]]:
    """(source file, path inside the bundle folder) for the files that belong in the release archive."""
    members = []
    for path in sorted(bundle_dir.rglob("*")):
        if not path.is_file():
            continue
        relative = path.relative_to(bundle_dir)
        if _skipped(relative):
            continue
        if path.name.startswith(".") and path.name != ".gitkeep":
            continue
        if path.suffix in (".pyc", ".pyo"):
            continue
        if relative.parts[0] == "models" and EXCLUDED_MODEL_PATTERN.match(path.name):
            continue
        members.append((path, relative.as_posix()))
    return members


def _add_file(archive: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def sha256_of(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def build_archive(bundle_dir: str | Path, out_dir: str | Path, strict_requirements: bool = False) -> PackageResult:
    """Write ``<out_dir>/<name>_v<version>.zip`` and its ``.sha256``; the zip holds one top folder ``<name>/``.

    ``name`` is the bundle folder name (what ``monai.bundle download --name`` expects as the zip's top folder) and
    ``version`` comes from ``configs/metadata.json``. With ``strict_requirements`` a third-party import of the packaged
    code that metadata.json does not list is an error instead of a reported gap.
    """
    bundle_dir = Path(bundle_dir).resolve()
    meta_file = bundle_dir / "configs" / "metadata.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"{meta_file} is missing: a bundle needs configs/metadata.json (with 'version')")
    metadata = json.loads(meta_file.read_text())
    version = metadata.get("version")
    if not version:
        raise ValueError(f"{meta_file} has no 'version'; add one (and a changelog entry) before packaging")
    name = bundle_dir.name
    modules, third_party = common_modules_needed(bundle_dir)
    missing = _missing_requirements(third_party, metadata)
    if strict_requirements and missing:
        raise ValueError(
            f"{name}: packaged code or configs need {missing}, which {meta_file} does not list in "
            "required_packages_version; add them with their versions"
        )
    out_dir = Path(out_dir)
    archive_path = out_dir / f"{name}_v{version}.zip"
    files: dict[str, bytes] = {f"{name}/{rel}": src.read_bytes() for src, rel in _bundle_members(bundle_dir)}
    for module in modules:
        source = _module_file(module, COMMON_ROOT.parent)
        if source is None:  # a namespace folder without __init__.py: nothing to copy
            continue
        relative = source.relative_to(COMMON_ROOT.parent).as_posix()
        files[f"{name}/{relative}"] = source.read_bytes()
    with atomic_path(archive_path, suffix=".zip") as tmp:
        with zipfile.ZipFile(tmp, "w") as archive:
            for arcname in sorted(files):
                _add_file(archive, arcname, files[arcname])
    digest = sha256_of(archive_path)
    sha_file = archive_path.with_name(archive_path.name + ".sha256")
    atomic_write_text(sha_file, f"{digest}  {archive_path.name}\n")
    return PackageResult(archive_path, sha_file, digest, modules, sorted(files), missing)


def _expected_digest(sha256: str | Path) -> str:
    """The hex digest from a ``sha256sum``-style file, or ``sha256`` itself when it is a bare 64-hex string."""
    text = str(sha256)
    if not Path(text).is_file() and re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return text.lower()
    content = Path(text).read_text().split()
    if not content or not re.fullmatch(r"[0-9a-fA-F]{64}", content[0]):
        raise ArchiveIntegrityError(f"{sha256} does not start with a 64-character hex sha256 digest")
    return content[0].lower()


def verify_archive(archive: str | Path, sha256: str | Path) -> str:
    """Raise ArchiveIntegrityError unless the archive's sha256 equals the expected one; return the digest."""
    expected, actual = _expected_digest(sha256), sha256_of(archive)
    if actual != expected:
        raise ArchiveIntegrityError(
            f"{archive}: sha256 {actual} != expected {expected}; the download is corrupt or was altered, fetch it again"
        )
    return actual


def extract_archive(archive: str | Path, out_dir: str | Path, sha256: str | Path) -> Path:
    """Verify ``archive`` against ``sha256`` first, then unpack it into ``out_dir``; return the bundle folder."""
    verify_archive(archive, sha256)
    with zipfile.ZipFile(archive) as handle:
        names = handle.namelist()
        tops = {PurePosixPath(n).parts[0] for n in names}
        unsafe = [n for n in names if PurePosixPath(n).is_absolute() or ".." in PurePosixPath(n).parts]
        if unsafe or len(tops) != 1:
            raise ArchiveIntegrityError(f"{archive}: not a single-folder bundle archive or unsafe paths {unsafe[:3]}")
        handle.extractall(out_dir)
    return Path(out_dir) / tops.pop()


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------


def _parser(command: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m common.package {command}".strip())
    if command == "":
        parser.add_argument("bundle_dirs", nargs="+", type=Path, help="bundle folders (bundles/<name>)")
        parser.add_argument("--out", type=Path, default=Path("dist"), help="output folder (default: dist/)")
        parser.add_argument("--strict", action="store_true", help="fail when metadata.json misses an import")
    else:
        parser.add_argument("archive", type=Path)
        parser.add_argument("--sha256", required=True, help="the .sha256 file (sha256sum format) or a hex digest")
        if command == "extract":
            parser.add_argument("--out", type=Path, required=True, help="folder to unpack into")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    command = args.pop(0) if args and args[0] in ("verify", "extract") else ""
    options = _parser(command).parse_args(args)
    try:
        if command == "verify":
            print(f"OK {options.archive} sha256 {verify_archive(options.archive, options.sha256)}")
        elif command == "extract":
            print(f"unpacked {extract_archive(options.archive, options.out, options.sha256)}")
        else:
            for bundle_dir in options.bundle_dirs:
                result = build_archive(bundle_dir, options.out, strict_requirements=options.strict)
                print(
                    f"{result.archive} ({len(result.members)} files, vendored {len(result.vendored_modules)} "
                    f"common modules) sha256 {result.sha256}"
                )
                if result.missing_requirements:
                    print(
                        f"WARNING {bundle_dir}: metadata.json required_packages_version lacks "
                        f"{result.missing_requirements} needed by the packaged code or configs",
                        file=sys.stderr,
                    )
    except (ArchiveIntegrityError, FileNotFoundError, ValueError) as error:
        print(f"ERROR {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
