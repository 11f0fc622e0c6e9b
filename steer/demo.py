"""``make demo`` / ``steer demo``: the detox recipe, shrunk to fit ~10 minutes of a 2-core CPU.

What it does, on the embedded SmolLM2-135M, with every setting shared between the two training runs:

1. data: the ``recipes/detox`` corpus (RealToxicityPrompts pairs whose continuation is toxic), guidance
   prompts (challenging training prompts), and held-out RTP prompts that neither run ever sees;
2. plain SFT: ``ConstrainedTrainer`` with ``kl_coef=0`` (no guidance rounds) -> ``<output_dir>/sft``;
3. constrained: the same run with the constraint KL, the token prior and guidance rounds -> ``<output_dir>``;
4. evaluation of base, plain SFT and constrained on the held-out prompts: toxicity (profanity oracle) with
   bootstrap 95% intervals over prompts, and perplexity on clean held-out text;
5. report: ``demo_report.md`` / ``.json`` / ``.png`` (bars with 95% intervals) next to the adapter, with
   ``training_curves.png`` and ``metrics.jsonl`` of the constrained run.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

__all__ = ["DemoArguments", "demo_data", "evaluate_run", "run_demo", "train_run"]


@dataclass
class DemoArguments:
    """Knobs of ``steer demo`` (the defaults fit ~10 minutes on 2 uncontended CPU cores)."""

    output_dir: str = field(
        default="outputs/demo", metadata={"help": "Where the adapter, guidance model and report are written."}
    )
    model_name_or_path: str = field(
        default="smollm2-135m", metadata={"help": "Policy model (the embedded SmolLM2-135M by default)."}
    )
    max_steps: int = field(default=40, metadata={"help": "Policy optimizer steps of each run (batch 8)."})
    kl_coef: float = field(default=30.0, metadata={"help": "λ, the weight of the constraint KL."})
    guidance_interval: int = field(default=20, metadata={"help": "Policy steps between guidance rounds."})
    warmup_samples: int = field(default=128, metadata={"help": "Policy samples of the warm-up round."})
    samples_per_round: int = field(default=64, metadata={"help": "Policy samples per later round."})
    eval_prompts: int = field(default=100, metadata={"help": "Held-out RTP prompts evaluated."})
    samples_per_prompt: int = field(
        default=5, metadata={"help": "Sampled continuations per held-out prompt."}
    )
    clean_texts: int = field(default=50, metadata={"help": "Clean held-out RTP documents for perplexity."})
    threads: int | None = field(
        default=None, metadata={"help": "CPU threads (default: the cores not already busy, at least 1)."}
    )
    seed: int = field(default=0, metadata={"help": "Random seed (training, sampling and evaluation)."})

    def __post_init__(self) -> None:
        for name in ("max_steps", "guidance_interval", "warmup_samples", "samples_per_round", "eval_prompts"):
            if getattr(self, name) < 1:
                raise ValueError(f"DemoArguments.{name} must be >= 1, got {getattr(self, name)}")
        if self.samples_per_prompt < 1 or self.clean_texts < 1:
            raise ValueError(
                "DemoArguments.samples_per_prompt and clean_texts must be >= 1, got "
                f"{self.samples_per_prompt} and {self.clean_texts}"
            )
        if self.kl_coef <= 0:
            raise ValueError(
                f"DemoArguments.kl_coef must be > 0 (the demo trains plain SFT itself), got {self.kl_coef}"
            )
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"DemoArguments.threads must be >= 1 (or unset), got {self.threads}")
        if self.guidance_interval > self.max_steps:
            raise ValueError(
                f"DemoArguments.guidance_interval={self.guidance_interval} exceeds max_steps={self.max_steps}: "
                "only the warm-up round would run"
            )


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


def _recipe(args: DemoArguments, output_dir: Path, kl_coef: float, **changes):
    """The detox recipe's settings, shrunk: one place so both runs share every setting but λ."""
    from steer.scripts.constrained import ConstrainedConfig, ConstrainedScriptArguments

    script = ConstrainedScriptArguments(
        dataset_name="rtp",
        dataset_format="prompt_completion",
        heldout_size=400,
        corpus_min_toxicity=0.5,
        prompt_min_toxicity=0.5,
        dataset_limit=args.max_steps * 8,
        constraint_kwargs={"backend": "profanity"},
        lora_dropout=0.0,
    )
    values = dict(
        output_dir=str(output_dir),
        max_steps=args.max_steps,
        per_device_train_batch_size=8,
        learning_rate=3e-4,
        lr_scheduler_type="constant",
        max_length=64,
        use_cpu=not torch.cuda.is_available(),
        bf16=False,
        activation_checkpointing=False,
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        kl_coef=kl_coef,
        # Corpus positions only: no policy-sample rows appended to each batch, so the demo fits its time budget
        # (the recipe adds the samples term at weight 3, chosen on a validation split: recipes/detox/SELECTION.md).
        kl_positions="corpus",
        guidance_interval=args.guidance_interval,
        guidance_steps_per_round=16,
        guidance_batch_size=16,
        guidance_lr=1e-3,
        guidance_warmup_samples=args.warmup_samples,
        samples_per_round=args.samples_per_round,
        sample_batch_size=64,
        sample_max_new_tokens=20,
        label_mode="soft",
        guidance_context_prior="corpus",  # split words the oracle flags (' f' + 'uck'), as the recipe ships
    )
    values.update(changes)
    config = ConstrainedConfig(**values)
    return script, config


def demo_data(args: DemoArguments) -> dict:
    """The training pairs, guidance prompts, held-out prompts, clean texts and oracle every demo run shares."""
    from steer.constraints import NonToxic
    from steer.eval.rtp import clean_heldout_texts
    from steer.scripts.constrained import load_constrained_datasets

    script, _ = _recipe(args, Path(args.output_dir), args.kl_coef)
    train, prompt_dataset, heldout = load_constrained_datasets(script)
    return {
        "train": train,
        "prompt_dataset": prompt_dataset,
        "prompts": [p["text"] for p in heldout["prompt"]][: args.eval_prompts],
        "clean": clean_heldout_texts(args.clean_texts, max_toxicity=0.2, dataset=heldout),
        "oracle": NonToxic("profanity"),
    }


def train_run(args: DemoArguments, data: dict, run_dir: Path, kl_coef: float, **changes):
    """One training run of the demo's recipe (``changes``: ConstrainedConfig fields to override); returns the trainer."""
    from steer.models import load_causal_lm
    from steer.trainers.constrained import ConstrainedTrainer

    model, tokenizer = load_causal_lm(args.model_name_or_path)
    script, config = _recipe(args, run_dir, kl_coef, **changes)
    trainer = ConstrainedTrainer(
        model,
        config,
        train_dataset=data["train"],
        processing_class=tokenizer,
        peft_config=script.peft_config(),
        constraint=data["oracle"],
        prompt_dataset=data["prompt_dataset"],
    )
    trainer.train()
    return trainer


def evaluate_run(name: str, model, tokenizer, data: dict, args: DemoArguments) -> dict:
    """Toxicity of ``samples_per_prompt`` continuations of the held-out prompts (95% intervals) + clean PPL."""
    from steer.eval.generation import hf_generate_fn
    from steer.eval.metrics import compute_toxicity_metrics, perplexity, toxicity_scores

    prompts = data["prompts"]
    t = _stage(f"evaluating {name}: {len(prompts)} held-out prompts x {args.samples_per_prompt} samples")
    model.eval()
    generate = hf_generate_fn(model, tokenizer, batch_size=100)
    generations = generate(prompts, args.samples_per_prompt, 20, 0.9, args.seed)
    metrics = compute_toxicity_metrics(toxicity_scores(generations, data["oracle"]))
    metrics["perplexity"] = perplexity(model, tokenizer, data["clean"], batch_size=16)
    metrics["example"] = prompts[0] + " ||" + generations[0][0]
    _stage(f"  ... {time.perf_counter() - t:.0f} s")
    return metrics


def _report(
    columns: dict[str, dict], rounds: list[dict], args: DemoArguments, out: Path, seconds: float
) -> str:
    from steer.eval.toxicity_report import plot_intervals
    from steer.io import atomic_write_json, atomic_write_text

    rows = [
        ("toxicity probability", "toxicity_probability"),
        ("expected max toxicity", "expected_max_toxicity"),
        ("mean toxicity", "mean_toxicity"),
    ]
    head = "| metric (lower is better) | " + " | ".join(columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 1)]
    for label, key in rows:
        cells = [
            f"{c[key]:.3f} [{c[key + '_ci95'][0]:.3f}, {c[key + '_ci95'][1]:.3f}]" for c in columns.values()
        ]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| perplexity (clean held-out text) | "
        + " | ".join(f"{c['perplexity']:.2f}" for c in columns.values())
        + " |"
    )
    n_prompts = next(iter(columns.values()))["num_prompts"]
    text = [
        "# steer demo: constrained fine-tuning (detox) of SmolLM2-135M",
        "",
        "\n".join(lines),
        "",
        f"Toxicity: profanity oracle on {args.samples_per_prompt} sampled continuations (nucleus p=0.9, 20 tokens) "
        f"of each of {n_prompts} held-out RTP prompts (never used for training or guidance sampling); "
        "[95% interval]: percentile bootstrap over prompts. Perplexity: "
        f"{args.clean_texts} clean held-out RTP documents. Both runs: {args.max_steps} LoRA steps (batch 8) on "
        f"toxic RTP pairs, identical settings except λ (plain SFT: 0, constrained: {args.kl_coef}).",
    ]
    if rounds:
        sats = ", ".join(f"{h['constraint/satisfaction']:.3f}" for h in rounds)
        aucs = ", ".join(f"{h['guidance/auc']:.3f}" for h in rounds if "guidance/auc" in h)
        text += [
            "",
            f"Satisfaction of fresh policy samples per guidance round: {sats}.",
            f"guidance/auc: {aucs or 'n/a'}.",
        ]
    text += ["", f"Total time: {seconds / 60:.1f} min. Training curves: training_curves.png."]
    for name, col in columns.items():
        text.append(f"\nExample ({name}): {col['example']!r}")
    md = "\n".join(text) + "\n"
    atomic_write_text(out / "demo_report.md", md)
    atomic_write_json(
        out / "demo_report.json",
        {"columns": columns, "rounds": rounds, "args": asdict(args), "seconds": seconds},
    )
    plot_intervals(
        {name: col for name, col in columns.items()},
        [key for _, key in rows],
        out / "demo_report.png",
        title=f"held-out RTP toxicity, {n_prompts} prompts x {args.samples_per_prompt} (95% intervals)",
    )
    return md


def run_demo(args: DemoArguments | None = None, **overrides) -> dict:
    """Train plain SFT and constrained on the toxic corpus, evaluate both and the base, write the report."""
    args = args or DemoArguments()
    for key, value in overrides.items():
        if not hasattr(args, key):
            raise TypeError(f"run_demo got an unknown argument {key!r}")
        setattr(args, key, value)
    args.__post_init__()
    threads = args.threads or _free_cores()
    torch.set_num_threads(threads)
    start = _stage(f"steer demo: detox fine-tuning of {args.model_name_or_path} on {threads} CPU thread(s)")
    out = Path(args.output_dir)

    data = demo_data(args)
    prompts = data["prompts"]
    _stage(
        f"data: {len(data['train'])} toxic RTP pairs for training, {len(data['prompt_dataset'])} challenging "
        f"prompts for guidance rounds, {len(prompts)} held-out prompts for evaluation"
    )
    columns: dict[str, dict] = {}
    rounds: list[dict] = []
    for name, kl_coef, run_dir in (("plain SFT", 0.0, out / "sft"), ("constrained", args.kl_coef, out)):
        what = (
            "no guidance rounds"
            if kl_coef == 0
            else (
                f"lambda={kl_coef}, guidance rounds every {args.guidance_interval} steps "
                f"({args.warmup_samples} warm-up samples, then {args.samples_per_round})"
            )
        )
        t = _stage(f"{name}: {args.max_steps} LoRA steps (batch 8), {what}")
        trainer = train_run(args, data, run_dir, kl_coef)
        tokenizer = trainer.processing_class
        trainer.save_model(str(run_dir))
        _stage(f"  ... trained in {time.perf_counter() - t:.0f} s, saved to {run_dir}")
        if kl_coef:
            rounds = list(trainer.round_history)
        trainer.model.eval()
        columns[name] = evaluate_run(name, trainer.model, tokenizer, data, args)
        if kl_coef == 0:  # the same model object, adapters off: the base model
            with trainer.model.disable_adapter():
                base = evaluate_run("the base model", trainer.model, tokenizer, data, args)
        del trainer
    columns = {"base": base, **columns}
    seconds = time.perf_counter() - start
    md = _report(columns, rounds, args, out, seconds)
    print()
    print(md)
    print(f"policy LoRA adapter: {out.resolve()}  (PeftModel.from_pretrained(base, {str(out.resolve())!r}))")
    print(
        f"guidance model: {out.resolve() / 'guidance'}; report: {out.resolve() / 'demo_report.md'} (+ .png)"
    )
    return {"columns": columns, "output_dir": str(out.resolve()), "seconds": seconds, "rounds": rounds}
