"""Training curves next to the model: ``metrics.jsonl`` (every log line) and ``training_curves.png``.

:class:`CurvesCallback` is added by the constrained trainer. Each logged dict is appended to
``<output_dir>/metrics.jsonl`` as it arrives (so a long run can be watched, and a crashed one keeps its
history); at the end of training the curves that say whether the constraint works are plotted: the LM
loss, the KL terms, satisfaction of fresh policy samples, the guidance AUC on held-back samples, how far R
separates oracle-flagged from unflagged tokens, and the KL gradient's share.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from transformers import TrainerCallback

from steer.io import atomic_write_text

__all__ = ["CURVES", "CurvesCallback", "plot_curves"]

METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"
CURVES = (
    ("lm_loss", "LM loss (corpus NLL/token)"),
    ("kl", "KL(q*||p) per corpus token"),
    ("kl_samples", "KL(q*||p) per sample token"),
    ("constraint/satisfaction", "satisfaction of fresh samples"),
    ("guidance/auc", "guidance AUC (held-back pool)"),
    ("guidance/r_separation", "R(unflagged) - R(flagged)"),
    ("kl_grad_share", "KL share of the logit gradient"),
)


def plot_curves(history: list[dict], path: str | Path, *, title: str = "training curves") -> Path | None:
    """One panel per metric in :data:`CURVES` that ``history`` (Trainer log dicts) holds; None if none."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from steer.io import atomic_write

    panels = []
    for key, label in CURVES:
        points = [
            (h.get("step", i), float(h[key]))
            for i, h in enumerate(history)
            if isinstance(h.get(key), (int, float)) and math.isfinite(float(h[key]))
        ]
        if points:
            panels.append((label, points))
    if not panels:
        return None
    cols = min(3, len(panels))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.0 * rows), squeeze=False)
    for ax, (label, points) in zip(axes.flat, panels):
        xs, ys = zip(*points)
        ax.plot(xs, ys, marker="o", markersize=3)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


class CurvesCallback(TrainerCallback):
    """Appends each log to ``metrics.jsonl`` and draws ``training_curves.png`` at the end (main process)."""

    def on_train_begin(self, args, state, control, **kwargs):
        """A fresh run starts a fresh file; a resumed one keeps the lines up to its checkpoint's step."""
        path = Path(args.output_dir) / METRICS_NAME
        if not state.is_world_process_zero or not path.is_file():
            return
        kept = []
        for line in path.read_text().splitlines():
            try:
                if state.global_step > 0 and json.loads(line).get("step", 0) <= state.global_step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue
        atomic_write_text(path, "".join(f"{line}\n" for line in kept))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        record = {"step": state.global_step}
        for key, value in logs.items():
            if isinstance(value, float) and not math.isfinite(value):
                value = None  # strict JSON: no NaN / Infinity
            if value is None or isinstance(value, (int, float, str)):
                record[key] = value
        with (out / METRICS_NAME).open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_curves(
                state.log_history, Path(args.output_dir) / CURVES_NAME, title=Path(args.output_dir).name
            )
