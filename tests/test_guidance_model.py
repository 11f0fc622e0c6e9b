"""GuidanceModel: zero init, PEFT multi-adapter isolation, shared weights, padding, cache, save/load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache

from steer.guidance import GuidanceConfig, GuidanceModel, guidance_loss, guided_log_probs
from steer.models import tiny_causal_lm


def _ids(vocab=512, batch=2, length=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(6, vocab, (batch, length), generator=gen)
    mask = torch.ones_like(ids)
    return ids, mask


def _policy(arch="llama", seed=0):
    """A PEFT policy whose LoRA is *not* zero, so policy != base."""
    model, tok = tiny_causal_lm(arch, seed=seed)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules="all-linear", init_lora_weights=False, task_type="CAUSAL_LM"
    )
    return get_peft_model(model, config), tok


def _train_guidance(guidance, ids, mask, steps=3, lr=5e-2):
    opt = torch.optim.Adam(guidance.trainable_parameters(), lr=lr)
    cont = torch.zeros_like(ids, dtype=torch.bool)
    cont[:, 4:] = True
    labels = torch.tensor([1.0, 0.0])
    for _ in range(steps):
        loss, _ = guidance_loss(guidance(ids, mask), ids, cont, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss


def _fit_sequence_labels(guidance, batch, steps=60, lr=1e-2):
    """Adam on the guidance loss for ``steps`` batches ``batch() -> (ids, continuation_mask, labels)``."""
    from steer.guidance import guidance_loss_from_hidden

    opt = torch.optim.Adam(guidance.trainable_parameters(), lr=lr)
    for _ in range(steps):
        ids, cont, labels = batch()
        hidden = guidance.hidden_states(ids, attention_mask=torch.ones_like(ids))
        loss, _ = guidance_loss_from_hidden(hidden, guidance.head, ids, cont, labels, guidance=guidance)
        opt.zero_grad()
        loss.backward()
        opt.step()


def _policy_flags(policy):
    return {n: p.requires_grad for n, p in policy.named_parameters() if ".default." in n}


@pytest.mark.parametrize("backbone", ["lora", "separate"])
def test_zero_head_gives_half_and_q_equals_p(tiny_llama, backbone):
    model, _ = tiny_llama
    guidance = GuidanceModel(model, GuidanceConfig(backbone=backbone, separate_num_layers=1))
    ids, mask = _ids()
    z = guidance(ids, mask)
    assert z.shape == (2, 9, model.config.vocab_size) and z.dtype == torch.float32
    assert (z == 0).all() and torch.allclose(torch.sigmoid(z), torch.full_like(z, 0.5))
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(
        guided_log_probs(logits, z), torch.log_softmax(logits, -1), atol=1e-5, rtol=1e-6
    )


@pytest.mark.parametrize(("arch", "fast_switch"), [("llama", True), ("gpt2", True), ("llama", False)])
def test_lora_guidance_keeps_policy_output_and_trainability(arch, fast_switch, monkeypatch):
    monkeypatch.setattr(GuidanceModel, "_fast_adapter_switch", fast_switch)
    policy, _ = _policy(arch)
    ids, mask = _ids()
    with torch.no_grad():
        before = policy(ids, attention_mask=mask).logits
    flags = _policy_flags(policy)
    assert flags and all(flags.values())

    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    assert _policy_flags(policy) == flags and policy.active_adapter == "default"
    _train_guidance(guidance, ids, mask)
    # The guidance adapter trained (its LoRA B moved away from zero) ...
    assert any(p.abs().sum() > 0 for n, p in policy.named_parameters() if "lora_B.guidance" in n)
    # ... yet the policy is exactly what it was, still active and still trainable.
    assert policy.active_adapter == "default"
    assert _policy_flags(policy) == flags
    with torch.no_grad():
        after = policy(ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    # The guidance pass really uses its own adapter: z differs from a head applied to the policy's hiddens.
    with torch.no_grad():
        hidden = policy.get_base_model().base_model(ids, attention_mask=mask).last_hidden_state
        z_policy_hidden = guidance.head(hidden)
        assert not torch.allclose(guidance(ids, mask), z_policy_hidden, atol=1e-4)

    # A policy step after guidance steps: gradients reach the policy LoRA only.
    guidance.set_trainable(False)
    policy.zero_grad(set_to_none=True)
    policy(ids, attention_mask=mask).logits.logsumexp(-1).mean().backward()
    grads = {n: p.grad for n, p in policy.named_parameters() if "lora_" in n}
    assert all(g is not None and g.abs().sum() > 0 for n, g in grads.items() if ".default." in n)
    assert all(g is None for n, g in grads.items() if ".guidance." in n)


def test_guidance_backbone_excludes_the_policy_adapter():
    base, _ = tiny_causal_lm("llama")
    model, _ = tiny_causal_lm("llama")
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False)
    policy = get_peft_model(model, config)
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4, target_modules=["k_proj"]))
    ids, mask = _ids()
    with torch.no_grad():
        policy_hidden = policy.get_base_model().model(ids, attention_mask=mask).last_hidden_state
        base_hidden = base.model(ids, attention_mask=mask).last_hidden_state
        assert not torch.allclose(policy_hidden, base_hidden, atol=1e-3)
        # Zero-initialised guidance LoRA: the guidance backbone is exactly the base, policy LoRA inactive.
        torch.testing.assert_close(guidance.hidden_states(ids, mask), base_hidden, atol=1e-5, rtol=1e-5)


def test_guidance_gradients_reach_only_guidance_params():
    policy, _ = _policy()
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    ids, mask = _ids()
    _train_guidance(guidance, ids, mask, steps=2)  # head becomes non-zero, so the LoRA gets gradient
    policy.zero_grad(set_to_none=True)
    guidance.zero_grad(set_to_none=True)
    cont = torch.ones_like(ids, dtype=torch.bool)
    loss, _ = guidance_loss(guidance(ids, mask), ids, cont, torch.tensor([1.0, 0.0]))
    loss.backward()
    trainable = {id(p) for p in guidance.trainable_parameters()}
    for name, param in policy.named_parameters():
        if id(param) in trainable:
            assert param.grad is not None and param.grad.abs().sum() > 0, name
        else:
            assert param.grad is None, name
    assert guidance.head.weight.grad.abs().sum() > 0


def test_lora_backbone_shares_base_weights():
    model, _ = tiny_causal_lm("llama")
    base_ptrs = {n: p.data_ptr() for n, p in model.named_parameters()}
    base_count = sum(p.numel() for p in model.parameters())
    policy = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear", task_type="CAUSAL_LM"))
    policy_count = sum(p.numel() for p in policy.parameters())
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=8))

    # No base weight was copied or re-allocated.
    after = {
        n.replace("base_model.model.", "").replace(".base_layer", ""): p for n, p in policy.named_parameters()
    }
    for name, ptr in base_ptrs.items():
        assert after[name].data_ptr() == ptr, name
    all_ptrs = [p.data_ptr() for p in policy.parameters()] + [p.data_ptr() for p in guidance.parameters()]
    assert len(all_ptrs) == len(set(all_ptrs))
    # Parameter memory added = guidance adapter + head, nothing else.
    added = (
        sum(p.numel() for p in policy.parameters())
        - policy_count
        + sum(p.numel() for p in guidance.parameters())
    )
    trainable = sum(p.numel() for p in guidance.trainable_parameters())
    hidden, vocab = model.config.hidden_size, model.config.vocab_size
    head = hidden * vocab + vocab
    assert added == trainable
    assert head < trainable < head + base_count // 4
    # The guidance module does not register the base model (no duplicate state in its state_dict).
    assert set(guidance.state_dict()) == {"head.weight", "head.bias"}


def test_plain_base_model_is_unchanged_by_wrapping(tiny_llama):
    model, _ = tiny_llama
    ids, mask = _ids()
    with torch.no_grad():
        before = model(ids, attention_mask=mask).logits
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    guidance = GuidanceModel(model, GuidanceConfig(lora_r=4))
    _train_guidance(guidance, ids, mask)
    with torch.no_grad():
        after = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(after, before, atol=0, rtol=0)
    base_flags = {
        n.replace(".base_layer", ""): p.requires_grad for n, p in model.named_parameters() if "lora_" not in n
    }
    assert base_flags == flags  # a plain (e.g. fully fine-tuned) policy keeps its trainability
    assert not torch.allclose(guidance(ids, mask), torch.zeros(1))


def test_set_trainable_and_restored_flags():
    policy, _ = _policy()
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
    assert all(p.requires_grad for p in guidance.trainable_parameters())
    guidance.set_trainable(False)
    ids, mask = _ids()
    z = guidance(ids, mask)
    assert not z.requires_grad
    assert not any(p.requires_grad for p in guidance.trainable_parameters())
    assert all(_policy_flags(policy).values())
    guidance.set_trainable(True)
    assert guidance(ids, mask).requires_grad


def test_gradient_checkpointing_recomputes_with_the_guidance_adapter():
    def grads(checkpointing: bool):
        torch.manual_seed(0)  # LoRA initialisation draws from the global generator
        policy, _ = _policy()
        if checkpointing:
            policy.get_base_model().activation_checkpointing_enable(
                activation_checkpointing_kwargs={"use_reentrant": False}
            )
        policy.train()
        guidance = GuidanceModel(policy, GuidanceConfig(lora_r=4))
        torch.manual_seed(0)
        with torch.no_grad():
            guidance.head.weight.normal_(0, 0.1)
        ids, mask = _ids()
        loss, _ = guidance_loss(
            guidance(ids, mask), ids, torch.ones_like(ids, dtype=torch.bool), torch.tensor([1.0, 0.0])
        )
        loss.backward()
        return {
            n: p.grad.clone()
            for n, p in policy.named_parameters()
            if ".guidance." in n and p.grad is not None
        }

    plain, checkpointed = grads(False), grads(True)
    assert plain and plain.keys() == checkpointed.keys()
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_left_padding_and_kv_cache_match_full_forward(arch):
    model, _ = tiny_causal_lm(arch)
    guidance = GuidanceModel(model, GuidanceConfig(lora_r=4))
    with torch.no_grad():
        guidance.head.weight.normal_(0, 0.5)
    ids, _ = _ids(batch=1, length=7)
    z_plain = guidance(ids, torch.ones_like(ids))
    padded = torch.cat([torch.full((1, 3), 1), ids], dim=1)
    pad_mask = torch.cat([torch.zeros(1, 3, dtype=torch.long), torch.ones_like(ids)], dim=1)
    z_padded = guidance(padded, pad_mask)
    torch.testing.assert_close(z_padded[:, 3:], z_plain, atol=1e-4, rtol=1e-4)
    # Incremental decoding with a cache gives the same logits as the full pass.
    cache = DynamicCache()
    steps = [guidance(padded[:, :6], pad_mask[:, :6], cache=cache)[:, -1]]
    for t in range(6, padded.shape[1]):
        steps.append(guidance(padded[:, t : t + 1], pad_mask[:, : t + 1], cache=cache)[:, -1])
    torch.testing.assert_close(torch.stack(steps, 1), z_padded[:, 5:], atol=1e-4, rtol=1e-4)


def test_separate_backbone_copies_first_layers(tiny_llama):
    model, _ = tiny_llama
    guidance = GuidanceModel(model, GuidanceConfig(backbone="separate"))
    ids, mask = _ids()
    with torch.no_grad():
        expected = model.model(ids, attention_mask=mask).last_hidden_state
        torch.testing.assert_close(guidance.hidden_states(ids, mask), expected, atol=1e-5, rtol=1e-5)
    base_ptrs = {p.data_ptr() for p in model.parameters()}
    assert not base_ptrs & {p.data_ptr() for p in guidance.trainable_parameters()}
    small = GuidanceModel(model, GuidanceConfig(backbone="separate", separate_num_layers=1))
    assert len(small.backbone.layers) == 1
    with pytest.raises(ValueError, match="separate_num_layers"):
        GuidanceModel(model, GuidanceConfig(backbone="separate", separate_num_layers=5))


@pytest.mark.parametrize("backbone", ["lora", "separate"])
def test_save_and_load_roundtrip(tmp_path, backbone):
    policy, _ = _policy()
    guidance = GuidanceModel(policy, GuidanceConfig(backbone=backbone, lora_r=4, separate_num_layers=1))
    ids, mask = _ids()
    _train_guidance(guidance, ids, mask, steps=2)
    guidance.save_pretrained(tmp_path / "g")
    assert sorted(p.name for p in (tmp_path / "g").iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((tmp_path / "g" / "config.json").read_text())
    assert meta["guidance_config"]["backbone"] == backbone

    fresh, _ = _policy()  # same seed: same base and policy adapter
    loaded = GuidanceModel.from_pretrained(tmp_path / "g", fresh)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), guidance(ids, mask), atol=1e-6, rtol=1e-6)
    # The file holds guidance weights only.
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "g" / "model.safetensors")).keys()
    assert not any(".default." in k for k in keys)
    if backbone == "lora":
        assert all(k.startswith(("head.", "adapter.")) for k in keys)


def test_load_errors_are_clear(tmp_path):
    model, _ = tiny_causal_lm("llama")
    with pytest.raises(FileNotFoundError, match="config.json"):
        GuidanceModel.from_pretrained(tmp_path, model)
    GuidanceModel(model, GuidanceConfig(lora_r=4)).save_pretrained(tmp_path / "g")
    other, _ = tiny_causal_lm("llama", vocab_size=400)
    with pytest.raises(ValueError, match="vocab_size"):
        GuidanceModel.from_pretrained(tmp_path / "g", other)
    with pytest.raises(ValueError, match="backbone"):
        GuidanceConfig(backbone="full")
    with pytest.raises(ValueError, match="unknown GuidanceConfig keys"):
        GuidanceConfig.from_dict({"lora_rank": 3})


def test_duplicate_adapter_name_is_refused():
    policy, _ = _policy()
    GuidanceModel(policy, GuidanceConfig(lora_r=4))
    with pytest.raises(ValueError, match="already has an adapter"):
        GuidanceModel(policy, GuidanceConfig(lora_r=4))


@pytest.mark.parametrize("backbone", ["lora", "separate"])
def test_shared_logit_head_is_one_z_everywhere_and_round_trips(tmp_path, backbone):
    from steer.guidance.objective import sampled_token_logits

    policy, _ = _policy()
    config = GuidanceConfig(backbone=backbone, lora_r=4, separate_num_layers=1, shared_logit=True)
    guidance = GuidanceModel(policy, config)
    ids, mask = _ids()
    assert (guidance(ids, mask) == 0).all()  # a fresh head is still its (zero) prior
    _train_guidance(guidance, ids, mask, steps=2)
    assert guidance.head.shared.abs().sum() > 0 and not guidance.head.is_fresh()
    hidden = guidance.hidden_states(ids, attention_mask=mask)
    with torch.no_grad():
        z = guidance(ids, mask)
        torch.testing.assert_close(guidance.head(hidden.float()), z)
        gathered = z[:, :-1].gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(sampled_token_logits(hidden, guidance.head, ids), gathered)
    guidance.save_pretrained(tmp_path / "g")
    loaded = GuidanceModel.from_pretrained(tmp_path / "g", _policy()[0])
    assert loaded.config.shared_logit and loaded.head.shared is not None
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), z, atol=1e-6, rtol=1e-6)


def test_shared_logit_carries_context_evidence_to_tokens_never_sampled_after_it():
    """The label is "token 7 occurs in the prefix". Trained on sequences whose next tokens come from one half of
    the vocabulary, only the shared context logit lets R rise after token 7 for tokens of the other half."""

    def train(shared: bool) -> float:
        torch.manual_seed(0)
        model, _ = tiny_causal_lm("llama", seed=0)
        guidance = GuidanceModel(
            model, GuidanceConfig(backbone="separate", separate_num_layers=1, shared_logit=shared)
        )
        gen = torch.Generator().manual_seed(0)

        def batch():
            ids = torch.randint(10, 200, (16, 8), generator=gen)  # next tokens from [10, 200) only
            labels = (torch.rand(16, generator=gen) < 0.5).float()
            ids[labels.bool(), 2] = 7  # the evidence, inside the prefix
            cont = torch.zeros_like(ids, dtype=torch.bool)
            cont[:, 3:] = True
            return ids, cont, labels

        _fit_sequence_labels(guidance, batch)
        with torch.no_grad():
            probe = torch.randint(10, 200, (32, 8), generator=gen)
            with_evidence = probe.clone()
            with_evidence[:, 2] = 7
            unseen = torch.arange(300, 400)  # tokens never sampled in training
            r = [
                torch.sigmoid(guidance(x, torch.ones_like(x))[:, -1, unseen]).mean()
                for x in (with_evidence, probe)
            ]
        return float(r[0] - r[1])

    assert train(shared=True) > 0.2
    assert abs(train(shared=False)) < 0.05


def test_frozen_token_rows_learn_only_the_context(tmp_path):
    """token_rows=False: the rows stay zero and the bias stays the prior, so at every position two tokens' logits
    differ by their priors alone; the shared logit (and the backbone) learn, and the setting round-trips."""
    with pytest.raises(ValueError, match="token_rows=False needs shared_logit=True or token_rank > 0"):
        GuidanceConfig(lora_r=4, token_rows=False)
    with pytest.raises(ValueError, match="GuidanceConfig.token_rank must be >= 0"):
        GuidanceConfig(lora_r=4, token_rank=-1)
    policy, _ = _policy()
    config = GuidanceConfig(lora_r=4, shared_logit=True, token_rows=False)
    guidance = GuidanceModel(policy, config)
    prior = torch.linspace(-3.0, 1.0, guidance.vocab_size)
    with torch.no_grad():
        guidance.head.bias.copy_(prior)
    ids, mask = _ids()
    guidance.set_trainable(False)
    guidance.set_trainable(True)  # unfreezing still leaves the rows and the bias frozen
    assert not guidance.head.weight.requires_grad and not guidance.head.bias.requires_grad
    assert guidance.head.shared.requires_grad
    _train_guidance(guidance, ids, mask, steps=3)
    assert not guidance.head.weight.any()
    torch.testing.assert_close(guidance.head.bias, prior, rtol=0, atol=0)
    assert guidance.head.shared.abs().sum() > 0
    with torch.no_grad():
        z = guidance(ids, mask)
    context = z - prior  # one value per position, the same for every token
    assert context.std(dim=-1).max() < 1e-5
    assert context[..., 0].std() > 0  # the context part varies with the prefix
    guidance.save_pretrained(tmp_path / "g")
    loaded = GuidanceModel.from_pretrained(tmp_path / "g", _policy()[0])
    assert not loaded.config.token_rows and not loaded.head.bias.requires_grad
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), z, atol=1e-6, rtol=1e-6)


def _token_term_gain(token_rank: int) -> float:
    """The label is "the token after the prefix is one of tokens 20-29", whose output embeddings share one
    direction; training samples only tokens 20-24 of the group. Returns R's rise for the never-sampled 25-29 over
    never-sampled tokens outside the group."""

    torch.manual_seed(0)
    model, _ = tiny_causal_lm("llama", seed=0)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        embeddings = model.get_output_embeddings().weight
        direction = torch.randn(embeddings.shape[1], generator=gen)
        embeddings[20:30] = 2.0 * direction + 0.2 * torch.randn(10, embeddings.shape[1], generator=gen)
    config = GuidanceConfig(backbone="separate", separate_num_layers=1, token_rank=token_rank)
    guidance = GuidanceModel(model, config)

    def batch():
        ids = torch.randint(100, 200, (16, 4), generator=gen)
        labels = (torch.rand(16, generator=gen) < 0.5).float()
        ids[labels.bool(), 3] = torch.randint(20, 25, (int(labels.sum()),), generator=gen)
        cont = torch.zeros_like(ids, dtype=torch.bool)
        cont[:, 3] = True  # the BCE scores z[:, 2, x_3] only
        return ids, cont, labels

    _fit_sequence_labels(guidance, batch)
    with torch.no_grad():
        probe = torch.randint(100, 200, (32, 3), generator=gen)
        r = torch.sigmoid(guidance(probe, torch.ones_like(probe))[:, -1])
    return float(r[:, 25:30].mean() - r[:, 300:400].mean())


def test_token_term_carries_what_a_token_teaches_to_tokens_with_nearby_embeddings():
    """token_rank > 0: the embedding-tied term lifts R of group tokens the rounds never sampled; per-token rows
    alone cannot (an unsampled row gets no gradient)."""
    assert _token_term_gain(token_rank=4) > 0.2
    assert abs(_token_term_gain(token_rank=0)) < 1e-6


def test_token_term_starts_at_the_prior_and_round_trips(tmp_path):
    """A fresh head with a token term is exactly its prior; trained, it saves without the embedding basis (taken
    from the base model again on load) and reloads with identical logits; rows stay frozen without token_rows."""
    from safetensors.torch import load_file

    policy, _ = _policy()
    config = GuidanceConfig(lora_r=4, token_rows=False, token_rank=3)
    guidance = GuidanceModel(policy, config)
    prior = torch.linspace(-3.0, 1.0, guidance.vocab_size)
    guidance.init_head(prior)
    assert guidance.head.is_fresh()
    ids, mask = _ids()
    with torch.no_grad():
        torch.testing.assert_close(guidance(ids, mask), prior.expand(*ids.shape, -1), rtol=0, atol=0)
    assert guidance.head.token_up.requires_grad and not guidance.head.weight.requires_grad
    _train_guidance(guidance, ids, mask, steps=3)
    assert not guidance.head.is_fresh() and not guidance.head.weight.any()
    with torch.no_grad():
        z = guidance(ids, mask)
    assert (z - prior).std(dim=-1).max() > 0  # tokens now differ by more than their prior
    guidance.save_pretrained(tmp_path / "g")
    saved = load_file(str(tmp_path / "g" / "model.safetensors"))
    assert {"head.token_up", "head.token_down"} <= set(saved) and "head.token_basis" not in saved
    loaded = GuidanceModel.from_pretrained(tmp_path / "g", _policy()[0])
    assert loaded.config.token_rank == 3
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, mask), z, atol=1e-6, rtol=1e-6)
