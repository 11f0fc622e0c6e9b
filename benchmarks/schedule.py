"""Guidance schedules: wall time of N guidance rounds + the policy steps between them.

Every variant trains the same policy for ``rounds x interval`` optimizer steps with a guidance round every
``interval`` steps, at identical settings (rounds, samples, guidance steps, policy steps, seeds):

- ``sequential``: each round runs before the steps that use it, with all ``--threads`` intra-op threads;
- ``parallel``: rounds k >= 1 run in a background *thread* (own model copy) while the policy trains, the
  threads split between the two (``--threads 2``: one each; they share the interpreter lock);
- ``process``: the same versions, rounds in a worker *process* (own interpreter; the frozen base weights
  shared, trainable weights exchanged at each round), the threads split the same way while a round runs
  (``--threads 2``: two processes with one thread each; the policy takes both back when the worker is idle;
  ``--threads 1``: one thread in each process, the sequential variant on one). Its train() time includes
  spawning the worker, which imports while the warm-up round runs in the trainer's process.

Target (issue 15): process <= 0.7x sequential, with two CPU processes of one thread each (``--threads 1``);
``--threads 2`` compares on equal cores (sequential on both threads). The best possible ratio is
``(round + max(policy, rounds - round)) / (policy + rounds)`` (the warm-up round is always waited for); it is
printed too, with the machine's load average before and after (timings on a loaded machine mean little).

    python -m benchmarks.schedule --threads 2             # a 4-layer random llama on CPU (several minutes)
    python -m benchmarks.schedule --smoke --out-dir /tmp  # a tiny run that checks the plumbing (not a result)
    python -m benchmarks.schedule --gpu                   # smollm2-135m on CUDA
"""

from __future__ import annotations

import os
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
    elif args.smoke:
        model, tokenizer = tiny_causal_lm("llama", seed=0)
    else:
        model, tokenizer = tiny_causal_lm("llama", seed=0, hidden_size=256, num_layers=4, num_heads=4)
    split = {}
    if schedule != "sequential" and not args.gpu:
        split["parallel_worker_threads"] = max(1, args.threads_total // 2)
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
        **split,
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
    trainer.run_due_rounds()
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
    parser.add_argument(
        "--samples",
        type=int,
        default=None,
        help="policy samples per round (overrides the preset; heavier rounds)",
    )
    parser.add_argument(
        "--guidance-steps",
        type=int,
        default=None,
        help="guidance optimizer steps per round (overrides the preset)",
    )
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="a tiny model and config: checks the plumbing, timings mean nothing",
    )
    parser.add_argument(
        "--sequential-threads",
        type=int,
        default=None,
        help="intra-op threads of the sequential variant (default: --threads; 1 avoids idle-spinning OpenMP "
        "threads on a busy machine, at the cost of leaving a core unused)",
    )
    parser.add_argument("--out-dir", default=None, help="where the JSON goes (default: benchmarks/results/)")
    parser.add_argument(
        "--variants",
        default="sequential,parallel,process",
        help="comma-separated schedules to time (sequential is always included: the ratios' denominator)",
    )
    args = parser.parse_args(argv)
    args.samples_override, args.guidance_steps_override = args.samples, args.guidance_steps
    args.rounds_override = args.rounds
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads_total = torch.get_num_threads()
    names = ["sequential"] + [v for v in args.variants.split(",") if v and v != "sequential"]
    if args.smoke:
        args.batch, args.length, args.samples, args.new_tokens, args.guidance_steps, args.interval = (
            2,
            16,
            8,
            4,
            2,
            2,
        )
    elif args.gpu:
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
    overrides = {"samples": args.samples_override, "guidance_steps": args.guidance_steps_override}
    for key, value in overrides.items():
        if value is not None:
            setattr(args, key, value)
    args.rounds = args.rounds or (2 if args.smoke else 4)
    repeats = args.repeats or (1 if args.smoke else 2)
    load_start = os.getloadavg()
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
            if schedule == "sequential" and args.sequential_threads:
                torch.set_num_threads(args.sequential_threads)
            start = time.perf_counter()
            trainer.train()
            fn.seconds.append(time.perf_counter() - start)
            torch.set_num_threads(threads)

        fn.seconds = []
        return fn

    variants = {name: run(name) for name in names}
    interleaved(variants, repeats=repeats, warmup=0)  # builds are excluded: each fn records train() only
    timings = {name: fn.seconds for name, fn in variants.items()}
    medians = summarize(timings)
    ratios = {
        f"{name}_over_sequential": median_ratio(timings[name], timings["sequential"])
        for name in names
        if name != "sequential"
    }
    load_end = os.getloadavg()
    rows = [
        {"what": "policy steps alone (s)", "value": components["policy_steps"]},
        {"what": "one guidance round alone (s)", "value": components["round"]},
        *({"what": f"{name} train() (s)", "value": medians[name]} for name in names),
        *(
            {"what": f"{key.replace('_over_', ' / ')} (median of ratios)", "value": v}
            for key, v in ratios.items()
        ),
        {
            "what": "best possible ratio (perfect overlap)",
            "value": ideal if ideal is not None else float("nan"),
        },
        {"what": "load average (1 min) before / after", "value": f"{load_start[0]:.2f} / {load_end[0]:.2f}"},
    ]
    print_table(rows)
    target_ratio = ratios.get("process_over_sequential")
    result = {
        "config": {
            k: getattr(args, k)
            for k in ("rounds", "interval", "batch", "length", "samples", "guidance_steps")
        },
        "smoke": bool(args.smoke),
        "threads": threads,
        "worker_threads": None if args.gpu else max(1, threads // 2),
        "sequential_threads": args.sequential_threads or threads,
        "repeats": repeats,
        "loadavg_start": list(load_start),
        "loadavg_end": list(load_end),
        "components_seconds": components,
        "timings": timings,
        "median_seconds": medians,
        **ratios,
        "ideal_ratio": ideal,
        "target": 0.7,
        "target_variant": "process",
        "meets_target": None if target_ratio is None else target_ratio <= 0.7,
        "worker_memory_note": "parallel keeps a second copy of the base weights for its worker thread; process "
        "shares the frozen base weights with its worker (shared memory / CUDA IPC) and copies only the "
        "trainable ones",
    }
    name = "schedule" + ("_gpu" if args.gpu else "") + (f"_threads{args.threads}" if args.threads else "")
    if args.rounds_override is not None:
        name += f"_r{args.rounds}"
    if args.samples_override is not None or args.guidance_steps_override is not None:
        name += f"_s{args.samples}_g{args.guidance_steps}"
    name += "_smoke" if args.smoke else ""
    print(f"wrote {write_result(name, result, args.out_dir)}")
    return result


if __name__ == "__main__":
    main()
