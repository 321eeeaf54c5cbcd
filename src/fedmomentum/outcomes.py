"""Numbers read off a run's per-round records (its ``metrics.jsonl`` rows): when it reached a target loss and what
that cost on the wire, its loss over the whole run, and its momentum measures summed up over rounds. Pure: what a
run's summary and a study's tables both use."""

from __future__ import annotations

# per-round measure → the run's number: the mean over the rounds that have it, except path efficiency, a ratio of
# the whole path already, taken at the last round that has it (its first round is 1 by definition)
MOMENTUM = {"update_alignment": "mean_update_alignment", "subspace_overlap": "mean_subspace_overlap",
            "path_efficiency": "final_path_efficiency", "noise_share": "mean_noise_share"}


def rounds_to_target(rows: list[dict], target: float | None) -> int | None:
    """The first round whose eval loss is at or below ``target`` (None: never, or no target)."""
    if target is None:
        return None
    return next((row["round"] for row in rows if row.get("eval_loss", float("inf")) <= target), None)


def bytes_to_target(rows: list[dict], target: float | None) -> float | None:
    """What a client sends and receives (uplink + downlink bytes per client, summed over rounds) up to and including
    the round that reached ``target`` (None: never, or no target)."""
    reached = rounds_to_target(rows, target)
    if reached is None:
        return None
    return sum(row["uplink_bytes"] + row["downlink_bytes"] for row in rows if 0 < row["round"] <= reached)


def mean_eval_loss(rows: list[dict]) -> float | None:
    """The mean eval loss over the evaluated rounds after round 0: the whole curve in one number, not only its end."""
    losses = [row["eval_loss"] for row in rows if row["round"] > 0 and row.get("eval_loss") is not None]
    return sum(losses) / len(losses) if losses else None


def has_momentum(rows: list[dict]) -> bool:
    """Whether the rows carry the momentum measures (runs recorded before they were measured do not)."""
    return any(key in row for row in rows for key in MOMENTUM)


def momentum(rows: list[dict]) -> dict[str, float | None]:
    """The run's momentum numbers (``MOMENTUM``'s names; None where no round has the measure)."""
    out = {}
    for key, name in MOMENTUM.items():
        values = [row[key] for row in rows if row["round"] > 0 and row.get(key) is not None]
        if key == "path_efficiency":
            out[name] = values[-1] if values else None
        else:
            out[name] = sum(values) / len(values) if values else None
    return out
