"""Run several ``monai.bundle run`` jobs one after another in each process of one ``torchrun`` launch.

Usage (cwd = the bundle root)::

    torchrun --standalone --nproc_per_node=2 tests/delivery/dist_runner.py jobs.json

``jobs.json`` is a list of ``{"config_file": [...], "overrides": {...}}``. Each job calls ``monai.bundle.run`` exactly
as ``python -m monai.bundle run --config_file ... --key value`` does (fire hands the same keyword arguments), including
``initialize`` (joins the process group) and ``finalize`` (leaves it), so a multi-stage training plus the evaluation
costs one launch instead of one per stage (process start-up dominates these tiny runs).

Each job after the first gets a fresh rendezvous (a new free port, its own TCPStore): a default group created again on
the same store reuses the same key prefix, and Gloo may then read the previous group's stale addresses and hang. The CLI
never meets this (one process per run); only this several-runs-per-process runner does.
"""

import faulthandler
import json
import os
import signal
import socket
import sys

import torch.distributed as dist


def fresh_rendezvous(job_index: int, agent_port: int) -> None:
    """Rank 0 picks a free port and publishes it through torchrun's agent store; every rank then uses it."""
    store = dist.TCPStore(os.environ["MASTER_ADDR"], agent_port, is_master=False)
    key = f"delivery_runner_port_{job_index}"
    if int(os.environ["RANK"]) == 0:
        with socket.socket() as sock:
            sock.bind((os.environ["MASTER_ADDR"], 0))
            store.set(key, str(sock.getsockname()[1]))
    os.environ["MASTER_PORT"] = store.get(key).decode()
    os.environ["TORCHELASTIC_USE_AGENT_STORE"] = "False"


def main() -> None:
    faulthandler.register(signal.SIGUSR1)  # a test that times out sends SIGUSR1 first: every rank prints its stack
    jobs = json.loads(open(sys.argv[1]).read())
    sys.path.insert(0, os.getcwd())  # what `python -m monai.bundle` run from the bundle root has
    from monai.bundle import run

    agent_port = int(os.environ["MASTER_PORT"])
    for index, job in enumerate(jobs):
        if index:
            fresh_rendezvous(index, agent_port)
        run(
            config_file=job["config_file"],
            meta_file="configs/metadata.json",
            logging_file="configs/logging.conf",
            **job["overrides"],
        )


if __name__ == "__main__":
    main()
