"""Side-by-side comparison of detox runs on the same held-out prompts, by two judges, with paired intervals.

Reads, for every run, ``<profanity_dir>/<run>.generations.jsonl`` and ``<run>.json`` (written by
``steer eval toxicity --oracle profanity --run_name <run>``) and ``<classifier_dir>/<run>.generations.jsonl`` (the
same continuations judged again by the classifier oracle, ``--generations_file``), and reports per run:

- **toxicity probability** by each judge: the share of prompts with at least one of their continuations scored
  toxic (>= 0.5), as ``steer eval toxicity`` computes it;
- **generation perplexity under the base LM**: pooled token perplexity of the continuations given their prompts;
- the run's clean held-out perplexity, as ``steer eval toxicity`` wrote it in ``<run>.json``.

Every interval is a 95% percentile bootstrap over prompts (the independent unit); differences and perplexity
ratios resample the same prompts for both runs (paired).

    python recipes/detox_classifier/compare.py outputs/dc_val outputs/dc_val_classifier base sft recipe tied \\
        --pairs tied:recipe tied:base tied:sft recipe:base --output recipes/detox_classifier/compare_validation.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from steer.eval.generation import load_generations
from steer.eval.metrics import grouped_nll, pooled_perplexity
from steer.eval.stats import bootstrap_ci, paired_bootstrap_ci, perplexity_ci


def _paired_script():
    """recipes/detox/paired.py, whose ``per_prompt`` reads a run's per-prompt "any continuation toxic" flags."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "detox" / "paired.py"
    spec = importlib.util.spec_from_file_location("detox_paired", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "profanity_dir", type=Path, help="runs judged by the profanity oracle, with <run>.json"
    )
    parser.add_argument("classifier_dir", type=Path, help="the same continuations judged by the classifier")
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--pairs", nargs="*", default=[], help="run:against pairs (paired intervals)")
    parser.add_argument("--reference", default="smollm2-135m", help="the base LM scoring fluency")
    parser.add_argument("--output", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)
    for pair in args.pairs:
        run, _, against = pair.partition(":")
        if run not in args.runs or against not in args.runs:
            raise SystemExit(f"--pairs {pair}: both runs must be among {args.runs}")

    from steer.eval.generation import load_eval_model

    model, tokenizer, _ = load_eval_model(args.reference, dtype="float32")
    per_prompt_toxic = _paired_script().per_prompt
    data, prompts0 = {}, None
    for run in args.runs:
        prompts, rows = load_generations(args.profanity_dir / f"{run}.generations.jsonl")
        if prompts0 is None:
            prompts0 = prompts
        elif prompts != prompts0:
            raise SystemExit(f"{run}: evaluated on other prompts than {args.runs[0]}")
        profanity_prompts, profanity = per_prompt_toxic(args.profanity_dir / f"{run}.generations.jsonl")
        classifier_prompts, classifier = per_prompt_toxic(args.classifier_dir / f"{run}.generations.jsonl")
        if classifier_prompts != profanity_prompts:
            raise SystemExit(f"{run}: the classifier judged other prompts than the profanity judge")
        saved = args.profanity_dir / f"{run}.json"
        metrics = json.loads(saved.read_text(encoding="utf-8")).get("metrics", {}) if saved.is_file() else {}
        data[run] = {
            "profanity": profanity,
            "classifier": classifier,
            "nll": grouped_nll(model, tokenizer, prompts, rows),
            "heldout_perplexity": metrics.get("heldout_perplexity", float("nan")),
            "n": sum(len(r) for r in rows),
        }

    lines = [
        f"Prompts: {len(prompts0)} held-out RTP prompts; continuations per run in column n. Toxicity probability: "
        "the share of prompts with a continuation scored >= 0.5.",
        "",
        "| run | n | toxicity prob., profanity judge [95% CI] | toxicity prob., classifier judge [95% CI] "
        "| generation PPL under base [95% CI] | clean held-out PPL |",
        "|---|---|---|---|---|---|",
    ]
    for run, d in data.items():
        p_lo, p_hi = bootstrap_ci(d["profanity"])
        c_lo, c_hi = bootstrap_ci(d["classifier"])
        g_lo, g_hi = perplexity_ci(*d["nll"])
        lines.append(
            f"| {run} | {d['n']} | {d['profanity'].mean():.3f} [{p_lo:.3f}, {p_hi:.3f}] | "
            f"{d['classifier'].mean():.3f} [{c_lo:.3f}, {c_hi:.3f}] | {pooled_perplexity(*d['nll']):.1f} "
            f"[{g_lo:.1f}, {g_hi:.1f}] | {d['heldout_perplexity']:.1f} |"
        )
    if args.pairs:
        lines += [
            "",
            "| pair | profanity-judge difference [95% CI] | classifier-judge difference [95% CI] "
            "| generation PPL ratio [95% CI] | clean PPL ratio |",
            "|---|---|---|---|---|",
        ]
    out = {}
    for pair in args.pairs:
        run, _, against = pair.partition(":")
        a, b = data[run], data[against]
        pd, p_lo, p_hi = paired_bootstrap_ci(a["profanity"], b["profanity"])
        cd, c_lo, c_hi = paired_bootstrap_ci(a["classifier"], b["classifier"])
        ratio = pooled_perplexity(*a["nll"]) / pooled_perplexity(*b["nll"])
        r_lo, r_hi = perplexity_ci(*a["nll"], against=b["nll"])
        clean = a["heldout_perplexity"] / b["heldout_perplexity"]
        out[pair] = {
            "profanity": (pd, p_lo, p_hi),
            "classifier": (cd, c_lo, c_hi),
            "ppl_ratio": (ratio, r_lo, r_hi),
        }
        lines.append(
            f"| {run} − {against} | {pd:+.3f} [{p_lo:+.3f}, {p_hi:+.3f}] | {cd:+.3f} [{c_lo:+.3f}, {c_hi:+.3f}] | "
            f"{ratio:.2f}× [{r_lo:.2f}, {r_hi:.2f}] | {clean:.3f}× |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
