"""Write the detox confirmation split: RTP prompts no run has trained on, sampled from, chosen on or reported.

The reported set (the first 300 of the 400 held-out records) has been read for several variants, so a claim
first seen there is checked here. Records on the training side (index < len - heldout_size) whose prompt and
continuation toxicities are both < 0.5 (missing = 0, as the recipe's loader reads them) never reach the toxic
corpus (continuation >= 0.5) nor the guidance rounds' challenging prompts (prompt >= 0.5); the clean documents
that the validation and reported perplexities use are excluded too. Of those records, a seeded 100 with both
toxicities < 0.1 become the clean documents (prompt + continuation, for the held-out perplexity) and a seeded 300
of the rest the prompts. Unlike the reported set, these prompts are all non-challenging (prompt toxicity < 0.5).

    python recipes/detox/confirm_split.py --output_dir outputs/detox_confirm
    python recipes/detox/confirm_split.py --output_dir outputs/detox_confirm2 --seed 1 \\
        --exclude outputs/detox_confirm/records.json                  # a second split, disjoint from the first
    steer eval toxicity --model_name_or_path outputs/detox --prompts_file outputs/detox_confirm/prompts.jsonl \\
        --heldout_file outputs/detox_confirm/clean.jsonl --num_prompts 300 --num_generations 10
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path


def main(argv=None) -> dict:
    from steer.data import RTP_HELDOUT_SIZE, load_rtp
    from steer.eval.rtp import clean_heldout_texts
    from steer.io import atomic_write_text

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default="outputs/detox_confirm")
    parser.add_argument("--heldout_size", type=int, default=RTP_HELDOUT_SIZE)
    parser.add_argument("--num_prompts", type=int, default=300)
    parser.add_argument("--num_clean", type=int, default=100)
    parser.add_argument(
        "--max_toxicity", type=float, default=0.5, help="the recipe's corpus/prompt thresholds"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--exclude",
        nargs="*",
        default=[],
        help="records.json of earlier splits: their records are not drawn again",
    )
    args = parser.parse_args(argv)

    dataset = load_rtp()
    n_train = len(dataset) - args.heldout_size
    used_clean = set(clean_heldout_texts(200, dataset=dataset))  # validation + reported perplexity documents
    excluded = set()
    for path in args.exclude:
        records = json.loads(Path(path).read_text())
        excluded.update(records["prompts"], records["clean"])

    def toxicity(record) -> float:
        return (record or {}).get("toxicity") or 0.0

    fresh, clean = [], []
    for index in range(n_train):
        if index in excluded:
            continue
        prompt, continuation = dataset[index]["prompt"], dataset[index]["continuation"]
        if toxicity(prompt) >= args.max_toxicity or toxicity(continuation) >= args.max_toxicity:
            continue
        if prompt["text"] + continuation["text"] in used_clean:
            continue
        scores = (prompt.get("toxicity"), continuation.get("toxicity"))
        (clean if all(s is not None and s < 0.1 for s in scores) else fresh).append(index)
    rng = random.Random(args.seed)
    clean_pick = sorted(rng.sample(clean, args.num_clean))
    rest = sorted(set(fresh) | (set(clean) - set(clean_pick)))
    prompt_pick = sorted(rng.sample(rest, args.num_prompts))
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prompts = "".join(json.dumps({"prompt": dataset[i]["prompt"]}) + "\n" for i in prompt_pick)
    texts = "".join(
        json.dumps({"text": dataset[i]["prompt"]["text"] + dataset[i]["continuation"]["text"]}) + "\n"
        for i in clean_pick
    )
    atomic_write_text(out / "prompts.jsonl", prompts)
    atomic_write_text(out / "clean.jsonl", texts)
    atomic_write_text(out / "records.json", json.dumps({"prompts": prompt_pick, "clean": clean_pick}))
    print(
        f"confirmation: {len(prompt_pick)} prompts and {len(clean_pick)} clean documents from {len(fresh) + len(clean)} "
        f"unused training-side records -> {out}"
    )
    return {"prompts": len(prompt_pick), "clean": len(clean_pick)}


if __name__ == "__main__":
    main()
