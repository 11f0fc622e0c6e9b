"""Throughput of ``sample_continuations`` versus a plain ``model.generate`` call with the same settings.

Both variants sample the same prompts with the same seed, batch size, left padding and KV cache; the
sampler additionally returns masks, untempered sequence log-probs and decoded texts. Target: sampler
tokens/s >= 0.95x plain generate. Also reported: tokens/s gain from batching, and the cost of NADO-guided
decoding (guidance model with its own KV cache, or recomputing the prefix every step).

    .venv/bin/python -m benchmarks.sampling                        # tiny random model (CPU, ~2 min)
    .venv/bin/python -m benchmarks.sampling --model smollm2-135m   # the embedded SmolLM2-135M
    .venv/bin/python -m benchmarks.sampling --gpu                  # larger batches on CUDA
"""

from __future__ import annotations

import time

import torch

from benchmarks.common import base_parser, median_ratio, print_table, summarize, sync, write_result
from steer.guidance import GuidanceConfig, GuidanceModel, guided_sample, sample_continuations
from steer.guidance.sampling import eos_ids
from steer.models import model_device

TARGET = 0.95
WORDS = "the a cat dog bird tree house road river city day night friend people world music book idea".split()


def _prompts(n: int, seed: int = 0) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.randint(2, 12, (n,), generator=gen).tolist()
    return [
        " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (k,), generator=gen).tolist())
        for k in lengths
    ]


def _plain_generate(model, tokenizer, prompts, *, batch_size, max_new_tokens, seed) -> int:
    """The baseline: tokenize with left padding and call generate, nothing else. Returns sampled tokens."""
    device = model_device(model)
    tokens = 0
    torch.manual_seed(seed)
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size], padding=True, padding_side="left", return_tensors="pt"
            ).to(device)
            out = model.generate(
                **enc,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=eos_ids(model, tokenizer),
                use_cache=True,
            )
            tokens += out.shape[0] * (out.shape[1] - enc["input_ids"].shape[1])
    return tokens


def _sampler(model, tokenizer, prompts, *, batch_size, max_new_tokens, seed) -> int:
    batch = sample_continuations(
        model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed
    )
    return _steps(batch, batch_size)


def _steps(batch, batch_size) -> int:
    """Sampled positions, counted like the baseline (rows x decoding steps of each generate call)."""
    tokens = 0
    cont = batch.continuation_mask[:, batch.prompt_length :]
    for start in range(0, len(batch), batch_size):
        rows = cont[start : start + batch_size]
        steps = int(rows.any(0).nonzero().max()) + 1 if rows.any() else 0
        tokens += rows.shape[0] * steps
    return tokens


def _guided(model, guidance, tokenizer, prompts, *, batch_size, max_new_tokens, seed, use_cache) -> int:
    batch = guided_sample(
        model,
        guidance,
        tokenizer,
        prompts,
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        seed=seed,
        use_cache=use_cache,
    )
    return _steps(batch, batch_size)


def _time(variants: dict, repeats: int) -> tuple[dict, dict, dict]:
    """Token counts (from a warm-up call), wall-clock and process-CPU timings, interleaved A B A B."""
    counts = {name: fn() for name, fn in variants.items()}
    wall: dict[str, list[float]] = {name: [] for name in variants}
    cpu: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            sync()
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync()
            wall[name].append(time.perf_counter() - start_wall)
            cpu[name].append(time.process_time() - start_cpu)
    return counts, wall, cpu


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default="tiny", help="'tiny' (random 2-layer llama) or a model for load_causal_lm"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads on CPU (1: steady timings on shared machines)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads and not args.gpu:
        torch.set_num_threads(args.threads)
    device = "cuda" if args.gpu else "cpu"
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA device")

    if args.model == "tiny":
        from steer.models import tiny_causal_lm

        model, tokenizer = tiny_causal_lm("llama", vocab_size=512, seed=0, hidden_size=128, num_layers=4)
        batch_sizes = [1, 8, 32] if not args.gpu else [1, 16, 64, 256]
        max_new_tokens = args.max_new_tokens or 32
        repeats = args.repeats or 8
    else:
        from steer.models import load_causal_lm

        dtype = torch.bfloat16 if args.gpu else torch.float32
        model, tokenizer = load_causal_lm(args.model, dtype=dtype)
        batch_sizes = [1, 8] if not args.gpu else [1, 16, 64]
        max_new_tokens = args.max_new_tokens or (16 if not args.gpu else 64)
        repeats = args.repeats or (2 if not args.gpu else 3)
    model.to(device).eval()

    rows = []
    for batch_size in batch_sizes:
        prompts = _prompts(max(4, 2 * batch_size) if not args.gpu else 4 * batch_size)
        kw = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": 0}
        variants = {
            "generate": lambda p=prompts, kw=kw: _plain_generate(model, tokenizer, p, **kw),
            "sampler": lambda p=prompts, kw=kw: _sampler(model, tokenizer, p, **kw),
        }
        counts, timings, cpu = _time(variants, repeats)
        med = summarize(timings)
        rows.append(
            {
                "batch_size": batch_size,
                "prompts": len(prompts),
                "tokens": counts["sampler"],
                "generate_tok_s": counts["generate"] / med["generate"],
                "sampler_tok_s": counts["sampler"] / med["sampler"],
                # throughput ratio = (tokens_s / tokens_g) / (time_s / time_g), per interleaved round
                "throughput_ratio": (counts["sampler"] / counts["generate"])
                / median_ratio(timings["sampler"], timings["generate"]),
                # the same from process CPU time: steadier on a shared CPU (meaningless on GPU)
                "cpu_throughput_ratio": (counts["sampler"] / counts["generate"])
                / median_ratio(cpu["sampler"], cpu["generate"]),
            }
        )
        rows[-1]["ok"] = rows[-1]["throughput_ratio"] >= TARGET
        print_table(rows[-1:])
    base = rows[0]["sampler_tok_s"]
    for row in rows:
        row["batch_gain_vs_bs1"] = row["sampler_tok_s"] / base

    # NADO-guided decoding cost at the largest CPU batch size (guidance = LoRA on the same base + head).
    guidance = GuidanceModel(model, GuidanceConfig(lora_r=16))
    with torch.no_grad():
        guidance.head.weight.normal_(0, 0.02)
    batch_size = batch_sizes[-1] if args.model == "tiny" else batch_sizes[1]
    prompts = _prompts(max(8, 2 * batch_size))
    kw = {"batch_size": batch_size, "max_new_tokens": max_new_tokens, "seed": 0}
    variants = {
        "sampler": lambda: _sampler(model, tokenizer, prompts, **kw),
        "guided_cache": lambda: _guided(model, guidance, tokenizer, prompts, use_cache=True, **kw),
        "guided_recompute": lambda: _guided(model, guidance, tokenizer, prompts, use_cache=False, **kw),
    }
    counts, timings, _ = _time(variants, max(1, repeats - 1))
    med = summarize(timings)
    guided_rows = [
        {
            "variant": name,
            "batch_size": batch_size,
            "tok_s": counts[name] / med[name],
            "time_vs_sampler": median_ratio(timings[name], timings["sampler"])
            * counts["sampler"]
            / counts[name],
        }
        for name in variants
    ]
    print()
    print_table(rows)
    print()
    print_table(guided_rows)
    payload = {
        "model": args.model,
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "max_new_tokens": max_new_tokens,
        "target_throughput_ratio": TARGET,
        "rows": rows,
        "guided": guided_rows,
    }
    name = "sampling" if args.model == "tiny" else f"sampling_{args.model}"
    path = write_result(name + ("_gpu" if args.gpu else ""), payload)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    main()
