"""Oracle throughput: texts/s of each NonToxic backend, and steer's batched + length-sorted detoxify
inference against ``Detoxify.predict`` on the whole list (same texts, same random-weight model).

    .venv/bin/python -m benchmarks.oracles          # CPU: profanity, tiny + mini detoxify, ~2 min
    .venv/bin/python -m benchmarks.oracles --base   # + a bert-base-sized detoxify on 96 texts (slow on CPU)
    .venv/bin/python -m benchmarks.oracles --gpu    # more texts, all sizes, on CUDA

Texts are RealToxicityPrompts prompts and continuations (interleaved) from the local mirror, or
synthetic sentences without it. The detoxify models are random-weight BERTs in detoxify's
checkpoint format (``write_random_detoxify_checkpoint``): ``tiny`` (2 x 32), ``mini`` (4 x 256) and
``base`` (bert-base-uncased's 12 x 768 shape), with a WordPiece vocabulary holding the texts' 8k
most frequent words, so that sequence lengths and timings are realistic (the scores are meaningless).
"""

from __future__ import annotations

import random
import re
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import base_parser, interleaved, median_ratio, print_table, summarize, write_result
from steer.constraints import NonToxic, write_random_detoxify_checkpoint


def benchmark_texts(n: int, seed: int = 0) -> tuple[list[str], str]:
    """``n`` texts: RTP prompts/continuations when the local mirror exists, else synthetic sentences."""
    try:
        from steer.data import data_dir, load_rtp

        root = data_dir()
        if root is not None and list((root / "rtp").glob("*.jsonl")):
            data = load_rtp()
            texts = [t for p, c in zip(data["prompt"], data["continuation"]) for t in (p["text"], c["text"])]
            return [texts[i % len(texts)] for i in range(n)], "rtp"
    except Exception:  # pragma: no cover - no data / no network: fall back to synthetic text
        pass
    rng = random.Random(seed)
    words = "the a people world day night good bad nice hate love you they we work think say know".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 60))) for _ in range(n)], "synthetic"


def time_profanity(texts: list[str], repeats: int) -> dict:
    oracle = NonToxic("profanity")
    timings = interleaved({"profanity": lambda: oracle.toxicity(texts)}, repeats=repeats)
    seconds = summarize(timings)["profanity"]
    return {"texts": len(texts), "seconds": seconds, "texts_per_s": len(texts) / seconds}


def time_detoxify(
    size: str, texts: list[str], repeats: int, device: str, batch_size: int, workdir: Path
) -> dict:
    """steer's NonToxic(detoxify) vs Detoxify.predict(whole list) vs Detoxify.predict on unsorted chunks."""
    from detoxify import Detoxify

    config_dir = workdir / f"bert-{size}"
    # model_type = the local dir, so that detoxify's own loader also works offline
    vocab = [w for w, _ in Counter(re.findall(r"[a-z]+", " ".join(texts).lower())).most_common(8000)]
    ckpt = write_random_detoxify_checkpoint(
        workdir / f"{size}.ckpt", config_dir, size=size, model_type=str(config_dir), words=vocab
    )
    ours = NonToxic("detoxify", checkpoint=ckpt, config_dir=config_dir, device=device, batch_size=batch_size)
    naive = Detoxify(checkpoint=str(ckpt), device=device, huggingface_config_path=str(config_dir))

    def naive_chunks():
        return [naive.predict(texts[i : i + batch_size]) for i in range(0, len(texts), batch_size)]

    variants = {
        "steer_sorted": lambda: ours.toxicity(texts),
        "detoxify_whole_list": lambda: naive.predict(texts),
        "detoxify_unsorted_chunks": naive_chunks,
    }
    diff = float(np.abs(ours.toxicity(texts) - np.asarray(naive.predict(texts)["toxicity"])).max())
    timings = interleaved(variants, repeats=repeats)
    medians = summarize(timings)
    lengths = [len(ids) for ids in ours.runner.tokenize(texts)]
    return {
        "size": size,
        "layers": ours.runner.model.config.num_hidden_layers,
        "hidden": ours.runner.model.config.hidden_size,
        "texts": len(texts),
        "batch_size": batch_size,
        "mean_tokens": float(np.mean(lengths)),
        "max_tokens": int(max(lengths)),
        "seconds": medians,
        "texts_per_s": {name: len(texts) / s for name, s in medians.items()},
        "speedup_vs_whole_list": median_ratio(timings["detoxify_whole_list"], timings["steer_sorted"]),
        "speedup_vs_unsorted_chunks": median_ratio(
            timings["detoxify_unsorted_chunks"], timings["steer_sorted"]
        ),
        "max_abs_score_diff": diff,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--base", action="store_true", help="also time the bert-base-sized model on CPU")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (0 = torch's default). 1 by default: on a shared, oversubscribed host the "
        "per-op thread hand-off dominates small kernels and would reward fewer, larger batches",
    )
    args = parser.parse_args(argv)
    device = "cuda" if args.gpu and torch.cuda.is_available() else "cpu"
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or 3
    # size -> (texts, batch size); bert-base on CPU is slow, so it gets fewer texts in smaller batches
    if args.gpu:
        sizes = {
            "tiny": (20_000, args.batch_size),
            "mini": (8_192, args.batch_size),
            "base": (8_192, args.batch_size),
        }
        num_profanity = 100_000
    else:
        sizes = {"tiny": (2_000, args.batch_size), "mini": (512, args.batch_size)}
        if args.base:
            sizes["base"] = (96, 32)
        num_profanity = 20_000
    start = time.perf_counter()
    texts, source = benchmark_texts(max(num_profanity, *(n for n, _ in sizes.values())))
    print(f"profanity on {num_profanity} {source} texts ...", flush=True)
    results = {"profanity": time_profanity(texts[:num_profanity], repeats)}
    rows = [{"oracle": "profanity", "texts": num_profanity, "texts/s": results["profanity"]["texts_per_s"]}]
    with tempfile.TemporaryDirectory() as tmp:
        for size, (count, batch_size) in sizes.items():
            print(f"detoxify-{size} on {count} texts, batch {batch_size} ({device}) ...", flush=True)
            reps = min(repeats, 2) if size == "base" and not args.gpu else repeats
            r = time_detoxify(size, texts[:count], reps, device, batch_size, Path(tmp))
            results[f"detoxify_{size}"] = r
            for name, tps in r["texts_per_s"].items():
                rows.append({"oracle": f"detoxify-{size} {name}", "texts": r["texts"], "texts/s": tps})
            rows.append(
                {"oracle": f"detoxify-{size} speedup vs whole list", "texts/s": r["speedup_vs_whole_list"]}
            )
            rows.append(
                {"oracle": f"detoxify-{size} speedup vs unsorted", "texts/s": r["speedup_vs_unsorted_chunks"]}
            )
    print_table(rows, ["oracle", "texts", "texts/s"])
    payload = {
        "config": {
            "device": device,
            "repeats": repeats,
            "text_source": source,
            "sizes": {
                "profanity": num_profanity,
                **{k: {"texts": n, "batch_size": b} for k, (n, b) in sizes.items()},
            },
            "gpu": args.gpu,
        },
        "results": results,
        "wall_s": time.perf_counter() - start,
    }
    path = write_result("oracles_gpu" if args.gpu else "oracles", payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
