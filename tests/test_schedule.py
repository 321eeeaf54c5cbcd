"""Who trains when, with which seed and learning rate; and the run summary."""

from __future__ import annotations

import math

import pytest

from fedmomentum.config import RunConfig
from fedmomentum.report import summarize
from fedmomentum.schedule import client_seed, round_lr, sample_clients


def test_round_lr_schedules():
    """Round t is 1-based: round 1 trains at the base lr, the last round at 0.1·lr."""
    assert [round_lr(1.0, "constant", t, 5) for t in range(1, 6)] == [1.0] * 5
    cosine = [round_lr(1.0, "cosine", t, 5) for t in range(1, 6)]
    assert cosine[0] == 1.0 and cosine[-1] == pytest.approx(0.1) and cosine == sorted(cosine, reverse=True)
    assert cosine[2] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)))
    assert [round_lr(2.0, "linear", t, 3) for t in range(1, 4)] == pytest.approx([2.0, 1.1, 0.2])
    assert round_lr(1.0, "cosine", 1, 1) == 1.0  # a single round keeps the base lr
    assert round_lr(1.0, "cosine", 13, 12 + 1) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="unknown lr_schedule 'step'"):
        round_lr(1.0, "step", 1, 3)


def test_sampled_clients_depend_only_on_seed_and_round():
    config = RunConfig(clients=8, clients_per_round=3, seed=5)
    picks = [sample_clients(config, t) for t in range(1, 21)]
    assert all(len(p) == 3 and p == sorted(set(p)) and all(0 <= c < 8 for c in p) for p in picks)
    assert len({tuple(p) for p in picks}) > 5  # rounds differ
    assert picks == [sample_clients(config.replace(method="fedit", lr=0.1), t) for t in range(1, 21)]
    assert picks != [sample_clients(config.replace(seed=6), t) for t in range(1, 21)]
    assert sample_clients(RunConfig(clients=4, clients_per_round=4), 1) == [0, 1, 2, 3]


def test_client_seeds_are_distinct_per_round_and_client():
    config = RunConfig(seed=2)
    seeds = {client_seed(config, t, c) for t in range(1, 51) for c in range(50)}
    assert len(seeds) == 2500


def test_summarize_totals_and_bests():
    rows = [
        {"round": 0, "eval_loss": 3.0},
        {"round": 1, "eval_loss": 2.0, "uplink_bytes": 10, "downlink_bytes": 30, "clients": 2,
         "aggregation_seconds": 0.5},
        {"round": 2, "eval_loss": 2.5, "accuracy": 0.25, "uplink_bytes": 10, "downlink_bytes": 20, "clients": 3,
         "aggregation_seconds": 0.25},
    ]
    summary = summarize(rows, RunConfig(method="flora"), seconds=9.0, peak_rss_mb=100.0, target_loss=2.2)
    assert summary["method"] == "flora" and summary["rounds"] == 2
    assert (summary["initial_eval_loss"], summary["final_eval_loss"], summary["best_eval_loss"]) == (3.0, 2.5, 2.0)
    assert summary["final_accuracy"] == summary["best_accuracy"] == 0.25
    assert summary["rounds_to_target"] == 1
    assert (summary["uplink_bytes"], summary["downlink_bytes"]) == (50, 120)
    assert summary["aggregation_seconds"] == 0.75
    assert summarize(rows, RunConfig(), 1.0, 1.0, target_loss=1.0)["rounds_to_target"] is None
