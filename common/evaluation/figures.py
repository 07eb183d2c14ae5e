"""PNG previews for reports: orthogonal slices with label overlays, and a per-structure box plot.

Figures are drawn on matplotlib's Agg canvas without pyplot (no global backend switch, safe in handlers and worker
threads) and written atomically. The pixel size of every PNG is fixed by its arguments (no tight bounding box), so
callers and tests know it in advance: ``int(width_inches * dpi) x int(height_inches * dpi)``.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.io import atomic_write_bytes

_STRETCH_RATIO = 3.0


def _to_numpy(x) -> np.ndarray:
    if hasattr(x, "as_tensor"):
        x = x.as_tensor()
    if torch.is_tensor(x):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim >= 3 and arr.shape[0] == 1:
        arr = arr[0]
    return arr


def _label_colours(labels: np.ndarray, alpha: float) -> np.ndarray:
    """RGBA image: label v gets colour v of the repeating tab20 table, background (0) is transparent."""
    lut = np.asarray(colormaps["tab20"].colors)
    rgba = np.zeros((*labels.shape, 4))
    fg = labels > 0
    rgba[fg, :3] = lut[labels[fg].astype(np.int64) % len(lut)]
    rgba[fg, 3] = alpha
    return rgba


def _default_centre(maps: Sequence[np.ndarray], shape: Sequence[int]) -> list[int]:
    """Centre of mass of the union of all foregrounds (the middle of the volume if every map is empty)."""
    fg = np.zeros(shape, dtype=bool)
    for m in maps:
        fg |= m > 0
    if not fg.any():
        return [n // 2 for n in shape]
    return [int(round(float(c.mean()))) for c in np.nonzero(fg)]


def _png_bytes(fig: Figure, dpi: int) -> bytes:
    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return buffer.getvalue()


def save_overlay_png(
    image,
    label_maps: Mapping[str, object],
    path: str | Path,
    spacing: Sequence[float] | None = None,
    centre: Sequence[int] | None = None,
    title: str | None = None,
    alpha: float = 0.45,
    panel_inches: float = 2.5,
    dpi: int = 100,
) -> Path:
    """Slices through ``centre`` of a 2D/3D image, bare and under each label map, side by side.

    Rows are the planes orthogonal to spatial axes 0, 1, 2 (array order, as loaded; one row for 2D); columns are the
    image, then one column per entry of ``label_maps`` (e.g. ``{"atlas": a, "prediction": p, "ground truth": g}``).
    ``spacing`` sets each panel's aspect ratio, so anisotropic stacks (e.g. 2.5D cardiac short-axis, 10 mm slices)
    are shown in physical proportions. Without spacing, panels whose sides differ by more than 3x are stretched to fill
    the panel (labelled "stretched") so thin stacks stay readable. ``centre`` defaults to the centre of mass of all
    foregrounds. The PNG is ``(1 + len(label_maps)) * panel_inches * dpi`` wide and ``rows * panel_inches * dpi`` high.
    """
    img = _to_numpy(image).astype(np.float32)
    if img.ndim not in (2, 3):
        raise ValueError(f"save_overlay_png: expected a 2D or 3D image ([1, *spatial] allowed), got {img.shape}")
    maps = {str(k): _to_numpy(v) for k, v in label_maps.items()}
    for name, m in maps.items():
        if m.shape != img.shape:
            raise ValueError(f"save_overlay_png: label map {name!r} has shape {m.shape}, image has {img.shape}")
    sp = tuple(float(s) for s in spacing) if spacing is not None else None
    if sp is not None and len(sp) != img.ndim:
        raise ValueError(f"spacing {sp} does not match the {img.ndim} spatial dims of the image")
    c = list(centre) if centre is not None else _default_centre(list(maps.values()), img.shape)
    finite = img[np.isfinite(img)]
    lo, hi = np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0

    views = [None] if img.ndim == 2 else [0, 1, 2]
    columns = ["image", *maps]
    fig = Figure(figsize=(panel_inches * len(columns), panel_inches * len(views)))
    for r, axis in enumerate(views):
        shown_axes = (0, 1) if axis is None else tuple(a for a in range(3) if a != axis)

        def cut(vol: np.ndarray, axis=axis) -> np.ndarray:
            return vol if axis is None else np.take(vol, c[axis], axis=axis)

        n_a, n_b = img.shape[shown_axes[0]], img.shape[shown_axes[1]]
        if sp is not None:
            aspect, note = sp[shown_axes[1]] / sp[shown_axes[0]], ""
        elif max(n_a, n_b) > _STRETCH_RATIO * min(n_a, n_b):
            aspect, note = "auto", " (stretched)"
        else:
            aspect, note = 1.0, ""
        for col, name in enumerate(columns):
            ax = fig.add_subplot(len(views), len(columns), r * len(columns) + col + 1)
            ax.imshow(cut(img).T, cmap="gray", vmin=lo, vmax=hi, origin="lower", aspect=aspect, interpolation="nearest")
            if name != "image":
                ax.imshow(
                    _label_colours(cut(maps[name]).T, alpha), origin="lower", aspect=aspect, interpolation="nearest"
                )
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(name, fontsize=9)
            if col == 0:
                label = "2D" if axis is None else f"axis {axis} = {c[axis]}"
                ax.set_ylabel(label + note, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.02, top=0.86 if title else 0.92, wspace=0.04, hspace=0.08)
    return Path(atomic_write_bytes(path, _png_bytes(fig, dpi)))


def boxplot_size_inches(num_groups: int, height_inches: float = 3.5) -> tuple[float, float]:
    """Figure size used by `save_dice_boxplot`: wide enough for ``num_groups`` labelled boxes."""
    return max(4.0, 0.5 * num_groups + 1.5), height_inches


def save_dice_boxplot(
    data: Sequence[Mapping] | Mapping[str, Sequence[float]],
    path: str | Path,
    metric: str = "dice",
    group_key: str = "label",
    title: str | None = None,
    height_inches: float = 3.5,
    dpi: int = 100,
) -> Path:
    """Box plot of ``metric`` per structure: one box per label over the cases.

    ``data`` is either long-form report rows (`common.evaluation.report`) or ``{label: [values...]}``. NaN values are
    left out. The figure size is `boxplot_size_inches` at ``dpi``.
    """
    if isinstance(data, Mapping):
        groups = {str(k): [float(v) for v in vals] for k, vals in data.items()}
    else:
        groups = {}
        for row in data:
            if metric in row:
                groups.setdefault(str(row.get(group_key, "all")), []).append(float(row[metric]))
    if not groups:
        raise ValueError(f"save_dice_boxplot: no values of {metric!r} to plot")
    values = [[v for v in vals if not np.isnan(v)] for vals in groups.values()]
    fig = Figure(figsize=boxplot_size_inches(len(groups), height_inches))
    ax = fig.add_subplot(1, 1, 1)
    ax.boxplot(values, showmeans=True)
    ax.set_xticks(range(1, len(groups) + 1))
    ax.set_xticklabels(list(groups), rotation=45 if len(groups) > 6 else 0, ha="right" if len(groups) > 6 else "center")
    ax.set_ylabel(metric)
    if metric == "dice":
        ax.set_ylim(0.0, 1.02)
    ax.grid(axis="y", alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    fig.subplots_adjust(left=0.12, right=0.98, top=0.9, bottom=0.22 if len(groups) > 6 else 0.12)
    return Path(atomic_write_bytes(path, _png_bytes(fig, dpi)))
