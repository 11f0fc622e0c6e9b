"""Whole constrained runs against their plain-SFT twin: wall time, peak memory and where the time went.

Runs ``steer train constrained`` on a recipe (default the detox recipe, ``recipes/detox/config.yaml``), each run in a
fresh process, one after another:

- ``constrained``: the recipe as shipped but for ``max_steps`` (and a temporary ``output_dir``, ``save_strategy no``,
  ``report_to none``);
- ``sft``: the same with ``--kl_coef 0`` (its plain-SFT twin: no guidance rounds, no KL, no sample rows);
- ``corpus`` (when the recipe appends policy samples and unless ``--no-samples-twin``): the same with
  ``--kl_positions corpus``. The samples term costs nothing to draw (its rows come from the last round); its cost
  is the appended rows' forward and backward inside each step, so it is measured as the steps' time of
  ``constrained`` minus that of this twin (same rounds, same batches, no appended rows).

Per run: the process's wall time, split into start-up (imports), setup (data, model load, the oracle's priors,
the guidance model), ``train()`` and the final save; ``train()`` split into the time in guidance rounds and the
steps without them (``steps_s = train_s - rounds_s``); the rounds' phases (sampling, labelling, guidance steps,
AUC pool), summed and per round; peak RSS (and peak CUDA memory on a GPU); threads; load averages. The numbers
come from the trainer's own timers (``ConstrainedTrainer.timings``, ``round_history``: steer.trainers.timing).

The default shortened run keeps every setting of the recipe but the step count: 30 of the detox recipe's 150
steps still hold its warm-up round (step 0, 384 samples) and one interval round (step 25, 96 samples). The JSON
also carries a projection of the shortened run to the recipe's steps (an estimate, not a measurement).

    python -m benchmarks.whole_run                      # detox, 30 steps (writes whole_run.json)
    python -m benchmarks.whole_run --full               # detox as shipped, 150 steps (whole_run_full.json)
    python -m benchmarks.whole_run --threads 2          # two intra-op threads in each run (default 1)
    python -m benchmarks.whole_run --full --keep-outputs outputs/whole_run   # keep the timed runs' models
    python -m benchmarks.whole_run --config recipes/tiny/constrained.yaml --model DIR --max-steps 4 \\
        --output-dir /tmp/bench -- --dataset_name corpus.jsonl     # arguments after -- go to every run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from .common import print_table, write_result

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "recipes" / "detox" / "config.yaml"
GPU_CONFIG = ROOT / "recipes" / "detox" / "config_full.yaml"
SHORT_STEPS = 30
ROUND_PHASES = ("sampling", "labelling", "guidance_steps", "auc_pool")


# ---------------------------------------------------------------------------------------------- one run
def child(out_path: str, threads: int, steer_args: list[str]) -> None:
    """One run in this (fresh) process; writes what it measured to ``out_path`` as JSON."""
    start = time.perf_counter()
    import torch

    torch.set_num_threads(threads)
    from steer.cli.dispatch import run, setup_logging
    from steer.trainers.constrained import ConstrainedTrainer

    imported = time.perf_counter()
    marks: dict[str, float] = {}
    train = ConstrainedTrainer.train

    def timed_train(self, *args, **kwargs):
        marks["train_start"] = time.perf_counter()
        try:
            return train(self, *args, **kwargs)
        finally:
            marks["train_end"] = time.perf_counter()

    ConstrainedTrainer.train = timed_train
    setup_logging()
    trainer = run(["train", "constrained", *steer_args])
    end = time.perf_counter()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # e.g. a process-schedule worker
    result = {
        "process_s": end - start,
        "import_s": imported - start,
        "setup_s": marks["train_start"] - imported,
        "save_s": end - marks["train_end"],
        "timings": dict(trainer.timings),
        "round_history": [dict(r) for r in trainer.round_history],
        "global_step": int(trainer.state.global_step),
        "threads": torch.get_num_threads(),
        "peak_rss_mb": peak,
        "worker_peak_rss_mb": workers or None,
        "cuda_peak_mb": torch.cuda.max_memory_allocated() / 2**20 if torch.cuda.is_available() else None,
        "device": str(trainer.args.device),
        "kl_positions": trainer.args.kl_positions,
        "kl_coef": trainer.args.kl_coef,
    }
    Path(out_path).write_text(json.dumps(result, indent=2))


def run_variant(name: str, steer_args: list[str], threads: int, workdir: Path) -> dict:
    """One run in a fresh process: its wall time, load averages around it and what it measured."""
    out = workdir / f"{name}.json"
    cmd = [sys.executable, "-m", "benchmarks.whole_run", "--child", str(out), "--threads", str(threads)]
    env = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
    }
    load_before = os.getloadavg()
    print(f"\n--- {name}: steer train constrained {' '.join(steer_args)}", flush=True)
    start = time.perf_counter()
    subprocess.run([*cmd, "--", *steer_args], cwd=ROOT, env=env, check=True)
    wall = time.perf_counter() - start
    measured = json.loads(out.read_text())
    return {"wall_s": wall, "load_before": list(load_before), "load_after": list(os.getloadavg()), **measured}


# ---------------------------------------------------------------------------------------------- the result
def summarize_run(raw: dict) -> dict:
    """A run's numbers: wall time and its split, the rounds' phases, the sample rows, memory, threads."""
    timings, history = raw["timings"], raw["round_history"]
    rounds = {f"{phase}_s": timings.get(f"round_{phase}_s", 0.0) for phase in ROUND_PHASES}
    per_round = [
        {"step": r.get("step"), **{f"{p}_s": r.get(f"time/round_{p}_s") for p in ROUND_PHASES}}
        | {"round_s": r.get("time/round_s")}
        for r in history
    ]
    return {
        "wall_s": raw["wall_s"],
        "import_s": raw["import_s"],
        "setup_s": raw["setup_s"],
        "train_s": timings["train_s"],
        "save_s": raw["save_s"],
        "rounds_s": timings["rounds_s"],
        "steps_s": timings["train_s"] - timings["rounds_s"],
        "rounds": {"count": len(history), "sum_of_rounds_s": timings.get("round_s", 0.0), **rounds},
        "per_round": per_round,
        "sample_rows_draw_s": timings.get("sample_rows_s", 0.0),
        "sample_rows": timings.get("sample_rows", 0.0),
        "sample_row_tokens": timings.get("sample_row_tokens", 0.0),
        "global_step": raw["global_step"],
        "peak_rss_mb": raw["peak_rss_mb"],
        "worker_peak_rss_mb": raw.get("worker_peak_rss_mb"),
        "cuda_peak_mb": raw.get("cuda_peak_mb"),
        "threads": raw["threads"],
        "device": raw.get("device"),
        "kl_coef": raw.get("kl_coef"),
        "kl_positions": raw.get("kl_positions"),
        "load_before": raw["load_before"],
        "load_after": raw["load_after"],
    }


def rounds_in(max_steps: int, interval: int) -> int:
    """Guidance rounds a run of ``max_steps`` steps starts (one before each step ``0, I, 2I, ...``)."""
    return (max_steps - 1) // max(1, interval) + 1 if max_steps > 0 else 0


def project(run: dict, steps: int, target_steps: int, interval: int) -> dict | None:
    """The ``train()`` time of ``target_steps`` estimated from a shorter run: steps scaled per step, the warm-up
    round as measured, each later round as the mean of the measured later rounds (the sequential schedule)."""
    if not steps or target_steps <= steps:
        return None
    rounds = [r["round_s"] for r in run["per_round"] if r.get("round_s") is not None]
    later = statistics.mean(rounds[1:]) if len(rounds) > 1 else None
    steps_s = run["steps_s"] / steps * target_steps
    if not rounds:
        return {"steps": target_steps, "train_s": steps_s, "steps_s": steps_s, "rounds_s": 0.0}
    if later is None:
        return None
    rounds_s = rounds[0] + later * (rounds_in(target_steps, interval) - 1)
    return {"steps": target_steps, "train_s": steps_s + rounds_s, "steps_s": steps_s, "rounds_s": rounds_s}


def assemble(runs: dict[str, dict], meta: dict) -> dict:
    """The JSON result from the summarized runs (``constrained``, ``sft`` and optionally ``corpus``)."""
    c, s, corpus = runs["constrained"], runs["sft"], runs.get("corpus")

    def ratio(a: float, b: float) -> float | None:
        return a / b if b > 0 else None

    result = {
        **meta,
        "runs": runs,
        "constrained_over_sft": {
            "wall": ratio(c["wall_s"], s["wall_s"]),
            "train": ratio(c["train_s"], s["train_s"]),
            "steps_without_rounds": ratio(c["steps_s"], s["steps_s"]),
            "peak_rss": ratio(c["peak_rss_mb"], s["peak_rss_mb"]),
        },
        "samples_term_s": c["steps_s"] - corpus["steps_s"] if corpus else None,
        "samples_term_note": (
            "steps_s of constrained minus steps_s of its kl_positions=corpus twin: the appended policy-sample rows' "
            "forward and backward (drawing them: runs.constrained.sample_rows_draw_s)"
            if corpus
            else "no kl_positions=corpus twin ran (the recipe appends no samples, or --no-samples-twin)"
        ),
    }
    steps, target, interval = meta["max_steps"], meta["recipe_max_steps"], meta["guidance_interval"]
    projected = {name: project(run, steps, target, interval) for name, run in runs.items()}
    if all(projected.values()):
        result["projected_to_recipe_steps"] = {
            **projected,
            "constrained_over_sft_train": ratio(
                projected["constrained"]["train_s"], projected["sft"]["train_s"]
            ),
            "note": f"an estimate from {steps} steps, not a measurement: steps scaled per step, the warm-up round as "
            "measured, later rounds at the measured mean (sequential schedule)",
        }
    return result


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(
            ["git", *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra: list[str] = []
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--gpu", action="store_true", help=f"the GPU recipe ({GPU_CONFIG.relative_to(ROOT)})")
    parser.add_argument("--config", default=None, help=f"recipe (default {DEFAULT_CONFIG.relative_to(ROOT)})")
    parser.add_argument(
        "--model", default=None, help="model_name_or_path for every run (default: the recipe's)"
    )
    parser.add_argument("--full", action="store_true", help="the recipe's own max_steps")
    parser.add_argument(
        "--max-steps", type=int, default=None, help=f"steps of each run (default {SHORT_STEPS})"
    )
    parser.add_argument("--threads", type=int, default=1, help="intra-op CPU threads in each run (default 1)")
    parser.add_argument("--no-samples-twin", action="store_true", help="skip the kl_positions=corpus twin")
    parser.add_argument(
        "--output-dir", default=None, help="where the JSON goes (default: benchmarks/results/)"
    )
    parser.add_argument("--name", default=None, help="result name (default whole_run, or whole_run_full)")
    parser.add_argument(
        "--keep-outputs",
        default=None,
        help="write each run's trained model to DIR/<run> and keep it (e.g. to evaluate the runs that were timed)",
    )
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.full and args.max_steps is not None:
        parser.error("--full runs the recipe's own max_steps; leave out --max-steps")
    return args, extra


def main(argv: list[str] | None = None) -> dict | None:
    args, extra = parse_args(argv)
    if args.child:
        child(args.child, args.threads, extra)
        return None
    config = Path(args.config) if args.config else (GPU_CONFIG if args.gpu else DEFAULT_CONFIG)
    recipe = yaml.safe_load(config.read_text())
    recipe_steps = int(recipe["max_steps"])
    max_steps = recipe_steps if args.full else (args.max_steps or min(SHORT_STEPS, recipe_steps))
    interval = int(recipe.get("guidance_interval", 0) or 0)
    appends_samples = (
        recipe.get("kl_positions", "both") in ("samples", "both") and float(recipe["kl_coef"]) > 0
    )
    name = args.name or ("whole_run_full" if args.full else "whole_run")
    variants = {"constrained": [], "sft": ["--kl_coef", "0"]}
    if appends_samples and not args.no_samples_twin:
        variants["corpus"] = ["--kl_positions", "corpus"]
    meta = {
        "config": str(
            config.resolve().relative_to(ROOT) if config.resolve().is_relative_to(ROOT) else config
        ),
        "recipe_max_steps": recipe_steps,
        "max_steps": max_steps,
        "shortened": max_steps < recipe_steps,
        "settings": f"every setting of the recipe but max_steps ({max_steps} of {recipe_steps}), output_dir ("
        + (f"{args.keep_outputs}/<run>, kept" if args.keep_outputs else "a temporary directory")
        + "), save_strategy no, report_to none"
        + (f"; model {args.model}" if args.model else "")
        + (f"; also {' '.join(extra)}" if extra else ""),
        "guidance_interval": interval,
        "rounds_per_run": rounds_in(max_steps, interval) if interval else None,
        "variants": {k: " ".join(v) or "(as the recipe)" for k, v in variants.items()},
        "threads": args.threads,
        "commit": _git("rev-parse", "--short", "HEAD"),
        "uncommitted_changes": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_before": list(os.getloadavg()),
    }
    runs = {}
    with tempfile.TemporaryDirectory(prefix="steer-whole-run-") as tmp:
        outputs = Path(args.keep_outputs) if args.keep_outputs else Path(tmp)
        for variant, variant_args in variants.items():
            steer_args = ["--config", str(config), "--max_steps", str(max_steps)]
            steer_args += [
                "--output_dir",
                str(outputs / variant),
                "--save_strategy",
                "no",
                "--report_to",
                "none",
            ]
            steer_args += (["--model_name_or_path", args.model] if args.model else []) + extra + variant_args
            runs[variant] = summarize_run(run_variant(variant, steer_args, args.threads, Path(tmp)))
    meta["load_after"] = list(os.getloadavg())
    result = assemble(runs, meta)
    path = write_result(name, result, args.output_dir)
    columns = ["run", "wall_s", "setup_s", "train_s", "rounds_s", "steps_s", "peak_rss_mb"]
    print_table([{"run": k, **{c: v[c] for c in columns[1:]}} for k, v in runs.items()], columns)
    ratios = result["constrained_over_sft"]

    def fmt(value, unit: str) -> str:
        return "n/a" if value is None else f"{value:.2f}{unit}"

    print(
        f"constrained / sft: wall {fmt(ratios['wall'], 'x')}, steps without rounds "
        f"{fmt(ratios['steps_without_rounds'], 'x')}; samples term {fmt(result['samples_term_s'], ' s')}"
    )
    print(f"written to {path}")
    return result


if __name__ == "__main__":
    main()
