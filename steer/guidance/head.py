"""GuidanceHead: the vocabulary head of the guidance model, ``z[v] = w_v . h + b_v (+ u . h)``.

A plain head learns each token's row only where the policy sampled that token: the BCE on ``z[t, x_t]`` sends
gradient to row ``x_t`` alone, and through the zero-initialised rows none reaches the backbone at first. What
the context says about the constraint *whatever the next token*, e.g. "a topic word has already been written",
then has to be learned once per row, and rows of tokens the rounds rarely sample never learn it.

``shared=True`` adds one context logit ``u . h`` to every token's logit: every sampled position trains ``u``
(and, through it, the backbone), so the evidence of the context reaches tokens never sampled in that context.
For ``q* ∝ p . sigmoid(z)`` a large shared logit (the prefix already satisfies the constraint) sends every R
to 1 and q* back to p; a very negative one cancels in the normalisation. ``u`` starts at zero, so a fresh head
is still exactly its prior.

``token_rank=r`` adds a token term tied to the base LM's output embeddings ``E`` (frozen, set by
:meth:`GuidanceHead.set_token_basis`): ``e_v . (B A h)`` with ``A [r, H]``, ``B [H, r]``. Where a plain row
learns only from the samples of its own token, this term learns one low-rank map shared by all tokens, so what
the rounds learn about a token ("leads toward the topic") reaches the tokens whose embeddings are near it: the
head's rows become ``w_v + e_v B A``. ``B`` starts at zero (``A`` small and random, as in LoRA), so a fresh head
is still exactly its prior.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["GuidanceHead", "add_context_terms_", "has_context_terms", "shared_logit", "token_logits"]


class GuidanceHead(nn.Linear):
    """``nn.Linear(hidden, vocab)`` (weight and bias zero) plus, with ``shared``, a zero ``[hidden]`` vector
    ``shared`` whose dot product with the hidden state is added to every token's logit, and with ``token_rank``
    the embedding-tied token term ``token_up [H, r]`` (zero) and ``token_down [r, H]`` over the buffer
    ``token_basis [V, H]`` (not saved: the base model's output embeddings, :meth:`set_token_basis`)."""

    def __init__(
        self, hidden_size: int, vocab_size: int, *, shared: bool = False, token_rank: int = 0, device=None
    ) -> None:
        super().__init__(hidden_size, vocab_size, bias=True, device=device, dtype=torch.float32)
        nn.init.zeros_(self.weight)
        nn.init.zeros_(self.bias)
        if shared:
            self.shared = nn.Parameter(torch.zeros(hidden_size, device=device, dtype=torch.float32))
        else:
            self.register_parameter("shared", None)
        if token_rank < 0:
            raise ValueError(f"GuidanceHead: token_rank must be >= 0, got {token_rank}")
        if token_rank:
            down = torch.empty(token_rank, hidden_size, device=device, dtype=torch.float32)
            nn.init.normal_(down, std=hidden_size**-0.5)
            self.token_down = nn.Parameter(down)
            self.token_up = nn.Parameter(
                torch.zeros(hidden_size, token_rank, device=device, dtype=torch.float32)
            )
        else:
            self.register_parameter("token_down", None)
            self.register_parameter("token_up", None)
        self.register_buffer("token_basis", None, persistent=False)

    def set_token_basis(self, embeddings: Tensor) -> None:
        """The frozen ``[V, H]`` token embeddings the token term is tied to (a float32 copy is kept)."""
        if self.token_up is None:
            raise ValueError("GuidanceHead.set_token_basis: this head has no token term (token_rank 0)")
        expected = (self.out_features, self.in_features)
        if tuple(embeddings.shape) != expected:
            raise ValueError(f"token basis must be {list(expected)}, got {list(embeddings.shape)}")
        self.token_basis = embeddings.detach().to(device=self.weight.device, dtype=torch.float32).clone()

    def forward(self, hidden: Tensor) -> Tensor:
        return add_context_terms_(self, F.linear(hidden, self.weight, self.bias), hidden)

    def is_fresh(self) -> bool:
        """No context has moved the head yet (weights, the shared vector and the token term's ``B`` still zero)."""
        return (
            not bool(self.weight.any())
            and (self.shared is None or not bool(self.shared.any()))
            and (self.token_up is None or not bool(self.token_up.any()))
        )

    def extra_repr(self) -> str:
        rank = 0 if self.token_up is None else self.token_up.shape[1]
        return f"{super().extra_repr()}, shared={self.shared is not None}, token_rank={rank}"


def _token_basis(head: nn.Module) -> Tensor:
    basis = head.token_basis
    if basis is None:
        raise RuntimeError(
            "the guidance head's token term has no token basis; call set_token_basis(output embeddings) first"
        )
    return basis


def token_logits(head: nn.Module, hidden: Tensor, tokens: Tensor | None = None) -> Tensor | None:
    """The token term ``e_v . (B A h)``: ``[..., V]`` for every token, or with ``tokens`` (shaped like
    ``hidden[..., 0]``) ``[...]`` for those tokens only; ``None`` for a head without it (also a bare
    ``nn.Linear``)."""
    up = getattr(head, "token_up", None)
    if up is None:
        return None
    mapped = F.linear(F.linear(hidden.float(), head.token_down), up)  # [..., H]: B A h
    basis = _token_basis(head)
    if tokens is None:
        return F.linear(mapped, basis)
    return (mapped * basis[tokens]).sum(-1)


def shared_logit(head: nn.Module, hidden: Tensor) -> Tensor | None:
    """``u . h`` over the last dimension of ``hidden`` (``[...]`` float32), or ``None`` for a head without it
    (also a bare ``nn.Linear``)."""
    shared = getattr(head, "shared", None)
    if shared is None:
        return None
    return hidden.float() @ shared.float()


def has_context_terms(head: nn.Module | None) -> bool:
    """The head adds more than ``weight . h + bias``: a shared logit or a token term."""
    return head is not None and (
        getattr(head, "shared", None) is not None or getattr(head, "token_up", None) is not None
    )


def add_context_terms_(head: nn.Module, z: Tensor, hidden: Tensor) -> Tensor:
    """``z [..., V]`` (the head's ``weight . h + bias``) plus its shared logit and token term, in place; returns
    ``z``. A bare ``nn.Linear`` adds nothing."""
    extra = shared_logit(head, hidden)
    if extra is not None:
        z.add_(extra.unsqueeze(-1))
    term = token_logits(head, hidden)
    if term is not None:
        z.add_(term)
    return z
