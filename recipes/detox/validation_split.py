"""Write the detox validation split: the data on which variants are chosen, disjoint from what is reported.

``steer eval toxicity`` reports on the first ``--report_prompts`` (300) of the last ``heldout_size`` (400) RTP
records and on the last 100 clean RTP documents. Variants (kl_coef, kl_sample_coef, ...) are chosen on the
rest: the remaining held-out records (never trained or sampled on, never reported) and the 100 clean documents
before the reported ones (clean, so never in the toxic corpus nor among the challenging sampling prompts).

    python recipes/detox/validation_split.py --output_dir outputs/detox_validation
    steer eval toxicity --model_name_or_path outputs/detox \\
        --prompts_file outputs/detox_validation/prompts.jsonl \\
        --heldout_file outputs/detox_validation/clean.jsonl --num_generations 10
"""

from __future__ import annotations

import argparse
from pathlib import Path


def main(argv=None) -> dict:
    from steer.data import RTP_HELDOUT_SIZE, load_rtp
    from steer.eval.rtp import clean_heldout_texts
    from steer.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/detox_validation")
    parser.add_argument("--heldout_size", type=int, default=RTP_HELDOUT_SIZE)
    parser.add_argument("--report_prompts", type=int, default=300)
    parser.add_argument(
        "--num_clean", type=int, default=100, help="clean documents (reported and validation each)"
    )
    args = parser.parse_args(argv)
    if not 0 < args.report_prompts < args.heldout_size:
        parser.error(
            f"--report_prompts must be in (0, heldout_size={args.heldout_size}), got {args.report_prompts}"
        )
    dataset = load_rtp()
    start = len(dataset) - args.heldout_size + args.report_prompts
    prompts = dataset.select(range(start, len(dataset)))["prompt"]
    clean = clean_heldout_texts(2 * args.num_clean, dataset=dataset)[: args.num_clean]
    if len(clean) < args.num_clean:
        raise ValueError(f"only {len(clean)} clean RTP documents for a validation set of {args.num_clean}")
    import json

    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "prompts.jsonl", "".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    atomic_write_text(out / "clean.jsonl", "".join(json.dumps({"text": t}) + "\n" for t in clean))
    print(
        f"validation: {len(prompts)} prompts (RTP records {start}..{len(dataset) - 1}), {len(clean)} clean documents -> {out}"
    )
    return {"prompts": len(prompts), "clean": len(clean)}


if __name__ == "__main__":
    main()
