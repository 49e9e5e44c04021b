"""The comparison's outputs: results table (CSV and Markdown) and plots."""

from __future__ import annotations

import csv
import io
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

from workbench.atomic import atomic_path, write_text

COLUMNS = (
    "strategy", "fraction", "seed", "trainable", "trainable_percent", "backbone_trainable", "total", "peak_memory_mib",
    "step_time_s", "samples_per_s", "best_val", "test", "checkpoint",
)  # fmt: skip


def columns(extra_metrics: list[str]) -> list[str]:
    """Table columns: :data:`COLUMNS` with a ``test <m>`` column per extra metric after ``test``."""
    at = COLUMNS.index("test") + 1
    return [*COLUMNS[:at], *(f"test {m}" for m in extra_metrics), *COLUMNS[at:]]


def table_row(arm: Any, results: dict[str, Any], metric: str, extra_metrics: list[str] = ()) -> dict[str, Any]:
    """One table row from an arm and the ``results.json`` its fit wrote (an arm that trained on
    no data, ``zero_shot``, trained no parameter)."""
    trained = arm.fraction > 0
    return {
        "strategy": arm.strategy,
        "fraction": arm.fraction,
        "seed": arm.seed,
        "trainable": results["trainable"] if trained else 0,
        "trainable_percent": round(100 * results["trainable"] / results["total"], 3) if trained else 0.0,
        "backbone_trainable": results["backbone_trainable"] if trained else 0,
        "total": results["total"],
        "peak_memory_mib": results.get("peak_memory_mib"),
        "step_time_s": results.get("step_time_s") if trained else None,
        "samples_per_s": results.get("samples_per_s") if trained else None,
        "best_val": _round(results["val"].get(f"val/{metric}")),
        "test": _round(results["test"].get(f"test/{metric}")),
        **{f"test {m}": _round(results["test"].get(f"test/{m}")) for m in extra_metrics},
        "checkpoint": results.get("best_checkpoint"),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(rows[0]) if rows else COLUMNS)
    writer.writeheader()
    writer.writerows(rows)
    write_text(path, buffer.getvalue())


def write_markdown(rows: list[dict[str, Any]], path: Path, metric: str, extra_metrics: list[str] = ()) -> None:
    names = columns(list(extra_metrics))
    headers = [c if c not in ("best_val", "test") else f"{c} {metric}" for c in names]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(names)]
    for row in rows:
        cells = [f"{row[c]:,}" if isinstance(row[c], int) and c in ("trainable", "backbone_trainable", "total")
                 else str(row[c]) for c in names]
        lines.append("| " + " | ".join(cells) + " |")
    summaries = [line for m, key in ((metric, "test"), *((m, f"test {m}") for m in extra_metrics))
                 for line in seed_summary(rows, m, key)]
    write_text(path, "\n".join(lines + summaries) + "\n")


def seed_summary(rows: list[dict[str, Any]], metric: str, key: str = "test") -> list[str]:
    """Markdown lines: test ``metric`` (the rows' ``key``) mean ± sample std over seeds per
    strategy and fraction (nothing when every arm ran one seed)."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row[key] is not None:
            groups[(row["strategy"], row["fraction"])].append(row[key])
    if all(len(v) < 2 for v in groups.values()):
        return []
    lines = ["", f"Test {metric} over seeds:", "", "| strategy | fraction | seeds | mean | std |", "|---|---|---|---|---|"]
    for (strategy, fraction), values in groups.items():
        std = f"{statistics.stdev(values):.4f}" if len(values) > 1 else "–"  # one seed (trivial, zero_shot): no spread
        lines.append(f"| {strategy} | {fraction} | {len(values)} | {statistics.mean(values):.4f} | {std} |")
    return lines


def _mean_by(rows: list[dict[str, Any]], keys: tuple[str, ...], value: str) -> dict[tuple, float]:
    groups: dict[tuple, list[float]] = defaultdict(list)
    for row in rows:
        if row[value] is not None:
            groups[tuple(row[k] for k in keys)].append(row[value])
    return {k: sum(v) / len(v) for k, v in groups.items()}


def write_plots(rows: list[dict[str, Any]], out_dir: Path, metric: str) -> list[Path]:
    """``metric_vs_params.png`` (test metric vs trainable parameters, seeds averaged; arms that
    train nothing as dashed lines) and, with several fractions, ``metric_vs_fraction.png`` (one line per strategy)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    written = []
    full_data = max(row["fraction"] for row in rows)
    points = _mean_by([r for r in rows if r["fraction"] == full_data], ("strategy", "trainable"), "test")
    fig, ax = plt.subplots(figsize=(6, 4))
    for (strategy, trainable), value in sorted(points.items(), key=lambda item: item[0][1]):
        if trainable:
            ax.scatter(trainable, value, label=f"{_short(strategy)} ({trainable:,})")
        else:  # nothing trained (the trivial baseline): a reference line across the plot
            ax.axhline(value, color="grey", linestyle="--", label=f"{_short(strategy)} (0 trainable)")
    _legend_outside(ax)
    ax.set(xscale="log", xlabel="trainable parameters", ylabel=f"test {metric}",
           title=f"test {metric} vs trainable parameters (training fraction {full_data:g})")
    ax.grid(alpha=0.3)
    written.append(_save(fig, out_dir / "metric_vs_params.png"))
    fractions = sorted({row["fraction"] for row in rows})
    if len(fractions) > 1:
        curves = _mean_by(rows, ("strategy", "fraction"), "test")
        fig, ax = plt.subplots(figsize=(6, 4))
        for strategy in dict.fromkeys(row["strategy"] for row in rows):
            xs = [f for f in fractions if (strategy, f) in curves]
            ax.plot(xs, [curves[(strategy, f)] for f in xs], marker="o", label=_short(strategy))
        ax.set(xlabel="training fraction", ylabel=f"test {metric}", title=f"test {metric} vs training data")
        ax.grid(alpha=0.3)
        _legend_outside(ax)
        written.append(_save(fig, out_dir / "metric_vs_fraction.png"))
    return written


def _short(label: str, width: int = 28) -> str:
    """A strategy spec short enough for a legend (``lora:rank=8,target_modules=[…]`` → ``lora:rank=8,targ…``)."""
    return label if len(label) <= width else label[: width - 1] + "…"


def _legend_outside(ax: Any) -> None:
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.02, 0.5))


def _save(fig: Any, path: Path) -> Path:
    from matplotlib import pyplot as plt

    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, bbox_inches="tight", format="png")
    plt.close(fig)
    return path
