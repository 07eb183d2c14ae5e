"""Resume support for the fine-tuning stage: the best-validation record of ``models/model.pt``."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from monai.handlers import CheckpointSaver


class BestModelRecord:
    """``state_dict``/``load_state_dict`` of the best-score record of a MONAI ``CheckpointSaver`` (key metric).

    Why: `common.engines.checkpoint.ResumableCheckpointHandler` restores the network and optimizer, but a fresh
    ``CheckpointSaver`` has no record of the best validation score, so after a resume the first validation would
    overwrite ``model.pt`` even with a worse model. MONAI offers ``CheckpointSaver.load_state_dict`` for this record;
    the matching ``state_dict`` is that of the ignite ``Checkpoint`` it keeps for the key metric.
    """

    def __init__(self, saver: CheckpointSaver) -> None:
        if getattr(saver, "_key_metric_checkpoint", None) is None:
            raise ValueError("BestModelRecord needs a CheckpointSaver created with save_key_metric=True")
        self.saver = saver

    def state_dict(self) -> dict[str, Any]:
        return dict(self.saver._key_metric_checkpoint.state_dict())

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.saver.load_state_dict(state)
