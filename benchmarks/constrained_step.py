"""ConstrainedTrainer (λ > 0) vs plain SFTTrainer: policy step time and peak memory.

One optimizer step on the same batch (LoRA policy): forward, backward, AdamW step. The constrained step
adds a no-grad guidance forward, the policy logits at the supervised positions and the chunked KL.
Guidance rounds are timed separately and reported both excluded and amortised over
``guidance_interval`` steps. Targets: step ratio <= 1.5 (rounds excluded), peak-memory ratio <= 1.2.

    python -m benchmarks.constrained_step                       # tiny random llama (seconds)
    python -m benchmarks.constrained_step --model smollm2-135m  # the embedded model, LoRA (minutes on CPU)
    python -m benchmarks.constrained_step --gpu                 # smollm2-135m, batch 8 x 256, on CUDA
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import statistics
import tempfile
import time

import torch
from datasets import Dataset

from .common import (
    PeakMemory,
    base_parser,
    interleaved,
    median_ratio,
    print_table,
    random_text_corpus,
    summarize,
    write_result,
)


def _load(name: str, device: str):
    from steer.models import load_causal_lm, tiny_causal_lm

    if name == "tiny":
        return tiny_causal_lm("llama", seed=0, hidden_size=128, num_layers=2)
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    return load_causal_lm(name, dtype=dtype, device=device)


def _trainers(args):
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from steer.constraints import KeywordConstraint
    from steer.trainers.constrained import ConstrainedConfig, ConstrainedTrainer

    device = "cuda" if args.gpu else "cpu"
    common = dict(
        per_device_train_batch_size=args.batch,
        max_length=args.length,
        max_steps=10,
        learning_rate=1e-4,
        use_cpu=device == "cpu",
        bf16=device == "cuda",
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(
        r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM"
    )
    corpus = random_text_corpus(64, args.length)
    model, tokenizer = _load(args.model, device)
    sft = SFTTrainer(
        model,
        SFTConfig(output_dir=tempfile.mkdtemp(), **common),
        train_dataset=corpus,
        processing_class=tokenizer,
        peft_config=lora,
    )
    model, tokenizer = _load(args.model, device)
    constrained = ConstrainedTrainer(
        model,
        ConstrainedConfig(
            output_dir=tempfile.mkdtemp(),
            kl_coef=1.0,
            guidance_interval=args.interval,
            samples_per_round=args.samples,
            sample_batch_size=args.samples,
            sample_max_new_tokens=20,
            guidance_steps_per_round=args.guidance_steps,
            guidance_batch_size=min(16, args.samples),
            **common,
        ),
        train_dataset=corpus,
        processing_class=tokenizer,
        peft_config=lora,
        constraint=KeywordConstraint(banned=["bad", "rude"]),
        prompt_dataset=Dataset.from_dict({"prompt": ["The cat", "A dog is", "It was", "The bird"] * 8}),
    )
    return sft, constrained


def _stepper(trainer, *, with_rounds: bool):
    """One optimizer step on a fixed batch, as the Trainer loop does it (rounds only if asked)."""
    from trl import SFTTrainer

    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1
    batch = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    num_items = (batch["labels"][:, 1:] != -100).sum()
    model = trainer.model
    step_fn = (
        trainer.training_step if with_rounds else lambda m, b, n: SFTTrainer.training_step(trainer, m, b, n)
    )

    def step():
        step_fn(model, dict(batch), num_items)
        trainer.optimizer.step()
        trainer.optimizer.zero_grad(set_to_none=True)

    return step


def _release_freed_memory() -> None:
    """Make glibc return freed blocks >= 64 KiB to the OS, so that RSS follows live tensor memory."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD (also switches off its dynamic growth)
        libc.mallopt(-1, 1 << 16)  # M_TRIM_THRESHOLD


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _peak(step, device: str, repeats: int = 3) -> float:
    """Median peak extra memory of a step: CUDA allocator peak, or the kernel's RSS high-water mark on CPU."""
    values = []
    for _ in range(repeats):
        gc.collect()
        if device == "cuda":
            with PeakMemory(device) as mem:
                step()
            values.append(mem.peak_bytes)
            continue
        with open("/proc/self/clear_refs", "w") as handle:  # reset VmHWM to the current RSS
            handle.write("5")
        base = _status_kib("VmRSS")
        step()
        values.append((_status_kib("VmHWM") - base) * 1024)
    return statistics.median(values)


def main(argv=None) -> dict:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument(
        "--model", default=None, help="'tiny' (default on CPU) or a model name, e.g. smollm2-135m"
    )
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.gpu:
        _release_freed_memory()
    if args.gpu:
        args.model = args.model or "smollm2-135m"
        args.batch, args.length, args.samples, args.guidance_steps, args.interval = 8, 256, 64, 16, 20
        repeats = args.repeats or 10
    elif (args.model or "tiny") == "tiny":
        args.model = "tiny"
        args.batch, args.length, args.samples, args.guidance_steps, args.interval = 8, 64, 32, 8, 20
        repeats = args.repeats or 15
    else:
        args.batch, args.length, args.samples, args.guidance_steps, args.interval = 4, 64, 16, 4, 20
        repeats = args.repeats or 4
    device = "cuda" if args.gpu else "cpu"
    print(
        f"model={args.model} batch={args.batch}x{args.length} device={device} threads={torch.get_num_threads()}"
    )

    sft, constrained = _trainers(args)
    start = time.perf_counter()
    constrained._maybe_run_round()  # warm-up round, so the guidance is not all-zero
    warmup_round = time.perf_counter() - start
    variants = {
        "sft": _stepper(sft, with_rounds=False),
        "constrained": _stepper(constrained, with_rounds=False),
    }
    timings = interleaved(variants, repeats=repeats, warmup=1)
    medians = summarize(timings)
    ratio = median_ratio(timings["constrained"], timings["sft"])

    round_times = []
    for _ in range(2):
        start = time.perf_counter()
        constrained.rounds_started += 1
        constrained.schedule.on_round(constrained.rounds_started - 1)
        round_times.append(time.perf_counter() - start)
    round_time = statistics.median(round_times)
    amortised = ratio + round_time / args.interval / medians["sft"]

    peak_sft = _peak(variants["sft"], device)
    peak_constrained = _peak(variants["constrained"], device)
    memory_ratio = peak_constrained / max(peak_sft, 1)

    rows = [
        {"what": "sft step (s)", "value": medians["sft"]},
        {"what": "constrained step (s)", "value": medians["constrained"]},
        {"what": "step ratio, rounds excluded (median of ratios)", "value": ratio},
        {
            "what": f"guidance round (s; {args.samples} samples, {args.guidance_steps} guidance steps)",
            "value": round_time,
        },
        {"what": f"step ratio, rounds amortised over {args.interval} steps", "value": amortised},
        {"what": "peak extra memory sft (MiB)", "value": peak_sft / 2**20},
        {"what": "peak extra memory constrained (MiB)", "value": peak_constrained / 2**20},
        {"what": "peak memory ratio", "value": memory_ratio},
    ]
    print_table(rows)
    targets = {"step_ratio_excluding_rounds": 1.5, "peak_memory_ratio": 1.2}
    result = {
        "config": {
            k: getattr(args, k) for k in ("model", "batch", "length", "samples", "guidance_steps", "interval")
        },
        "device": device,
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "timings": timings,
        "median_step_seconds": medians,
        "step_ratio_excluding_rounds": ratio,
        "round_seconds": round_times,
        "warmup_round_seconds": warmup_round,
        "step_ratio_rounds_amortised": amortised,
        "peak_extra_bytes": {"sft": peak_sft, "constrained": peak_constrained},
        "peak_memory_ratio": memory_ratio,
        "targets": targets,
        "meets_targets": {
            "step_ratio_excluding_rounds": ratio <= targets["step_ratio_excluding_rounds"],
            "peak_memory_ratio": memory_ratio <= targets["peak_memory_ratio"],
        },
    }
    name = "constrained_step" + ("" if args.model == "tiny" else f"_{args.model.replace('/', '_')}")
    print(f"wrote {write_result(name + ('_gpu' if args.gpu else ''), result)}")
    return result


if __name__ == "__main__":
    main()
