"""PersonaSteeredModel: option probabilities, generation, persona specs, save/load and prompt export."""

from __future__ import annotations

import pytest
import torch

from steer.models import tiny_causal_lm
from steer.persona.embedder import PersonaEmbedder
from steer.persona.simulate import synthetic_responses
from steer.persona.soft_prompt import SoftPromptNetwork, steered_forward
from steer.persona.steering import PersonaSteeredModel, PromptFormat, answer_token_ids

QUESTIONS = [
    ("Is the city safe at night?", ["Very safe", "Somewhat safe", "Not safe"]),
    ("Do you like music?", ["Yes", "No"]),
    (
        "How often do you read a book about the world and its people?",
        ["Often", "Sometimes", "Rarely", "Never"],
    ),
]


@pytest.fixture(scope="module")
def embedder():
    responses = synthetic_responses(30, 12, dim=3, observed_frac=0.5, seed=0)
    return PersonaEmbedder(4, seed=0, max_iters=10).fit(responses)


def make_steered(mode="prefix", embedder=None, arch="llama"):
    model, tokenizer = tiny_causal_lm(arch, seed=0, num_kv_heads=2 if arch == "llama" else None)
    torch.manual_seed(1)
    network = SoftPromptNetwork(4, 3, mode, model_config=model.config, init_std=0.5)
    personas = {
        "cohort:0": torch.tensor([1.0, 0.0, -1.0, 0.5]),
        "POLPARTY=Democrat": torch.tensor([0.0, 2.0, 0.0, 0.0]),
    }
    return PersonaSteeredModel(model, tokenizer, network, embedder=embedder, personas=personas)


def test_option_probs_is_a_distribution_and_raw_matches_manual():
    steered = make_steered()
    probs = steered.option_probs(*QUESTIONS[0], persona=None)
    assert probs.shape == (3,) and torch.isclose(probs.sum(), torch.tensor(1.0))
    prompt = steered.prompt_format.build(steered.tokenizer, *QUESTIONS[0])
    ids = steered.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    logits = steered.model(input_ids=ids).logits[0, -1]
    letters = answer_token_ids(steered.tokenizer, prompt, ["A", "B", "C"])
    torch.testing.assert_close(probs, logits[letters].softmax(-1), atol=1e-5, rtol=1e-5)
    steered_probs = steered.option_probs(*QUESTIONS[0], persona="cohort:0")
    assert not torch.allclose(probs, steered_probs, atol=1e-3)


@pytest.mark.parametrize("mode", ["prefix", "embedding"])
def test_batched_option_probs_equal_single(mode):
    steered = make_steered(mode)
    personas = torch.randn(3, 4)
    batch = steered.option_probs_batch(QUESTIONS, personas, batch_size=3)
    for (question, options), persona, probs in zip(QUESTIONS, personas, batch):
        single = steered.option_probs(question, options, persona)
        torch.testing.assert_close(probs, single, atol=1e-5, rtol=1e-4)


def test_persona_specs(embedder):
    steered = make_steered(embedder=embedder)
    user = embedder.user_ids[3]
    by_id = steered.resolve_persona(user)
    torch.testing.assert_close(by_id[0], embedder.embeddings[3].float())
    assert steered.resolve_persona("POLPARTY=Democrat").tolist() == [[0.0, 2.0, 0.0, 0.0]]
    assert steered.resolve_persona(["cohort:0", user]).shape == (2, 4)
    key = embedder.question_keys[0]
    folded = steered.resolve_persona({key: 1.0, embedder.question_keys[1]: 0.0})
    assert folded.shape == (1, 4) and torch.isfinite(folded).all()
    with pytest.raises(KeyError, match="unknown persona 'nobody'"):
        steered.resolve_persona("nobody")
    with pytest.raises(ValueError, match="persona_dim=4"):
        steered.option_probs(*QUESTIONS[0], persona=torch.zeros(5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        steered.resolve_persona({key: 3.0})


def test_save_load_round_trip_gives_identical_option_probs(tmp_path, embedder):
    steered = make_steered(embedder=embedder)
    steered.prompt_format = PromptFormat(system_prompt="You answer surveys.")
    specs = [
        torch.tensor([0.5, -0.5, 1.0, 0.0]),
        "cohort:0",
        embedder.user_ids[5],
        {embedder.question_keys[2]: 0.5},
    ]
    before = [steered.option_probs_batch(QUESTIONS, spec) for spec in specs]
    steered.save_pretrained(tmp_path / "persona")
    names = {p.name for p in (tmp_path / "persona").iterdir()}
    assert {
        "soft_prompt.safetensors",
        "soft_prompt_config.json",
        "personas.safetensors",
        "prompt_format.json",
        "embedder",
    } <= names
    loaded = PersonaSteeredModel.from_pretrained(
        steered.model, tmp_path / "persona", tokenizer=steered.tokenizer
    )
    assert loaded.prompt_format == steered.prompt_format
    after = [loaded.option_probs_batch(QUESTIONS, spec) for spec in specs]
    for a, b in zip(before, after):
        for x, y in zip(a, b):
            assert torch.equal(x, y)


def test_load_rejects_a_network_for_another_model(tmp_path):
    steered = make_steered()
    steered.save_pretrained(tmp_path / "persona")
    other, tokenizer = tiny_causal_lm("gpt2", seed=0)
    with pytest.raises(ValueError, match="does not match the model"):
        PersonaSteeredModel.from_pretrained(other, tmp_path / "persona", tokenizer=tokenizer)
    with pytest.raises(FileNotFoundError, match="persona directory"):
        PersonaSteeredModel.from_pretrained(other, tmp_path / "missing", tokenizer=tokenizer)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_generate_batch_equals_single_and_uses_the_persona(arch):
    steered = make_steered(arch=arch)
    prompts = ["the cat runs", "a very long prompt about the quiet city at night and the river"]
    personas = torch.randn(2, 4) * 3
    batch = steered.generate(prompts, personas, max_new_tokens=8)
    single = [steered.generate(p, personas[i], max_new_tokens=8)[0] for i, p in enumerate(prompts)]
    assert batch == single
    plain = steered.generate(prompts, None, max_new_tokens=8)
    assert len(plain) == 2 and all(isinstance(t, str) for t in plain)
    sampled = [
        steered.generate(prompts, "cohort:0", do_sample=True, seed=3, max_new_tokens=8) for _ in range(2)
    ]
    assert sampled[0] == sampled[1]
    chat = steered.generate("hello", "cohort:0", chat=True, max_new_tokens=4)
    assert len(chat) == 1


def test_export_prompt_embeds_reproduces_the_steered_model():
    """A serving engine fed the exported prompt_embeds (positions 0..) sees what the steered model sees."""
    steered = make_steered("embedding")
    persona = torch.tensor([0.3, -1.0, 0.2, 0.9])
    virtual = steered.export_prompt_embeds(persona)
    assert virtual.shape == (3, steered.model.config.hidden_size)
    full = steered.export_prompt_embeds(persona, "the dog likes music")
    ids = steered.tokenizer("the dog likes music", return_tensors="pt")["input_ids"]
    assert full.shape == (3 + ids.shape[1], steered.model.config.hidden_size)
    with torch.no_grad():
        served = steered.model(inputs_embeds=full.unsqueeze(0)).logits[0, -1]
        reference = steered_forward(steered.model, steered.network, persona, ids).logits[0, -1]
    torch.testing.assert_close(served, reference, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="embedding"):
        make_steered("prefix").export_prompt_embeds(persona)


def test_trained_toy_personas_steer_option_probs(tmp_path):
    """End to end: train on two personas with opposite answers, then read them back through option_probs."""
    from datasets import Dataset

    from steer.trainers.persona import PersonaConfig, PersonaTrainer

    model, tokenizer = tiny_causal_lm("llama", seed=0, num_kv_heads=2)
    vectors = {0: [1.0, -1.0], 1: [-1.0, 1.0]}
    words = "cat dog city music book river night friend".split()
    rows = [
        {
            "question": f"{words[i % 8]} {words[(3 * i) % 8]}?",
            "options": ["yes", "maybe", "no"],
            "answer": 0 if i % 2 == 0 else 2,
            "persona": vectors[i % 2],
        }
        for i in range(48)
    ]
    args = PersonaConfig(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        bf16=False,
        per_device_train_batch_size=8,
        num_train_epochs=2,
        learning_rate=1e-2,
        num_virtual_tokens=4,
        soft_prompt_hidden=16,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        seed=0,
    )
    trainer = PersonaTrainer(model, args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer)
    trainer.train()
    steered = PersonaSteeredModel(model, tokenizer, trainer.network, prompt_format=trainer.prompt_format)
    steered.save_pretrained(tmp_path / "persona")
    loaded = PersonaSteeredModel.from_pretrained(model, tmp_path / "persona", tokenizer=tokenizer)
    question = ("the quiet river?", ["yes", "maybe", "no"])
    assert loaded.option_probs(*question, persona=vectors[0]).argmax() == 0
    assert loaded.option_probs(*question, persona=vectors[1]).argmax() == 2
