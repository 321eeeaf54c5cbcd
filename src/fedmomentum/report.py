"""What a person reads of runs as text: a run's per-round lines, its summary (``summary.json``), and a comparison
table of several runs. Curves are drawn by ``plots``; a study's tables are ``study.tables``."""

from __future__ import annotations

from . import outcomes
from .plots import plot_compare, plot_curves  # noqa: F401  (the driver and the CLI draw through here for now)


def round_line(record: dict) -> str:
    loss = record.get("train_loss")
    parts = [f"round {record['round']:>3}", "no client trained" if loss is None else f"train_loss {loss:.4f}"]
    if record.get("stragglers") is not None:  # a run with stragglers (straggler_rate)
        parts.append(f"updates {record['fresh_updates']} fresh + {record['stale_updates']} late, "
                     f"{record['stragglers']} straggling, {record['busy_clients']} busy")
    if record.get("clients") == 0:
        parts.append("no update arrived: the global adapter stays")
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "accuracy" in record:
        parts.append(f"accuracy {record['accuracy']:.3f}")
    if "personal_eval_loss" in record:
        parts.append(f"personal {record['personal_eval_loss']:.4f}")
    if record.get("noise_norm") is not None:
        parts.append(f"noise {record['noise_norm']:.3g}")
    if record.get("update_alignment") is not None:
        parts.append(f"alignment {record['update_alignment']:+.3f}")
    seconds = f"{record['round_seconds']:.1f}s"  # the whole round: training, aggregation and any evaluation
    if "eval_seconds" in record:
        seconds += f" (eval {record['eval_seconds']:.1f}s)"
    parts += [f"residual_rank {record.get('residual_rank', 0)}", seconds]
    return " | ".join(parts)


def summarize(rows: list[dict], config, seconds: float, peak_rss_mb: float, target_loss: float | None = None) -> dict:
    """Final, best and mean eval loss, accuracy, communication, cost, and (when the rows carry them) the momentum
    measures of a run (``outcomes``)."""
    evaluated = [row for row in rows if "eval_loss" in row]
    scored = [row for row in rows if "accuracy" in row]
    trained = [row for row in rows if row["round"] > 0]
    personal = [row for row in evaluated if "personal_eval_loss" in row]
    summary = {
        "method": config.method,
        "rounds": len(trained),
        "initial_eval_loss": evaluated[0]["eval_loss"] if evaluated and evaluated[0]["round"] == 0 else None,
        "final_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
        "best_eval_loss": min(row["eval_loss"] for row in evaluated) if evaluated else None,
        "mean_eval_loss": outcomes.mean_eval_loss(rows),
        "final_accuracy": scored[-1]["accuracy"] if scored else None,
        "best_accuracy": max(row["accuracy"] for row in scored) if scored else None,
        "rounds_to_target": outcomes.rounds_to_target(rows, target_loss),
        "bytes_to_target": outcomes.bytes_to_target(rows, target_loss),
        "target_loss": target_loss,
        "uplink_bytes": sum(row["uplink_bytes"] * row["clients"] for row in trained),
        "downlink_bytes": sum(row["downlink_bytes"] * row["clients"] for row in trained),
        "aggregation_seconds": sum(row["aggregation_seconds"] for row in trained),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
        **({"final_personal_eval_loss": personal[-1]["personal_eval_loss"]} if personal else {}),
    }
    if outcomes.has_momentum(rows):
        summary.update(outcomes.momentum(rows))
    return summary


def _fmt(value, spec: str = ".4f") -> str:
    return "-" if value is None else format(value, spec)


def compare_table(summaries: list[dict]) -> str:
    """A Markdown table, one row per method."""
    header = ("| method | final eval loss | best eval loss | accuracy | rounds to target | "
              "uplink MB | downlink MB | time s |")
    lines = [header, "|" + "---|" * 8]
    for s in summaries:
        lines.append(
            f"| {s['method']} | {_fmt(s['final_eval_loss'])} | {_fmt(s['best_eval_loss'])} | "
            f"{_fmt(s['final_accuracy'], '.3f')} | {_fmt(s['rounds_to_target'], 'd')} | "
            f"{s['uplink_bytes'] / 1e6:.2f} | {s['downlink_bytes'] / 1e6:.2f} | {s['seconds']:.0f} |")
    return "\n".join(lines)
