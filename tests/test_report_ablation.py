"""The combined Table 5: each task's rungs on shared rows, values from the studies' test summaries on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.reports.ablation import ablation_report
from pipelines.reports.paper import load_paper_numbers

ROOT = Path(__file__).resolve().parents[1]

STUDIES = {"segmentation": "brats2023", "landmark": "fetal_cerebellum", "classification": "adni_ad"}


def stats(mean: float, std: float) -> dict:
    return {"mean": mean, "std": std}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("NNMAMBA_WORKSPACE", str(tmp_path))
    return tmp_path


def write_summary(root, study: str, summary: dict) -> None:
    path = root / "metrics" / study / "test_summary.json"
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps(summary))


def table_rows(path) -> list[list[str]]:
    lines = [line for line in path.read_text().splitlines() if line.startswith("|")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_rows_pair_the_kth_variant_of_every_task(workspace):
    write_summary(workspace, "brats2023", {
        "baseline": {"test_dice_mean": stats(0.8958, 0.01), "test_hd95_mean": stats(7.12, 0.5)},
        "mic": {"test_dice_mean": stats(0.8992, 0.02), "test_hd95_mean": stats(6.94, 0.25)},
        "miccss": {"test_dice_mean": stats(0.8997, 0.0), "test_hd95_mean": stats(6.53, 0.125)},
    })
    write_summary(workspace, "fetal_cerebellum", {v: {"test_mre_mm_mean": stats(m, 0.1)}
                                                  for v, m in (("baseline", 2.23), ("mic", 2.14), ("miccss", 2.11))})
    write_summary(workspace, "adni_ad", {v: {"test_auc": stats(a, 0.005)}
                                         for v, a in (("baseline", 0.9493), ("miccss", 0.9535), ("sequence", 0.9581))})
    table, chart = ablation_report(STUDIES, workspace / "reports")

    header, _, *rows = table_rows(table)
    assert header == ["Method", "brats2023 Dice (%)", "brats2023 HD95 (mm)", "fetal_cerebellum MRE (mm)",
                      "Method (cls.)", "adni_ad AUC (%)"]
    assert rows == [
        ["Baseline", "89.58 ± 1.00", "7.12 ± 0.50", "2.23 ± 0.10", "Baseline", "94.93 ± 0.50"],
        ["+MIC", "89.92 ± 2.00", "6.94 ± 0.25", "2.14 ± 0.10", "+MICCSS", "95.35 ± 0.50"],
        ["+MICCSS", "89.97 ± 0.00", "6.53 ± 0.12", "2.11 ± 0.10", "+Sequence", "95.81 ± 0.50"],
    ]
    assert chart.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_task_without_results_shows_dashes_and_none_at_all_writes_nothing(workspace):
    assert ablation_report(STUDIES, workspace / "reports") == []
    write_summary(workspace, "adni_ad", {"sequence": {"test_auc": stats(0.5, 0.0)}})
    table, _ = ablation_report(STUDIES, workspace / "reports")
    rows = table_rows(table)[2:]
    assert [row[1:4] for row in rows] == [["–", "–", "–"]] * 3
    assert [row[5] for row in rows] == ["–", "–", "50.00 ± 0.00"]


def test_the_papers_own_table_5_rows_come_from_the_shipped_numbers_file_marked_as_the_papers(workspace):
    write_summary(workspace, "brats2023", {"baseline": {"test_dice_mean": stats(0.5, 0.1), "test_hd95_mean": stats(9, 1)}})
    paper = load_paper_numbers(str(ROOT / "pipelines/reports/paper_numbers.yaml"))
    table, _ = ablation_report(STUDIES, workspace / "reports", paper)
    rows = table_rows(table)[2:]
    assert rows[0][:3] == ["Baseline", "50.00 ± 10.00", "9.00 ± 1.00"]   # the run's own rows come first
    # The paper's Table 5, as printed there (Dice and AUC in %, HD95 and MRE in mm).
    assert rows[3:] == [
        ["Baseline (paper)", "89.58", "7.12", "2.23", "Baseline (paper)", "94.93"],
        ["+MIC (paper)", "89.92", "6.94", "2.14", "+MICCSS (paper)", "95.35"],
        ["+MICCSS (paper)", "89.97", "6.53", "2.11", "+Sequence (paper)", "95.81"],
    ]
    assert "published numbers of Gong et al." in table.read_text()
    assert "(paper)" not in table_rows(ablation_report(STUDIES, workspace / "reports")[0])[-1][0]


def test_a_missing_paper_numbers_file_is_named():
    with pytest.raises(ValueError, match="paper_numbers: cannot read .*nowhere.yaml"):
        load_paper_numbers("/nowhere.yaml")
