"""Plots a person can read: one panel per question, bars for once-measured numbers, a gap view for close curves."""

from __future__ import annotations

import struct

import pytest

from fedmomentum import report


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
    report.plot_compare(runs, tmp_path / "compare.png", baseline="fedit")
    width, height = png_size(tmp_path / "compare.png")
    assert width == int(5.5 * panels * 120) and height == int(4.5 * 120)


def test_single_run_curves(tmp_path):
    report.plot_curves(rows([3.0, 2.0], accuracy_at=(1,)), tmp_path / "one.png", title="fedit")
    assert png_size(tmp_path / "one.png") == (720, 480)  # one panel: accuracy measured once is in the title
    report.plot_curves(rows([3.0, 2.0, 1.0], accuracy_at=(1, 2)), tmp_path / "two.png", title="fedit")
    assert png_size(tmp_path / "two.png") == (1320, 480)


def test_rounds_to_target():
    assert report.rounds_to_target(rows([3.0, 2.0, 1.5, 1.2]), 1.6) == 2
    assert report.rounds_to_target(rows([3.0, 2.0]), 1.0) is None
    assert report.rounds_to_target(rows([3.0]), None) is None
