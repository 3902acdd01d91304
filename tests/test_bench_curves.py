"""bench/quality.py helpers of the long-budget mode: training time across a resume, the quality curve."""
from __future__ import annotations


def test_training_seconds_counts_a_stop_and_resume_gap_as_one_usual_interval():
    from bench.quality import training_seconds

    rows = [{"time": t} for t in (100.0, 110.0, 120.0, 5000.0, 5010.0)]  # stopped after 120, resumed at 4990
    assert training_seconds(rows) == [10.0, 20.0, 30.0, 40.0, 50.0]


def test_quality_curve_draws_online_knn_against_wall_time(tmp_path):
    from bench.quality import plot_curves

    report = {"budget_s": 60, "subset_baselines": {"raw_pixels": 0.8, "random_init": 0.7},
              "tasks": {"vicreg": {"task": "vicreg", "curve": [[10.0, 5, 0.71], [20.0, 10, 0.79]]}, "rotation": {"task": "rotation", "curve": []}}}
    assert plot_curves(report, tmp_path / "curve.png") and (tmp_path / "curve.png").stat().st_size > 1000
    assert not plot_curves({"budget_s": 60, "tasks": {"rotation": {"task": "rotation", "curve": []}}}, tmp_path / "none.png")
