"""Where the topic runs' generation perplexity comes from: on-topic vs off-topic continuations, and word stuffing.

`steer eval toxicity` reports one pooled perplexity of all continuations under the base LM. For a content
constraint that number mixes two things: a continuation that turns to politics after a prompt about something else
is unlikely under the base LM however well it is written, and a continuation that stuffs topic words ("vote vote
vote") is disfluent. This script splits the pooled perplexity of each run's saved generations by the oracle's
verdict (on topic: `toxicity` < 0.5, the eval's "toxicity" being 1 - satisfaction) and counts the continuations
that repeat one word (3+ letters) at least three times. Intervals: 95% percentile bootstrap over prompts (2,000
resamples), the pooled perplexity recomputed on each resample.

    python recipes/topic/fluency.py outputs/topic_eval base sft sft_filtered priors_only guided_shared shared \
        --output recipes/topic/fluency.md
"""

from __future__ import annotations

import argparse
import json
import math
import re
from collections import Counter
from pathlib import Path

import numpy as np

WORD = re.compile(r"[A-Za-z]{3,}")


def stuffed(text: str, times: int = 3) -> bool:
    """Whether one word of 3+ letters occurs at least ``times`` times (case-insensitive)."""
    counts = Counter(w.lower() for w in WORD.findall(text))
    return bool(counts) and max(counts.values()) >= times


def load_run(directory: Path, run: str) -> list[dict]:
    path = directory / f"{run}.generations.jsonl"
    if not path.is_file():
        raise SystemExit(
            f"{path}: no generations file (run `steer eval toxicity ... --run_name {run}` first)"
        )
    rows = []
    for line_no, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        for field in ("prompt", "continuations", "toxicity"):
            if field not in row:
                raise SystemExit(f"{path}, line {line_no}: no field {field!r}")
        rows.append(row)
    return rows


def pooled_ppl(nll: np.ndarray, tokens: np.ndarray) -> float:
    total = tokens.sum()
    return math.exp(nll.sum() / total) if total else math.nan


def bootstrap(per_prompt: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int) -> list[float]:
    """95% interval of the pooled perplexity, prompts resampled."""
    rng = np.random.default_rng(seed)
    nll = np.array([a.sum() for a, _ in per_prompt])
    tok = np.array([b.sum() for _, b in per_prompt])
    values = []
    for _ in range(n_boot):
        pick = rng.integers(0, len(per_prompt), len(per_prompt))
        if tok[pick].sum():
            values.append(math.exp(nll[pick].sum() / tok[pick].sum()))
    return (
        [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else [math.nan] * 2
    )


def analyse(model, tokenizer, rows: list[dict], n_boot: int, seed: int) -> dict:
    from steer.eval.metrics import text_nll

    prompts = [r["prompt"] for r in rows for _ in r["continuations"]]
    texts = [t for r in rows for t in r["continuations"]]
    on_topic = np.array([float(x) < 0.5 for r in rows for x in r["toxicity"]])
    nll, tokens = text_nll(model, tokenizer, texts, prompts=prompts, batch_size=32)
    prompt_of = np.repeat(np.arange(len(rows)), [len(r["continuations"]) for r in rows])
    result = {"n": len(texts), "on_topic_share": float(on_topic.mean())}
    for name, keep in (("all", np.ones_like(on_topic)), ("on_topic", on_topic), ("off_topic", ~on_topic)):
        per_prompt = [
            (nll[(prompt_of == i) & keep], tokens[(prompt_of == i) & keep]) for i in range(len(rows))
        ]
        result[name] = {
            "ppl": pooled_ppl(nll[keep], tokens[keep]),
            "ci95": bootstrap(per_prompt, n_boot, seed),
            "n": int(keep.sum()),
        }
    stuffing = np.array([stuffed(t) for t in texts])
    result["stuffed"] = float(stuffing.mean())
    result["stuffed_on_topic"] = float(stuffing[on_topic].mean()) if on_topic.any() else math.nan
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("directory", help="the --output_dir of `steer eval toxicity`")
    parser.add_argument("runs", nargs="+", help="run names (<run>.generations.jsonl)")
    parser.add_argument("--model", default="smollm2-135m", help="the reference LM (the base model)")
    parser.add_argument("--n_bootstrap", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="markdown file to write")
    args = parser.parse_args(argv)
    directory = Path(args.directory)
    runs = {run: load_run(directory, run) for run in args.runs}  # every file checked before the model loads

    from steer.models import load_causal_lm

    model, tokenizer = load_causal_lm(args.model)
    results = {
        run: analyse(model, tokenizer, rows, args.n_bootstrap, args.seed) for run, rows in runs.items()
    }

    def cell(entry: dict) -> str:
        low, high = entry["ci95"]
        return f"{entry['ppl']:.1f} [{low:.1f}, {high:.1f}] (n={entry['n']})"

    lines = [
        f"Generation perplexity under `{args.model}` split by the oracle's verdict, from `{directory}` "
        "(`python recipes/topic/fluency.py`); 95% bootstrap intervals over prompts. Stuffed: the share of "
        "continuations that repeat one word of 3+ letters at least three times.",
        "",
        "| run | on topic | PPL, all | PPL, on-topic continuations | PPL, off-topic continuations | stuffed | "
        "stuffed, on topic |",
        "|---|---|---|---|---|---|---|",
    ]
    for run, r in results.items():
        lines.append(
            f"| {run} | {r['on_topic_share']:.3f} | {cell(r['all'])} | {cell(r['on_topic'])} | {cell(r['off_topic'])} | "
            f"{r['stuffed']:.3f} | {r['stuffed_on_topic']:.3f} |"
        )
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        out = Path(args.output)
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text)
        tmp.replace(out)
    return results


if __name__ == "__main__":
    main()
