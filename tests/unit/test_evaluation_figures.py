"""PNG previews are written with the promised pixel size and actually show the overlays."""

import struct

import numpy as np
import pytest
from matplotlib.image import imread

from common.evaluation.figures import boxplot_size_inches, save_dice_boxplot, save_overlay_png


def png_size(path):
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", header[16:24])


def stack_and_labels(shape=(40, 36, 8)):
    rng = np.random.default_rng(0)
    image = rng.random(shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[10:25, 10:25, 2:6], labels[14:20, 14:20, 3:5] = 1, 3
    return image, labels


@pytest.mark.parametrize("spacing", [None, (1.5, 1.5, 10.0)])
def test_overlay_of_anisotropic_stack(tmp_path, spacing):
    image, labels = stack_and_labels()
    maps = {"atlas": labels, "prediction": np.roll(labels, 2, axis=0), "ground truth": labels}
    path = save_overlay_png(image[None], maps, tmp_path / "o.png", spacing=spacing, title="case 1", dpi=40)
    assert png_size(path) == (4 * 100, 3 * 100)  # (1 + 3 maps) columns x 3 views, 2.5 in at 40 dpi
    pixels = imread(path)[..., :3]
    saturated = np.abs(pixels - pixels.mean(axis=-1, keepdims=True)).max(axis=-1) > 0.1  # coloured, not grey
    half = pixels.shape[1] // 4
    assert not saturated[:, :half].any()  # the bare image column has no overlay colour
    assert saturated[:, half:].sum() > 100


def test_overlay_2d_and_errors(tmp_path):
    image, labels = stack_and_labels((30, 30, 4))
    path = save_overlay_png(image[..., 0], {"gt": labels[..., 2]}, tmp_path / "two_d.png", dpi=20)
    assert png_size(path) == (2 * 50, 50)
    with pytest.raises(ValueError, match="shape"):
        save_overlay_png(image, {"gt": labels[:-1]}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_boxplot(tmp_path):
    rows = [{"case": str(c), "label": f"s{i}", "dice": (c + i) / 20} for c in range(5) for i in range(9)]
    path = save_dice_boxplot(rows, tmp_path / "box.png", dpi=50)
    width, height = boxplot_size_inches(9)
    assert png_size(path) == (int(width * 50), int(height * 50))
    assert imread(path).std() > 0.01
    path = save_dice_boxplot({"a": [0.5, float("nan")], "b": [0.9]}, tmp_path / "box2.png", dpi=50)
    assert png_size(path) == (200, 175)
    with pytest.raises(ValueError, match="no values"):
        save_dice_boxplot([{"case": "x", "label": "a"}], tmp_path / "none.png")
