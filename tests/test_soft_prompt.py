"""SoftPromptNetwork: prefix shapes (MHA / GQA), the steered forward, KV-cached decoding, save/load."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from steer.models import tiny_causal_lm
from steer.persona.soft_prompt import (
    SoftPromptNetwork,
    attention_geometry,
    steered_forward,
    text_position_ids,
)
from steer.persona.steering import decode

PROMPTS = ["the cat runs over the road", "a dog"]


def _models():
    return {
        "llama-gqa": tiny_causal_lm("llama", seed=0, num_heads=4, num_kv_heads=2),
        "gpt2": tiny_causal_lm("gpt2", seed=0),
    }


@pytest.fixture(scope="module")
def models():
    built = _models()
    for model, _ in built.values():
        model.eval()
    return built


def _batch(tokenizer):
    enc = tokenizer(PROMPTS, return_tensors="pt", padding=True, padding_side="left")
    assert enc["attention_mask"][1, 0] == 0  # the second prompt really is left-padded
    return enc["input_ids"], enc["attention_mask"]


@pytest.mark.parametrize(
    ("name", "kv_heads", "head_dim"),
    [("llama-gqa", 2, 16), ("gpt2", 4, 16)],
)
def test_prefix_shapes_tiny(models, name, kv_heads, head_dim):
    model, _ = models[name]
    net = SoftPromptNetwork(6, 3, "prefix", hidden=8, model_config=model.config)
    pairs = net.key_values(torch.zeros(5, 6))
    assert len(pairs) == model.config.num_hidden_layers
    for key, value in pairs:
        assert key.shape == value.shape == (5, kv_heads, 3, head_dim)
    cache = net.prefix_cache(torch.zeros(5, 6), model.config)
    assert cache.get_seq_length() == 3


def test_prefix_shapes_smollm2_geometry():
    """SmolLM2-135M: 30 layers, 9 query heads, 3 KV heads, head_dim 64 (config only, no weights)."""
    config = AutoConfig.for_model(
        "llama",
        hidden_size=576,
        num_hidden_layers=30,
        num_attention_heads=9,
        num_key_value_heads=3,
        head_dim=64,
        intermediate_size=1536,
    )
    geometry = attention_geometry(config)
    assert geometry == {
        "num_layers": 30,
        "num_heads": 9,
        "num_kv_heads": 3,
        "head_dim": 64,
        "hidden_size": 576,
    }
    net = SoftPromptNetwork(16, 4, "prefix", hidden=8, model_config=config)
    key, value = net.key_values(torch.zeros(2, 16))[7]
    assert key.shape == value.shape == (2, 3, 4, 64)
    assert net.config.output_dim == 30 * 2 * 3 * 4 * 64
    emb = SoftPromptNetwork(16, 4, "embedding", model_config=config)
    assert emb.prompt_embeds(torch.zeros(2, 16)).shape == (2, 4, 576)


def test_sliding_window_models_rejected_for_prefix():
    config = AutoConfig.for_model(
        "llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    config.layer_types = ["sliding_attention", "full_attention"]
    with pytest.raises(ValueError, match="sliding"):
        SoftPromptNetwork(4, 2, "prefix", model_config=config)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("mode", ["prefix", "embedding"])
def test_masked_prefix_equals_plain_model(models, name, mode):
    model, tokenizer = models[name]
    ids, mask = _batch(tokenizer)
    net = SoftPromptNetwork(6, 4, mode, model_config=model.config, init_std=1.0)
    persona = torch.randn(2, 6)
    hidden = torch.zeros(2, 4, dtype=mask.dtype)
    with torch.no_grad():
        masked = steered_forward(model, net, persona, ids, mask, prefix_attention_mask=hidden).logits
        steered = steered_forward(model, net, persona, ids, mask).logits
        # Positions: prefix mode keeps the text at 0..T-1; embedding mode puts it after the n virtual tokens.
        offset = 0 if mode == "prefix" else 4
        plain = model(
            input_ids=ids, attention_mask=mask, position_ids=text_position_ids(mask) + offset
        ).logits
    real = mask.bool()
    assert masked.shape == plain.shape
    torch.testing.assert_close(masked[real], plain[real], atol=1e-5, rtol=1e-5)
    assert (steered[real] - plain[real]).abs().max() > 1e-2  # the visible prefix changes the output


def test_prefix_mode_unpadded_equals_plain_default_positions(models):
    """Without padding, the masked prefix-mode forward equals the model called with no extra arguments."""
    model, tokenizer = models["llama-gqa"]
    ids = tokenizer(["one two three four"], return_tensors="pt")["input_ids"]
    net = SoftPromptNetwork(3, 5, "prefix", model_config=model.config, init_std=1.0)
    with torch.no_grad():
        masked = steered_forward(
            model, net, torch.ones(3), ids, prefix_attention_mask=torch.zeros(1, 5, dtype=torch.long)
        ).logits
        plain = model(input_ids=ids).logits
    torch.testing.assert_close(masked, plain, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
@pytest.mark.parametrize("mode", ["prefix", "embedding"])
def test_cached_generation_equals_stepwise_forward(models, name, mode):
    """Greedy decoding with the persona prefix (prefill once, KV cache after) == full recomputation per step."""
    model, tokenizer = models[name]
    ids, mask = _batch(tokenizer)
    net = SoftPromptNetwork(6, 3, mode, model_config=model.config, init_std=0.5)
    persona = torch.randn(2, 6)
    tokens, scores = decode(
        model, ids, mask, network=net, persona=persona, max_new_tokens=6, return_scores=True
    )
    assert tokens.shape == (2, 6)
    seq, seq_mask = ids, mask
    for step in range(6):
        with torch.no_grad():
            logits = steered_forward(model, net, persona, seq, seq_mask).logits[:, -1]
        torch.testing.assert_close(scores[:, step], logits, atol=1e-4, rtol=1e-4)
        assert torch.equal(tokens[:, step], logits.argmax(-1))
        seq = torch.cat([seq, tokens[:, step : step + 1]], dim=1)
        seq_mask = torch.cat([seq_mask, torch.ones_like(seq_mask[:, :1])], dim=1)


def test_plain_decode_matches_hf_generate(models):
    model, tokenizer = models["llama-gqa"]
    ids, mask = _batch(tokenizer)
    ours = decode(model, ids, mask, max_new_tokens=5)
    theirs = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=5,
        do_sample=False,
        eos_token_id=None,
        min_new_tokens=5,
    )[:, ids.shape[1] :]
    assert torch.equal(ours, theirs)


def test_decode_sampling_is_seeded(models):
    model, tokenizer = models["gpt2"]
    ids, mask = _batch(tokenizer)
    net = SoftPromptNetwork(6, 3, "prefix", model_config=model.config)

    def run(seed):
        gen = torch.Generator().manual_seed(seed)
        return decode(
            model,
            ids,
            mask,
            network=net,
            persona=torch.ones(6),
            max_new_tokens=8,
            do_sample=True,
            top_p=0.9,
            top_k=50,
            generator=gen,
        )

    assert torch.equal(run(1), run(1))


def test_only_the_network_gets_gradients(models):
    model, tokenizer = models["llama-gqa"]
    model.requires_grad_(False)
    ids, mask = _batch(tokenizer)
    net = SoftPromptNetwork(6, 3, "prefix", model_config=model.config)
    out = steered_forward(model, net, torch.randn(2, 6), ids, mask)
    out.logits.logsumexp(-1).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())
    assert all(p.grad is None for p in model.parameters())


def test_bad_persona_dimension_is_a_clear_error(models):
    model, tokenizer = models["gpt2"]
    ids, mask = _batch(tokenizer)
    net = SoftPromptNetwork(6, 3, "prefix", model_config=model.config)
    with pytest.raises(ValueError, match="persona_dim=6"):
        steered_forward(model, net, torch.zeros(2, 5), ids, mask)
    with pytest.raises(ValueError, match="3 persona vectors for a batch of 2"):
        steered_forward(model, net, torch.zeros(3, 6), ids, mask)
    with pytest.raises(ValueError, match="NaN"):
        net(torch.full((6,), float("nan")))


def test_network_for_another_model_is_rejected(models):
    model, _ = models["gpt2"]
    other, _ = models["llama-gqa"]
    net = SoftPromptNetwork(6, 3, "prefix", model_config=other.config)
    with pytest.raises(ValueError, match="num_kv_heads"):
        net.check_model(model)


def test_save_load_round_trip(tmp_path, models):
    model, _ = models["llama-gqa"]
    net = SoftPromptNetwork(6, 3, "prefix", hidden=12, model_config=model.config, init_std=0.3)
    net.save_pretrained(tmp_path)
    loaded = SoftPromptNetwork.from_pretrained(tmp_path)
    assert loaded.config == net.config
    x = torch.randn(4, 6)
    assert torch.equal(loaded(x), net(x))
    (tmp_path / "soft_prompt_config.json").write_text('{"persona_dim": 6, "bogus": 1}')
    with pytest.raises(ValueError, match="bogus"):
        SoftPromptNetwork.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="soft_prompt"):
        SoftPromptNetwork.from_pretrained(tmp_path / "missing")


def test_sliding_window_without_layer_types_rejected_for_prefix_only():
    """Mistral-style configs set sliding_window without layer_types: a prefix would be evicted too."""
    config = AutoConfig.for_model(
        "llama", hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64
    )
    config.sliding_window = 16
    with pytest.raises(ValueError, match="sliding_window=16"):
        SoftPromptNetwork(4, 2, "prefix", model_config=config)
    # embedding mode prepends input embeddings, which any attention handles
    assert SoftPromptNetwork(4, 2, "embedding", model_config=config).config.hidden_size == 64
    config.use_sliding_window = False  # Qwen2-style: the window is configured but switched off
    assert SoftPromptNetwork(4, 2, "prefix", model_config=config).config.num_layers == 2
