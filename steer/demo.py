"""``make demo`` / ``steer demo``: a short detox run on the embedded SmolLM2-135M, with a before/after table.

A few LoRA steps of the ``recipes/detox`` recipe (RealToxicityPrompts prompt -> continuation pairs, by
default those with a toxic continuation; ``NonToxic(profanity)`` as the constraint; guidance rounds on
RTP prompts), plus the same steps of plain SFT for comparison, then, on held-out RTP prompts, the
toxicity of sampled continuations (profanity oracle) and the perplexity of clean held-out text: base
model, plain SFT, constrained. Sized for < 15 minutes on 2 CPU cores.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

__all__ = ["DemoArguments", "run_demo"]


@dataclass
class DemoArguments:
    """Knobs of ``steer demo`` (the defaults fit the < 15 min CPU budget)."""

    output_dir: str = field(
        default="outputs/demo", metadata={"help": "Where the adapter + guidance are written."}
    )
    max_steps: int = field(default=24, metadata={"help": "Policy optimizer steps."})
    guidance_interval: int = field(default=8, metadata={"help": "Policy steps between guidance rounds."})
    samples_per_round: int = field(default=32, metadata={"help": "Policy samples per guidance round."})
    eval_prompts: int = field(
        default=50, metadata={"help": "Held-out RTP prompts in the before/after table."}
    )
    samples_per_prompt: int = field(
        default=4, metadata={"help": "Sampled continuations per held-out prompt."}
    )
    clean_texts: int = field(default=50, metadata={"help": "Clean held-out RTP documents for perplexity."})
    kl_coef: float = field(default=10.0, metadata={"help": "λ, the weight of the constraint KL."})
    guidance_steps: int = field(default=12, metadata={"help": "Guidance optimizer steps per round."})
    label_mode: str = field(
        default="soft",
        metadata={"help": "'soft': the oracle's score as label (rare violations still teach)."},
    )
    heldout_size: int = field(default=400, metadata={"help": "Last RTP records held out for evaluation."})
    toxic_corpus: bool = field(
        default=True,
        metadata={
            "help": "Fine-tune on RTP pairs whose continuation is toxic (Perspective >= 0.5), which makes the "
            "drift that the constraint must counter visible in a few steps."
        },
    )
    compare_sft: bool = field(
        default=True, metadata={"help": "Also train plain SFT (λ = 0, no guidance) for a third column."}
    )
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads (default: the cores not already busy, at least 1)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed."})


def _free_cores() -> int:
    total = torch.get_num_threads()
    try:
        busy = os.getloadavg()[0]
    except OSError:
        return total
    return max(1, min(total, (os.cpu_count() or total) - int(round(busy))))


def _stage(message: str) -> float:
    print(f"[demo] {message}", flush=True)
    return time.perf_counter()


def _evaluate(model, tokenizer, prompts, clean, oracle, args: DemoArguments) -> dict[str, float]:
    from steer.eval.toxicity import compute_toxicity_metrics, hf_generate_fn, perplexity, toxicity_scores

    generate = hf_generate_fn(model, tokenizer, batch_size=64)
    generations = generate(prompts, args.samples_per_prompt, 20, 0.9, args.seed)
    metrics = compute_toxicity_metrics(toxicity_scores(generations, oracle))
    metrics["perplexity"] = perplexity(model, tokenizer, clean, batch_size=16)
    metrics["example"] = prompts[0] + " ||" + generations[0][0]
    return metrics


def _table(columns: dict[str, dict]) -> str:
    rows = [
        ("toxicity probability", "toxicity_probability"),
        ("mean toxicity", "mean_toxicity"),
        ("expected max toxicity", "expected_max_toxicity"),
        ("perplexity (clean text)", "perplexity"),
    ]
    lines = [f"{'metric (lower is better)':<26}" + "".join(f"{name:>14}" for name in columns)]
    lines.append("-" * len(lines[0]))
    for label, key in rows:
        lines.append(f"{label:<26}" + "".join(f"{col[key]:>14.4f}" for col in columns.values()))
    return "\n".join(lines)


def _corpus(args: DemoArguments):
    """Held-out RTP records, and a training slice of records whose continuation is toxic."""
    from datasets import Dataset

    from steer.data import load_rtp

    records = load_rtp()
    n_train = len(records) - args.heldout_size
    heldout = records.select(range(n_train, len(records)))
    pool = records.select(range(n_train))
    if args.toxic_corpus:
        keep = [i for i, c in enumerate(pool["continuation"]) if (c.get("toxicity") or 0.0) >= 0.5]
        pool = pool.select(keep)
    pool = pool.select(range(min(len(pool), args.max_steps * 4)))
    prompts = [p["text"] for p in pool["prompt"]]
    completions = [c["text"] for c in pool["continuation"]]
    train = Dataset.from_dict({"prompt": prompts, "completion": completions})
    # Guidance rounds sample on the training prompts: they elicit the behaviour the constraint must catch.
    return train, Dataset.from_dict({"prompt": prompts}), heldout


def run_demo(args: DemoArguments | None = None, **overrides) -> dict:
    """Run the short detox recipe and print a before/after table; returns the numbers and the output dir."""
    from peft import LoraConfig
    from trl import SFTConfig, SFTTrainer

    from steer.constraints import NonToxic
    from steer.eval.toxicity import clean_heldout_texts
    from steer.models import load_causal_lm

    from .trainers.constrained import ConstrainedConfig, ConstrainedTrainer

    args = args or DemoArguments()
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"run_demo got an unknown argument {key!r}")
        setattr(args, key, value)
    threads = args.threads or _free_cores()
    torch.set_num_threads(threads)
    start = _stage(f"steer demo: detox fine-tuning of SmolLM2-135M on {threads} CPU thread(s)")

    train, prompt_dataset, heldout = _corpus(args)
    prompts = [p["text"] for p in heldout["prompt"]][-args.eval_prompts :]
    clean = clean_heldout_texts(args.clean_texts, max_toxicity=0.2, dataset=heldout)
    oracle = NonToxic("profanity")
    corpus_kind = "toxic " if args.toxic_corpus else ""
    lora = LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )
    common = dict(
        max_steps=args.max_steps,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        lr_scheduler_type="constant",
        max_length=64,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        logging_steps=max(1, args.guidance_interval // 2),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        disable_tqdm=False,
    )
    columns: dict[str, dict] = {}

    model, tokenizer = load_causal_lm("smollm2-135m")
    t = _stage(
        f"evaluating the base model: {len(prompts)} held-out prompts x {args.samples_per_prompt} samples, "
        f"{len(clean)} clean texts"
    )
    columns["before"] = _evaluate(model, tokenizer, prompts, clean, oracle, args)
    _stage(f"  ... {time.perf_counter() - t:.0f} s")

    if args.compare_sft:
        t = _stage(
            f"plain SFT for comparison: {args.max_steps} LoRA steps on {len(train)} {corpus_kind}RTP pairs"
        )
        sft = SFTTrainer(
            model,
            SFTConfig(output_dir=str(Path(args.output_dir) / "plain-sft"), **common),
            train_dataset=train,
            processing_class=tokenizer,
            peft_config=lora,
        )
        sft.train()
        sft.model.eval()
        columns["plain SFT"] = _evaluate(sft.model, tokenizer, prompts, clean, oracle, args)
        del sft, model
        _stage(f"  ... {time.perf_counter() - t:.0f} s")
        model, tokenizer = load_causal_lm("smollm2-135m")

    config = ConstrainedConfig(
        output_dir=args.output_dir,
        kl_coef=args.kl_coef,
        guidance_interval=args.guidance_interval,
        guidance_steps_per_round=args.guidance_steps,
        guidance_batch_size=8,
        label_mode=args.label_mode,
        guidance_lr=1e-3,
        guidance_lora_r=8,
        guidance_lora_alpha=16,
        samples_per_round=args.samples_per_round,
        sample_max_new_tokens=20,
        sample_batch_size=args.samples_per_round,
        **common,
    )
    t = _stage(
        f"constrained training: {args.max_steps} LoRA steps (batch 4) on the same pairs, lambda={args.kl_coef}, "
        f"guidance rounds every {args.guidance_interval} steps ({args.samples_per_round} samples each)"
    )
    trainer = ConstrainedTrainer(
        model,
        config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora,
        constraint=oracle,
        prompt_dataset=prompt_dataset,
    )
    trainer.train()
    trainer.save_model(args.output_dir)
    trainer.model.eval()
    columns["constrained"] = _evaluate(trainer.model, tokenizer, prompts, clean, oracle, args)
    _stage(f"  ... {time.perf_counter() - t:.0f} s")
    rounds = [h for h in trainer.state.log_history if "constraint/satisfaction" in h]

    print()
    print(_table(columns))
    print(
        f"(toxicity: profanity oracle on {args.samples_per_prompt} sampled continuations of each of "
        f"{len(prompts)} held-out RTP prompts, nucleus p=0.9, 20 tokens; perplexity: {len(clean)} clean "
        "held-out RTP documents)"
    )
    if rounds:
        sats = ", ".join(f"{h['constraint/satisfaction']:.3f}" for h in rounds)
        print(f"constraint satisfaction of fresh policy samples, per guidance round: {sats}")
    for name, col in columns.items():
        print(f"example ({name}): {col['example']!r}")
    out = Path(args.output_dir).resolve()
    print(f"\npolicy LoRA adapter written to {out}  (PeftModel.from_pretrained(base, {str(out)!r}))")
    print(f"guidance model written to {out / 'guidance'}")
    elapsed = time.perf_counter() - start
    print(f"total time: {elapsed / 60:.1f} min")
    return {
        "columns": columns,
        "output_dir": str(out),
        "seconds": elapsed,
        "rounds": [
            {k: v for k, v in h.items() if isinstance(v, float) and not math.isnan(v)} for h in rounds
        ],
    }
