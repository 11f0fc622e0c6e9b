"""Parallel vs sequential guidance schedule: wall time of N guidance rounds + the policy steps between them.

Both variants train the same policy for ``rounds x interval`` optimizer steps with a guidance round
every ``interval`` steps. ``sequential`` runs each round before the steps that use it; ``parallel`` runs
rounds k >= 1 in a background worker (own model copy) while the policy trains, the CPU cores split
between the two threads. Target: parallel <= 0.7x sequential on 2 cores. The best possible ratio is
``max(policy, rounds) / (policy + rounds)`` (plus the synchronous warm-up round); it is printed too.

    python -m benchmarks.schedule            # a 4-layer random llama on CPU (a few minutes)
    python -m benchmarks.schedule --gpu      # smollm2-135m on CUDA (worker and trainer share the GPU)
"""

from __future__ import annotations

import statistics
import tempfile
import time

import torch
from datasets import Dataset

from .common import (
    base_parser,
    interleaved,
    median_ratio,
    print_table,
    random_text_corpus,
    summarize,
    write_result,
)

PROMPTS = ["The cat", "A dog is", "It was", "The bird", "Good and", "The warm", "A calm", "The cold"]


def _build(args, schedule: str):
    from peft import LoraConfig

    from steer.constraints import KeywordConstraint
    from steer.models import load_causal_lm, tiny_causal_lm
    from steer.trainers.constrained import ConstrainedConfig, ConstrainedTrainer

    device = "cuda" if args.gpu else "cpu"
    if args.gpu:
        model, tokenizer = load_causal_lm("smollm2-135m", dtype=torch.bfloat16, device=device)
    else:
        model, tokenizer = tiny_causal_lm("llama", seed=0, hidden_size=256, num_layers=4, num_heads=4)
    config = ConstrainedConfig(
        output_dir=tempfile.mkdtemp(),
        max_steps=args.rounds * args.interval,
        per_device_train_batch_size=args.batch,
        max_length=args.length,
        learning_rate=1e-4,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        logging_steps=args.interval,
        disable_tqdm=True,
        seed=0,
        kl_coef=1.0,
        guidance_interval=args.interval,
        samples_per_round=args.samples,
        sample_batch_size=args.samples,
        sample_max_new_tokens=args.new_tokens,
        guidance_steps_per_round=args.guidance_steps,
        guidance_batch_size=16,
        schedule=schedule,
    )
    return ConstrainedTrainer(
        model,
        config,
        train_dataset=random_text_corpus(args.rounds * args.interval * args.batch, args.length),
        processing_class=tokenizer,
        peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
        constraint=KeywordConstraint(banned=["bad", "rude"]),
        prompt_dataset=Dataset.from_dict({"prompt": PROMPTS * 8}),
    )


def _component_times(args) -> dict[str, float]:
    """Policy step and round times measured on their own (sequential schedule, all threads)."""
    trainer = _build(args, "sequential")
    start = time.perf_counter()
    trainer._maybe_run_round()
    round_time = time.perf_counter() - start
    trainer.rounds_started = 10**9  # no more rounds: time the policy steps alone
    start = time.perf_counter()
    trainer.train()
    steps_time = time.perf_counter() - start
    return {"round": round_time, "policy_steps": steps_time}


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--threads", type=int, default=None, help="CPU intra-op threads in total (default: torch's)"
    )
    parser.add_argument("--rounds", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.gpu:
        args.batch, args.length, args.samples, args.new_tokens, args.guidance_steps, args.interval = (
            8,
            128,
            64,
            20,
            8,
            10,
        )
    else:
        args.batch, args.length, args.samples, args.new_tokens, args.guidance_steps, args.interval = (
            8,
            64,
            32,
            16,
            6,
            6,
        )
    args.rounds = args.rounds or 4
    repeats = args.repeats or 2
    threads = torch.get_num_threads()
    print(
        f"rounds={args.rounds} interval={args.interval} threads={threads} device={'cuda' if args.gpu else 'cpu'}"
    )

    components = _component_times(args)
    torch.set_num_threads(threads)
    ideal = None
    if components["policy_steps"] > 0:
        policy, rounds = components["policy_steps"], components["round"] * args.rounds
        # round 0 is always synchronous; rounds 1..N-1 can hide behind the policy steps
        ideal = (components["round"] + max(policy, rounds - components["round"])) / (policy + rounds)

    def run(schedule):
        def fn():
            trainer = _build(args, schedule)
            start = time.perf_counter()
            trainer.train()
            fn.seconds.append(time.perf_counter() - start)
            torch.set_num_threads(threads)

        fn.seconds = []
        return fn

    variants = {"sequential": run("sequential"), "parallel": run("parallel")}
    interleaved(variants, repeats=repeats, warmup=0)  # builds are excluded: each fn records train() only
    timings = {name: fn.seconds for name, fn in variants.items()}
    medians = summarize(timings)
    ratio = median_ratio(timings["parallel"], timings["sequential"])
    rows = [
        {"what": "policy steps alone (s)", "value": components["policy_steps"]},
        {"what": "one guidance round alone (s)", "value": components["round"]},
        {"what": "sequential train() (s)", "value": medians["sequential"]},
        {"what": "parallel train() (s)", "value": medians["parallel"]},
        {"what": "parallel / sequential (median of ratios)", "value": ratio},
        {
            "what": "best possible ratio (perfect overlap)",
            "value": ideal if ideal is not None else float("nan"),
        },
    ]
    print_table(rows)
    result = {
        "config": {
            k: getattr(args, k)
            for k in ("rounds", "interval", "batch", "length", "samples", "guidance_steps")
        },
        "threads": threads,
        "repeats": repeats,
        "components_seconds": components,
        "timings": timings,
        "median_seconds": medians,
        "parallel_over_sequential": ratio,
        "ideal_ratio": ideal,
        "target": 0.7,
        "meets_target": ratio <= 0.7,
        "worker_memory_note": "parallel keeps a second copy of the base weights for the worker",
        "round_seconds_stdev": statistics.pstdev(timings["parallel"])
        if len(timings["parallel"]) > 1
        else 0.0,
    }
    name = "schedule" + ("_gpu" if args.gpu else "") + (f"_threads{args.threads}" if args.threads else "")
    print(f"wrote {write_result(name, result)}")
    return result


if __name__ == "__main__":
    main()
