"""Which ingredients carry the detox effect? The demo's setting, one ingredient changed at a time.

Every variant is the ``steer demo`` constrained run (same corpus, steps, LoRA, learning rate, seed, prompts)
with one ``ConstrainedConfig`` field changed, evaluated on the same held-out RTP prompts with bootstrap 95%
intervals. The demo itself supplies the base, plain-SFT and full-method columns (run it first with the same
``--output_dir``). Results: ``<output_dir>/ablations.json`` and ``ablations.md``.

    python recipes/detox/ablations.py --output_dir outputs/demo [--variants no_prior,with_samples,...]
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import torch

VARIANTS = {
    "full": {},  # the method as shipped (at --kl_coef): the KL on corpus positions
    # the head starts at the warm-up satisfaction rate (no token prior, hence no context prior on top of it)
    "no_prior": {"guidance_prior": "label_mean", "guidance_context_prior": "none"},
    "no_context": {"guidance_context_prior": "none"},  # the token prior alone: split words unseen
    "with_samples": {"kl_positions": "both"},  # the KL also on the policy's own samples
    "samples_only": {"kl_positions": "samples"},  # no KL on the corpus positions
    "no_stop_at_violation": {"kl_corpus_stop_at_violation": False},
    "hard_labels": {"label_mode": "hard"},
    "consistency": {"consistency_coef": 0.5},
    "few_samples": {
        "guidance_warmup_samples": 32,
        "samples_per_round": 16,
    },  # a quarter of the demo's samples
}


def main(argv=None) -> dict:
    from steer.demo import DemoArguments, demo_data, evaluate_run, train_run
    from steer.io import atomic_write_json, atomic_write_text

    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S"
    )
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/demo")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--kl_coef", type=float, default=DemoArguments.kl_coef)
    cli = parser.parse_args(argv)
    unknown = sorted(set(cli.variants.split(",")) - set(VARIANTS))
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {sorted(VARIANTS)}")
    args = DemoArguments(output_dir=cli.output_dir, threads=cli.threads, kl_coef=cli.kl_coef)
    if cli.threads:
        torch.set_num_threads(cli.threads)
    out = Path(cli.output_dir)
    data = demo_data(args)
    path = out / "ablations.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    for name in cli.variants.split(","):
        start = time.perf_counter()
        print(f"[ablation] {name}: {VARIANTS[name]}", flush=True)
        trainer = train_run(args, data, out / "ablations" / name, args.kl_coef, **VARIANTS[name])
        metrics = evaluate_run(name, trainer.model, trainer.processing_class, data, args)
        metrics["rounds"] = list(trainer.round_history)
        metrics["change"] = {**VARIANTS[name], "kl_coef": args.kl_coef}
        metrics["seconds"] = time.perf_counter() - start
        results[name] = metrics
        atomic_write_json(path, results)
        del trainer
    demo = (
        json.loads((out / "demo_report.json").read_text())["columns"]
        if (out / "demo_report.json").is_file()
        else {}
    )
    rows = {**demo, **results}
    lines = [
        "| run | change | toxicity prob. [95% CI] | exp. max tox. [95% CI] | PPL (clean) | last AUC |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in rows.items():
        auc = [r["guidance/auc"] for r in m.get("rounds", []) if "guidance/auc" in r]
        tp, em = m["toxicity_probability_ci95"], m["expected_max_toxicity_ci95"]
        lines.append(
            f"| {name} | {m.get('change', '')} | {m['toxicity_probability']:.3f} [{tp[0]:.3f}, {tp[1]:.3f}] | "
            f"{m['expected_max_toxicity']:.3f} [{em[0]:.3f}, {em[1]:.3f}] | {m['perplexity']:.2f} | "
            f"{auc[-1] if auc else float('nan'):.3f} |"
        )
    atomic_write_text(out / "ablations.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return results


if __name__ == "__main__":
    main()
