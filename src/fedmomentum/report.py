"""What a person reads: per-round lines, run summaries, comparison tables and PNG curves."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def round_line(record: dict) -> str:
    parts = [f"round {record['round']:>3}", f"train_loss {record['train_loss']:.4f}"]
    if "eval_loss" in record:
        parts.append(f"eval_loss {record['eval_loss']:.4f}")
    if "accuracy" in record:
        parts.append(f"accuracy {record['accuracy']:.3f}")
    if record.get("noise_norm") is not None:
        parts.append(f"noise {record['noise_norm']:.3g}")
    seconds = f"{record['round_seconds']:.1f}s"  # the whole round: training, aggregation and any evaluation
    if "eval_seconds" in record:
        seconds += f" (eval {record['eval_seconds']:.1f}s)"
    parts += [f"residual_rank {record.get('residual_rank', 0)}", seconds]
    return " | ".join(parts)


def rounds_to_target(rows: list[dict], target: float | None) -> int | None:
    if target is None:
        return None
    return next((row["round"] for row in rows if row.get("eval_loss", float("inf")) <= target), None)


def summarize(rows: list[dict], config, seconds: float, peak_rss_mb: float, target_loss: float | None = None) -> dict:
    """Final and best eval loss, accuracy, communication and cost of a run."""
    evaluated = [row for row in rows if "eval_loss" in row]
    scored = [row for row in rows if "accuracy" in row]
    trained = [row for row in rows if row["round"] > 0]
    return {
        "method": config.method,
        "rounds": len(trained),
        "initial_eval_loss": evaluated[0]["eval_loss"] if evaluated and evaluated[0]["round"] == 0 else None,
        "final_eval_loss": evaluated[-1]["eval_loss"] if evaluated else None,
        "best_eval_loss": min(row["eval_loss"] for row in evaluated) if evaluated else None,
        "final_accuracy": scored[-1]["accuracy"] if scored else None,
        "best_accuracy": max(row["accuracy"] for row in scored) if scored else None,
        "rounds_to_target": rounds_to_target(rows, target_loss),
        "target_loss": target_loss,
        "uplink_bytes": sum(row["uplink_bytes"] * row["clients"] for row in trained),
        "downlink_bytes": sum(row["downlink_bytes"] * row["clients"] for row in trained),
        "aggregation_seconds": sum(row["aggregation_seconds"] for row in trained),
        "seconds": seconds,
        "peak_rss_mb": peak_rss_mb,
    }


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


def plot_curves(rows: list[dict], path: str | Path, title: str = "") -> None:
    plot_compare({title or "run": rows}, path)


def plot_compare(runs: dict[str, list[dict]], path: str | Path) -> None:
    """Eval loss (and accuracy where measured) against rounds, one line per run."""
    has_accuracy = any("accuracy" in row for rows in runs.values() for row in rows)
    figure, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(11 if has_accuracy else 6, 4), squeeze=False)
    for label, rows in runs.items():
        points = [(row["round"], row["eval_loss"]) for row in rows if "eval_loss" in row]
        if points:
            axes[0][0].plot(*zip(*points, strict=True), marker="o", label=label)
        scored = [(row["round"], row["accuracy"]) for row in rows if "accuracy" in row]
        if has_accuracy and scored:
            axes[0][1].plot(*zip(*scored, strict=True), marker="o", label=label)
    axes[0][0].set(xlabel="round", ylabel="held-out loss", title="eval loss")
    if has_accuracy:
        axes[0][1].set(xlabel="round", ylabel="exact match", title="accuracy")
    for axis in axes[0]:
        axis.grid(alpha=0.3)
        axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
