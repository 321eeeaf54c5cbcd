"""Plots a person can read (one panel per question, bars for once-measured numbers, a gap view for close curves), a
run's round line and summary, and the numbers read off its rows (``outcomes``)."""

from __future__ import annotations

import struct

import pytest

from fedmomentum import outcomes, plots, report


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def rows(losses, accuracy_at=(), accuracy=0.1):
    out = []
    for t, loss in enumerate(losses):
        row = {"round": t, "eval_loss": loss, "downlink_bytes": 10, "uplink_bytes": 10, "clients": 2}
        if t in accuracy_at:
            row["accuracy"] = accuracy
        out.append(row)
    return out


@pytest.mark.parametrize("accuracy_at, panels", [((), 2), ((3,), 3), ((1, 2, 3), 3)])
def test_compare_plot_has_a_gap_panel_and_accuracy_as_bars(tmp_path, accuracy_at, panels):
    runs = {"fedit": rows([3.0, 2.0, 1.7, 1.68], accuracy_at), "fedmomentum": rows([3.0, 2.0, 1.71, 1.69], accuracy_at),
            "flora": rows([3.0, 2.1, 1.8, 1.75], accuracy_at, accuracy=0.0)}
    plots.plot_compare(runs, tmp_path / "compare.png", baseline="fedit")
    width, height = png_size(tmp_path / "compare.png")
    assert width == int(5.5 * panels * 120) and height == int(4.5 * 120)


def test_single_run_curves(tmp_path):
    plots.plot_curves(rows([3.0, 2.0], accuracy_at=(1,)), tmp_path / "one.png", title="fedit")
    assert png_size(tmp_path / "one.png") == (720, 480)  # one panel: accuracy measured once is in the title
    plots.plot_curves(rows([3.0, 2.0, 1.0], accuracy_at=(1, 2)), tmp_path / "two.png", title="fedit")
    assert png_size(tmp_path / "two.png") == (1320, 480)


def test_rounds_to_target():
    assert outcomes.rounds_to_target(rows([3.0, 2.0, 1.5, 1.2]), 1.6) == 2
    assert outcomes.rounds_to_target(rows([3.0, 2.0]), 1.0) is None
    assert outcomes.rounds_to_target(rows([3.0]), None) is None


def test_numbers_read_off_the_rows():
    rows = [{"round": 0, "eval_loss": 3.0},
            {"round": 1, "eval_loss": 2.0, "uplink_bytes": 10, "downlink_bytes": 30, "update_alignment": None,
             "subspace_overlap": None, "path_efficiency": 1.0, "noise_share": 0.2},
            {"round": 2, "uplink_bytes": 10, "downlink_bytes": 20, "update_alignment": 0.5, "subspace_overlap": 0.9,
             "path_efficiency": 0.8, "noise_share": 0.4},
            {"round": 3, "eval_loss": 1.0, "uplink_bytes": 10, "downlink_bytes": 20, "update_alignment": -0.1,
             "subspace_overlap": 0.7, "path_efficiency": 0.6, "noise_share": None}]
    assert outcomes.mean_eval_loss(rows) == 1.5  # rounds 1 and 3: round 0 and the unevaluated round 2 left out
    assert outcomes.mean_eval_loss(rows[:1]) is None
    assert outcomes.bytes_to_target(rows, 1.5) == 40 + 30 + 30 and outcomes.bytes_to_target(rows, 2.0) == 40
    assert outcomes.bytes_to_target(rows, 0.5) is None and outcomes.bytes_to_target(rows, None) is None
    assert outcomes.momentum(rows) == {"mean_update_alignment": pytest.approx(0.2), "mean_subspace_overlap": 0.8,
                                       "final_path_efficiency": 0.6, "mean_noise_share": pytest.approx(0.3)}
    assert outcomes.has_momentum(rows) and not outcomes.has_momentum([{"round": 1, "eval_loss": 2.0}])


def test_a_summary_has_the_momentum_numbers_only_when_the_rows_do():
    from fedmomentum.config import RunConfig

    plain = rows([3.0, 2.0, 1.0])
    for row in plain:
        row["aggregation_seconds"] = 0.0
    summary = report.summarize(plain, RunConfig(), 1.0, 1.0, target_loss=2.0)
    assert summary["mean_eval_loss"] == 1.5 and summary["bytes_to_target"] == 20
    assert not set(outcomes.MOMENTUM.values()) & set(summary)
    measured = [{**row, "update_alignment": 0.5 if row["round"] > 1 else None} for row in plain]
    summary = report.summarize(measured, RunConfig(), 1.0, 1.0)
    assert summary["mean_update_alignment"] == 0.5 and summary["final_path_efficiency"] is None


def test_a_round_line_shows_the_alignment_when_there_is_one():
    record = {"round": 2, "train_loss": 1.0, "round_seconds": 1.0, "update_alignment": 0.25}
    assert "alignment +0.250" in report.round_line(record)
    assert "alignment" not in report.round_line({**record, "update_alignment": None})
