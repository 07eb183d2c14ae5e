"""Optional PNG overlay of each inferred volume (image and predicted labels), written next to the NIfTI output."""

from __future__ import annotations

import logging
from pathlib import Path

from ignite.engine import Engine, Events

from common.evaluation.figures import save_overlay_png
from common.evaluation.handlers import case_name

logger = logging.getLogger(__name__)


class OverlayPNGHandler:
    """After each inference iteration, save ``<output_dir>/<case>_overlay.png`` from the decollated output items.

    Both ``image_key`` and ``pred_key`` must be on the input grid (invert the preprocessing for both).
    """

    def __init__(self, output_dir: str, enabled: bool = False, image_key: str = "image", pred_key: str = "pred"):
        self.output_dir = Path(output_dir)
        self.enabled = enabled
        self.image_key = image_key
        self.pred_key = pred_key

    def attach(self, engine: Engine) -> None:
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        for i, item in enumerate(engine.state.output):
            image, pred = item[self.image_key], item[self.pred_key]
            case = case_name(image, f"case{engine.state.iteration:04d}_{i}")
            path = save_overlay_png(
                image[0].cpu(), {"prediction": pred[0].cpu()}, self.output_dir / f"{case}_overlay.png"
            )
            logger.info("overlay written to %s", path)
