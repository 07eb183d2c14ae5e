"""Unsupervised pairwise registration trainer (CLMorph, its ablations, probabilistic and plain VoxelMorph).

One iteration::

    batch {"moving": [B,1,*S], "fixed": [B,1,*S]} --network.forward_train--> {"ddf", "svf_mean", "svf_log_var",
    "proj_moving", "proj_fixed", ...} --loss_function(outputs, moving, fixed)--> {"loss", "recon", "smooth", "contrast"}

It is a MONAI ``SupervisedTrainer`` (bundle properties, handlers, MLflow and FL tooling keep working); only
``_iteration`` differs, because the network sees an image pair and the loss needs several network outputs. The
state output is decollated like MONAI's: a list with one dict per pair of the batch, each holding its two images and
the batch's total loss under ``"loss"`` and each term under its own key, so MONAI's default handler settings
(``from_engine(["loss"], first=True)``, e.g. ``--tracking mlflow``) read it unchanged.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents

from common.engines.checkpoint import unwrap_module
from common.io import atomic_torch_save

__all__ = ["ModelWeightsSaver", "RegistrationTrainer"]

LOSS_TERMS = ("loss", "recon", "smooth", "contrast")


def _plain(x: torch.Tensor) -> torch.Tensor:
    """Drop MONAI meta tracking: the loss never needs it and MetaTensor arithmetic is slower."""
    return x.as_tensor() if hasattr(x, "as_tensor") else x


class RegistrationTrainer(SupervisedTrainer):
    """``SupervisedTrainer`` for label-free pairwise registration.

    Args:
        moving_key, fixed_key: batch keys of the two images.
        target_momentum: EMA momentum of a BYOL target network (used when the network has ``update_target``).
        other args: as ``SupervisedTrainer`` (``prepare_batch`` and ``inferer`` are not used by the iteration).
    """

    def __init__(
        self, *args: Any, moving_key: str = "moving", fixed_key: str = "fixed", target_momentum: float = 0.99, **kwargs
    ) -> None:
        kwargs.setdefault("decollate", False)  # `_iteration` decollates itself (the losses are per batch)
        super().__init__(*args, **kwargs)
        self.moving_key, self.fixed_key, self.target_momentum = moving_key, fixed_key, float(target_momentum)

    def _iteration(self, engine: RegistrationTrainer, batchdata: dict[str, Any]) -> list[dict[str, torch.Tensor]]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        kwargs = {"device": engine.state.device, "non_blocking": engine.non_blocking}
        moving = _plain(batchdata[self.moving_key]).to(**kwargs)
        fixed = _plain(batchdata[self.fixed_key]).to(**kwargs)
        engine.state.output = {self.moving_key: moving, self.fixed_key: fixed}

        def _compute() -> dict[str, torch.Tensor]:
            outputs = engine.network.forward_train(moving, fixed)
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss_function(outputs, moving, fixed)
            engine.fire_event(IterationEvents.LOSS_COMPLETED)
            return terms

        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        if engine.amp and engine.scaler is not None:
            with torch.autocast("cuda", **engine.amp_kwargs):
                terms = _compute()
            engine.scaler.scale(terms["loss"]).backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.scaler.step(engine.optimizer)
            engine.scaler.update()
        else:
            terms = _compute()
            terms["loss"].backward()
            engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
            engine.optimizer.step()
        update_target = getattr(engine.network, "update_target", None)
        if callable(update_target):
            update_target(self.target_momentum)
        losses = {k: terms[k].detach() for k in LOSS_TERMS if k in terms}
        engine.state.output = [
            {self.moving_key: m, self.fixed_key: f, **losses} for m, f in zip(moving, fixed, strict=True)
        ]
        engine.fire_event(IterationEvents.MODEL_COMPLETED)
        return engine.state.output


class ModelWeightsSaver:
    """Write the network's plain ``state_dict`` atomically every ``interval_epochs`` and at completion.

    The paper keeps the last-epoch model (no validation set), so ``models/model.pt`` is always the latest weights; the
    full resumable state lives in `common.engines.checkpoint.ResumableCheckpointHandler`'s file.
    """

    def __init__(
        self, network: torch.nn.Module, save_dir: str | Path, filename: str = "model.pt", interval_epochs: int = 1
    ) -> None:
        self.network, self.path, self.interval_epochs = network, Path(save_dir) / filename, int(interval_epochs)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED(every=self.interval_epochs), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if getattr(engine.state, "non_finite", None):
            return
        state = {k: v.detach().cpu() for k, v in unwrap_module(self.network).state_dict().items()}
        atomic_torch_save(state, self.path)
