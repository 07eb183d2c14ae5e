"""Evaluation reports: one row per case and label in CSV, the same plus a summary in JSON, the summary as markdown.

Rows are flat dicts in "long" form, e.g. ``{"case": "sub031", "label": "frontal", "dice": 0.91, "hd95": 3.2,
"assd": 0.8, "units": "mm"}`` (`rows_from_metrics` builds them from `metrics.per_label_metrics`). Every numeric column
is summarised per group (``group_key``, default "label") as mean ± std over cases, and, when there are several groups,
as mean ± std over cases of each case's mean over groups (the CLMorph "average over regions" protocol).

Conventions: std is the population std (ddof=0); NaN entries (e.g. a label absent from a case with
``both_empty="nan"``) are left out of mean and std and counted in ``n_missing``. The CSV keeps nan/inf as written by
Python; strict JSON has no NaN/inf, so non-finite numbers are written as ``null`` there.
All files are written atomically (`common.io`).
"""

from __future__ import annotations

import csv
import io
import math
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np

from common.io import atomic_json_dump, atomic_write_text

MEAN_OVER_GROUPS = "mean over labels"


def rows_from_metrics(case: str, result: Mapping[str, Mapping[str, float | str]], **extra) -> list[dict]:
    """Long-form rows ``{"case", "label", <metrics>, "units", **extra}`` for one case's per-label (region) result."""
    return [{"case": str(case), "label": str(name), **dict(values), **extra} for name, values in result.items()]


def _is_number(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _numeric_columns(rows: Sequence[Mapping], skip: Iterable[str]) -> list[str]:
    skip = set(skip)
    cols: list[str] = []
    for row in rows:
        for k, v in row.items():
            if k not in skip and k not in cols and _is_number(v):
                cols.append(k)
    return cols


def _stats(values: Sequence[float]) -> dict[str, float | int]:
    arr = np.asarray([float(v) for v in values], dtype=float)
    valid = arr[~np.isnan(arr)]
    if valid.size == 0:
        return {"mean": float("nan"), "std": float("nan"), "n": 0, "n_missing": int(arr.size)}
    return {
        "mean": float(valid.mean()),
        "std": float(valid.std()),
        "n": int(valid.size),
        "n_missing": int(arr.size - valid.size),
    }


def _column_values(rows: Sequence[Mapping], column: str) -> list[float]:
    return [float(r[column]) if _is_number(r.get(column)) else float("nan") for r in rows]


def summarize(rows: Sequence[Mapping], group_key: str = "label", case_key: str = "case") -> dict:
    """Summary statistics of long-form rows (see the module docstring).

    Returns ``{"groups": {group: {metric: {"mean", "std", "n", "n_missing"}}},
    "mean_over_groups": {metric: {...}} (only with several groups), "units": [...], "num_cases": int}``.
    """
    metrics = _numeric_columns(rows, (case_key, group_key))
    groups: dict[str, list[Mapping]] = {}
    cases: dict[str, list[Mapping]] = {}
    for row in rows:
        groups.setdefault(str(row.get(group_key, "all")), []).append(row)
        cases.setdefault(str(row.get(case_key, "")), []).append(row)
    summary: dict = {
        "groups": {g: {m: _stats(_column_values(grows, m)) for m in metrics} for g, grows in groups.items()},
        "units": sorted({str(r["units"]) for r in rows if "units" in r}),
        "num_cases": len(cases),
    }
    if len(groups) > 1:
        per_case = {m: [] for m in metrics}
        for crows in cases.values():
            for m in metrics:
                vals = np.asarray(_column_values(crows, m))
                per_case[m].append(float(np.nanmean(vals)) if np.any(~np.isnan(vals)) else float("nan"))
        summary["mean_over_groups"] = {m: _stats(v) for m, v in per_case.items()}
    return summary


def _json_safe(obj):
    if isinstance(obj, Mapping):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if _is_number(obj):
        value = float(obj) if not isinstance(obj, numbers.Integral) else int(obj)
        return value if math.isfinite(value) else None
    return obj


def _cell(stat: Mapping, n_rows: int) -> str:
    if stat["n"] == 0:
        return "n/a"
    text = f"{stat['mean']:.4f} ± {stat['std']:.4f}"
    return text if stat["n"] == n_rows else f"{text} (n={stat['n']})"


def _markdown(summary: Mapping, title: str, group_key: str) -> str:
    groups = summary["groups"]
    metrics = list(next(iter(groups.values()), {}).keys())
    units = ", ".join(summary["units"]) or "n/a"
    lines = [
        f"# {title}",
        "",
        f"{summary['num_cases']} cases; mean ± std (population) over cases; distances in {units}.",
        "",
        "| " + " | ".join([group_key, *metrics]) + " |",
        "|" + "---|" * (len(metrics) + 1),
    ]
    for name, stats in groups.items():
        n_rows = max(s["n"] + s["n_missing"] for s in stats.values()) if stats else 0
        lines.append("| " + " | ".join([name, *(_cell(stats[m], n_rows) for m in metrics)]) + " |")
    if "mean_over_groups" in summary:
        stats = summary["mean_over_groups"]
        cells = [_cell(stats[m], summary["num_cases"]) for m in metrics]
        lines.append("| " + " | ".join([f"**{MEAN_OVER_GROUPS}**", *cells]) + " |")
    return "\n".join(lines) + "\n"


def write_report(
    rows: Sequence[Mapping],
    out_dir: str | Path,
    name: str,
    group_key: str = "label",
    case_key: str = "case",
    title: str | None = None,
) -> tuple[Path, Path, Path]:
    """Write ``<name>.csv`` (rows), ``<name>.json`` (rows + summary) and ``<name>.md`` (summary table) in ``out_dir``.

    Returns the three paths (csv, json, md).
    """
    if not rows:
        raise ValueError(f"write_report({name!r}): no rows to write (did the evaluator see any case?)")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics = _numeric_columns(rows, (case_key, group_key))
    leading = [k for k in (case_key, group_key) if any(k in r for r in rows)]
    others: list[str] = []
    for row in rows:
        others += [k for k in row if k not in leading and k not in metrics and k not in others]
    columns = leading + metrics + others
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    summary = summarize(rows, group_key, case_key)
    csv_path = atomic_write_text(out / f"{name}.csv", buffer.getvalue())
    document = {"name": name, "columns": columns, "rows": [dict(r) for r in rows], "summary": summary}
    json_path = atomic_json_dump(_json_safe(document), out / f"{name}.json")
    md_path = atomic_write_text(out / f"{name}.md", _markdown(summary, title or name, group_key))
    return Path(csv_path), Path(json_path), Path(md_path)


def read_csv_rows(path: str | Path, text_columns: Sequence[str] = ("case", "label", "units")) -> list[dict]:
    """Rows of a report CSV; numeric strings (including nan/inf) become floats except in ``text_columns``."""

    def convert(key: str, text: str):
        if key in text_columns:
            return text
        try:
            return float(text)
        except ValueError:
            return text

    with open(path, newline="") as handle:
        return [{k: convert(k, v) for k, v in row.items()} for row in csv.DictReader(handle)]
