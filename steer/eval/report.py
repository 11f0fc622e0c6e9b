"""Shared report helpers for evaluations: atomic JSON, run comparison, markdown tables, bar charts.

An evaluation writes one JSON result per run (``{"schema": ..., "run_name": ..., "metrics": {...},
...}``); :func:`write_report` gathers several runs into ``<name>.json`` + ``<name>.md`` +
``<name>.png`` in the output directory.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from steer.io import atomic_write, atomic_write_text

REPORT_SCHEMA = "steer.eval.report/v1"


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _finite(value):
    """NaN/inf become ``null`` so that the JSON stays standard."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def write_json(path: str | os.PathLike, payload: dict) -> Path:
    """Atomic, indented JSON with NaN written as ``null``."""
    payload = json.loads(json.dumps(payload, default=_json_default))
    return atomic_write_text(path, json.dumps(_finite(payload), indent=2) + "\n")


def load_results(sources: Iterable[str | os.PathLike], *, schema: str | None = None) -> list[dict]:
    """Read run results from JSON files and/or directories (every ``*.json`` in them).

    Files whose ``schema`` differs from ``schema`` (when given) are skipped, so a directory may also
    hold reports and other files.
    """
    results = []
    for source in sources:
        path = Path(source)
        files = sorted(path.glob("*.json")) if path.is_dir() else [path]  # *.jsonl is not matched
        for file in files:
            if not file.is_file():
                raise FileNotFoundError(f"result file not found: {file}")
            try:
                data = json.loads(file.read_text())
            except json.JSONDecodeError as err:
                if path.is_dir():
                    continue
                raise ValueError(f"{file}: not valid JSON ({err})") from err
            if not isinstance(data, dict) or "metrics" not in data:
                if path.is_dir():
                    continue
                raise ValueError(f"{file}: not a run result (no 'metrics' key)")
            if schema is not None and data.get("schema") != schema:
                continue
            data.setdefault("run_name", file.stem)
            results.append(data)
    return results


def compare_runs(
    results: Sequence[dict], metrics: Sequence[str], *, baseline: str | None = None
) -> list[dict]:
    """One row per run: ``{"run": name, metric: value, ...}``; later duplicates of a run name win.

    With ``baseline`` (a run name), each row also gets ``"<metric> delta"`` = value - baseline value.
    """
    by_name: dict[str, dict] = {}
    for result in results:
        by_name[str(result.get("run_name"))] = result
    if baseline is not None and baseline not in by_name:
        raise KeyError(f"baseline run {baseline!r} not among the results: {', '.join(by_name)}")
    rows = []
    for name, result in by_name.items():
        row = {"run": name}
        for metric in metrics:
            row[metric] = result.get("metrics", {}).get(metric)
        if baseline is not None:
            base = by_name[baseline].get("metrics", {})
            for metric in metrics:
                value, ref = row[metric], base.get(metric)
                row[f"{metric} delta"] = value - ref if _is_number(value) and _is_number(ref) else None
        rows.append(row)
    return rows


def _with_interval(row: dict, metrics: Sequence[str], results: Sequence[dict], digits: int = 3) -> dict:
    """``row`` with every metric that has a ``<metric>_ci95`` in its run's result shown as ``value [low, high]``."""
    result = next((r for r in reversed(results) if str(r.get("run_name")) == row["run"]), {})
    values = result.get("metrics", {})
    out = dict(row)
    for metric in metrics:
        interval = values.get(f"{metric}_ci95")
        value = row.get(metric)
        if _is_number(value) and isinstance(interval, (list, tuple)) and len(interval) == 2:
            low, high = interval
            if _is_number(low) and _is_number(high):
                out[metric] = f"{_fmt(value, digits)} [{_fmt(low, digits)}, {_fmt(high, digits)}]"
    return out


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _fmt(value, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, int):
        return str(value)
    if not math.isfinite(value):
        return "–"
    return f"{value:.{digits}f}" if abs(value) < 1e4 else f"{value:.4g}"


def markdown_table(rows: Sequence[dict], columns: Sequence[str] | None = None, *, digits: int = 3) -> str:
    """A GitHub-flavoured markdown table (missing values as ``–``)."""
    if not rows:
        return ""
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_fmt(row.get(c), digits) for c in columns) + " |")
    return "\n".join(lines) + "\n"


def bar_chart(
    rows: Sequence[dict],
    metrics: Sequence[str],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    labels: dict[str, str] | None = None,
) -> Path:
    """One bar panel per metric, one bar per run (matplotlib Agg); written atomically as PNG.

    A value may be an interval ``{"mean", "low", "high"}``: its bar then carries an error bar. A run without a
    value for a panel's metric is left out of that panel.
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    labels = labels or {}
    runs = [str(r["run"]) for r in rows]
    columns = min(len(metrics), 5)
    lines = -(-len(metrics) // columns)
    fig, axes = plt.subplots(lines, columns, figsize=(max(3.2 * columns, 4), 3.6 * lines), squeeze=False)
    for ax in axes.ravel()[len(metrics) :]:
        ax.set_visible(False)
    colors = [plt.cm.tab10(i % 10) for i in range(len(runs))]
    for ax, metric in zip(axes.ravel(), metrics):
        shown = [i for i, r in enumerate(rows) if r.get(metric) is not None]
        cells = [rows[i][metric] for i in shown]
        means = [c.get("mean") if isinstance(c, dict) else c for c in cells]
        values = [m if _is_number(m) else 0.0 for m in means]
        errors = None
        if any(isinstance(c, dict) for c in cells):
            errors = [
                [max(v - c["low"], 0.0), max(c["high"] - v, 0.0)]
                if isinstance(c, dict) and _is_number(c.get("low")) and _is_number(c.get("high"))
                else [0.0, 0.0]
                for v, c in zip(values, cells)
            ]
            errors = list(map(list, zip(*errors))) if errors else None
        bars = ax.bar(range(len(shown)), values, color=[colors[i] for i in shown], yerr=errors, capsize=2)
        ax.bar_label(bars, labels=[_fmt(m, 3) for m in means], fontsize=7)
        if min(values, default=0.0) >= 0 and errors is None:
            top = max(values, default=0.0)
            ax.set_ylim(bottom=0, top=top * 1.15 if top > 0 else 1.0)
        ax.set_xticks(range(len(shown)))
        ax.set_xticklabels([runs[i] for i in shown], rotation=35, ha="right", fontsize=8)
        ax.set_title(labels.get(metric, metric), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    finally:
        plt.close(fig)
    return path


def write_report(
    results: Sequence[dict],
    output_dir: str | os.PathLike,
    *,
    metrics: Sequence[str],
    chart_metrics: Sequence[str] | None = None,
    name: str = "report",
    title: str = "Evaluation",
    baseline: str | None = None,
    labels: dict[str, str] | None = None,
    notes: str = "",
) -> dict[str, Path]:
    """Write ``<name>.json`` (rows), ``<name>.md`` (table) and ``<name>.png`` (bars) comparing runs."""
    output_dir = Path(output_dir)
    rows = compare_runs(results, metrics, baseline=baseline)
    columns = ["run", *metrics]
    if baseline is not None:
        columns += [f"{m} delta" for m in metrics]
    header = {m: labels.get(m, m) for m in metrics} if labels else {}
    shown = [_with_interval(row, metrics, results) for row in rows]
    table_rows = [{header.get(k, k): v for k, v in row.items()} for row in shown]
    md = f"# {title}\n\n" + markdown_table(table_rows, [header.get(c, c) for c in columns])
    if any(s != r for s, r in zip(shown, rows)):
        md += "\n[low, high]: the metric's 95% interval (``<metric>_ci95`` in each run's JSON).\n"
    if notes:
        md += "\n" + notes.strip() + "\n"
    paths = {
        "json": write_json(
            output_dir / f"{name}.json",
            {
                "schema": REPORT_SCHEMA,
                "title": title,
                "metric_names": list(metrics),
                "baseline": baseline,
                "runs": rows,
            },
        ),
        "markdown": atomic_write_text(output_dir / f"{name}.md", md),
        "png": bar_chart(
            rows, list(chart_metrics or metrics), output_dir / f"{name}.png", title=title, labels=labels
        ),
    }
    return paths
