"""Report files round-trip and their summary matches statistics computed by hand."""

import json
import math

import pytest

from common.evaluation.report import read_csv_rows, rows_from_metrics, summarize, write_report

RESULTS = {
    "001": {"a": {"dice": 0.5, "hd95": 4.0, "units": "mm"}, "b": {"dice": 0.9, "hd95": 1.0, "units": "mm"}},
    "002": {"a": {"dice": 0.7, "hd95": 2.0, "units": "mm"}, "b": {"dice": 0.7, "hd95": float("nan"), "units": "mm"}},
    "003": {"a": {"dice": 0.9, "hd95": 3.0, "units": "mm"}, "b": {"dice": 0.5, "hd95": 5.0, "units": "mm"}},
}


def make_rows():
    rows = []
    for case, result in RESULTS.items():
        rows += rows_from_metrics(case, result, fold=0)
    return rows


def test_round_trip_and_summary(tmp_path):
    rows = make_rows()
    csv_path, json_path, md_path = write_report(rows, tmp_path / "out", "val")
    assert [p.name for p in (csv_path, json_path, md_path)] == ["val.csv", "val.json", "val.md"]
    back = read_csv_rows(csv_path)
    assert len(back) == len(rows)
    for got, want in zip(back, rows):
        assert got.keys() == want.keys()
        for k, v in want.items():
            if isinstance(v, float) and math.isnan(v):
                assert math.isnan(got[k])
            else:
                assert got[k] == v  # floats are written with full precision; "001" stays a string
    doc = json.loads(json_path.read_text())
    assert doc["rows"][3]["hd95"] is None  # NaN -> null in strict JSON
    assert [r["dice"] for r in doc["rows"]] == [r["dice"] for r in rows]

    # hand statistics: label a dice 0.5/0.7/0.9 -> mean 0.7, population std sqrt(0.08/3)
    a = doc["summary"]["groups"]["a"]
    assert a["dice"]["mean"] == pytest.approx(0.7) and a["dice"]["std"] == pytest.approx(math.sqrt(0.08 / 3))
    b_hd = doc["summary"]["groups"]["b"]["hd95"]  # NaN left out: mean of 1 and 5
    assert (b_hd["mean"], b_hd["std"], b_hd["n"], b_hd["n_missing"]) == (pytest.approx(3.0), pytest.approx(2.0), 2, 1)
    # per-case mean over labels: dice 0.7, 0.7, 0.7 -> 0.7 ± 0; hd95 2.5, 2.0 (nan ignored), 4.0
    over = doc["summary"]["mean_over_groups"]
    assert over["dice"]["mean"] == pytest.approx(0.7) and over["dice"]["std"] == pytest.approx(0.0, abs=1e-12)
    assert over["hd95"]["mean"] == pytest.approx((2.5 + 2.0 + 4.0) / 3)
    assert doc["summary"]["units"] == ["mm"] and doc["summary"]["num_cases"] == 3
    assert "fold" in doc["columns"] and "fold" in doc["summary"]["groups"]["a"]

    md = md_path.read_text()
    assert "| a | 0.7000 ± 0.1633 |" in md
    assert "3.0000 ± 2.0000 (n=2)" in md
    assert "mean over labels" in md and "distances in mm" in md
    assert not [p for p in (tmp_path / "out").iterdir() if p.name.startswith(".")]  # no temp files left


def test_rows_without_groups_and_empty_rows(tmp_path):
    rows = [{"case": "x", "sdlogj": 0.1, "folding_percent": 0.0}, {"case": "y", "sdlogj": 0.3, "folding_percent": 1.0}]
    s = summarize(rows)
    assert list(s["groups"]) == ["all"] and "mean_over_groups" not in s
    assert s["groups"]["all"]["sdlogj"]["mean"] == pytest.approx(0.2)
    write_report(rows, tmp_path, "deformation")
    assert read_csv_rows(tmp_path / "deformation.csv")[1] == {"case": "y", "sdlogj": 0.3, "folding_percent": 1.0}
    with pytest.raises(ValueError, match="no rows"):
        write_report([], tmp_path, "empty")
