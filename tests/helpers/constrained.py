"""A tiny ConstrainedTrainer and its pieces (random-word corpus, prompts, config), shared by the trainer tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from peft import LoraConfig

from steer.constraints import KeywordConstraint
from steer.models import tiny_causal_lm
from steer.trainers.constrained import ConstrainedConfig, ConstrainedTrainer

__all__ = ["PROMPTS", "WORDS", "config", "corpus", "lora", "losses", "trainer", "values"]


WORDS = "the a cat dog bird is was good bad nice rude calm warm cold runs sees likes and but".split()


def corpus(n: int = 48, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        idx = torch.randint(0, len(WORDS), (int(torch.randint(4, 10, (1,), generator=gen)),), generator=gen)
        texts.append(" ".join(WORDS[i] for i in idx.tolist()).capitalize() + ".")
    return Dataset.from_dict({"text": texts})


PROMPTS = Dataset.from_dict({"prompt": ["The cat", "A dog", "The bird is", "Good and", "It was", "The calm"]})


def values(tmp_path, **overrides) -> dict:
    fields = dict(
        output_dir=str(tmp_path / "out"),
        max_steps=4,
        per_device_train_batch_size=4,
        learning_rate=5e-3,
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        max_length=24,
        seed=0,
        dataloader_num_workers=0,
        kl_coef=1.0,
        guidance_interval=2,
        guidance_steps_per_round=2,
        guidance_batch_size=8,
        guidance_lr=1e-2,
        guidance_lora_r=4,
        samples_per_round=8,
        sample_max_new_tokens=6,
        sample_batch_size=8,
        disable_tqdm=True,
    )
    fields.update(overrides)
    return fields


def config(tmp_path, **overrides) -> ConstrainedConfig:
    return ConstrainedConfig(**values(tmp_path, **overrides))


def lora() -> LoraConfig:
    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0, task_type="CAUSAL_LM")


def trainer(tmp_path, *, model=None, peft=True, constraint=None, prompts=PROMPTS, train=None, **overrides):
    if model is None:
        model, tokenizer = tiny_causal_lm("llama", seed=0)
    else:
        model, tokenizer = model
    return ConstrainedTrainer(
        model,
        config(tmp_path, **overrides),
        train_dataset=train if train is not None else corpus(),
        processing_class=tokenizer,
        peft_config=lora() if peft else None,
        constraint=constraint or KeywordConstraint(banned=["bad", "rude"]),
        prompt_dataset=prompts,
    )


def losses(run) -> list[float]:
    """The logged training losses of a finished ``run`` (a trainer), one per logging step."""
    return [h["loss"] for h in run.state.log_history if "loss" in h and "train_loss" not in h]
