"""``--tracking mlflow`` on train / evaluate / infer of every bundle, into a local SQLite store under tmp.

Runs ConfigWorkflow with ``tracking="mlflow"`` (what ``python -m monai.bundle run ... --tracking mlflow`` passes) and
reads the store back with MlflowClient: one finished run per workflow, the training loss per iteration, the
evaluation metrics, the engine parameters.

MONAI's default trainer handler reads the loss with ``from_engine(["loss"], first=True)``, which only yields a number
for decollated outputs (a list of dicts): every bundle's trainers must produce that form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.bundles.harness import initialized_workflow
from tests.delivery.bundles import TINY, all_bundle_names, harness_case, make_workspace, tiny_case, write_fresh_weights
from tests.delivery.tiny_bundle import write_tiny_bundle

mlflow = pytest.importorskip("mlflow")


@pytest.fixture(scope="module")
def tracking_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """One SQLite store for the module (creating its schema is the slow part)."""
    return "sqlite:///" + str(tmp_path_factory.mktemp("mlflow") / "mlruns.db")


def _run_tracked(
    root: Path, files: list[str], workflow_type: str, overrides: dict[str, Any], tracking: str | dict = "mlflow"
) -> None:
    with initialized_workflow(root, files, workflow_type, overrides, tracking=tracking) as workflow:
        workflow.run()
        workflow.finalize()


def _single_run(client: Any, experiment: str, finished: bool = True) -> Any:
    """The experiment's only run; validator handlers leave their run open (MONAI default): no status check there."""
    found = client.get_experiment_by_name(experiment)
    assert found is not None, f"no MLflow experiment {experiment!r}"
    runs = client.search_runs([found.experiment_id])
    assert len(runs) == 1, f"{experiment}: {len(runs)} runs"
    assert not finished or runs[0].info.status == "FINISHED", runs[0].info.status
    return runs[0]


@pytest.mark.parametrize("name", all_bundle_names())
def test_tracking_records_train_evaluate_and_infer(name: str, tmp_path: Path, tracking_uri: str) -> None:
    case = tiny_case(write_tiny_bundle(tmp_path / "src")) if name == TINY else harness_case(name)
    if case is None:
        pytest.skip(f"{name}: no harness BundleCase in tests/bundles yet")
    from mlflow.tracking import MlflowClient

    ws = make_workspace(case, tmp_path)
    root = ws.bundle_root
    tracking = {"tracking_uri": tracking_uri}

    train = {**ws.overrides("train", tmp_path / "train"), **tracking, "experiment_name": f"{name}-train"}
    _run_tracked(root, case.train_stages[0], "train", train)
    # evaluation and inference of freshly initialised weights (training quality is not the point here)
    write_fresh_weights(ws, ws.ckpt_dir / case.checkpoint_files[0])
    evaluate = {**ws.overrides("evaluate", tmp_path / "eval"), **tracking, "experiment_name": f"{name}-evaluate"}
    _run_tracked(root, case.evaluate_files(), "train", evaluate)
    infer = {**ws.overrides("infer", tmp_path / "infer"), **tracking, "experiment_name": f"{name}-infer"}
    _run_tracked(root, case.inference_configs or ["configs/inference.json"], "infer", infer)

    client = MlflowClient(tracking_uri)
    run = _single_run(client, f"{name}-train")
    losses = client.get_metric_history(run.info.run_id, "train_loss")
    assert losses and all(m.value == m.value for m in losses), "no finite train_loss recorded"
    assert "max_epochs" in run.data.params, run.data.params
    run = _single_run(client, f"{name}-evaluate", finished=False)
    assert run.data.metrics, "evaluation recorded no metric"
    run = _single_run(client, f"{name}-infer")
    assert run.data.params, "inference recorded no engine parameter"
