"""A seeded toy experiment: the constraint KL keeps a banned-word corpus from teaching banned words.

The corpus is short sentences of which 60% contain a banned word ("bad"/"rude"). Plain SFT learns to
produce them; the constrained run (same corpus, same steps, λ = 5, guidance rounds every 10 steps)
must end with a sample violation rate at least 50% below the plain run's.
"""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset
from trl import SFTConfig, SFTTrainer

from steer.constraints import KeywordConstraint
from steer.models import tiny_causal_lm
from steer.trainers.constrained import ConstrainedConfig, ConstrainedTrainer
from steer.trainers.schedule import sample_with_generator

WORDS = "the a cat dog bird is was good nice calm warm cold runs sees likes and but".split()
BANNED = ["bad", "rude"]
PROMPTS = ["The cat", "A dog", "The bird", "It was", "Good and", "The warm", "A calm", "The cold"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _corpus(n: int = 256, seed: int = 0) -> Dataset:
    gen = torch.Generator().manual_seed(seed)
    texts = []
    for _ in range(n):
        k = int(torch.randint(5, 10, (1,), generator=gen))
        words = [WORDS[i] for i in torch.randint(0, len(WORDS), (k,), generator=gen).tolist()]
        if torch.rand(1, generator=gen) < 0.6:
            words[int(torch.randint(1, k, (1,), generator=gen))] = BANNED[
                int(torch.randint(0, 2, (1,), generator=gen))
            ]
        texts.append(" ".join(words).capitalize() + ".")
    return Dataset.from_dict({"text": texts})


COMMON = dict(
    max_steps=100,
    per_device_train_batch_size=8,
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    use_cpu=True,
    bf16=False,
    activation_checkpointing=False,
    report_to=[],
    logging_steps=10,
    save_strategy="no",
    max_length=32,
    seed=0,
    disable_tqdm=True,
)


def _violation_rate(model, tokenizer, constraint) -> float:
    batch = sample_with_generator(
        model, tokenizer, PROMPTS * 16, max_new_tokens=12, temperature=1.0, top_p=1.0, batch_size=64, seed=123
    )
    return float((constraint(batch.texts) < 0.5).float().mean())


def test_constraint_cuts_the_violation_rate_by_half(tmp_path):
    constraint = KeywordConstraint(banned=BANNED)

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    plain = SFTTrainer(
        model,
        SFTConfig(output_dir=str(tmp_path / "sft"), **COMMON),
        train_dataset=_corpus(),
        processing_class=tokenizer,
    )
    plain.train()
    plain_rate = _violation_rate(plain.model, tokenizer, constraint)

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    config = ConstrainedConfig(
        output_dir=str(tmp_path / "constrained"),
        kl_coef=5.0,
        guidance_backbone="separate",  # a fully fine-tuned tiny policy; the guidance gets its own copy
        guidance_interval=10,
        guidance_steps_per_round=16,
        guidance_batch_size=32,
        guidance_lr=1e-3,
        samples_per_round=32,
        sample_max_new_tokens=12,
        sample_batch_size=32,
        sample_buffer_size=256,
        **COMMON,
    )
    constrained = ConstrainedTrainer(
        model,
        config,
        train_dataset=_corpus(),
        processing_class=tokenizer,
        constraint=constraint,
        prompt_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    constrained.train()
    constrained_rate = _violation_rate(constrained.model, tokenizer, constraint)

    print(f"violation rate: plain SFT {plain_rate:.3f}, constrained {constrained_rate:.3f}")
    assert plain_rate > 0.3, f"the plain run should learn the banned words (violation rate {plain_rate:.3f})"
    assert constrained_rate <= 0.5 * plain_rate, (plain_rate, constrained_rate)
    # The guidance model learned to predict violations on fresh samples.
    aucs = [h["guidance/auc"] for h in constrained.state.log_history if "guidance/auc" in h]
    assert aucs and aucs[-1] > 0.8


def _prompt_completion(n: int = 256, seed: int = 0) -> Dataset:
    texts = _corpus(n, seed)["text"]
    prompts, completions = [], []
    for text in texts:
        words = text.split(" ")
        prompts.append(" ".join(words[:2]))
        completions.append(" " + " ".join(words[2:]))
    return Dataset.from_dict({"prompt": prompts, "completion": completions})


def test_default_path_cuts_the_violation_rate_by_half(tmp_path):
    """The defaults users get: a LoRA policy, the LoRA guidance adapter, prompt/completion data, hard labels,
    the token prior and the KL on corpus and policy-sample positions."""
    from peft import LoraConfig

    constraint = KeywordConstraint(banned=BANNED)
    # A random tiny backbone gives LoRA little to adapt: the head is trained too (modules_to_save).
    lora = dict(
        r=8,
        lora_alpha=16,
        target_modules="all-linear",
        modules_to_save=["lm_head"],
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
    )
    common = {**COMMON, "learning_rate": 1e-2}

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    plain = SFTTrainer(
        model,
        SFTConfig(output_dir=str(tmp_path / "sft"), **common),
        train_dataset=_prompt_completion(),
        processing_class=tokenizer,
        peft_config=LoraConfig(**lora),
    )
    plain.train()
    plain_rate = _violation_rate(plain.model, tokenizer, constraint)

    model, tokenizer = tiny_causal_lm("llama", seed=0)
    config = ConstrainedConfig(
        output_dir=str(tmp_path / "constrained"),
        kl_coef=5.0,
        guidance_interval=10,
        guidance_steps_per_round=16,
        guidance_batch_size=32,
        guidance_lr=1e-3,
        samples_per_round=32,
        sample_max_new_tokens=12,
        sample_batch_size=32,
        **common,
    )
    assert (config.guidance_backbone, config.label_mode, config.guidance_prior, config.kl_positions) == (
        "lora",
        "hard",
        "token",
        "both",
    )
    constrained = ConstrainedTrainer(
        model,
        config,
        train_dataset=_prompt_completion(),
        processing_class=tokenizer,
        peft_config=LoraConfig(**lora),
        constraint=constraint,
        prompt_dataset=Dataset.from_dict({"prompt": PROMPTS}),
    )
    constrained.train()
    constrained_rate = _violation_rate(constrained.model, tokenizer, constraint)

    print(f"violation rate (default path): plain SFT {plain_rate:.3f}, constrained {constrained_rate:.3f}")
    assert plain_rate > 0.3, f"the plain run should learn the banned words (violation rate {plain_rate:.3f})"
    assert constrained_rate <= 0.5 * plain_rate, (plain_rate, constrained_rate)
    assert any("kl_samples" in h for h in constrained.state.log_history)
