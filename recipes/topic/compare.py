"""Side-by-side comparison of the topic recipe's runs on the same held-out prompts, with paired intervals.

Reads ``<dir>/<run>.generations.jsonl`` (written by ``steer eval toxicity --run_name <run>``, any judge: the
continuations are scored again here) and, per run:

- **satisfaction**: the share of a prompt's continuations that mention a word of the recipe's topic (the training
  constraint), averaged over prompts;
- **second judge**: the same with a politics lexicon *disjoint* from the constraint's word list (:data:`JUDGE_WORDS`;
  none of them is a training topic word), so a run that only learned to emit the listed words does not pass it;
- **generation perplexity under the base LM**: pooled token perplexity of the continuations given their prompts;
- the run's clean held-out perplexity and distinct-2, as ``steer eval toxicity`` wrote them in ``<run>.json``.

Every interval is a 95% percentile bootstrap over prompts (the independent unit); differences and perplexity
ratios resample the same prompts for both runs (paired).

    python recipes/topic/compare.py outputs/topic_eval base sft sft_filtered guided priors_only constrained \
        --pairs constrained:sft constrained:sft_filtered constrained:priors_only constrained:guided \
        --output recipes/topic/compare.md
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from steer.constraints import topic_constraint
from steer.eval.metrics import grouped_nll, pooled_perplexity, toxicity_scores
from steer.eval.stats import bootstrap_ci, paired_bootstrap_ci, perplexity_ci

TOPIC = "politics"
# Politics words that are not in steer.constraints.TOPICS["politics"] (checked at start-up): the second judge.
JUDGE_WORDS = """
    democracy democratic democracies legislature legislative legislator legislators lawmaker bill bills gop
    electoral impeachment impeach incumbent nominee nomination primaries primary caucus filibuster referendum
    cabinet diplomat diplomats diplomacy embassy regime constituency constituents partisan bipartisan obama trump
    clinton biden whitehouse politically statesman dictator dictatorship capitol polls poll polling lobbyist
    lobbying activists protest protesters rally
""".split()


def read_run(directory: Path, run: str) -> tuple[list[str], list[list[str]]]:
    path = directory / f"{run}.generations.jsonl"
    if not path.is_file():
        raise SystemExit(f"{path}: missing (evaluate run {run!r} with steer eval toxicity first)")
    prompts, rows = [], []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        try:
            record = json.loads(line)
            prompts.append(record["prompt"])
            rows.append(list(record["continuations"]))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise SystemExit(f"{path}: line {number}: not a generations record ({err})") from err
    return prompts, rows


def per_prompt_rate(constraint, rows: list[list[str]]) -> np.ndarray:
    """Per prompt: the share of its continuations that satisfy ``constraint`` (unscored ones left out)."""
    return np.asarray([1.0 - np.nanmean(row) for row in toxicity_scores(rows, constraint)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "directory", type=Path, help="where the runs' <run>.generations.jsonl and <run>.json are"
    )
    parser.add_argument("runs", nargs="+")
    parser.add_argument(
        "--pairs", nargs="*", default=[], help="run:against pairs to compare (paired intervals)"
    )
    parser.add_argument("--reference", default="smollm2-135m", help="the base LM scoring fluency")
    parser.add_argument("--output", type=Path, help="also write the tables (markdown) here")
    args = parser.parse_args(argv)

    from steer.constraints.topics import TOPICS
    from steer.eval.generation import load_eval_model

    overlap = set(JUDGE_WORDS) & set(TOPICS[TOPIC])
    if overlap:
        raise SystemExit(f"JUDGE_WORDS share {sorted(overlap)} with the constraint's word list")
    constraint = topic_constraint(TOPIC)
    judge = topic_constraint(words=JUDGE_WORDS, name="politics_disjoint")
    model, tokenizer, _ = load_eval_model(args.reference, dtype="float32")

    data, prompts0 = {}, None
    for run in args.runs:
        prompts, rows = read_run(args.directory, run)
        if prompts0 is None:
            prompts0 = prompts
        elif prompts != prompts0:
            raise SystemExit(f"{run}: evaluated on other prompts than {args.runs[0]}")
        saved = args.directory / f"{run}.json"
        result = json.loads(saved.read_text()) if saved.is_file() else {}
        data[run] = {
            "sat": per_prompt_rate(constraint, rows),
            "judge": per_prompt_rate(judge, rows),
            "nll": grouped_nll(model, tokenizer, prompts, rows),
            "heldout_perplexity": result.get("metrics", {}).get("heldout_perplexity", float("nan")),
            "distinct_2": result.get("metrics", {}).get("distinct_2", float("nan")),
            "n": sum(len(r) for r in rows),
        }

    lines = [
        f"Prompts: {len(prompts0)} held-out RTP prompts; continuations per run in column n.",
        "",
        "| run | n | topic satisfaction [95% CI] | disjoint-lexicon judge [95% CI] | generation PPL under base [95% CI] "
        "| clean held-out PPL | distinct-2 |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, d in data.items():
        s_lo, s_hi = bootstrap_ci(d["sat"])
        j_lo, j_hi = bootstrap_ci(d["judge"])
        p_lo, p_hi = perplexity_ci(*d["nll"])
        lines.append(
            f"| {run} | {d['n']} | {d['sat'].mean():.3f} [{s_lo:.3f}, {s_hi:.3f}] | {d['judge'].mean():.3f} "
            f"[{j_lo:.3f}, {j_hi:.3f}] | {pooled_perplexity(*d['nll']):.1f} [{p_lo:.1f}, {p_hi:.1f}] | "
            f"{d['heldout_perplexity']:.1f} | {d['distinct_2']:.3f} |"
        )
    out = {}
    if args.pairs:
        lines += [
            "",
            "| pair | satisfaction difference [95% CI] | disjoint-judge difference [95% CI] | satisfaction ratio "
            "| generation PPL ratio [95% CI] | clean PPL ratio |",
            "|---|---|---|---|---|---|",
        ]
    for pair in args.pairs:
        run, _, against = pair.partition(":")
        if run not in data or against not in data:
            raise SystemExit(f"--pairs {pair}: both runs must be among {args.runs}")
        a, b = data[run], data[against]
        sd, s_lo, s_hi = paired_bootstrap_ci(a["sat"], b["sat"])
        jd, j_lo, j_hi = paired_bootstrap_ci(a["judge"], b["judge"])
        r = pooled_perplexity(*a["nll"]) / pooled_perplexity(*b["nll"])
        r_lo, r_hi = perplexity_ci(*a["nll"], against=b["nll"])
        ratio = a["sat"].mean() / b["sat"].mean() if b["sat"].mean() > 0 else float("inf")
        clean = a["heldout_perplexity"] / b["heldout_perplexity"]
        out[pair] = {
            "satisfaction": (sd, s_lo, s_hi),
            "judge": (jd, j_lo, j_hi),
            "ppl_ratio": (r, r_lo, r_hi),
        }
        lines.append(
            f"| {run} − {against} | {sd:+.3f} [{s_lo:+.3f}, {s_hi:+.3f}] | {jd:+.3f} [{j_lo:+.3f}, {j_hi:+.3f}] | "
            f"{ratio:.2f}× | {r:.2f}× [{r_lo:.2f}, {r_hi:.2f}] | {clean:.2f}× |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text, encoding="utf-8")
    return out


if __name__ == "__main__":
    main()
