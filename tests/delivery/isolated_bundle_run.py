"""Run ``python -m monai.bundle <args>`` as a user who has only MONAI (no repo, no ``pip install -e .``) would.

Usage (cwd = the unpacked bundle root)::

    python -s isolated_bundle_run.py <repo_root> run --config_file configs/inference.json ...
    python -s isolated_bundle_run.py <repo_root> --probe      # prints whether `common` is importable at all

The repo's editable-install finder and every ``sys.path`` entry inside the repo (except the virtual environment's
own folders) are removed, then the working directory is put first on ``sys.path`` as ``python -m`` does. So ``common``
can only come from the bundle folder; the module's file is printed at exit for the test to check. This file imports
nothing from the repo on purpose.
"""

import atexit
import importlib.util
import os
import runpy
import sys


def _inside(path: str, folder: str) -> bool:
    path, folder = os.path.realpath(path or "."), os.path.realpath(folder)
    return path == folder or path.startswith(folder + os.sep)


def isolate(repo_root: str) -> None:
    editable = "__editable__"
    sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, "__module__", "").startswith(editable)]
    sys.path_hooks[:] = [h for h in sys.path_hooks if editable not in getattr(h, "__module__", "")]
    sys.path[:] = [p for p in sys.path if editable not in p and (_inside(p, sys.prefix) or not _inside(p, repo_root))]
    sys.path_importer_cache.clear()
    sys.path.insert(0, os.getcwd())


def _report_common() -> None:
    module = sys.modules.get("common")
    print(f"COMMON_FILE={getattr(module, '__file__', None)}", flush=True)


def main() -> None:
    repo_root, args = sys.argv[1], sys.argv[2:]
    isolate(repo_root)
    if args == ["--probe"]:
        print(f"COMMON_SPEC={importlib.util.find_spec('common')}", flush=True)
        return
    atexit.register(_report_common)
    sys.argv = ["monai.bundle", *args]
    runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
