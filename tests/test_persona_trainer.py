"""PersonaTrainer: a toy two-persona task, answer-only labels, checkpoint contents and exact resume."""

from __future__ import annotations

import random

import pytest
import torch
from datasets import Dataset

from steer.models import tiny_causal_lm
from steer.trainers.persona import (
    PersonaCollator,
    PersonaConfig,
    PersonaTrainer,
    load_user_vectors,
)

WORDS = "the a cat dog good bad nice calm quick slow happy sad city day night friend music book idea".split()
OPTIONS = ["agree", "not sure", "disagree"]
PERSONAS = {0: [1.0, -1.0, 0.5, 0.0], 1: [-1.0, 1.0, 0.0, 0.5]}


def toy_dataset(n: int, seed: int, *, by_index: bool = False) -> Dataset:
    """Persona 0 always agrees, persona 1 always disagrees, whatever the (random) question."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        user = i % 2
        row = {"question": " ".join(rng.choice(WORDS) for _ in range(5)) + "?", "options": OPTIONS}
        row["answer"] = 0 if user == 0 else 2
        row["user_index" if by_index else "persona"] = user if by_index else PERSONAS[user]
        rows.append(row)
    return Dataset.from_list(rows)


def config(tmp_path, **overrides) -> PersonaConfig:
    values = {
        "output_dir": str(tmp_path / "out"),
        "use_cpu": True,
        "bf16": False,
        "per_device_train_batch_size": 8,
        "per_device_eval_batch_size": 16,
        "learning_rate": 1e-2,
        "num_virtual_tokens": 4,
        "soft_prompt_hidden": 16,
        "save_strategy": "no",
        "report_to": "none",
        "logging_steps": 2,
        "seed": 0,
        "disable_tqdm": True,
    }
    values.update(overrides)
    return PersonaConfig(**values)


@pytest.mark.parametrize("mode", ["prefix", "embedding"])
def test_toy_two_personas_reach_high_accuracy(tmp_path, mode):
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = PersonaTrainer(
        model,
        config(tmp_path, num_train_epochs=2, soft_prompt_mode=mode),
        train_dataset=toy_dataset(64, seed=0),
        eval_dataset=toy_dataset(32, seed=1),  # unseen questions
        processing_class=tokenizer,
    )
    before = trainer.evaluate()["eval_accuracy"]
    trainer.train()
    after = trainer.evaluate()["eval_accuracy"]
    assert before < 0.75  # a persona-blind answer is right for at most one of the two personas
    assert after > 0.9
    # the LM is untouched and stayed in eval mode; the accuracy metric was logged during training
    assert all(torch.equal(reference[k], v) for k, v in model.state_dict().items())
    assert not model.training
    assert any("accuracy" in entry for entry in trainer.state.log_history)
    trained = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert trained == {id(p) for p in trainer.network.parameters()}


def test_collator_labels_only_the_answer(tiny_llama):
    _, tokenizer = tiny_llama
    collator = PersonaCollator(tokenizer)
    rows = [
        {"question": "is the sky blue?", "options": ["yes", "no"], "answer": "B", "persona": [0.0, 1.0]},
        {
            "question": "a much longer question about the city at night?",
            "options": OPTIONS,
            "answer": "disagree",
            "persona": [1.0, 0.0],
        },
        {"question": "dogs?", "options": OPTIONS, "answer": 1, "persona": [1.0, 1.0]},
    ]
    batch = collator(rows)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape
    assert batch["answer_index"].tolist() == [1, 2, 1]
    assert batch["option_mask"].tolist() == [[True, True, False], [True, True, True], [True, True, True]]
    for row in range(3):
        answer_positions = (batch["labels"][row] != -100).nonzero().flatten().tolist()
        assert answer_positions == [
            batch["labels"].shape[1] - 1
        ]  # left padding: the answer is the last token
        letter_id = batch["option_ids"][row, batch["answer_index"][row]]
        assert batch["labels"][row, -1] == letter_id == batch["input_ids"][row, -1]
    assert batch["persona"].shape == (3, 2)


@pytest.mark.parametrize(
    ("row", "message"),
    [
        ({"question": "q?", "options": ["a", "b"], "answer": "Z", "persona": [1.0]}, "answer"),
        ({"question": "q?", "options": ["a", "b"], "answer": 5, "persona": [1.0]}, "out of range"),
        ({"question": "q?", "answer": 0, "persona": [1.0]}, "options"),
        ({"question": "q?", "options": ["a", "b"], "answer": 0}, "'persona' vector or a 'user_index'"),
    ],
)
def test_collator_bad_examples(tiny_llama, row, message):
    _, tokenizer = tiny_llama
    with pytest.raises(ValueError, match=message):
        PersonaCollator(tokenizer)([row])


def test_checkpoint_holds_only_the_network_and_resume_is_exact(tmp_path):
    data = toy_dataset(48, seed=0)

    def run(output, resume=None, init_seed=0):
        model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
        torch.manual_seed(init_seed)  # a different initial network when resuming: the checkpoint must win
        args = config(
            tmp_path, output_dir=str(tmp_path / output), max_steps=6, save_strategy="steps", save_steps=3
        )
        trainer = PersonaTrainer(model, args, train_dataset=data, processing_class=tokenizer)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    full = run("full")
    checkpoint = tmp_path / "full" / "checkpoint-3"
    names = {p.name for p in checkpoint.iterdir()}
    assert {
        "soft_prompt.safetensors",
        "soft_prompt_config.json",
        "prompt_format.json",
        "optimizer.pt",
    } <= names
    assert "model.safetensors" not in names and "pytorch_model.bin" not in names
    assert (checkpoint / "soft_prompt.safetensors").stat().st_size < 200_000  # not the LM
    resumed = run("full", resume=str(checkpoint), init_seed=123)
    for a, b in zip(full.network.parameters(), resumed.network.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert resumed.state.global_step == 6


def test_joint_persona_vector_fine_tuning(tmp_path):
    model, tokenizer = tiny_causal_lm("gpt2", seed=0)
    start = torch.tensor([PERSONAS[0], PERSONAS[1]])
    args = config(
        tmp_path,
        max_steps=4,
        train_persona_vectors=True,
        persona_learning_rate=0.05,
        save_strategy="steps",
        save_steps=4,
    )
    trainer = PersonaTrainer(
        model,
        args,
        train_dataset=toy_dataset(32, seed=0, by_index=True),
        processing_class=tokenizer,
        user_vectors=start,
    )
    trainer.train()
    assert [g.get("lr") for g in trainer.optimizer.param_groups][-1] is not None
    assert not torch.allclose(trainer.user_vectors, start)
    saved = load_user_vectors(tmp_path / "out" / "checkpoint-4")
    torch.testing.assert_close(saved, trainer.user_vectors)


def test_user_index_without_table_is_a_clear_error(tmp_path, tiny_gpt2):
    model, tokenizer = tiny_gpt2
    with pytest.raises(ValueError, match="persona_dim"):
        PersonaTrainer(
            model,
            config(tmp_path),
            train_dataset=toy_dataset(4, 0, by_index=True),
            processing_class=tokenizer,
        )
    with pytest.raises(ValueError, match="user_vectors"):
        PersonaTrainer(
            model,
            config(tmp_path, train_persona_vectors=True),
            persona_dim=4,
            train_dataset=toy_dataset(4, 0, by_index=True),
            processing_class=tokenizer,
        )


def test_gradient_checkpointing_recomputes_layers_with_the_same_gradients(tmp_path):
    """Embedding mode: checkpointing really runs (the layers are recomputed) and leaves the gradients unchanged;
    prefix mode refuses it with a clear error instead of silently doing nothing."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    grads = {}
    for checkpointing in (False, True):
        model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
        trainer = PersonaTrainer(
            model,
            config(
                tmp_path, soft_prompt_mode="embedding", max_steps=1, activation_checkpointing=checkpointing
            ),
            train_dataset=toy_dataset(8, seed=0),
            processing_class=tokenizer,
        )
        module = trainer.model
        if checkpointing:
            module.activation_checkpointing_enable()  # what Trainer.train() calls
        module.train()
        calls = []
        for layer in module.model.modules():
            if isinstance(layer, GradientCheckpointingLayer):  # the MLP runs inside the checkpointed forward
                layer.mlp.register_forward_pre_hook(lambda *_, seen=calls: seen.append(1))
        batch = trainer.data_collator([dict(r) for r in toy_dataset(4, seed=1)])
        module(**batch).loss.backward()
        layers = sum(isinstance(m, GradientCheckpointingLayer) for m in module.model.modules())
        assert len(calls) == (2 * layers if checkpointing else layers)  # recomputed in the backward pass
        assert not any(m.training for m in module.model.modules() if isinstance(m, torch.nn.Dropout))
        grads[checkpointing] = [p.grad.clone() for p in module.network.parameters()]
    for a, b in zip(grads[False], grads[True]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    with pytest.raises(ValueError, match="activation_checkpointing .*is not supported"):
        PersonaTrainer(
            model,
            config(tmp_path, soft_prompt_mode="prefix", max_steps=1, activation_checkpointing=True),
            train_dataset=toy_dataset(8, seed=0),
            processing_class=tokenizer,
        ).train()
