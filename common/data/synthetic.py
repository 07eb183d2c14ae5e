"""Synthetic labelled 3D phantoms: the embedded default data set for demos and tests.

Why: bundles must run end to end without downloads. Each preset draws an anatomy-like label map from analytic
shapes (nested and adjacent ellipsoids, tubes, rings) evaluated on coordinates deformed by a random smooth
diffeomorphism (inter-subject shape variability), then renders an image from a per-site intensity table
(appearance variability: per-site per-tissue intensities, bias field, gamma, noise, partial-volume blur).

Conventions: arrays are indexed (axis0, axis1, axis2) = (patient left-right, posterior-anterior, inferior-superior)
for ``brain`` and ``abdomen`` (RAS-like: larger axis-0 index = patient left); for ``cardiac`` axes 0/1 are the
short-axis plane and axis 2 goes from base (index 0) to apex. Everything is computed with vectorised numpy/scipy
so the same seed gives the same bytes on any machine and thread count.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from common.io import atomic_json_dump, save_nifti

__all__ = [
    "PRESETS",
    "Preset",
    "generate_dataset",
    "generate_subject",
    "jacobian_determinant",
    "random_diffeomorphic_ddf",
    "site_intensity_table",
    "split_counts",
]


@dataclass(frozen=True)
class Preset:
    """Static description of a phantom family (label names, tissue intensities, defaults)."""

    name: str
    labels: dict[int, str]
    modality: str
    default_shape: tuple[int, int, int]
    # tissue id -> canonical (site 0) mean intensity; ids 1..L are the labels, ids >= 100 unlabelled tissue.
    intensities: dict[int, float]
    # nested child label -> parent label: the child is fully enclosed by its parent (never touches background).
    nested: dict[int, int] = field(default_factory=dict)
    # maximal displacement of the random diffeomorphism as a fraction of each axis length.
    max_displacement_fraction: tuple[float, float, float] = (0.05, 0.05, 0.05)
    # label -> label of the same tissue (left/right pairs): sites restyle them identically.
    same_tissue: dict[int, int] = field(default_factory=dict)
    value_range: tuple[float, float] = (0.0, 1.0)


BRAIN = Preset(
    name="brain",
    labels={
        1: "cortex",
        2: "white_matter",
        3: "left_lateral_ventricle",
        4: "right_lateral_ventricle",
        5: "left_thalamus",
        6: "right_thalamus",
        7: "brainstem",
        8: "cerebellum",
    },
    modality="MR",
    default_shape=(64, 64, 64),
    # T1-like: white matter > deep grey > cortex > CSF; skull/scalp bright-ish, extra-cerebral CSF dark.
    intensities={0: 0.0, 1: 0.5, 2: 0.82, 3: 0.12, 4: 0.12, 5: 0.68, 6: 0.68, 7: 0.74, 8: 0.6, 100: 0.38, 101: 0.1},
    nested={2: 1, 3: 2, 4: 2, 5: 2, 6: 2},
    same_tissue={4: 3, 6: 5},
)

ABDOMEN = Preset(
    name="abdomen",
    labels={
        1: "spleen",
        2: "right_kidney",
        3: "left_kidney",
        4: "gallbladder",
        5: "esophagus",
        6: "liver",
        7: "stomach",
        8: "aorta",
        9: "inferior_vena_cava",
        10: "portal_and_splenic_vein",
        11: "pancreas",
        12: "right_adrenal_gland",
        13: "left_adrenal_gland",
    },
    modality="CT",
    default_shape=(64, 64, 64),
    # Portal-venous phase CT in HU; 100 subcutaneous fat, 101 muscle wall, 102 visceral fat, 103 vertebra.
    intensities={
        0: -1000.0,
        1: 110.0,
        2: 160.0,
        3: 160.0,
        4: 5.0,
        5: 40.0,
        6: 95.0,
        7: 25.0,
        8: 170.0,
        9: 140.0,
        10: 150.0,
        11: 80.0,
        12: 35.0,
        13: 35.0,
        100: -100.0,
        101: 45.0,
        102: -80.0,
        103: 450.0,
    },
    value_range=(-1024.0, 3071.0),
    same_tissue={3: 2, 13: 12},
)

CARDIAC = Preset(
    name="cardiac",
    labels={1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"},
    modality="MR",
    default_shape=(64, 64, 12),
    # Cine SSFP-like: bright blood pools, dark myocardium and lungs; 100 thorax soft tissue, 101 lung, 102 fat.
    intensities={0: 0.0, 1: 0.8, 2: 0.28, 3: 0.85, 100: 0.38, 101: 0.06, 102: 0.7},
    nested={3: 2},
    max_displacement_fraction=(0.05, 0.05, 0.03),
)

PRESETS: dict[str, Preset] = {p.name: p for p in (BRAIN, ABDOMEN, CARDIAC)}


def _get_preset(preset: str) -> Preset:
    if preset not in PRESETS:
        raise ValueError(f"unknown synthetic preset {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def _as_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _smooth_field(shape: Sequence[int], channels: int, rng: np.random.Generator, control_points: int = 5) -> np.ndarray:
    """Random smooth field [channels, *shape]: Gaussian-RBF interpolation of a coarse normal grid (separable)."""
    out = rng.standard_normal((channels, *[min(control_points, max(int(n), 2)) for n in shape]))
    for axis, n in enumerate(shape):
        c = out.shape[axis + 1]
        x = np.linspace(0.0, 1.0, int(n))[:, None]
        centres = np.linspace(0.0, 1.0, c)[None, :]
        width = 1.0 / max(c - 1, 1)
        weights = np.exp(-0.5 * ((x - centres) / width) ** 2)
        weights /= weights.sum(axis=1, keepdims=True)
        # move the contracted axis last, contract it with einsum (no BLAS: bitwise reproducible), move it back.
        moved = np.moveaxis(out, axis + 1, -1)
        out = np.moveaxis(np.einsum("...c,nc->...n", moved, weights, optimize=False), -1, axis + 1)
    return out


def _compose_with_self(ddf: np.ndarray) -> np.ndarray:
    """u + u∘(id + u) with linear interpolation (one squaring step of scaling and squaring)."""
    shape = ddf.shape[1:]
    coords = np.stack(np.meshgrid(*[np.arange(n, dtype=np.float64) for n in shape], indexing="ij")) + ddf
    warped = np.stack([ndimage.map_coordinates(c, coords, order=1, mode="nearest") for c in ddf])
    return ddf + warped


def jacobian_determinant(ddf: np.ndarray) -> np.ndarray:
    """det(d(p + u)/dp) by central differences for a voxel displacement field [3, X, Y, Z]."""
    grads = np.stack([np.stack(np.gradient(ddf[i], axis=(0, 1, 2))) for i in range(3)])  # [i, j, *shape]
    jac = grads + np.eye(3)[:, :, None, None, None]
    return np.linalg.det(np.moveaxis(jac, (0, 1), (-2, -1)))


def random_diffeomorphic_ddf(
    shape: Sequence[int],
    rng: np.random.Generator | int | None,
    max_displacement: Sequence[float] | float = 3.0,
    num_steps: int = 6,
    min_jacobian: float = 0.1,
) -> np.ndarray:
    """Random smooth diffeomorphic displacement field [3, *shape] in voxels (channel i = axis i).

    A smooth stationary velocity field (Gaussian-RBF upsampled coarse noise, scaled so that its largest value along
    axis i is ``max_displacement[i]`` voxels) is integrated by scaling and squaring. The result is checked for a
    positive Jacobian determinant everywhere; if it folds, the velocity is halved and integrated again.
    """
    rng = _as_rng(rng)
    shape = tuple(int(n) for n in shape)
    if len(shape) != 3:
        raise ValueError(f"random_diffeomorphic_ddf needs a 3D shape, got {shape}")
    limits = np.broadcast_to(np.asarray(max_displacement, dtype=np.float64), (3,))
    svf = _smooth_field(shape, 3, rng)
    svf *= (limits / np.maximum(np.abs(svf).reshape(3, -1).max(axis=1), 1e-12))[:, None, None, None]
    for _ in range(8):
        ddf = svf / 2**num_steps
        for _ in range(num_steps):
            ddf = _compose_with_self(ddf)
        if jacobian_determinant(ddf).min() > min_jacobian:
            return ddf
        svf *= 0.5
    raise RuntimeError("could not draw a non-folding deformation; lower max_displacement")


def _normalised_coords(shape: Sequence[int], ddf: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Deformed coordinates p + u(p) mapped to [-1, 1] per axis."""
    out = []
    for axis, n in enumerate(shape):
        grid = np.arange(n, dtype=np.float64).reshape([-1 if a == axis else 1 for a in range(3)])
        half = max((n - 1) / 2.0, 0.5)
        out.append((grid + ddf[axis] - (n - 1) / 2.0) / half)
    return out[0], out[1], out[2]


def _ellipsoid(x, y, z, centre, radii) -> np.ndarray:
    """Implicit ellipsoid function: < 1 inside, 1 on the surface."""
    return ((x - centre[0]) / radii[0]) ** 2 + ((y - centre[1]) / radii[1]) ** 2 + ((z - centre[2]) / radii[2]) ** 2


class _Jitter:
    """Per-subject random size/position perturbation of the template shapes."""

    def __init__(self, rng: np.random.Generator, size: float, shift: float):
        self.rng, self.size, self.shift = rng, size, shift
        self.scale = 1.0 + rng.uniform(-size, size, 3)

    def c(self, centre: Sequence[float]) -> np.ndarray:
        return np.asarray(centre) * self.scale + self.rng.uniform(-self.shift, self.shift, 3)

    def r(self, radii: Sequence[float]) -> np.ndarray:
        return np.asarray(radii) * self.scale * (1.0 + self.rng.uniform(-self.size, self.size, 3))


def _brain_tissues(x, y, z, rng: np.random.Generator) -> np.ndarray:
    j = _Jitter(rng, 0.06, 0.015)
    t = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.uint8)
    brain_c, brain_r = j.c((0.0, 0.0, 0.12)), j.r((0.66, 0.8, 0.68))
    t[_ellipsoid(x, y, z, j.c((0.0, 0.0, 0.0)), j.r((0.8, 0.93, 0.88))) < 1] = 100  # scalp and skull
    t[_ellipsoid(x, y, z, brain_c, brain_r * 1.06) < 1] = 101  # extra-cerebral CSF
    brain = _ellipsoid(x, y, z, brain_c, brain_r)
    t[brain < 1] = 1
    wm = _ellipsoid(x, y, z, brain_c + j.c((0.0, 0.0, 0.02)), brain_r * j.r((0.8, 0.8, 0.78)))
    wm_inside = (wm < 1) & (brain < 0.8)
    t[wm_inside] = 2
    t[_ellipsoid(x, y, z, j.c((0.0, -0.5, -0.42)), j.r((0.42, 0.26, 0.22))) < 1] = 8
    t[_ellipsoid(x, y, z, j.c((0.0, -0.12, -0.38)), j.r((0.12, 0.14, 0.3))) < 1] = 7
    # deep structures are clipped to a shrunken white matter so they stay enclosed by it.
    deep_parent = (wm < 0.75) & (brain < 0.6)
    for label, cx in ((5, 0.13), (6, -0.13)):  # left = larger axis-0 index (RAS)
        t[(_ellipsoid(x, y, z, j.c((cx, -0.08, 0.02)), j.r((0.11, 0.15, 0.11))) < 1) & deep_parent] = label
    for label, cx in ((3, 0.12), (4, -0.12)):
        t[(_ellipsoid(x, y, z, j.c((cx, 0.04, 0.22)), j.r((0.08, 0.3, 0.1))) < 1) & deep_parent] = label
    return t


def _abdomen_tissues(x, y, z, rng: np.random.Generator) -> np.ndarray:
    j = _Jitter(rng, 0.05, 0.02)
    shape = np.broadcast_shapes(x.shape, y.shape, z.shape)
    t = np.zeros(shape, dtype=np.uint8)
    zeros = np.zeros_like(z)
    body_c, body_r = j.c((0.0, 0.0, 0.0)), j.r((0.92, 0.72, 1.0))
    body = _ellipsoid(x, y, zeros, body_c * (1, 1, 0), body_r)  # elliptic cylinder along z
    t[body < 1] = 100
    t[body < 0.86] = 101
    t[body < 0.76] = 102

    def tube(centre, radii):  # cylinder along z
        return _ellipsoid(x, y, zeros, (centre[0], centre[1], 0.0), (radii[0], radii[1], 1.0)) < 1

    t[tube(j.c((0.0, -0.5, 0.0)), j.r((0.13, 0.12, 1.0)))] = 103  # vertebra
    organs = [
        (6, j.c((-0.42, 0.0, 0.35)), j.r((0.36, 0.45, 0.45))),  # liver (patient right = low axis-0 index)
        (4, j.c((-0.3, 0.33, -0.05)), j.r((0.1, 0.12, 0.15))),  # gallbladder
        (1, j.c((0.55, -0.22, 0.4)), j.r((0.17, 0.22, 0.28))),  # spleen
        (7, j.c((0.32, 0.2, 0.45)), j.r((0.22, 0.22, 0.3))),  # stomach
        (2, j.c((-0.38, -0.35, -0.3)), j.r((0.13, 0.13, 0.27))),  # right kidney
        (3, j.c((0.38, -0.35, -0.2)), j.r((0.13, 0.13, 0.27))),  # left kidney
        (11, j.c((0.12, 0.02, 0.02)), j.r((0.3, 0.08, 0.09))),  # pancreas
    ]
    for label, c, r in organs:
        t[_ellipsoid(x, y, z, c, r) < 1] = label
    # splenic/portal vein: tube along axis 0 behind the pancreas.
    vein_c, vein_r = j.c((0.08, -0.07, 0.1)), j.r((0.38, 0.065, 0.065))
    t[_ellipsoid(x, y, z, vein_c, vein_r) < 1] = 10
    t[tube(j.c((0.06, -0.27, 0.0)), j.r((0.075, 0.075, 1.0)))] = 8  # aorta
    t[tube(j.c((-0.14, -0.24, 0.0)), j.r((0.085, 0.07, 1.0))) & (z < 0.45)] = 9  # inferior vena cava
    esophagus_c = j.c((-0.02, -0.12, 0.0))
    t[tube(esophagus_c, j.r((0.07, 0.07, 1.0))) & (z > 0.45)] = 5
    t[_ellipsoid(x, y, z, j.c((-0.3, -0.3, 0.16)), j.r((0.07, 0.06, 0.1))) < 1] = 12  # right adrenal
    t[_ellipsoid(x, y, z, j.c((0.3, -0.3, 0.24)), j.r((0.07, 0.06, 0.1))) < 1] = 13  # left adrenal
    return t


def _cardiac_tissues(x, y, z, rng: np.random.Generator) -> np.ndarray:
    j = _Jitter(rng, 0.06, 0.03)
    t = np.zeros(np.broadcast_shapes(x.shape, y.shape, z.shape), dtype=np.uint8)
    zeros = np.zeros_like(z)
    body = _ellipsoid(x, y, zeros, (0.0, 0.0, 0.0), j.r((0.95, 0.78, 1.0)) * (1, 1, 1))
    t[body < 1] = 102
    t[body < 0.85] = 100
    for cx in (-0.55, 0.55):  # lungs
        t[_ellipsoid(x, y, zeros, (cx, 0.05, 0.0), j.r((0.3, 0.45, 1.0))) < 1] = 101
    # left ventricle: truncated prolate ellipsoid, base at z=-1, cavity closes before the apex slices.
    lv_c = j.c((0.15, 0.0, -1.0))
    lv_r = j.r((0.24, 0.24, 1.7))
    thickness = 0.11 * (1.0 + rng.uniform(-0.15, 0.15))
    epi = _ellipsoid(x, y, z, lv_c, lv_r + (thickness, thickness, 0.25))
    rv = _ellipsoid(x, y, z, j.c((-0.28, 0.06, -1.0)), j.r((0.3, 0.4, 1.55)))
    t[(rv < 1) & (epi >= 1.25)] = 1  # crescent wrapped around the septum, separated by a myocardial wall
    t[epi < 1] = 2
    t[(_ellipsoid(x, y, z, lv_c, lv_r) < 1) & (epi < 0.7)] = 3
    return t


_TISSUE_BUILDERS = {"brain": _brain_tissues, "abdomen": _abdomen_tissues, "cardiac": _cardiac_tissues}


def site_intensity_table(preset: str, site: int) -> dict[int, float]:
    """Mean intensity per tissue id for a site. Site 0 is canonical; site k > 0 is a fixed random style.

    The style depends only on (preset, site), not on the data set seed, so "site 2" means the same scanner in
    every synthetic data set (train and test sets drawn with different seeds share their sites).
    """
    p = _get_preset(preset)
    if site == 0:
        return dict(p.intensities)
    rng = np.random.default_rng([sorted(PRESETS).index(preset), int(site), 7919])
    lo, hi = p.value_range
    if p.modality == "CT":  # contrast timing / calibration: per-tissue HU offsets, air stays air.
        table = {k: v if k == 0 else v + rng.uniform(-60.0, 60.0) for k, v in p.intensities.items()}
    else:  # scanner-wide contrast change (gamma) plus per-tissue shifts.
        gamma = rng.uniform(0.5, 2.0)
        table = {
            k: 0.0 if k == 0 else float(np.clip(v**gamma + rng.normal(0.0, 0.1), 0.03, 0.95) * (hi - lo) + lo)
            for k, v in p.intensities.items()
        }
    for label, twin in p.same_tissue.items():
        table[label] = table[twin]
    return table


def generate_subject(
    preset: str = "brain",
    shape: Sequence[int] | None = None,
    rng: np.random.Generator | int | None = None,
    site: int = 0,
    return_ddf: bool = False,
) -> tuple[np.ndarray, np.ndarray] | tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One random subject in memory: (image float32, label uint8[, ddf float64 [3, *shape] in voxels]).

    The label map is the preset's template shapes evaluated at p + u(p) with u a random diffeomorphism; the image
    is rendered from the site's intensity table with subject-level appearance jitter.
    """
    p = _get_preset(preset)
    rng = _as_rng(rng)
    shape = tuple(int(n) for n in (shape or p.default_shape))
    if len(shape) != 3 or min(shape) < 2:
        raise ValueError(f"shape must be 3 positive sizes >= 2, got {shape}")
    limits = [f * n for f, n in zip(p.max_displacement_fraction, shape, strict=True)]
    ddf = random_diffeomorphic_ddf(shape, rng, limits)
    tissues = _TISSUE_BUILDERS[p.name](*_normalised_coords(shape, ddf), rng)
    label = np.where(np.isin(tissues, list(p.labels)), tissues, 0).astype(np.uint8)
    image = _render(p, tissues, site_intensity_table(p.name, site), rng)
    return (image, label, ddf) if return_ddf else (image, label)


def _render(p: Preset, tissues: np.ndarray, table: dict[int, float], rng: np.random.Generator) -> np.ndarray:
    lo, hi = p.value_range
    scale = 1.0 if p.modality == "MR" else 1000.0  # jitter magnitudes in units of the typical tissue contrast
    lut = np.zeros(int(tissues.max()) + 1, dtype=np.float64)
    for k, v in table.items():
        if k < lut.size:
            lut[k] = v + (0.0 if k == 0 else rng.normal(0.0, 0.02 * scale))
    image = lut[tissues]
    texture = _smooth_field(tissues.shape, 1, rng, control_points=9)[0]
    image = image + (tissues > 0) * texture / max(np.abs(texture).max(), 1e-12) * 0.03 * scale
    image = ndimage.gaussian_filter(image, sigma=rng.uniform(0.4, 0.8), mode="nearest")
    if p.modality == "MR":
        bias = _smooth_field(tissues.shape, 1, rng, control_points=3)[0]
        image = image * np.exp(rng.uniform(0.05, 0.2) * bias / max(np.abs(bias).max(), 1e-12))
        image = np.clip(image, 0.0, None) ** rng.uniform(0.85, 1.15)
        image = image + rng.normal(0.0, rng.uniform(0.01, 0.03), image.shape)
    else:
        image = image + rng.normal(0.0, rng.uniform(8.0, 20.0), image.shape)
    return np.clip(image, lo, hi).astype(np.float32)


def split_counts(num_subjects: int, num_validation: int | None = None, num_test: int | None = None) -> tuple[int, ...]:
    """(train, validation, test) sizes: by default 20 % validation (>= 1 when n >= 2) and 20 % test (n >= 5)."""
    n = int(num_subjects)
    n_val = (max(1, n // 5) if n >= 2 else 0) if num_validation is None else int(num_validation)
    n_test = n // 5 if num_test is None else int(num_test)
    if n < 1 or n_val < 0 or n_test < 0 or n_val + n_test >= n:
        raise ValueError(
            f"cannot split {n} subjects into {n_val} validation and {n_test} test with >= 1 training subject"
        )
    return n - n_val - n_test, n_val, n_test


def generate_dataset(
    out_dir: str | os.PathLike,
    preset: str = "brain",
    num_subjects: int = 8,
    shape: Sequence[int] | None = None,
    seed: int = 0,
    num_sites: int = 1,
    spacing: Sequence[float] | None = None,
    num_validation: int | None = None,
    num_test: int | None = None,
    datalist_name: str = "datalist.json",
) -> Path:
    """Write ``num_subjects`` phantoms as NIfTI plus a Decathlon datalist JSON; return the JSON path.

    Layout: ``out_dir/imagesTr/subNNN.nii.gz`` (float32), ``out_dir/labelsTr/subNNN.nii.gz`` (uint8), and
    ``out_dir/<datalist_name>`` with "training"/"validation"/"test" sections (paths relative to ``out_dir``).
    Subject i is acquired at site ``i % num_sites`` (recorded as "site" in its entry). The affine is
    ``diag(spacing)`` (identity when ``spacing`` is None). Same arguments -> byte-identical files.
    """
    p = _get_preset(preset)
    if num_sites < 1:
        raise ValueError(f"num_sites must be >= 1, got {num_sites}")
    shape = tuple(int(n) for n in (shape or p.default_shape))
    spacing = tuple(float(s) for s in (spacing or (1.0, 1.0, 1.0)))
    n_train, n_val, _ = split_counts(num_subjects, num_validation, num_test)
    out = Path(out_dir)
    affine = np.diag([*spacing, 1.0])
    entries = []
    for i in range(num_subjects):
        site = i % num_sites
        image, label = generate_subject(preset, shape, np.random.default_rng([int(seed), i]), site=site)
        name = f"sub{i:03d}.nii.gz"
        save_nifti(image, affine, out / "imagesTr" / name)
        save_nifti(label, affine, out / "labelsTr" / name)
        entries.append(
            {"image": f"imagesTr/{name}", "label": f"labelsTr/{name}", "subject": f"sub{i:03d}", "site": site}
        )
    datalist = {
        "name": f"synthetic_{preset}",
        "description": f"Synthetic {preset} phantoms (common.data.synthetic, seed {seed}, {num_sites} site(s))",
        "reference": "generated; no real data",
        "licence": "CC0 (synthetic)",
        "tensorImageSize": "3D",
        "modality": {"0": p.modality},
        "labels": {"0": "background", **{str(k): v for k, v in p.labels.items()}},
        "spacing": list(spacing),
        "spacing_known": True,
        "shape": list(shape),
        "seed": int(seed),
        "num_sites": int(num_sites),
        "numTraining": n_train,
        "training": entries[:n_train],
        "validation": entries[n_train : n_train + n_val],
        "test": entries[n_train + n_val :],
    }
    path = out / datalist_name
    atomic_json_dump(datalist, path)
    return path
