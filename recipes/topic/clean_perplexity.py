"""Clean-text perplexity of the topic recipe's runs on RTP records no run trained on, with paired intervals.

Up to part 9 of RESULTS.md, ``steer eval toxicity`` scored clean perplexity on the last 100 RTP documents of the
whole file with Perspective toxicity < 0.1. Those span records 3,084-3,999: about half are in the topic recipe's
corpus (records 0-3,599), and the validation choice and the reported set shared them. Since part 10 the eval takes
the clean documents of the evaluated records only; this script scores any record range (by default 3,600-3,799:
held out of training, never used for a choice) for many runs at once, and reports per run:

- pooled token perplexity of the documents (prompt + continuation, BOS-prefixed), with a 95% percentile bootstrap
  interval over documents;
- its ratio to the ``--against`` run, resampling the same documents for both (paired).

    python recipes/topic/clean_perplexity.py sft=outputs/topic_sft recipe=outputs/topic_ref_f1_init \
        --records 3600:3800 --against sft --output recipes/topic/clean_perplexity.md
"""

from __future__ import annotations

import argparse
from pathlib import Path


def documents(first: int, stop: int, max_toxicity: float | None) -> list[str]:
    """The prompt + continuation texts of records ``first`` .. ``stop - 1`` of the RTP file (``STEER_DATA_DIR``):
    the clean ones as ``steer eval toxicity`` takes them (prompt and continuation Perspective toxicities below
    ``max_toxicity``), or every one (None)."""
    from steer.data import load_rtp
    from steer.eval.rtp import clean_heldout_texts

    data = load_rtp()
    if not 0 <= first < stop <= len(data):
        raise SystemExit(f"--records {first}:{stop}: the RTP file has records 0..{len(data) - 1}")
    if max_toxicity is None:
        window = data.select(range(first, stop))
        texts = [p["text"] + c["text"] for p, c in zip(window["prompt"], window["continuation"])]
    else:
        last, limit = len(data) - first, stop - first
        texts = clean_heldout_texts(limit, max_toxicity=max_toxicity, dataset=data, last=last, limit=limit)
    if not texts:
        raise SystemExit(f"--records {first}:{stop}: no document with toxicity < {max_toxicity}")
    return texts


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", help="name=model_dir (an adapter directory or a model name)")
    parser.add_argument("--records", default="3600:3800", help="first:stop record numbers of the RTP file")
    parser.add_argument(
        "--max_toxicity",
        type=float,
        default=0.1,
        help="clean documents only (the eval's default); -1: every one",
    )
    parser.add_argument("--against", help="the run the ratios are to (default: the first)")
    parser.add_argument("--output", type=Path, help="also write the table (markdown) here")
    args = parser.parse_args(argv)

    from steer.eval.generation import load_eval_model
    from steer.eval.metrics import pooled_perplexity, text_nll
    from steer.eval.stats import perplexity_ci

    runs = dict(item.split("=", 1) for item in args.runs)
    against = args.against or next(iter(runs))
    if against not in runs:
        raise SystemExit(f"--against {against}: not one of the runs {sorted(runs)}")
    first, stop = (int(x) for x in args.records.split(":"))
    texts = documents(first, stop, None if args.max_toxicity < 0 else args.max_toxicity)
    scores = {}
    for name, path in runs.items():
        model, tokenizer, _ = load_eval_model(path, dtype="float32")
        scores[name] = text_nll(model, tokenizer, texts)
        del model
    kept = (
        "every document"
        if args.max_toxicity < 0
        else f"prompt and continuation toxicity < {args.max_toxicity}"
    )
    lines = [
        f"{len(texts)} RTP documents of records {first:,}-{stop - 1:,} ({kept}), "
        f"{int(scores[against][1].sum()):,} tokens; 95% percentile bootstrap over documents, ratios paired.",
        "",
        f"| run | perplexity [95% CI] | ratio to {against} [95% CI] |",
        "|---|---|---|",
    ]
    result = {"num_texts": len(texts), "runs": {}}
    for name, (nll, tokens) in scores.items():
        value, (lo, hi) = pooled_perplexity(nll, tokens), perplexity_ci(nll, tokens)
        ratio = value / pooled_perplexity(*scores[against])
        r_lo, r_hi = perplexity_ci(nll, tokens, against=scores[against])
        lines.append(f"| {name} | {value:.1f} [{lo:.1f}, {hi:.1f}] | {ratio:.3f}× [{r_lo:.3f}, {r_hi:.3f}] |")
        result["runs"][name] = {
            "perplexity": value,
            "ci95": [lo, hi],
            "ratio": ratio,
            "ratio_ci95": [r_lo, r_hi],
        }
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        args.output.write_text(table, encoding="utf-8")
    return result


if __name__ == "__main__":
    main()
