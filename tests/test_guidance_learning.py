"""End to end on a toy constraint: sample from a policy, label, train the guidance model, then check that
R predicts the final label early and that NADO-guided decoding avoids violations.

Toy: "the continuation contains no letter d". Every token that decodes to a string containing "d" violates
it, so the text-level oracle is exactly a token-set constraint. The policy is a tiny random llama whose
output layer is tied to its (scaled) input embeddings: it tends to repeat its last token and sometimes
switches, so, as with real LMs, the prefix carries information about the future (base violation ~30%).

Look-ahead toy: "at least two words of the continuation contain a d". No token's own text satisfies it, so the
oracle's token prior is flat (q* = p); only a learned R, which sees the prefix, can steer towards it.
"""

from __future__ import annotations

import pytest
import torch
from sklearn.metrics import roc_auc_score

from steer.constraints.base import Constraint
from steer.guidance import (
    GuidanceConfig,
    GuidanceModel,
    guidance_loss,
    guided_sample,
    label_samples,
    sample_continuations,
)
from steer.models import tiny_causal_lm

LETTER = "d"
SAMPLING = {"max_new_tokens": 10, "batch_size": 128}
WORDS = "the a cat dog bird tree house road river city day night friend people world music book idea".split()


class NoLetter(Constraint):
    name = "no_letter"

    def __init__(self, letter: str) -> None:
        super().__init__()
        self.letter = letter

    def score(self, texts):
        return [0.0 if self.letter in text else 1.0 for text in texts]


def _prompts(n: int, seed: int) -> list[str]:
    gen = torch.Generator().manual_seed(seed)
    return [
        " ".join(WORDS[j] for j in torch.randint(0, len(WORDS), (3,), generator=gen).tolist())
        for _ in range(n)
    ]


@pytest.fixture
def single_thread():
    """One intra-op thread: faster and steadier for these tiny matmuls on a shared machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _repeating_policy():
    """The tiny llama with its output layer tied to its scaled input embeddings (it tends to repeat)."""
    policy, tok = tiny_causal_lm("llama", seed=0)
    with torch.no_grad():
        policy.lm_head.weight.copy_(policy.model.embed_tokens.weight * 15.0)
    return policy, tok


def _labelled(policy, tok, constraint, *, n_per_prompt: int, prompts: int = 128, seed: int = 0):
    """``n_per_prompt`` samples of 10 tokens from each of ``prompts`` seeded prompts, labelled by ``constraint``."""
    samples = sample_continuations(
        policy, tok, _prompts(prompts, seed), n_per_prompt=n_per_prompt, seed=seed, **SAMPLING
    )
    return label_samples(samples, constraint)


def _fit(guidance, train, *, steps: int, lr: float) -> dict[str, float]:
    """Adam on the guidance loss over minibatches of 64 labelled samples; the last step's metrics."""
    optimizer = torch.optim.Adam(guidance.trainable_parameters(), lr=lr)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        idx = torch.randint(0, len(train), (64,), generator=gen)
        batch = train.batch.select(idx)
        z = guidance(batch.input_ids, batch.attention_mask)
        loss, metrics = guidance_loss(z, batch.input_ids, batch.continuation_mask, train.labels[idx])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return metrics


def test_guidance_learns_toy_constraint(single_thread):
    policy, tok = _repeating_policy()
    constraint = NoLetter(LETTER)
    train = _labelled(policy, tok, constraint, n_per_prompt=4)
    assert train.num_dropped == 0
    assert 0.2 < 1 - float(train.labels.mean()) < 0.7  # a moderate base violation rate

    torch.manual_seed(0)
    guidance = GuidanceModel(policy, GuidanceConfig(lora_r=8))
    assert _fit(guidance, train, steps=100, lr=2e-2)["bce"] < 0.3

    # Fresh samples from unseen prompts: R at the first continuation tokens predicts the final label.
    test_prompts = _prompts(64, 99)
    fresh = label_samples(
        sample_continuations(policy, tok, test_prompts, n_per_prompt=4, seed=123, **SAMPLING), constraint
    )
    labels = fresh.labels.numpy()
    assert 0 < labels.mean() < 1
    with torch.no_grad():
        z = guidance(fresh.batch.input_ids, fresh.batch.attention_mask)
    ids = fresh.batch.input_ids
    r = torch.sigmoid(z[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1))  # r[:, t] = R(x<=t+1)
    first = fresh.batch.prompt_length - 1  # R of the first continuation token
    auc_first = roc_auc_score(labels, r[:, first].numpy())
    auc_early = roc_auc_score(labels, r[:, first : first + 3].mean(-1).numpy())
    assert auc_first > 0.85 and auc_early > 0.85, (auc_first, auc_early)

    # Guided decoding (q* = p * R) at least halves the violation rate of plain sampling.
    plain_violations = 1 - float(fresh.labels.mean())
    guided = guided_sample(policy, guidance, tok, test_prompts, n_per_prompt=4, seed=7, **SAMPLING)
    guided_violations = 1 - float(constraint(guided.texts).mean())
    assert guided_violations <= 0.5 * plain_violations, (guided_violations, plain_violations)


class TwoWordsWith(Constraint):
    """Look-ahead toy: satisfied when at least two words of the continuation contain ``letter``. No single
    token's text satisfies it, so a prior that scores each token on its own is blind to it: whether a token
    helps depends on what came before (one such word already?) and on what is likely to follow."""

    name = "two_words_with_letter"

    def __init__(self, letter: str) -> None:
        super().__init__()
        self.letter = letter

    def score(self, texts):
        return [float(sum(self.letter in word for word in text.split()) >= 2) for text in texts]


def test_learned_guidance_looks_ahead_where_the_token_prior_is_blind(single_thread):
    from steer.guidance.prior import prior_logits, token_prior

    policy, tok = _repeating_policy()
    constraint = TwoWordsWith(LETTER)
    train = _labelled(policy, tok, constraint, n_per_prompt=8)
    assert 0.05 < float(train.labels.mean()) < 0.7  # satisfied sometimes: there is something to learn

    # The oracle's score of every token's own text: no token satisfies the constraint alone, the prior is flat.
    prior = token_prior(constraint, tok, policy.config.vocab_size, use_cache=False)
    assert float(prior.max()) == float(prior.min()) == 0.0
    priors_only = GuidanceModel(policy, GuidanceConfig(lora_r=8))
    priors_only.init_head(prior_logits(prior, floor=0.02))

    torch.manual_seed(0)
    learned = GuidanceModel(policy, GuidanceConfig(lora_r=8))
    learned.init_head(prior_logits(prior, floor=0.02))  # the same start, then trained on labelled samples
    _fit(learned, train, steps=300, lr=1e-2)

    test_prompts = _prompts(64, 99)
    plain = float(
        constraint(
            sample_continuations(policy, tok, test_prompts, n_per_prompt=4, seed=123, **SAMPLING).texts
        ).mean()
    )

    def guided(guidance) -> float:
        out = guided_sample(policy, guidance, tok, test_prompts, n_per_prompt=4, seed=7, **SAMPLING)
        return float(constraint(out.texts).mean())

    by_prior, by_learned = guided(priors_only), guided(learned)
    assert abs(by_prior - plain) <= 0.08, (by_prior, plain)  # a flat R leaves q* = p
    # measured: plain 0.25, the flat prior 0.25, the learned R 0.42
    assert by_learned >= plain + 0.1 and by_learned >= 1.4 * plain, (by_learned, plain)
