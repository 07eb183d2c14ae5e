"""Datalist preparers for the real data sets: ``python -m common.data prepare <dataset> --src DIR --out list.json``.

Why: each data set ships in its own folder layout and with its own (paper) split; a preparer turns it into one
Decathlon-style JSON with the split, the label names and dataset caveats recorded, so bundles only ever read
datalists. Source files are referenced by absolute path and never modified; files a preparer has to derive (e.g.
3D prostate labels from 4D ones) are written next to the JSON, which must not be inside the source folder.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from common.data.datalist import load_datalist, write_datalist
from common.data.validate import DataValidationError, check_output_dir, load_nifti
from common.io import save_nifti

__all__ = [
    "PREPARERS",
    "prepare_abdomenctct",
    "prepare_acdc",
    "prepare_lpba40",
    "prepare_mindboggle101",
    "prepare_oasis",
    "prepare_prostate_mr",
]

ACDC_LABELS = {0: "background", 1: "right_ventricle", 2: "myocardium", 3: "left_ventricle"}
ACDC_GROUPS = ("DCM", "HCM", "MINF", "NOR", "RV")  # patients 001-020, 021-040, ... (ACDC ordering)

OASIS_SEG35 = [
    "L-Cerebral-White-Matter", "L-Cerebral-Cortex", "L-Lateral-Ventricle", "L-Inf-Lat-Vent",
    "L-Cerebellum-White-Matter", "L-Cerebellum-Cortex", "L-Thalamus", "L-Caudate", "L-Putamen", "L-Pallidum",
    "3rd-Ventricle", "4th-Ventricle", "Brain-Stem", "L-Hippocampus", "L-Amygdala", "L-Accumbens", "L-VentralDC",
    "L-vessel", "L-choroid-plexus", "R-Cerebral-White-Matter", "R-Cerebral-Cortex", "R-Lateral-Ventricle",
    "R-Inf-Lat-Vent", "R-Cerebellum-White-Matter", "R-Cerebellum-Cortex", "R-Thalamus", "R-Caudate", "R-Putamen",
    "R-Pallidum", "R-Hippocampus", "R-Amygdala", "R-Accumbens", "R-VentralDC", "R-vessel", "R-choroid-plexus",
]  # fmt: skip
OASIS_SEG4 = ["cortex", "subcortical-grey-matter", "white-matter", "csf"]

ABDOMEN_LABELS = [
    "spleen", "right_kidney", "left_kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta",
    "inferior_vena_cava", "portal_and_splenic_vein", "pancreas", "right_adrenal_gland", "left_adrenal_gland",
]  # fmt: skip
# Cyclical self-training split (ref data_utils.py, spec section 2): eval ids = the L2R validation cases.
ABDOMEN_TEST_IDS = (1, 4, 7, 10, 13, 16, 19, 22, 25, 28)
ABDOMEN_TRAIN_IDS = tuple(i for i in range(1, 31) if i not in ABDOMEN_TEST_IDS)
ABDOMEN_MONITOR_IDS = (2, 3, 5)  # "hyper-parameters set on three cases from the training set"

LPBA40_LABELS = {
    21: "L_superior_frontal_gyrus", 22: "R_superior_frontal_gyrus", 23: "L_middle_frontal_gyrus",
    24: "R_middle_frontal_gyrus", 25: "L_inferior_frontal_gyrus", 26: "R_inferior_frontal_gyrus",
    27: "L_precentral_gyrus", 28: "R_precentral_gyrus", 29: "L_middle_orbitofrontal_gyrus",
    30: "R_middle_orbitofrontal_gyrus", 31: "L_lateral_orbitofrontal_gyrus", 32: "R_lateral_orbitofrontal_gyrus",
    33: "L_gyrus_rectus", 34: "R_gyrus_rectus", 41: "L_postcentral_gyrus", 42: "R_postcentral_gyrus",
    43: "L_superior_parietal_gyrus", 44: "R_superior_parietal_gyrus", 45: "L_supramarginal_gyrus",
    46: "R_supramarginal_gyrus", 47: "L_angular_gyrus", 48: "R_angular_gyrus", 49: "L_precuneus",
    50: "R_precuneus", 61: "L_superior_occipital_gyrus", 62: "R_superior_occipital_gyrus",
    63: "L_middle_occipital_gyrus", 64: "R_middle_occipital_gyrus", 65: "L_inferior_occipital_gyrus",
    66: "R_inferior_occipital_gyrus", 67: "L_cuneus", 68: "R_cuneus", 81: "L_superior_temporal_gyrus",
    82: "R_superior_temporal_gyrus", 83: "L_middle_temporal_gyrus", 84: "R_middle_temporal_gyrus",
    85: "L_inferior_temporal_gyrus", 86: "R_inferior_temporal_gyrus", 87: "L_parahippocampal_gyrus",
    88: "R_parahippocampal_gyrus", 89: "L_lingual_gyrus", 90: "R_lingual_gyrus", 91: "L_fusiform_gyrus",
    92: "R_fusiform_gyrus", 101: "L_insular_cortex", 102: "R_insular_cortex", 121: "L_cingulate_gyrus",
    122: "R_cingulate_gyrus", 161: "L_caudate", 162: "R_caudate", 163: "L_putamen", 164: "R_putamen",
    165: "L_hippocampus", 166: "R_hippocampus", 181: "cerebellum", 182: "brainstem",
}  # fmt: skip

DKT31 = {
    2: "caudalanteriorcingulate", 3: "caudalmiddlefrontal", 5: "cuneus", 6: "entorhinal", 7: "fusiform",
    8: "inferiorparietal", 9: "inferiortemporal", 10: "isthmuscingulate", 11: "lateraloccipital",
    12: "lateralorbitofrontal", 13: "lingual", 14: "medialorbitofrontal", 15: "middletemporal",
    16: "parahippocampal", 17: "paracentral", 18: "parsopercularis", 19: "parsorbitalis", 20: "parstriangularis",
    21: "pericalcarine", 22: "postcentral", 23: "posteriorcingulate", 24: "precentral", 25: "precuneus",
    26: "rostralanteriorcingulate", 27: "rostralmiddlefrontal", 28: "superiorfrontal", 29: "superiorparietal",
    30: "superiortemporal", 31: "supramarginal", 34: "transversetemporal", 35: "insula",
}  # fmt: skip
MINDBOGGLE_LABELS = {1000 + k: f"ctx-lh-{v}" for k, v in DKT31.items()} | {
    2000 + k: f"ctx-rh-{v}" for k, v in DKT31.items()
}
MINDBOGGLE_TRAIN_GROUPS = ("NKI-RS-22", "NKI-TRT-20")
MINDBOGGLE_TEST_GROUPS = ("OASIS-TRT-20",)


def _labels_dict(names: dict[int, str] | Sequence[str]) -> dict[str, str]:
    items = names.items() if isinstance(names, dict) else enumerate(names, start=1)
    return {"0": "background", **{str(k): v for k, v in items if k != 0}}


def _natural_key(text: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", text)]


def _require_dir(src: str | os.PathLike, hint: str) -> Path:
    root = Path(src).expanduser().resolve()
    if not root.is_dir():
        raise DataValidationError(f"{root}: source folder does not exist. Fix: {hint}")
    return root


def _seeded_split(ids: Sequence[str], num_validation: int, num_test: int, seed: int) -> tuple[list, list, list]:
    """Deterministic (train, validation, test) split of sorted ids by a seeded permutation."""
    order = np.random.default_rng(seed).permutation(len(ids))
    picked = [sorted(ids, key=_natural_key)[i] for i in order]
    val, test = picked[:num_validation], picked[num_validation : num_validation + num_test]
    train = [i for i in sorted(ids, key=_natural_key) if i not in set(val) | set(test)]
    return train, sorted(val, key=_natural_key), sorted(test, key=_natural_key)


def _finish(datalist: dict, out: str | os.PathLike, src: Path, validate: bool) -> Path:
    """Write the JSON (refusing the source folder) and, if asked, load every non-empty section with checks."""
    out_path = Path(out).expanduser().resolve()
    check_output_dir(out_path.parent, [src])
    datalist.setdefault("tensorImageSize", "3D")
    write_datalist(datalist, out_path)
    for section in ("training", "validation", "test"):
        if datalist.get(section):
            load_datalist(out_path, section, validate=validate)
    return out_path


def _split_sizes(n: int, num_validation: int | None, num_test: int | None) -> tuple[int, int]:
    n_val = (max(1, n // 5) if n >= 2 else 0) if num_validation is None else num_validation
    n_test = n // 5 if num_test is None else num_test
    if n_val + n_test >= n:
        raise DataValidationError(f"cannot split {n} subjects into {n_val} validation + {n_test} test + >= 1 training")
    return n_val, n_test


def prepare_acdc(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    validate: bool = True,
    validation_fraction: float = 0.125,
    test_fraction: float = 0.125,
) -> Path:
    """ACDC (``patientXXX_frame0{1,2}.nii.gz`` + ``_gt``): split by patient, stratified by pathology group.

    Both annotated frames of a patient (frame01 = end-diastole, frame02 = end-systole) stay in the same section.
    The copy has identity affines (spacing unknown): the datalist records ``"spacing_known": false``.
    """
    root = _require_dir(src, "pass the folder holding patientXXX_frame0Y.nii.gz files")
    frames: dict[str, list[Path]] = {}
    for image in sorted(root.glob("patient[0-9][0-9][0-9]_frame[0-9][0-9].nii.gz")):
        label = image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))
        if not label.exists():
            raise DataValidationError(f"{label}: label of {image.name} is missing. Fix: restore the _gt file")
        frames.setdefault(image.name[:10], []).append(image)
    if not frames:
        raise DataValidationError(f"{root}: no patientXXX_frameYY.nii.gz files found. Fix: check --src")
    by_group: dict[int, list[str]] = {}
    for patient in frames:
        by_group.setdefault((int(patient[7:10]) - 1) // 20, []).append(patient)
    sections: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for group, patients in sorted(by_group.items()):
        n_val, n_test = round(len(patients) * validation_fraction), round(len(patients) * test_fraction)
        parts = _seeded_split(patients, n_val, n_test, seed + group)
        for section, members in zip(("training", "validation", "test"), parts, strict=True):
            for patient in members:
                for image in frames[patient]:
                    frame = int(image.name[16:18])
                    sections[section].append(
                        {
                            "image": str(image),
                            "label": str(image.with_name(image.name.replace(".nii.gz", "_gt.nii.gz"))),
                            "patient": patient,
                            "frame": frame,
                            "phase": {1: "ED", 2: "ES"}.get(frame, "unknown"),
                            "group": ACDC_GROUPS[group] if group < len(ACDC_GROUPS) else "unknown",
                        }
                    )
    datalist = {
        "name": "ACDC",
        "description": "ACDC cine MRI ED/ES frames; split by patient, stratified by pathology group",
        "reference": "Bernard et al., IEEE TMI 2018, doi:10.1109/TMI.2018.2837502",
        "licence": "CC BY-NC-SA 4.0: non-commercial research use only",
        "modality": {"0": "MR"},
        "labels": _labels_dict(ACDC_LABELS),
        "spacing_known": False,
        "spacing_note": "identity affines: the voxel size is unknown; report distances in voxel units",
        "split_seed": seed,
        **sections,
    }
    return _finish(datalist, out, root, validate)


def prepare_oasis(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    validate: bool = True,
    seg: str = "seg35",
    num_validation: int | None = None,
    num_test: int | None = None,
) -> Path:
    """neurite-OASIS (``<subject>/aligned_norm.nii.gz`` + ``aligned_seg35.nii.gz`` or ``aligned_seg4``)."""
    if seg not in ("seg35", "seg4"):
        raise ValueError(f"seg must be 'seg35' or 'seg4', got {seg!r}")
    root = _require_dir(src, "pass the folder holding OASIS_OAS1_xxxx_MR1/ subject folders")
    subjects = sorted(
        (
            d.name
            for d in root.iterdir()
            if (d / "aligned_norm.nii.gz").is_file() and (d / f"aligned_{seg}.nii.gz").is_file()
        ),
        key=_natural_key,
    )
    if not subjects:
        raise DataValidationError(
            f"{root}: no <subject>/aligned_norm.nii.gz + aligned_{seg}.nii.gz found. Fix: check --src"
        )
    train, val, test = _seeded_split(subjects, *_split_sizes(len(subjects), num_validation, num_test), seed)

    def entries(ids):
        return [
            {
                "image": str(root / s / "aligned_norm.nii.gz"),
                "label": str(root / s / f"aligned_{seg}.nii.gz"),
                "subject": s,
            }
            for s in ids
        ]

    datalist = {
        "name": f"neurite-OASIS {seg}",
        "description": "OASIS-1 T1 MRI, skull-stripped, affinely aligned (neurite-oasis), FreeSurfer/SAMSEG labels",
        "reference": "Marcus et al., J Cogn Neurosci 2007; Hoopes & Dalca, IPMI 2021",
        "licence": "OASIS Data Use Agreement (research use)",
        "modality": {"0": "MR"},
        "labels": _labels_dict(OASIS_SEG35 if seg == "seg35" else OASIS_SEG4),
        "spacing_known": True,
        "split_seed": seed,
        "training": entries(train),
        "validation": entries(val),
        "test": entries(test),
    }
    return _finish(datalist, out, root, validate)


def prepare_abdomenctct(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0, validate: bool = True) -> Path:
    """Learn2Reg AbdomenCTCT (``imagesTr``/``labelsTr``) with the cyclical self-training split.

    training: the 20 ids 2,3,5,6,...,30; test: ids 1,4,...,28 (the L2R validation pairs); validation: cases 2, 3, 5
    (a subset of training, as the paper tuned on three training cases; for monitoring only). ``seed`` is unused.
    """
    root = _require_dir(src, "pass the AbdomenCTCT folder holding imagesTr/ and labelsTr/")

    def entry(case: int) -> dict:
        name = f"AbdomenCTCT_{case:04d}_0000.nii.gz"
        image, label = root / "imagesTr" / name, root / "labelsTr" / name
        for path in (image, label):
            if not path.is_file():
                raise DataValidationError(f"{path}: AbdomenCTCT case {case} is missing. Fix: restore the full data set")
        return {"image": str(image), "label": str(label), "case": case}

    datalist = {
        "name": "AbdomenCTCT",
        "description": "Learn2Reg AbdomenCTCT inter-patient CT; split of the cyclical self-training paper",
        "reference": "Learn2Reg 2022; Xu et al., 'Abdomen CT multi-atlas' (BTCV labels)",
        "licence": "see the Learn2Reg AbdomenCTCT terms",
        "modality": {"0": "CT"},
        "labels": _labels_dict(ABDOMEN_LABELS),
        "spacing_known": True,
        "validation_in_training": True,
        "training": [entry(i) for i in ABDOMEN_TRAIN_IDS],
        "validation": [entry(i) for i in ABDOMEN_MONITOR_IDS],
        "test": [entry(i) for i in ABDOMEN_TEST_IDS],
    }
    return _finish(datalist, out, root, validate)


def _find_one(root: Path, prefix: str, keyword: str) -> Path:
    """The single NIfTI file under ``root`` whose name starts with ``prefix`` and contains ``keyword``."""
    found = sorted(
        p
        for p in root.rglob(f"{prefix}*{keyword}*")
        if p.is_file() and p.name.startswith(prefix) and p.name.endswith((".nii", ".nii.gz"))
    )
    if len(found) != 1:
        listing = ", ".join(str(p) for p in found) or "none"
        raise DataValidationError(
            f"{root}: expected exactly one NIfTI '{prefix}*{keyword}*.nii[.gz]', found {listing}. "
            "Fix: check --src (convert Analyze .img/.hdr to NIfTI first)"
        )
    return found[0]


def prepare_lpba40(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    validate: bool = True,
    image_keyword: str = "skullstripped",
    label_keyword: str = "label",
) -> Path:
    """LPBA40 (subjects S01..S40, LONI naming ``S01.delineation.skullstripped.nii.gz`` and
    ``S01.delineation.structure.label.nii.gz`` anywhere under ``src``; convert the Analyze .img/.hdr to NIfTI
    first). CLMorph split: train S01-S30, test S31-S40, atlas S30; validation = S28-S30 (a subset of training,
    the paper has none). ``seed`` is unused.
    """
    root = _require_dir(src, "pass the LPBA40 folder holding S01..S40")
    entries = []
    for sid in range(1, 41):
        prefix = f"S{sid:02d}."
        image, label = _find_one(root, prefix, image_keyword), _find_one(root, prefix, label_keyword)
        entries.append({"image": str(image), "label": str(label), "subject": f"S{sid:02d}"})
    datalist = {
        "name": "LPBA40",
        "description": "LONI LPBA40 T1 MRI with 56 manual structures; CLMorph split (train S01-S30, test S31-S40)",
        "reference": "Shattuck et al., NeuroImage 2008",
        "licence": "LONI LPBA40 terms of use",
        "modality": {"0": "MR"},
        "labels": _labels_dict(LPBA40_LABELS),
        "spacing_known": True,
        "validation_in_training": True,
        "atlas": {**entries[29], "rule": "paper: image #30 (S30)"},
        "training": entries[:30],
        "validation": entries[27:30],
        "test": entries[30:],
    }
    return _finish(datalist, out, root, validate)


def prepare_mindboggle101(
    src: str | os.PathLike,
    out: str | os.PathLike,
    seed: int = 0,
    validate: bool = True,
    image_name: str = "t1weighted_brain.MNI152.nii.gz",
    label_name: str = "labels.DKT31.manual.MNI152.nii.gz",
) -> Path:
    """MindBoggle101 subset (``<group>_volumes/<group>-N/`` with ``image_name`` and ``label_name``).

    CLMorph split: train NKI-RS-22 + NKI-TRT-20 (42), test OASIS-TRT-20 (20). The paper atlas "#39" is recorded as
    the 39th of the 62 subjects in natural name order (the 39th training subject too, since training sorts first);
    the indexing is not stated in the paper, so check it against ``select_atlas_closest_to_mean``. Validation = last
    3 training subjects (a subset of training, for monitoring only). ``seed`` is unused.
    """
    root = _require_dir(src, "pass the MindBoggle101 folder holding <group>_volumes/ folders")
    subjects = {}
    for image in root.rglob(image_name):
        label = image.parent / label_name
        if not label.is_file():
            raise DataValidationError(f"{label}: label of {image} is missing. Fix: restore it or pass --label_name")
        subjects[image.parent.name] = {"image": str(image), "label": str(label), "subject": image.parent.name}
    names = sorted(subjects, key=_natural_key)

    def members(groups) -> list[dict]:
        return [subjects[n] for n in names if re.sub(r"-\d+$", "", n) in groups]

    train, test = members(MINDBOGGLE_TRAIN_GROUPS), members(MINDBOGGLE_TEST_GROUPS)
    if len(train) != 42 or len(test) != 20:
        raise DataValidationError(
            f"{root}: expected 42 NKI (train) and 20 OASIS-TRT-20 (test) subjects with {image_name}, found "
            f"{len(train)} and {len(test)}. Fix: point --src at the full MindBoggle101 volumes"
        )
    ordered = train + test
    datalist = {
        "name": "MindBoggle101",
        "description": "MindBoggle101 MNI152 T1 with DKT31 manual cortical labels; CLMorph split",
        "reference": "Klein & Tourville, Front Neurosci 2012",
        "licence": "CC BY-NC-SA (MindBoggle101 terms)",
        "modality": {"0": "MR"},
        "labels": _labels_dict(MINDBOGGLE_LABELS),
        "spacing_known": True,
        "validation_in_training": True,
        "atlas": {**ordered[38], "rule": "paper: image #39, taken 1-based in natural name order (ambiguous)"},
        "training": train,
        "validation": train[-3:],
        "test": test,
    }
    return _finish(datalist, out, root, validate)


def prepare_prostate_mr(src: str | os.PathLike, out: str | os.PathLike, seed: int = 0, validate: bool = True) -> Path:
    """DeepReg prostate MR (``caseNNNNNN_mr.nii.gz`` + ``caseNNNNNN_mr_label.nii.gz``; labels 3D or 4D).

    Channel 0 of a 4D label is the gland: it is written as a 3D uint8 map to ``labels_gland/`` next to the JSON,
    and channels 1.. (landmarks) as one map with values 1..C-1 to ``landmarks/`` (key "landmark_label").
    Split: DeepReg test cases 25-26 -> test, 22-24 -> validation, 00-21 -> training. ``seed`` is unused.
    """
    root = _require_dir(src, "pass the folder holding caseNNNNNN_mr.nii.gz files")
    out_path = Path(out).expanduser().resolve()
    check_output_dir(out_path.parent, [root])
    images = sorted(root.glob("case[0-9][0-9][0-9][0-9][0-9][0-9]_mr.nii.gz"))
    if not images:
        raise DataValidationError(f"{root}: no caseNNNNNN_mr.nii.gz files found. Fix: check --src")
    sections: dict[str, list[dict]] = {"training": [], "validation": [], "test": []}
    for image in images:
        case = image.name[:10]
        source_label = image.with_name(f"{case}_mr_label.nii.gz")
        label, affine = load_nifti(source_label)
        if label.ndim not in (3, 4):
            raise DataValidationError(f"{source_label}: label has {label.ndim} dimensions, expected 3 or 4")
        label = label.reshape(*label.shape[:3], -1)
        gland = out_path.parent / "labels_gland" / f"{case}.nii.gz"
        save_nifti((label[..., 0] > 0).astype(np.uint8), affine, gland)
        entry = {"image": str(image), "label": str(gland.relative_to(out_path.parent)), "case": case}
        if label.shape[3] > 1:
            marks = np.zeros(label.shape[:3], dtype=np.uint8)
            for c in range(1, label.shape[3]):
                marks[label[..., c] > 0] = c
            landmark = out_path.parent / "landmarks" / f"{case}.nii.gz"
            save_nifti(marks, affine, landmark)
            entry["landmark_label"] = str(landmark.relative_to(out_path.parent))
        number = int(case[4:])
        sections["test" if number >= 25 else "validation" if number >= 22 else "training"].append(entry)
    datalist = {
        "name": "prostate_mr_deepreg",
        "description": "DeepReg prostate T2 MR crops, gland labels (channel 0 of the source labels)",
        "reference": "DeepReg test data (Fu et al., JOSS 2020); Hu et al. MR-TRUS tutorial",
        "licence": "as distributed with DeepReg (Apache-2.0 repository; data terms undocumented)",
        "modality": {"0": "MR"},
        "labels": {"0": "background", "1": "prostate"},
        "spacing_known": True,
        "spacing_note": "0.4 mm header spacing of resampled crops; treat as nominal",
        **sections,
    }
    return _finish(datalist, out_path, root, validate)


PREPARERS: dict[str, Callable[..., Path]] = {
    "acdc": prepare_acdc,
    "oasis": prepare_oasis,
    "abdomenctct": prepare_abdomenctct,
    "lpba40": prepare_lpba40,
    "mindboggle101": prepare_mindboggle101,
    "prostate_mr": prepare_prostate_mr,
}
