"""The toxicity evaluation's comparison report (``toxicity_report.{json,md,png}``, through
:func:`steer.eval.report.write_report`) and its interval chart."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from .report import load_results, write_report

SCHEMA = "steer.eval.toxicity/v1"
REPORT_NAME = "toxicity_report"
REPORT_METRICS = (
    "expected_max_toxicity",
    "toxicity_probability",
    "mean_toxicity",
    "perplexity",
    "heldout_perplexity",
    "distinct_1",
    "distinct_2",
    "distinct_3",
)
METRIC_LABELS = {
    "expected_max_toxicity": "Exp. max toxicity ↓",
    "toxicity_probability": "Toxicity prob. ↓",
    "mean_toxicity": "Mean toxicity ↓",
    "perplexity": "PPL (ref LM) ↓",
    "heldout_perplexity": "Held-out PPL ↓",
    "distinct_1": "Dist-1 ↑",
    "distinct_2": "Dist-2 ↑",
    "distinct_3": "Dist-3 ↑",
}


def plot_intervals(
    runs: dict[str, dict], metrics: Sequence[str], path: str | os.PathLike, *, title: str = ""
) -> Path:
    """Grouped bars of ``metrics`` per run with their ``<metric>_ci95`` intervals as error bars (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_write

    names = list(runs)
    fig, axes = plt.subplots(1, len(metrics), figsize=(3.6 * len(metrics), 3.4), squeeze=False)
    for ax, metric in zip(axes[0], metrics):
        values = [float(runs[n].get(metric, float("nan"))) for n in names]
        lows, highs = [], []
        for name, value in zip(names, values):
            low, high = runs[name].get(f"{metric}_ci95", [float("nan"), float("nan")])
            lows.append(max(0.0, value - low) if math.isfinite(low) else 0.0)
            highs.append(max(0.0, high - value) if math.isfinite(high) else 0.0)
        ax.bar(
            range(len(names)),
            values,
            yerr=[lows, highs],
            capsize=5,
            color=["#999999", "#d62728", "#1f77b4"][: len(names)],
        )
        ax.set_xticks(range(len(names)), names, fontsize=8)
        ax.set_title(METRIC_LABELS.get(metric, metric), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def write_toxicity_report(
    output_dir: str | os.PathLike, compare_with: Sequence[str] = (), baseline: str | None = None
) -> dict[str, Path]:
    """Rebuild ``toxicity_report.{json,md,png}`` from every run result in ``output_dir`` (+ ``compare_with``)."""
    results = load_results([output_dir, *compare_with], schema=SCHEMA)
    notes = (
        "RealToxicityPrompts protocol: K continuations per prompt, nucleus sampling; toxicity from the oracle "
        "named in each run's JSON. PPL (ref LM): continuations given prompts under the reference LM; "
        "held-out PPL: the evaluated model on clean text. Dist-n: distinct n-grams per prompt, averaged. "
        "Toxicity intervals: 95% percentile bootstrap over prompts."
    )
    return write_report(
        results,
        output_dir,
        metrics=list(REPORT_METRICS),
        chart_metrics=["expected_max_toxicity", "toxicity_probability", "perplexity", "distinct_2"],
        name=REPORT_NAME,
        title="RealToxicityPrompts evaluation",
        baseline=baseline,
        labels=METRIC_LABELS,
        notes=notes,
    )
