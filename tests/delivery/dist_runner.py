"""Run several ``monai.bundle run`` jobs one after another in each process of one ``torchrun`` launch.

Usage (cwd = the bundle root)::

    torchrun --standalone --nproc_per_node=2 tests/delivery/dist_runner.py jobs.json

``jobs.json`` is a list of ``{"config_file": [...], "overrides": {...}}``. Each job calls ``monai.bundle.run`` exactly as
``python -m monai.bundle run --config_file ... --key value`` does (fire hands the same keyword arguments), including
``initialize`` (joins the process group) and ``finalize`` (leaves it), so a multi-stage training plus the evaluation
costs one launch instead of one per stage (process start-up dominates these tiny runs).
"""

import faulthandler
import json
import os
import signal
import sys


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # a test that times out sends SIGUSR1 first: every rank prints its stack
    jobs = json.loads(open(sys.argv[1]).read())
    sys.path.insert(0, os.getcwd())  # what `python -m monai.bundle` run from the bundle root has
    from monai.bundle import run

    for job in jobs:
        run(
            config_file=job["config_file"],
            meta_file="configs/metadata.json",
            logging_file="configs/logging.conf",
            **job["overrides"],
        )


if __name__ == "__main__":
    main()
